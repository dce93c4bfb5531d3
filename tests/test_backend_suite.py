"""The ONNX backend test suite (node and small-model cases) against Hetero.

Runs once per configuration: the default executors, and each installed executor first in
priority order (numpy last as the exact fallback). A configuration can be picked with
HETERO_SUITE=default|onnxruntime|openvino|torch|opencl|numpy.
"""

import os

import onnx.backend.test
import pytest

import hetero.backend
from hetero import executors


def _configurations() -> dict[str, list[str] | None]:
    installed = [lib.library for lib in executors.libraries() if lib.executors]
    configs: dict[str, list[str] | None] = {"default": None}
    for library in installed:
        configs[library] = [library] + [lib for lib in installed if lib != library]
    only = os.environ.get("HETERO_SUITE")
    return {k: v for k, v in configs.items() if not only or k in only.split(",")}


for _tag, _order in _configurations().items():
    _suite = onnx.backend.test.BackendTest(hetero.backend.configured(_order), __name__)
    _suite.include(r".*_cpu$")
    _suite.exclude(hetero.backend.DOWNLOADED_MODEL_CASES)
    for _name, _case in _suite.test_cases.items():
        globals()[f"{_name}_{_tag}"] = pytest.mark.slow(type(f"{_name}_{_tag}", (_case,), {}))

del _tag, _order, _suite, _name, _case
