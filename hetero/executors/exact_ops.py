"""The numpy executor's own kernels where `onnx.reference` computes other numbers than the spec.

Each was found by the differential harness (`benchmarks/exactness.py`) running the backend node
tests converted to older opsets and generated cases against ONNX Runtime and the spec's formulas;
each class says what the reference gets wrong. They plug into the reference evaluator as
overriding ops (by op type, all versions), so a class handles every version of its op, handing
the versions the reference gets right back to it (`_Fix.reference`). `declines(node)` names
what no kernel here computes exactly, so the executor does not claim it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.reference.op_run import OpRun
from onnx.reference.ops import load_op
from onnx.reference.ops.op_grid_sample import GridSample as ReferenceGridSample
from onnx.reference.ops.op_gru import GRU as ReferenceGRU
from onnx.reference.ops.op_resize import Resize as ReferenceResize
from onnx.reference.ops.op_roi_align import RoiAlign as ReferenceRoiAlign


class _Fix(OpRun):
    op_domain = ""

    def __init__(self, onnx_node: Any, run_params: dict[str, Any], schema: Any = None):
        version = run_params["opsets"][""]
        own = onnx.defs.get_schema(onnx_node.op_type, version, "")
        super().__init__(onnx_node, run_params, schema or own)  # defaults and checks of this version
        self.version = version
        self._fallback: OpRun | None = None

    def reference(self, *inputs: Any) -> tuple:
        """The onnx.reference kernel of the same node (for the versions it gets right)."""
        if self._fallback is None:
            cls = load_op("", self.onnx_node.op_type, self.version)
            self._fallback = cls(self.onnx_node, self.run_params)
        return self._fallback.run(*inputs)


def _since(op_type: str, version: int) -> int:
    return onnx.defs.get_schema(op_type, version, "").since_version


#: Op versions no kernel here or in onnx.reference computes.
UNIMPLEMENTED = {("Upsample", 1): "Upsample-1 (height_scale, width_scale) is not implemented"}


def declines(node: onnx.NodeProto, version: int) -> str | None:
    """Why the numpy executor must not claim this node of the default domain, if it must not."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "BatchNormalization":
        if version < 6:
            return "BatchNormalization-1 (consumed_inputs) is not implemented"
        if version < 7 and not attrs.get("is_test", 0):
            return "training mode of BatchNormalization-6 is not implemented"
        if version < 14 and any(node.output[1:]):
            return "training-mode outputs of BatchNormalization before opset 14 are not implemented"
    if op in ("GRU", "LSTM", "RNN"):
        ignored = [a for a in ("activations", "activation_alpha", "activation_beta", "clip") if a in attrs]
        if len(node.input) > 4 and node.input[4]:
            ignored.append("sequence_lens")
        if attrs.get("input_forget", 0):
            ignored.append("input_forget")
        if ignored:
            return f"onnx.reference's {op} ignores {', '.join(ignored)}"
    if op == "Scan" and version < 9 and len(node.input) and node.input[0]:
        return "Scan-8 sequence_lens are not implemented"
    if op == "Resize" and attrs.get("coordinate_transformation_mode") == b"tf_half_pixel_for_nn" \
            and attrs.get("mode", b"nearest") != b"nearest":
        return "tf_half_pixel_for_nn is implemented for nearest mode only"
    return None


