"""ONNX backend test suite pass counts: Hetero configurations next to ONNX Runtime and onnx.reference.

    python benchmarks/conformance.py [--only hetero-default,onnxruntime] [--failures]

Runs the same `_cpu` node and small-model cases (the downloaded "real" models excluded) for each
backend in one process and prints passed / failed / skipped per backend.
"""

from __future__ import annotations

import argparse
import re
import time
import unittest
import warnings

import numpy as np
import onnx
import onnx.backend.test
from onnx.backend.base import Backend, BackendRep
from onnx.reference import ReferenceEvaluator

import hetero.backend


class _ReferenceRep(BackendRep):
    def __init__(self, model: onnx.ModelProto):
        self.evaluator = ReferenceEvaluator(model)
        self.names = [i.name for i in model.graph.input
                      if i.name not in {t.name for t in model.graph.initializer}]

    def run(self, inputs, **kwargs):
        feeds = inputs if isinstance(inputs, dict) else dict(zip(self.names, inputs, strict=False))
        return self.evaluator.run(None, feeds)


class ReferenceBackend(Backend):
    """The minimal wrapper around onnx.reference.ReferenceEvaluator the issue measured."""

    @classmethod
    def prepare(cls, model, device="CPU", **kwargs):
        return _ReferenceRep(model)

    @classmethod
    def supports_device(cls, device):
        return device == "CPU"


def backends() -> dict[str, object]:
    found: dict[str, object] = {"onnx.reference": ReferenceBackend}
    try:
        import onnxruntime.backend

        found["onnxruntime"] = onnxruntime.backend
    except ImportError:
        pass
    for tag, order in hetero.backend.suite_configurations().items():
        name = "hetero-default" if tag == "default" else f"hetero-{tag}-first"
        found[name] = hetero.backend.configured(order)
    return found


def run_suite(backend: object) -> tuple[int, list[str], int, float]:
    suite_builder = onnx.backend.test.BackendTest(backend, "conformance")
    suite_builder.include(r".*_cpu$")
    suite_builder.exclude(hetero.backend.DOWNLOADED_MODEL_CASES)
    suite = unittest.TestSuite()
    loader = unittest.TestLoader()
    for case in suite_builder.test_cases.values():
        suite.addTests(loader.loadTestsFromTestCase(case))
    result = unittest.TestResult()
    start = time.perf_counter()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        suite.run(result)
    failed = sorted(re.sub(r".*\.", "", t.id()) for t, _ in result.failures + result.errors)
    passed = result.testsRun - len(failed) - len(result.skipped)
    return passed, failed, len(result.skipped), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated backend names")
    parser.add_argument("--failures", action="store_true", help="list failing cases")
    args = parser.parse_args()
    chosen = backends()
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    print(f"{'backend':<28} {'passed':>7} {'failed':>7} {'seconds':>8}")
    for name, backend in chosen.items():
        passed, failed, _, seconds = run_suite(backend)
        print(f"{name:<28} {passed:>7} {len(failed):>7} {seconds:>8.1f}", flush=True)
        if args.failures:
            print("   failed: " + " ".join(failed), flush=True)


if __name__ == "__main__":
    main()
