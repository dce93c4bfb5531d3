"""The executor interface: the whole of what a vendor plug-in writes.

An executor is one vendor library driving one device. It says which nodes it can run
(`supports`), compiles a partition (a standalone ONNX model) into something callable on its
device's arrays, and moves arrays between host memory and its device.
"""

from __future__ import annotations

import atexit
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import onnx

from hetero import kernels
from hetero.cache import JsonStore
from hetero.graph import Model, Node


@dataclass(frozen=True, order=True)
class Device:
    """A compute resource with one memory space: `cpu`, `cuda:0`, `opencl:1`."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> Device:
        kind, _, index = text.partition(":")
        if not kind or (index and not index.isdigit()):
            raise ValueError(f"device {text!r} is not of the form 'cpu', 'cuda:0', 'opencl:1'")
        return cls(kind, int(index or 0))


CPU = Device("cpu")


@dataclass(frozen=True)
class ExecutorInfo:
    """What `hetero devices` shows of an executor."""

    name: str
    library: str
    version: str
    device: str
    device_name: str
    threads: int
    precision: str


class CompiledPartition(ABC):
    """A partition compiled for one executor: call it with device arrays in `input_names` order."""

    input_names: Sequence[str]
    output_names: Sequence[str]

    @abstractmethod
    def __call__(self, inputs: Sequence[Any]) -> list[Any]: ...


class Executor(ABC):
    """One vendor library on one device.

    Subclasses set `library` (the import name users write, e.g. "onnxruntime"), `extra` (the
    pip extra that installs it) and, for kernels users write, `kernel_kind`. Executors on the
    host share the "cpu" memory space and exchange plain numpy arrays without copies.
    """

    library: ClassVar[str]
    extra: ClassVar[str]
    kernel_kind: ClassVar[str | None] = None
    #: Graph-compiling libraries fuse across nodes: the planner measures their partitions whole.
    compiles_graphs: ClassVar[bool] = False
    #: Element types the library's Python binding can take in and give back; None means any.
    #: A node reading or writing another type stays off this executor.
    exchange_dtypes: ClassVar[frozenset[str] | None] = None
    #: Computes what the ONNX spec says closely enough to stand as the truth when values are
    #: captured for planning (the exact numpy executor, ONNX Runtime): the fastest such one is used.
    exact: ClassVar[bool] = False
    #: Operator domains beyond ONNX's that the library implements (see `hetero.domains`), and
    #: the function typing their nodes' outputs (`hetero.domains.TypeFn`).
    vendor_domains: ClassVar[frozenset[str]] = frozenset()
    output_types: ClassVar[Callable[..., Sequence[onnx.ValueInfoProto | None]] | None] = None
    #: Precisions the library offers as variants (`openvino@cpu[bf16]`): reduced ones are used only
    #: where the user allows them (`allow_precision`) and the outputs stay within tolerance.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    precision: str = "fp32"

    def __init__(self, device: Device = CPU, *, threads: int | None = None, stream: int | None = None):
        self.device = device
        self.threads = threads or default_threads()
        self.stream = stream

    @property
    def engine(self) -> str:
        """The software half of the name: the library, and for a library with several back ends
        the one this executor uses (`onnxruntime/cuda`)."""
        return self.library

    @property
    def name(self) -> str:
        """`ENGINE@DEVICE[PRECISION]#STREAM`: `onnxruntime/cuda@cuda:0`, `openvino@cpu[bf16]`,
        `torch@cpu#1`."""
        return (f"{self.engine}@{self.device}" + ("" if self.precision == "fp32" else f"[{self.precision}]")
                + ("" if self.stream is None else f"#{self.stream}"))

    @property
    def memory_space(self) -> str:
        return str(self.device)

    @property
    def resource(self) -> str:
        """The compute this executor occupies while it runs: partitions on one resource take
        turns, partitions on different resources run at once. A CPU stream is its own resource."""
        return str(self.device) if self.stream is None else f"{self.device}#{self.stream}"

    def variant(self, *, threads: int | None = None, stream: int | None = None) -> Executor:
        """The same library and device with another thread budget or as a CPU stream."""
        return type(self)(self.device, threads=threads or self.threads, stream=stream)

    def __repr__(self) -> str:
        return f"<executor {self.name}>"

    @classmethod
    @abstractmethod
    def discover(cls) -> list[Executor]:
        """One executor per device this library can drive here; raises ImportError if absent."""

    @classmethod
    def missing(cls) -> list[str]:
        """What this library could drive on this host but does not, and why (hardware without the
        library's back end for it, a back end that is not a device); for `hetero devices`."""
        return []

    @abstractmethod
    def info(self) -> ExecutorInfo: ...

    def supports(self, node: Node, model: Model) -> bool:
        """Whether this executor can run `node` as it sits in `model` (dtypes, version, attrs)."""
        if self.kernel_kind and kernels.lookup(node.domain, node.op_type, self.kernel_kind):
            return True
        if self.exchange_dtypes is not None and not all(
                element_type(model, name) in self.exchange_dtypes
                for name in (*node.all_inputs, *node.outputs) if name):
            return False
        return self.supports_op(node, model)

    @abstractmethod
    def supports_op(self, node: Node, model: Model) -> bool:
        """Library capability for a standard (non-custom) node; ask the library where it can say."""

    def decline(self, node: Node, model: Model) -> str | None:
        """Why this executor does not run `node` (the dtype, version or attribute at fault), or
        None when it does. For error messages: call it only after `supports` said no."""
        if self.supports(node, model):
            return None
        if self.exchange_dtypes is not None:
            foreign = sorted({element_type(model, n) for n in (*node.all_inputs, *node.outputs) if n}
                             - self.exchange_dtypes)
            if foreign:
                return f"its binding does not exchange {', '.join(foreign)} tensors"
        return self.decline_op(node, model)

    def decline_op(self, node: Node, model: Model) -> str:
        """Why `supports_op` said no; libraries that can tell more override it."""
        types = sorted({element_type(model, n) for n in node.all_inputs if n})
        return (f"no kernel for {node.qualified_type}-{node.since_version} on "
                f"{', '.join(types) or 'these inputs'}")

    @abstractmethod
    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        """Compile a partition; raise `hetero.CompileError` naming nodes the library rejects."""

    def to_device(self, array: np.ndarray) -> Any:
        """Host array -> this executor's device array (identity on the host)."""
        return array

    def to_host(self, value: Any) -> np.ndarray:
        """This executor's device array -> host numpy array (identity on the host)."""
        return value

    def all_finite(self, value: Any) -> Any:
        """Whether a tensor this executor made holds no NaN or infinity (always true of integer,
        bool and string tensors), for the runtime's guard against wrong numbers: one reduction.
        Returns a bool, or a 0-d boolean that `bool()` reads later (a device library's, so the
        device is not waited for here), or None when the library cannot tell without copying the
        tensor to the host (the runtime then checks it when it reaches host memory)."""
        return host_all_finite(value) if isinstance(value, np.ndarray) else None

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """`value` from another device's memory straight into this one's (GPU to GPU), or None to
        go through host memory."""
        return None

    def adopt(self, value: Any) -> Any:
        """A device array another library made in this executor's memory space, as this library
        takes its inputs, without a copy (DLPack or the CUDA Array Interface). Called only once the
        producer has synchronized; on the host every library exchanges numpy arrays as they are."""
        return value

    def synchronize(self) -> None:  # noqa: B027 - a no-op on the host, devices override it
        """Wait until work queued on the device is done (for timing)."""


class ProbeAnswers:
    """A library's answers to "can you run this node?", by node signature: asking it means
    compiling the node alone, which is slow, and the answer holds for every instance. With a
    `namespace` (the library and its version) the yeses are also kept on disk, so a new process
    asks the library only what no earlier one could run; a no (perhaps a passing failure) is
    asked again by the next process."""

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        self._answers: dict[str, bool] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, namespace: str) -> ProbeAnswers:
        """The answers of one library version on one kind of device, shared by its executors
        (every device of that kind, every precision and thread variant)."""
        with _shared_lock:
            return _shared.setdefault(namespace, cls(namespace))

    def ask(self, key: str, probe: Callable[[], bool]) -> bool:
        """`probe()`'s answer for `key`, probing once; a probe that raises answers no."""
        with self._lock:
            if key in self._answers:
                return self._answers[key]
        ok = bool(self.namespace) and _stored_answers.get(f"{self.namespace}|{key}") is True
        if not ok:
            try:
                ok = bool(probe())
            except Exception:
                ok = False
            if ok and self.namespace:
                _stored_answers.put(f"{self.namespace}|{key}", True)
        with self._lock:
            self._answers[key] = ok
        return ok