class BatchNormalization(_Fix):
    """Inference mode for every version: the reference runs BatchNormalization-7..13 in training
    mode (batch statistics) whatever outputs are asked for, and ignores spatial=0 (6..8)."""

    def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
             is_test=None, spatial=None, consumed_inputs=None):
        if self.version >= 14 and training_mode:
            return self.reference(x, scale, bias, mean, var)
        epsilon = 1e-5 if epsilon is None else epsilon
        # spatial=0: statistics per activation, of shape (C, D1, ..., Dn)
        shape = (1, *scale.shape) if spatial == 0 else (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
        return ((y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype),)


_ROUNDING = {"round_prefer_floor": lambda c: np.ceil(c - 0.5),
             "round_prefer_ceil": lambda c: np.floor(c + 0.5), "floor": np.floor, "ceil": np.ceil}


def _nearest(x: np.ndarray, sizes: list[int], scales: np.ndarray, offset: float, rounding: Any) -> np.ndarray:
    """Nearest-neighbour resize axis by axis: output index i reads input index
    rounding((i + offset) / scale), clamped to the axis; `rounding(coordinates, scale)`."""
    for axis, (out, scale) in enumerate(zip(sizes, scales, strict=True)):
        size = x.shape[axis]
        if out == size and scale == 1:
            continue
        source = (np.arange(out, dtype=np.float32) + np.float32(offset)) / np.float32(scale)
        index = rounding(source, scale).astype(np.int64)
        x = np.take(x, np.clip(index, 0, size - 1), axis=axis)
    return x


def _upsample_10(x: np.ndarray, scales: np.ndarray, mode: str) -> np.ndarray:
    """Upsample-7/9 and Resize-10: output size floor(scale * size) and source coordinate
    out / scale (asymmetric), both in float32; nearest takes floor(coordinate), ceil when the
    axis shrinks (what ONNX Runtime and the opset-10 backend data do), linear interpolates."""
    scales = np.asarray(scales, np.float32).reshape(-1)
    if mode == "linear":
        (y,) = ReferenceResize._run(None, x, None, scales, None, mode="linear",
                                    coordinate_transformation_mode="asymmetric", exclude_outside=0,
                                    extrapolation_value=0.0, keep_aspect_ratio_policy="stretch", antialias=0,
                                    cubic_coeff_a=-0.75)
        return y
    if mode != "nearest":
        raise ValueError(f"mode {mode!r} is not one of nearest, linear")
    sizes = [int(scale * np.float32(size)) for scale, size in zip(scales, x.shape, strict=True)]
    return _nearest(x, sizes, scales, 0.0, lambda c, scale: np.ceil(c) if scale < 1 else np.floor(c))


class Resize(_Fix):
    """Resize-10 (inputs X, scales): the reference takes its scales for Resize-11's roi and fails.
    Resize-11's tf_half_pixel_for_nn: the reference does not know it."""

    def _run(self, x, *inputs, **attributes):
        if self.version < 11:
            return (_upsample_10(x, inputs[0], attributes.get("mode") or "nearest"),)
        if attributes.get("coordinate_transformation_mode") != "tf_half_pixel_for_nn":
            return self.reference(x, *inputs)
        scales, sizes = [*inputs[1:], None, None][:2]
        if sizes is not None and sizes.size:
            sizes = [int(s) for s in sizes]
            scales = np.array([o / i for o, i in zip(sizes, x.shape, strict=True)], np.float32)
        else:
            scales = np.asarray(scales, np.float32)
            sizes = [int(s * n) for s, n in zip(scales.astype(np.float64), x.shape, strict=True)]
        rounding = _ROUNDING[attributes.get("nearest_mode") or "round_prefer_floor"]
        return (_nearest(x, sizes, scales, 0.5, lambda c, scale: rounding(c)),)


class Upsample(_Fix):
    """Upsample-7 (scales attribute) and -9 (scales input): the reference takes only an input and
    only integer nearest scales."""

    def _run(self, x, scales=None, mode=None):
        return (_upsample_10(x, scales, mode or "nearest"),)


def _lower(text: str) -> str:
    """Character by character, as C's towlower: a character whose case mapping is longer stays."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def _upper(text: str) -> str:
    return "".join(up if len(up := c.upper()) == 1 else c for c in text)


class StringNormalizer(_Fix):
    """Drops the elements equal to a stopword (ignoring case unless is_case_sensitive), then
    changes case character by character, as the spec and ONNX Runtime do; the reference removes
    stopwords inside strings, drops empty strings, strips accents, maps case by Unicode's full
    rules ("ß" -> "SS") and gives numpy str arrays rather than object arrays."""

    def _run(self, x, case_change_action=None, is_case_sensitive=None, locale=None, stopwords=None):
        action = case_change_action or "NONE"
        if action not in ("NONE", "LOWER", "UPPER"):
            raise ValueError(f"case_change_action {action!r} is not one of NONE, LOWER, UPPER")
        if x.ndim not in (1, 2) or (x.ndim == 2 and x.shape[0] != 1):
            raise ValueError(f"StringNormalizer takes a [C] or [1, C] tensor, not {list(x.shape)}")
        fold = (lambda s: s) if is_case_sensitive else _lower
        stops = {fold(w) for w in stopwords or ()}
        kept = [w for w in x.reshape(-1).tolist() if fold(w) not in stops]
        change = {"LOWER": _lower, "UPPER": _upper}.get(action)
        kept = [change(w) for w in kept] if change else kept
        y = np.array(kept or [""], dtype=object)
        return (y.reshape(1, -1) if x.ndim == 2 else y,)


def _empty_scan(body: Any, index: int) -> np.ndarray:
    """A zero-trip scan output: zero rows of the body output's element type and shape (unknown
    dims as 0)."""
    graph = body.onnx_graph_
    tensor_type = graph.output[index].type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type or onnx.TensorProto.FLOAT)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor_type.shape.dim]
    return np.zeros((0, *dims), dtype=dtype)


class Loop(_Fix):
    """Scan outputs are stacked along a new first axis, as the spec says (the reference `vstack`s
    them, which turns N scalars into an [N, 1] tensor), and a loop that runs zero times gives
    them zero rows of the body output's type and shape (the reference gives float64 [0])."""

    def __init__(self, onnx_node: Any, run_params: dict[str, Any], schema: Any = None):
        super().__init__(onnx_node, run_params, schema)
        self.n_carried = len(self.body.input_names) - 2
        self.n_scans = len(self.body.output_names) - self.n_carried - 1

    def need_context(self) -> bool:
        return True

    def _run(self, M, cond, *args, context=None, body=None, attributes=None, bindings=None):
        names = self.body.input_names
        inputs = dict.fromkeys(names)
        inputs.update(context or {})
        carried = list(args)
        scans: list[list] = [[] for _ in range(self.n_scans)]
        iteration = 0
        while (cond is None or cond) and (M is None or iteration < M):
            inputs.update(zip(names[2:], carried, strict=False))
            inputs[names[0]] = np.array(iteration, dtype=np.int64)
            inputs[names[1]] = np.array(True) if cond is None else cond
            outputs = self._run_body(inputs, attributes=attributes, bindings=bindings)
            cond = outputs[0]
            carried = list(outputs[1:1 + self.n_carried])
            for k in range(self.n_scans):
                scans[k].append(outputs[1 + self.n_carried + k])
            iteration += 1
        stacked = [np.stack(values) if values else _empty_scan(self.body, 1 + self.n_carried + k)
                   for k, values in enumerate(scans)]
        return self._check_and_fix_outputs(tuple(carried + stacked))


