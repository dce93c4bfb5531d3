"""ONNX nodes -> OpenCL kernel launches, and so which nodes the OpenCL executor can claim.

`lower(node, graph)` returns the steps that compute a node with exact ONNX semantics, or None
when our kernels do not cover its op version, attributes, dtypes or shapes; the executor's
`supports_op` is just "lower() is not None", so claims and kernels cannot drift apart.
Kernels are specialised per node: shapes, strides and attributes become `#define`s of the
program, and constant operands (weights) are packed on the host once. Pure Python and numpy:
only the executor touches pyopencl.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
from onnx import numpy_helper

from hetero.executors.array_kernels import resolve_pads
from hetero.graph import Model, Node

MR = 6  # GEMM rows per work-item (6 x 16 accumulators fill 12 of the 16 AVX2 registers)
NR = 16  # GEMM columns per work-item: two float8 vectors
F32 = np.dtype(np.float32)


@cache
def program_source(program: str) -> str:
    return resources.files(__package__).joinpath(f"{program}.cl").read_text()


@dataclass(frozen=True)
class Kernel:
    """One specialised kernel: OpenCL C source with `#define`s, and its entry point."""

    source: str
    entry: str
    defines: tuple[tuple[str, Any], ...] = ()
    options: str = ""

    @classmethod
    def builtin(cls, program: str, entry: str, options: str = "", **defines: Any) -> Kernel:
        return cls(program_source(program), entry, tuple(defines.items()), options)

    @property
    def text(self) -> str:
        """The program to compile: the defines, then the source, of which only `entry` is wanted."""
        lines = [f"#define WANT_{self.entry}", *(f"#define {name} {value}" for name, value in self.defines)]
        return "\n".join([*lines, "#ifndef ACTIVATE", "#define ACTIVATE(x) (x)", "#endif", self.source])


@dataclass(frozen=True)
class Buffer:
    """Allocate a fresh device array for a value or a temporary."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype = F32


@dataclass(frozen=True)
class Const:
    """A value computed on the host once at compile time (packed weights, index tables)."""

    name: str
    make: Callable[[], np.ndarray] = field(compare=False)


@dataclass(frozen=True)
class View:
    """`name` is `source` with another shape, sharing its memory."""

    source: str
    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Launch:
    """Enqueue a kernel; args name device values, or are scalars passed by value."""

    kernel: Kernel
    global_size: tuple[int, ...]
    args: tuple[str | np.generic, ...]
    local_size: tuple[int, ...] | None = None  # None: the driver's choice


Step = Buffer | Const | View | Launch


