"""`torch@cpu` and `torch@cuda:N`: PyTorch's ATen kernels, one call per ONNX node.

A node-by-node interpreter, not a graph compiler: each partition becomes a list of torch calls
from an op table, run under `torch.inference_mode()`, with initializers converted to tensors on
the executor's device once. The same class drives the host (whose memory it shares with numpy,
so partitions there take and give numpy arrays without copies) and every CUDA device.

The table only holds what torch computes with ONNX's own semantics; where an attribute or
version asks for something torch does differently (ceil-mode pooling with asymmetric pads, even
LRN windows, ...), `supports_op` refuses the node and another executor runs it. Resize and the
non-constant Pad modes gather with index tables computed as `onnx.reference` computes them,
since `F.interpolate` and `F.pad` round coordinates and clamp pads their own way.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from hetero.errors import CompileError, RunError
from hetero.executors.base import CPU, CompiledPartition, Device, Executor, ExecutorInfo, element_type
from hetero.graph import Model, Node

_TORCH_TYPES = {"float": torch.float32, "double": torch.float64, "float16": torch.float16,
                "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
                "uint8": torch.uint8, "bool": torch.bool}
_INTS = frozenset({"int8", "int16", "int32", "int64", "uint8"})
_FLOATS = frozenset({"float", "double", "float16"})
#: Convolutions, matrix products, pooling, normalisation, sums and composite activations: torch
#: accumulates fp16 in fp32 while ONNX references round every step to fp16, and the results
#: differ by more than fp16 tolerances, so these claim fp32 and fp64 only.
_WIDE = frozenset({"float", "double"})
_NUMBERS = _FLOATS | _INTS
_ANY = _NUMBERS | {"bool"}
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}

Kernel = Callable[..., Any]
_fp32 = {"users": 0, "saved": ("", "")}
_fp32_lock = threading.Lock()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 means fp32 on CUDA while Hetero's partitions run: cuDNN convolutions default to TF32
    tensor cores (10-bit mantissa), and a user may have allowed TF32 matmuls. Torch's switch is
    process-wide, so it is set only while at least one CUDA partition launches its kernels, and
    the user's setting comes back after the last one (code running torch on other threads
    meanwhile sees it too)."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    with _fp32_lock:
        if _fp32["users"] == 0:
            _fp32["saved"] = (conv.fp32_precision, matmul.fp32_precision)
            conv.fp32_precision = matmul.fp32_precision = "ieee"
        _fp32["users"] += 1
    try:
        yield
    finally:
        with _fp32_lock:
            _fp32["users"] -= 1
            if _fp32["users"] == 0:
                conv.fp32_precision, matmul.fp32_precision = _fp32["saved"]


@dataclass(frozen=True)
class _Op:
    """One table entry: `build(node)` returns the kernel called with the node's input tensors.

    `since` is the oldest op version whose semantics `build` follows; `dtypes` the element
    types of the first input it handles; `check` refuses attribute combinations it does not.
    """

    build: Callable[[Node], Kernel]
    dtypes: frozenset[str]
    since: int = 1
    check: Callable[[Node, Model], bool] | None = None


_OPS: dict[str, _Op] = {}


def _op(*names: str, dtypes: frozenset[str] = _ANY, since: int = 1,
        check: Callable[[Node, Model], bool] | None = None) -> Callable:
    def register(build: Callable[[Node], Kernel]) -> Callable[[Node], Kernel]:
        for name in names:
            _OPS[name] = _Op(build, dtypes, since, check)
        return build
    return register


def _attr(node: Node, name: str, default: Any = None) -> Any:
    value = node.attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _ints(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _rank(model: Model, name: str) -> int | None:
    shape = model.tensor(name).shape
    return None if shape is None else len(shape)


def _given(node: Node, index: int) -> bool:
    return len(node.inputs) > index and bool(node.inputs[index])


def _wants(node: Node, index: int) -> bool:
    return len(node.outputs) > index and bool(node.outputs[index])


# Element-wise ------------------------------------------------------------------------------------

def _simple(names_to_fns: dict[str, Kernel], dtypes: frozenset[str], since: int = 1) -> None:
    for name, fn in names_to_fns.items():
        _op(name, dtypes=dtypes, since=since)(lambda node, fn=fn: fn)


_simple({"Sqrt": torch.sqrt, "Exp": torch.exp, "Log": torch.log, "Reciprocal": torch.reciprocal,
         "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Floor": torch.floor, "Ceil": torch.ceil,
         "Softsign": F.softsign}, _FLOATS, since=6)
_simple({"Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
         "Atan": torch.atan}, _FLOATS, since=7)
_simple({"Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
         "Atanh": torch.atanh, "Erf": torch.erf, "IsNaN": torch.isnan}, _FLOATS, since=9)
_simple({"Round": torch.round}, _FLOATS, since=11)  # half to even, as ONNX
_simple({"Abs": torch.abs, "Relu": torch.relu}, _NUMBERS, since=6)
_simple({"Neg": torch.neg}, _NUMBERS - {"uint8"}, since=6)
_simple({"Sign": torch.sign}, _NUMBERS, since=9)
_simple({"Not": torch.logical_not}, frozenset({"bool"}))
_simple({"And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor}, frozenset({"bool"}),
        since=7)
_simple({"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
         "BitwiseNot": torch.bitwise_not}, _INTS, since=18)
_simple({"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}, _NUMBERS, since=7)
_simple({"Equal": torch.eq}, _ANY, since=7)
_simple({"Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge},
        _NUMBERS, since=7)
_simple({"Where": torch.where}, frozenset({"bool"}), since=9)
_simple({"PRelu": lambda x, slope: torch.where(x < 0, x * slope, x)}, _NUMBERS, since=7)


@_op("Div", dtypes=_NUMBERS, since=7)
def _div(node: Node) -> Kernel:
    """Integer division truncates toward zero in ONNX, as in C."""
    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.div(a, b, rounding_mode=None if a.is_floating_point() else "trunc")
    return run


@_op("Pow", dtypes=_NUMBERS, since=7)
def _pow(node: Node) -> Kernel:
    """The result has the base's type whatever the exponent's (torch would promote)."""
    return lambda a, b: torch.pow(a, b).to(a.dtype)


def _mod_check(node: Node, model: Model) -> bool:
    return bool(_attr(node, "fmod", 0)) or element_type(model, node.inputs[0]) in _INTS


@_op("Mod", dtypes=_NUMBERS, since=10, check=_mod_check)
def _mod(node: Node) -> Kernel:
    return torch.fmod if _attr(node, "fmod", 0) else torch.remainder


def _fold(fn: Kernel) -> Callable[[Node], Kernel]:
    def build(node: Node) -> Kernel:
        def run(*xs: torch.Tensor) -> torch.Tensor:
            result = xs[0]
            for x in xs[1:]:
                result = fn(result, x)
            return result
        return run
    return build


_op("Max", "Min", dtypes=_NUMBERS, since=8)(lambda node: _fold(
    torch.maximum if node.op_type == "Max" else torch.minimum)(node))
_op("Sum", dtypes=_FLOATS, since=8)(_fold(torch.add))


@_op("Mean", dtypes=_FLOATS, since=8)
def _mean(node: Node) -> Kernel:
    add = _fold(torch.add)(node)
    return lambda *xs: add(*xs) / len(xs)


@_op("LeakyRelu", dtypes=_FLOATS, since=6)
def _leaky_relu(node: Node) -> Kernel:
    alpha = _attr(node, "alpha", 0.01)
    return lambda x: F.leaky_relu(x, alpha)


@_op("Elu", dtypes=_FLOATS, since=6)
def _elu(node: Node) -> Kernel:
    alpha = _attr(node, "alpha", 1.0)
    return lambda x: F.elu(x, alpha)


@_op("Celu", dtypes=_FLOATS, since=12)
def _celu(node: Node) -> Kernel:
    alpha = _attr(node, "alpha", 1.0)
    return lambda x: F.celu(x, alpha)


@_op("Selu", dtypes=_FLOATS, since=6)
def _selu(node: Node) -> Kernel:
    alpha = _attr(node, "alpha", 1.67326319217681884765625)
    gamma = _attr(node, "gamma", 1.05070102214813232421875)
    return lambda x: torch.where(x > 0, gamma * x, gamma * (alpha * torch.exp(x) - alpha))


@_op("HardSigmoid", dtypes=_FLOATS, since=6)
def _hard_sigmoid(node: Node) -> Kernel:
    alpha, beta = _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5)
    return lambda x: torch.clamp(x * alpha + beta, 0, 1)


@_op("HardSwish", dtypes=_FLOATS, since=14)
def _hard_swish(node: Node) -> Kernel:
    """ONNX's x * clamp(x/6 + 1/2), not torch's x * relu6(x + 3) / 6, which rounds otherwise."""
    return lambda x: x * torch.clamp(x * (1 / 6) + 0.5, 0, 1)


@_op("Softplus", dtypes=_WIDE)
def _softplus(node: Node) -> Kernel:
    """log(exp(x) + 1) without overflowing for x beyond 88 (float32)."""
    return lambda x: torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


@_op("Mish", dtypes=_WIDE, since=18)
def _mish(node: Node) -> Kernel:
    return lambda x: x * torch.tanh(torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device)))


@_op("ThresholdedRelu", dtypes=_FLOATS, since=10)
def _thresholded_relu(node: Node) -> Kernel:
    alpha = _attr(node, "alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, 0).to(x.dtype)


@_op("Shrink", dtypes=_NUMBERS, since=9)
def _shrink(node: Node) -> Kernel:
    bias, lambd = _attr(node, "bias", 0.0), _attr(node, "lambd", 0.5)

    def run(x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)
    return run


@_op("Gelu", dtypes=_WIDE, since=20, check=lambda node, model: _attr(node, "approximate", "none")
     in ("none", "tanh"))
def _gelu(node: Node) -> Kernel:
    approximate = _attr(node, "approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


@_op("Clip", dtypes=_NUMBERS, since=6)
def _clip(node: Node) -> Kernel:
    bounds = (_attr(node, "min"), _attr(node, "max")) if node.since_version < 11 else None

    def run(x: torch.Tensor, low: Any = None, high: Any = None) -> torch.Tensor:
        low, high = bounds or (low, high)
        return x if low is None and high is None else torch.clamp(x, low, high)
    return run


@_op("IsInf", dtypes=_FLOATS, since=10)
def _is_inf(node: Node) -> Kernel:
    negative, positive = _attr(node, "detect_negative", 1), _attr(node, "detect_positive", 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        if negative and positive:
            return torch.isinf(x)
        if positive:
            return torch.isposinf(x)
        return torch.isneginf(x) if negative else torch.zeros_like(x, dtype=torch.bool)
    return run


@_op("Cast", since=6)
def _cast(node: Node) -> Kernel:
    dtype = _TORCH_TYPES[onnx.TensorProto.DataType.Name(_attr(node, "to")).lower()]
    return lambda x: x.to(dtype)


@_op("CastLike", since=15)
def _cast_like(node: Node) -> Kernel:
    return lambda x, like: x.to(like.dtype)


@_op("Identity")
def _identity(node: Node) -> Kernel:
    return lambda x: x


def _dropout_check(node: Node, model: Model) -> bool:
    return not _given(node, 2) and (not _wants(node, 1) or element_type(model, node.outputs[1]) == "bool")


@_op("Dropout", since=7, check=_dropout_check)
def _dropout(node: Node) -> Kernel:
    """Inference only: the output is the input and the mask keeps everything."""
    if _wants(node, 1):
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


# Linear algebra ----------------------------------------------------------------------------------

@_op("MatMul", dtypes=_WIDE)
def _matmul(node: Node) -> Kernel:
    return torch.matmul


@_op("Gemm", dtypes=_WIDE, since=7)
def _gemm(node: Node) -> Kernel:
    alpha, beta = _attr(node, "alpha", 1.0), _attr(node, "beta", 1.0)
    trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)

    def run(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        a, b = (a.t() if trans_a else a), (b.t() if trans_b else b)
        if c is None:
            return a @ b if alpha == 1 else (a @ b) * alpha
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)
    return run


@_op("Einsum", dtypes=_WIDE, since=12)
def _einsum(node: Node) -> Kernel:
    equation = _attr(node, "equation").replace(" ", "")
    return lambda *xs: torch.einsum(equation, *xs)


# Convolution and pooling ---------------------------------------------------------------------------

def _same_pads(auto_pad: str, sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    """Begin and end pads of auto_pad SAME_UPPER / SAME_LOWER (the extra one at the end / begin)."""
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
        needed = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        head = (needed + 1) // 2 if auto_pad == "SAME_LOWER" else needed // 2
        begin.append(head)
        end.append(needed - head)
    return begin + end


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] over trailing axes -> F.pad's [b_last, e_last, .., b1, e1]."""
    nd = len(pads) // 2
    return [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]