class Scan(_Fix):
    """Every version: scan axes and reverse directions (the reference takes only axis 0 forwards),
    Scan-8's batch axis, and zero-length scans (the reference raises)."""

    def need_context(self) -> bool:
        return True

    def _run(self, *args, context=None, body=None, num_scan_inputs=None, scan_input_axes=None,
             scan_input_directions=None, scan_output_axes=None, scan_output_directions=None,
             directions=None, attributes=None, bindings=None):
        m = self.num_scan_inputs
        if self.version < 9:  # Scan-8: [sequence_lens], then states and scans with a batch axis
            args = args[1:]
            batch = args[0].shape[0] if args else 0
            runs = [self._scan([a[b] for a in args], m, directions, None, None, None, context,
                               attributes, bindings) for b in range(batch)]
            return tuple(np.stack([run[i] for run in runs]) for i in range(len(self.body.output_names)))
        return tuple(self._scan(list(args), m, scan_input_directions, scan_input_axes,
                                scan_output_directions, scan_output_axes, context, attributes, bindings))

    def _scan(self, args, m, in_directions, in_axes, out_directions, out_axes, context, attributes,
              bindings) -> list:
        n = len(args) - m
        states, scans = list(args[:n]), []
        for i, value in enumerate(args[n:]):
            axis = (in_axes[i] if in_axes else 0) % max(value.ndim, 1)
            value = np.moveaxis(value, axis, 0)
            scans.append(value[::-1] if in_directions and in_directions[i] else value)
        names = self.body.input_names
        steps = scans[0].shape[0] if scans else 0
        inputs = dict(context or {})
        collected: list[list] = [[] for _ in self.body.output_names[n:]]
        for t in range(steps):
            inputs.update(zip(names[:n], states, strict=True))
            inputs.update(zip(names[n:], (s[t] for s in scans), strict=True))
            outputs = self._run_body(inputs, attributes=attributes, bindings=bindings)
            states = list(outputs[:n])
            for k, value in enumerate(outputs[n:]):
                collected[k].append(value)
        results = list(states)
        for k, values in enumerate(collected):
            y = np.stack(values) if values else _empty_scan(self.body, n + k)
            if out_directions and out_directions[k]:
                y = y[::-1]
            axis = (out_axes[k] if out_axes else 0) % y.ndim
            results.append(np.ascontiguousarray(np.moveaxis(y, 0, axis)))
        return results