class Graph:
    """What lowering reads of a model: static shapes, dtypes and constant values."""

    def __init__(self, model: Model):
        self.model = model
        self._initializers = {t.name: t for t in model.proto.graph.initializer}

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The static, non-empty shape of a tensor, else None."""
        info = self.model.tensor(name)
        if info.kind != "tensor" or not info.is_static or 0 in info.shape:
            return None
        return tuple(info.shape)

    def is_float(self, name: str) -> bool:
        return self.model.tensor(name).dtype == F32 and self.shape(name) is not None

    def is_const(self, name: str) -> bool:
        node = self.model.producer(name)
        return name in self._initializers or (node is not None and node.op_type == "Constant"
                                              and not node.domain and constant_value(node) is not None)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self.model.producer(name)
        if node is None or node.op_type != "Constant" or node.domain:
            return None
        return constant_value(node)


def constant_value(node: Node) -> np.ndarray | None:
    attrs = node.attributes
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def lower(node: Node, graph: Graph, *, act: Node | None = None, pad: Node | None = None) -> list[Step] | None:
    """The steps computing `node` (with a fused following activation / preceding Pad), or None."""
    if node.domain or node.since_version is None:
        return None
    handler = _HANDLERS.get(node.op_type)
    shapes = [graph.shape(name) for name in (*node.inputs[:1], *node.outputs) if name]
    if handler is None or any(s is None or math.prod(s) >= 2**31 for s in shapes):
        return None  # static shapes only; 32-bit index arithmetic
    if act is not None and unary_expression(act, graph) is None:
        return None
    if act is None and pad is None:
        return handler(node, graph)
    return handler(node, graph, act=act, pad=pad)


# -- helpers ----------------------------------------------------------------------------------------

def lit(value: float) -> str:
    """A float32 value as an exact OpenCL C literal."""
    v = float(np.float32(value))
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    return f"({v!r}f)"


def _text(value: Any, default: str) -> str:
    return value.decode() if isinstance(value, bytes) else (value or default)


def _floats(graph: Graph, names: Sequence[str]) -> bool:
    return all(graph.is_float(n) for n in names if n)


def _strides(shape: Sequence[int], out: Sequence[int]) -> list[int]:
    """Element strides of a contiguous `shape` broadcast (numpy rules) to `out`; 0 where broadcast."""
    full = (1,) * (len(out) - len(shape)) + tuple(shape)
    strides, step = [], 1
    for dim in reversed(full):
        strides.append(step if dim != 1 else 0)
        step *= dim
    return strides[::-1]


def _index_code(out: Sequence[int], operands: Sequence[Sequence[int]], targets: Sequence[str]) -> str:
    """C statements setting each target to its operand's offset for output index `i`.

    Adjacent dims that stay contiguous for every operand are merged, so a same-shape operand
    costs no arithmetic at all.
    """
    dims, strides = [], [[] for _ in operands]
    for axis, size in enumerate(out):
        if size == 1:
            continue
        if dims and all(s[-1] == st[axis] * size for s, st in zip(strides, operands, strict=True) if s):
            dims[-1] *= size
            for s, st in zip(strides, operands, strict=True):
                s[-1] = st[axis]
            continue
        dims.append(size)
        for s, st in zip(strides, operands, strict=True):
            s.append(st[axis])
    code = [f"{t} = 0;" for t in targets]
    if len(dims) == 1:
        return " ".join(f"{t} = i * {s[0]};" for t, s in zip(targets, strides, strict=True))
    code.append("uint t = (uint)i, d;")
    for axis in range(len(dims) - 1, -1, -1):
        code.append(f"d = t % {dims[axis]}; t /= {dims[axis]};" if axis else "d = t;")
        code += [f"{t} += d * {s[axis]};" for t, s in zip(targets, strides, strict=True) if s[axis]]
    return " ".join(code)


# -- unary activations ------------------------------------------------------------------------------

def _clip_bounds(node: Node, graph: Graph) -> tuple[float, float] | None:
    if node.since_version < 11:
        return (node.attributes.get("min", -3.4028234663852886e38),
                node.attributes.get("max", 3.4028234663852886e38))
    bounds = []
    for position, default in ((1, -math.inf), (2, math.inf)):
        name = node.inputs[position] if len(node.inputs) > position else ""
        if not name:
            bounds.append(default)
            continue
        value = graph.const(name)
        if value is None or value.dtype != F32 or value.size != 1:
            return None
        bounds.append(float(value.reshape(())))
    return bounds[0], bounds[1]


def unary_expression(node: Node, graph: Graph) -> str | None:
    """The op as a C expression of `x` (valid for float and float8), or None if not ours."""
    op, attrs, version = node.op_type, node.attributes, node.since_version
    if node.domain or version is None or not node.inputs or not graph.is_float(node.inputs[0]):
        return None
    if op == "Clip" and version >= 6:
        bounds = _clip_bounds(node, graph)
        if bounds is None:
            return None
        low, high = lit(bounds[0]), lit(bounds[1])
        lower_bounded = f"((x) < {low} ? {low} : (x))"  # maximum first, then minimum, as ONNX
        return f"({lower_bounded} > {high} ? {high} : {lower_bounded})"
    if op in ("HardSigmoid", "HardSwish"):
        if op == "HardSwish" and version < 14:
            return None
        alpha = lit(attrs.get("alpha", 0.2) if op == "HardSigmoid" else 1 / 6)
        beta = lit(attrs.get("beta", 0.5) if op == "HardSigmoid" else 0.5)
        line = f"({alpha} * (x) + {beta})"
        hard = f"({line} < 0.0f ? 0.0f : ({line} > 1.0f ? 1.0f : {line}))"
        return hard if op == "HardSigmoid" else f"((x) * {hard})"
    expressions = {
        "Relu": "((x) < 0.0f ? 0.0f : (x))",
        "LeakyRelu": f"((x) < 0.0f ? (x) * {lit(attrs.get('alpha', 0.01))} : (x))",
        "Sigmoid": "(1.0f / (1.0f + exp(-(x))))",
        "Tanh": "tanh(x)",
        "Exp": "exp(x)",
        "Sqrt": "sqrt(x)",
        "Erf": "erf(x)",
        "Neg": "(-(x))",
        "Abs": "fabs(x)",
    }
    if op not in expressions or version < (9 if op == "Erf" else 6):
        return None
    return expressions[op]


UNARY_OPS = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Exp", "Sqrt", "Erf", "HardSwish", "HardSigmoid",
             "Neg", "Abs")


def _unary(node: Node, graph: Graph) -> list[Step] | None:
    expression = unary_expression(node, graph)
    if expression is None:
        return None
    shape = graph.shape(node.outputs[0])
    kernel = Kernel.builtin("elementwise", "unary", **{"UNARY(x)": expression})
    return [Buffer(node.outputs[0], shape),
            Launch(kernel, (math.prod(shape),), (node.inputs[0], node.outputs[0]))]


# -- binary, with numpy broadcasting ----------------------------------------------------------------

_BINARY = {
    "Add": "((a) + (b))",
    "Sub": "((a) - (b))",
    "Mul": "((a) * (b))",
    "Div": "((a) / (b))",
    "Pow": "pow(a, b)",
    "Max": "((a) != (a) || (a) > (b) ? (a) : (b))",  # NaN wins, as numpy.maximum
    "Min": "((a) != (a) || (a) < (b) ? (a) : (b))",
}


def _binary_steps(op: str, a: str, b: str, out: str, a_shape: tuple, b_shape: tuple,
                  out_shape: tuple) -> list[Step]:
    offsets = _index_code(out_shape, [_strides(a_shape, out_shape), _strides(b_shape, out_shape)],
                          ["ia", "ib"])
    kernel = Kernel.builtin("elementwise", "binary", **{
        "BINARY(a, b)": _BINARY[op], "OFFSETS(i, ia, ib)": f"do {{ {offsets} }} while (0)"})
    return [Buffer(out, out_shape), Launch(kernel, (math.prod(out_shape),), (a, b, out))]


def _binary(node: Node, graph: Graph) -> list[Step] | None:
    variadic = node.op_type in ("Max", "Min")
    if node.since_version < (6 if variadic else 7) or not node.inputs or not _floats(graph, node.inputs):
        return None
    if not variadic and len(node.inputs) != 2:
        return None
    shapes = [graph.shape(name) for name in node.inputs]
    try:
        out_shape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return None
    if out_shape != graph.shape(node.outputs[0]):
        return None
    if len(node.inputs) == 1:
        return [View(node.inputs[0], node.outputs[0], out_shape)]
    steps: list[Step] = []
    current, current_shape = node.inputs[0], shapes[0]
    for position, (name, shape) in enumerate(zip(node.inputs[1:], shapes[1:], strict=True), start=1):
        last = position == len(node.inputs) - 1
        target = node.outputs[0] if last else f"{node.name}/partial{position}"
        target_shape = tuple(np.broadcast_shapes(current_shape, shape))
        steps += _binary_steps(node.op_type, current, name, target, current_shape, shape, target_shape)
        current, current_shape = target, target_shape
    return steps


# -- GEMM ---------------------------------------------------------------------------------------------

def pack_a(a: np.ndarray) -> np.ndarray:
    """(Z, M, K) -> MR-row panels (Z, ceil(M / MR), K, MR), zero-padded."""
    z, m, k = a.shape
    padded = np.zeros((z, -(-m // MR) * MR, k), np.float32)
    padded[:, :m] = a
    return np.ascontiguousarray(padded.reshape(z, -1, MR, k).transpose(0, 1, 3, 2))


def pack_b(b: np.ndarray) -> np.ndarray:
    """(Z, K, N) -> NR-column panels (Z, ceil(N / NR), K, NR), zero-padded."""
    z, k, n = b.shape
    padded = np.zeros((z, k, -(-n // NR) * NR), np.float32)
    padded[:, :, :n] = b
    return np.ascontiguousarray(padded.reshape(z, k, -1, NR).transpose(0, 2, 1, 3))


@dataclass(frozen=True)
class Operand:
    """A GEMM operand as a batch of matrices: a device value with element strides, or a constant."""

    name: str
    batches: int
    strides: tuple[int, int, int]  # batch, row (m or k), column (k or n)
    #: For a constant: its value as (batches, rows, cols), read only when compiling; packed on the host.
    value: Callable[[], np.ndarray] | None = field(default=None, compare=False)


def _operand(graph: Graph, name: str, batches: int, strides: tuple[int, int, int],
             matrices: Callable[[np.ndarray], np.ndarray]) -> Operand:
    """An operand; a constant one is packed on the host from `matrices(value)`."""
    value = (lambda: matrices(graph.const(name))) if graph.is_const(name) else None
    return Operand(name, batches, strides, value)


def _pack_steps(label: str, operand: Operand, side: str, m: int, n: int, k: int) -> tuple[list[Step], str]:
    packed = f"{label}/packed_{side}"
    if operand.value is not None:
        value = operand.value
        return [Const(packed, lambda: (pack_a if side == "a" else pack_b)(value()))], packed
    mb, nb = -(-m // MR), -(-n // NR)
    sb, s0, s1 = operand.strides
    if side == "a":
        kernel = Kernel.builtin("gemm", "pack_a", M=m, K=k, MR=MR, MB=mb, SAB=sb, SAM=s0, SAK=s1)
        size, shape = (k, mb, operand.batches), (operand.batches * mb * MR * k,)
    else:
        kernel = Kernel.builtin("gemm", "pack_b", N=n, K=k, NB=nb, SBB=sb, SBK=s0, SBN=s1)
        size, shape = (nb, k, operand.batches), (operand.batches * nb * NR * k,)
    return [Buffer(packed, shape), Launch(kernel, size, (operand.name, packed))], packed


@dataclass(frozen=True)
class Bias:
    """What the GEMM epilogue adds: `beta * bias[(z % groups) * group_stride + m * sm + n * sn]`."""

    name: str
    beta: float = 1.0
    groups: int = 1
    group_stride: int = 0
    sm: int = 1
    sn: int = 0


def gemm_steps(label: str, a: Operand, b: Operand | tuple[list[Step], str], out: str, *, m: int, n: int,
               k: int, bmap: np.ndarray, alpha: float = 1.0, bias: Bias | None = None,
               activation: str | None = None) -> list[Step]:
    """C[z] = act(alpha * A[bmap[z, 0]] @ B[bmap[z, 1]] + bias) into the (already allocated) `out`.

    `b` is an Operand, or the steps that leave packed panels in a named buffer (im2col).
    """
    steps, packed_a = _pack_steps(label, a, "a", m, n, k)
    b_steps, packed_b = _pack_steps(label, b, "b", m, n, k) if isinstance(b, Operand) else b
    steps += b_steps
    table = f"{label}/batches"
    steps.append(Const(table, lambda: np.ascontiguousarray(bmap, dtype=np.int32)))
    defines: dict[str, Any] = {"M": m, "N": n, "K": k, "MR": MR, "MB": -(-m // MR), "NB": -(-n // NR),
                               "ALPHA": lit(alpha), "BIAS": int(bias is not None)}
    if bias is not None:
        defines.update(BETA=lit(bias.beta), BG=bias.groups, BGS=bias.group_stride, BSM=bias.sm, BSN=bias.sn)
    if activation is not None:
        defines["ACTIVATE(x)"] = activation
    kernel = Kernel.builtin("gemm", "gemm", "-cl-mad-enable", **defines)
    args = (packed_a, packed_b, out, *((bias.name,) if bias else ()), table)
    mb = -(-m // MR)
    # Work-groups along the row panels of one column panel share its B panel in cache; PoCL's
    # own choice of work-group halves the throughput on convolution shapes.
    group = max(d for d in range(1, min(mb, 64) + 1) if mb % d == 0)
    steps.append(Launch(kernel, (mb, -(-n // NR), len(bmap)), args, (group, 1, 1)))
    return steps


def _activation(act: Node | None, graph: Graph) -> tuple[str | None, str | None]:
    """(expression, output name) of a fused activation."""
    if act is None:
        return None, None
    return unary_expression(act, graph), act.outputs[0]


def _matmul(node: Node, graph: Graph, *, act: Node | None = None,
            pad: Node | None = None) -> list[Step] | None:
    a_name, b_name = node.inputs[:2]
    if pad is not None or not _floats(graph, node.inputs):
        return None
    a_shape, b_shape = graph.shape(a_name), graph.shape(b_name)
    a2 = (1, *a_shape) if len(a_shape) == 1 else a_shape
    b2 = (*b_shape, 1) if len(b_shape) == 1 else b_shape
    (m, k), (k2, n) = a2[-2:], b2[-2:]
    try:
        batch = tuple(np.broadcast_shapes(a2[:-2], b2[:-2]))
    except ValueError:
        return None
    out_shape = (*batch, *(() if len(a_shape) == 1 else (m,)), *(() if len(b_shape) == 1 else (n,)))
    if k != k2 or out_shape != graph.shape(node.outputs[0]):
        return None
    expression, out = _activation(act, graph)
    a_batches, b_batches = math.prod(a2[:-2]), math.prod(b2[:-2])
    indices = [np.broadcast_to(np.arange(count).reshape(shape[:-2]), batch).ravel()
               for count, shape in ((a_batches, a2), (b_batches, b2))]
    bmap = np.stack(indices, axis=1) if batch else np.zeros((1, 2), np.int64)
    a = _operand(graph, a_name, a_batches, (m * k, k, 1), lambda v: v.reshape(a_batches, m, k))
    b = _operand(graph, b_name, b_batches, (k * n, n, 1), lambda v: v.reshape(b_batches, k, n))
    out = out or node.outputs[0]
    return [Buffer(out, out_shape),
            *gemm_steps(node.name, a, b, out, m=m, n=n, k=k, bmap=bmap, activation=expression)]


def _gemm(node: Node, graph: Graph, *, act: Node | None = None, pad: Node | None = None) -> list[Step] | None:
    if pad is not None or node.since_version < 7 or not _floats(graph, node.inputs):
        return None
    a_name, b_name = node.inputs[:2]
    c_name = node.inputs[2] if len(node.inputs) > 2 else ""
    attrs = node.attributes
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    a_shape, b_shape = graph.shape(a_name), graph.shape(b_name)
    if len(a_shape) != 2 or len(b_shape) != 2:
        return None
    m, k = a_shape[::-1] if trans_a else a_shape
    k2, n = b_shape[::-1] if trans_b else b_shape
    if k != k2 or graph.shape(node.outputs[0]) != (m, n):
        return None
    bias = None
    if c_name:
        c_shape = graph.shape(c_name)
        if len(c_shape) > 2:
            return None
        rows, cols = (1,) * (2 - len(c_shape)) + c_shape
        if rows not in (1, m) or cols not in (1, n):
            return None
        bias = Bias(c_name, float(attrs.get("beta", 1.0)), sm=cols if rows > 1 else 0, sn=int(cols > 1))
    expression, out = _activation(act, graph)
    a = _operand(graph, a_name, 1, (0, 1, m) if trans_a else (0, k, 1),
                 lambda v: (v.T if trans_a else v)[None])
    b = _operand(graph, b_name, 1, (0, 1, k) if trans_b else (0, n, 1),
                 lambda v: (v.T if trans_b else v)[None])
    out = out or node.outputs[0]
    return [Buffer(out, (m, n)),
            *gemm_steps(node.name, a, b, out, m=m, n=n, k=k, bmap=np.zeros((1, 2), np.int64),
                        alpha=float(attrs.get("alpha", 1.0)), bias=bias, activation=expression)]


# -- convolution -------------------------------------------------------------------------------------

def fusable_pad(node: Node, graph: Graph) -> list[int] | None:
    """Spatial (begin..., end...) pads of a Pad node that a following Conv can absorb, else None."""
    spec = _pad_spec(node, graph)
    if spec is None:
        return None
    pads, mode, value = spec
    rank = len(pads) // 2
    if mode != "constant" or value != 0.0 or rank < 3 or min(pads) < 0:
        return None
    if any(pads[:2]) or any(pads[rank:rank + 2]):
        return None
    return [*pads[2:rank], *pads[rank + 2:]]


def _conv(node: Node, graph: Graph, *, act: Node | None = None, pad: Node | None = None) -> list[Step] | None:
    x_name, w_name = node.inputs[:2]
    b_name = node.inputs[2] if len(node.inputs) > 2 else ""
    if not _floats(graph, node.inputs):
        return None
    attrs = node.attributes
    x_shape, w_shape = graph.shape(x_name), graph.shape(w_name)
    nd = len(x_shape) - 2
    if nd not in (1, 2) or len(w_shape) != nd + 2:
        return None
    kernel = tuple(attrs.get("kernel_shape", w_shape[2:]))
    strides = tuple(attrs.get("strides", (1,) * nd))
    dilations = tuple(attrs.get("dilations", (1,) * nd))
    group = attrs.get("group", 1)
    auto_pad = _text(attrs.get("auto_pad"), "NOTSET")
    if kernel != w_shape[2:] or len(strides) != nd or len(dilations) != nd:
        return None
    if pad is not None:
        extra = fusable_pad(pad, graph)
        if extra is None or auto_pad not in ("NOTSET", "VALID"):
            return None
        x_name, x_shape = pad.inputs[0], graph.shape(pad.inputs[0])
    else:
        extra = [0] * (2 * nd)
    pads = resolve_pads(auto_pad, x_shape[2:], kernel, strides, dilations, attrs.get("pads"))
    pads = [p + e for p, e in zip(pads, extra, strict=True)]
    batch, channels = x_shape[:2]
    m, cg = w_shape[:2]
    if min(pads) < 0 or cg * group != channels or m % group:
        return None
    out_spatial = tuple((size + pads[i] + pads[i + nd] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
                        for i, size in enumerate(x_shape[2:]))
    out_shape = (batch, m, *out_spatial)
    if out_shape != graph.shape(node.outputs[0]):
        return None
    expression, out = _activation(act, graph)
    out = out or node.outputs[0]
    # 1-D convolutions run as 2-D ones of height 1.
    (h, w), (oh, ow), (kh, kw) = ((1, *s) if nd == 1 else s for s in (x_shape[2:], out_spatial, kernel))
    (sh, sw), (dh, dw) = ((1, *s) if nd == 1 else s for s in (strides, dilations))
    pt, pl = (0, pads[0]) if nd == 1 else pads[:2]
    geometry = dict(H=h, W=w, OH=oh, OW=ow, KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dw, PT=pt, PL=pl)
    steps: list[Step] = [Buffer(out, out_shape)]
    mg = m // group
    if cg == 1 and group > 1:
        defines: dict[str, Any] = dict(C=channels, M=m, MG=mg, BIAS=int(bool(b_name)), **geometry)
        if expression is not None:
            defines["ACTIVATE(x)"] = expression
        args = (x_name, w_name, *((b_name,) if b_name else ()), out)
        return [*steps, Launch(Kernel.builtin("conv", "depthwise", **defines), (ow, oh, batch * m), args)]
    k, n = cg * kh * kw, oh * ow
    z = batch * group
    cols = f"{node.name}/cols"
    im2col = Kernel.builtin("conv", "im2col", CG=cg, K=k, N=n, NB=-(-n // NR), **geometry)
    b_steps = [Buffer(cols, (z * -(-n // NR) * NR * k,)), Launch(im2col, (-(-n // NR), k, z), (x_name, cols))]
    a = _operand(graph, w_name, group, (mg * k, k, 1), lambda v: v.reshape(group, mg, k))
    bmap = np.stack([np.arange(z) % group, np.arange(z)], axis=1)
    bias = Bias(b_name, groups=group, group_stride=mg) if b_name else None
    return steps + gemm_steps(node.name, a, (b_steps, cols), out, m=mg, n=n, k=k, bmap=bmap, bias=bias,
                              activation=expression)


# -- pooling ------------------------------------------------------------------------------------------

def _pool(node: Node, graph: Graph) -> list[Step] | None:
    """MaxPool / AveragePool over 1 or 2 spatial axes, with the geometry of `array_kernels`."""
    x_name = node.inputs[0]
    if not graph.is_float(x_name) or len([o for o in node.outputs if o]) != 1:
        return None
    attrs = node.attributes
    x_shape = graph.shape(x_name)
    nd = len(x_shape) - 2
    if nd not in (1, 2) or "kernel_shape" not in attrs:
        return None
    window = tuple(attrs["kernel_shape"])
    strides = tuple(attrs.get("strides") or (1,) * nd)
    dilations = tuple(attrs.get("dilations") or (1,) * nd)
    auto_pad = _text(attrs.get("auto_pad"), "NOTSET")
    if len(window) != nd or len(strides) != nd or len(dilations) != nd:
        return None
    pads = resolve_pads(auto_pad, x_shape[2:], window, strides, dilations, attrs.get("pads"))
    out_spatial = []
    for i, size in enumerate(x_shape[2:]):
        span = size + pads[i] + pads[i + nd] - (window[i] - 1) * dilations[i] - 1
        count = (-(-span // strides[i]) if attrs.get("ceil_mode") else span // strides[i]) + 1
        if attrs.get("ceil_mode") and (count - 1) * strides[i] >= size + pads[i]:
            count -= 1  # a window may not start in the end padding
        out_spatial.append(count)
    out_shape = (*x_shape[:2], *out_spatial)
    if out_shape != graph.shape(node.outputs[0]) or min(pads) < 0:
        return None
    (h, w), (oh, ow), (kh, kw), (sh, sw), (dh, dw) = (
        (1, *s) if nd == 1 else tuple(s) for s in (x_shape[2:], out_spatial, window, strides, dilations))
    begin = (0, pads[0]) if nd == 1 else tuple(pads[:2])
    end = (0, pads[1]) if nd == 1 else tuple(pads[2:])
    defines: dict[str, Any] = dict(H=h, W=w, OH=oh, OW=ow, KH=kh, KW=kw, SH=sh, SW=sw, DH=dh, DW=dw,
                                   PT=begin[0], PL=begin[1])
    entry = "maxpool" if node.op_type == "MaxPool" else "avgpool"
    if entry == "avgpool":
        include = attrs.get("count_include_pad", 0) and auto_pad == "NOTSET"
        defines.update(CH0=-begin[0] if include else 0, CH1=h + end[0] if include else h,
                       CW0=-begin[1] if include else 0, CW1=w + end[1] if include else w)
    launch = Launch(Kernel.builtin("pool", entry, **defines), (ow, oh, x_shape[0] * x_shape[1]),
                    (x_name, node.outputs[0]))
    return [Buffer(node.outputs[0], out_shape), launch]


def _global_average_pool(node: Node, graph: Graph) -> list[Step] | None:
    x_shape = graph.shape(node.inputs[0])
    if not graph.is_float(node.inputs[0]) or len(x_shape) < 3:
        return None
    kernel = Kernel.builtin("pool", "global_avgpool", SIZE=math.prod(x_shape[2:]))
    return [Buffer(node.outputs[0], graph.shape(node.outputs[0])),
            Launch(kernel, (x_shape[0] * x_shape[1],), (node.inputs[0], node.outputs[0]))]


# -- layout and the rest ------------------------------------------------------------------------------

def _softmax(node: Node, graph: Graph) -> list[Step] | None:
    if not graph.is_float(node.inputs[0]):
        return None
    shape = graph.shape(node.inputs[0])
    modern = node.since_version >= 13
    axis = node.attributes.get("axis", -1 if modern else 1)
    if not -len(shape) <= axis < max(len(shape), 1):
        return None
    axis %= max(len(shape), 1)
    outer = math.prod(shape[:axis])
    # Softmax-13 normalises along one axis; older versions over the flattened trailing axes.
    dim, inner = (shape[axis], math.prod(shape[axis + 1:])) if modern else (math.prod(shape[axis:]), 1)
    kernel = Kernel.builtin("layout", "softmax", DIM=dim, INNER=inner)
    return [Buffer(node.outputs[0], shape), Launch(kernel, (inner, outer), (node.inputs[0], node.outputs[0]))]


def _transpose(node: Node, graph: Graph) -> list[Step] | None:
    if not graph.is_float(node.inputs[0]):
        return None
    shape = graph.shape(node.inputs[0])
    perm = tuple(node.attributes.get("perm", range(len(shape) - 1, -1, -1)))
    if sorted(perm) != list(range(len(shape))):
        return None
    out_shape = tuple(shape[p] for p in perm)
    in_strides = _strides(shape, shape)
    strides = [in_strides[p] for p in perm]
    code = _index_code(out_shape, [strides], ["src"])
    kernel = Kernel.builtin("layout", "transpose", **{"SOURCE(i, src)": f"do {{ {code} }} while (0)"})
    return [Buffer(node.outputs[0], out_shape),
            Launch(kernel, (math.prod(out_shape),), (node.inputs[0], node.outputs[0]))]


def _concat(node: Node, graph: Graph) -> list[Step] | None:
    if node.since_version < 4 or not _floats(graph, node.inputs):
        return None
    out_shape = graph.shape(node.outputs[0])
    axis = node.attributes.get("axis", 0)
    if not -len(out_shape) <= axis < len(out_shape):
        return None
    axis %= len(out_shape)
    outer, inner = math.prod(out_shape[:axis]), math.prod(out_shape[axis + 1:])
    steps: list[Step] = [Buffer(node.outputs[0], out_shape)]
    offset = 0
    kernel = Kernel.builtin("layout", "copy_block")
    for name in node.inputs:
        shape = graph.shape(name)
        if len(shape) != len(out_shape) or any(
                s != o for i, (s, o) in enumerate(zip(shape, out_shape, strict=True)) if i != axis):
            return None
        row = shape[axis] * inner
        steps.append(Launch(kernel, (row, outer), (name, node.outputs[0], np.uint32(row),
                                                   np.uint32(out_shape[axis] * inner), np.uint32(offset))))
        offset += row
    return steps if offset == out_shape[axis] * inner else None


def _view(node: Node, graph: Graph) -> list[Step] | None:
    """Reshape, Flatten, Squeeze, Unsqueeze, Identity: the data unchanged under the inferred shape."""
    minimum = {"Reshape": 5}.get(node.op_type, 1)
    shape, out_shape = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    if node.since_version < minimum or not graph.is_float(node.inputs[0]):
        return None
    if math.prod(shape) != math.prod(out_shape):
        return None
    return [View(node.inputs[0], node.outputs[0], out_shape)]


def _pad_spec(node: Node, graph: Graph) -> tuple[list[int], str, float] | None:
    """(pads, mode, value) of a Pad node whose parameters are constants, else None."""
    attrs = node.attributes
    mode = _text(attrs.get("mode"), "constant")
    rank = len(graph.shape(node.inputs[0]))
    if node.since_version < 11:
        pads, value = list(attrs.get("pads", ())), float(attrs.get("value", 0.0))
    else:
        names = [*node.inputs[1:], "", ""]
        pads_value = graph.const(names[0])
        if pads_value is None:
            return None
        pads = [int(p) for p in pads_value.ravel()]
        value = 0.0
        if names[1]:
            constant = graph.const(names[1])
            if constant is None or constant.dtype != F32 or constant.size != 1:
                return None
            value = float(constant.reshape(()))
        if names[2]:
            axes = graph.const(names[2])
            if axes is None:
                return None
            axes = [int(a) % rank for a in axes.ravel()]
            if len(set(axes)) != len(axes) or len(pads) != 2 * len(axes):
                return None
            full = [0] * (2 * rank)
            for i, a in enumerate(axes):
                full[a], full[a + rank] = pads[i], pads[i + len(axes)]
            pads = full
    if len(pads) != 2 * rank or mode not in ("constant", "edge", "reflect"):
        return None
    return pads, mode, value


def _pad(node: Node, graph: Graph) -> list[Step] | None:
    if node.since_version < 2 or not graph.is_float(node.inputs[0]):
        return None
    spec = _pad_spec(node, graph)
    if spec is None:
        return None
    pads, mode, value = spec
    shape, out_shape = graph.shape(node.inputs[0]), graph.shape(node.outputs[0])
    rank = len(shape)
    if out_shape != tuple(s + pads[i] + pads[i + rank] for i, s in enumerate(shape)):
        return None
    reach = [size - 1 if mode == "reflect" else math.inf for size in shape]  # one reflection at most
    if mode != "constant" and (min(pads) < 0 or any(max(pads[i], pads[i + rank]) > reach[i]
                                                    for i in range(rank))):
        return None
    if rank >= 2 and not any(pads[:rank - 2] + pads[rank:2 * rank - 2]):
        return _pad2d(node, shape, out_shape, pads[rank - 2::rank], pads[rank - 1::rank], mode, value)
    strides = _strides(shape, shape)
    code = ["src = 0; inside = 1; uint t = (uint)i; int s;"]
    for axis in range(rank - 1, -1, -1):
        size, begin = shape[axis], pads[axis]
        code.append(f"s = (int)(t % {out_shape[axis]}) - {begin}; t /= {out_shape[axis]};")
        if mode == "constant":
            code.append(f"inside = inside && s >= 0 && s < {size};")
        elif mode == "edge":
            code.append(f"s = s < 0 ? 0 : (s >= {size} ? {size - 1} : s);")
        else:
            code.append(f"s = s < 0 ? -s : (s >= {size} ? {2 * (size - 1)} - s : s);")
        code.append(f"src += s * {strides[axis]};")
    kernel = Kernel.builtin("layout", "pad", VALUE=lit(value),
                            **{"SOURCE(i, src, inside)": f"do {{ {' '.join(code)} }} while (0)"})
    return [Buffer(node.outputs[0], out_shape),
            Launch(kernel, (math.prod(out_shape),), (node.inputs[0], node.outputs[0]))]


def _pad_index(size: int, begin: int, mode: str) -> str:
    """C expression of the source index of output index `i` along one padded axis; -1 outside."""
    s = f"((i) - {begin})"
    if mode == "constant":
        return f"({s} >= 0 && {s} < {size} ? {s} : -1)"
    if mode == "edge":
        return f"({s} < 0 ? 0 : ({s} >= {size} ? {size - 1} : {s}))"
    return f"({s} < 0 ? -{s} : ({s} >= {size} ? {2 * (size - 1)} - {s} : {s}))"


def _pad2d(node: Node, shape: tuple, out_shape: tuple, pads_h: list[int], pads_w: list[int], mode: str,
           value: float) -> list[Step]:
    """Pad of the last two axes: no index arithmetic over the leading ones."""
    h, w, oh, ow = *shape[-2:], *out_shape[-2:]
    kernel = Kernel.builtin("layout", "pad2d", H=h, W=w, OH=oh, OW=ow, VALUE=lit(value), **{
        "SOURCE_H(i)": _pad_index(h, pads_h[0], mode), "SOURCE_W(i)": _pad_index(w, pads_w[0], mode)})
    return [Buffer(node.outputs[0], out_shape),
            Launch(kernel, (ow, oh, math.prod(shape[:-2])), (node.inputs[0], node.outputs[0]))]


_COORDINATES = ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel")
_NEAREST = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")


def resize_table(size: int, out: int, scale: float, coordinates: str, mode: str,
                 nearest: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, with the coordinate rules of ONNX Resize.

    Linear: two (index, weight) pairs per output position; nearest: one index. Mirrors
    `onnx.reference`: the neighbours are the two nearest positions (the left one on a tie),
    clamped into the input, weighted (1 - ratio, ratio) with ratio in (0, 1].
    """
    y = np.arange(out, dtype=np.float64)
    if math.isclose(scale, 1.0) and out == size:
        x = y
    elif coordinates == "align_corners":
        x = np.zeros(out) if scale * size == 1 else y * (size - 1) / (scale * size - 1)
    elif coordinates == "asymmetric":
        x = y / scale
    elif coordinates == "pytorch_half_pixel" and scale * size == 1:
        x = np.full(out, -0.5)
    else:
        x = (y + 0.5) / scale - 0.5
    floor = np.floor(x)
    integer = x == floor
    ratio = np.where(integer, 1.0, x - floor)
    left = np.where(integer, floor - 1, floor).astype(np.int64)
    pair = np.clip(np.stack([left, left + 1], axis=1), 0, size - 1).astype(np.int32)
    if mode == "linear":
        weights = np.stack([1 - ratio, ratio], axis=1).astype(np.float32)
        return pair.ravel(), weights.ravel()
    if nearest == "floor":
        right = np.zeros(out, bool)
    elif nearest == "ceil":
        right = np.ones(out, bool)
    elif nearest == "round_prefer_floor":
        right = ratio > 0.5
    else:
        right = ratio >= 0.5
    right |= integer
    return np.where(right, pair[:, 1], pair[:, 0]).astype(np.int32), np.zeros(0, np.float32)


