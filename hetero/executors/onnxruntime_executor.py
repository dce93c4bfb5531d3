"""`onnxruntime@cpu`, `onnxruntime/cuda@cuda:0`, ...: ONNX Runtime, one executor per execution
provider and device it drives.

`onnxruntime@cpu` is the CPU provider (MLAS). Every other provider the installed ONNX Runtime
offers becomes `onnxruntime/PROVIDER@DEVICE` on each device it drives (`PROVIDERS`): the CUDA and
TensorRT providers on every GPU the CUDA driver offers, OpenVINO's on each device it lists, the
CANN, DirectML, QNN, ... providers on theirs. A graph compiler: each partition becomes one
InferenceSession with that provider alone. Capability is asked of ONNX Runtime itself: for the
CPU provider its registered kernel definitions (op, version range, type constraints), then for
every provider whether a session for the node alone builds with CPU fallback disabled
(`session.disable_cpu_ep_fallback`), so the provider itself must take the node.

Providers that keep tensors in device memory (CUDA, TensorRT, DirectML, CANN) run with I/O
binding: outputs stay on the device as OrtValues, so partitions on one device pass tensors without
a round trip through the host, and CUDA tensors cross to and from torch, CuPy and TensorRT through
DLPack or the CUDA Array Interface without a copy.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxruntime.capi import _pybind_state

from hetero.cache import cache_dir
from hetero.errors import CompileError, ExecutorUnavailableError, RunError
from hetero.executors import hardware
from hetero.executors.base import (
    CPU,
    NUMPY_NATIVE_TYPES,
    CompiledPartition,
    Device,
    Executor,
    ExecutorInfo,
    ProbeAnswers,
    element_type,
    shrinks,
)
from hetero.graph import Model, Node

_PROVIDER = "CPUExecutionProvider"
ort.set_default_logger_severity(3)


@lru_cache(maxsize=1)
def _kernel_defs() -> dict[tuple[str, str], list]:
    defs: dict[tuple[str, str], list] = {}
    for kd in _pybind_state.get_all_opkernel_def():
        if kd.provider == _PROVIDER:
            defs.setdefault((kd.domain, kd.op_name), []).append(kd)
    return defs


@lru_cache(maxsize=1)
def _vendor_schemas() -> dict[tuple[str, str], list]:
    """ONNX Runtime's own operator schemas (contrib ops) by (domain, op), newest first."""
    schemas: dict[tuple[str, str], list] = {}
    for schema in _pybind_state.get_all_operator_schema():
        if schema.domain in VENDOR_DOMAINS:
            schemas.setdefault((schema.domain, schema.name), []).append(schema)
    for found in schemas.values():
        found.sort(key=lambda s: -s.since_version)
    return schemas


#: Domains of ONNX Runtime's contrib operators that its CPU provider runs.
VENDOR_DOMAINS = frozenset({"com.microsoft"})
#: Element types ONNX Runtime runs by casting to float around a float kernel when the CPU provider
#: has none for them (its InsertCastTransformer): computed in fp32, rounded once at the end.
_CAST_TYPES = frozenset({"tensor(float16)", "tensor(bfloat16)"})


def _type_string(value_info: onnx.ValueInfoProto | None) -> str | None:
    """ONNX Runtime's spelling of a value's type: 'tensor(float)', 'seq(tensor(int64))'."""
    if value_info is None:
        return None
    type_proto = value_info.type
    if type_proto.HasField("sequence_type"):
        inner = type_proto.sequence_type.elem_type
        return f"seq(tensor({_elem(inner.tensor_type.elem_type)}))" if inner.HasField("tensor_type") else None
    if type_proto.HasField("tensor_type") and type_proto.tensor_type.elem_type:
        return f"tensor({_elem(type_proto.tensor_type.elem_type)})"
    return None


