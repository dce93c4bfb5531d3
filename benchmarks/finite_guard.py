"""What the runtime's NaN and infinity guard (`check_finite`) costs a request.

    python benchmarks/finite_guard.py [--models mobilenet_v2,resnet50] [--rounds 30]

For each model and plan (one ONNX Runtime partition; the first Conv on numpy and the rest on ONNX
Runtime, so a 1x32x112x112 tensor crosses partitions; numpy alone), the same session runs with the
guard on and off in interleaved rounds (medians), and the guard's own time in a request is summed
from each executor's `all_finite` (median over requests). On a shared machine the noise is larger
than the guard: read the guard's own time there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import hetero
from hetero import zoo
from hetero.graph import example_feeds


def plans(model: hetero.Model) -> dict[str, dict]:
    return {"onnxruntime": {"executors": ["onnxruntime"]},
            "numpy Conv 1 + onnxruntime": {"executors": ["onnxruntime", "numpy"], "policy": "manual",
                                           "affinity": {model.nodes[0].name: "numpy"}},
            "numpy": {"executors": ["numpy"]}}


def timed_checks(session: hetero.Session) -> list[float]:
    """Time every `all_finite` call of the session's executors into the returned list."""
    spent = [0.0]
    for executor in session.plan.executors:
        check = executor.all_finite

        def timed(value, check=check):
            start = time.perf_counter()
            try:
                return check(value)
            finally:
                spent[0] += time.perf_counter() - start

        executor.all_finite = timed
    return spent


def measure(session: hetero.Session, feeds: dict, rounds: int) -> tuple[float, float, float]:
    """Median ms per request with the guard on and off, and of the guard's own time in a request."""
    session.run(feeds)
    spent = timed_checks(session)
    on, off, own = [], [], []
    for _ in range(rounds):
        for flag, times in ((True, on), (False, off)):
            session.check_finite = flag
            spent[0] = 0.0
            start = time.perf_counter()
            session.run(feeds)
            times.append(time.perf_counter() - start)
            if flag:
                own.append(spent[0])
    return float(np.median(on)) * 1e3, float(np.median(off)) * 1e3, float(np.median(own)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print("| model | plan | partitions | ms guard on | ms guard off | guard's own ms | share |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = hetero.load(zoo.MODELS[name]())
        feeds = example_feeds(model)
        for label, options in plans(model).items():
            session = hetero.compile(model, **options)
            on, off, own = measure(session, feeds, args.rounds)
            print(f"| {name} | {label} | {len(session.plan.partitions)} | {on:.2f} | {off:.2f} | {own:.3f} "
                  f"| {own / off * 100:.2f}% |")


if __name__ == "__main__":
    main()