class _Window:
    """Kernel, strides, dilations and pads of a Conv or pool node, pads resolved per input shape."""

    def __init__(self, node: Node):
        self.auto_pad = _attr(node, "auto_pad", "NOTSET")
        self.kernel = _attr(node, "kernel_shape")
        self.strides = _attr(node, "strides")
        self.dilations = _attr(node, "dilations")
        self.pads = _attr(node, "pads")

    def resolve(self, sizes: Sequence[int], kernel: Sequence[int] | None = None) -> tuple:
        nd = len(sizes)
        kernel = list(self.kernel or kernel)
        strides = list(self.strides or [1] * nd)
        dilations = list(self.dilations or [1] * nd)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(self.auto_pad, sizes, kernel, strides, dilations)
        elif self.auto_pad == "VALID" or not self.pads:
            pads = [0] * 2 * nd
        else:
            pads = list(self.pads)
        return kernel, strides, dilations, pads


def _spatial_rank_check(node: Node, model: Model) -> bool:
    return _rank(model, node.inputs[0]) in (3, 4, 5)


@_op("Conv", dtypes=_WIDE, check=_spatial_rank_check)
def _conv(node: Node) -> Kernel:
    window, group = _Window(node), _attr(node, "group", 1)

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        nd = x.ndim - 2
        _, strides, dilations, pads = window.resolve(x.shape[2:], w.shape[2:])
        padding = pads[:nd]
        if pads[:nd] != pads[nd:]:
            x, padding = F.pad(x, _torch_pads(pads)), 0
        return _CONV[nd](x, w, b, strides, padding, dilations, group)
    return run