class Concat(_Fix):
    """Concat-1's axis is optional (default 1); the reference requires it."""

    def _run(self, *inputs, axis=None):
        return (np.concatenate(inputs, axis=1 if axis is None else axis),)


class GlobalMaxPool(_Fix):
    """The max over every spatial axis (2 onwards); the reference takes the last two axes, which
    for a 3-D input (magika's tf2onnx export) is the channel axis too, and for 5-D misses one."""

    def _run(self, x):
        return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


class Tile(_Fix):
    """Tile-1 repeats along one axis (inputs x, tiles, axis); the reference knows only -6's repeats."""

    def _run(self, x, repeats, axis=None):
        if self.version >= 6:
            return self.reference(x, repeats)
        counts = [1] * x.ndim
        counts[int(axis)] = int(repeats)
        return (np.tile(x, counts),)


class Cast(_Fix):
    """Cast-1 names its target type by a string ("FLOAT"); the reference takes only the number."""

    def _run(self, x, to=None, saturate=None, round_mode=None):
        if not isinstance(to, str | bytes):
            return self.reference(x)
        name = to.decode() if isinstance(to, bytes) else to
        return (x.astype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(name))),)


class RoiAlign(ReferenceRoiAlign):
    """RoiAlign-10 has no coordinate_transformation_mode and does not shift by half a pixel; the
    reference applies -16's default, half_pixel."""

    def _run(self, x, rois, batch_indices, coordinate_transformation_mode=None, **attributes):
        if self.run_params["opsets"][""] < 16:
            coordinate_transformation_mode = "output_half_pixel"
        return super()._run(x, rois, batch_indices,
                            coordinate_transformation_mode=coordinate_transformation_mode, **attributes)


class Optional(_Fix):
    """An optional is its value, or None when empty: the reference wraps it in a list, so an empty
    optional has an element and OptionalGetElement hands back the list."""

    def _run(self, x=None, type=None):
        return (x,)

    def run(self, *inputs: Any, **_: Any) -> tuple:  # the reference's checks refuse None as an output
        return self._run(*inputs)


class GRU(ReferenceGRU):
    """GRU-1's schema spells its default direction "foward", which the reference rejects."""

    def _step(self, *args: Any, **kwargs: Any) -> tuple:
        if self.direction == "foward":
            self.direction = "forward"
        return super()._step(*args, **kwargs)


class GridSample(ReferenceGridSample):
    """GridSample-16 names its modes bilinear and bicubic; the reference knows only -20's names."""

    def _run(self, x, grid, mode=None, padding_mode=None, align_corners=None):
        mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
        return super()._run(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "iu":  # truncation toward zero, as C
        quotient = np.floor_divide(a, b)
        return quotient + ((np.remainder(a, b) != 0) & ((a < 0) ^ (b < 0))).astype(quotient.dtype)
    return np.divide(a, b)


_LEGACY_BROADCAST = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _divide, "Pow": np.power,
                     "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
                     "Equal": np.equal, "Less": np.less, "Greater": np.greater}


def _legacy(name: str) -> type[OpRun]:
    """Binary ops before opset 7 broadcast only when `broadcast=1`, B aligned with A at `axis`
    (suffix matching without it); the reference rejects those attributes."""

    def _run(self, a, b, axis=None, broadcast=None, consumed_inputs=None):
        if self.version >= 7:
            return self.reference(a, b)
        if broadcast and axis is not None:
            axis = axis % a.ndim
            b = b.reshape(b.shape + (1,) * (a.ndim - axis - b.ndim))
        y = _LEGACY_BROADCAST[name](a, b)
        return (y.astype(a.dtype) if y.dtype != np.bool_ else y,)

    return type(name, (_Fix,), {"_run": _run})


def strings_as_objects(value: Any) -> Any:
    """ONNX string tensors as numpy object arrays (the reference hands out fixed-width str arrays)."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return value.astype(object)
    return value


EXACT_OPS: list[type[OpRun]] = [
    BatchNormalization, Resize, Upsample, StringNormalizer, Loop, Scan, Concat, GlobalMaxPool, Tile, Cast,
    RoiAlign, Optional, GRU, GridSample, *(_legacy(name) for name in _LEGACY_BROADCAST)]
