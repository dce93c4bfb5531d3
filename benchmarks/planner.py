"""Latency benchmark of the planner: each library alone, Hetero `priority`, Hetero `latency`.

    python benchmarks/planner.py [--models resnet50,mobilenet_v2,bert,nanodet,custom_op] [--batches 1,8]
                                 [--rounds 7]

Every configuration of a model is compiled first, then timed in interleaved rounds (per round and
configuration a 0.1 s pause, so the previous library's spinning threads settle, one untimed request,
then three timed back to back) and reported by median, fp32 throughout. The ratio column is the best single
library's median over Hetero latency's (>1 means Hetero is faster); `--bf16` adds Hetero latency with
`allow_precision="bf16"` (bf16 only where the measured output error stays within tolerance) and its
ratio to the best fp32 single library. It also reports how long cold profiling and planning took.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx

import hetero
from hetero import executors, zoo
from hetero.bench import settled_times
from hetero.graph import example_feeds
from hetero.runtime.tuning import profile_nodes

ROOT = Path(__file__).resolve().parent.parent
BURST = 3  # timed requests per configuration and round, back to back


def nanodet(batch: int) -> onnx.ModelProto | None:
    if batch != 1:
        return None  # the exported detector has a static batch of 1
    return onnx.load(ROOT / "models" / "nanodet-g-coco.onnx")


def custom_op(batch: int) -> onnx.ModelProto | None:
    from hetero.apps.detection import detector_model

    return detector_model(576, 768) if batch == 1 else None


MODELS: dict[str, Callable[[int], onnx.ModelProto | None]] = {
    "resnet50": lambda b: zoo.resnet50(batch=b),
    "mobilenet_v2": lambda b: zoo.mobilenet_v2(batch=b),
    "bert": lambda b: zoo.bert_encoder(batch=b, seq=128),
    "nanodet": nanodet,
    "custom_op": custom_op,
}


def configurations(model: hetero.Model, bf16: bool) -> dict[str, Callable[[], hetero.Session]]:
    found = executors.available()
    configs: dict[str, Callable[[], hetero.Session]] = {}
    for executor in found:
        configs[f"{executor.library} alone"] = lambda e=executor: hetero.compile(model, [e])
    configs["hetero priority"] = lambda: hetero.compile(model)
    configs["hetero latency"] = lambda: hetero.compile(model, policy="latency")
    if bf16:
        configs["hetero latency +bf16"] = lambda: hetero.compile(model, policy="latency",
                                                                 allow_precision="bf16")
    return configs


def measure(name: str, model: hetero.Model, rounds: int, bf16: bool) -> dict[str, float | None]:
    feeds = example_feeds(model)
    sessions: dict[str, hetero.Session | None] = {}
    for label, build in configurations(model, bf16).items():
        try:
            sessions[label] = build()
            sessions[label].run(feeds)
        except hetero.HeteroError as exc:
            print(f"  {name}: {label} cannot run it: {str(exc).splitlines()[0][:100]}", flush=True)
            sessions[label] = None
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            if session is not None:
                times[label] += [t * 1e3 for t in settled_times(lambda s=session: s.run(feeds), BURST)]
    for session in sessions.values():
        if session is not None:
            session.close()
    return {label: statistics.median(t) if t else None for label, t in times.items()}


@contextmanager
def empty_cache() -> Iterator[None]:
    """Point every cache at a new empty folder for the block."""
    from hetero.planner import cost
    from hetero.runtime import samples, tuning

    before = os.environ.get("HETERO_CACHE_DIR")
    os.environ["HETERO_CACHE_DIR"] = tempfile.mkdtemp(prefix="hetero-bench-")
    for store in (cost._costs, tuning._plans, samples._shapes):
        store.clear_memory()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HETERO_CACHE_DIR")
        else:
            os.environ["HETERO_CACHE_DIR"] = before
        for store in (cost._costs, tuning._plans, samples._shapes):
            store.clear_memory()


def planning_times() -> tuple[float, float, float]:
    """ResNet-50 in an empty cache: cold profiling of every node, then the first (cold) compile with
    policy latency, then a warm one (the choice recalled for this shape profile)."""
    model = hetero.load(zoo.resnet50())
    with empty_cache():
        start = time.perf_counter()
        profile_nodes(model, None)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        hetero.compile(model, policy="latency")
        cold_compile = time.perf_counter() - start
        start = time.perf_counter()
        hetero.compile(model, policy="latency")
        return cold, cold_compile, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bf16", action="store_true",
                        help="add Hetero latency with allow_precision='bf16' (accuracy-checked) as a column")
    args = parser.parse_args()
    print(f"executors: {', '.join(e.name for e in executors.available())}; fp32; median of {args.rounds} "
          f"interleaved rounds x {BURST} requests (ms per request)", flush=True)
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            proto = MODELS[name](batch)
            if proto is None:
                print(f"  {name} batch {batch}: not applicable", flush=True)
                continue
            model = hetero.load(proto, name=f"{name} b{batch}")
            results = measure(name, model, args.rounds, args.bf16)
            rows.append((f"{name} b{batch}", results))
            summary = ", ".join(f"{k} {v:.2f}" for k, v in results.items() if v)
            print(f"  {name} b{batch}: {summary}", flush=True)
    labels = list(dict.fromkeys(label for _, results in rows for label in results))
    singles = [label for label in labels if label.endswith(" alone")]
    ours = [label for label in labels if label.startswith("hetero latency")]
    headers = labels + [f"best single / {label.removeprefix('hetero ')}" for label in ours]
    print("\n| model | " + " | ".join(headers) + " |")
    print("|---|" + "---|" * (len(labels) + len(ours)))
    for model_name, results in rows:
        best = min((results[s] for s in singles if results.get(s)), default=None)
        ratios = [f"{best / results[o]:.2f}x" if best and results.get(o) else "n/a" for o in ours]
        cells = [f"{results[label]:.2f}" if results.get(label) else "n/a" for label in labels]
        print(f"| {model_name} | " + " | ".join(cells + ratios) + " |")
    cold, cold_compile, warm_compile = planning_times()
    print(f"\nResNet-50 planning: cold profiling {cold:.1f} s in an empty cache, then compile with policy "
          f"latency {cold_compile:.2f} s, warm {warm_compile:.2f} s")


if __name__ == "__main__":
    main()