def _elem(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _since_version(node: Node, model: Model) -> int | None:
    if node.since_version is not None:
        return node.since_version
    found = _vendor_schemas().get((node.domain, node.op_type), [])
    version = model.opsets.get(node.domain, 1)
    return next((s.since_version for s in found if s.since_version <= version), None)


def _schema(node: Node, model: Model) -> Any:
    if node.domain in VENDOR_DOMAINS:
        version = _since_version(node, model)
        return next(s for s in _vendor_schemas()[node.domain, node.op_type] if s.since_version == version)
    return onnx.defs.get_schema(node.op_type, model.opsets[node.domain], node.domain)


def kernel_mismatch(node: Node, model: Model) -> str | None:
    """Why ONNX Runtime's CPU provider has no kernel for this node (op version or types), or None
    when it has one, or runs the node another way: a function op (expanded into its body) or a
    float16/bfloat16 node (cast to float around a float kernel)."""
    version = _since_version(node, model)
    if version is None:
        return f"no schema for {node.qualified_type} at opset {model.opsets.get(node.domain)}"
    candidates = _kernel_defs().get((node.domain, node.op_type), [])
    in_range = [kd for kd in candidates if kd.version_range[0] <= version <= kd.version_range[1]]
    schema = _schema(node, model)
    if not in_range:
        expanded = schema.has_function or schema.has_context_dependent_function
        if node.domain not in VENDOR_DOMAINS and expanded:
            return None
        return f"no CPU kernel for {node.qualified_type}-{version}"
    bound: dict[str, set[str]] = {}
    for formals, names in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for position, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(position, len(formals) - 1)]
            text = _type_string(model.value_info(name))
            if text is not None:
                bound.setdefault(getattr(formal, "type_str", None) or formal.typeStr, set()).add(text)
    for kd in in_range:
        constraints = kd.type_constraints
        if all(param not in constraints or types <= {*constraints[param], *_cast_to_float(constraints[param])}
               for param, types in bound.items()):
            return None
    types = sorted({t for ts in bound.values() for t in ts})
    return f"no CPU kernel for {node.qualified_type}-{version} on {', '.join(types)}"


def _cast_to_float(allowed: Sequence[str]) -> frozenset[str]:
    return _CAST_TYPES if "tensor(float)" in allowed else frozenset()


def has_kernel(node: Node, model: Model) -> bool:
    """ONNX Runtime's CPU provider runs this op version with these input/output types."""
    return kernel_mismatch(node, model) is None


def vendor_output_types(node: onnx.NodeProto, inputs: Sequence[onnx.ValueInfoProto | None],
                        opsets: Mapping[str, int], weights: Sequence[onnx.TensorProto]
                        ) -> list[onnx.ValueInfoProto | None]:
    """Output types of a contrib-op node as ONNX Runtime infers them: a session for the node alone
    (its inputs typed as the model types them), whose outputs say their types and shapes."""
    given = {t.name for t in weights}
    graph_inputs = []
    for name, info in zip(node.input, inputs, strict=False):
        if not name or name in given:
            continue
        if info is None or _type_string(info) is None:
            return [None] * len(node.output)
        graph_inputs.append(info)
    graph = helper.make_graph([node], "vendor_types", list({i.name: i for i in graph_inputs}.values()),
                              [onnx.ValueInfoProto(name=o) for o in node.output if o], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[_PROVIDER])
    typed = {}
    for output in session.get_outputs():
        elem = _ELEMENT_TYPES.get(output.type)
        if elem is not None:
            dims = None if output.shape is None else [d if isinstance(d, int | str) else None
                                                       for d in output.shape]
            typed[output.name] = helper.make_tensor_value_info(output.name, elem, dims)
    return [typed.get(o) for o in node.output]


_ELEMENT_TYPES = {f"tensor({_elem(t)})": t for t in onnx.TensorProto.DataType.values()
                  if t != onnx.TensorProto.UNDEFINED}


