"""Vendor engines as executors: ONNX Runtime's execution providers per device, OpenVINO per device,
TensorRT, and device tensors crossing between libraries.

What CI can check runs on this host: the providers present are listed with their devices;
discovery of providers and devices not at hand is checked against stand-ins for ONNX Runtime's and
OpenVINO's device lists (names, memory spaces, provider options, precision variants); the device
providers' I/O binding path runs on the CPU provider (`device_twin`, OrtValues in a memory space
of their own); hand-offs between libraries in one device memory space run between that twin and
torch through DLPack, and by pointer through the CUDA Array Interface. Tests marked gpu run the
CUDA provider, the TensorRT provider, TensorRT itself and DLPack between torch, CuPy and ONNX
Runtime on an NVIDIA GPU (scripts/gpu-check), and skip without one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

import hetero
from hetero import executors
from hetero.cli import app
from hetero.errors import CompileError, ExecutorUnavailableError
from hetero.executors import Device, hands_off, hardware
from hetero.executors import onnxruntime_executor as ort_module
from hetero.executors import openvino_executor as ov_module
from hetero.executors.onnxruntime_executor import PROVIDERS, OnnxRuntimeExecutor
from hetero.executors.openvino_executor import OpenVinoExecutor
from hetero.executors.sim_executor import simulate
from hetero.executors.torch_executor import TorchExecutor
from hetero.graph import example_feeds
from hetero.zoo import small_cnn

GPU = bool(hardware.cuda_devices())
gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    yield tmp_path


@pytest.fixture
def model():
    return hetero.load(small_cnn())


def _reference(model, feeds):
    session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


# --- execution providers on this host -----------------------------------------------------------

def test_every_provider_present_is_an_executor_or_a_reason():
    ort_module.survey.cache_clear()
    found = {e.name for e in executors.libraries(refresh=True) if e.library == "onnxruntime"
             for e in e.executors}
    notes = next(lib.notes for lib in executors.libraries() if lib.library == "onnxruntime")
    for provider in ort.get_available_providers():
        short = provider.removesuffix("ExecutionProvider")
        if provider == "CPUExecutionProvider":
            assert "onnxruntime@cpu" in found
        elif provider in ort_module.NOT_DEVICES or provider not in PROVIDERS:
            assert any(note.startswith(f"{short} provider skipped:") for note in notes), notes
        else:
            assert any(n.startswith(f"onnxruntime/{PROVIDERS[provider].short}@") for n in found) or any(
                note.startswith(f"{short} provider:") for note in notes), (provider, found, notes)


def test_onnxruntime_at_cpu_is_the_cpu_provider_and_exact():
    [executor] = executors.resolve("onnxruntime@cpu")
    assert executor.provider.name == "CPUExecutionProvider" and executor.engine == "onnxruntime"
    assert executor.exact and executor.memory_space == "cpu" and executor.name == "onnxruntime@cpu"
    with pytest.raises(ExecutorUnavailableError, match="no precision variant 'fp16'"):
        executors.variant_of(executor, "fp16")


def test_devices_command_explains_names_and_names_what_is_skipped():
    result = CliRunner().invoke(app, ["devices"], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    assert "ENGINE@DEVICE[PRECISION]" in result.output and "onnxruntime/cuda" in result.output
    if "AzureExecutionProvider" in ort.get_available_providers():
        assert "Azure provider skipped: not a device" in result.output


# --- discovery of providers and devices not at hand, against stand-ins -------------------------

@pytest.fixture
def gpu_host(monkeypatch):
    """ONNX Runtime as onnxruntime-gpu with OpenVINO's and CANN's providers would show itself on a
    host with two NVIDIA GPUs, an Intel GPU and NPU, and an Ascend NPU."""
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider",
              "CANNExecutionProvider", "MysteryExecutionProvider", "AzureExecutionProvider",
              "CPUExecutionProvider"]
    gpus = (hardware.CudaDevice(0, "NVIDIA H200", (9, 0), 141 << 30),
            hardware.CudaDevice(1, "NVIDIA H200", (9, 0), 141 << 30))
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    monkeypatch.setattr(hardware, "cuda_devices", lambda: gpus)
    monkeypatch.setattr(ort_module._pybind_state, "get_available_openvino_device_ids",
                        lambda: ["CPU", "GPU.0", "NPU"], raising=False)
    monkeypatch.setattr(ort_module, "_smoke", lambda provider, options: None)
    ort_module.survey.cache_clear()
    yield {e.name: e for e in OnnxRuntimeExecutor.discover()}
    ort_module.survey.cache_clear()


def test_each_provider_becomes_an_executor_per_device(gpu_host):
    assert set(gpu_host) == {
        "onnxruntime@cpu", "onnxruntime/cuda@cuda:0", "onnxruntime/cuda@cuda:1",
        "onnxruntime/tensorrt@cuda:0", "onnxruntime/tensorrt@cuda:1", "onnxruntime/openvino@cpu",
        "onnxruntime/openvino@gpu:0", "onnxruntime/openvino@npu:0", "onnxruntime/cann@npu:0"}
    notes = OnnxRuntimeExecutor.missing()
    assert any(n.startswith("Mystery provider skipped: Hetero does not know") for n in notes)
    assert any(n.startswith("Azure provider skipped: not a device") for n in notes)


def test_memory_spaces_one_per_device_and_shared_on_cuda(gpu_host):
    space = {name: e.memory_space for name, e in gpu_host.items()}
    assert space["onnxruntime/cuda@cuda:1"] == space["onnxruntime/tensorrt@cuda:1"] == "cuda:1"
    assert space["onnxruntime/cuda@cuda:0"] != space["onnxruntime/cuda@cuda:1"]
    assert space["onnxruntime/cann@npu:0"] == "onnxruntime:cann:0"  # ONNX Runtime's own device memory
    assert space["onnxruntime/openvino@gpu:0"] == "cpu"  # the provider copies inside each run
    assert gpu_host["onnxruntime/openvino@gpu:0"].resource == "gpu:0"
    assert not gpu_host["onnxruntime/cuda@cuda:0"].exact
    # Tensors cross between CUDA libraries on one GPU as hand-offs, not between providers of ONNX
    # Runtime (both OrtValues) nor across devices (copies).
    torch_gpu = TorchExecutor.__new__(TorchExecutor)
    torch_gpu.device = Device("cuda", 0)
    assert hands_off(torch_gpu, gpu_host["onnxruntime/cuda@cuda:0"])
    assert not hands_off(gpu_host["onnxruntime/tensorrt@cuda:0"], gpu_host["onnxruntime/cuda@cuda:0"])
    assert not hands_off(torch_gpu, gpu_host["onnxruntime/cuda@cuda:1"])


def test_provider_options_name_the_device_and_keep_fp32(gpu_host):
    cuda = gpu_host["onnxruntime/cuda@cuda:1"].provider_options()
    assert cuda["device_id"] == "1" and cuda["use_tf32"] == "0"
    trt = gpu_host["onnxruntime/tensorrt@cuda:0"]
    assert trt.provider_options()["device_id"] == "0" and "trt_fp16_enable" not in trt.provider_options()
    assert trt.provider_options()["trt_engine_cache_enable"] == "1"
    assert gpu_host["onnxruntime/openvino@gpu:0"].provider_options()["device_type"] == "GPU.0"
    assert gpu_host["onnxruntime/openvino@gpu:0"].provider_options()["precision"] == "FP32"
    assert gpu_host["onnxruntime/cann@npu:0"].provider_options() == {"device_id": "0"}
    sized = trt.with_options(trt_max_workspace_size=4 << 30)
    assert sized.provider_options()["trt_max_workspace_size"] == str(4 << 30) and sized.name == trt.name


def test_reduced_precision_is_a_named_variant(gpu_host):
    trt = gpu_host["onnxruntime/tensorrt@cuda:0"]
    fp16 = executors.variant_of(trt, "fp16")
    assert fp16.name == "onnxruntime/tensorrt@cuda:0[fp16]"
    assert fp16.provider_options()["trt_fp16_enable"] == "1"
    assert executors.variant_of(trt, "fp16") is fp16 and executors.variant_of(fp16, "fp32") is not fp16
    tf32 = executors.variant_of(gpu_host["onnxruntime/cuda@cuda:0"], "tf32")
    assert tf32.provider_options()["use_tf32"] == "1"
    with pytest.raises(ExecutorUnavailableError, match="no precision variant 'bf16'"):
        executors.variant_of(trt, "bf16")


def test_names_resolve_by_engine_device_and_precision(gpu_host, monkeypatch):
    library = executors.Library("onnxruntime", "onnxruntime", tuple(gpu_host.values()))
    monkeypatch.setattr(executors, "library", lambda name, refresh=False: {"onnxruntime": library}.get(name))

    def names(spec):
        return sorted(e.name for e in executors.resolve(spec))

    assert names("onnxruntime@cpu") == ["onnxruntime@cpu"]  # the CPU provider, not OpenVINO's
    assert names("onnxruntime@cuda:0") == ["onnxruntime/cuda@cuda:0", "onnxruntime/tensorrt@cuda:0"]
    assert names("onnxruntime/cuda") == ["onnxruntime/cuda@cuda:0", "onnxruntime/cuda@cuda:1"]
    assert names("onnxruntime/tensorrt@cuda:1[fp16]") == ["onnxruntime/tensorrt@cuda:1[fp16]"]
    assert len(names("onnxruntime")) == len(gpu_host)
    with pytest.raises(ExecutorUnavailableError, match="found:"):
        executors.resolve("onnxruntime/dml@dml:0")


def test_missing_names_an_nvidia_gpu_without_a_cuda_provider(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(hardware, "nvidia_smi_gpus", lambda: ("GPU 0: NVIDIA H200 (UUID: GPU-0)",))
    ort_module.survey.cache_clear()
    try:
        notes = OnnxRuntimeExecutor.missing()
    finally:
        ort_module.survey.cache_clear()
    assert any("NVIDIA GPU(s) listed by nvidia-smi" in n and "onnxruntime-gpu" in n for n in notes), notes


def test_a_provider_that_does_not_start_is_named_not_listed(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    ort_module.survey.cache_clear()
    try:
        found, notes = ort_module.survey()
    finally:
        ort_module.survey.cache_clear()
    assert [f.device for f in found] == [executors.CPU]
    assert any(n.startswith("Dml provider: the provider does not start here") for n in notes), notes


def test_a_provider_that_cannot_start_never_runs_on_the_cpu_instead(model):
    """ONNX Runtime's Python layer falls back to the CPU provider when another fails to start:
    Hetero checks which provider the session got, so a node is never claimed nor a partition
    compiled for a provider that is not there."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has a CUDA provider")
    absent = OnnxRuntimeExecutor(Device("cuda", 0), provider=PROVIDERS["CUDAExecutionProvider"],
                                 device_options={"device_id": "0"})
    relu = next(n for n in model.nodes if n.op_type == "Relu")
    assert not absent.supports(relu, model)
    assert "a session for the node alone fails" in absent.decline(relu, model)
    with pytest.raises(CompileError):
        absent.compile(model.extract([relu]))


