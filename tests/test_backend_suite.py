"""The ONNX backend test suite (node and small-model cases) against Hetero.

Runs once per configuration of `hetero.backend.suite_configurations()`: the default executors,
each installed executor first in priority order (numpy last as the exact fallback), and the host
twin of the CUDA interpreter. Pick some with HETERO_SUITE=default,onnxruntime,...
"""

import os

import onnx.backend.test
import pytest

import hetero.backend

# Cases every configuration fails, onnx.reference included, and why.
EVERYWHERE = {
    r"test_bernoulli": "random draws: the expected values came from another random generator",
    r"test_gradient_of_add": "Gradient (ai.onnx.preview.training) is a training op no executor implements",
    r"test_loop16_seq_none": "an empty optional sequence: every library hands it back in another form",
}


def _configurations() -> dict[str, list | None]:
    only = os.environ.get("HETERO_SUITE")
    configs = hetero.backend.suite_configurations()
    return {k: v for k, v in configs.items() if not only or k in only.split(",")}


for _tag, _order in _configurations().items():
    _suite = onnx.backend.test.BackendTest(hetero.backend.configured(_order), __name__)
    _suite.include(r".*_cpu$")
    _suite.exclude(hetero.backend.DOWNLOADED_MODEL_CASES)
    for _pattern in EVERYWHERE:
        _suite.xfail(_pattern)
    for _name, _case in _suite.test_cases.items():
        globals()[f"{_name}_{_tag}"] = pytest.mark.slow(type(f"{_name}_{_tag}", (_case,), {}))

del _tag, _order, _suite, _name, _case, _pattern
