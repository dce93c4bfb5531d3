"""`hetero.load`: read an ONNX model from a path, bytes or a ModelProto, validate it, view it.

Validation happens once, here, so that every later layer can trust the graph: a bad model fails
with one `ModelError` subclass whose message names the file and the node, tensor or field.
"""

from __future__ import annotations

import contextlib
import graphlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import google.protobuf.message
import numpy as np
import onnx
import onnx.checker
import onnx.defs
import onnx.external_data_helper
import onnx.shape_inference
from onnx import helper

from hetero import domains, kernels
from hetero.errors import (
    DanglingInputError,
    GraphCycleError,
    InvalidModelError,
    MissingInitializerError,
    ModelDecodeError,
    ModelNotFoundError,
    UnknownDomainError,
    UnsupportedOpsetError,
)
from hetero.graph.fold import fold_constants
from hetero.graph.model import Model, outer_scope_inputs, tensor_info

MIN_OPSET = 1
MAX_OPSET = onnx.defs.onnx_opset_version()
ModelSource = str | os.PathLike | bytes | bytearray | memoryview | onnx.ModelProto | Model


@cache
def _known_domains() -> frozenset[str]:
    return frozenset({s.domain for s in onnx.defs.get_all_schemas_with_history()} | {"", "ai.onnx"})


def load(source: ModelSource, *, name: str | None = None, fold: bool = True) -> Model:
    """Load and validate an ONNX model; returns the read-only `Model` view.

    With `fold`, nodes computing only on constants are evaluated once (exactly, by the reference
    kernels) and replaced by initializers; `Model.folded` says how many.

    Raises a `hetero.ModelError` subclass naming the file, node, tensor or field at fault:
    ModelNotFoundError, ModelDecodeError, UnsupportedOpsetError, UnknownDomainError,
    MissingInitializerError, DanglingInputError, GraphCycleError, InvalidModelError.
    """
    if isinstance(source, Model):
        return source
    base_dir = None
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        label = name or source.graph.name or "<ModelProto>"
    elif isinstance(source, bytes | bytearray | memoryview):
        label = name or "<bytes>"
        proto = _decode(bytes(source), label)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        label = name or str(path)
        if not path.exists():
            raise ModelNotFoundError(f"model file {label!r} does not exist")
        if not path.is_file():
            raise ModelNotFoundError(f"model path {label!r} is not a file")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelNotFoundError(f"model file {label!r} cannot be read: {exc}") from exc
        proto = _decode(data, label)
        base_dir = str(path.parent)
    else:
        raise TypeError(f"hetero.load takes a path, bytes or onnx.ModelProto, not {type(source).__name__}")
    proto = validate(proto, label, base_dir)
    folded = fold_constants(proto) if fold else 0
    if folded:
        proto = _infer_shapes(proto, label)
    return Model(proto, label, folded)


def _decode(data: bytes, label: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as exc:
        raise ModelDecodeError(
            f"model {label!r} is not an ONNX model ({len(data)} bytes could not be decoded as a "
            f"ModelProto: truncated or another format): {exc}") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        missing = "ir_version" if proto.ir_version <= 0 else "graph"
        raise ModelDecodeError(
            f"model {label!r} is not an ONNX model: the decoded ModelProto has no {missing} "
            f"({len(data)} bytes; random bytes or another protobuf)")
    return proto


def validate(proto: onnx.ModelProto, label: str, base_dir: str | None = None) -> onnx.ModelProto:
    """Check and normalise a ModelProto in place; returns it with shapes inferred."""
    graph = proto.graph
    _check_opsets(proto, label)
    _load_external_data(proto, label, base_dir)
    _name_nodes(graph)
    _check_domains(graph, proto, label)
    _sort_nodes(graph, label)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"model {label!r} failed the ONNX checker: {_first_line(exc)}") from exc
    return _infer_shapes(proto, label)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:600]


def _check_opsets(proto: onnx.ModelProto, label: str) -> None:
    default = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not default and any(n.domain in ("", "ai.onnx") for n in proto.graph.node):
        raise UnsupportedOpsetError(
            f"model {label!r} imports no default ONNX opset (field opset_import); "
            f"Hetero supports opset {MIN_OPSET} to {MAX_OPSET}")
    for version in default:
        if not MIN_OPSET <= version <= MAX_OPSET:
            raise UnsupportedOpsetError(
                f"model {label!r} imports ONNX opset {version} (field opset_import); Hetero "
                f"supports opset {MIN_OPSET} to {MAX_OPSET} (onnx {onnx.__version__})")


