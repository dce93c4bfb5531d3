"""The `hetero` command line: devices, plan, run."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
except ImportError as exc:  # the CLI is an optional extra
    raise SystemExit(f"the hetero command needs its CLI extra: pip install 'hetero[cli]' "
                     f"({exc.name} missing)") from exc

import hetero
from hetero.graph import example_feeds

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hetero: one ONNX model, every device and vendor library on this host.")
console = Console()

ExecutorsOption = Annotated[str | None, typer.Option(
    "--executors", "-e", help="Executors in priority order, e.g. 'openvino,numpy' or 'torch@cuda:0'.")]
PolicyOption = Annotated[str, typer.Option("--policy", "-p", help="Placement policy: priority or manual.")]
AffinityOption = Annotated[list[str] | None, typer.Option(
    "--affinity", "-a", help="OP_OR_NODE_PATTERN=EXECUTOR (policy manual); repeatable.")]
DimOption = Annotated[list[str] | None, typer.Option(
    "--dim", help="Value of a symbolic input dimension, NAME=INT; repeatable.")]


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"{what} {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def _executors(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}")
    raise typer.Exit(2)


@app.command()
def devices() -> None:
    """List every device and executor on this host, with library versions."""
    inventory = hetero.devices()
    table = Table("device", "executor", "library", "version", "threads", "precision", title="executors")
    for entry in inventory.devices:
        for info in entry.executors:
            table.add_row(f"{entry.device} ({entry.description})", info.name, info.library, info.version,
                          str(info.threads), info.precision)
    console.print(table)
    for lib in inventory.libraries:
        if not lib.executors:
            console.print(f"[yellow]{lib.library}[/]: {escape(lib.error or 'no device found')}")


def _print_plan(plan: hetero.Plan) -> None:
    parts, transfers = plan.rows()
    table = Table("#", "executor", "nodes", "ops", "after",
                  title=f"plan for {plan.model.label} ({len(plan.model.nodes)} nodes, policy {plan.policy})")
    for row in parts:
        table.add_row(*row)
    console.print(table)
    if transfers:
        moves = Table("tensor", "bytes", "link", "from", "to", title="transfers")
        for row in transfers:
            moves.add_row(*row)
        console.print(moves)
    else:
        console.print("no transfers: every partition shares host memory")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")


@app.command()
def plan(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
         executors: ExecutorsOption = None, policy: PolicyOption = "priority",
         affinity: AffinityOption = None) -> None:
    """Show where each part of a model would run and what crosses between memory spaces."""
    try:
        loaded = hetero.load(model)
        _print_plan(hetero.plan(loaded, _executors(executors), policy, affinity=_pairs(affinity, "affinity")))
    except hetero.HeteroError as exc:
        _fail(exc)


@app.command()
def run(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
        inputs: Annotated[list[str] | None, typer.Option(
            "--input", "-i", help="NAME=file.npy; random inputs when none given.")] = None,
        executors: ExecutorsOption = None, policy: PolicyOption = "priority",
        affinity: AffinityOption = None, dim: DimOption = None,
        repeat: Annotated[int, typer.Option(help="Timed runs after the first.")] = 10,
        check: Annotated[bool, typer.Option(help="Compare outputs with ONNX Runtime.")] = False) -> None:
    """Compile and run a model; print its outputs, timings and optionally a check against ONNX Runtime."""
    try:
        loaded = hetero.load(model)
        feeds = _feeds(loaded, _pairs(inputs, "input"), _pairs(dim, "dim"))
        start = time.perf_counter()
        session = hetero.compile(loaded, _executors(executors), policy, affinity=_pairs(affinity, "affinity"))
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = session.run(feeds)
        first_s = time.perf_counter() - start
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            session.run(feeds)
            times.append(time.perf_counter() - start)
    except hetero.HeteroError as exc:
        _fail(exc)
    _print_plan(session.plan)
    table = Table("output", "dtype", "shape", "min", "max", "mean", "std", title="outputs")
    for name, value in outputs.items():
        array = np.asarray(value)
        stats = ([f"{float(f(array)):.4g}" for f in (np.min, np.max, np.mean, np.std)]
                 if array.size and array.dtype.kind in "fiub" else ["-"] * 4)
        table.add_row(name, str(array.dtype), str(list(array.shape)), *stats)
    console.print(table)
    timing = f"compile {compile_s * 1e3:.1f} ms, first run {first_s * 1e3:.1f} ms"
    if times:
        timing += f", median of {repeat} runs {statistics.median(times) * 1e3:.2f} ms"
    console.print(timing)
    if check:
        _check_against_onnxruntime(loaded, feeds, outputs)


@app.command()
def demo(repeats: Annotated[int, typer.Option(help="Timed runs per configuration.")] = 20) -> None:
    """Spread the NanoDet-g detector over every executor library found; check and time it."""
    from hetero.demo import tour

    inventory = hetero.devices()
    console.print(str(inventory))
    try:
        tour(repeats=repeats, say=console.print, show_plan=_print_plan)
    except hetero.HeteroError as exc:
        _fail(exc)


def _feeds(model: hetero.Model, files: dict[str, str], dims: dict[str, str]) -> dict[str, np.ndarray]:
    try:
        sizes = {k: int(v) for k, v in dims.items()}
    except ValueError as exc:
        raise typer.BadParameter(f"--dim values must be integers: {exc}") from exc
    feeds = example_feeds(model, dims=sizes) if len(files) < len(model.inputs) else {}
    for name, file in files.items():
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise hetero.InputError(f"input {name!r}: cannot read {file!r} as a .npy array: {exc}") from exc
    return feeds


def _check_against_onnxruntime(model: hetero.Model, feeds: dict, outputs: dict) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        console.print("[yellow]--check needs onnxruntime: pip install 'hetero[onnxruntime]'[/]")
        return
    reference = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip(model.output_names, reference.run(None, feeds), strict=True))
    for name, value in outputs.items():
        gap = np.abs(np.asarray(value, np.float64) - expected[name])
        diff = float(gap.max()) if gap.size else 0.0
        console.print(f"check {name}: max |hetero - onnxruntime| = {diff:.3g}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
