"""`openvino@cpu`, `openvino@gpu:N`, `openvino@npu:0`: Intel OpenVINO on every device it lists.

A graph compiler: each partition is read by OpenVINO's ONNX frontend and compiled as one model.
Capability is asked of OpenVINO: the node alone is converted and `query_model` must place all
of its operations on the device. OpenVINO's own default on CPUs with bf16 units is bf16 and on
GPUs fp16; Hetero asks for fp32 unless a reduced precision is requested explicitly
(`precision="bf16"`). The NPU computes in fp16 only, so it runs nothing until fp16 is allowed.

Devices follow OpenVINO's `available_devices`: CPU is `cpu`, GPU.N (or a lone GPU) is `gpu:N`,
NPU is `npu:0`. A GPU or NPU is its own memory space: tensors stay there between its partitions
as OpenVINO remote tensors, allocated in the device's default context, copied to and from host
memory only at the edges.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import onnx
import openvino as ov
from onnx import numpy_helper

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
    shrinks,
)
from hetero.graph import Model, Node

_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
#: Precisions each kind of device offers, the first its default.
_DEVICE_PRECISIONS = {"cpu": ("fp32", "bf16", "fp16"), "gpu": ("fp32", "fp16"), "npu": ("fp32", "fp16")}
_STRUCTURAL_OPS = {"Parameter", "Result", "Constant"}
_core: ov.Core | None = None
_core_lock = threading.Lock()


def core() -> ov.Core:
    """One OpenVINO Core per process, as OpenVINO recommends."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def read(part: onnx.ModelProto) -> ov.Model:
    return core().read_model(part.SerializeToString(), b"")


_CONTROL_FLOW = {"If", "Loop", "Scan"}
_UNSUPPORTED_OPS = {
    "BitShift": "shifts by the type width or more and negative inputs give other results",
    "DFT": "axis and onesided handling differ from DFT-20",
    "STFT": "frames are computed differently from STFT-17",
    "DynamicQuantizeLinear": "rounds halves away from zero, not to even",
    "QuantizeLinear": "rounds halves away from zero, not to even",
    "NonMaxSuppression": "a box whose IoU equals the threshold is suppressed",
    "TopK": "equal values do not keep their index order",
    "ReduceMax": "an all -inf (or empty) slice gives the lowest finite float, not -inf",
    "ReduceMin": "an all +inf (or empty) slice gives the highest finite float, not +inf",
    "Exp": "Exp(NaN) gives inf",
    "Softmax": "a row holding +inf or NaN gives NaN only where the input is, not across the row",
    "LogSoftmax": "a row holding +inf or NaN gives NaN only where the input is, not across the row",
}


def known_deviation(node: Node, model: Model) -> str | None:
    """Why OpenVINO's CPU plugin gives other numbers than the ONNX spec for this node, if it does.

    Found by running the ONNX backend test suite with OpenVINO first and by the edge values of
    `benchmarks/exactness.py`; such nodes are left to an executor that follows the spec.
    """
    op, attrs = node.op_type, node.attributes
    given = [bool(name) for name in node.inputs] + [False] * 8
    if op in _UNSUPPORTED_OPS:
        return _UNSUPPORTED_OPS[op]
    int64_data = _int64_data(node, model)
    if int64_data:
        return f"int64 tensors are held as int32: {int64_data} may pass 2^31"
    if op == "Div" and model.tensor(node.inputs[0]).dtype in _FLOATS and not _safe_divisor(node, model):
        return "divides by multiplying with the reciprocal, infinite for divisors below 1/FLT_MAX (denormals)"
    if op in _CONTROL_FLOW:
        return "control-flow outputs of dynamic shape are mis-broadcast by the ops that read them"
    if op in ("GRU", "LSTM", "RNN") and (attrs.get("layout", 0) == 1 or (op == "LSTM" and given[7])):
        return "batch-major layout=1 and LSTM peepholes are not followed"
    if op == "RoiAlign" and attrs.get("mode", b"avg") == b"max":
        return "max mode takes the max of weighted samples, not of bilinear values"
    if op == "Tile" and not model.is_initializer(node.inputs[1]):
        return "repeats given at run time produce garbage"
    if op == "SpaceToDepth" and attrs.get("mode", b"DCR") != b"DCR":
        return "the mode attribute is ignored"
    windowed = attrs.get("left_window_size", -1) >= 0 or attrs.get("right_window_size", -1) >= 0
    if op == "Attention" and (windowed or (attrs.get("is_causal", 0) and given[4])):
        return "sliding windows and causal masking over a past cache differ"
    if op in ("ReduceL1", "ReduceLogSum", "ReduceLogSumExp") and node.since_version == 13 and "axes" in attrs:
        return "the axes attribute of opset-13 ReduceL1, ReduceLogSum and ReduceLogSumExp is ignored"
    if op == "Resize" and _resize_deviates(node, model):
        return "antialiasing, cubic variants, aspect-ratio policies or align_corners downsampling differ"
    if op == "Resize" and _resize_rounds_otherwise(node, model):
        return ("output sizes and nearest source indices are rounded from float32 arithmetic: an exact "
                "integer or half it cannot represent goes the other way")
    if op in ("MaxPool", "AveragePool") and attrs.get("ceil_mode", 0) and _ceil_drops_window(node, model):
        return "ceil_mode keeps a last window that starts in the padding"
    return None


