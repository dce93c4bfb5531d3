"""`openvino@cpu`: Intel OpenVINO's CPU plugin (oneDNN).

A graph compiler: each partition is read by OpenVINO's ONNX frontend and compiled as one model.
Capability is asked of OpenVINO: the node alone is converted and `query_model` must place all
of its operations on the device. OpenVINO's own default on CPUs with bf16 units is bf16; Hetero
asks for fp32 unless bf16 is requested explicitly (`precision="bf16"`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import onnx
import openvino as ov

from hetero.errors import CompileError, RunError
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
}


def known_deviation(node: Node, model: Model) -> str | None:
    """Why OpenVINO's CPU plugin gives other numbers than the ONNX spec for this node, if it does.

    Found by running the ONNX backend test suite with OpenVINO first; such nodes are left to an
    executor that follows the spec.
    """
    op, attrs = node.op_type, node.attributes
    given = [bool(name) for name in node.inputs] + [False] * 8
    if op in _UNSUPPORTED_OPS:
        return _UNSUPPORTED_OPS[op]
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
    if op == "Resize" and _resize_deviates(node, model):
        return "antialiasing, cubic variants, aspect-ratio policies or align_corners downsampling differ"
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


class _Compiled(CompiledPartition):
    def __init__(self, compiled: ov.CompiledModel, part: onnx.ModelProto, name: str):
        self._compiled = compiled
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
            feeds = {port: _native(value) for port, value in zip(self._inputs, inputs, strict=True)
                     if port is not None}
            result = request.infer(feeds, share_inputs=True)
        except Exception as exc:
            raise RunError(f"{self._name} failed running partition {self._label!r}: {exc}") from exc
        return [result[o] for o in self._outputs]


class OpenVinoExecutor(Executor):
    library = "openvino"
    extra = "openvino"
    compiles_graphs = True
    _probes: ClassVar[ProbeAnswers] = ProbeAnswers(f"openvino={ov.get_version()}")
    # The CPU plugin computes f64 and f16 in f32, which is not ONNX's semantics for those types.
    exchange_dtypes = NUMPY_NATIVE_TYPES - {"double", "float16"}

    def __init__(self, device: Device = CPU, *, threads: int | None = None, stream: int | None = None,
                 precision: str = "fp32"):
        super().__init__(device, threads=threads, stream=stream)
        if precision not in _PRECISIONS:
            raise ValueError(f"openvino precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
        self.precision = precision

    @property
    def name(self) -> str:
        return super().name + ("" if self.precision == "fp32" else f"[{self.precision}]")

    def variant(self, *, threads: int | None = None, stream: int | None = None,
                precision: str | None = None) -> Executor:
        return type(self)(self.device, threads=threads or self.threads, stream=stream,
                          precision=precision or self.precision)

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls()] if "CPU" in core().available_devices else []

    def info(self) -> ExecutorInfo:
        device_name = core().get_property("CPU", "FULL_DEVICE_NAME")
        return ExecutorInfo(self.name, self.library, ov.get_version().split("-")[0], str(self.device),
                            str(device_name), self.threads, self.precision)

    def _config(self) -> dict[str, Any]:
        # A CPU stream is one of several compiled models sharing the cores: pinned, each would
        # put its threads on the same first cores; the OS spreads them when they are not.
        return {
            "INFERENCE_PRECISION_HINT": _PRECISIONS[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": self.stream is None,
        }

    def supports_op(self, node: Node, model: Model) -> bool:
        if node.domain not in ("", "ai.onnx", "ai.onnx.ml") or node.since_version is None:
            return False
        if known_deviation(node, model):
            return False
        def probe() -> bool:
            ov_model = read(model.extract([node]))
            placed = core().query_model(ov_model, "CPU")
            return all(op.get_friendly_name() in placed for op in ov_model.get_ops()
                       if op.get_type_name() not in _STRUCTURAL_OPS)

        return self._probes.ask(model.signature(node), probe)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        try:
            return _Compiled(core().compile_model(read(part), "CPU", self._config()), part, self.name)
        except Exception as exc:
            text = str(exc)
            culprits = tuple(n.name for n in part.graph.node
                             if n.name in text or any(o and f"{o}>" in text for o in n.output))
            message = f"{self.name} rejected partition {part.graph.name!r}: {text}"
            raise CompileError(message, culprits) from exc
