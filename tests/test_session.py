"""Session.run: input checks, results, transfers, zero-copy, compile- and run-time fallback."""

import numpy as np
import onnxruntime as ort
import pytest
from conftest import StubExecutor
from onnx import TensorProto, helper, numpy_helper

import hetero
from hetero.graph import example_feeds
from hetero.zoo import detector_head, small_cnn


def _reference(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _symbolic_model():
    nodes = [helper.make_node("Add", ["a", "b"], ["s"], name="add")]
    graph = helper.make_graph(nodes, "sym", [
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def cnn_session():
    return hetero.compile(small_cnn(), ["numpy"])


def test_input_errors_name_the_field(cnn_session):
    good = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(hetero.InputError, match="no input 'pixels'.*images"):
        cnn_session.run({"images": good, "pixels": good})
    with pytest.raises(hetero.InputError, match="input 'images'.*missing"):
        cnn_session.run({})
    with pytest.raises(hetero.InputError, match="'images' must be float32, got float64"):
        cnn_session.run({"images": good.astype(np.float64)})
    with pytest.raises(hetero.InputError, match="'images' must have rank 4"):
        cnn_session.run({"images": good[0]})
    with pytest.raises(hetero.InputError, match="'images' dimension 2 must be 32"):
        cnn_session.run({"images": np.zeros((1, 3, 31, 32), np.float32)})
    with pytest.raises(hetero.InputError, match="no output 'probs'"):
        cnn_session.run({"images": good}, ["probs"])
    with pytest.raises(hetero.InputError, match="feeds must be a mapping"):
        cnn_session.run([good])


def test_symbolic_dims_must_agree_across_inputs():
    session = hetero.compile(_symbolic_model(), ["numpy"])
    a = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(session.run({"a": a, "b": a})["s"], 2 * a)
    with pytest.raises(hetero.InputError, match="dimension 'batch' is 2 in input 'a' but 4 in input 'b'"):
        session.run({"a": a, "b": np.ones((4, 3), np.float32)})


def test_run_matches_onnxruntime_and_accepts_its_argument_order(cnn_session):
    feeds = example_feeds(cnn_session.model)
    expected = _reference(small_cnn(), feeds)
    out = cnn_session.run(feeds)
    assert list(out) == ["logits"]
    np.testing.assert_allclose(out["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
    assert cnn_session.run(None, feeds).keys() == out.keys()
    np.testing.assert_array_equal(cnn_session.run(["logits"], feeds)["logits"], out["logits"])


def test_transfers_are_made_once_per_space_and_counted(stub):
    stub.ops = {"Conv", "LeakyRelu"}
    session = hetero.compile(detector_head(), [stub, "numpy"])
    feeds = example_feeds(session.model)
    out = session.run(feeds)
    expected = _reference(detector_head(), feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(out[name], value, rtol=1e-4, atol=1e-5)
    assert session.stats.transfers == len(session.plan.transfers) > 0
    assert session.stats.transfer_bytes == sum(t.nbytes for t in session.plan.transfers)


def test_host_executors_hand_over_the_same_array():
    session = hetero.compile(small_cnn(), ["onnxruntime", "numpy"], "manual", affinity={"Relu": "numpy"})
    seen: dict[str, list] = {"produced": [], "consumed": []}
    for step in session._program.steps:
        inner = step.compiled

        class Spy:
            input_names, output_names = inner.input_names, inner.output_names

            def __call__(self, inputs, inner=inner):
                seen["consumed"].extend(id(v) for v in inputs)
                outputs = inner(inputs)
                seen["produced"].extend(id(v) for v in outputs)
                return outputs

        object.__setattr__(step, "compiled", Spy())
    session.run(example_feeds(session.model))
    handed_over = set(seen["produced"]) & set(seen["consumed"])
    assert len(session.plan.partitions) > 2 and handed_over
    assert session.stats.transfers == 0


def test_compile_rejection_is_replanned_and_noted():
    stub = StubExecutor(ops={"Conv", "LeakyRelu", "Sigmoid"}, compile_fail_ops={"Sigmoid"})
    session = hetero.compile(detector_head(), [stub, "numpy"])
    sigmoid = next(n for n in session.model.nodes if n.op_type == "Sigmoid")
    assert session.plan.executor_of(sigmoid).name == "numpy@cpu"
    assert any("rejected 1 node(s) at compile time" in note for note in session.plan.notes)
    feeds = example_feeds(session.model)
    np.testing.assert_allclose(session.run(feeds)["scores"], _reference(detector_head(), feeds)["scores"],
                               rtol=1e-4, atol=1e-5)


def test_run_failure_is_replanned_and_the_request_still_answered():
    stub = StubExecutor(1, ops={"Conv", "LeakyRelu", "Sigmoid"}, run_fail_ops={"Sigmoid"})
    session = hetero.compile(detector_head(), [stub, "numpy"])
    feeds = example_feeds(session.model)
    out = session.run(feeds)
    expected = _reference(detector_head(), feeds)["scores"]
    np.testing.assert_allclose(out["scores"], expected, rtol=1e-4, atol=1e-5)
    assert any("failed at run time" in note for note in session.plan.notes)
    assert all(p.executor.name == "numpy@cpu" for p in session.plan.partitions
               if any(n.op_type == "Sigmoid" for n in p.nodes))


def test_a_request_that_fails_everywhere_keeps_the_plan():
    nodes = [helper.make_node("Gather", ["table", "index"], ["row"], name="lookup")]
    graph = helper.make_graph(nodes, "lookup", [
        helper.make_tensor_value_info("table", TensorProto.FLOAT, [4, 2]),
        helper.make_tensor_value_info("index", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 2])])
    session = hetero.compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                             ["onnxruntime", "numpy"])
    before = session.plan
    with pytest.raises(hetero.RunError, match="partition #0 on onnxruntime@cpu failed"):
        session.run({"table": np.zeros((4, 2), np.float32), "index": np.array([9])})
    assert session.plan is before
    assert session.run({"table": np.eye(4, 2, dtype=np.float32), "index": np.array([1])})["row"].tolist() \
        == [[0.0, 1.0]]


def _aliasing_model():
    """Outputs that a library could hand back as views of an input or an initializer."""
    weight = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    shape = numpy_helper.from_array(np.array([3, 2], np.int64), "shape")
    nodes = [helper.make_node("Identity", ["x"], ["id_x"], name="id_x"),
             helper.make_node("Reshape", ["x", "shape"], ["rs_x"], name="rs_x"),
             helper.make_node("Transpose", ["x"], ["tr_x"], name="tr_x"),
             helper.make_node("Identity", ["w"], ["id_w"], name="id_w"),
             helper.make_node("Reshape", ["w", "shape"], ["rs_w"], name="rs_w"),
             helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Identity", ["h"], ["h1"], name="h1"),
             helper.make_node("Identity", ["h"], ["h2"], name="h2")]
    outputs = {"id_x": [2, 3], "rs_x": [3, 2], "tr_x": [3, 2], "id_w": [2, 3], "rs_w": [3, 2], "w": [2, 3],
               "x": [2, 3], "h1": [2, 3], "h2": [2, 3]}
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(nodes, "aliasing", [x], values, [weight, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("library", ["numpy", "onnxruntime", "openvino", "torch", "opencl"])
def test_outputs_are_the_callers_own(library):
    """Returned arrays never share memory with the caller's inputs, the model's initializers or
    each other, whatever the library hands back (torch returns views of its input for Identity)."""
    if not any(e.library == library for e in hetero.executors.available()):
        pytest.skip(f"{library} is not installed")
    session = hetero.compile(_aliasing_model(), [library, "numpy"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    expected = _reference(_aliasing_model(), {"x": x.copy()})
    out = session.run({"x": x})
    names = list(out)
    for i, name in enumerate(names):
        assert not np.shares_memory(out[name], x), name
        assert all(not np.shares_memory(out[name], out[other]) for other in names[i + 1:]), name
        out[name] *= 1000  # the caller's to change
    np.testing.assert_array_equal(x, np.arange(6, dtype=np.float32).reshape(2, 3) - 2)
    again = session.run({"x": x})
    for name, value in expected.items():
        np.testing.assert_allclose(again[name], value, rtol=1e-6, err_msg=name)


def test_a_node_no_executor_can_compile_names_the_refusal():
    stub = StubExecutor(3, compile_fail_ops={"Sigmoid"})
    with pytest.raises(hetero.PlanError, match=r"no executor can run node .*stub@stub:3: rejected it when "
                                                r"compiling: stub cannot compile"):
        hetero.compile(detector_head(), [stub])
