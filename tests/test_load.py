"""hetero.load: validation errors that name what is wrong, and the read-only graph view."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hetero
from hetero.graph import MAX_OPSET, MIN_OPSET


def _model(nodes, inputs, outputs, initializers=(), opset=17, **graph_kwargs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph_kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _chain():
    """x -> Relu -> Add(bias) -> Sigmoid -> y, with a weight initializer."""
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Add", ["r", "bias"], ["a"], name="add"),
             helper.make_node("Sigmoid", ["a"], ["y"], name="sigmoid")]
    return _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 4])], [bias])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(hetero.ModelNotFoundError, match="nope.onnx"):
        hetero.load(tmp_path / "nope.onnx")
    with pytest.raises(hetero.ModelNotFoundError, match="not a file"):
        hetero.load(tmp_path)


def test_random_bytes_and_truncated_protobuf_are_decode_errors(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(hetero.ModelDecodeError, match="junk.onnx.*not an ONNX model"):
        hetero.load(junk)
    data = _chain().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(hetero.ModelError, match="truncated.onnx"):
        hetero.load(truncated)
    with pytest.raises(hetero.ModelDecodeError):
        hetero.load(b"not a model at all")


@pytest.mark.parametrize("opset", [0, MAX_OPSET + 1, 99])
def test_opset_outside_range_says_the_range(opset):
    model = _chain()
    model.opset_import[0].version = opset
    with pytest.raises(hetero.UnsupportedOpsetError, match=f"opset {opset}.*{MIN_OPSET} to {MAX_OPSET}"):
        hetero.load(model)


def test_unknown_domain_names_node_and_domain():
    model = _chain()
    model.graph.node[1].domain = "com.nobody"
    model.opset_import.append(helper.make_opsetid("com.nobody", 1))
    with pytest.raises(hetero.UnknownDomainError, match="'add'.*'com.nobody'.*hetero.kernel"):
        hetero.load(model)


def test_dangling_input_names_node_and_tensor():
    model = _chain()
    del model.graph.initializer[:]
    with pytest.raises(hetero.DanglingInputError, match="node 'add'.*tensor 'bias'"):
        hetero.load(model)


def test_cycle_names_the_nodes_on_it():
    nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Neg", ["b"], ["c"], name="third"),
             helper.make_node("Identity", ["a"], ["y"], name="out")]
    with pytest.raises(hetero.GraphCycleError, match="'first'.*'second'.*'third'"):
        hetero.load(_model(nodes, [_vi("x", [2])], [_vi("y", [2])]))


def test_missing_external_initializer_file(tmp_path):
    model = _chain()
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(hetero.MissingInitializerError, match="'bias'.*weights.bin"):
        hetero.load(tmp_path / "m.onnx")


def test_inconsistent_shapes_fail_shape_inference():
    weight = numpy_helper.from_array(np.ones((5, 2), np.float32), "w")  # 5 != 3 columns of x
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="project")
    with pytest.raises(hetero.InvalidModelError, match="shape inference.*project"):
        hetero.load(_model([node], [_vi("x", [4, 3])], [_vi("y", [4, 2])], [weight]))


def test_unsorted_nodes_and_duplicate_names_are_normalised():
    model = _chain()
    nodes = list(model.graph.node)
    nodes[0].name = nodes[1].name = "dup"
    nodes[2].name = ""
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    loaded = hetero.load(model)
    assert [n.op_type for n in loaded.nodes] == ["Relu", "Add", "Sigmoid"]
    names = [n.name for n in loaded.nodes]
    assert len(set(names)) == 3 and all(names)


def test_view_gives_order_producers_consumers_and_shapes():
    loaded = hetero.load(_chain(), name="chain")
    relu, add, sigmoid = loaded.nodes
    assert loaded.producer("r") is relu and loaded.producer("x") is None
    assert loaded.consumers("r") == (add,)
    assert loaded.predecessors(sigmoid) == (add,) and loaded.successors(relu) == (add,)
    assert loaded.tensor("a").shape == (2, 4) and loaded.tensor("a").dtype == np.float32
    assert loaded.tensor("a").nbytes == 32
    assert loaded.input_names == ("x",) and loaded.output_names == ("y",)
    assert loaded.is_initializer("bias") and not loaded.is_initializer("x")
    assert repr(loaded) == "Model('chain', 3 nodes)"


def test_extract_makes_a_standalone_model_that_runs():
    loaded = hetero.load(_chain())
    part = loaded.extract(["add", "sigmoid"])
    onnx.checker.check_model(part)
    assert [i.name for i in part.graph.input] == ["r"]
    assert [o.name for o in part.graph.output] == ["y"]
    assert [t.name for t in part.graph.initializer] == ["bias"]
    r = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(part.SerializeToString()).run(None, {"r": r})
    np.testing.assert_allclose(y, 1 / (1 + np.exp(-(r + np.arange(4)))), rtol=1e-6)
    first = loaded.extract(["relu"])
    assert [o.name for o in first.graph.output] == ["r"] and not first.graph.initializer


def test_extract_keeps_subgraph_nodes_whole_with_outer_scope_inputs():
    then_graph = helper.make_graph([helper.make_node("Add", ["x", "outer"], ["t"])], "then", [],
                                   [_vi("t", [2])])
    else_graph = helper.make_graph([helper.make_node("Sub", ["x", "outer"], ["e"])], "else", [],
                                   [_vi("e", [2])])
    nodes = [helper.make_node("Neg", ["x"], ["outer"], name="neg"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph,
                              else_branch=else_graph)]
    loaded = hetero.load(_model(nodes, [_vi("x", [2]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [2])]))
    branch = loaded.node("branch")
    assert branch.has_subgraph and set(branch.implicit_inputs) == {"x", "outer"}
    assert loaded.predecessors(branch) == (loaded.node("neg"),)
    part = loaded.extract([branch])
    assert {i.name for i in part.graph.input} == {"cond", "x", "outer"}
    x = np.array([1.0, 2.0], np.float32)
    feeds = {"cond": np.array(True), "x": x, "outer": -x}
    (y,) = ort.InferenceSession(part.SerializeToString()).run(None, feeds)
    np.testing.assert_array_equal(y, [0.0, 0.0])


def test_load_accepts_path_bytes_proto_and_model(tmp_path):
    model = _chain()
    path = tmp_path / "chain.onnx"
    onnx.save(model, path)
    from_path = hetero.load(path)
    assert from_path.label == str(path)
    assert len(hetero.load(path.read_bytes())) == 3
    assert hetero.load(from_path) is from_path
    with pytest.raises(TypeError):
        hetero.load(3.14)
