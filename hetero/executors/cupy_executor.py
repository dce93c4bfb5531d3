"""`cupy@cuda:N`: NVIDIA GPUs through CuPy — cuBLAS GEMMs (convolutions as one batched GEMM),
CuPy's elementwise and reduction kernels, and users' CUDA RawKernels for custom ops.

The interpreter below is written against numpy's array API (`xp`), so the very code that runs
on a GPU with `xp=cupy` runs on the host with `xp=numpy`: `CupyExecutor.on_host()` is that
twin, and CI checks every op this executor claims through it against the ONNX backend suite.
What differs on a GPU is only the device context, pinned host buffers for transfers, peer copies
between GPUs, and RawKernel launches.

Custom CUDA kernels (`hetero.kernel(domain, op, executor="cuda", source=..., entry=..., infer=...)`)
launch like the OpenCL ones: `entry` gets the input arrays, the output arrays, the attributes
named in the `attributes=[...]` option, then the element count of the first output (long long);
one thread per element, 256 per block. `fn=launch(inputs, **attributes)` replaces the default
launch for anything else.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hetero import kernels
from hetero.errors import CompileError, RunError
from hetero.executors.array_kernels import average_pool, conv, max_pool
from hetero.executors.base import CompiledPartition, Device, Executor, ExecutorInfo
from hetero.graph import Model, Node

Kernel = Callable[..., tuple]
GPU0 = Device("cuda", 0)
_FLOAT = frozenset({"float"})


def _attr(node: onnx.NodeProto | Node, name: str, default: Any = None) -> Any:
    proto = node.proto if isinstance(node, Node) else node
    for attribute in proto.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


Builder = Callable[[ModuleType, onnx.NodeProto], Kernel]


def _unary(fn: Callable[[ModuleType, Any, onnx.NodeProto], Any]) -> Builder:
    return lambda xp, node: lambda x: (fn(xp, x, node),)


def _binary(name: str) -> Builder:
    return lambda xp, node: lambda a, b: (getattr(xp, name)(a, b).astype(a.dtype, copy=False),)


def _variadic(name: str) -> Builder:
    def build(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
        def run(*xs: Any) -> tuple:
            result = xs[0]
            for x in xs[1:]:
                result = getattr(xp, name)(result, x)
            return (result,)
        return run
    return build


def _sigmoid(xp: ModuleType, x: Any, node: onnx.NodeProto) -> Any:
    return (1 / (1 + xp.exp(-x))).astype(x.dtype, copy=False)


def _gemm(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)

    def run(a: Any, b: Any, c: Any = None) -> tuple:
        y = xp.matmul(a.T if trans_a else a, b.T if trans_b else b)
        if alpha != 1.0:
            y *= alpha
        if c is not None:
            y += c * beta if beta != 1.0 else c
        return (y,)
    return run


def _conv(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    options = {k: _attr(node, k) for k in ("auto_pad", "dilations", "kernel_shape", "pads", "strides")}
    options["auto_pad"] = (options["auto_pad"] or b"NOTSET").decode()
    group = _attr(node, "group", 1)
    return lambda x, w, b=None: (conv(x, w, b, group=group, **options).astype(x.dtype, copy=False),)


def _pool(kind: str) -> Builder:
    def build(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
        options = {k: _attr(node, k) for k in ("kernel_shape", "strides", "pads", "dilations", "ceil_mode")}
        options["auto_pad"] = (_attr(node, "auto_pad") or b"NOTSET").decode()
        if kind == "max":
            return lambda x: (max_pool(x, **options).astype(x.dtype, copy=False),)
        include = _attr(node, "count_include_pad", 0)
        return lambda x: (average_pool(x, count_include_pad=include, **options).astype(x.dtype, copy=False),)
    return build


def _global(name: str) -> Builder:
    return lambda xp, node: lambda x: (getattr(x, name)(axis=tuple(range(2, x.ndim)), keepdims=True),)


def _batch_norm(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    epsilon = _attr(node, "epsilon", 1e-5)

    def run(x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> tuple:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        factor = (scale / xp.sqrt(var + epsilon)).reshape(shape)
        return ((x - mean.reshape(shape)) * factor + bias.reshape(shape)).astype(x.dtype, copy=False),
    return run


def _softmax(log: bool) -> Builder:
    def build(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
        axis = _attr(node, "axis", -1)

        def run(x: Any) -> tuple:
            shifted = x - x.max(axis=axis, keepdims=True)
            total = xp.exp(shifted).sum(axis=axis, keepdims=True)
            return ((shifted - xp.log(total)) if log else (xp.exp(shifted) / total),)
        return run
    return build


def _concat(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    axis = _attr(node, "axis")
    return lambda *xs: (xp.concatenate(xs, axis=axis),)


def _transpose(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    perm = _attr(node, "perm")
    return lambda x: (xp.ascontiguousarray(xp.transpose(x, perm)),)


def _flatten(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    axis = _attr(node, "axis", 1)

    def run(x: Any) -> tuple:
        cut = axis % x.ndim if axis else 0
        return (x.reshape(math.prod(x.shape[:cut]), -1),)
    return run


# Ops whose second input is a shape-like constant read at compile time (see `_constant_input`).
def _reshape(xp: ModuleType, node: onnx.NodeProto, shape: np.ndarray) -> Kernel:
    allow_zero = _attr(node, "allowzero", 0)

    def run(x: Any, _: Any = None) -> tuple:
        target = [x.shape[i] if d == 0 and not allow_zero else int(d) for i, d in enumerate(shape)]
        return (x.reshape(target),)
    return run


def _squeeze(xp: ModuleType, node: onnx.NodeProto, axes: np.ndarray | None) -> Kernel:
    def run(x: Any, _: Any = None) -> tuple:
        chosen = tuple(int(a) % x.ndim for a in axes) if axes is not None else \
            tuple(i for i, d in enumerate(x.shape) if d == 1)
        return (xp.squeeze(x, axis=chosen),)
    return run


def _unsqueeze(xp: ModuleType, node: onnx.NodeProto, axes: np.ndarray) -> Kernel:
    def run(x: Any, _: Any = None) -> tuple:
        rank = x.ndim + len(axes)
        shape = iter(x.shape)
        wanted = {int(a) % rank for a in axes}
        return (x.reshape([1 if i in wanted else next(shape) for i in range(rank)]),)
    return run


def _pad(xp: ModuleType, node: onnx.NodeProto, pads: np.ndarray) -> Kernel:
    def run(x: Any, _: Any = None, value: Any = None) -> tuple:
        half = len(pads) // 2
        widths = [(int(pads[i]), int(pads[i + half])) for i in range(half)]
        fill = float(value.item()) if value is not None and getattr(value, "size", 0) else 0.0
        return (xp.pad(x, widths, constant_values=fill),)
    return run


def _clip(xp: ModuleType, node: onnx.NodeProto) -> Kernel:
    def run(x: Any, low: Any = None, high: Any = None) -> tuple:
        if low is not None:
            x = xp.maximum(x, low.astype(x.dtype))
        if high is not None:
            x = xp.minimum(x, high.astype(x.dtype))
        return (x,)
    return run


_UNARY = {
    "Relu": lambda xp, x, n: xp.maximum(x, x.dtype.type(0)),
    "LeakyRelu": lambda xp, x, n: xp.where(x >= 0, x, x * x.dtype.type(_attr(n, "alpha", 0.01))),
    "Sigmoid": _sigmoid,
    "Tanh": lambda xp, x, n: xp.tanh(x),
    "Exp": lambda xp, x, n: xp.exp(x),
    "Log": lambda xp, x, n: xp.log(x),
    "Sqrt": lambda xp, x, n: xp.sqrt(x),
    "Neg": lambda xp, x, n: -x,
    "Abs": lambda xp, x, n: xp.abs(x),
    "Reciprocal": lambda xp, x, n: (1 / x).astype(x.dtype, copy=False),
    "Floor": lambda xp, x, n: xp.floor(x),
    "Ceil": lambda xp, x, n: xp.ceil(x),
    "Identity": lambda xp, x, n: x,
    "HardSigmoid": lambda xp, x, n: xp.clip(x * x.dtype.type(_attr(n, "alpha", 0.2))
                                            + x.dtype.type(_attr(n, "beta", 0.5)), 0, 1),
    "HardSwish": lambda xp, x, n: x * xp.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1),
}

# op type -> (builder, lowest opset version whose semantics the builder follows)
_OPS: dict[str, tuple[Builder, int]] = {
    **{op: (_unary(fn), 6) for op, fn in _UNARY.items()},
    "Add": (_binary("add"), 7), "Sub": (_binary("subtract"), 7), "Mul": (_binary("multiply"), 7),
    "Div": (_binary("divide"), 7), "Pow": (_binary("power"), 7),
    "Max": (_variadic("maximum"), 8), "Min": (_variadic("minimum"), 8), "Sum": (_variadic("add"), 8),
    "MatMul": (lambda xp, node: lambda a, b: (xp.matmul(a, b),), 9), "Gemm": (_gemm, 11),
    "Conv": (_conv, 11), "MaxPool": (_pool("max"), 12), "AveragePool": (_pool("average"), 11),
    "GlobalAveragePool": (_global("mean"), 1), "GlobalMaxPool": (_global("max"), 1),
    "BatchNormalization": (_batch_norm, 15), "Softmax": (_softmax(False), 13),
    "LogSoftmax": (_softmax(True), 13), "Concat": (_concat, 11), "Transpose": (_transpose, 1),
    "Flatten": (_flatten, 11), "Clip": (_clip, 11),
}
# op type -> (builder taking the constant input at `index`, index, lowest opset version handled)
_SHAPED: dict[str, tuple[Callable, int, int]] = {
    "Reshape": (_reshape, 1, 14), "Squeeze": (_squeeze, 1, 13), "Unsqueeze": (_unsqueeze, 1, 13),
    "Pad": (_pad, 1, 13),
}


class _Interpreted(CompiledPartition):
    def __init__(self, executor: CupyExecutor, part: onnx.ModelProto,
                 steps: list[tuple[Kernel, list[str], list[str], str]], constants: dict[str, Any]):
        self._executor = executor
        self._steps = steps
        self._constants = constants
        self._label = part.graph.name
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        values = dict(self._constants)
        values.update(zip(self.input_names, inputs, strict=True))
        with self._executor.context():
            for kernel, ins, outs, name in self._steps:
                try:
                    results = kernel(*(values[n] if n else None for n in ins))
                except Exception as exc:
                    raise RunError(f"{self._executor.name} failed on node {name!r} of partition "
                                   f"{self._label!r}: {exc}") from exc
                values.update(zip(outs, results, strict=False))
            # numpy turns 0-d results into scalars where CuPy keeps arrays: the host twin's
            # outputs are arrays as the GPU's are.
            return [self._executor.xp.asarray(values[n]) for n in self.output_names]


class CupyExecutor(Executor):
    library = "cupy"
    extra = "cuda"
    accelerator = True
    exchange_dtypes = frozenset({"float", "int64", "int32", "bool"})

    def __init__(self, device: Device = GPU0, *, threads: int | None = None,
                 stream: int | None = None, xp: ModuleType | None = None):
        super().__init__(device, threads=threads or 1, stream=stream)
        if xp is None:
            import cupy as xp
        self.xp = xp
        self.on_gpu = xp.__name__ == "cupy"
        self.kernel_kind = "cuda" if self.on_gpu else None
        self._pinned: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def on_host(cls) -> CupyExecutor:
        """The same interpreter on numpy arrays: what CI runs to check this executor's claims."""
        executor = cls(Device("cpu"), xp=np)
        executor.accelerator = False
        return executor

    @classmethod
    def discover(cls) -> list[Executor]:
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            return []
        return [cls(Device("cuda", i)) for i in range(count)]

    def info(self) -> ExecutorInfo:
        if not self.on_gpu:
            return ExecutorInfo(self.name, self.library, "numpy " + np.__version__, "cpu",
                                "host (numpy twin of the CuPy interpreter)", 1, "fp32")
        properties = self.xp.cuda.runtime.getDeviceProperties(self.device.index)
        return ExecutorInfo(self.name, self.library, self.xp.__version__, str(self.device),
                            properties["name"].decode(), properties["multiProcessorCount"], "fp32")

    def context(self) -> contextlib.AbstractContextManager:
        return self.xp.cuda.Device(self.device.index) if self.on_gpu else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.on_gpu:
            with self.context():
                self.xp.cuda.Stream.null.synchronize()

    @contextlib.contextmanager
    def _staged(self, dtype: np.dtype, shape: tuple) -> Iterator[np.ndarray]:
        """A pinned host buffer (DMA needs page-locked memory) viewed as `dtype[shape]`, held by
        this copy alone: buffers are reused through free lists, one taken per copy in flight."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = 1 << max(nbytes - 1, 1).bit_length()
        with self._lock:
            free = self._pinned.setdefault(size, [])
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = np.frombuffer(self.xp.cuda.alloc_pinned_memory(size), np.uint8, size)
        try:
            yield buffer[:nbytes].view(dtype).reshape(shape)
        finally:
            with self._lock:
                self._pinned[size].append(buffer)

    def to_device(self, array: np.ndarray) -> Any:
        """Host -> GPU through a pinned buffer (`set` without a stream returns once copied)."""
        if not self.on_gpu:
            return array
        array = np.asarray(array)
        with self._staged(array.dtype, array.shape) as staged, self.context():
            staged[...] = array
            value = self.xp.empty(array.shape, array.dtype)
            value.set(staged)
        return value

    def to_host(self, value: Any) -> np.ndarray:
        """GPU -> host through a pinned buffer, copied out before the buffer is reused."""
        if not self.on_gpu:
            return value
        with self._staged(value.dtype, value.shape) as staged, self.context():
            value.get(out=staged)
            return staged.copy()

    def all_finite(self, value: Any) -> Any:
        """One reduction on the GPU, read (waiting for the GPU) when it is needed."""
        if not (self.on_gpu and isinstance(value, self.xp.ndarray)):
            return super().all_finite(value)
        if value.dtype.kind not in "fc":
            return True
        with self.context():
            return self.xp.isfinite(value).all()

    def adopt(self, value: Any) -> Any:
        """Another library's tensor on this GPU as a CuPy array over the same memory (DLPack, else
        the CUDA Array Interface)."""
        if not self.on_gpu or isinstance(value, self.xp.ndarray):
            return value
        with self.context():
            return self.xp.from_dlpack(value) if hasattr(value, "__dlpack__") else self.xp.asarray(value)

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """GPU to GPU without the host from any CUDA library (peer copy where the hardware allows,
        CuPy stages it otherwise)."""
        if not (self.on_gpu and source.memory_space.startswith("cuda:")):
            return None
        with self.context():
            return self.xp.array(self.adopt(value), copy=True)

    def supports_op(self, node: Node, model: Model) -> bool:
        if node.domain != "" or node.since_version is None:
            return False
        floats = bool(node.inputs) and all(model.tensor(n).dtype == np.float32
                                           for n in (node.inputs[0], *node.outputs) if n)
        if node.op_type in _OPS:
            _, lowest = _OPS[node.op_type]
            extra_outputs = len([o for o in node.outputs if o]) > 1
            return floats and node.since_version >= lowest and not extra_outputs and _attributes_ok(node)
        if node.op_type in _SHAPED:
            _, index, lowest = _SHAPED[node.op_type]
            constant = len(node.inputs) <= index or not node.inputs[index] or model.is_initializer(
                node.inputs[index])
            mode_ok = node.op_type != "Pad" or _attr(node, "mode", b"constant") == b"constant"
            return floats and node.since_version >= lowest and constant and mode_ok
        return False

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        host = {t.name: numpy_helper.to_array(t) for t in part.graph.initializer}
        with self.context():
            constants = {name: self.xp.asarray(value) for name, value in host.items()}
        steps = []
        for node in part.graph.node:
            try:
                steps.append((self._kernel(node, host), list(node.input), list(node.output), node.name))
            except Exception as exc:
                message = f"{self.name} cannot build node {node.name!r}: {exc}"
                raise CompileError(message, (node.name,)) from exc
        return _Interpreted(self, part, steps, constants)

    def _kernel(self, node: onnx.NodeProto, host: dict[str, np.ndarray]) -> Kernel:
        spec = kernels.lookup(node.domain, node.op_type, "cuda") if self.on_gpu else None
        if spec is not None:
            return self._custom(node, spec)
        if node.op_type in _SHAPED:
            builder, index, _ = _SHAPED[node.op_type]
            given = len(node.input) > index and node.input[index]
            return builder(self.xp, node, host[node.input[index]] if given else None)
        return _OPS[node.op_type][0](self.xp, node)

    def _custom(self, node: onnx.NodeProto, spec: kernels.Kernel) -> Kernel:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if spec.fn is not None:
            return lambda *inputs: _as_tuple(spec.fn(*inputs, **attributes))
        if spec.infer is None:
            raise CompileError(f"CUDA kernel {spec.domain}::{spec.op_type} needs infer= (or fn=) to size "
                               "its outputs", (node.name,))
        kernel = self.xp.RawKernel(spec.source, spec.entry or spec.op_type)
        scalars = [_scalar(attributes[a]) for a in spec.options.get("attributes", ())]

        def launch(*inputs: Any) -> tuple:
            shapes = spec.infer([i.dtype for i in inputs], [i.shape for i in inputs], attributes)
            outputs = [self.xp.empty(tuple(shape), dtype) for dtype, shape in shapes]
            count = outputs[0].size
            kernel(((count + 255) // 256,), (256,), (*inputs, *outputs, *scalars, np.int64(count)))
            return tuple(outputs)
        return launch


def _attributes_ok(node: Node) -> bool:
    """Attributes the interpreter follows exactly; anything else is left to other executors."""
    attrs = node.attributes
    if node.op_type in ("MaxPool", "AveragePool"):
        return len(attrs.get("kernel_shape", ())) in (1, 2, 3) and attrs.get("storage_order", 0) == 0
    if node.op_type == "Conv":
        return len(attrs.get("kernel_shape", (0, 0))) in (1, 2, 3)
    return True


def _as_tuple(result: Any) -> tuple:
    return tuple(result) if isinstance(result, tuple | list) else (result,)


def _scalar(value: Any) -> np.generic:
    return np.float32(value) if isinstance(value, float) else np.int32(value)