# --- the device path on the host: I/O binding, transfers, hand-offs -----------------------------

def test_device_twin_keeps_tensors_as_ortvalues_between_partitions(model):
    twin = OnnxRuntimeExecutor.device_twin()
    session = hetero.compile(model, [twin, "numpy"], policy="manual", affinity={"MaxPool": "numpy"})
    feeds = example_feeds(model)
    outputs = session.run(feeds)
    np.testing.assert_allclose(outputs["logits"], _reference(model, feeds)["logits"], rtol=1e-5, atol=1e-6)
    plan = session.plan
    assert [p.executor.name for p in plan.partitions] == [twin.name, "numpy@cpu", twin.name]
    # In: the images; out of the twin to numpy and back; out: the logits. Nothing else moves.
    assert sorted(t.link for t in plan.transfers) == sorted([
        "cpu -> onnxruntime:cpu:0", "onnxruntime:cpu:0 -> cpu", "cpu -> onnxruntime:cpu:0",
        "onnxruntime:cpu:0 -> cpu"])
    assert session.stats.transfers == len(plan.transfers)
    compiled = twin.compile(model.extract(plan.partitions[2].nodes))
    produced = compiled([twin.to_device(v) for v in [np.zeros(s, np.float32) for s in _input_shapes(
        model, compiled.input_names)]])
    assert all(isinstance(v, ort.OrtValue) for v in produced)