def known_deviation(node: Node, model: Model) -> str | None:
    """Why ONNX Runtime's CPU kernel gives other numbers than the ONNX spec for this node, if it does.

    Found by the ONNX backend test suite (ONNX Runtime's own test filter lists the same cases)
    and by `benchmarks/exactness.py`; such nodes are left to an executor that follows the spec.
    """
    op, attrs = node.op_type, node.attributes
    given = [bool(name) for name in node.inputs] + [False] * 8
    if op in ("DFT", "STFT"):
        return "axis and onesided handling differ from DFT-20/STFT-17"
    if op in ("GRU", "LSTM", "RNN") and attrs.get("layout", 0) == 1:
        return "batch-major layout=1 is computed as layout=0"
    if op == "MaxUnpool" and given[2]:
        return "the output_shape input is ignored"
    if op == "RoiAlign" and attrs.get("mode", b"avg") == b"max":
        return "max mode takes the max of weighted samples, not of bilinear values"
    if op == "Scan" and node.since_version >= 9 and _empty_scan(node, model):
        return "a scan over zero steps fails at run time"
    if op == "Bernoulli":
        # ONNX's own function body, Greater(RandomUniformLike(p), p), which ONNX Runtime expands.
        return "draws 1 with probability 1 - p, not p"
    if op == "Dropout" and given[2]:
        return "training-mode masks come from another random generator"
    if op == "Attention" and attrs.get("is_causal", 0):
        fp16 = model.tensor(node.inputs[0]).dtype == np.float16
        if fp16 or (given[3] and given[4]):
            return "causal masking with fp16 inputs or with both a mask and a past cache differs"
    if op == "Resize" and attrs.get("coordinate_transformation_mode") == b"align_corners" \
            and attrs.get("mode", b"nearest") != b"nearest" and shrinks(node, model):
        return "align_corners downsampling samples other positions"
    return None


def _empty_scan(node: Node, model: Model) -> bool:
    """A scan input whose scan axis is statically zero long."""
    count = node.attributes.get("num_scan_inputs", 0)
    axes = node.attributes.get("scan_input_axes") or [0] * count
    for name, axis in zip(node.inputs[len(node.inputs) - count:], axes, strict=False):
        shape = model.tensor(name).shape
        if shape is not None and shape[axis % max(len(shape), 1)] == 0:
            return True
    return False


@dataclass(frozen=True)
class Provider:
    """How Hetero drives one ONNX Runtime execution provider.

    `kind` is the device kind it computes on (`cuda`, `npu`, ...; OpenVINO's provider names its
    devices itself). `memory` is the `OrtDevice` type its tensors stay in between partitions
    (I/O binding); None means host memory: the provider takes and gives host arrays and copies to
    its device inside each run. `precisions` maps each precision to its provider options; fp32
    comes first and is what runs unless the user allows another.
    """

    name: str
    short: str
    kind: str
    memory: str | None = None
    precisions: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: {"fp32": {}})
    options: Mapping[str, str] = field(default_factory=dict)
    index_option: str | None = "device_id"
    description: str = ""


CPU_PROVIDER = Provider(_PROVIDER, "cpu", "cpu", index_option=None,
                        description="host CPU (MLAS)")
