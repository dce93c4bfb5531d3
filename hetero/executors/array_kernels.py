"""Hot-operator kernels written against numpy's array API, so they run on numpy (the numpy
executor's fast paths, plugged into `onnx.reference` as overriding ops) and unchanged on CuPy
arrays (the CuPy executor on GPUs): strided views and one batched GEMM (`matmul`, BLAS or
cuBLAS) per convolution.

Each op class handles the common case and hands anything unusual to the `onnx.reference`
implementation of the same node, so semantics stay exactly ONNX's.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import numpy as np
from onnx.reference.op_run import OpRun
from onnx.reference.ops import load_op


class _FastOp(OpRun):
    """An op with a fast path; `reference(...)` runs the onnx.reference kernel for the same node."""

    op_domain = ""

    def __init__(self, onnx_node: Any, run_params: dict[str, Any], schema: Any = None):
        super().__init__(onnx_node, run_params, schema)
        self._run_params = run_params
        self._fallback: OpRun | None = None

    def reference(self, *inputs: Any) -> tuple:
        if self._fallback is None:
            version = self._run_params["opsets"][""]
            cls = load_op("", self.onnx_node.op_type, version)
            self._fallback = cls(self.onnx_node, self._run_params)
        return self._fallback.run(*inputs)


def resolve_pads(auto_pad: str | None, spatial: tuple[int, ...], kernel: tuple[int, ...],
                 strides: tuple[int, ...], dilations: tuple[int, ...], pads: Any) -> list[int]:
    """Begin pads followed by end pads, as ONNX Conv/pooling define them."""
    nd = len(spatial)
    auto_pad = auto_pad or "NOTSET"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto_pad == "VALID" or pads is None:
        return [0] * (2 * nd)
    return [int(p) for p in pads]


def array_module(x: Any) -> ModuleType:
    """numpy for numpy arrays, cupy for cupy arrays: the module whose functions fit `x`."""
    return importlib.import_module(type(x).__module__.partition(".")[0])


def windows(x: Any, kernel: tuple[int, ...], strides: tuple[int, ...],
            dilations: tuple[int, ...], out_shape: tuple[int, ...]) -> Any:
    """View of shape (N, C, *kernel, *out_shape) over a padded NC... array, no copy."""
    s = x.strides
    nd = len(kernel)
    return array_module(x).lib.stride_tricks.as_strided(
        x,
        shape=(*x.shape[:2], *kernel, *out_shape),
        strides=(s[0], s[1], *(s[2 + i] * dilations[i] for i in range(nd)),
                 *(s[2 + i] * strides[i] for i in range(nd))),
    )


def _pad_spatial(x: Any, pads: list[int], value: float = 0.0) -> Any:
    nd = x.ndim - 2
    if not any(pads):
        return x
    widths = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    return array_module(x).pad(x, widths, constant_values=value)


def conv(x: Any, w: Any, b: Any = None, *, auto_pad: str | None = None, dilations: Any = None,
         group: int = 1, kernel_shape: Any = None, pads: Any = None, strides: Any = None) -> Any:
    """N-d convolution: 1x1 as one GEMM, depthwise as shifted multiply-adds, else im2col + GEMM."""
    xp = array_module(x)
    nd = x.ndim - 2
    kernel = tuple(int(k) for k in (kernel_shape or w.shape[2:]))
    strides = tuple(int(s) for s in (strides or (1,) * nd))
    dilations = tuple(int(d) for d in (dilations or (1,) * nd))
    pads = resolve_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    padded = _pad_spatial(x, pads)
    out_shape = tuple((padded.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                      for i in range(nd))
    n, c = x.shape[:2]
    m = w.shape[0]
    group = int(group or 1)
    cg, mg = c // group, m // group
    length = math.prod(out_shape)
    if cg == 1 and mg == 1 and math.prod(kernel) > 1:
        y = _depthwise(padded, w, kernel, strides, dilations, out_shape)
    else:
        if all(k == 1 for k in kernel):
            sliced = padded[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
            cols = xp.ascontiguousarray(sliced[(..., *(slice(0, o) for o in out_shape))])
            cols = cols.reshape(n, group, cg, length)
        else:
            view = windows(padded, kernel, strides, dilations, out_shape)
            cols = view.reshape(n, group, cg * math.prod(kernel), length)
        y = xp.matmul(w.reshape(group, mg, -1), cols).reshape(n, m, *out_shape)
    if b is not None:
        y += b.reshape(1, m, *(1,) * nd)
    return y


def _depthwise(padded: Any, w: Any, kernel: tuple[int, ...], strides: tuple[int, ...],
               dilations: tuple[int, ...], out_shape: tuple[int, ...]) -> Any:
    xp = array_module(padded)
    n, c = padded.shape[:2]
    y = xp.zeros((n, c, *out_shape), dtype=xp.result_type(padded, w))
    nd = len(kernel)
    for offset in np.ndindex(*kernel):
        index = tuple(slice(o * d, o * d + (size - 1) * s + 1, s)
                      for o, d, s, size in zip(offset, dilations, strides, out_shape, strict=True))
        y += padded[(slice(None), slice(None), *index)] * w[(slice(None), 0, *offset)].reshape(
            1, c, *(1,) * nd)
    return y


class Conv(_FastOp):
    def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             pads=None, strides=None):
        if x.dtype not in (np.float32, np.float64) or x.ndim < 3:
            return self.reference(x, w, b)
        return (conv(x, w, b, auto_pad=auto_pad, dilations=dilations, group=group,
                     kernel_shape=kernel_shape, pads=pads, strides=strides).astype(x.dtype, copy=False),)


def _pool_geometry(x: Any, kernel_shape: Any, strides: Any, dilations: Any, pads: Any,
                   auto_pad: str | None, ceil_mode: int | None):
    nd = x.ndim - 2
    kernel = tuple(int(k) for k in kernel_shape)
    strides = tuple(int(s) for s in (strides or (1,) * nd))
    dilations = tuple(int(d) for d in (dilations or (1,) * nd))
    pads = resolve_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    out_shape, extra = [], []
    for i in range(nd):
        span = x.shape[2 + i] + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1
        out = (-(-span // strides[i]) if ceil_mode else span // strides[i]) + 1
        if ceil_mode and (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1  # a window may not start in the end padding
        out_shape.append(out)
        extra.append(max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                         - (x.shape[2 + i] + pads[i] + pads[i + nd])))
    return kernel, strides, dilations, pads, tuple(out_shape), extra


def max_pool(x: Any, *, kernel_shape: Any, strides: Any = None, pads: Any = None, dilations: Any = None,
             auto_pad: str | None = None, ceil_mode: int | None = None) -> Any:
    kernel, strides, dilations, pads, out_shape, extra = _pool_geometry(
        x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    nd = len(kernel)
    padded = _pad_spatial(x, pads[:nd] + [p + e for p, e in zip(pads[nd:], extra, strict=True)], -np.inf)
    return windows(padded, kernel, strides, dilations, out_shape).max(axis=tuple(range(2, 2 + nd)))


def average_pool(x: Any, *, kernel_shape: Any, strides: Any = None, pads: Any = None, dilations: Any = None,
                 auto_pad: str | None = None, ceil_mode: int | None = None,
                 count_include_pad: int | None = None) -> Any:
    """Divides by the elements each window covers: real ones, plus explicit pads if counted, never
    the extra end a ceil_mode window hangs over."""
    kernel, strides, dilations, pads, out_shape, extra = _pool_geometry(
        x, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    nd = len(kernel)
    end = [p + e for p, e in zip(pads[nd:], extra, strict=True)]
    axes = tuple(range(2, 2 + nd))
    total = windows(_pad_spatial(x, pads[:nd] + end), kernel, strides, dilations, out_shape).sum(axis=axes)
    ones = array_module(x).ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    if count_include_pad and (auto_pad or "NOTSET") == "NOTSET":
        mask = _pad_spatial(_pad_spatial(ones, pads, 1.0), [0] * nd + list(extra))
    else:
        mask = _pad_spatial(ones, pads[:nd] + end)
    return total / windows(mask, kernel, strides, dilations, out_shape).sum(axis=axes)


class MaxPool(_FastOp):
    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        if len(self.onnx_node.output) > 1 or x.dtype.kind != "f" or x.ndim < 3:
            return self.reference(x)
        return (max_pool(x, kernel_shape=kernel_shape, strides=strides, pads=pads, dilations=dilations,
                         auto_pad=auto_pad, ceil_mode=ceil_mode).astype(x.dtype, copy=False),)


class AveragePool(_FastOp):
    def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None,
             kernel_shape=None, pads=None, strides=None):
        if x.dtype.kind != "f" or x.ndim < 3:
            return self.reference(x)
        return (average_pool(x, kernel_shape=kernel_shape, strides=strides, pads=pads, dilations=dilations,
                             auto_pad=auto_pad, ceil_mode=ceil_mode,
                             count_include_pad=count_include_pad).astype(x.dtype, copy=False),)


class GlobalAveragePool(_FastOp):
    def _run(self, x):
        return (x.mean(axis=tuple(range(2, x.ndim)), keepdims=True).astype(x.dtype, copy=False),)


class _Coerced2D(_FastOp):
    """Softmax, LogSoftmax and Hardmax over rows: before opset 13 the input is flattened to 2-D at
    `axis` (default 1) and rows are the second dimension (onnx.reference applies the opset-13
    rule instead); from 13 rows run along `axis` (default -1). LogSoftmax is x - max - log(sum),
    as the spec's function body: onnx.reference takes log(softmax), -inf where softmax underflows."""

    def _run(self, x, axis=None):
        if x.ndim == 0 or x.size == 0:
            return self.reference(x)
        if self._run_params["opsets"][""] < 13:
            axis = (1 if axis is None else axis) % x.ndim
            flat = x.reshape(math.prod(x.shape[:axis]), -1)
            return (self.over_rows(flat).reshape(x.shape).astype(x.dtype, copy=False),)
        moved = np.moveaxis(x, -1 if axis is None else axis, -1)
        rows = self.over_rows(moved.reshape(-1, moved.shape[-1])).reshape(moved.shape)
        return (np.moveaxis(rows, -1, -1 if axis is None else axis).astype(x.dtype, copy=False),)

    def over_rows(self, flat):
        raise NotImplementedError


class Softmax(_Coerced2D):
    def over_rows(self, flat):
        exp = np.exp(flat - flat.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


class LogSoftmax(_Coerced2D):
    def over_rows(self, flat):
        shifted = flat - flat.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Hardmax(_Coerced2D):
    def over_rows(self, flat):
        out = np.zeros_like(flat)
        out[np.arange(flat.shape[0]), flat.argmax(axis=1)] = 1
        return out


class LRN(_FastOp):
    """Local response normalisation across channels (onnx.reference sums over the wrong axis)."""

    def _run(self, x, alpha=None, beta=None, bias=None, size=None):
        alpha, beta, bias = (1e-4 if alpha is None else alpha), (0.75 if beta is None else beta), \
            (1.0 if bias is None else bias)
        squares = np.square(x.astype(np.float64))
        before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
        padded = np.pad(squares, [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
        total = sum(padded[:, i:i + x.shape[1]] for i in range(size))
        return ((x / (bias + alpha / size * total) ** beta).astype(x.dtype),)


FAST_OPS: list[type[OpRun]] = [Conv, MaxPool, AveragePool, GlobalAveragePool, Softmax, LogSoftmax, Hardmax,
                               LRN]
