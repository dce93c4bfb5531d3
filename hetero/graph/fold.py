"""Constant folding: nodes whose inputs are all constants are computed once, at load time.

Exporters leave shape arithmetic in graphs (tf2onnx's NanoDet-g computes a Reshape target with
Expand, Where, Gather and ScatterND on constants). Folding it with the exact reference kernels
gives later layers static shapes, and spares libraries ops they cannot convert.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from hetero.graph.model import outer_scope_inputs

# Ops whose value is not a function of their inputs, or that a later run must see happen.
_NEVER = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
          "Bernoulli", "Dropout"}
MAX_FOLDED_ELEMENTS = 1 << 20  # a folded value larger than this stays computed, not stored


def fold_constants(proto: onnx.ModelProto) -> int:
    """Fold in place; returns how many nodes were replaced by initializers."""
    graph = proto.graph
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    foldable = []
    for node in graph.node:
        if (node.domain in ("", "ai.onnx") and node.op_type not in _NEVER
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                            for a in node.attribute)
                and all(not name or name in constant for name in node.input)
                and not any(name in outputs for name in node.output)):
            foldable.append(node)
            constant.update(name for name in node.output if name)
    if not foldable:
        return 0
    values = _evaluate(proto, foldable)
    if values is None:
        return 0
    folded = [n for n in foldable if all(not o or _small(values.get(o)) for o in n.output)]
    gone = {id(n) for n in folded}
    produced = {o for n in folded for o in n.output if o}
    remaining = [n for n in graph.node if id(n) not in gone]
    needed = {name for n in remaining for name in n.input} | _subgraph_reads(remaining)
    for name in sorted(produced & needed):
        graph.initializer.append(numpy_helper.from_array(np.asarray(values[name]), name))
    kept = [onnx.NodeProto() for _ in remaining]
    for copy, node in zip(kept, remaining, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for n in graph.node for name in n.input} | _subgraph_reads(graph.node) | outputs
    live = [t for t in graph.initializer if t.name in used or t.name in {i.name for i in graph.input}]
    del graph.initializer[:]
    graph.initializer.extend(live)
    return len(folded)


def _small(value: object) -> bool:
    return isinstance(value, np.ndarray | np.generic) and math.prod(np.shape(value)) <= MAX_FOLDED_ELEMENTS


def _evaluate(proto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, object] | None:
    """Values of the foldable nodes' outputs, computed by onnx.reference; None if it cannot."""
    used = {name for n in nodes for name in n.input}
    graph = onnx.helper.make_graph(
        nodes, "fold", [], [onnx.ValueInfoProto(name=o) for n in nodes for o in n.output if o],
        initializer=[t for t in proto.graph.initializer if t.name in used])
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    try:
        results = ReferenceEvaluator(model).run(None, {}, intermediate=True)
    except Exception:
        return None
    return results


def _subgraph_reads(nodes: list[onnx.NodeProto]) -> set[str]:
    return {name for node in nodes for name in outer_scope_inputs(node)}
