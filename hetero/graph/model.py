"""A read-only view of a validated ONNX model: the GraphView of DESIGN.md.

Nodes come in topological order with unique names; every tensor has its dtype and shape as far
as shape inference could tell. Nothing here runs a model: executors and the planner read it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
from onnx import helper

_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass(frozen=True)
class TensorInfo:
    """What is known of one value before running: name, element type and shape.

    `shape` is None when even the rank is unknown; a dim is an int when static, a str when
    symbolic and None when unknown. `kind` is "tensor", "sequence", "optional", "map" or "unknown".
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None
    kind: str = "tensor"

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    @property
    def nbytes(self) -> int | None:
        """Size in bytes when dtype and shape are static, else None."""
        if self.dtype is None or not self.is_static or self.kind != "tensor":
            return None
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def describe(self) -> str:
        dtype = self.dtype.name if self.dtype is not None else "?"
        if self.shape is None:
            return f"{dtype}[?]"
        return f"{dtype}[{', '.join('?' if d is None else str(d) for d in self.shape)}]"


def tensor_info(value_info: onnx.ValueInfoProto) -> TensorInfo:
    """TensorInfo from an ONNX ValueInfoProto (graph input, output or value_info entry)."""
    type_proto = value_info.type
    kind = type_proto.WhichOneof("value") or "unknown"
    kind = {"tensor_type": "tensor", "sparse_tensor_type": "tensor", "sequence_type": "sequence",
            "optional_type": "optional", "map_type": "map"}.get(kind, "unknown")
    if kind != "tensor":
        return TensorInfo(value_info.name, None, None, kind)
    tensor_type = type_proto.tensor_type
    dtype = _np_dtype(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        return TensorInfo(value_info.name, dtype, None)
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:  # exporters write -1 for "dynamic"
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param not in ("?", "-1"):  # exporters' "unknown"
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return TensorInfo(value_info.name, dtype, tuple(dims))


def _np_dtype(elem_type: int) -> np.dtype | None:
    if elem_type == onnx.TensorProto.UNDEFINED:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


class Node:
    """One node of the graph: its op, where it sits, and what it reads and writes.

    `implicit_inputs` are outer-scope tensors that its subgraphs (If/Loop/Scan bodies) read: they
    count as inputs for placement, since the node cannot run before they exist.
    """

    __slots__ = ("__dict__", "domain", "implicit_inputs", "index", "inputs", "name", "op_type",
                 "outputs", "proto", "since_version")

    def __init__(self, index: int, proto: onnx.NodeProto, since_version: int | None):
        self.index = index
        self.proto = proto
        self.name: str = proto.name
        self.op_type: str = proto.op_type
        self.domain: str = "" if proto.domain == "ai.onnx" else proto.domain
        self.inputs: tuple[str, ...] = tuple(proto.input)
        self.outputs: tuple[str, ...] = tuple(proto.output)
        self.implicit_inputs: tuple[str, ...] = tuple(outer_scope_inputs(proto))
        self.since_version = since_version

    @property
    def has_subgraph(self) -> bool:
        return any(a.type in _SUBGRAPH_ATTRS for a in self.proto.attribute)

    @property
    def all_inputs(self) -> tuple[str, ...]:
        """Explicit inputs (omitted optional ones dropped) followed by implicit ones."""
        return tuple(n for n in self.inputs if n) + self.implicit_inputs

    @cached_property
    def attributes(self) -> Mapping[str, Any]:
        return MappingProxyType({a.name: helper.get_attribute_value(a) for a in self.proto.attribute})

    @property
    def qualified_type(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain else self.op_type

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.qualified_type})"


def outer_scope_inputs(node: onnx.NodeProto) -> list[str]:
    """Names a node's subgraphs read from the enclosing scope, in first-use order."""
    found: dict[str, None] = {}

    def visit(graph: onnx.GraphProto, bound: set[str]) -> None:
        bound = bound | {i.name for i in graph.input} | {i.name for i in graph.initializer}
        bound |= {i.values.name for i in graph.sparse_initializer}
        for inner in graph.node:
            for name in inner.input:
                if name and name not in bound:
                    found[name] = None
            for attr in inner.attribute:
                for sub in _subgraphs(attr):
                    visit(sub, bound)
            bound |= set(inner.output)

    for attr in node.attribute:
        for sub in _subgraphs(attr):
            visit(sub, set())
    return list(found)


def _subgraphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


