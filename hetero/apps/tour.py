"""The placement tour: one real detector (NanoDet-g) spread over every executor library found.

Each op type goes to a different library in turn (those that support it), so every library on
the host runs part of the network; the outputs are checked against ONNX Runtime alone and the
time is compared with each library running the whole model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import hetero
from hetero import executors
from hetero.apps.detection import NANODET
from hetero.graph import example_feeds
from hetero.planner import Capability


def spread_affinity(model: hetero.Model, libraries: list[executors.Executor]) -> dict[str, str]:
    """Op type -> executor, cycling through the libraries so each gets some op types it supports."""
    capability = Capability(model, libraries)
    affinity: dict[str, str] = {}
    turn = 0
    for op_type in sorted({n.op_type for n in model.nodes}):
        nodes = [n for n in model.nodes if n.op_type == op_type]
        able = [e for e in libraries if all(capability.can(e, n) for n in nodes)]
        if able:
            affinity[op_type] = able[turn % len(able)].name
            turn += 1
    return affinity


def time_runs(session: hetero.Session, feeds: dict, repeats: int) -> float:
    session.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tour(model_path: Path = NANODET, repeats: int = 20, say: Callable[[str], None] = print,
         show_plan: Callable[[hetero.Plan], None] | None = None) -> dict[str, float]:
    """Run the tour; returns median milliseconds per configuration."""
    model = hetero.load(model_path)
    feeds = example_feeds(model)
    found = executors.available()
    say(f"{model.label}: {len(model.nodes)} nodes; executors here: {', '.join(e.name for e in found)}")
    affinity = spread_affinity(model, found)
    session = hetero.compile(model, found, "manual", affinity=affinity)
    (show_plan or (lambda p: say(str(p))))(session.plan)
    outputs = session.run(feeds)
    timings = {"hetero (spread over every library)": time_runs(session, feeds, repeats) * 1e3}
    for executor in found:
        single = hetero.compile(model, [executor, "numpy"])
        timings[f"{executor.name} first, numpy fallback"] = time_runs(single, feeds, repeats) * 1e3
    try:
        import onnxruntime as ort

        reference = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
        expected = reference.run(None, feeds)
        gap = max(float(np.max(np.abs(outputs[name] - value)))
                  for name, value in zip(model.output_names, expected, strict=True))
        say(f"check against ONNX Runtime alone: max |difference| = {gap:.2e} over {len(expected)} outputs")
    except ImportError:
        say("onnxruntime is not installed: no reference check (pip install 'hetero[onnxruntime]')")
    for name, ms in timings.items():
        say(f"  {name:<44} {ms:8.2f} ms  (median of {repeats})")
    return timings