def _load_external_data(proto: onnx.ModelProto, label: str, base_dir: str | None) -> None:
    external = [t for t in onnx.external_data_helper._get_all_tensors(proto)
                if onnx.external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        raise MissingInitializerError(
            f"model {label!r}: initializer {external[0].name!r} keeps its data in an external "
            "file; load the model from its path so the file can be found")
    for tensor in external:
        info = onnx.external_data_helper.ExternalDataInfo(tensor)
        file = Path(base_dir) / info.location
        if not file.is_file():
            raise MissingInitializerError(
                f"model {label!r}: initializer {tensor.name!r} needs external data file "
                f"{str(file)!r}, which does not exist")
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, base_dir)
    except (OSError, ValueError) as exc:
        raise MissingInitializerError(
            f"model {label!r}: external initializer data unreadable: {exc}") from exc


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every top-level node a unique name: plans, affinities and errors refer to them."""
    counts = Counter(n.name for n in graph.node if n.name)
    taken = set(counts)
    for index, node in enumerate(graph.node):
        if node.name and counts[node.name] == 1:
            continue
        base = node.name or f"{node.op_type}_{index}"
        candidate = base if base not in taken else f"{base}__{index}"
        while candidate in taken:
            candidate += "_"
        if node.name:
            counts[node.name] -= 1
        taken.add(candidate)
        node.name = candidate


def _check_domains(graph: onnx.GraphProto, proto: onnx.ModelProto, label: str) -> None:
    """Every node's domain is ONNX's, a custom kernel's, a model function's, or one an installed
    library implements (`hetero.domains`)."""
    known = _known_domains() | kernels.domains() | {f.domain for f in proto.functions}
    unknown = [node for node in graph.node if node.domain not in known]
    vendor = domains.vendor_domains() if unknown else {}
    for node in unknown:
        if node.domain not in vendor:
            raise UnknownDomainError(
                f"model {label!r}: node {node.name!r} ({node.op_type}) uses operator domain "
                f"{node.domain!r}, which has no ONNX schema, no custom kernel and no installed "
                f"library implementing it; register a kernel with hetero.kernel({node.domain!r}, "
                f"{node.op_type!r}, ...) before loading")


def _sort_nodes(graph: onnx.GraphProto, label: str) -> None:
    """Topologically sort nodes in place; dangling inputs and cycles raise, naming the culprits."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    available |= {t.values.name for t in graph.sparse_initializer}
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = index
    needs: list[list[str]] = []
    for node in graph.node:
        wanted = [*node.input, *outer_scope_inputs(node)]
        for name in wanted:
            if name not in available and name not in producers:
                raise DanglingInputError(
                    f"model {label!r}: node {node.name!r} ({node.op_type}) reads tensor {name!r}, "
                    "which no graph input, initializer or node provides")
        needs.append([n for n in wanted if n not in available])
    for out in graph.output:
        if out.name not in available and out.name not in producers:
            raise DanglingInputError(
                f"model {label!r}: graph output {out.name!r} is not produced by any node, input or "
                "initializer")

    after = {i: sorted({producers[n] for n in names}) for i, names in enumerate(needs)}
    if all(before < i for i, deps in after.items() for before in deps):
        return  # already in order (as ONNX requires): keep it exactly
    try:
        order = list(graphlib.TopologicalSorter(after).static_order())
    except graphlib.CycleError as exc:
        cycle = exc.args[1][:-1]  # [a, b, ..., a]: each node feeds the next
        start = cycle.index(min(cycle))
        names = " -> ".join(repr(graph.node[i].name) for i in [*cycle[start:], *cycle[:start + 1]])
        raise GraphCycleError(f"model {label!r}: the graph has a cycle: {names}") from None
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _infer_shapes(proto: onnx.ModelProto, label: str) -> onnx.ModelProto:
    def infer(model: onnx.ModelProto) -> onnx.ModelProto:
        try:
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                     data_prop=True)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
            if _fails_inside_function(model, str(exc)):
                return onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
            raise InvalidModelError(f"model {label!r} failed shape inference: {_first_line(exc)}") from exc

    inferred = infer(proto)
    own = _known_domains() | kernels.domains() | {f.domain for f in inferred.functions}
    # Asking which libraries implement a domain imports them all: only for a domain nothing else has.
    vendor = domains.vendor_domains() if any(n.domain not in own for n in inferred.graph.node) else {}
    custom = [n for n in inferred.graph.node if n.domain in kernels.domains() or n.domain in vendor]
    for node in custom:
        known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.input,
                                        *inferred.graph.output)}
        known.update({t.name: helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                      for t in inferred.graph.initializer})
        if all(o in known and known[o].type.tensor_type.elem_type for o in node.output if o):
            continue
        if node.domain in kernels.domains():
            infos = [tensor_info(known[i]) if i in known else None for i in node.input]
            inferred_outputs = _custom_output_types(node, infos, label)
            if inferred_outputs is None:
                continue
            typed = [helper.make_tensor_value_info(out, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                   shape)
                     for out, (dtype, shape) in zip(node.output, inferred_outputs, strict=False)]
        else:
            typed = _vendor_output_types(node, known, inferred, vendor[node.domain])
        for value in typed:
            if value is not None and value.name and value.name not in known:
                inferred.graph.value_info.append(value)
        inferred = infer(inferred)
    return inferred


