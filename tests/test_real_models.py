"""Small in-code fixtures of what real exporters produce and used to break planning: dynamic H/W,
a sample-rate input, shapes only a run can tell, vendor-domain ops, fp16, and errors that name
their reason. The real models themselves are in test_corpus.py (slow)."""

import uuid
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import hetero
from hetero.graph import example_feeds
from hetero.graph.model import DEFAULT_DIMS, TensorInfo, default_shape
from hetero.runtime.samples import made_up, representative

ort = pytest.importorskip("onnxruntime")
HOST = ["onnxruntime", "numpy"]


@pytest.fixture(autouse=True, scope="module")
def planning_cache(tmp_path_factory):
    """One cache for the module: executors' roofline figures are probed once, not per test."""
    from hetero.planner import cost
    from hetero.runtime import samples, tuning

    stores = (cost._costs, tuning._plans, samples._shapes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HETERO_CACHE_DIR", str(tmp_path_factory.mktemp("planning")))
        for store in stores:
            store.clear_memory()
        yield
    for store in stores:
        store.clear_memory()


def _model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    graph = helper.make_graph(nodes, "fixture", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=imports)


def _onnxruntime(proto, feeds):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _no_warnings(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return call()


def test_default_shapes_by_input_kind():
    image = TensorInfo("images", np.dtype(np.float32), ("batch", 3, "height", "width"))
    nhwc = TensorInfo("frames", np.dtype(np.float32), (None, "h", "w", 3))
    audio = TensorInfo("input", np.dtype(np.float32), ("batch", "sequence"))
    scalar = TensorInfo("sr", np.dtype(np.int64), ())
    size = DEFAULT_DIMS["image"]
    assert default_shape(image) == (1, 3, size, size)
    assert default_shape(nhwc) == (1, size, size, 3)
    assert default_shape(audio) == (1, DEFAULT_DIMS["other"])
    assert default_shape(scalar) == ()
    assert default_shape(image, {"height": 48}) == (1, 3, 48, size)


def test_exporters_minus_one_and_question_mark_dims_are_symbolic():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "?", "?"])
    proto = _model([helper.make_node("Relu", ["x"], ["y"])], [x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "?", "?"])])
    model = hetero.load(proto)
    assert model.inputs[0].shape == (None, 3, None, None)
    feeds = {"x": np.ones((1, 3, 48, 192), np.float32)}  # '?' twice does not mean H == W
    np.testing.assert_array_equal(hetero.compile(model, ["numpy"]).run(feeds)["y"], feeds["x"])


def _dynamic_detector():
    """A two-scale head: a stride-2 branch upsampled back and concatenated with the input, as
    YOLO necks do; it cannot run with H = W = 1."""
    weights = np.random.default_rng(0).standard_normal((3, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["images", "w"], ["down"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["down", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Concat", ["images", "up"], ["out"], axis=1)]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 6, "h", "w"])],
                  [helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.ravel()),
                   helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])])


def test_detector_with_dynamic_height_and_width_plans_on_default_dims():
    proto = _dynamic_detector()
    session = _no_warnings(lambda: hetero.compile(proto, HOST, "latency"))
    assert session.plan.policy == "latency"
    feeds = {"images": np.random.default_rng(1).standard_normal((1, 3, 64, 96)).astype(np.float32)}
    want = _onnxruntime(proto, feeds)["out"]
    np.testing.assert_allclose(session.run(feeds)["out"], want, rtol=1e-5, atol=1e-5)


def _vad_like():
    """Audio with a sample-rate input that sizes a buffer: random small integers make it negative."""
    nodes = [helper.make_node("Sub", ["sr", "offset"], ["size"]),
             helper.make_node("Unsqueeze", ["size", "axes"], ["shape"]),
             helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                              value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Mul", ["input", "ones"], ["out"])]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "samples"]),
                          helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "samples"])],
                  [helper.make_tensor("offset", TensorProto.INT64, [], [16000 - 512]),
                   helper.make_tensor("axes", TensorProto.INT64, [1], [0])])


def test_measuring_on_made_up_inputs_that_cannot_run_keeps_the_priority_plan_and_names_the_input():
    proto = _vad_like()
    with pytest.warns(RuntimeWarning, match=r"sr \(int64\[\]"):
        session = hetero.compile(proto, HOST, "latency")
    assert session.plan.policy == "priority"
    assert any("sample_inputs" in note for note in session.plan.notes)
    feeds = {"input": np.ones((1, 512), np.float32), "sr": np.array(16000, np.int64)}
    np.testing.assert_array_equal(session.run(feeds)["out"], feeds["input"])


