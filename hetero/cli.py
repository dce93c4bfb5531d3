"""The `hetero` command line: devices, plan, run, demo."""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated

import numpy as np

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table
except ImportError as exc:  # the CLI is an optional extra
    raise SystemExit(f"the hetero command needs its CLI extra: pip install 'hetero[cli]' "
                     f"({exc.name} missing)") from exc

import hetero
from hetero.bench import BenchResult, native, run_load
from hetero.graph import example_feeds

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Hetero: one ONNX model, every device and vendor library on this host.")
# Piped or redirected, rich would cut tables at 80 columns: give them room unless COLUMNS says.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)

ExecutorsOption = Annotated[str | None, typer.Option(
    "--executors", "-e", help="Executors in priority order, e.g. 'openvino,numpy' or 'torch@cuda:0'.")]
PolicyOption = Annotated[str, typer.Option(
    "--policy", "-p", help="priority, manual, latency (measured), throughput (measured) or auto.")]
AffinityOption = Annotated[list[str] | None, typer.Option(
    "--affinity", "-a", help="OP_OR_NODE_PATTERN=EXECUTOR (policy manual); repeatable.")]
DimOption = Annotated[list[str] | None, typer.Option(
    "--dim", help="Value of a symbolic input dimension, NAME=INT; repeatable.")]
SimulateOption = Annotated[Path | None, typer.Option(
    "--simulate", help="Devices file (YAML/JSON): add the simulated cards (sim@sim:N) and host (sim@cpu) it "
    "declares, paced to its figures; see examples/devices/.")]
InputOption = Annotated[list[str] | None, typer.Option(
    "--input", "-i", help="NAME=file.npy: a real input, planned and run on; repeatable.")]
ShapeOption = Annotated[list[str] | None, typer.Option(
    "--shape", help="NAME=1x3x640x640: an input's shape to plan (and run) on; repeatable.")]


def _simulate(path: Path | None) -> None:
    """Make the devices a file declares part of this process's executors (and of its children's)."""
    if path is None:
        return
    from hetero.executors.sim_executor import ENVIRONMENT, simulate

    try:
        for executor in simulate(path):
            executor.info()  # its `like` library must be here
    except hetero.HeteroError as exc:
        _fail(exc)
    os.environ[ENVIRONMENT] = str(path.resolve())
    hetero.executors.libraries(refresh=True)


def _simulated_report() -> None:
    """What each simulated device did; figures from them are simulated, and say when the host
    could not keep their pace."""
    for executor in hetero.executors.available():
        if executor.library == "sim":
            console.print(f"[dim]{escape(executor.report())}[/]")


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be more than 0 seconds, got {value:g}")
    return value


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"{what} {item!r} must look like KEY=VALUE")
        pairs[key] = value
    return pairs


def _shapes(items: list[str] | None) -> dict[str, list[int]] | None:
    shapes = {}
    for name, text in _pairs(items, "shape").items():
        try:
            shapes[name] = [int(d) for d in text.lower().split("x")]
        except ValueError:
            raise typer.BadParameter(f"--shape {name}={text}: dims must be integers joined by 'x', "
                                     "e.g. 1x3x640x640") from None
    return shapes or None


def _sampling(inputs: list[str] | None, shapes: list[str] | None) -> dict:
    """Representative inputs for measured planning from --input files and --shape."""
    files = _pairs(inputs, "input")
    return {"sample_inputs": _read_inputs(files) if files else None, "input_shapes": _shapes(shapes)}


