"""`tensorrt@cuda:N`: NVIDIA TensorRT directly, through its ONNX parser.

Each partition is parsed into a TensorRT network and built into an engine per shape profile (the
partition's input shapes: at compile time when they are all known, else at its first run with
each new set of shapes). Builds take seconds to minutes, so engines are kept on disk
(`$HETERO_CACHE_DIR/tensorrt/`), keyed by GPU model and compute capability, TensorRT version,
precision, partition and shapes; a build shows its progress on stderr.

Precision is fp32 (TF32 off where TensorRT has the switch). `tensorrt@cuda:0[fp16]` is the
explicit fp16 opt-in, used only where the user allows fp16 and the outputs stay within the
tolerance of the accuracy check (`allow_precision`): its partitions are converted to fp16 before
parsing (inputs and outputs stay fp32), as TensorRT 11 wants it: networks are strongly typed
(TensorRT 11 knows no other kind and has no FP16 builder flag; TensorRT 10 is asked for them too),
so each tensor keeps the partition's type. int8 is explicit quantization: QuantizeLinear /
DequantizeLinear nodes in the model itself, which TensorRT runs in int8 at any precision.

Capability is asked of the parser: a node is taken when the node alone parses. Tensors live in
`DeviceBuffer`s allocated with the CUDA runtime (cuda-python), which other libraries on the same
GPU read through the CUDA Array Interface without a copy; TensorRT in turn reads their arrays
(torch, CuPy, ONNX Runtime's OrtValues) by pointer.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import tensorrt as trt
from onnx import helper

from hetero.cache import cache_dir
from hetero.errors import CompileError, ExecutorUnavailableError, RunError
from hetero.executors import hardware
from hetero.executors.base import CompiledPartition, Device, Executor, ExecutorInfo, ProbeAnswers
from hetero.graph import Model, Node

try:
    from cuda.bindings import runtime as cudart
except ImportError:  # cuda-python before 12.6
    from cuda import cudart

_LOGGER = trt.Logger(trt.Logger.ERROR)
GPU0 = Device("cuda", 0)
#: Ops whose output shapes depend on the values computed (TensorRT needs an output allocator).
_DATA_DEPENDENT = {"NonZero", "NonMaxSuppression", "Unique"}
_EXCHANGE = frozenset({"float", "float16", "int8", "uint8", "int32", "int64", "bool"})
#: Networks keep the partition's types (TensorRT 11 knows no other kind; 10 is asked for it).
_STRONGLY_TYPED = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _check(result: Any) -> Any:
    """The value of a cuda-python call (`(error, value...)`), or RuntimeError naming the error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {cudart.cudaGetErrorName(error)[1].decode()}")
    return values[0] if len(values) == 1 else values


class DeviceBuffer:
    """A C-contiguous tensor in one GPU's memory, freed with its last reference. Other libraries
    read it in place through the CUDA Array Interface (`torch.as_tensor`, `cupy.asarray`, ONNX
    Runtime's I/O binding); it is complete when handed out (the engine's stream was synchronized)."""

    __slots__ = ("device", "dtype", "pointer", "shape")

    def __init__(self, shape: Sequence[int], dtype: np.dtype, device: int):
        self.shape, self.dtype, self.device = tuple(int(d) for d in shape), np.dtype(dtype), device
        _check(cudart.cudaSetDevice(device))
        self.pointer = int(_check(cudart.cudaMalloc(max(self.nbytes, 1))))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.pointer, False), "version": 3,
                "strides": None, "stream": None}

    def __del__(self) -> None:
        if getattr(self, "pointer", 0):
            cudart.cudaFree(self.pointer)

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self.dtype}{list(self.shape)} on cuda:{self.device}>"