#: The execution providers Hetero drives, by ONNX Runtime's name. Options are the documented ones
#: of each provider; those on devices not at hand here are unverified (see README).
PROVIDERS = {p.name: p for p in (
    CPU_PROVIDER,
    Provider("CUDAExecutionProvider", "cuda", "cuda", memory="cuda",
             precisions={"fp32": {"use_tf32": "0"}, "tf32": {"use_tf32": "1"}},
             options={"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "EXHAUSTIVE"},
             description="cuDNN and cuBLAS"),
    Provider("TensorrtExecutionProvider", "tensorrt", "cuda", memory="cuda",
             precisions={"fp32": {}, "fp16": {"trt_fp16_enable": "1"}},
             options={"trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"},
             description="TensorRT engines built by ONNX Runtime"),
    Provider("NvTensorRTRTXExecutionProvider", "nvtensorrtrtx", "cuda", memory="cuda",
             description="TensorRT for RTX"),
    Provider("MIGraphXExecutionProvider", "migraphx", "rocm",
             precisions={"fp32": {}, "fp16": {"migraphx_fp16_enable": "1"}}, description="AMD MIGraphX"),
    Provider("ROCMExecutionProvider", "rocm", "rocm", description="AMD ROCm (MIOpen, rocBLAS)"),
    Provider("DmlExecutionProvider", "dml", "dml", memory="dml", description="DirectML"),
    Provider("CANNExecutionProvider", "cann", "npu", memory="cann", description="Huawei Ascend (CANN)"),
    Provider("OpenVINOExecutionProvider", "openvino", "openvino", index_option=None,
             precisions={"fp32": {"precision": "FP32"}, "fp16": {"precision": "FP16"}},
             description="Intel OpenVINO"),
    Provider("QNNExecutionProvider", "qnn", "npu", index_option=None, options={"backend_type": "htp"},
             precisions={"fp32": {"enable_htp_fp16_precision": "0"},
                         "fp16": {"enable_htp_fp16_precision": "1"}},
             description="Qualcomm Hexagon NPU (QNN HTP)"),
    Provider("VitisAIExecutionProvider", "vitisai", "npu", index_option=None,
             description="AMD Vitis AI NPU"),
    Provider("DnnlExecutionProvider", "dnnl", "cpu", index_option=None, description="host CPU (oneDNN)"),
    Provider("XnnpackExecutionProvider", "xnnpack", "cpu", index_option=None,
             description="host CPU (XNNPACK)"),
    Provider("ACLExecutionProvider", "acl", "cpu", index_option=None,
             description="host CPU (Arm Compute Library)"),
    Provider("ArmNNExecutionProvider", "armnn", "cpu", index_option=None, description="host CPU (Arm NN)"),
)}
#: Providers that are no device to plan for, and why.
NOT_DEVICES = {
    "AzureExecutionProvider": "not a device: it sends requests to a model served on Azure",
    "CoreMLExecutionProvider": "Core ML picks the Neural Engine, GPU or CPU itself: no one device to plan "
                               "for",
}
#: The I/O binding path of the device providers, run by the CPU provider on OrtValues kept in host
#: memory (a memory space of their own): what CI checks of that path (`device_twin`).
TWIN_PROVIDER = Provider(_PROVIDER, "cpu-twin", "cpu", memory="cpu", index_option=None,
                         description="host CPU, tensors kept as OrtValues (the device path, on the host)")
#: pip packages of ONNX Runtime; one per environment (they install the same files).
FLAVOURS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
            "onnxruntime-qnn", "onnxruntime-cann", "onnxruntime-migraphx", "onnxruntime-rocm",
            "onnxruntime-vitisai")


@dataclass(frozen=True)
class _Found:
    """One device a provider drives here: the device, the options naming it, what it is."""

    provider: Provider
    device: Device
    options: Mapping[str, str]
    description: str