def _executors(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


@contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar for long planning work; yields the callback the planner reports to."""
    columns = (TextColumn(f"{what} [dim]{{task.fields[item]}}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(what, total=None, item="")

        def report(done: int, total: int, item: str) -> None:
            bar.update(task, completed=done, total=total, item=item)

        yield report


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}")
    raise typer.Exit(2)


@app.command()
def devices(probe: Annotated[bool, typer.Option(
        "--probe", help="Measure each executor's peak GFLOP/s, bandwidth, call overhead and host link "
        "(the roofline the planner estimates with).")] = False, simulate: SimulateOption = None) -> None:
    """List every device and executor on this host, with library versions."""
    _simulate(simulate)
    inventory = hetero.devices()
    table = Table("device", "executor", "library", "version", "threads", "precision", title="executors")
    for entry in inventory.devices:
        for info in entry.executors:
            table.add_row(f"{entry.device} ({entry.description})", info.name, info.library, info.version,
                          str(info.threads), info.precision)
    console.print(table)
    variants = ", ".join(f"{e.engine}@{e.device}[{p}]" for e in hetero.executors.available()
                         for p in e.precisions if p != e.precision) or "none"
    console.print(escape("names are ENGINE@DEVICE[PRECISION]: the library (with its back end where it has "
                         "several: onnxruntime/cuda is ONNX Runtime's CUDA provider), the device (cpu, "
                         "cuda:0, gpu:0, npu:0) and a reduced precision, used only where allow_precision "
                         f"allows it and the outputs stay accurate; variants here: {variants}"),
                  style="dim")
    for lib in inventory.libraries:
        if not lib.executors and not lib.notes:
            console.print(f"[yellow]{lib.library}[/]: {escape(lib.error or 'no device found')}")
        for note in lib.notes:
            console.print(f"[yellow]{lib.library}[/]: {escape(note)}")
    if probe:
        from hetero.planner.cost import probe as measure

        figures = Table("executor", "peak GFLOP/s", "bandwidth GB/s", "call overhead us", "host link",
                        title="roofline (cached; measured with a 1024^3 GEMM and a 16 MiB add)")
        for executor in hetero.executors.available():
            with console.status(f"probing {executor.name}"):
                profile = measure(executor, refresh=True)
            link = (f"{profile.link_gbs:.1f} GB/s, {profile.link_ms * 1e3:.0f} us" if profile.link_gbs
                    else "-")
            figures.add_row(executor.name, f"{profile.peak_gflops:.1f}", f"{profile.bandwidth_gbs:.1f}",
                            f"{profile.overhead_ms * 1e3:.1f}", link)
        console.print(figures)
    if simulate is not None:
        _simulated_report()


def _print_plan(plan: hetero.Plan, policy: str | None = None) -> None:
    """The plan's tables, titled with the policy asked for (`throughput` keeps a `latency` plan)."""
    parts, transfers = plan.rows()
    timed = bool(plan.partition_estimates or plan.partition_measured)
    table = Table("#", "executor", "nodes", "ops", "after", *(("est ms", "measured ms") if timed else ()),
                  title=f"plan for {plan.model.label} ({len(plan.model.nodes)} nodes, "
                  f"policy {policy or plan.policy})")
    for row in parts:
        table.add_row(*(row if timed else row[:5]))
    console.print(table)
    if transfers:
        moves = Table("tensor", "bytes", "link", "from", "to", title="transfers")
        for row in transfers:
            moves.add_row(*row)
        console.print(moves)
    else:
        console.print("no transfers: every partition shares host memory")
    if plan.handoffs:
        handoffs = Table("tensor", "device", "from", "to", title="hand-offs between libraries (no copy)")
        for h in plan.handoffs:
            handoffs.add_row(h.tensor, h.space, f"#{h.producer} {h.source}", f"#{h.consumer} {h.target}")
        console.print(handoffs)
    if plan.candidates:
        candidates = Table("candidate", "est ms", "measured ms", "", title="placements considered")
        for c in plan.candidates:
            candidates.add_row(c.name, f"{c.estimated_ms:.2f}", "-" if c.measured_ms is None else
                               f"{c.measured_ms:.2f}", "chosen" if c.chosen else f"rejected {c.note}".strip())
        console.print(candidates)
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")


@app.command()
def plan(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
         executors: ExecutorsOption = None, policy: PolicyOption = "priority",
         affinity: AffinityOption = None,
         svg: Annotated[Path | None, typer.Option(
             help="Draw the graph coloured by executor (graphviz).")] = None,
         describe: Annotated[Path | None, typer.Option(
             help="Devices file (YAML/JSON) of devices not on this host, to sketch a plan with estimates.")]
         = None, simulate: SimulateOption = None, inputs: InputOption = None,
         shape: ShapeOption = None) -> None:
    """Show where each part of a model would run, what crosses memory spaces and, for measured
    policies, the estimated and measured times and the candidates rejected (measured on --input
    files, or random inputs of --shape, else of the model's dims)."""
    _simulate(simulate)
    try:
        loaded = hetero.load(model)
        with _progress("profiling") as progress:
            if describe is not None:
                chosen = _sketch(loaded, _executors(executors), policy, describe, progress)
            else:
                chosen = hetero.plan(loaded, _executors(executors), policy,
                                     affinity=_pairs(affinity, "affinity"), progress=progress,
                                     **_sampling(inputs, shape))
    except hetero.HeteroError as exc:
        _fail(exc)
    _print_plan(chosen, policy)
    if svg is not None:
        _draw(chosen, svg)
    if simulate is not None:
        _simulated_report()


def _sketch(model: hetero.Model, executors: list[str] | None, policy: str, describe: Path,
            progress: Callable[[int, int, str], None]) -> hetero.Plan:
    """A plan over this host's executors plus described ones, from estimates (nothing described runs)."""
    from hetero.planner.described import load_described

    described, profiles = load_described(describe)
    chosen = [*hetero.executors.resolve(executors), *described]
    if policy in hetero.planner.MEASURED_POLICIES:
        found = hetero.planner.search(model, chosen, progress=progress, profiles=profiles)
        sketch = found[0].plan
        sketch.candidates = [hetero.planner.CandidateReport(c.name, c.estimate_ms, None, c is found[0])
                             for c in found]
    else:
        sketch = hetero.planner.plan(model, chosen, policy)
    sketch.notes.append(f"sketched with devices described in {describe}: times are estimates only")
    return sketch


def _draw(chosen: hetero.Plan, path: Path) -> None:
    try:
        import graphviz

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(graphviz.Source(chosen.dot()).pipe(format="svg"))
    except ImportError:
        _fail(RuntimeError("--svg needs the graphviz package: pip install 'hetero[cli]'"))
    except graphviz.ExecutableNotFound:
        _fail(RuntimeError("--svg needs Graphviz's dot program: apt install graphviz"))
    console.print(f"wrote {path}")


@app.command()
def profile(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
            executors: ExecutorsOption = None, inputs: InputOption = None, shape: ShapeOption = None) -> None:
    """Measure every node of a model on every executor that supports it and cache the times
    (on --input files, or random inputs of --shape, else of the model's dims)."""
    from hetero.runtime.tuning import profile_nodes

    try:
        loaded = hetero.load(model)
        start = time.perf_counter()
        with _progress("profiling") as progress:
            found = profile_nodes(loaded, _executors(executors), progress=progress,
                                  **_sampling(inputs, shape))
    except hetero.HeteroError as exc:
        _fail(exc)
    console.print(f"profiled {loaded.label} in {time.perf_counter() - start:.1f} s; best estimate: "
                  f"{found[0].name}, {found[0].estimate_ms:.2f} ms")


@app.command()
def run(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
        inputs: InputOption = None, shape: ShapeOption = None,
        executors: ExecutorsOption = None, policy: PolicyOption = "priority",
        affinity: AffinityOption = None, dim: DimOption = None,
        repeat: Annotated[int, typer.Option(min=0, help="Timed runs after the first.")] = 10,
        check: Annotated[bool, typer.Option(
            help="Compare outputs with ONNX Runtime; exit 1 if one differs beyond --tolerance.")] = False,
        tolerance: Annotated[float, typer.Option(
            min=0.0, help="--check: largest |hetero - onnxruntime| allowed, relative to 1 + |onnxruntime|.")]
        = 1e-3,
        trace: Annotated[Path | None, typer.Option(
            help="Write a Chrome-trace/Perfetto timeline of partitions and transfers per device.")] = None,
        simulate: SimulateOption = None) -> None:
    """Compile and run a model; print its outputs, timings and optionally a check against ONNX Runtime."""
    _simulate(simulate)
    try:
        loaded = hetero.load(model)
        feeds = _feeds(loaded, _pairs(inputs, "input"), _pairs(dim, "dim"), _shapes(shape))
        start = time.perf_counter()
        measured = {"sample_inputs": feeds, "input_shapes": _shapes(shape)} \
            if policy in hetero.planner.MEASURED_POLICIES else {}
        with _progress("profiling") as progress:
            session = hetero.compile(loaded, _executors(executors), policy,
                                     affinity=_pairs(affinity, "affinity"), progress=progress, **measured)
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = session.run(feeds)
        first_s = time.perf_counter() - start
        times = []
        tracing = session.tracing() if trace and isinstance(session, hetero.Session) else nullcontext()
        with tracing as timeline:
            for _ in range(repeat):
                start = time.perf_counter()
                session.run(feeds)
                times.append(time.perf_counter() - start)
    except hetero.HeteroError as exc:
        _fail(exc)
    _print_plan(session.plan, policy)
    _say_random(loaded, _pairs(inputs, "input"))
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
    if timeline is not None:
        console.print(f"wrote {timeline.save(trace)} (open in ui.perfetto.dev or chrome://tracing)")
    if simulate is not None:
        _simulated_report()
    if check and not _check_against_onnxruntime(loaded, feeds, outputs, tolerance):
        raise typer.Exit(1)


OUT = Path("out")


@app.command()
def demo(frames: Annotated[int | None, typer.Option(
             min=1, help="Only the first N frames (default: all).")] = None,
         out: Annotated[Path, typer.Option(help="Folder for the annotated video and contact sheet.")] = OUT,
         video: Annotated[Path | None, typer.Option(help="Video file (default: samples/vtest.avi).")] = None,
         tour: Annotated[bool, typer.Option("--tour", help="The placement tour instead: NanoDet-g spread "
                                            "over every library, checked and timed.")] = False,
         repeats: Annotated[int, typer.Option(min=1, help="Tour: timed runs per configuration.")] = 20,
         simulate: SimulateOption = None) -> None:
    """Traffic camera: count pedestrians and vehicles in a video on every device at once."""
    _simulate(simulate)
    console.print(escape(str(hetero.devices())))
    try:
        if tour:
            from hetero.apps.tour import tour as run_tour

            run_tour(repeats=repeats, say=lambda text: console.print(escape(text)), show_plan=_print_plan)
        else:
            _traffic(video, frames, out)
    except (hetero.HeteroError, ImportError) as exc:
        _fail(exc)
    if simulate is not None:
        _simulated_report()


def _traffic(video: Path | None, frames: int | None, out: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from hetero.apps import traffic
    from hetero.apps.detection import detector_model

    video = video or traffic.VIDEO
    count, width, height, _ = traffic.probe(video)
    total = count if frames is None else min(count, frames)
    with console.status(f"compiling the detection pipeline for {width}x{height} frames on every device"):
        pool = hetero.ReplicaPool.build(detector_model(height, width))
    _print_plan(pool.plan)
    columns = (TextColumn("detecting"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"),
               TimeRemainingColumn())
    with pool, Progress(*columns, console=console) as progress:
        task = progress.add_task("frames", total=total)
        report = traffic.run(video, total, out, pool=pool, on_frame=lambda _: progress.advance(task))
    speed = Table("replica", "frames", "busy s", "frames/s", title=f"{len(report.counts)} frames in "
                  f"{report.seconds:.1f} s: {len(report.counts) / report.seconds:.1f} frames/s overall")
    for replica in report.replicas:
        speed.add_row(replica.name, str(replica.frames), f"{replica.busy_seconds:.1f}",
                      f"{replica.frames_per_second:.1f}")
    console.print(speed)
    step = max(1, -(-len(report.counts) // 20))
    table = Table("frame", "pedestrians", "vehicles",
                  title=f"counts every {step} frame(s); vehicles: {', '.join(sorted(traffic.VEHICLES))}")
    for index in range(0, len(report.counts), step):
        table.add_row(str(index), *(str(report.counts[index][k]) for k in ("pedestrian", "vehicle")))
    for kind, how in (("total", sum), ("max per frame", max)):
        table.add_row(kind, *(str(how(c[k] for c in report.counts)) for k in ("pedestrian", "vehicle")),
                      style="bold")
    console.print(table)
    console.print(f"wrote {report.video} and {report.sheet}")
    if not report.playable:
        console.print(f"[yellow]this OpenCV has no H.264 encoder, so {report.video} is MPEG-4 Part 2, which "
                      f"browsers do not play (VLC and ffplay do); for a browser: {report.convert}[/]")


@app.command()
def serve(repository: Annotated[Path, typer.Argument(help="Model repository: REPO/<model>/<N>/model.onnx.")],
          host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
          grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
          api_key: Annotated[str | None, typer.Option(
              envvar="HETERO_API_KEY", help="Key every call but health and metrics must carry.")] = None,
          max_request_mb: Annotated[float, typer.Option(help="Largest request body, MiB.")] = 64.0,
          max_inflight_mb: Annotated[float, typer.Option(
              help="Request bytes all clients may hold at once (each body counts twice), MiB.")] = 1024.0,
          imports: Annotated[list[str] | None, typer.Option(
              "--import", help="Module to import first (one registering custom ops); repeatable.")] = None,
          shutdown_timeout: Annotated[float, typer.Option(
              min=0.0, help="On SIGTERM: seconds to finish the requests in flight and queued.")] = 30.0,
          log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
          simulate: SimulateOption = None,
          ray: Annotated[str | None, typer.Option(
              "--ray", help="Run the models on a Ray cluster: 'local' (a single-node Ray started here), "
              "'auto' or the head's ADDRESS.")] = None,
          ray_groups: Annotated[str, typer.Option(
              help="How each node's devices split into workers: 'node' (one worker per node), 'device' "
              "(one per accelerator device and one for the host) or device groups, 'cuda:0,cuda:1;cpu' "
              "('cpu': the host libraries).")] = "node") -> None:
    """Serve a model repository over KServe v2 (HTTP and gRPC) until SIGTERM or Ctrl-C."""
    if ray is None and ray_groups != "node":
        _fail(hetero.HeteroError("--ray-groups splits the nodes of a Ray cluster: give --ray too"))
    _simulate(simulate)
    try:
        from hetero.serve import Server, logs
    except ImportError as exc:
        _fail(RuntimeError(f"hetero serve needs its extra: pip install 'hetero[serve]' ({exc.name} missing)"))
    logs.configure(log_level)
    options = {"host": host, "http_port": port, "grpc_port": grpc_port, "api_key": api_key,
               "max_request_bytes": int(max_request_mb * (1 << 20)),
               "max_inflight_bytes": int(max_inflight_mb * (1 << 20)), "shutdown_timeout_s": shutdown_timeout}
    try:
        for module in imports or []:
            importlib.import_module(module)
        if ray is None:
            Server(repository, **options).serve_forever()
        else:
            from hetero.ray.serving import ClusterServer

            ClusterServer(repository, address=ray, groups=ray_groups, imports=imports or (),
                          **options).serve_forever()
    except (hetero.HeteroError, OSError, ImportError, ConnectionError) as exc:
        _fail(exc)
    _exit_past_stuck_calls()


def _exit_past_stuck_calls() -> None:
    """End the process now if a library call is still running after the server stopped: Python
    would wait for that thread at exit, for as long as the library hangs. What exit handlers
    would save is saved first."""
    import logging

    from hetero.executors.base import save_probe_answers
    from hetero.runtime.workers import running

    stuck = running()
    if not stuck:
        return
    logging.getLogger("hetero.serve").error("exiting with library calls still running", extra={
        "fields": {"resources": stuck}})
    save_probe_answers()
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1)


@app.command()
def cluster(address: Annotated[str, typer.Argument(
        help="The Ray cluster: 'auto' (the one this machine belongs to), the head's ADDRESS, or 'local' "
        "(a single-node Ray started here, as `serve --ray local` does).")] = "auto",
            groups: Annotated[str, typer.Option(
                "--groups", help="Also show the workers `serve --ray-groups GROUPS` makes on each node: "
                "'device' or 'cuda:0,cuda:1;cpu'.")] = "node") -> None:
    """List every node of a Ray cluster with its devices and executors (what `serve --ray` uses)."""
    try:
        from hetero.ray import probe
    except ImportError as exc:
        _fail(exc)
    try:
        nodes = probe(address, groups=groups)
    except (hetero.HeteroError, ConnectionError, RuntimeError) as exc:
        _fail(exc)
    grouped = any("groups" in node for node in nodes)

    def group(row: dict) -> list[str]:
        return [row.get("group") or "-"] if grouped else []

    table = Table("node", "address", "cores", *(["group"] if grouped else []), "device", "executor",
                  "library", "version", title=f"Ray cluster: {len(nodes)} nodes")
    for node in nodes:
        where = (node["node"], node["address"], str(node.get("cores", "-")))
        if "error" in node:
            table.add_row(*where, *group({}), "-", f"[red]{escape(node['error'])}[/]", "-", "-")
        device = None
        for row in node.get("executors", []):
            named = f"{row['device']} ({row['description']})" if row["device"] != device else ""
            table.add_row(*where, *group(row), named, row["executor"], row["library"], row["version"])
            where, device = ("", "", ""), row["device"]
    console.print(table)
    for node in nodes:
        for group in node.get("groups", []):
            console.print(f"{node['node']}/{group['group']}: a worker on {', '.join(group['devices'])}, "
                          f"host libraries on {group['threads']} thread(s)")
        if node.get("groups") == []:
            console.print(f"{node['node']}: [yellow]no worker[/]: none of the groups' devices is here")
    for node in nodes:
        for library, error in node.get("missing", {}).items():
            console.print(f"{node['node']}: [yellow]{library}[/]: {escape(error or 'no device found')}")


@app.command()
def bench(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
          executors: ExecutorsOption = None, policy: PolicyOption = "priority",
          batch: Annotated[int | None, typer.Option(
              min=1, help="Value of a symbolic batch dimension.")] = None,
          duration: Annotated[float, typer.Option(callback=_positive,
                                                  help="Seconds per measurement.")] = 10.0,
          concurrency: Annotated[int, typer.Option(min=1, help="Clients sending requests at once.")] = 1,
          compare: Annotated[bool, typer.Option(
              help="Also run the native baselines in this process: OpenVINO THROUGHPUT hint, ONNX Runtime "
              "sessions, torch.")] = False, simulate: SimulateOption = None,
          inputs: InputOption = None, shape: ShapeOption = None) -> None:
    """Measure inferences/s and latency percentiles under load, optionally against native libraries
    (on --input files, or random inputs of --shape, else of the model's dims)."""
    _simulate(simulate)
    try:
        loaded = hetero.load(model)
        dims = {str(i.shape[0]): batch for i in loaded.inputs
                if batch and i.shape and isinstance(i.shape[0], str)}
        if batch and not dims and any(i.shape and i.shape[0] != batch for i in loaded.inputs):
            raise hetero.InputError(f"model {loaded.label!r} has a static batch dimension; "
                                    "--batch cannot change it")
        feeds = _feeds(loaded, _pairs(inputs, "input"), {k: str(v) for k, v in dims.items()}, _shapes(shape))
        measured = {"sample_inputs": feeds} if policy in hetero.planner.MEASURED_POLICIES else {}
        with _progress("profiling") as progress:
            runner = hetero.compile(loaded, _executors(executors), policy, progress=progress, **measured)
    except hetero.HeteroError as exc:
        _fail(exc)
    rows = int(next(iter(feeds.values())).shape[0]) if feeds and next(iter(feeds.values())).ndim else 1
    results = [_measure(f"hetero {policy}", lambda: runner.run(feeds), duration, concurrency)]
    if compare:
        results += _baselines(loaded, feeds, duration, concurrency)
    simulated = ", simulated devices (sim@...)" if simulate is not None else ""
    table = Table("runner", "inferences/s", "p50 ms", "p90 ms", "p99 ms", "busy", "hetero / runner",
                  title=f"{loaded.label}: batch {rows}, concurrency {concurrency}, {duration:g} s each, "
                  f"fp32{simulated}")
    for result in results:
        busy = ", ".join(f"{r} {b:.0%}" for r, b in sorted(result.busy.items())) or "-"
        table.add_row(result.name, f"{result.rate * rows:.1f}", *(f"{result.percentile_ms(q):.2f}" for q in
                      (50, 90, 99)), busy, f"{results[0].rate / result.rate:.2f}" if result.rate else "-")
    console.print(table)
    _say_random(loaded, _pairs(inputs, "input"))
    runner.close()
    if simulate is not None:
        _simulated_report()


@app.command()
def capacity(model: Annotated[Path, typer.Argument(help="ONNX model file.")],
             devices: Annotated[Path | None, typer.Option(
                 "--devices", help="Devices file (YAML/JSON): the cards to add, one replica each, profiled "
                 "on their simulation (declared figures); its host, if declared, is the host.")] = None,
             executors: ExecutorsOption = None, policy: PolicyOption = "priority",
             cpu_streams: Annotated[int | None, typer.Option(
                 help="CPU-stream replicas beside the cards (default: none with a devices file, else one "
                 "per core).")] = None,
             servers: Annotated[int, typer.Option(min=1, help="Servers like this one behind a router.")] = 1,
             ) -> None:
    """Predict the throughput and latency of a mix of cards and CPU streams (and of N such servers)
    from one profile per kind of replica, and name the bottleneck: a device, a link or the host CPU."""
    from hetero.runtime.capacity import HOST_PART, Mix
    from hetero.runtime.capacity import capacity as predict_capacity

    try:
        loaded = hetero.load(model)
        mix = Mix.of(devices, _executors(executors), cpu_streams)
        with console.status("profiling") as status:
            prediction = predict_capacity(loaded, mix, servers=servers, policy=policy,
                                          say=lambda text: status.update(escape(text)))
    except (hetero.HeteroError, ValueError) as exc:
        _fail(exc)
    table = Table("replica", "profile", "ms / request", "host CPU ms", "where the time goes",
                  title=f"capacity of {loaded.label}: {len(prediction.replicas)} replicas, "
                  f"{prediction.cores} cores")
    kinds = {id(r): r for r in prediction.replicas}  # twins share their kind's profile
    for replica in kinds.values():
        twins = sum(r is replica for r in prediction.replicas)
        parts = ", ".join(f"{'host' if name == HOST_PART else name} {seconds / replica.seconds:.0%}"
                          for name, seconds in sorted(replica.parts.items(), key=lambda item: -item[1]))
        source = "declared (simulated)" if replica.source == "declared" else replica.source
        table.add_row(f"{twins} x {replica.name}" if twins > 1 else replica.name, source,
                      f"{replica.seconds * 1e3:.2f}", f"{replica.host_cpu_s * 1e3:.2f}", parts)
    console.print(table)
    console.print(f"predicted: {prediction.requests_per_s:.1f} requests/s on one server"
                  + (f", {prediction.total_requests_per_s:.1f} on {servers}" if servers > 1 else "")
                  + f"; latency {prediction.latency_s * 1e3:.2f} ms a request alone")
    console.print(f"bottleneck: {escape(prediction.bottleneck)}")
    if any(r.source == "declared" for r in prediction.replicas):
        console.print("[dim]declared cards were profiled on their simulation; without the host's work of "
                      "simulating them[/]")
        for executor in mix.simulated:
            console.print(f"[dim]{escape(executor.report())}[/]")


def _measure(name: str, call: Callable[[], object], duration: float, concurrency: int) -> BenchResult:
    columns = (TextColumn(name), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(name, total=1.0)
        return run_load(name, call, duration=duration, concurrency=concurrency,
                        progress=lambda done: bar.update(task, completed=done))


def _baselines(model: hetero.Model, feeds: dict, duration: float, concurrency: int) -> list[BenchResult]:
    results = []
    found = {e.library for e in hetero.executors.available()}
    if "openvino" in found:
        with console.status("openvino THROUGHPUT hint"):
            results.append(native.openvino_throughput(model.proto, feeds, duration))
    if "onnxruntime" in found:
        name, call, clients = native.onnxruntime_sessions(model.proto)
        results.append(_measure(name, lambda: call(feeds), duration, max(concurrency, clients)))
    if "torch" in found:
        torch_session = hetero.compile(model, ["torch", "numpy"])
        results.append(_measure("torch eager (node by node, numpy fallback)",
                                lambda: torch_session.run(feeds), duration, concurrency))
    return results


def _feeds(model: hetero.Model, files: dict[str, str], dims: dict[str, str],
           shapes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    try:
        sizes = {k: int(v) for k, v in dims.items()}
    except ValueError as exc:
        raise typer.BadParameter(f"--dim values must be integers: {exc}") from exc
    feeds = example_feeds(model, dims=sizes, shapes=shapes) if len(files) < len(model.inputs) else {}
    feeds.update(_read_inputs(files))
    return feeds


_NPY_MAGIC = b"\x93NUMPY"


def _read_inputs(files: dict[str, str]) -> dict[str, np.ndarray]:
    """Arrays from .npy files (numpy.save's format, one array each), named by input."""
    feeds = {}
    for name, file in files.items():
        expected = f"a .npy file (numpy.save's format, one array; write it with numpy.save({file!r}, array))"
        try:
            with open(file, "rb") as handle:
                if handle.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
                    raise hetero.InputError(f"input {name!r}: {file!r} is not {expected}")
                handle.seek(0)
                feeds[name] = np.load(handle, allow_pickle=False)
        except FileNotFoundError:
            raise hetero.InputError(f"input {name!r}: {file!r} does not exist") from None
        except hetero.InputError:
            raise
        except (OSError, ValueError) as exc:
            raise hetero.InputError(f"input {name!r}: cannot read {file!r} as {expected}: {exc}") from exc
    return feeds


def _say_random(model: hetero.Model, files: dict[str, str]) -> None:
    """Say which inputs were made up, so nobody mistakes the outputs for an answer on real data."""
    made_up = [i for i in model.inputs if i.name not in files]
    if made_up:
        console.print(f"[yellow]inputs: random values for {', '.join(escape(i.name) for i in made_up)} "
                      "(seeded); give real ones with --input NAME=file.npy[/]")


def _check_against_onnxruntime(model: hetero.Model, feeds: dict, outputs: dict, tolerance: float) -> bool:
    """Print each output's largest difference from ONNX Runtime; False if one exceeds `tolerance`
    (times 1 + |onnxruntime|, so it is absolute near zero and relative for large values)."""
    try:
        import onnxruntime as ort
    except ImportError:
        console.print("[red]--check needs onnxruntime: pip install 'hetero[onnxruntime]'[/]")
        return False
    reference = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = dict(zip(model.output_names, reference.run(None, feeds), strict=True))
    passed = True
    for name, value in outputs.items():
        got, want = np.asarray(value), np.asarray(expected[name])
        if got.shape != want.shape or want.dtype.kind not in "fc":
            same = got.shape == want.shape and bool(np.array_equal(got, want))
            console.print(f"check {escape(name)}: {'equal' if same else '[red]differs[/]'} "
                          f"(shape {list(got.shape)}, {want.dtype})")
            passed &= same
            continue
        gap = np.abs(got.astype(np.float64) - want)
        diff = float(np.nanmax(gap)) if gap.size else 0.0
        within = bool(np.all((gap <= tolerance * (1 + np.abs(want))) | (np.isnan(got) & np.isnan(want))))
        verdict = "" if within else f" [red]> tolerance {tolerance:g}[/]"
        console.print(f"check {escape(name)}: max |hetero - onnxruntime| = {diff:.3g}{verdict}")
        passed &= within
    return passed


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