def _resize_deviates(node: Node, model: Model) -> bool:
    attrs = node.attributes
    mode = attrs.get("mode", b"nearest")
    if attrs.get("antialias", 0) or attrs.get("keep_aspect_ratio_policy", b"stretch") != b"stretch":
        return True
    if mode == b"cubic" and (attrs.get("exclude_outside", 0) or attrs.get("cubic_coeff_a", -0.75) != -0.75):
        return True
    return mode != b"nearest" and attrs.get("coordinate_transformation_mode") == b"align_corners" \
        and shrinks(node, model)


_FLOATS = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64))
#: Op outputs (by position; None: all) that are indices or sizes of tensors, far below 2^31.
_SIZE_SOURCES = {"Shape": None, "Size": None, "NonZero": None, "ArgMax": None, "ArgMin": None, "TopK": {1},
                 "NonMaxSuppression": None, "Unique": {1, 2, 3}}
#: Index inputs: only values within a tensor's extent are valid, so none beyond 2^31 is.
_INDEX_INPUTS = {("Gather", 1), ("GatherElements", 1), ("GatherND", 1)}
#: Constant inputs OpenVINO reads as 64-bit when converting (INT64_MAX as "to the end").
_CONSTANT_BOUNDS = {("Slice", 1), ("Slice", 2)}
_INT32 = 2**31


def _constant(model: Model, name: str) -> np.ndarray | None:
    if not model.is_initializer(name):
        return None
    return next(numpy_helper.to_array(t) for t in model.proto.graph.initializer if t.name == name)


def _int64_data(node: Node, model: Model) -> str | None:
    """The int64 input of `node` whose values are not known to stay within int32, if any.

    OpenVINO's CPU plugin holds int64 tensors as int32 (Identity of 2^40 + 3 gives 3; Cast of
    5e18 to int64 gives -2^31). Shape arithmetic is safe: values computed from Shape, Size,
    indices and small constants are tensor extents. Data is not.
    """
    int64 = np.dtype(np.int64)
    if node.op_type in ("Cast", "CastLike") and model.tensor(node.outputs[0]).dtype == int64 \
            and model.tensor(node.inputs[0]).dtype in _FLOATS:
        return f"{node.op_type} from float to int64"
    for position, name in enumerate(node.inputs):
        if not name or model.tensor(name).dtype != int64 or (node.op_type, position) in _INDEX_INPUTS:
            continue
        if node.op_type in ("Cast", "CastLike") and position == 0:
            continue  # converting int64 to another type reads all 64 bits
        if (node.op_type, position) in _CONSTANT_BOUNDS and model.is_initializer(name):
            continue
        if not _within_int32(name, model, {}, 0):
            return f"input {name!r}"
    return None