def _smoke(provider: Provider, options: Mapping[str, str]) -> str | None:
    """Whether the provider starts here: a one-node session with CPU fallback disabled. None if
    it does, else ONNX Runtime's complaint (a provider can be built in yet lack its libraries or
    hardware). The input dim is symbolic so engine-building providers defer their build."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "smoke", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    session_options = ort.SessionOptions()
    session_options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        session = ort.InferenceSession(model.SerializeToString(), session_options,
                                       providers=[(provider.name, dict(options))])
    except Exception as exc:
        return " ".join(str(exc).split())[:200]
    if session.get_providers()[0] != provider.name:
        return "ONNX Runtime fell back to the CPU provider"
    return None


def _devices(provider: Provider) -> tuple[list[_Found], list[str]]:
    """The devices a provider drives here, and why it drives none when it does not."""
    if provider.kind == "cpu":
        return [_Found(provider, CPU, {}, provider.description)], []
    if provider.kind == "cuda":
        gpus = hardware.cuda_devices()
        if not gpus:
            return [], ["the CUDA driver offers no GPU here"]
        found = [_Found(provider, Device("cuda", g.ordinal), {"device_id": str(g.ordinal)}, g.name)
                 for g in gpus]
    elif provider.kind == "openvino":
        listed = getattr(_pybind_state, "get_available_openvino_device_ids", lambda: ["CPU"])()
        found = [_Found(provider, device, {"device_type": name}, f"{name} through OpenVINO")
                 for name in listed if (device := hardware.openvino_device(name)) is not None]
    else:
        count = sum(1 for d in ort.get_ep_devices() if d.ep_name == provider.name) or 1
        index = provider.index_option
        found = [_Found(provider, Device(provider.kind, i), {index: str(i)} if index else {},
                        provider.description) for i in range(count)]
    failure = _smoke(provider, {**provider.options, **found[0].options}) if found else None
    return ([], [f"the provider does not start here: {failure}"]) if failure else (found, [])


@lru_cache(maxsize=1)
def survey() -> tuple[tuple[_Found, ...], tuple[str, ...]]:
    """Every device each available provider drives, and notes on what is missing: providers that
    are no device or do not start, hardware without its provider, packages that clash."""
    found: list[_Found] = []
    notes: list[str] = []
    available = ort.get_available_providers()
    for name in sorted(available, key=lambda n: n != _PROVIDER):  # the CPU provider first
        short = name.removesuffix("ExecutionProvider")
        if name in NOT_DEVICES:
            notes.append(f"{short} provider skipped: {NOT_DEVICES[name]}")
        elif name not in PROVIDERS:
            notes.append(f"{short} provider skipped: Hetero does not know which device it drives")
        else:
            devices, why = _devices(PROVIDERS[name])
            found += devices
            notes += [f"{short} provider: {reason}" for reason in why]
    gpus = hardware.nvidia_smi_gpus()
    if gpus and not any(PROVIDERS[n].kind == "cuda" for n in available if n in PROVIDERS):
        notes.append(f"{len(gpus)} NVIDIA GPU(s) listed by nvidia-smi ({gpus[0]}), but this ONNX Runtime "
                     "has no CUDA provider: replace the onnxruntime package by onnxruntime-gpu "
                     "(pip uninstall onnxruntime; pip install 'hetero[onnxruntime-gpu]')")
    installed = [f for f in FLAVOURS if _installed(f)]
    if len(installed) > 1:
        notes.append(f"several ONNX Runtime packages are installed ({', '.join(installed)}): they overwrite "
                     "each other's files; keep one (pip uninstall them all, then install one)")
    return tuple(found), tuple(notes)


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _memory_space(provider: Provider, device: Device) -> str:
    """Host memory for providers that copy inside each run; a CUDA device's memory is shared by
    every CUDA library (DLPack); other device memory is ONNX Runtime's alone."""
    if provider.memory is None:
        return str(CPU)
    return str(device) if provider.memory == "cuda" else f"onnxruntime:{provider.memory}:{device.index}"



class _HostSession(CompiledPartition):
    """A partition of a host-memory provider: numpy arrays in, numpy arrays out (`run`)."""

    def __init__(self, session: ort.InferenceSession, label: str, name: str):
        self._session = session
        self._label = label
        self._name = name
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        try:
            return self._session.run(self.output_names, dict(zip(self.input_names, inputs, strict=True)))
        except Exception as exc:
            raise RunError(f"{self._name} failed running partition {self._label!r}: {exc}") from exc


class _BoundSession(_HostSession):
    """A partition of a device-memory provider: inputs bound where they lie (OrtValues, or device
    buffers of other libraries by pointer), outputs left on the device as OrtValues (I/O binding),
    so tensors stay on the device between partitions."""

    def __init__(self, session: ort.InferenceSession, label: str, name: str, memory: str, index: int):
        super().__init__(session, label, name)
        self._memory = memory
        self._index = index
        self._local = threading.local()

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        binding = getattr(self._local, "binding", None)
        if binding is None:
            binding = self._local.binding = self._session.io_binding()
        try:
            for name, value in zip(self.input_names, inputs, strict=True):
                self._bind(binding, name, value)
            for name in self.output_names:
                binding.bind_output(name, self._memory, self._index)
            self._session.run_with_iobinding(binding)
            return binding.get_outputs()
        except RunError:
            raise
        except Exception as exc:
            raise RunError(f"{self._name} failed running partition {self._label!r}: {exc}") from exc
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()

    def _bind(self, binding: ort.IOBinding, name: str, value: Any) -> None:
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        elif hasattr(value, "__cuda_array_interface__"):
            shape, dtype, pointer = hardware.cuda_array(value)
            binding.bind_input(name, self._memory, self._index, dtype, shape, pointer)
        else:
            raise RunError(f"{self._name}: input {name!r} of partition {self._label!r} is a "
                           f"{type(value).__name__}, not a tensor in its device memory: a transfer is "
                           "missing")