def _resize(node: Node, graph: Graph) -> list[Step] | None:
    attrs = node.attributes
    x_name = node.inputs[0]
    if node.since_version < 11 or not graph.is_float(x_name):
        return None
    mode = _text(attrs.get("mode"), "nearest")
    coordinates = _text(attrs.get("coordinate_transformation_mode"), "half_pixel")
    nearest = _text(attrs.get("nearest_mode"), "round_prefer_floor")
    if (mode not in ("nearest", "linear") or coordinates not in _COORDINATES or nearest not in _NEAREST
            or attrs.get("antialias", 0) or "axes" in attrs or attrs.get("exclude_outside", 0)
            or _text(attrs.get("keep_aspect_ratio_policy"), "stretch") != "stretch"):
        return None
    shape, out_shape = graph.shape(x_name), graph.shape(node.outputs[0])
    if len(shape) != 4:
        return None
    names = [*node.inputs[2:], "", ""]
    scales = graph.const(names[0]) if names[0] else None
    sizes = graph.const(names[1]) if names[1] else None
    if scales is not None and scales.size:
        if scales.dtype != F32 or scales.size != 4:
            return None
        factors = [float(s) for s in scales]
        expected = tuple(int(f * s) for f, s in zip(factors, shape, strict=True))
    elif sizes is not None and sizes.size == 4:
        expected = tuple(int(s) for s in sizes)
        factors = [o / s for o, s in zip(expected, shape, strict=True)]
    else:
        return None
    if expected != out_shape or out_shape[:2] != shape[:2] or factors[:2] != [1.0, 1.0]:
        return None
    tables = [resize_table(shape[axis], out_shape[axis], factors[axis], coordinates, mode, nearest)
              for axis in (2, 3)]
    label = node.name
    steps: list[Step] = [Buffer(node.outputs[0], out_shape)]
    for axis, (index, weight) in zip("hw", tables, strict=True):
        steps.append(Const(f"{label}/{axis}_index", lambda index=index: index))
        steps.append(Const(f"{label}/{axis}_weight", lambda weight=weight: weight if weight.size else
                           np.zeros(1, np.float32)))
    kernel = Kernel.builtin("layout", "resize", H=shape[2], W=shape[3], OH=out_shape[2], OW=out_shape[3],
                            NEAREST=int(mode == "nearest"))
    args = (x_name, f"{label}/h_index", f"{label}/h_weight", f"{label}/w_index", f"{label}/w_weight",
            node.outputs[0])
    return [*steps, Launch(kernel, (out_shape[3], out_shape[2], shape[0] * shape[1]), args)]


def _constant(node: Node, graph: Graph) -> list[Step] | None:
    value = constant_value(node)
    if value is None or value.dtype not in (F32, np.dtype(np.int64)) or not value.size:
        return None
    return [Const(node.outputs[0], lambda: value)]


_HANDLERS: dict[str, Callable[..., list[Step] | None]] = {
    **dict.fromkeys(UNARY_OPS, _unary),
    **dict.fromkeys(_BINARY, _binary),
    **dict.fromkeys(("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"), _view),
    **dict.fromkeys(("MaxPool", "AveragePool"), _pool),
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "GlobalAveragePool": _global_average_pool,
    "Softmax": _softmax,
    "Transpose": _transpose,
    "Concat": _concat,
    "Pad": _pad,
    "Resize": _resize,
    "Constant": _constant,
}

#: Ops whose output can carry a fused activation (the GEMM and depthwise epilogues apply it).
FUSES_ACTIVATION = ("Conv", "Gemm", "MatMul")