def _conv_transpose_check(node: Node, model: Model) -> bool:
    """SAME without output_shape: the spec's total padding goes negative when the stride
    exceeds the dilated kernel plus output_padding, where ONNX Runtime clamps it."""
    if not _spatial_rank_check(node, model):
        return False
    if _attr(node, "auto_pad", "NOTSET") not in ("SAME_UPPER", "SAME_LOWER") or _attr(node, "output_shape"):
        return True
    kernel = _attr(node, "kernel_shape") or (model.tensor(node.inputs[1]).shape or [None, None])[2:]
    nd = len(kernel)
    strides = _attr(node, "strides") or [1] * nd
    dilations = _attr(node, "dilations") or [1] * nd
    extra = _attr(node, "output_padding") or [0] * nd
    return all(isinstance(k, int) and (k - 1) * d + 1 + e >= s
               for k, d, e, s in zip(kernel, dilations, extra, strides, strict=True))


@_op("ConvTranspose", dtypes=_WIDE, check=_conv_transpose_check)
def _conv_transpose(node: Node) -> Kernel:
    """The full transposed convolution, then pads cropped and output_padding appended with F.pad.

    With output_shape given, pads follow from it as the ONNX spec says (SAME_UPPER puts the odd
    one at the end, otherwise at the beginning).
    """
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    group, output_shape = _attr(node, "group", 1), _attr(node, "output_shape")
    strides_attr, dilations_attr = _attr(node, "strides"), _attr(node, "dilations")
    pads_attr, output_padding_attr = _attr(node, "pads"), _attr(node, "output_padding")

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        nd = x.ndim - 2
        strides = list(strides_attr or [1] * nd)
        dilations = list(dilations_attr or [1] * nd)
        extra = list(output_padding_attr or [0] * nd)
        full = _CONV_T[nd](x, w, None, strides, 0, 0, group, dilations)
        target = list(output_shape[-nd:]) if output_shape else None
        if target is None and auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = [size * s for size, s in zip(x.shape[2:], strides, strict=True)]
        if target is not None:
            total = [size + e - t for size, e, t in zip(full.shape[2:], extra, target, strict=True)]
            begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
            pads = begin + [t - h for t, h in zip(total, begin, strict=True)]
        else:
            pads = list(pads_attr) if pads_attr and auto_pad == "NOTSET" else [0] * 2 * nd
        crop = [-p for p in pads[:nd]] + [e - p for e, p in zip(extra, pads[nd:], strict=True)]
        y = F.pad(full, _torch_pads(crop)) if any(crop) else full
        return y if b is None else y + b.reshape(1, -1, *[1] * nd)
    return run


def _native_pads(pads: Sequence[int], kernel: Sequence[int]) -> bool:
    """Torch pools pad symmetrically by at most half the kernel."""
    nd = len(kernel)
    return list(pads[:nd]) == list(pads[nd:]) and all(2 * p <= k for p, k in zip(pads, kernel, strict=False))


def _pool_check(node: Node, model: Model) -> bool:
    """Windows must overlap the input: pads smaller than the (dilated) kernel, and under SAME a
    kernel no shorter than the stride, else the spec's pads go negative. Ceil mode and indices
    keep torch's own padding, since explicit padding would change which windows exist."""
    if not _spatial_rank_check(node, model):
        return False
    window = _Window(node)
    nd = len(window.kernel)
    dilations, strides = window.dilations or [1] * nd, window.strides or [1] * nd
    pads = window.pads if window.auto_pad == "NOTSET" and window.pads else [0] * 2 * nd
    if node.op_type == "AveragePool" and any(d != 1 for d in dilations):
        return False
    spans = [(k - 1) * d + 1 for k, d in zip(window.kernel, dilations, strict=True)]
    if window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(span < s for span, s in zip(spans, strides, strict=True)):
            return False
    elif window.auto_pad == "NOTSET" and any(p >= span for p, span in zip(pads, spans * 2, strict=True)):
        return False
    native = window.auto_pad in ("NOTSET", "VALID") and _native_pads(pads, window.kernel)
    if _wants(node, 1) and (_attr(node, "storage_order", 0) != 0 or not native):
        return False
    return native or not _attr(node, "ceil_mode", 0)


@_op("MaxPool", dtypes=_WIDE, since=8, check=_pool_check)
def _max_pool(node: Node) -> Kernel:
    """Indices, when asked for, count over the whole tensor (N and C included) as ONNX does."""
    window, ceil_mode, indices = _Window(node), bool(_attr(node, "ceil_mode", 0)), _wants(node, 1)

    def run(x: torch.Tensor) -> Any:
        nd = x.ndim - 2
        kernel, strides, dilations, pads = window.resolve(x.shape[2:])
        padding = pads[:nd]
        if not _native_pads(pads, kernel):
            x, padding = F.pad(x, _torch_pads(pads), value=-math.inf), 0
        result = _MAX_POOL[nd](x, kernel, strides, padding, dilations, ceil_mode, indices)
        if not indices:
            return result
        y, where = result
        plane = math.prod(x.shape[2:])
        offsets = torch.arange(x.shape[0] * x.shape[1], device=x.device) * plane
        return y, where + offsets.reshape(x.shape[0], x.shape[1], *[1] * nd)
    return run


@_op("AveragePool", dtypes=_WIDE, since=7, check=_pool_check)
def _average_pool(node: Node) -> Kernel:
    """Pads torch cannot take natively are applied with F.pad; count_include_pad=0 then divides
    by the pooled mask of real elements instead of the window size."""
    window, ceil_mode = _Window(node), bool(_attr(node, "ceil_mode", 0))
    include_pad = bool(_attr(node, "count_include_pad", 0))

    def run(x: torch.Tensor) -> torch.Tensor:
        nd = x.ndim - 2
        kernel, strides, _, pads = window.resolve(x.shape[2:])
        pool = _AVG_POOL[nd]
        if _native_pads(pads, kernel):
            return pool(x, kernel, strides, pads[:nd], ceil_mode, include_pad)
        y = pool(F.pad(x, _torch_pads(pads)), kernel, strides, 0)
        if include_pad:
            return y
        mask = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device), _torch_pads(pads))
        return y / pool(mask, kernel, strides, 0)
    return run


@_op("GlobalAveragePool", "GlobalMaxPool", dtypes=_WIDE)
def _global_pool(node: Node) -> Kernel:
    reduce = torch.mean if node.op_type == "GlobalAveragePool" else torch.amax
    return lambda x: reduce(x, dim=tuple(range(2, x.ndim)), keepdim=True)


@_op("LRN", dtypes=_WIDE, check=lambda node, model: _attr(node, "size") % 2 == 1 and _rank(
    model, node.inputs[0]) in (3, 4, 5))
def _lrn(node: Node) -> Kernel:
    """Torch centres the window like ONNX only for odd sizes."""
    size, alpha = _attr(node, "size"), _attr(node, "alpha", 0.0001)
    beta, bias = _attr(node, "beta", 0.75), _attr(node, "bias", 1.0)
    return lambda x: F.local_response_norm(x, size, alpha, beta, bias)