def test_sample_inputs_let_the_measured_policies_plan():
    proto = _vad_like()
    feeds = {"input": np.linspace(-1, 1, 512, dtype=np.float32)[None], "sr": np.array(16000, np.int64)}
    for policy in ("latency", "throughput"):
        runner = _no_warnings(lambda policy=policy: hetero.compile(proto, HOST, policy, sample_inputs=feeds))
        assert runner.plan.policy == "latency"
        np.testing.assert_array_equal(runner.run(feeds)["out"], feeds["input"])
        runner.close()


def test_replicas_of_the_throughput_policy_plan_on_the_callers_inputs_too(monkeypatch):
    """A whole-model plan with a card in it: the CPU-stream replicas are placed by a planning of
    their own, on the caller's samples, not on made-up ones that cannot run."""
    from hetero.executors import resolve
    from hetero.executors.sim_executor import simulate
    from hetero.runtime import tuning

    proto = _vad_like()
    card = simulate({"devices": [{"like": "onnxruntime", "speed": 4}]})
    feeds = {"input": np.linspace(-1, 1, 512, dtype=np.float32)[None], "sr": np.array(16000, np.int64)}
    placed = hetero.compile(proto, [*card, *HOST])  # priority: the card takes every node
    assert card[0] in placed.plan.executors
    planned_on = []

    def tune_latency(*args, **kwargs):
        planned_on.append(kwargs.get("sample_inputs"))
        return latency(*args, **kwargs)

    latency = tuning.tune_latency
    monkeypatch.setattr(tuning, "tune_latency", tune_latency)
    monkeypatch.setattr(tuning, "default_threads", lambda: 2)
    replicas = _no_warnings(lambda: tuning._stream_replicas(
        placed.plan.model, resolve(HOST), placed, None, {"sample_inputs": feeds, "input_shapes": None}))
    assert planned_on == [feeds] and len(replicas) == 2
    for replica in (*replicas, placed):
        np.testing.assert_array_equal(replica.run(feeds)["out"], feeds["input"])
        replica.close()


def test_input_shapes_give_the_profile_to_plan_on():
    nodes = [helper.make_node("Reshape", ["x", "rows"], ["y"])]  # needs a multiple of 300 elements
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 300])],
                   [helper.make_tensor("rows", TensorProto.INT64, [2], [-1, 300])])
    model = hetero.load(proto)
    assert representative(model, input_shapes={"x": [1, 600]})[0]["x"].shape == (1, 600)
    assert "dims defaulted" in made_up(model, None, None)[0]
    with pytest.warns(RuntimeWarning, match="input_shapes"):
        assert hetero.compile(model, HOST, "latency").plan.policy == "priority"
    session = _no_warnings(lambda: hetero.compile(model, HOST, "latency", input_shapes={"x": [1, 600]}))
    assert session.plan.policy == "latency"
    with pytest.raises(hetero.InputError, match="no input 'images'"):
        hetero.compile(model, HOST, "latency", input_shapes={"images": [1, 3]})


def test_second_planning_of_a_shape_profile_recalls_the_choice():
    proto = _dynamic_detector()
    first = hetero.compile(proto, HOST, "latency", input_shapes={"images": [1, 3, 32, 32]})
    from hetero.planner import cost

    calls = []
    original = cost.CostModel._measure_one
    cost.CostModel._measure_one = lambda self, *a: calls.append(a) or original(self, *a)
    try:
        again = hetero.compile(proto, HOST, "latency", input_shapes={"images": [1, 3, 32, 32]})
    finally:
        cost.CostModel._measure_one = original
    assert calls == []
    assert [(c.name, c.measured_ms) for c in again.plan.candidates] == \
        [(c.name, c.measured_ms) for c in first.plan.candidates]
    assert [p.executor.name for p in again.plan.partitions] == \
        [p.executor.name for p in first.plan.partitions]


def _gelu_model():
    nodes = [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"),
             helper.make_node("Relu", ["y"], ["z"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])], domains=["com.microsoft"])