def tensor_of(value: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and device pointer of a CUDA tensor of any library: a `DeviceBuffer`, anything
    with the CUDA Array Interface (torch, CuPy), or an ONNX Runtime OrtValue on a GPU."""
    if isinstance(value, DeviceBuffer):
        return value.shape, value.dtype, value.pointer
    if hasattr(value, "__cuda_array_interface__"):
        return hardware.cuda_array(value)
    if hasattr(value, "data_ptr") and hasattr(value, "element_type"):  # an OrtValue
        dtype = helper.tensor_dtype_to_np_dtype(value.element_type())
        return tuple(value.shape()), np.dtype(dtype), int(value.data_ptr())
    raise RunError(f"a {type(value).__name__} is not a tensor in GPU memory: a transfer is missing")


class _BuildProgress(trt.IProgressMonitor):
    """TensorRT's build phases on stderr (a build takes minutes): one updating line on a terminal,
    else a line per top-level phase."""

    def __init__(self, label: str):
        trt.IProgressMonitor.__init__(self)
        self._label = label
        self._phases: dict[str, tuple[int, int]] = {}
        self._tty = sys.stderr.isatty()
        self._lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases[phase_name] = (0, num_steps)
            if self._tty or parent_phase is None:
                self._show()

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            self._phases[phase_name] = (step + 1, self._phases.get(phase_name, (0, step + 1))[1])
            if self._tty:
                self._show()
        return True

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._phases.pop(phase_name, None)

    def finish(self) -> None:
        print(f"TensorRT: built {self._label}".ljust(100), file=sys.stderr, flush=True)

    def _show(self) -> None:
        steps = ", ".join(f"{name} {done}/{total}" for name, (done, total) in self._phases.items())
        print(f"TensorRT: building {self._label}: {steps}".ljust(100), end="\r" if self._tty else "\n",
              file=sys.stderr, flush=True)


class _Engine:
    """One built engine and, per thread, an execution context and a stream."""

    def __init__(self, serialized: bytes, device: int):
        _check(cudart.cudaSetDevice(device))
        self.engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise CompileError("TensorRT could not load an engine it built")
        self._local = threading.local()

    def context(self) -> tuple[Any, Any]:
        if getattr(self._local, "context", None) is None:
            self._local.context = self.engine.create_execution_context()
            self._local.stream = _check(cudart.cudaStreamCreate())
        return self._local.context, self._local.stream


class _Partition(CompiledPartition):
    def __init__(self, executor: TensorRTExecutor, part: onnx.ModelProto):
        self._executor = executor
        self._part = part
        self._label = part.graph.name
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]
        self._engines: dict[tuple, _Engine] = {}
        self._lock = threading.Lock()

    def engine(self, shapes: tuple[tuple[int, ...], ...]) -> _Engine:
        """The engine for these input shapes: in memory, on disk, or built now."""
        with self._lock:
            if shapes not in self._engines:
                serialized = self._executor.engine_bytes(self._part, dict(zip(self.input_names, shapes,
                                                                              strict=True)))
                self._engines[shapes] = _Engine(serialized, self._executor.device.index)
            return self._engines[shapes]

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        index = self._executor.device.index
        try:
            tensors = [tensor_of(value) for value in inputs]
            engine = self.engine(tuple(shape for shape, _, _ in tensors))
            context, stream = engine.context()
            _check(cudart.cudaSetDevice(index))
            for name, (shape, _, pointer) in zip(self.input_names, tensors, strict=True):
                context.set_input_shape(name, shape)
                context.set_tensor_address(name, pointer)
            outputs = []
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RunError(f"output {name!r} has a shape known only after the run")
                buffer = DeviceBuffer(shape, trt.nptype(engine.engine.get_tensor_dtype(name)), index)
                context.set_tensor_address(name, buffer.pointer)
                outputs.append(buffer)
            if not context.execute_async_v3(stream):
                raise RunError("TensorRT failed to enqueue the engine")
            _check(cudart.cudaStreamSynchronize(stream))
            return outputs
        except (RunError, CompileError) as exc:
            raise RunError(f"{self._executor.name} failed running partition {self._label!r}: {exc}") from exc
        except Exception as exc:
            raise RunError(f"{self._executor.name} failed running partition {self._label!r}: "
                           f"{type(exc).__name__}: {exc}") from exc


class TensorRTExecutor(Executor):
    """TensorRT on one NVIDIA GPU: an engine per partition and shape profile."""

    library = "tensorrt"
    extra = "tensorrt"
    accelerator = True
    compiles_graphs = True
    exchange_dtypes = _EXCHANGE
    precisions = ("fp32", "fp16")

    def __init__(self, device: Device = GPU0, *, threads: int | None = None,
                 stream: int | None = None, precision: str = "fp32", workspace_bytes: int | None = None):
        super().__init__(device, threads=threads or 1, stream=stream)
        if precision not in self.precisions:
            raise ExecutorUnavailableError(f"tensorrt offers precisions {', '.join(self.precisions)}, "
                                           f"not {precision!r}")
        self.precision = precision
        self.workspace_bytes = workspace_bytes
        gpus = {g.ordinal: g for g in hardware.cuda_devices()}
        if device.index not in gpus:
            raise ExecutorUnavailableError(f"tensorrt: the CUDA driver offers no {device}")
        self.gpu = gpus[device.index]
        major, minor = self.gpu.compute_capability
        self._probes = ProbeAnswers.shared(f"tensorrt={trt.__version__}/sm{major}{minor}")

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls(Device("cuda", g.ordinal)) for g in hardware.cuda_devices()]

    @classmethod
    def missing(cls) -> list[str]:
        if hardware.cuda_devices():
            return []
        return ["no GPU: the CUDA driver offers none here" + (" (nvidia-smi lists "
                f"{len(hardware.nvidia_smi_gpus())})" if hardware.nvidia_smi_gpus() else "")]

    def variant(self, *, threads: int | None = None, stream: int | None = None,
                precision: str | None = None) -> Executor:
        return type(self)(self.device, threads=threads or self.threads, stream=stream,
                          precision=precision or self.precision, workspace_bytes=self.workspace_bytes)

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.library, trt.__version__, str(self.device), self.gpu.name, 1,
                            self.precision)

    def supports_op(self, node: Node, model: Model) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in _DATA_DEPENDENT:
            return False
        return self._probes.ask(model.signature(node), lambda: not _parse(model.extract([node]))[1])

    def decline_op(self, node: Node, model: Model) -> str:
        if node.op_type in _DATA_DEPENDENT:
            return "its output shape depends on the values it computes"
        if node.domain not in ("", "ai.onnx"):
            return f"TensorRT's ONNX parser does not read domain {node.domain!r}"
        errors = _parse(model.extract([node]))[1]
        return f"TensorRT's ONNX parser rejects it: {'; '.join(e for _, e in errors) or 'no reason given'}"

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        prepared = self._prepared(part)
        errors = _parse(prepared)[1]
        if errors:
            culprits = tuple(name for name, _ in errors if name)
            raise CompileError(f"{self.name} rejected partition {part.graph.name!r}: "
                               f"{'; '.join(e for _, e in errors)}", culprits)
        compiled = _Partition(self, prepared)
        shapes = [[d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                  for i in prepared.graph.input]
        if all(None not in s for s in shapes):  # all shapes known: build (or load) now
            try:
                compiled.engine(tuple(tuple(s) for s in shapes))
            except CompileError as exc:
                raise CompileError(f"{self.name} rejected partition {part.graph.name!r}: {exc}") from exc
        return compiled

    def _prepared(self, part: onnx.ModelProto) -> onnx.ModelProto:
        """The partition as TensorRT gets it: converted to fp16 for the fp16 variant."""
        if self.precision == "fp32":
            return part
        from onnxconverter_common import float16

        return float16.convert_float_to_float16(part, keep_io_types=True, disable_shape_infer=True)

    def engine_bytes(self, part: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bytes:
        """The serialized engine for a partition at these input shapes, from disk or built (and
        then written to disk)."""
        unnamed = onnx.ModelProto()
        unnamed.CopyFrom(part)
        unnamed.graph.name = ""  # the same work in another plan is the same engine
        key = hashlib.sha256()
        for item in (self.gpu.name, self.gpu.compute_capability, trt.__version__, self.precision,
                     self.workspace_bytes, sorted(shapes.items())):
            key.update(repr(item).encode())
        key.update(unnamed.SerializeToString(deterministic=True))
        path = cache_dir() / "tensorrt" / f"{key.hexdigest()}.engine"
        if path.exists():
            return path.read_bytes()
        serialized = self._build(part, shapes)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".engine.")
        with os.fdopen(handle, "wb") as file:
            file.write(serialized)
        os.replace(temp, path)
        return serialized

    def _build(self, part: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bytes:
        _check(cudart.cudaSetDevice(self.device.index))
        builder = trt.Builder(_LOGGER)
        network, _parser, errors = _parse(part, builder)  # the parser owns the weights: keep it
        if errors:
            raise CompileError("; ".join(e for _, e in errors), tuple(n for n, _ in errors if n))
        config = builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = shapes[tensor.name]
            if tensor.is_shape_tensor:
                raise CompileError(f"input {tensor.name!r} is a shape tensor: its values would need a "
                                   "profile")
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
        progress = _BuildProgress(f"{part.graph.name!r} ({len(part.graph.node)} nodes) for {self.gpu.name}")
        config.progress_monitor = progress
        serialized = builder.build_serialized_network(network, config)
        progress.finish()
        if serialized is None:
            raise CompileError("TensorRT could not build an engine for it (see its log above)")
        return bytes(serialized)

    def to_device(self, array: np.ndarray) -> DeviceBuffer:
        array = np.asarray(array, order="C")
        buffer = DeviceBuffer(array.shape, array.dtype, self.device.index)
        _check(cudart.cudaMemcpy(buffer.pointer, array.ctypes.data, array.nbytes,
                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
        return buffer

    def to_host(self, value: Any) -> np.ndarray:
        shape, dtype, pointer = tensor_of(value)
        array = np.empty(shape, dtype)
        _check(cudart.cudaSetDevice(self.device.index))
        _check(cudart.cudaMemcpy(array.ctypes.data, pointer, array.nbytes,
                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return array

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """GPU to GPU without the host (a peer copy where the GPUs allow, else the driver stages it)."""
        if not source.memory_space.startswith("cuda:"):
            return None
        shape, dtype, pointer = tensor_of(value)
        buffer = DeviceBuffer(shape, dtype, self.device.index)
        _check(cudart.cudaMemcpyPeer(buffer.pointer, self.device.index, pointer, source.device.index,
                                     buffer.nbytes))
        return buffer

    def synchronize(self) -> None:
        """Every call ends with its stream synchronized; this waits for the device too (timing)."""
        _check(cudart.cudaSetDevice(self.device.index))
        _check(cudart.cudaDeviceSynchronize())


def _parse(part: onnx.ModelProto, builder: Any = None) -> tuple[Any, Any, list[tuple[str, str]]]:
    """Parse a partition into a TensorRT network: (network, parser, [(node name, error)...]); the
    error list is empty when TensorRT reads the whole partition."""
    builder = builder or trt.Builder(_LOGGER)
    network = builder.create_network(_STRONGLY_TYPED)
    parser = trt.OnnxParser(network, _LOGGER)
    if parser.parse(part.SerializeToString()):
        return network, parser, []
    errors = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        index = error.node()
        name = part.graph.node[index].name if 0 <= index < len(part.graph.node) else ""
        errors.append((name, " ".join(str(error.desc()).split())[:300]))
    return network, parser, errors or [("", "the parser gave no reason")]