# Normalisation -----------------------------------------------------------------------------------

def _bn_check(node: Node, model: Model) -> bool:
    types = {element_type(model, name) for name in node.inputs}
    return len(types) == 1 and not _attr(node, "training_mode", 0) and not any(
        _wants(node, i) for i in range(1, 5))


@_op("BatchNormalization", dtypes=_WIDE, since=9, check=_bn_check)
def _batch_norm(node: Node) -> Kernel:
    epsilon = _attr(node, "epsilon", 1e-5)
    return lambda x, scale, bias, mean, var: F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)


@_op("InstanceNormalization", dtypes=_WIDE, since=6,
     check=lambda node, model: (_rank(model, node.inputs[0]) or 0) >= 3)
def _instance_norm(node: Node) -> Kernel:
    epsilon = _attr(node, "epsilon", 1e-5)
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


@_op("LayerNormalization", dtypes=frozenset({"float"}), since=17,
     check=lambda node, model: _attr(node, "stash_type", 1) == 1)
def _layer_norm(node: Node) -> Kernel:
    """F.layer_norm when only Y is wanted and scale and bias cover the normalised axes exactly;
    else ONNX's formula, which also gives Mean and InvStdDev."""
    axis, epsilon = _attr(node, "axis", -1), _attr(node, "epsilon", 1e-5)
    statistics = _wants(node, 1) or _wants(node, 2)

    def run(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
        shape = tuple(x.shape[axis % x.ndim:])
        if not statistics and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
            return F.layer_norm(x, shape, scale, bias, epsilon)
        dims = tuple(range(axis % x.ndim, x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        inv_std_dev = torch.reciprocal(torch.sqrt((centred * centred).mean(dim=dims, keepdim=True) + epsilon))
        y = centred * inv_std_dev * scale
        y = y if bias is None else y + bias
        return (y, mean, inv_std_dev) if statistics else y
    return run


@_op("GroupNormalization", dtypes=frozenset({"float"}), since=21,
     check=lambda node, model: _attr(node, "stash_type", 1) == 1)
def _group_norm(node: Node) -> Kernel:
    groups, epsilon = _attr(node, "num_groups"), _attr(node, "epsilon", 1e-5)
    return lambda x, scale, bias: F.group_norm(x, groups, scale, bias, epsilon)


def _softmax(node: Node) -> Kernel:
    """Before opset 13 the input is flattened to 2-D at `axis` and normalised along the second axis."""
    fn = {"Softmax": F.softmax, "LogSoftmax": F.log_softmax, "Hardmax": _hardmax}[node.op_type]
    if node.since_version >= 13:
        axis = _attr(node, "axis", -1)
        return lambda x: fn(x, axis)
    axis = _attr(node, "axis", 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.ndim
        return fn(x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:])), 1).reshape(x.shape)
    return run


def _hardmax(x: torch.Tensor, axis: int) -> torch.Tensor:
    one_hot = F.one_hot(torch.argmax(x, axis), x.shape[axis]).to(x.dtype)
    return one_hot.movedim(-1, axis)


_op("Softmax", "LogSoftmax", dtypes=_WIDE)(_softmax)
_op("Hardmax", dtypes=_FLOATS)(_softmax)


# Shape and data movement -------------------------------------------------------------------------

@_op("Shape")
def _shape(node: Node) -> Kernel:
    start, end = _attr(node, "start", 0), _attr(node, "end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@_op("Size")
def _size(node: Node) -> Kernel:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@_op("Reshape", since=5)
def _reshape(node: Node) -> Kernel:
    """A 0 copies the input's dimension unless allowzero is set; -1 is inferred."""
    allow_zero = _attr(node, "allowzero", 0)

    def run(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = _ints(shape)
        if not allow_zero:
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)
    return run


@_op("Flatten")
def _flatten(node: Node) -> Kernel:
    axis = _attr(node, "axis", 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis + x.ndim if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return run


def _axes(node: Node, given: torch.Tensor | None, input_since: int) -> list[int] | None:
    """Axes from the attribute before `input_since`, from the optional input from then on."""
    if node.since_version < input_since:
        return _attr(node, "axes")
    return None if given is None else _ints(given)


@_op("Squeeze")
def _squeeze(node: Node) -> Kernel:
    def run(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _axes(node, axes, 13)
        return x.squeeze() if dims is None else x.squeeze(tuple(dims))
    return run


@_op("Unsqueeze")
def _unsqueeze(node: Node) -> Kernel:
    def run(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _axes(node, axes, 13) or []
        rank = x.ndim + len(dims)
        for d in sorted(d % rank for d in dims):
            x = x.unsqueeze(d)
        return x
    return run


@_op("Transpose")
def _transpose(node: Node) -> Kernel:
    perm = _attr(node, "perm")
    return lambda x: x.permute(perm if perm is not None else tuple(reversed(range(x.ndim))))


@_op("Concat", since=4)
def _concat(node: Node) -> Kernel:
    axis = _attr(node, "axis")
    return lambda *xs: torch.cat(xs, axis)


@_op("Split", since=2)
def _split(node: Node) -> Kernel:
    """Sizes from the attribute (before 13) or input; else equal parts, the last one smaller
    when num_outputs (18) does not divide the axis."""
    axis, parts = _attr(node, "axis", 0), len(node.outputs)
    sizes_attr = _attr(node, "split") if node.since_version < 13 else None

    def run(x: torch.Tensor, split: torch.Tensor | None = None) -> tuple:
        sizes = sizes_attr or (_ints(split) if split is not None else None)
        if not sizes:
            length = x.shape[axis]
            chunk = -(-length // parts)
            sizes = [chunk] * (parts - 1) + [length - chunk * (parts - 1)]
        return torch.split(x, sizes, axis)
    return run


@_op("Slice")
def _slice(node: Node) -> Kernel:
    """ONNX clamps starts and ends per axis; negative steps gather (torch views cannot step back)."""
    fixed = node.since_version < 10

    def run(x: torch.Tensor, starts: Any = None, ends: Any = None, axes: Any = None,
            steps: Any = None) -> torch.Tensor:
        if fixed:
            starts, ends, axes = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes")
        else:
            starts, ends = _ints(starts), _ints(ends)
            axes = None if axes is None else _ints(axes)
        axes = list(range(len(starts))) if axes is None else [a % x.ndim for a in axes]
        steps = [1] * len(starts) if steps is None else _ints(steps)
        index: list[slice] = [slice(None)] * x.ndim
        backward = []
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            size = x.shape[axis]
            start, end = start + size if start < 0 else start, end + size if end < 0 else end
            if step > 0:
                index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
            else:
                start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
                backward.append((axis, range(start, end, step)))
        x = x[tuple(index)]
        for axis, positions in backward:
            stop = positions.start + positions.step * len(positions)
            x = x.index_select(axis, torch.arange(positions.start, stop, positions.step, device=x.device))
        return x
    return run


def _positive(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.long()
    return torch.where(index < 0, index + size, index)


@_op("Gather")
def _gather(node: Node) -> Kernel:
    axis = _attr(node, "axis", 0)

    def run(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = axis % x.ndim
        picked = x.index_select(a, _positive(index, x.shape[a]).reshape(-1))
        return picked.reshape((*x.shape[:a], *index.shape, *x.shape[a + 1:]))
    return run


@_op("GatherElements", since=11)
def _gather_elements(node: Node) -> Kernel:
    axis = _attr(node, "axis", 0)
    return lambda x, index: torch.gather(x, axis, _positive(index, x.shape[axis]))


def _linear_index(index: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Tuples of (possibly negative) indices into `dims`, the last axis of `index`, as flat offsets."""
    sizes = torch.tensor(dims, dtype=torch.int64, device=index.device)
    strides = torch.tensor([math.prod(dims[i + 1:]) for i in range(len(dims))], dtype=torch.int64,
                           device=index.device)
    index = index.long()
    return (torch.where(index < 0, index + sizes, index) * strides).sum(-1)


@_op("GatherND", since=11)
def _gather_nd(node: Node) -> Kernel:
    batch_dims = _attr(node, "batch_dims", 0)

    def run(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        depth = index.shape[-1]
        batch = math.prod(x.shape[:batch_dims])
        head, rest = x.shape[batch_dims:batch_dims + depth], x.shape[batch_dims + depth:]
        flat = x.reshape(batch, math.prod(head), *rest)
        linear = _linear_index(index, head).reshape(batch, -1)
        picked = flat[torch.arange(batch, device=x.device)[:, None], linear]
        return picked.reshape((*index.shape[:-1], *rest))
    return run


_SCATTER_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


@_op("ScatterElements", since=11)
def _scatter_elements(node: Node) -> Kernel:
    """Reductions combine with the existing values (include_self), as the reference applies them."""
    axis, reduction = _attr(node, "axis", 0), _SCATTER_REDUCTIONS.get(_attr(node, "reduction", "none"))

    def run(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        index = _positive(index, x.shape[axis])
        if reduction is None:
            return torch.scatter(x, axis, index, updates)
        return torch.scatter_reduce(x, axis, index, updates, reduction, include_self=True)
    return run


@_op("ScatterND", since=11)
def _scatter_nd(node: Node) -> Kernel:
    """Index tuples become offsets into the leading axes flattened, then a scatter along axis 0."""
    reduction = _SCATTER_REDUCTIONS.get(_attr(node, "reduction", "none"))

    def run(x: torch.Tensor, index: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        depth = index.shape[-1]
        head, rest = x.shape[:depth], x.shape[depth:]
        flat = x.reshape(math.prod(head), *rest)
        linear = _linear_index(index, head).reshape(-1)
        source = updates.reshape(-1, *rest)
        if reduction is None:
            return flat.index_put((linear,), source).reshape(x.shape)
        spread = linear.reshape(-1, *[1] * len(rest)).expand_as(source)
        return flat.scatter_reduce(0, spread, source, reduction, include_self=True).reshape(x.shape)
    return run


@_op("Expand", since=8)
def _expand(node: Node) -> Kernel:
    return lambda x, shape: x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(shape))))


@_op("Tile", since=6)
def _tile(node: Node) -> Kernel:
    return lambda x, repeats: x.repeat(_ints(repeats))


@_op("Range", dtypes=_NUMBERS - {"float16", "int8", "uint8"}, since=11)
def _range(node: Node) -> Kernel:
    """max(ceil((limit - start) / delta), 0) elements start + i * delta, as the spec writes them."""
    def run(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        first, end, step = start.item(), limit.item(), delta.item()
        span = -((first - end) // step) if isinstance(step, int) else math.ceil((end - first) / step)
        count = max(span, 0)
        return start + torch.arange(count, dtype=start.dtype, device=start.device) * step
    return run


@_op("ConstantOfShape", since=9)
def _constant_of_shape(node: Node) -> Kernel:
    value = _attr(node, "value")
    array = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    fill, dtype = array.reshape(-1)[0].item(), torch.from_numpy(array).dtype
    return lambda shape: torch.full(_ints(shape), fill, dtype=dtype, device=shape.device)


@_op("DepthToSpace", "SpaceToDepth", check=lambda node, model: _rank(model, node.inputs[0]) == 4)
def _depth_space(node: Node) -> Kernel:
    """The reshape-transpose-reshape of the spec's pseudocode, DCR and CRD alike."""
    block, crd = _attr(node, "blocksize"), _attr(node, "mode", "DCR") == "CRD"

    def depth_to_space(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if crd:
            tmp = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            tmp = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
        return tmp.reshape(n, c // block**2, h * block, w * block)

    def space_to_depth(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tmp = x.reshape(n, c, h // block, block, w // block, block)
        tmp = tmp.permute(0, 1, 3, 5, 2, 4) if crd else tmp.permute(0, 3, 5, 1, 2, 4)
        return tmp.reshape(n, c * block**2, h // block, w // block)

    return depth_to_space if node.op_type == "DepthToSpace" else space_to_depth


@_op("Trilu", since=14)
def _trilu(node: Node) -> Kernel:
    upper = _attr(node, "upper", 1)
    return lambda x, k=None: (torch.triu if upper else torch.tril)(x, 0 if k is None else int(k.item()))


@_op("NonZero", dtypes=_NUMBERS | {"bool"}, since=9)
def _non_zero(node: Node) -> Kernel:
    return lambda x: torch.nonzero(x).t()


# Reductions and search ---------------------------------------------------------------------------

def _reduce_empty(kind: str) -> Callable[[torch.Tensor], Any]:
    """What reducing an empty set gives: the identity of the reduction."""
    def fill(x: torch.Tensor) -> Any:
        if x.dtype == torch.bool:
            return kind == "ReduceMin"
        if x.is_floating_point():
            return -math.inf if kind == "ReduceMax" else math.inf
        return torch.iinfo(x.dtype).min if kind == "ReduceMax" else torch.iinfo(x.dtype).max
    return fill


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keepdim, dtype=x.dtype)
    return x


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _sum(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return torch.sum(x, dims, keepdim, dtype=x.dtype)


#: (element-wise map before, reduction, map after): under noop_with_empty_axes only the maps
#: apply, so ReduceSumSquare squares and ReduceL1 takes absolute values, as the spec says.
_REDUCERS: dict[str, tuple[Kernel | None, Kernel, Kernel | None]] = {
    "ReduceSum": (None, _sum, None),
    "ReduceMean": (None, torch.mean, None),
    "ReduceMax": (None, torch.amax, None),
    "ReduceMin": (None, torch.amin, None),
    "ReduceProd": (None, _prod, None),
    "ReduceL1": (torch.abs, _sum, None),
    "ReduceL2": (_square, _sum, torch.sqrt),
    "ReduceLogSum": (None, _sum, torch.log),
    "ReduceLogSumExp": (None, torch.logsumexp, None),
    "ReduceSumSquare": (_square, _sum, None),
}


def _reduce(node: Node) -> Kernel:
    """Axes move from attribute to input at 13 (ReduceSum) or 18 (the others); empty or absent
    axes reduce everything unless noop_with_empty_axes."""
    kind, keepdims = node.op_type, bool(_attr(node, "keepdims", 1))
    noop = _attr(node, "noop_with_empty_axes", 0)
    before, reduce, after = _REDUCERS[kind]
    empty = _reduce_empty(kind) if kind in ("ReduceMax", "ReduceMin") else None

    def run(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _axes(node, axes, 13 if kind == "ReduceSum" else 18)
        dims = sorted({d % x.ndim for d in dims}) if dims else [] if noop else list(range(x.ndim))
        if dims and empty is not None and any(x.shape[d] == 0 for d in dims):
            shape = [1 if d in dims else n for d, n in enumerate(x.shape) if keepdims or d not in dims]
            return torch.full(shape, empty(x), dtype=x.dtype, device=x.device)
        y = x if before is None else before(x)
        y = reduce(y, dims, keepdims) if dims else y
        return y if after is None else after(y)
    return run


_op("ReduceMax", "ReduceMin", dtypes=_ANY)(_reduce)
_op("ReduceSum", "ReduceProd", dtypes=_NUMBERS - {"float16"})(_reduce)
_op("ReduceMean", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    dtypes=_WIDE)(_reduce)


@_op("ArgMax", "ArgMin", dtypes=_NUMBERS)
def _arg_extreme(node: Node) -> Kernel:
    """Torch returns the first extreme index; select_last_index searches the flipped tensor."""
    axis, keepdims = _attr(node, "axis", 0), bool(_attr(node, "keepdims", 1))
    last, fn = _attr(node, "select_last_index", 0), torch.argmax if node.op_type == "ArgMax" else torch.argmin

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.ndim
        if last:
            return x.shape[a] - 1 - fn(x.flip(a), a, keepdims)
        return fn(x, a, keepdims)
    return run


@_op("TopK", dtypes=_NUMBERS, since=10)
def _top_k(node: Node) -> Kernel:
    """A stable sort, so equal values keep the lower index first as ONNX requires."""
    axis, largest = _attr(node, "axis", -1), bool(_attr(node, "largest", 1))

    def run(x: torch.Tensor, k: torch.Tensor) -> tuple:
        values, indices = torch.sort(x, dim=axis, descending=largest, stable=True)
        count = int(k.item())
        return values.narrow(axis, 0, count), indices.narrow(axis, 0, count)
    return run


@_op("CumSum", dtypes=_NUMBERS - {"float16"}, since=11)
def _cum_sum(node: Node) -> Kernel:
    exclusive, reverse = _attr(node, "exclusive", 0), _attr(node, "reverse", 0)

    def run(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = int(axis.item()) % x.ndim
        if reverse:
            x = x.flip(a)
        y = torch.cumsum(x, a, dtype=x.dtype)
        if exclusive:
            y = torch.cat([torch.zeros_like(y.narrow(a, 0, min(1, y.shape[a]))),
                           y.narrow(a, 0, max(y.shape[a] - 1, 0))], a)
        return y.flip(a) if reverse else y
    return run


# Padding and resizing ----------------------------------------------------------------------------

def _pad_positions(mode: str, size: int, begin: int, end: int) -> np.ndarray:
    """Source index of every output position along one axis for reflect, edge and wrap."""
    positions = np.arange(-begin, size + end)
    if mode == "edge":
        return np.clip(positions, 0, size - 1)
    if mode == "wrap":
        return positions % size
    if size == 1:
        return np.zeros_like(positions)
    period = 2 * (size - 1)
    folded = positions % period
    return np.where(folded < size, folded, period - folded)


def _pad_check(node: Node, model: Model) -> bool:
    """Non-constant modes only with pads known to be non-negative: whether a crop on one side
    happens before or after the other side is filled is not settled (ONNX Runtime crops first)."""
    mode = _attr(node, "mode", "constant")
    if mode == "constant":
        return True
    if mode not in ("reflect", "edge", "wrap"):
        return False
    if node.since_version < 11:
        return min(_attr(node, "pads"), default=0) >= 0
    initializer = next((t for t in model.proto.graph.initializer if t.name == node.inputs[1]), None)
    return initializer is not None and bool((numpy_helper.to_array(initializer) >= 0).all())


@_op("Pad", since=2, check=_pad_check)
def _pad(node: Node) -> Kernel:
    mode = _attr(node, "mode", "constant")
    pads_attr, value_attr = _attr(node, "pads"), _attr(node, "value", 0.0)
    from_inputs = node.since_version >= 11

    def run(x: torch.Tensor, pads: Any = None, value: Any = None, axes: Any = None) -> torch.Tensor:
        if not from_inputs:
            pads, fill = pads_attr, value_attr
        else:
            pads, fill = _ints(pads), 0 if value is None or value.numel() == 0 else value.item()
        axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in _ints(axes)]
        full = [0] * 2 * x.ndim
        for i, a in enumerate(axes):
            full[a], full[x.ndim + a] = pads[i], pads[len(axes) + i]
        if mode == "constant":
            return F.pad(x, _torch_pads(full), value=fill)
        for a in range(x.ndim):
            if full[a] or full[x.ndim + a]:
                positions = _pad_positions(mode, x.shape[a], full[a], full[x.ndim + a])
                x = x.index_select(a, torch.from_numpy(positions).to(x.device))
        return x
    return run


def _resize_check(node: Node, model: Model) -> bool:
    mode = _attr(node, "mode", "nearest")
    if node.op_type == "Upsample":
        return mode == "nearest"
    transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear", "cubic") or transform == "tf_half_pixel_for_nn":
        return False
    if mode == "nearest":
        return not _attr(node, "antialias", 0) and not _attr(node, "exclude_outside", 0)
    return element_type(model, node.inputs[0]) in _WIDE


class _Resampler:
    """Per-axis source indices and weights of a Resize node, as onnx.reference computes them.

    Resize is separable: each axis is resampled in turn by gathering `n` neighbours per output
    position and weighting them. Coordinates are worked out in float64 numpy exactly as the
    reference does, so nearest modes pick the same pixels, then cached per input and output size.
    """

    def __init__(self, node: Node):
        self.mode = _attr(node, "mode", "nearest")
        if node.op_type == "Upsample":
            self.transform, self.nearest = "asymmetric", "floor"
        else:
            self.transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
            self.nearest = _attr(node, "nearest_mode", "round_prefer_floor")
        self.cubic_a = _attr(node, "cubic_coeff_a", -0.75)
        self.exclude_outside = bool(_attr(node, "exclude_outside", 0))
        self.extrapolation = _attr(node, "extrapolation_value", 0.0)
        self.antialias = bool(_attr(node, "antialias", 0))
        self._cache: dict[tuple, tuple] = {}

    def source(self, size: int, out: int, scale: float, roi: tuple[float, float] | None) -> np.ndarray:
        y = np.arange(out, dtype=np.float64)
        width = scale * size
        transform = self.transform
        if transform == "align_corners":
            return np.zeros(out) if width == 1 else y * (size - 1) / (width - 1)
        if transform == "asymmetric":
            return y / scale
        if transform == "tf_crop_and_resize":
            start, end = roi
            x = np.full(out, (end - start) * (size - 1) / 2) if width == 1 else \
                y * (end - start) * (size - 1) / (width - 1)
            return x + start * (size - 1)
        if transform == "pytorch_half_pixel":
            return np.full(out, -0.5) if width == 1 else (y + 0.5) / scale - 0.5
        if transform == "half_pixel_symmetric":
            offset = size / 2 * (1 - out / width)
            return offset + (y + 0.5) / scale - 0.5
        return (y + 0.5) / scale - 0.5

    def coefficients(self, ratio: np.ndarray, scale: float) -> np.ndarray:
        """Weights of the neighbours of each output position, (out, n)."""
        a = self.cubic_a
        if self.mode == "nearest":
            whole = ratio == np.floor(ratio)
            upper = {"floor": np.zeros_like(whole), "ceil": np.ones_like(whole),
                     "round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5}[self.nearest]
            upper = whole | upper
            return np.stack([~upper, upper], axis=1).astype(np.float64)
        if self.antialias and scale < 1:
            support = 1 if self.mode == "linear" else 2
            first = int(np.floor(-support / scale) + 1)
            taps = (np.arange(first, 2 - first)[None, :] - ratio[:, None]) * scale
            if self.mode == "linear":
                weights = np.clip(1 - np.abs(taps), 0, 1)
            else:
                t = np.abs(taps)
                weights = np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                                   np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))
            return weights / weights.sum(axis=1, keepdims=True)
        if self.mode == "linear":
            return np.stack([1 - ratio, ratio], axis=1)
        r, q = ratio, 1 - ratio
        return np.stack([((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
                         ((a + 2) * r - (a + 3)) * r * r + 1,
                         ((a + 2) * q - (a + 3)) * q * q + 1,
                         ((a * (q + 1) - 5 * a) * (q + 1) + 8 * a) * (q + 1) - 4 * a], axis=1)

    def axis_tables(self, size: int, out: int, scale: float, roi: tuple[float, float] | None,
                    device: torch.device, dtype: torch.dtype) -> tuple:
        """(indices (out, n), weights (out, n) or None for nearest, extrapolated mask or None)."""
        key = (size, out, scale, roi, device, dtype)
        if key in self._cache:
            return self._cache[key]
        x = self.source(size, out, scale, roi)
        floor = np.floor(x).astype(np.int64)
        ratio = np.where(x == floor, 1.0, x - floor)
        weights = self.coefficients(ratio, scale)
        n = weights.shape[1]
        pad = -(-n // 2)
        shifted = x + pad
        base = np.floor(shifted).astype(np.int64)
        offset = np.where(shifted - base == 0, -(n // 2), -(n // 2) + 1)
        neighbours = (base + offset)[:, None] + np.arange(n)[None, :] - pad
        if self.exclude_outside:
            weights = np.where((neighbours < 0) | (neighbours >= size), 0.0, weights)
            total = weights.sum(axis=1, keepdims=True)
            weights = weights / np.where(total == 0, 1.0, total)
        indices = np.clip(neighbours, 0, size - 1)
        if self.mode == "nearest":
            indices, weights = indices[np.arange(out), weights.argmax(axis=1)][:, None], None
        outside = (x < 0) | (x > size - 1) if self.transform == "tf_crop_and_resize" else None
        tables = (torch.from_numpy(indices).to(device),
                  None if weights is None else torch.from_numpy(weights).to(device, dtype),
                  None if outside is None or not outside.any() else torch.from_numpy(outside).to(device))
        self._cache[key] = tables
        return tables

    def __call__(self, x: torch.Tensor, sizes: list[int], scales: list[float],
                 roi: list[float] | None) -> torch.Tensor:
        rank = x.ndim
        for axis in range(rank):
            span = None if roi is None else (roi[axis], roi[axis + rank])
            if math.isclose(scales[axis], 1.0) and sizes[axis] == x.shape[axis] and (
                    span is None or (math.isclose(span[0], 0.0) and math.isclose(span[1], 1.0))):
                continue
            indices, weights, outside = self.axis_tables(x.shape[axis], sizes[axis], scales[axis], span,
                                                         x.device, x.dtype)
            out, n = indices.shape
            picked = x.index_select(axis, indices.reshape(-1))
            if weights is None:
                x = picked
            else:
                picked = picked.reshape(*x.shape[:axis], out, n, *x.shape[axis + 1:])
                x = (picked * weights.reshape(out, n, *[1] * (rank - axis - 1))).sum(axis + 1)
            if outside is not None:
                x = x.masked_fill(outside.reshape(out, *[1] * (rank - axis - 1)), self.extrapolation)
        return x


@_op("Resize", since=11, check=_resize_check)
def _resize(node: Node) -> Kernel:
    """Output sizes and scales follow onnx.reference's `_interpolate_nd`: scales given -> sizes
    floor(scale * size); sizes given -> scale = size ratio, or one ratio for all axes under a
    keep_aspect_ratio_policy."""
    resample = _Resampler(node)
    axes_attr = _attr(node, "axes")
    policy = _attr(node, "keep_aspect_ratio_policy", "stretch")

    def run(x: torch.Tensor, roi: Any = None, scales: Any = None, sizes: Any = None) -> torch.Tensor:
        rank = x.ndim
        axes = list(range(rank)) if axes_attr is None else [a % rank for a in axes_attr]
        shape = list(x.shape)
        box = None
        if roi is not None and roi.numel():
            given = roi.reshape(-1).cpu().numpy()  # numpy scalars: the reference's roi arithmetic
            box = [0.0] * rank + [1.0] * rank
            for i, a in enumerate(axes):
                box[a], box[rank + a] = given[i], given[len(axes) + i]
        if sizes is not None and sizes.numel():
            out = list(shape)
            for a, size in zip(axes, _ints(sizes), strict=True):
                out[a] = size
            factors = [o / s for o, s in zip(out, shape, strict=True)]
            if policy != "stretch":
                pick = min if policy == "not_larger" else max
                scale = pick(factors[a] for a in axes)
                factors = [scale if i in axes else 1.0 for i in range(rank)]
                out = [int(scale * s + 0.5) if i in axes else s for i, s in enumerate(shape)]
        else:
            factors = [1.0] * rank
            for a, factor in zip(axes, scales.reshape(-1).tolist(), strict=True):
                factors[a] = float(factor)
            out = [int(f * s) for f, s in zip(factors, shape, strict=True)]
        return resample(x, out, factors, box)
    return run


@_op("Upsample", since=7, check=_resize_check)
def _upsample(node: Node) -> Kernel:
    """Nearest only: source index floor(i / scale), output size floor(size * scale)."""
    resample = _Resampler(node)
    scales_attr = _attr(node, "scales")

    def run(x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        factors = [float(f) for f in (scales_attr or scales.reshape(-1).tolist())]
        return resample(x, [int(f * s) for f, s in zip(factors, x.shape, strict=True)], factors, None)
    return run


# The interpreter ---------------------------------------------------------------------------------

def _constant_check(node: Node, model: Model) -> bool:
    return any(k in node.attributes for k in ("value", "value_float", "value_floats", "value_int",
                                               "value_ints"))


def _constant_value(node: Node) -> np.ndarray:
    attrs = node.attributes
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    if "value_float" in attrs or "value_floats" in attrs:
        return np.array(attrs.get("value_float", attrs.get("value_floats")), dtype=np.float32)
    return np.array(attrs.get("value_int", attrs.get("value_ints")), dtype=np.int64)


# Constant nodes are folded into the partition's constants at compile time: no kernel.
_OPS["Constant"] = _Op(lambda node: None, _ANY, 1, _constant_check)


def _host_tensor(array: Any) -> torch.Tensor:
    """A numpy array as a CPU tensor on the same memory (a copy only for what torch cannot view)."""
    array = np.asarray(array)
    if not array.dtype.isnative or any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():  # kernels never write to their inputs
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass(frozen=True)
class _Step:
    node: Node
    kernel: Kernel
    release: tuple[str, ...]


class _Interpreter(CompiledPartition):
    def __init__(self, executor: TorchExecutor, part: onnx.ModelProto, steps: list[_Step],
                 constants: dict[str, torch.Tensor]):
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]
        self._executor = executor
        self._label = part.graph.name
        self._steps = steps
        self._constants = constants
        self._constant_storage = {t.untyped_storage().data_ptr() for t in constants.values()}
        self._host = executor.device.kind == "cpu"

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        if self._host and torch.get_num_threads() != self._executor.threads:
            # Torch's intra-op thread count belongs to the calling thread (OpenMP), so each
            # executor (a CPU stream has a budget of its own) sets its own where it runs.
            torch.set_num_threads(self._executor.threads)
        with torch.inference_mode(), contextlib.nullcontext() if self._host else exact_fp32():
            values = dict(self._constants)
            for name, value in zip(self.input_names, inputs, strict=True):
                values[name] = value if isinstance(value, torch.Tensor) else self._executor.to_device(value)
            for step in self._steps:
                node = step.node
                try:
                    result = step.kernel(*(values[name] if name else None for name in node.inputs))
                except Exception as exc:
                    raise RunError(f"{self._executor.name} failed at node '{node.name}' ({node.op_type}) "
                                   f"of partition {self._label!r}: {type(exc).__name__}: {exc}") from exc
                if isinstance(result, tuple | list):
                    values.update((name, value) for name, value in zip(node.outputs, result, strict=False)
                                  if name)
                else:
                    values[node.outputs[0]] = result
                for name in step.release:
                    del values[name]
            return [self._leave(values[name]) for name in self.output_names]

    def _leave(self, value: torch.Tensor) -> Any:
        """Outputs never share memory with the partition's constants (callers may write to them);
        on the host they leave as C-contiguous numpy arrays, as other host libraries expect."""
        if value.untyped_storage().data_ptr() in self._constant_storage:
            value = value.clone()
        return value.contiguous().numpy() if self._host else value.contiguous()


class TorchExecutor(Executor):
    library = "torch"
    extra = "torch"
    exchange_dtypes = frozenset(_TORCH_TYPES)

    def __init__(self, device: Device = CPU, *, threads: int | None = None, stream: int | None = None):
        if device.kind not in ("cpu", "cuda"):
            raise ValueError(f"torch executor drives 'cpu' or 'cuda:N', not {device}")
        super().__init__(device, threads=threads, stream=stream)
        self.torch_device = torch.device(str(device))

    @classmethod
    def discover(cls) -> list[Executor]:
        found: list[Executor] = [cls()]
        if torch.cuda.is_available():
            found += [cls(Device("cuda", i)) for i in range(torch.cuda.device_count())]
        return found

    def info(self) -> ExecutorInfo:
        if self.device.kind == "cuda":
            name = torch.cuda.get_device_name(self.device.index)
        else:
            name = "host CPU (ATen)"
        return ExecutorInfo(self.name, self.library, torch.__version__, str(self.device), name,
                            self.threads, "fp32")

    def supports_op(self, node: Node, model: Model) -> bool:
        op = _OPS.get(node.op_type)
        if node.domain or op is None or node.since_version is None or node.since_version < op.since:
            return False
        if any(model.tensor(name).kind != "tensor" for name in (*node.all_inputs, *node.outputs) if name):
            return False
        if node.inputs and element_type(model, node.inputs[0]) not in op.dtypes:
            return False
        return op.check is None or op.check(node, model)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        view = Model(part, part.graph.name)
        unknown = [n.name for n in view.nodes if n.domain or n.op_type not in _OPS or n.since_version is None]
        if unknown:
            raise CompileError(f"{self.name} has no kernel for nodes {unknown} of partition "
                               f"{part.graph.name!r}", tuple(unknown))
        constants: dict[str, torch.Tensor] = {}
        steps: list[tuple[Node, Kernel]] = []
        try:
            for tensor in part.graph.initializer:
                constants[tensor.name] = self.to_device(numpy_helper.to_array(tensor))
            for node in view.nodes:
                if node.op_type == "Constant":
                    constants[node.outputs[0]] = self.to_device(_constant_value(node))
                else:
                    steps.append((node, _OPS[node.op_type].build(node)))
        except Exception as exc:
            raise CompileError(f"{self.name} cannot build partition {part.graph.name!r}: {exc}") from exc
        last_use: dict[str, int] = {}
        for index, (node, _) in enumerate(steps):
            for name in (*node.inputs, *node.outputs):
                if name:
                    last_use[name] = index
        keep = {o.name for o in part.graph.output}
        return _Interpreter(self, part, [
            _Step(node, kernel, tuple(n for n in dict.fromkeys((*node.inputs, *node.outputs))
                                      if n and last_use[n] == index and n not in keep and n not in constants))
            for index, (node, kernel) in enumerate(steps)], constants)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        """Host arrays become tensors on the same memory; CUDA copies go through pinned memory."""
        tensor = _host_tensor(array)
        if self.device.kind == "cpu":
            return tensor
        return tensor.pin_memory().to(self.torch_device, non_blocking=True)

    def to_host(self, value: Any) -> np.ndarray:
        if not isinstance(value, torch.Tensor):
            return value
        return value.cpu().numpy() if self.device.kind != "cpu" else value.numpy()

    def adopt(self, value: Any) -> Any:
        """Another library's tensor on this device as a torch tensor over the same memory (DLPack,
        else the CUDA Array Interface)."""
        if isinstance(value, torch.Tensor):
            return value
        if hasattr(value, "__dlpack__"):
            return torch.from_dlpack(value)
        if hasattr(value, "__cuda_array_interface__"):
            return torch.as_tensor(value, device=self.torch_device)
        return value

    def copy_from(self, value: Any, source: Executor) -> Any | None:
        """GPU to GPU without the host (a peer copy where the GPUs allow, else the driver stages it)."""
        if self.device.kind != "cuda" or not source.memory_space.startswith("cuda:"):
            return None
        value = self.adopt(value)
        return value.to(self.torch_device) if isinstance(value, torch.Tensor) and value.is_cuda else None

    def all_finite(self, value: Any) -> Any:
        """One reduction on the tensor's device, read (waiting for the device) when it is needed."""
        if not isinstance(value, torch.Tensor):
            return super().all_finite(value)
        return not (value.is_floating_point() or value.is_complex()) or torch.isfinite(value).all()

    def synchronize(self) -> None:
        """CUDA kernels run asynchronously: wait for this device's, so timings measure executions,
        not launches."""
        if self.device.kind == "cuda":
            torch.cuda.synchronize(self.torch_device)