_shared: dict[str, ProbeAnswers] = {}
_shared_lock = threading.Lock()
_stored_answers = JsonStore("capability")
atexit.register(_stored_answers.save)


def save_probe_answers() -> None:
    """Write the probe answers learnt so far to the cache (also done at exit)."""
    _stored_answers.save()


def host_all_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in a host array (always true of other than float and complex ones)."""
    return array.dtype.kind not in "fc" or bool(np.isfinite(array).all())


def default_threads() -> int:
    """Cores this process may use: the CPU budget every host executor shares."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def element_type(model: Model, name: str) -> str:
    """ONNX element type of a tensor ('float', 'bfloat16', ...), of a sequence's tensors, or '?'."""
    value_info = model.value_info(name)
    if value_info is None:
        return "?"
    type_proto = value_info.type
    while type_proto.HasField("sequence_type") or type_proto.HasField("optional_type"):
        type_proto = (type_proto.sequence_type.elem_type if type_proto.HasField("sequence_type")
                      else type_proto.optional_type.elem_type)
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.elem_type:
        return "?"
    return onnx.TensorProto.DataType.Name(type_proto.tensor_type.elem_type).lower()


def shrinks(node: Node, model: Model) -> bool:
    """The node's first output is smaller than its first input along some axis (or unknown)."""
    source, target = model.tensor(node.inputs[0]).shape, model.tensor(node.outputs[0]).shape
    if source is None or target is None:
        return True
    return any(not isinstance(a, int) or not isinstance(b, int) or b < a
               for a, b in zip(source, target, strict=False))


#: Element types numpy holds natively, which every vendor binding exchanges.
NUMPY_NATIVE_TYPES = frozenset({"float", "double", "float16", "int8", "int16", "int32", "int64", "uint8",
                                "uint16", "uint32", "uint64", "bool"})