class Model:
    """A loaded, validated ONNX model (see `hetero.load`), read-only.

    `proto` is the normalised model: nodes topologically sorted, unique node names, inferred
    shapes in `value_info`. Do not mutate it.
    """

    def __init__(self, proto: onnx.ModelProto, label: str, folded: int = 0):
        self.proto = proto
        self.label = label
        self.folded = folded
        graph = proto.graph
        self.opsets: Mapping[str, int] = MappingProxyType(
            {("" if o.domain == "ai.onnx" else o.domain): o.version for o in proto.opset_import})
        self._initializers: dict[str, onnx.TensorProto | onnx.SparseTensorProto] = {
            t.name: t for t in graph.initializer}
        self._initializers.update({t.values.name: t for t in graph.sparse_initializer})
        self._value_infos: dict[str, onnx.ValueInfoProto] = {}
        self._signatures: dict[str, str] = {}  # by node name, unique once loaded
        for vi in (*graph.value_info, *graph.input, *graph.output):
            self._value_infos[vi.name] = vi
        for name, init in self._initializers.items():
            if name not in self._value_infos:
                tensor = init.values if isinstance(init, onnx.SparseTensorProto) else init
                dims = init.dims if isinstance(init, onnx.SparseTensorProto) else tensor.dims
                self._value_infos[name] = helper.make_tensor_value_info(name, tensor.data_type, dims)
        self.nodes: tuple[Node, ...] = tuple(
            Node(i, n, self._since_version(n)) for i, n in enumerate(graph.node))
        self._by_name = {n.name: n for n in self.nodes}
        self._producer: dict[str, Node] = {}
        self._consumers: dict[str, list[Node]] = {}
        for node in self.nodes:
            for out in node.outputs:
                if out:
                    self._producer[out] = node
            for name in dict.fromkeys(node.all_inputs):
                self._consumers.setdefault(name, []).append(node)
        self.inputs: tuple[TensorInfo, ...] = tuple(
            self.tensor(i.name) for i in graph.input if i.name not in self._initializers)
        self.outputs: tuple[TensorInfo, ...] = tuple(self.tensor(o.name) for o in graph.output)

    def _since_version(self, proto: onnx.NodeProto) -> int | None:
        domain = "" if proto.domain == "ai.onnx" else proto.domain
        version = self.opsets.get(domain)
        if version is None:
            return None
        try:
            return onnx.defs.get_schema(proto.op_type, version, domain).since_version
        except onnx.defs.SchemaError:
            return None

    def __repr__(self) -> str:
        return f"Model({self.label!r}, {len(self.nodes)} nodes)"

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def initializer_names(self) -> frozenset[str]:
        return frozenset(self._initializers)

    def node(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"model {self.label!r} has no node named {name!r}") from None

    def is_initializer(self, name: str) -> bool:
        return name in self._initializers

    def tensor(self, name: str) -> TensorInfo:
        """Type and shape of a value (graph input or output, initializer or intermediate)."""
        vi = self._value_infos.get(name)
        if vi is None:
            return TensorInfo(name, None, None, "unknown")
        return tensor_info(vi)

    def value_info(self, name: str) -> onnx.ValueInfoProto | None:
        return self._value_infos.get(name)

    def signature(self, node: Node) -> str:
        """A stable key for what a node computes: op, version, attributes, input types and shapes.

        Small constant inputs (shape tensors, axes) are part of the key since they change what a
        library can run; weights are not. Capability and cost caches are keyed by it.
        """
        if node.name and node.name in self._signatures:
            return self._signatures[node.name]
        digest = hashlib.sha1(f"{node.domain}::{node.op_type}:{node.since_version}".encode())
        for attr in sorted(node.proto.attribute, key=lambda a: a.name):
            digest.update(attr.SerializeToString(deterministic=True))
        for name in node.all_inputs:
            info = self.tensor(name)
            digest.update(f"|{info.kind}:{info.describe()}".encode())
            init = self._initializers.get(name)
            if isinstance(init, onnx.TensorProto) and math.prod(init.dims) <= 64:
                digest.update(init.SerializeToString(deterministic=True))
        for name in node.outputs:
            digest.update(f">{self.tensor(name).describe()}".encode())
        key = f"{node.op_type}-{digest.hexdigest()[:16]}"
        if node.name:
            self._signatures[node.name] = key
        return key

    @cached_property
    def fingerprint(self) -> str:
        """A key for the model's structure and shapes (not its weights): what timings depend on."""
        digest = hashlib.sha1()
        for node in self.nodes:
            digest.update(f"{self.signature(node)}:{node.inputs}:{node.outputs};".encode())
        return digest.hexdigest()[:20]

    def producer(self, name: str) -> Node | None:
        """The node that writes `name`, or None for graph inputs and initializers."""
        return self._producer.get(name)

    def consumers(self, name: str) -> tuple[Node, ...]:
        return tuple(self._consumers.get(name, ()))

    def predecessors(self, node: Node) -> tuple[Node, ...]:
        found = {p.index: p for p in (self._producer.get(n) for n in node.all_inputs) if p is not None}
        return tuple(found[i] for i in sorted(found))

    def successors(self, node: Node) -> tuple[Node, ...]:
        found = {c.index: c for out in node.outputs if out for c in self._consumers.get(out, ())}
        return tuple(found[i] for i in sorted(found))

    def resolve(self, nodes: Iterable[Node | int | str]) -> list[Node]:
        """Nodes given as Node, index or name, de-duplicated, in topological order."""
        chosen: dict[int, Node] = {}
        for item in nodes:
            if isinstance(item, Node):
                node = item
            elif isinstance(item, int):
                node = self.nodes[item]
            else:
                node = self.node(item)
            chosen[node.index] = node
        return [chosen[i] for i in sorted(chosen)]

    def boundary(self, nodes: Iterable[Node | int | str]) -> tuple[list[str], list[str]]:
        """(inputs, outputs) of a node set: values crossing in (initializers excluded) and out."""
        chosen = self.resolve(nodes)
        inside = {n.index for n in chosen}
        produced = {o for n in chosen for o in n.outputs if o}
        graph_outputs = set(self.output_names)
        inputs = [name for name in dict.fromkeys(i for n in chosen for i in n.all_inputs)
                  if name not in produced and name not in self._initializers]
        outputs = [o for n in chosen for o in n.outputs if o and (
            o in graph_outputs or any(c.index not in inside for c in self._consumers.get(o, ())))]
        return inputs, outputs

    def extract(self, nodes: Iterable[Node | int | str], name: str | None = None) -> onnx.ModelProto:
        """A standalone ONNX model of a node set.

        Its inputs are the values crossing in, its outputs the values crossing out or graph
        outputs, and it carries only the initializers its nodes use. Nodes with subgraphs are
        taken whole, with the outer-scope values they read as inputs.
        """
        chosen = self.resolve(nodes)
        inputs, outputs = self.boundary(chosen)
        used = dict.fromkeys(i for n in chosen for i in n.all_inputs)
        graph = self.proto.graph
        produced = {o for n in chosen for o in n.outputs if o}
        value_info = [self._value_infos[o] for o in produced
                      if o in self._value_infos and o not in outputs]
        part = helper.make_graph(
            [n.proto for n in chosen],
            name or f"{graph.name or 'graph'}_part",
            [self._io_info(i) for i in inputs],
            [self._io_info(o) for o in outputs],
            initializer=[t for t in graph.initializer if t.name in used],
            value_info=value_info,
            sparse_initializer=[t for t in graph.sparse_initializer if t.values.name in used],
        )
        model = helper.make_model(
            part, opset_imports=list(self.proto.opset_import), ir_version=self.proto.ir_version,
            functions=list(self.proto.functions))
        return model

    def _io_info(self, name: str) -> onnx.ValueInfoProto:
        vi = self._value_infos.get(name)
        if vi is not None and vi.type.WhichOneof("value") is not None:
            return vi
        return onnx.ValueInfoProto(name=name)


