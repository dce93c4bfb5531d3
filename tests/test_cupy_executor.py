"""The CuPy executor: its interpreter through the numpy twin (what CI can run), and on real GPUs
when there are any (skipped cleanly otherwise). The backend suite also runs with the twin first
(configuration `cupy-twin` in tests/test_backend_suite.py)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import hetero
from hetero.executors.cupy_executor import CupyExecutor
from hetero.graph import example_feeds
from hetero.zoo import detector_head, mobilenet_v2, small_cnn


def _reference(model: hetero.Model, feeds):
    session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(model.output_names, session.run(None, feeds), strict=True))


@pytest.mark.parametrize("build", [small_cnn, detector_head, mobilenet_v2])
def test_twin_matches_onnxruntime(build):
    twin = CupyExecutor.on_host()
    session = hetero.compile(build(), [twin, "numpy"])
    assert any(p.executor is twin for p in session.plan.partitions)
    feeds = example_feeds(session.model)
    for name, want in _reference(session.model, feeds).items():
        np.testing.assert_allclose(session.run(feeds)[name], want, rtol=1e-4, atol=1e-5)


def test_twin_refuses_what_it_does_not_follow_exactly():
    twin = CupyExecutor.on_host()
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="dynamic_reshape"),
             helper.make_node("Pad", ["x", "pads"], ["z"], mode="reflect", name="reflect_pad")]
    graph = helper.make_graph(nodes, "refusals", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
        helper.make_tensor_value_info("shape", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("pads", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a"]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", "c"])])
    model = hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not any(twin.supports(node, model) for node in model.nodes)


def _gpus() -> list:
    try:
        return [e for e in CupyExecutor.discover()]
    except ImportError:
        return []


gpu = pytest.mark.skipif(not _gpus(), reason="needs CuPy and an NVIDIA GPU")


@pytest.mark.gpu
@gpu
def test_gpu_runs_a_cnn_and_moves_data_through_pinned_memory():
    device = _gpus()[0]
    session = hetero.compile(small_cnn(), [device, "numpy"])
    assert session.plan.partitions[0].executor is device
    feeds = example_feeds(session.model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(session.model, feeds)["logits"],
                               rtol=1e-3, atol=1e-4)
    plan = session.plan
    assert session.stats.transfers == len(plan.transfers)
    assert session.stats.transfer_bytes == plan.transfer_bytes
    import cupy

    staging = [buffer for free in device._pinned.values() for buffer in free]
    assert staging and all(  # copies went through page-locked host buffers (cudaMemoryTypeHost), given back
        cupy.cuda.runtime.pointerGetAttributes(buffer.ctypes.data).type == 1 for buffer in staging)


@pytest.mark.gpu
@gpu
def test_gpu_custom_raw_kernel():
    source = r'''
    extern "C" __global__ void scaled_add(const float* a, const float* b, float* y, float scale,
                                          long long n) {
        long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
        if (i < n) y[i] = a[i] + scale * b[i];
    }'''
    hetero.kernel("com.example", "ScaledAdd", executor="cuda", source=source, entry="scaled_add",
                  attributes=["scale"], infer=lambda dtypes, shapes, attrs: [(dtypes[0], shapes[0])])
    try:
        nodes = [helper.make_node("ScaledAdd", ["a", "b"], ["y"], domain="com.example", scale=2.0)]
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1000]) for n in "ab"]
        graph = helper.make_graph(nodes, "custom", inputs,
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.example", 1)])
        session = hetero.compile(model, [_gpus()[0]])
        a, b = np.ones(1000, np.float32), np.arange(1000, dtype=np.float32)
        np.testing.assert_allclose(session.run({"a": a, "b": b})["y"], a + 2 * b)
    finally:
        hetero.kernels.unregister("com.example", "ScaledAdd")


@pytest.mark.gpu
@pytest.mark.skipif(len(_gpus()) < 2, reason="needs two GPUs")
def test_two_gpus_copy_device_to_device():
    first, second = _gpus()[:2]
    session = hetero.compile(small_cnn(), ["numpy"], "manual", affinity={"Conv": first, "Relu": second})
    between = [t for t in session.plan.transfers if {t.source, t.target} == {"cuda:0", "cuda:1"}]
    feeds = example_feeds(session.model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(session.model, feeds)["logits"],
                               rtol=1e-3, atol=1e-4)
    assert between and session.stats.direct_transfers == len(between)  # copied GPU to GPU, not via host