def _input_shapes(model, names):
    return [model.tensor(name).shape for name in names]


class _TorchOnTwin(TorchExecutor):
    """torch computing in the twin's memory space: a second library on the same 'device'."""

    @property
    def memory_space(self) -> str:
        return OnnxRuntimeExecutor.device_twin().memory_space


def test_handoffs_between_libraries_on_one_device_wrap_not_copy(model):
    twin, torch_exec = OnnxRuntimeExecutor.device_twin(), _TorchOnTwin(executors.CPU)
    session = hetero.compile(model, [twin, torch_exec, "numpy"], policy="manual",
                             affinity={"Add": torch_exec, "Relu": torch_exec})
    plan = session.plan
    assert {p.executor.engine for p in plan.partitions} == {"onnxruntime/cpu-twin", "torch"}
    assert plan.handoffs and all(h.space == "onnxruntime:cpu:0" for h in plan.handoffs)
    assert "hand-off" in str(plan) and "no copy" in str(plan)
    feeds = example_feeds(model)
    outputs = session.run(feeds)
    np.testing.assert_allclose(outputs["logits"], _reference(model, feeds)["logits"], rtol=1e-4, atol=1e-5)
    assert session.stats.handoffs == len(plan.handoffs)
    assert session.stats.transfers == len(plan.transfers)  # only at the edges
    spaces = {t.source for t in plan.transfers} | {t.target for t in plan.transfers}
    assert spaces <= {"cpu", "onnxruntime:cpu:0"}


