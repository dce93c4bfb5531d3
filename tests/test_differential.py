"""Differential exactness: the exact numpy executor op version by op version, and every executor
on edge values, against ONNX Runtime and the spec's formulas (`benchmarks/exactness.py`).

The quick tests check the bugs the harness found, one representative case each; the whole
harness (every backend case at every version of its op, every generated case) is marked slow.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

import hetero
from hetero.executors.numpy_executor import NumpyExecutor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import exactness  # the harness lives with the benchmarks

NUMPY = NumpyExecutor()


def _verdicts(cases):
    results = exactness.run(cases, NUMPY)
    assert results
    return {r.case: (r.verdict, r.detail) for r in results}


def _exact(cases):
    bad = {name: v for name, v in _verdicts(cases).items() if v[0] != "exact"}
    assert not bad, bad


def _generated(*ops):
    return [c for c in exactness.generated_cases() if c.op in ops]


def test_batch_normalization_is_inference_at_every_version():
    # onnx.reference ran BatchNormalization-7..13 in training mode: 0.24 off the formula here.
    cases = _generated("BatchNormalization")
    assert {c.version for c in cases} == {6, 7, 9, 14, 15}
    _exact(cases)


def test_resize_10_and_upsample_7_9_run_as_onnx_runtime_does():
    cases = _generated("Resize", "Upsample")
    assert {(c.op, c.version) for c in cases} >= {("Resize", 10), ("Upsample", 7), ("Upsample", 9)}
    _exact([c for c in cases if c.version < 11])


def test_zero_trip_loop_gives_typed_empty_scan_outputs():
    cases = [c for c in _generated("Loop") if c.version in (11, 16)]
    zero = next(c for c in cases if "0_trips" in c.name)
    got = exactness.run_on(NUMPY, hetero.load(zero.model, fold=False), zero.feeds)
    assert got[1].dtype == np.float32 and got[1].shape == (0, 2)
    _exact(cases)


def test_string_normalizer_drops_whole_stopwords_and_keeps_empty_strings_and_accents():
    _exact(_generated("StringNormalizer"))


def test_attribute_defaults_come_from_the_nodes_own_op_version():
    # Softmax-11 defaults to axis=1 (flatten to 2-D), Selu-1 to alpha 1.6732: the reference took -13's
    # and -6's defaults.
    cases = [c for c in _generated("Softmax", "LogSoftmax", "Hardmax", "Selu")]
    for case in cases:
        case.rtol, case.atol = 1e-6, 1e-7
    _exact(cases)


def test_scan_axes_directions_and_empty_scans():
    _exact([c for c in _generated("Scan") if c.version in (9, 16)])


def test_fixed_old_versions():
    # Concat-1 without axis, Tile-1, Cast-1's string types, RoiAlign-10 without the half-pixel
    # shift, Resize-11's tf_half_pixel_for_nn, empty optionals.
    old = {("Concat", 1), ("Tile", 1), ("Cast", 1), ("RoiAlign", 10), ("Optional", 15)}
    cases = [c for c in exactness.generated_cases()
             if (c.op, c.version) in old or "tf_half_pixel_for_nn" in c.name]
    assert len(cases) > 10
    _exact(cases)


def test_the_executor_declines_what_it_cannot_compute_exactly():
    def first_node(proto):
        model = hetero.load(proto, fold=False)
        return model.nodes[0], model

    x = np.zeros((2, 3, 4), np.float32)
    w, r = np.zeros((1, 15, 4), np.float32), np.zeros((1, 15, 5), np.float32)
    lengths = np.full(3, 2, np.int32)
    proto, _ = exactness.node_model("GRU", 14, {"x": x, "w": w, "r": r, "": None, "lens": lengths},
                                    constant=["w", "r"], hidden_size=5, clip=2.0)
    assert not NUMPY.supports(*first_node(proto))  # onnx.reference ignores clip and sequence_lens
    stats = {n: np.ones(3, np.float32) for n in "sbmv"}
    proto, _ = exactness.node_model("BatchNormalization", 9, {"x": x, **stats}, 5, constant=stats)
    assert not NUMPY.supports(*first_node(proto))  # training mode before opset 14
    proto, _ = exactness.node_model("BatchNormalization", 9, {"x": x, **stats}, 1, constant=stats)
    assert NUMPY.supports(*first_node(proto))


def test_backend_cases_at_older_versions_sample():
    cases = list(exactness.backend_cases(modules=("softmax", "batch_normalization", "hardmax")))
    assert {c.source for c in cases} >= {"backend", "converted", "restamped"}
    verdicts = _verdicts(cases)
    assert not {n: v for n, v in verdicts.items() if v[0] in ("wrong", "raised")}
    assert sum(v[0] == "exact" for v in verdicts.values()) > len(cases) * 0.8


def test_harness_judges_a_wrong_kernel_wrong():
    case = next(c for c in _generated("BatchNormalization") if c.version == 9)
    wrong = exactness.Case(case.name, case.model, case.feeds, [case.expected[0] + 0.01], "generated")
    assert exactness.check(wrong, NUMPY).verdict == "wrong"


@pytest.mark.slow
def test_every_claimed_op_version_is_exact():
    """The whole harness: no claimed (op, version) computes other numbers than the spec."""
    results = exactness.run([*exactness.backend_cases(), *exactness.generated_cases()], NUMPY)
    failures = [r for r in results if r.verdict in ("wrong", "raised")]
    assert not failures, failures[:20]
    table = exactness.coverage(results, exactness.claimed_versions())
    assert table["covered"] >= table["claimed"] - 2, table