def _within_int32(name: str, model: Model, seen: dict[str, bool], depth: int) -> bool:
    """Whether an int64 value provably stays within int32: a small constant, a size or index, or
    computed from such values alone (up to 64 nodes upstream)."""
    if name in seen:
        return seen[name]
    constant = _constant(model, name)
    producer = model.producer(name)
    if constant is not None:
        small = constant.size == 0 or bool(np.all(np.abs(constant.astype(np.float64)) < _INT32))
    elif producer is None or depth > 64:
        small = False
    elif _is_size(producer, name):
        small = True
    elif producer.op_type in ("Cast", "CastLike") and model.tensor(producer.inputs[0]).dtype in _FLOATS:
        small = False
    else:
        small = all(_within_int32(i, model, seen, depth + 1) for i in producer.all_inputs
                    if model.tensor(i).dtype == np.dtype(np.int64))
    seen[name] = small
    return small


def _is_size(node: Node, name: str) -> bool:
    positions = _SIZE_SOURCES.get(node.op_type, ())
    return positions is None or node.outputs.index(name) in positions


def _safe_divisor(node: Node, model: Model) -> bool:
    """A constant divisor whose reciprocal is finite (zero is fine: x * inf is x / 0)."""
    divisor = _constant(model, node.inputs[1])
    if divisor is None:
        return False
    magnitudes = np.abs(divisor.astype(np.float64))
    return not np.any((magnitudes > 0) & (magnitudes < 1 / np.finfo(np.float32).max))


def _is_power_of_two(ratio: Fraction) -> bool:
    return ratio > 0 and ratio.numerator & (ratio.numerator - 1) == 0 \
        and ratio.denominator & (ratio.denominator - 1) == 0


def _resize_rounds_otherwise(node: Node, model: Model) -> bool:
    """Whether Resize has a value that OpenVINO's float32 arithmetic may round the other way: an
    output size floor(n * scale) just below an integer, or a nearest source coordinate on (or
    within float32 error of) a rounding boundary; exact where the scale is a power of two."""
    attrs = node.attributes
    version = node.since_version or 0
    scales_name = node.inputs[1] if version < 11 else (node.inputs[2] if len(node.inputs) > 2 else "")
    sizes_name = node.inputs[3] if version >= 11 and len(node.inputs) > 3 else ""
    source = model.tensor(node.inputs[0]).shape
    scales = _constant(model, scales_name) if scales_name else None
    sizes = _constant(model, sizes_name) if sizes_name else None
    if scales is not None and scales.size:
        ratios = [Fraction(float(s)) for s in scales.reshape(-1)]
        if any(r <= 0 for r in ratios):
            return True
        if source is None or not all(isinstance(d, int) for d in source):
            return not all(_is_power_of_two(r) for r in ratios)
        targets = [math.floor(n * r) for n, r in zip(source, ratios, strict=False)]
        if any(not _is_power_of_two(r) and n * r - math.floor(n * r) > 1 - 1e-4
               for n, r in zip(source, ratios, strict=False)):
            return True
    elif sizes is not None and sizes.size and source is not None and all(isinstance(d, int) for d in source):
        targets = [int(v) for v in sizes.reshape(-1)]
        if "axes" in attrs or len(targets) != len(source):
            return True
        ratios = [Fraction(t, n) if n else Fraction(1) for t, n in zip(targets, source, strict=True)]
    else:
        return True
    if attrs.get("mode", b"nearest") != b"nearest":
        return False
    rounding = attrs.get("nearest_mode", b"round_prefer_floor")
    mode = attrs.get("coordinate_transformation_mode", b"half_pixel" if version >= 11 else b"asymmetric")
    for n, out, ratio in zip(source, targets, ratios, strict=False):
        if out == n and ratio == 1:
            continue
        if mode == b"align_corners":
            step = Fraction(n - 1, out - 1) if out > 1 else Fraction(0)
            coordinates = [i * step for i in range(out)]
            exact = _is_power_of_two(step) or step == 0
        else:
            shift = Fraction(1, 2) if mode in (b"half_pixel", b"pytorch_half_pixel") else 0
            offset = Fraction(1, 2) if shift or mode == b"tf_half_pixel_for_nn" else 0
            coordinates = [(i + offset) / ratio - shift for i in range(out)]
            exact = _is_power_of_two(ratio)
        if exact:
            continue
        half = rounding in (b"round_prefer_floor", b"round_prefer_ceil") and version >= 11
        for c in coordinates:
            boundary = math.floor(c) + Fraction(1, 2) if half else Fraction(round(c))
            if abs(c - boundary) <= Fraction(1, 10**6) * max(1, abs(c)):
                return True
    return False