def test_dlpack_handoffs_share_memory():
    twin, torch_exec = OnnxRuntimeExecutor.device_twin(), TorchExecutor(executors.CPU)
    value = twin.to_device(np.arange(6, dtype=np.float32).reshape(2, 3))
    as_torch = torch_exec.adopt(value)
    assert isinstance(as_torch, torch.Tensor) and as_torch.data_ptr() == value.data_ptr()
    array = np.arange(4, dtype=np.int64)
    back = twin.adopt(array)
    assert isinstance(back, ort.OrtValue) and back.data_ptr() == array.ctypes.data
    np.testing.assert_array_equal(twin.to_host(back), array)


class _CudaArrayInterfaceOnly:
    """A buffer that only speaks the CUDA Array Interface (as TensorRT's DeviceBuffer does), here
    over host memory so the twin can bind it by pointer."""

    def __init__(self, array):
        self.array = array
        self.__cuda_array_interface__ = {"shape": array.shape, "typestr": array.dtype.str, "version": 3,
                                         "data": (array.ctypes.data, False), "strides": None}


def test_arrays_with_only_the_cuda_array_interface_are_bound_by_pointer(model):
    twin = OnnxRuntimeExecutor.device_twin()
    compiled = twin.compile(model.proto)
    images = example_feeds(model)["images"]
    [logits] = compiled([twin.adopt(_CudaArrayInterfaceOnly(images))])
    np.testing.assert_allclose(twin.to_host(logits), _reference(model, {"images": images})["logits"],
                               rtol=1e-5, atol=1e-6)
    strided = _CudaArrayInterfaceOnly(images)
    strided.__cuda_array_interface__ = {**strided.__cuda_array_interface__, "strides": (4, 4, 4, 4)}
    with pytest.raises(hetero.RunError):
        compiled([strided])