#: Sizes given to symbolic dims that neither the model nor the caller fixes: the leading dim of a
#: tensor of rank >= 2 (a batch), the spatial dims of an image (rank 4 with 1, 3 or 4 channels on
#: axis 1 or 3: NCHW or NHWC) and every other dim (a sequence, a feature count).
DEFAULT_DIMS: Mapping[str, int] = MappingProxyType({"batch": 1, "image": 224, "other": 128})


def default_shape(info: TensorInfo, dims: Mapping[str, int] | None = None) -> tuple[int, ...]:
    """A concrete shape for an input: static dims as the model says, symbolic ones from `dims`
    (by dim name) or `DEFAULT_DIMS` by the input's kind; a rankless input is taken as a scalar."""
    shape = info.shape or ()
    image = len(shape) == 4 and (shape[1] in (1, 3, 4) or shape[3] in (1, 3, 4))
    channels = 1 if image and shape[1] in (1, 3, 4) else 3
    concrete = []
    for axis, dim in enumerate(shape):
        if isinstance(dim, int) and dim > 0:
            concrete.append(dim)
        elif isinstance(dim, str) and dim in (dims or {}):
            concrete.append(int(dims[dim]))
        elif axis == 0 and len(shape) >= 2:
            concrete.append(DEFAULT_DIMS["batch"])
        elif image and axis != channels:
            concrete.append(DEFAULT_DIMS["image"])
        else:
            concrete.append(DEFAULT_DIMS["other"])
    return tuple(concrete)


def example_feeds(model: Model, seed: int = 0, dims: Mapping[str, int] | None = None,
                  shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Random feeds matching a model's inputs: shapes from `shapes` (by input name), else
    `default_shape` (symbolic dims from `dims` by dim name, else `DEFAULT_DIMS`).

    Floats are N(0, 1), integers in [0, 10), booleans fair coins: enough to run and compare,
    not to stand for real data (a sample-rate or length input needs its real value).
    Raises ValueError naming an input of a kind or type that has no example values.
    """
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for info in model.inputs:
        if info.kind != "tensor" or info.dtype is None:
            raise ValueError(f"model {model.label!r}: cannot make an example for input {info.name!r} "
                             f"of kind {info.kind}")
        shape = tuple(shapes[info.name]) if shapes and info.name in shapes else default_shape(info, dims)
        if info.dtype.kind == "f":
            feeds[info.name] = rng.standard_normal(shape).astype(info.dtype)
        elif info.dtype.kind in "iu":
            feeds[info.name] = rng.integers(0, 10, shape).astype(info.dtype)
        elif info.dtype.kind == "b":
            feeds[info.name] = rng.random(shape) < 0.5
        else:
            raise ValueError(f"model {model.label!r}: no example values for input {info.name!r} "
                             f"of type {info.dtype}")
    return feeds