def _vendor_output_types(node: onnx.NodeProto, known: dict, model: onnx.ModelProto,
                         vendor: tuple) -> list:
    """Output types of a node in a vendor domain, as the library implementing it infers them;
    none where it cannot tell (the run that captures values for planning types them then)."""
    _, type_fn = vendor
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    weights = [t for t in model.graph.initializer if t.name in set(node.input)]
    try:
        return list(type_fn(node, [known.get(i) for i in node.input], opsets, weights))
    except Exception:
        return []


def complete(model: Model, observed: Mapping[str, tuple[Any, Sequence[int]]]) -> Model:
    """`model` with every value that shape inference left without an element type or a rank typed
    from a run (`observed`: value name -> (dtype, shape) as captured for planning), so that every
    node extracted alone, and every partition, carries ranks. Dims stay as inference left them (a
    symbolic or unknown dim is not fixed to the run's size): the model still takes other sizes.
    Returns `model` itself when nothing was missing.
    """
    filled = []
    for node in model.nodes:
        for name in node.outputs:
            if not name or name not in observed:
                continue
            info = model.tensor(name)
            if info.kind not in ("tensor", "unknown") or (info.dtype is not None and info.shape is not None):
                continue
            dtype, shape = observed[name]
            try:
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            except (KeyError, TypeError, ValueError):
                continue
            filled.append(helper.make_tensor_value_info(name, elem, [None] * len(shape)))
    if not filled:
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    names = {vi.name for vi in filled}
    kept = [vi for vi in proto.graph.value_info if vi.name not in names]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend([*kept, *filled])
    with contextlib.suppress(InvalidModelError):  # else the types from the run stand on their own
        proto = _infer_shapes(proto, model.label)
    return Model(proto, model.label, model.folded)


def _fails_inside_function(model: onnx.ModelProto, message: str) -> bool:
    """The strict-inference error comes from inside the function body of a node's op, not the model.

    ONNX expands function ops (e.g. MeanVarianceNormalization) to infer their shapes; when that
    expansion trips over itself the model is fine, and lenient inference is used instead.
    """
    opsets = {o.domain or "": o.version for o in model.opset_import}
    for node in model.graph.node:
        if f"node name: {node.name})" not in message:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
        except onnx.defs.SchemaError:
            return False
        return schema.has_function or schema.has_context_dependent_function
    return False


def _custom_output_types(node: onnx.NodeProto, infos: list, label: str) -> list | None:
    """Output (dtype, shape) of a custom node from its kernels' `infer`, if any kernel has one."""
    for spec in kernels.find(node.domain, node.op_type):
        if spec.infer is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dtypes = [i.dtype if i else None for i in infos]
        shapes = [i.shape if i else None for i in infos]
        try:
            return list(spec.infer(dtypes, shapes, attrs))
        except Exception as exc:
            raise InvalidModelError(
                f"model {label!r}: the infer function of custom kernel {node.domain}::{node.op_type} "
                f"failed on node {node.name!r}: {exc}") from exc
    return None