def test_sequences_and_strings_stay_off_device_memory():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 2])
    s = onnx.helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("SplitToSequence", ["x"], ["s"], name="split")],
                                   "g", [x], [s])
    model = hetero.load(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    [node] = model.nodes
    assert executors.resolve("onnxruntime@cpu")[0].supports(node, model)
    twin = OnnxRuntimeExecutor.device_twin()
    assert not twin.supports(node, model) and "sequences or strings" in twin.decline(node, model)


# --- OpenVINO on every device it lists ------------------------------------------------------------

class _Core:
    available_devices = ("CPU", "GPU.0", "GPU.1", "NPU", "AUTO")


def test_openvino_devices_follow_available_devices(monkeypatch):
    monkeypatch.setattr(ov_module, "_core", _Core())
    found = {e.name: e for e in OpenVinoExecutor.discover()}
    assert set(found) == {"openvino@cpu", "openvino@gpu:0", "openvino@gpu:1", "openvino@npu:0"}
    assert found["openvino@gpu:1"].ov_device == "GPU.1" and found["openvino@npu:0"].ov_device == "NPU"
    assert [found[n].memory_space for n in ("openvino@cpu", "openvino@gpu:0", "openvino@gpu:1")] == [
        "cpu", "openvino:gpu:0", "openvino:gpu:1"]
    assert hardware.openvino_device("GPU") == Device("gpu", 0) and hardware.openvino_device("AUTO") is None
    gpu_config = found["openvino@gpu:0"]._config()
    assert gpu_config["INFERENCE_PRECISION_HINT"] == "f32" and "INFERENCE_NUM_THREADS" not in gpu_config
    assert executors.variant_of(found["openvino@gpu:0"], "fp16").name == "openvino@gpu:0[fp16]"
    with pytest.raises(ExecutorUnavailableError):
        executors.variant_of(found["openvino@gpu:0"], "bf16")


def test_the_npu_runs_nothing_until_fp16_is_allowed(model):
    npu = OpenVinoExecutor(Device("npu", 0), ov_device="NPU")
    conv = next(n for n in model.nodes if n.op_type == "Conv")
    assert not npu.supports(conv, model) and "allow_precision='fp16'" in npu.decline(conv, model)


def test_openvino_cpu_keeps_its_name_and_bf16_variant():
    [cpu] = executors.resolve("openvino@cpu")
    assert cpu.memory_space == "cpu" and cpu.ov_device == "CPU"
    assert executors.resolve("openvino@cpu[bf16]")[0].name == "openvino@cpu[bf16]"


# --- on an NVIDIA GPU (scripts/gpu-check) ---------------------------------------------------------

def _gpu_executor(spec):
    if not GPU:
        pytest.skip("no NVIDIA GPU")
    try:
        return executors.resolve(spec)[0]
    except ExecutorUnavailableError as exc:
        pytest.skip(str(exc))


@gpu
@pytest.mark.parametrize("spec", ["onnxruntime/cuda@cuda:0", "onnxruntime/tensorrt@cuda:0",
                                  "tensorrt@cuda:0"])
def test_gpu_engine_matches_onnxruntime_on_the_cpu(model, spec):
    executor = _gpu_executor(spec)
    session = hetero.compile(model, [executor, "onnxruntime@cpu"])
    assert {p.executor.name for p in session.plan.partitions} == {executor.name}
    feeds = example_feeds(model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(model, feeds)["logits"],
                               rtol=1e-3, atol=1e-4)


@gpu
def test_cuda_provider_keeps_outputs_on_the_gpu(model):
    executor = _gpu_executor("onnxruntime/cuda@cuda:0")
    compiled = executor.compile(model.proto)
    [logits] = compiled([executor.to_device(example_feeds(model)["images"])])
    assert isinstance(logits, ort.OrtValue) and logits.device_name().lower() == "cuda"


@gpu
def test_gpu_handoffs_between_torch_tensorrt_and_onnxruntime(model):
    cuda = _gpu_executor("onnxruntime/cuda@cuda:0")
    torch_gpu = _gpu_executor("torch@cuda:0")
    engines = [cuda, torch_gpu]
    with contextlib.suppress(ExecutorUnavailableError):
        engines.append(executors.resolve("tensorrt@cuda:0")[0])
    session = hetero.compile(model, [*engines, "numpy"], policy="manual",
                             affinity={"Relu": torch_gpu, "Add": engines[-1]})
    feeds = example_feeds(model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(model, feeds)["logits"],
                               rtol=1e-3, atol=1e-4)
    assert session.plan.handoffs and session.stats.handoffs == len(session.plan.handoffs)
    assert {t.link for t in session.plan.transfers} == {"cpu -> cuda:0", "cuda:0 -> cpu"}


@gpu
def test_dlpack_between_torch_cupy_and_onnxruntime_on_one_gpu():
    cuda = _gpu_executor("onnxruntime/cuda@cuda:0")
    torch_gpu = _gpu_executor("torch@cuda:0")
    source = torch.arange(12, dtype=torch.float32, device="cuda:0").reshape(3, 4)
    as_ort = cuda.adopt(source)
    assert as_ort.data_ptr() == source.data_ptr()
    back = torch_gpu.adopt(as_ort)
    assert back.data_ptr() == source.data_ptr() and torch.equal(back, source)
    cupy = pytest.importorskip("cupy")
    assert cupy.from_dlpack(as_ort).data.ptr == source.data_ptr()


@gpu
def test_tensorrt_engines_are_cached_on_disk(model, cache_dir):
    executor = _gpu_executor("tensorrt@cuda:0")
    executor.compile(model.proto)
    engines = list((cache_dir / "tensorrt").glob("*.engine"))
    assert len(engines) == 1
    built = engines[0].stat().st_mtime_ns
    executor.compile(model.proto)  # the same partition and shapes: loaded, not built again
    assert [e.stat().st_mtime_ns for e in (cache_dir / "tensorrt").glob("*.engine")] == [built]


@gpu
def test_tensorrt_fp16_only_where_allowed_and_accurate(model):
    executor = _gpu_executor("tensorrt@cuda:0")
    pytest.importorskip("onnxconverter_common")
    session = hetero.compile(model, [executor, "onnxruntime@cpu"], policy="latency", allow_precision="fp16")
    feeds = example_feeds(model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(model, feeds)["logits"],
                               rtol=0.05, atol=0.05)
    fp32 = hetero.compile(model, [executor, "onnxruntime@cpu"], policy="latency")
    assert all(p.executor.precision == "fp32" for p in fp32.plan.partitions)


def test_device_tensors_reach_a_simulated_card_through_host_memory(model):
    """OrtValues in the twin's device memory and a simulated card's memory are different spaces
    with no direct link: each crossing goes through the host once, counted in the plan."""
    [card] = simulate({"devices": [{"like": "onnxruntime@cpu", "speed": 1.0, "overhead_us": 0}]})
    twin = OnnxRuntimeExecutor.device_twin()
    session = hetero.compile(model, [twin, card, "numpy"], policy="manual", affinity={"Conv": card})
    links = {t.link for t in session.plan.transfers}
    assert {"onnxruntime:cpu:0 -> cpu", "cpu -> sim:0"} <= links or {"sim:0 -> cpu",
                                                                      "cpu -> onnxruntime:cpu:0"} <= links
    feeds = example_feeds(model)
    np.testing.assert_allclose(session.run(feeds)["logits"], _reference(model, feeds)["logits"],
                               rtol=1e-4, atol=1e-5)
    assert session.stats.transfers == len(session.plan.transfers) and session.stats.direct_transfers == 0


def test_scalars_and_empty_tensors_keep_their_shapes_on_the_device():
    twin = OnnxRuntimeExecutor.device_twin()
    for array in (np.float32(1.5), np.array(7, np.int64), np.zeros((0, 3), np.float32)):
        value = twin.to_device(np.asarray(array))
        assert tuple(value.shape()) == np.shape(array)
        assert twin.to_host(value).shape == np.shape(array)


class _HostContext:
    """Stands in for a GPU's remote context (the CPU plugin has none): allocates host tensors."""

    def __init__(self):
        self.allocated = 0

    def create_tensor(self, element_type, shape, params):
        self.allocated += 1
        return ov_module.ov.Tensor(element_type, shape)


def test_openvino_device_path_keeps_outputs_in_device_tensors(model):
    """The GPU/NPU path of a compiled partition, on the CPU plugin with a stand-in context: inputs
    bound by name, outputs of known shape allocated in the device's context (fresh each run)."""
    ov = ov_module.ov
    context = _HostContext()
    compiled = ov_module._Compiled(ov_module.core().compile_model(ov_module.read(model.proto), "CPU"),
                                   model.proto, "openvino@gpu:0", context)
    images = example_feeds(model)["images"]
    gpu = OpenVinoExecutor(Device("gpu", 0), ov_device="GPU.0")
    first = compiled([ov_module.RemoteArray(ov.Tensor(images), ov.Type.f32)])[0]
    second = compiled([images])[0]
    assert isinstance(first, ov_module.RemoteArray) and context.allocated == 2 and first.shape == (1, 10)
    reference = _reference(model, {"images": images})["logits"]
    np.testing.assert_allclose(gpu.to_host(first), reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gpu.to_host(second), reference, rtol=1e-4, atol=1e-5)