def test_vendor_domain_ops_load_typed_and_run_on_the_library_that_has_them():
    model = hetero.load(_gelu_model())
    gelu = model.nodes[0]
    assert model.tensor(gelu.outputs[0]).describe() == "float32[2, 8]"  # typed by ONNX Runtime
    session = hetero.compile(model)
    assert session.plan.executor_of(gelu).library == "onnxruntime"
    x = np.linspace(-3, 3, 16, dtype=np.float32).reshape(2, 8)
    from math import erf
    want = np.maximum(np.vectorize(lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2))))(x), 0)
    np.testing.assert_allclose(session.run({"x": x})["z"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(hetero.PlanError, match=r"numpy@cpu: no kernel for com\.microsoft::Gelu"):
        hetero.compile(model, ["numpy"])


def test_unknown_domain_is_refused_at_load_naming_it():
    proto = _model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.none")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                   domains=["com.example.none"])
    with pytest.raises(hetero.UnknownDomainError, match="no installed library implementing it"):
        hetero.load(proto)


def _fp16_chain():
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((8, 8)).astype(np.float16), rng.standard_normal(8).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 8])],
                   [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return proto, w, b


def test_onnxruntime_runs_float16_it_casts_around_float_kernels():
    proto, w, b = _fp16_chain()
    session = hetero.compile(proto, ["onnxruntime"])
    assert [p.executor.library for p in session.plan.partitions] == ["onnxruntime"]
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float16)
    want = np.maximum(x.astype(np.float32) @ w.astype(np.float32) + b.astype(np.float32), 0)
    np.testing.assert_allclose(session.run({"x": x})["y"].astype(np.float32), want, rtol=1e-2, atol=1e-2)


def test_no_executor_error_names_the_reason_per_executor():
    proto = _model([helper.make_node("Relu", ["x"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [4])])
    with pytest.raises(hetero.PlanError, match=r"openvino@cpu: its binding does not exchange bfloat16"):
        hetero.compile(proto, ["openvino"])
    ints = _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.INT16, [4])],
                  [helper.make_tensor_value_info("y", TensorProto.INT16, [4])])
    with pytest.raises(hetero.PlanError, match=
                       r"onnxruntime@cpu: no CPU kernel for Relu-14 on tensor\(int16"):
        hetero.compile(ints, ["onnxruntime"])
    x = np.array([-2, -1, 0, 3], np.int16)
    fallback = hetero.compile(ints, ["onnxruntime", "numpy"])
    np.testing.assert_array_equal(fallback.run({"x": x})["y"], [0, 0, 0, 3])


def test_example_feeds_follow_the_given_shapes():
    model = hetero.load(_dynamic_detector())
    assert example_feeds(model, shapes={"images": [2, 3, 16, 8]})["images"].shape == (2, 3, 16, 8)


def test_serving_a_model_with_unknown_dims_answers_at_once_and_plans_on_its_first_request():
    from hetero.runtime.replanning import Replanning, serving_pool

    pool = serving_pool(hetero.load(_vad_like()), replicas=[HOST], cpu_streams=1, policy="latency")
    try:
        assert isinstance(pool, Replanning) and pool.plan.policy == "priority"
        feeds = {"input": np.linspace(-1, 1, 512, dtype=np.float32)[None], "sr": np.array(16000, np.int64)}
        np.testing.assert_array_equal(pool.run(feeds)["out"], feeds["input"])  # answered by priority
        assert pool.wait_planned(timeout=120), pool.status
        assert pool.status == "measured" and pool.plan.policy == "latency"
        np.testing.assert_array_equal(pool.run(feeds)["out"], feeds["input"])
        assert len(pool.replicas) == 1
    finally:
        pool.close()


def test_a_failed_replan_keeps_the_first_runner_serving():
    from hetero.runtime.replanning import Replanning

    model = hetero.load(_dynamic_detector())
    first = hetero.compile(model, ["numpy"])

    def replan(samples):
        raise hetero.PlanError("no luck")

    runner = Replanning(first, replan)
    feeds = {"images": np.ones((1, 3, 8, 8), np.float32)}
    runner.run(feeds)
    assert runner.wait_planned(timeout=30)
    assert runner.status == "kept priority plan: no luck" and runner.runner is first
    assert runner.run(feeds)["out"].shape == (1, 6, 8, 8)
    runner.close()


