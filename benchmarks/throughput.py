"""Throughput and overhead benchmark: Hetero against OpenVINO and ONNX Runtime run natively.

    python benchmarks/throughput.py [--models resnet50,nanodet,mobilenet_v2] [--seconds 10]

1. Requests per second with the queue kept full: Hetero's `throughput` policy against OpenVINO's
   THROUGHPUT hint with async infer requests (as benchmark_app runs it) and ONNX Runtime with one
   session per core; fp32 everywhere.
2. Hetero's own cost at batch 1: a single-executor Hetero session against the same library run
   natively, median of interleaved runs (target: within 3%).

GPU and CPU replicas together against each alone are among the GPU rows: benchmarks/gpu.py.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import onnx

import hetero
from hetero import executors, zoo
from hetero.bench import native, run_load, settled_times
from hetero.graph import example_feeds
from hetero.runtime.tuning import measure_rate

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"resnet50": zoo.resnet50, "mobilenet_v2": zoo.mobilenet_v2,
          "nanodet": lambda: onnx.load(ROOT / "models" / "nanodet-g-coco.onnx")}


def throughput(model: hetero.Model, seconds: float) -> None:
    feeds = example_feeds(model)
    runner = hetero.compile(model, policy="throughput")
    rows = [("hetero throughput", measure_rate(runner, feeds, seconds), runner.plan.notes[-1])]
    runner.close()
    folded = f"on the model as Hetero loads it ({model.folded} constant nodes folded)" if model.folded else ""
    try:
        result = native.openvino_throughput(model.proto, feeds, seconds)
        rows.append((result.name, result.rate, folded))
    except Exception as exc:
        reason = str(exc).splitlines()[0][:80]
        rows.append(("openvino THROUGHPUT hint", None, f"cannot run natively: {reason}"))
    name, call, clients = native.onnxruntime_sessions(model.proto)
    rows.append((name, run_load(name, lambda: call(feeds), duration=seconds, concurrency=clients).rate, ""))
    ours = rows[0][1]
    print(f"\n{model.label}: requests/s with the queue full ({seconds:g} s each, fp32)")
    print("| runner | req/s | hetero / runner | note |\n|---|---|---|---|")
    for label, rate, note in rows:
        ratio = f"{ours / rate:.2f}" if rate else "-"
        print(f"| {label} | {rate:.1f} | {ratio} | {note} |" if rate else f"| {label} | n/a | - | {note} |")


def overhead(model: hetero.Model, rounds: int = 20) -> None:
    feeds = example_feeds(model)
    pairs = {}
    libraries = {e.library for e in executors.available()}
    if "onnxruntime" in libraries:
        pairs["onnxruntime"] = (hetero.compile(model, ["onnxruntime@cpu"]),
                                native.onnxruntime_latency(model.proto))
    if "openvino" in libraries:
        try:
            pairs["openvino"] = (hetero.compile(model, ["openvino@cpu"]),
                                 native.openvino_latency(model.proto))
        except Exception as exc:
            print(f"  openvino cannot run {model.label} natively: {str(exc).splitlines()[0][:80]}")
    print(f"\n{model.label}: batch-1 latency, Hetero single-executor session vs the library natively "
          f"(median of {rounds} interleaved rounds: a 0.1 s pause, an untimed request, 3 timed)")
    print("| library | hetero ms | native ms | hetero / native |\n|---|---|---|---|")
    for library, (session, call) in pairs.items():
        ours, theirs = [], []
        for _ in range(3):
            session.run(feeds)
            call(feeds)
        for _ in range(rounds):
            ours += settled_times(lambda s=session: s.run(feeds))
            theirs += settled_times(lambda c=call: c(feeds))
        a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        print(f"| {library} | {a:.2f} | {b:.2f} | {a / b:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,nanodet")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"executors: {', '.join(e.name for e in executors.available())}")
    for name in args.models.split(","):
        model = hetero.load(MODELS[name](), name=name)
        throughput(model, args.seconds)
        overhead(model)


if __name__ == "__main__":
    main()