class OnnxRuntimeExecutor(Executor):
    """One execution provider of ONNX Runtime on one device (`PROVIDERS`); the CPU provider by
    default. Each partition becomes one InferenceSession with that provider."""

    library = "onnxruntime"
    extra = "onnxruntime"
    compiles_graphs = True
    vendor_domains = VENDOR_DOMAINS
    exchange_dtypes = NUMPY_NATIVE_TYPES | {"string"}
    output_types = staticmethod(vendor_output_types)

    def __init__(self, device: Device = CPU, *, threads: int | None = None, stream: int | None = None,
                 provider: Provider = CPU_PROVIDER, precision: str = "fp32",
                 device_options: Mapping[str, str] | None = None, options: Mapping[str, str] | None = None,
                 description: str | None = None):
        host_compute = provider.kind == "cpu" or device == CPU
        super().__init__(device, threads=threads or (None if host_compute else 1), stream=stream)
        if precision not in provider.precisions:
            raise ExecutorUnavailableError(f"{provider.name} offers precisions "
                                           f"{', '.join(provider.precisions)}, not {precision!r}")
        self.provider = provider
        self.precision = precision
        self.precisions = tuple(provider.precisions)
        self.device_options = dict(device_options or {})
        self.options = dict(options or {})
        self.description = description or provider.description
        self.exact = provider.name == _PROVIDER  # follows the spec but for known_deviation
        on_device = provider.memory is not None
        self.exchange_dtypes = NUMPY_NATIVE_TYPES if on_device else NUMPY_NATIVE_TYPES | {"string"}
        namespace = f"onnxruntime={ort.__version__}"
        if provider.name != _PROVIDER:
            namespace += f"/{provider.short}/{self.description}"
        self._probes = ProbeAnswers.shared(namespace)

    @classmethod
    def device_twin(cls) -> OnnxRuntimeExecutor:
        """The CPU provider through the device providers' I/O binding path: tensors kept as
        OrtValues in a memory space of their own, hand-offs and transfers as on a GPU."""
        return cls(CPU, provider=TWIN_PROVIDER)

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.provider is CPU_PROVIDER else f"onnxruntime/{self.provider.short}"

    @property
    def memory_space(self) -> str:
        return _memory_space(self.provider, self.device)

    def variant(self, *, threads: int | None = None, stream: int | None = None,
                precision: str | None = None) -> Executor:
        return type(self)(self.device, threads=threads or self.threads, stream=stream, provider=self.provider,
                          precision=precision or self.precision, device_options=self.device_options,
                          options=self.options, description=self.description)

    def with_options(self, **options: Any) -> OnnxRuntimeExecutor:
        """The same provider and device with more provider options, by the provider's documented
        names (`trt_max_workspace_size=4 << 30`, `gpu_mem_limit=...`); they win over Hetero's."""
        return type(self)(self.device, threads=self.threads, stream=self.stream, provider=self.provider,
                          precision=self.precision, device_options=self.device_options,
                          options={**self.options, **{k: str(v) for k, v in options.items()}},
                          description=self.description)

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls(f.device, provider=f.provider, device_options=f.options, description=f.description)
                for f in survey()[0]]

    @classmethod
    def missing(cls) -> list[str]:
        return list(survey()[1])

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.engine, ort.__version__, str(self.device), self.description,
                            self.threads, self.precision)

    def provider_options(self) -> dict[str, str]:
        """The provider's options: its defaults, the device, the precision, then the user's."""
        options = {**self.provider.options, **self.device_options, **self.provider.precisions[self.precision]}
        if self.provider.short == "tensorrt":
            options["trt_engine_cache_path"] = str(cache_dir() / "tensorrt-provider")
            options["trt_timing_cache_path"] = options["trt_engine_cache_path"]
        if self.provider.short == "openvino" and self.device == CPU:
            options["num_of_threads"] = str(self.threads)
        return {**options, **self.options}

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Spinning between the nodes of one run saves a wake-up per parallel op; spinning after
        # the run would steal the cores from the next partition's library, so it stops there.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def _session(self, part: onnx.ModelProto, options: ort.SessionOptions,
                 provider_options: Mapping[str, str]) -> ort.InferenceSession:
        session = ort.InferenceSession(part.SerializeToString(), options,
                                       providers=[(self.provider.name, dict(provider_options))])
        if session.get_providers()[0] != self.provider.name:
            raise CompileError(f"{self.name}: ONNX Runtime could not start the {self.provider.name} and fell "
                               "back to the CPU provider")
        return session

    def supports_op(self, node: Node, model: Model) -> bool:
        if node.domain not in ("", "ai.onnx.ml", *VENDOR_DOMAINS) or known_deviation(node, model):
            return False
        if self.provider.name == _PROVIDER and not has_kernel(node, model):
            return False
        if self.provider.memory is not None and not _tensors_only(node, model):
            return False
        return self._probes.ask(model.signature(node), lambda: self._session_alone(node, model) is None)

    def _session_alone(self, node: Node, model: Model) -> str | None:
        """Build a session for the node alone, CPU fallback disabled so the provider itself must
        take it: None if it does, else ONNX Runtime's complaint."""
        options = self._options()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.provider.name != _PROVIDER:
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        provider_options = self.provider_options()
        provider_options.pop("trt_engine_cache_enable", None)  # no engine files for one-node probes
        try:
            self._session(model.extract([node]), options, provider_options)
        except Exception as exc:
            return " ".join(str(exc).split())[:300]
        return None

    def decline_op(self, node: Node, model: Model) -> str:
        if node.domain not in ("", "ai.onnx.ml", *VENDOR_DOMAINS):
            return f"ONNX Runtime does not implement domain {node.domain!r}"
        reason = known_deviation(node, model)
        if self.provider.name == _PROVIDER:
            reason = kernel_mismatch(node, model) or reason
        if reason:
            return reason
        if self.provider.memory is not None and not _tensors_only(node, model):
            return "it reads or writes sequences or strings, which stay in host memory"
        return f"a session for the node alone fails: {self._session_alone(node, model)}"

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        try:
            session = self._session(part, self._options(), self.provider_options())
        except CompileError:
            raise
        except Exception as exc:
            text = str(exc)
            nodes = tuple(n.name for n in part.graph.node if n.name and n.name in text)
            raise CompileError(f"{self.name} rejected partition {part.graph.name!r}: {text}", nodes) from exc
        if self.provider.memory is None:
            return _HostSession(session, part.graph.name, self.name)
        return _BoundSession(session, part.graph.name, self.name, self.provider.memory, self.device.index)

    # Device memory: OrtValues. Host-memory providers keep the identity transfers of the base class.

    def to_device(self, array: np.ndarray) -> Any:
        if self.provider.memory is None:
            return array
        return ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"), self.provider.memory,
                                                self.device.index)

    def to_host(self, value: Any) -> np.ndarray:
        return value.numpy() if isinstance(value, ort.OrtValue) else value

    def adopt(self, value: Any) -> Any:
        """Another library's device array as an OrtValue over the same memory (DLPack); arrays
        that only expose the CUDA Array Interface are bound by pointer when the partition runs."""
        if self.provider.memory is None or isinstance(value, ort.OrtValue):
            return value
        if not hasattr(value, "__dlpack__"):
            return value
        return ort.OrtValue.from_dlpack(value)

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """GPU to GPU without the host: ONNX Runtime copies between CUDA devices' OrtValues."""
        if self.provider.memory != "cuda" or not source.memory_space.startswith("cuda:"):
            return None
        if not isinstance(value, ort.OrtValue):
            if not hasattr(value, "__dlpack__"):
                return None
            value = ort.OrtValue.from_dlpack(value)
        copied = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), _ELEMENT_TYPES[value.data_type()],
                                                           "cuda", self.device.index)
        copied.update_inplace(value)
        return copied


def _tensors_only(node: Node, model: Model) -> bool:
    return all(model.tensor(name).kind == "tensor" and element_type(model, name) != "string"
               for name in (*node.all_inputs, *node.outputs) if name)