def _ceil_drops_window(node: Node, model: Model) -> bool:
    """ONNX drops a ceil-mode window that would start in the end padding; OpenVINO keeps it."""
    source, target = model.tensor(node.inputs[0]).shape, model.tensor(node.outputs[0]).shape
    if source is None or target is None or not all(isinstance(d, int) for d in (*source, *target)):
        return True
    attrs = node.attributes
    kernel = attrs.get("kernel_shape", [])
    nd = len(kernel)
    strides = attrs.get("strides") or [1] * nd
    dilations = attrs.get("dilations") or [1] * nd
    pads = attrs.get("pads") or [0] * 2 * nd
    for i in range(nd):
        span = source[2 + i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1
        if -(-span // strides[i]) + 1 != target[2 + i]:
            return True
    return False


def _native(array: np.ndarray) -> np.ndarray:
    """OpenVINO's binding knows int64 as numpy's 'l' type code; ONNX Runtime hands out 'q'."""
    if array.dtype.char in "qQ":
        return array.view(np.int64 if array.dtype.char == "q" else np.uint64)
    return array


@dataclass(frozen=True)
class RemoteArray:
    """A tensor in a GPU's or NPU's memory (an OpenVINO remote tensor, which does not say its
    element type)."""

    tensor: ov.RemoteTensor
    element_type: ov.Type

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.get_shape())


class _Compiled(CompiledPartition):
    def __init__(self, compiled: ov.CompiledModel, part: onnx.ModelProto, name: str,
                 context: ov.RemoteContext | None = None):
        self._compiled = compiled
        self._context = context
        self._label = part.graph.name
        self._name = name
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]
        # Ports keep the graph's input order, but OpenVINO renames an input that passes straight
        # through to an output, and drops inputs the graph does not need (empty optional axes).
        ports = list(compiled.inputs)
        by_name = {name: port for port in ports for name in port.get_names()}
        self._inputs = [by_name.get(n) for n in self.input_names]
        unmatched = [p for p in ports if not any(p is q for q in self._inputs)]
        missing = [i for i, port in enumerate(self._inputs) if port is None]
        if unmatched and len(unmatched) != len(missing):
            raise CompileError(f"{name}: cannot tell which graph inputs the renamed ports "
                               f"{[sorted(p.get_names()) for p in unmatched]} stand for")
        for index, port in zip(missing, unmatched, strict=False):
            self._inputs[index] = port
        self._outputs = [compiled.output(n) for n in self.output_names]
        self._local = threading.local()

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            if self._context is not None:
                return self._on_device(request, inputs)
            feeds = {port: _native(value) for port, value in zip(self._inputs, inputs, strict=True)
                     if port is not None}
            result = request.infer(feeds, share_inputs=True)
        except Exception as exc:
            raise RunError(f"{self._name} failed running partition {self._label!r}: {exc}") from exc
        return [result[o] for o in self._outputs]

    def _on_device(self, request: ov.InferRequest, inputs: Sequence[Any]) -> list[Any]:
        """Remote tensors in, and out where the output's shape is known before the run (a fresh
        one per run: the last run's outputs may still be read); others come back to the host."""
        for port, value in zip(self._inputs, inputs, strict=True):
            if port is None:
                continue
            if isinstance(value, RemoteArray):
                request.set_tensor(port.get_any_name(), value.tensor)
            else:
                request.set_tensor(port, ov.Tensor(_native(value), shared_memory=True))
        outputs: list[RemoteArray | None] = []
        for port in self._outputs:
            shape = port.get_partial_shape()
            remote = RemoteArray(self._context.create_tensor(port.get_element_type(), shape.to_shape(), {}),
                                 port.get_element_type()) if shape.is_static else None
            if remote is not None:
                request.set_tensor(port.get_any_name(), remote.tensor)
            outputs.append(remote)
        request.infer()
        return [remote if remote is not None else request.get_tensor(port).data.copy()
                for remote, port in zip(outputs, self._outputs, strict=True)]


