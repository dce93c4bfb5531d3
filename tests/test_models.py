"""Model-level checks against ONNX Runtime: the real NanoDet detector and the zoo's test networks,
under `priority` with each executor first and under random placements across every executor.

Tolerance: |hetero - onnxruntime| <= 1e-4 + 1e-3 * |onnxruntime| elementwise (fp32 throughout;
libraries differ in summation order and fused kernels, never in semantics).
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hetero
from hetero import executors
from hetero.graph import example_feeds
from hetero.planner import Capability
from hetero.zoo import detector_head, small_cnn, small_transformer

NANODET = Path(__file__).parent.parent / "models" / "nanodet-g-coco.onnx"
INSTALLED = [e.name for e in executors.available()]
RTOL, ATOL = 1e-3, 1e-4


def _assert_matches(outputs, expected):
    assert outputs.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


def _reference(model: hetero.Model, feeds):
    session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(model.output_names, session.run(None, feeds), strict=True))


@pytest.fixture(scope="module")
def nanodet():
    model = hetero.load(NANODET)
    feeds = example_feeds(model)
    return model, feeds, _reference(model, feeds)


@pytest.mark.slow
@pytest.mark.parametrize("first", INSTALLED)
def test_nanodet_priority_with_each_executor_first(nanodet, first):
    model, feeds, expected = nanodet
    order = [first] + [e for e in INSTALLED if e != first]
    session = hetero.compile(model, order)
    assert session.plan.partitions[0].executor.name == first or first == "numpy@cpu"
    _assert_matches(session.run(feeds), expected)


def _random_placement(model: hetero.Model, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    capability = Capability(model, executors.available())
    return {node.name: str(rng.choice([e.name for e in capability.candidates(node)])) for node in model.nodes}


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_nanodet_random_placements(nanodet, seed):
    model, feeds, expected = nanodet
    session = hetero.compile(model, INSTALLED, "manual", affinity=_random_placement(model, seed))
    assert len({p.executor.name for p in session.plan.partitions}) > 1
    _assert_matches(session.run(feeds), expected)


BUILDERS = {"resnet_style_cnn": small_cnn, "transformer_block": small_transformer,
            "detector_head": detector_head}


@pytest.mark.slow
@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(BUILDERS)), weights=st.integers(0, 1000), placement=st.integers(0, 10**6))
def test_random_placements_of_test_networks_match_onnxruntime(name, weights, placement):
    model = hetero.load(BUILDERS[name](seed=weights))
    feeds = example_feeds(model, seed=weights)
    session = hetero.compile(model, INSTALLED, "manual", affinity=_random_placement(model, placement))
    _assert_matches(session.run(feeds), _reference(model, feeds))