def test_replanning_plans_only_on_a_request_the_model_answered():
    """A first request the model refuses (dtype, rank), fails on (odd H and W) or that is empty
    (batch 0) is answered as Session.run answers it, never planned on, and does not keep the
    planning from starting on the next good one."""
    from hetero.runtime.replanning import Replanning

    model = hetero.load(_dynamic_detector())
    first = hetero.compile(model, ["numpy"])
    planned_on = []

    def replan(samples):
        planned_on.extend(sample["images"].shape for sample in samples)
        return hetero.compile(model, ["numpy"])

    runner = Replanning(first, replan)
    with pytest.raises(hetero.InputError, match="must be float32"):
        runner.run({"images": np.ones((1, 3, 8, 8), np.int64)})
    with pytest.raises(hetero.InputError, match="rank 4"):
        runner.run({"images": np.ones((3, 8, 8), np.float32)})
    with pytest.raises(Exception):  # noqa: B017 (whatever the library raises, as Session.run does)
        runner.run({"images": np.ones((1, 3, 3, 3), np.float32)})
    empty = {"images": np.ones((0, 3, 8, 8), np.float32)}
    assert runner.run(empty)["out"].shape == first.run(empty)["out"].shape == (0, 6, 8, 8)
    assert not runner.wait_planned(timeout=0.2) and runner.status == "planning on first requests"
    feeds = {"images": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    want = _onnxruntime(_dynamic_detector(), feeds)["out"]
    np.testing.assert_allclose(runner.run(feeds)["out"], want, rtol=1e-5, atol=1e-5)
    assert runner.wait_planned(timeout=30) and runner.status == "measured"
    assert planned_on == [(2, 3, 8, 8)] and runner.runner is not first
    odd = {"images": np.random.default_rng(3).standard_normal((5, 3, 4, 6)).astype(np.float32)}
    np.testing.assert_allclose(runner.run(odd)["out"], _onnxruntime(_dynamic_detector(), odd)["out"],
                               rtol=1e-5, atol=1e-5)  # another shape after the re-plan
    runner.close()


def test_reduced_precision_error_is_reported_per_output_over_every_sample():
    from hetero.runtime.tuning import _relative_errors

    class Halving:
        def run(self, feeds):
            return {"exact": feeds["x"], "rough": feeds["x"] * 0.5, "labels": np.array([1, 2])}

    samples = [{"x": np.ones(4, np.float32)}, {"x": np.full(4, 2.0, np.float32)}]
    reference = [{"exact": s["x"], "rough": s["x"], "labels": np.array([1, 2])} for s in samples]
    errors = _relative_errors(Halving(), samples, reference)
    assert errors == {"exact": 0.0, "rough": pytest.approx(0.5), "labels": 0.0}
    reference[1]["labels"] = np.array([1, 3])  # integer outputs must match exactly
    assert _relative_errors(Halving(), samples, reference)["labels"] == float("inf")


def test_probe_yeses_are_kept_for_the_next_process_and_noes_asked_again():
    from hetero.executors import base

    asked = []

    def probe(answer):
        return lambda: asked.append(answer) or answer

    library = f"library-{uuid.uuid4().hex}"  # the disk cache outlives a test run
    first = base.ProbeAnswers(f"{library}=1.0")
    assert first.ask("sig-yes", probe(True)) and not first.ask("sig-no", probe(False))
    later = base.ProbeAnswers(f"{library}=1.0")  # as a new process would hold: nothing in memory
    assert later.ask("sig-yes", probe(True)) and not later.ask("sig-no", probe(False))
    assert asked == [True, False, False]
    upgraded = base.ProbeAnswers(f"{library}=2.0")
    assert upgraded.ask("sig-yes", probe(True)) and asked[-1] is True and len(asked) == 4


def test_closing_does_not_wait_for_a_planning_under_way():
    import threading

    from hetero.runtime.replanning import Replanning

    model = hetero.load(_dynamic_detector())
    release = threading.Event()
    built = []

    def replan(samples):
        release.wait(30)
        built.append(hetero.compile(model, ["numpy"]))
        return built[-1]

    runner = Replanning(hetero.compile(model, ["numpy"]), replan)
    runner.run({"images": np.ones((1, 3, 8, 8), np.float32)})
    runner.close()  # returns while the planning waits: nothing to hang on
    release.set()
    assert runner.wait_planned(timeout=30)
    assert runner.status == "closed before planning finished" and len(built) == 1  # never swapped in
    with pytest.raises(hetero.HeteroError):
        built[0].run({"images": np.ones((1, 3, 8, 8), np.float32)})
