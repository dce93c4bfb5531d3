"""Differential exactness: the exact numpy executor op version by op version, and every executor
on edge values, against ONNX Runtime and the spec's formulas (`benchmarks/exactness.py`).

The quick tests check the bugs the harness found, one representative case each; the whole
harness (every backend case at every version of its op, every generated case) is marked slow.
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

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
    # The modules make just these cases when imported first; the ops pick them from every case
    # made so far when the whole suite was collected first.
    cases = list(exactness.backend_cases(ops=("Softmax", "BatchNormalization", "Hardmax"),
                                         modules=("softmax", "batch_normalization", "hardmax")))
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


# -- every executor on edge values -------------------------------------------------------------------

LIBRARIES = ["onnxruntime", "openvino", "torch", "opencl", "numpy", "cupy"]
EDGE_SAMPLE = {"int64 Identity", "int64 Div", "float Cast to int64", "int64 Slice ends at run time",
               "float Round", "float Exp", "float Div", "float Softmax", "empty Add", "MatMul over K=0",
               "Resize nearest round_prefer_ceil half_pixel on .5", "ReduceMax over an empty axis",
               "QuantizeLinear ties"}


@pytest.fixture(scope="module")
def edge_cases():
    return list(exactness.edge_cases())


def _executor(library):
    found = [e for e in exactness.edge_executors() if e.library == library]
    if not found:
        pytest.skip(f"{library} is not installed here")
    return found[0]


def _not_exact(results):
    return [(r.case, r.verdict, r.detail) for r in results if r.verdict not in ("exact", "declined")]


@pytest.mark.parametrize("library", LIBRARIES)
def test_edge_values_sample(library, edge_cases):
    """Each executor computes the spec's numbers on edge values, or declines the node."""
    cases = [c for c in edge_cases if c.name in EDGE_SAMPLE]
    assert len(cases) == len(EDGE_SAMPLE)
    assert not _not_exact(exactness.run(cases, _executor(library)))


def _shape_arithmetic(data_input: bool):
    """Reshape a float tensor to [rows, -1] with rows computed from its Shape (int64 shape
    arithmetic), or from an int64 graph input (int64 data)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    inputs = [x]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["first"], axis=0),
             helper.make_node("Mul", ["first", "three"], ["rows"]),
             helper.make_node("Concat", ["rows", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    if data_input:
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
        nodes[2] = helper.make_node("Mul", ["first", "k"], ["rows"])
    constants = [onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
                 onnx.numpy_helper.from_array(np.array([3], np.int64), "three"),
                 onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    graph = helper.make_graph(nodes, "shape_arithmetic", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], constants)
    return hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fold=False)


def test_openvino_runs_int64_shape_arithmetic_and_declines_int64_data():
    openvino = _executor("openvino")
    model = _shape_arithmetic(data_input=False)
    assert all(openvino.supports(n, model) for n in model.nodes)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert exactness.mismatch(exactness.run_on(openvino, model, {"x": x})[0], x.reshape(6, 4)) is None
    model = _shape_arithmetic(data_input=True)
    declined = {n.op_type for n in model.nodes if not openvino.supports(n, model)}
    assert declined == {"Mul", "Concat", "Reshape"}  # everything downstream of the int64 input


def test_openvino_resize_declines_rounding_that_float32_may_flip():
    openvino = _executor("openvino")

    def node(sizes=None, scales=None, rows=36, **attributes):
        x = np.zeros((1, 1, rows, 8), np.float32)
        inputs = {"x": x, "roi": np.array([], np.float32), "scales": np.array(scales or [], np.float32)}
        if sizes:
            inputs["sizes"] = np.array(sizes, np.int64)
        attributes = {"mode": "nearest"} | attributes
        proto, _ = exactness.node_model("Resize", 13, inputs, constant=[n for n in inputs if n != "x"],
                                        **attributes)
        model = hetero.load(proto, fold=False)
        return model.nodes[0], model

    # (32 + 0.5) * 36 / 78 - 0.5 is exactly 14.5: OpenVINO rounds it to 14, the spec to 15.
    assert not openvino.supports(*node(sizes=[1, 1, 78, 8], nearest_mode="round_prefer_ceil",
                                       coordinate_transformation_mode="pytorch_half_pixel"))
    # 11 * float32(26 / 11) is 25.999998, floor 25: OpenVINO makes the output 26 long.
    assert not openvino.supports(*node(scales=[1, 1, 26 / 11, 1], rows=11, mode="linear"))
    assert openvino.supports(*node(scales=[1, 1, 2, 2], nearest_mode="floor",
                                   coordinate_transformation_mode="asymmetric"))


@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES)
def test_every_executor_on_edge_and_generated_cases(library, edge_cases):
    """Every edge case and every generated case (old op versions) on every executor: the spec's
    numbers (or ONNX Runtime's where no formula is given), or declined."""
    executor = _executor(library)
    assert not _not_exact(exactness.run(edge_cases, executor))
    results = exactness.run(exactness.generated_cases(), executor)
    assert not [r for r in _not_exact(results) if r[1] != "no truth"]


@pytest.mark.parametrize("library", LIBRARIES)
def test_bernoulli_draws_by_its_probabilities(library):
    """Random draws cannot be compared value by value: p of 0 and 1 give 0 and 1 exactly, p = 0.25
    gives ones at that rate (10,000 draws: 0.25 +- 0.02 is over 4 standard deviations)."""
    executor = _executor(library)
    p = np.array([0, 1] * 8 + [0.25] * 10_000, np.float32)
    proto, feeds = exactness.node_model("Bernoulli", 15, {"p": p})
    got = exactness.run_on(executor, hetero.load(proto, fold=False), feeds)
    if isinstance(got, str):
        pytest.skip(f"{executor.name} {got}")
    draws = np.asarray(got[0])
    assert draws.dtype == np.float32 and draws.shape == p.shape
    assert np.array_equal(draws[:16], p[:16])
    assert set(np.unique(draws)) <= {0.0, 1.0}
    assert abs(draws[16:].mean() - 0.25) < 0.02


@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 4, 5), (1, 2, 3, 4, 5)])
def test_global_max_pool_reduces_every_spatial_axis(shape):
    # onnx.reference reduced the last two axes: the channels too for 3-D input (magika, tf2onnx).
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    pooled = [*shape[:2], *[1] * (len(shape) - 2)]
    proto, feeds = exactness.node_model("GlobalMaxPool", 1, {"x": x},
                                        output_types={"y0": (np.float32, pooled)})
    got = exactness.run_on(NUMPY, hetero.load(proto, fold=False), feeds)[0]
    np.testing.assert_array_equal(got, x.max(axis=tuple(range(2, len(shape))), keepdims=True))