class OpenVinoExecutor(Executor):
    library = "openvino"
    extra = "openvino"
    compiles_graphs = True
    # The CPU plugin computes f64 and f16 in f32, which is not ONNX's semantics for those types.
    exchange_dtypes = NUMPY_NATIVE_TYPES - {"double", "float16"}

    def __init__(self, device: Device = CPU, *, threads: int | None = None, stream: int | None = None,
                 precision: str = "fp32", ov_device: str | None = None):
        host = device == CPU
        super().__init__(device, threads=threads or (None if host else 1), stream=stream)
        self.precisions = _DEVICE_PRECISIONS.get(device.kind, ("fp32",))
        if precision not in self.precisions:
            raise ExecutorUnavailableError(f"openvino on {device} offers precisions "
                                           f"{', '.join(self.precisions)}, not {precision!r}")
        self.precision = precision
        self.ov_device = ov_device or ("CPU" if host else f"{device.kind.upper()}.{device.index}")
        kind = "" if host else f"/{device.kind}"
        self._probes = ProbeAnswers.shared(f"openvino={ov.get_version()}{kind}")

    @property
    def memory_space(self) -> str:
        """Host memory for the CPU; a GPU's or NPU's own (OpenVINO's remote tensors)."""
        return str(CPU) if self.device == CPU else f"openvino:{self.device}"

    def variant(self, *, threads: int | None = None, stream: int | None = None,
                precision: str | None = None) -> Executor:
        return type(self)(self.device, threads=threads or self.threads, stream=stream,
                          precision=precision or self.precision, ov_device=self.ov_device)

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls(device, ov_device=name) for name in core().available_devices
                if (device := hardware.openvino_device(name)) is not None]

    def info(self) -> ExecutorInfo:
        device_name = str(core().get_property(self.ov_device, "FULL_DEVICE_NAME"))
        if self.device.kind == "npu" and self.precision == "fp32":
            device_name += " (computes in fp16: used where fp16 is allowed)"
        return ExecutorInfo(self.name, self.library, ov.get_version().split("-")[0], str(self.device),
                            device_name, self.threads, self.precision)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _PRECISIONS[self.precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if self.device == CPU:
            # A CPU stream is one of several compiled models sharing the cores: pinned, each would
            # put its threads on the same first cores; the OS spreads them when they are not.
            config.update(INFERENCE_NUM_THREADS=self.threads, ENABLE_CPU_PINNING=self.stream is None)
        return config

    def supports_op(self, node: Node, model: Model) -> bool:
        if node.domain not in ("", "ai.onnx", "ai.onnx.ml") or node.since_version is None:
            return False
        if known_deviation(node, model) or (self.device.kind == "npu" and self.precision == "fp32"):
            return False
        def probe() -> bool:
            ov_model = read(model.extract([node]))
            placed = core().query_model(ov_model, self.ov_device)
            return all(op.get_friendly_name() in placed for op in ov_model.get_ops()
                       if op.get_type_name() not in _STRUCTURAL_OPS)

        return self._probes.ask(model.signature(node), probe)

    def decline_op(self, node: Node, model: Model) -> str:
        if self.device.kind == "npu" and self.precision == "fp32":
            return "the NPU computes in fp16 only: allow it with allow_precision='fp16'"
        return known_deviation(node, model) or super().decline_op(node, model)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        try:
            compiled = core().compile_model(read(part), self.ov_device, self._config())
            context = None if self.device == CPU else core().get_default_context(self.ov_device)
            return _Compiled(compiled, part, self.name, context)
        except Exception as exc:
            text = str(exc)
            culprits = tuple(n.name for n in part.graph.node
                             if n.name in text or any(o and f"{o}>" in text for o in n.output))
            message = f"{self.name} rejected partition {part.graph.name!r}: {text}"
            raise CompileError(message, culprits) from exc

    def to_device(self, array: np.ndarray) -> Any:
        """Host -> a remote tensor in the device's default context."""
        if self.device == CPU:
            return array
        host = ov.Tensor(_native(np.asarray(array, order="C")), shared_memory=True)
        remote = core().get_default_context(self.ov_device).create_tensor(host.get_element_type(),
                                                                           host.get_shape(), {})
        remote.copy_from(host)
        return RemoteArray(remote, host.get_element_type())

    def to_host(self, value: Any) -> np.ndarray:
        if not isinstance(value, RemoteArray):
            return value
        host = ov.Tensor(value.element_type, value.tensor.get_shape())
        value.tensor.copy_to(host)
        return np.array(host.data)

