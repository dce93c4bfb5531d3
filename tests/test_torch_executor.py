"""The torch executor: results against ONNX Runtime, zero-copy on the host, honest refusals, CUDA."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import hetero  # noqa: E402
from hetero.executors import Device  # noqa: E402
from hetero.executors.torch_executor import TorchExecutor  # noqa: E402

ort = pytest.importorskip("onnxruntime")


def _small_cnn() -> onnx.ModelProto:
    """Conv (asymmetric pads) + BatchNormalization + Relu + MaxPool + Flatten + Gemm."""
    rng = np.random.default_rng(0)
    weights = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "scale": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "shift": rng.standard_normal(4).astype(np.float32),
        "mean": rng.standard_normal(4).astype(np.float32),
        "var": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "fc_w": rng.standard_normal((10, 4 * 4 * 4)).astype(np.float32),
        "fc_b": rng.standard_normal(10).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 0, 0], strides=[1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-3),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, alpha=0.5),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
        initializer=[numpy_helper.from_array(a, n) for n, a in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _onnxruntime(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_small_cnn_matches_onnxruntime():
    model = _small_cnn()
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    session = hetero.compile(model, executors=["torch"])
    assert {p.executor.name for p in session.plan.partitions} == {"torch@cpu"}
    expected = _onnxruntime(model, {"x": x})[0]
    np.testing.assert_allclose(session.run({"x": x})["y"], expected, rtol=1e-5, atol=1e-5)


def test_host_values_cross_without_copies():
    executor = TorchExecutor()
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = executor.to_device(array)
    assert isinstance(tensor, torch.Tensor)
    assert tensor.data_ptr() == array.ctypes.data
    assert np.shares_memory(executor.to_host(tensor), array)


def test_cpu_partition_takes_and_gives_numpy():
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Neg", ["t"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [3, 2])])
    compiled = TorchExecutor().compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    (y,) = compiled([x])
    assert isinstance(y, np.ndarray) and y.flags.c_contiguous
    np.testing.assert_array_equal(y, -x.T)


def test_opset11_softmax_flattens_like_onnxruntime():
    """Before opset 13, Softmax normalises over all axes from `axis` on, not along `axis` alone."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(np.float32)
    (y,) = TorchExecutor().compile(model)([x])
    np.testing.assert_allclose(y, _onnxruntime(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def _single(op: str, dtype: int, shape: list[int], opset: int = 19, inputs: int = 1, **attrs) -> hetero.Model:
    names = [f"x{i}" for i in range(inputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"], **attrs)], "g",
        [helper.make_tensor_value_info(n, dtype, shape) for n in names],
        [helper.make_tensor_value_info("y", dtype, [None] * len(shape))])
    return hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


@pytest.mark.parametrize("model", [
    _single("LRN", TensorProto.FLOAT, [1, 6, 4, 4], size=2),  # torch centres even windows otherwise
    _single("MaxPool", TensorProto.FLOAT, [1, 1, 5, 5], kernel_shape=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
    _single("Add", TensorProto.UINT32, [4], inputs=2),  # no uint32 arithmetic in torch
    _single("Softmax", TensorProto.FLOAT16, [2, 8]),  # fp16 sums round unlike the fp16 references
], ids=["lrn-even", "maxpool-ceil-asymmetric", "add-uint32", "softmax-fp16"])
def test_refuses_what_it_cannot_match(model):
    assert not TorchExecutor().supports(model.nodes[0], model)


def test_claims_exact_resize_modes():
    model = _single("Resize", TensorProto.FLOAT, [1, 1, 4, 4], inputs=3, mode="cubic",
                    coordinate_transformation_mode="align_corners")
    assert TorchExecutor().supports(model.nodes[0], model)


@pytest.mark.gpu
def test_small_cnn_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _small_cnn()
    x = np.random.default_rng(3).standard_normal((2, 3, 9, 9)).astype(np.float32)
    executor = TorchExecutor(Device("cuda", 0))
    assert hetero.executors.is_accelerator(executor)
    expected = _onnxruntime(model, {"x": x})[0]
    outputs = executor.compile(model)([executor.to_device(x)])
    assert outputs[0].device.type == "cuda"
    np.testing.assert_allclose(executor.to_host(outputs[0]), expected, rtol=1e-4, atol=1e-4)
    session = hetero.compile(model, executors=[executor])
    np.testing.assert_allclose(session.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
