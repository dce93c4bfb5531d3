"""How much work a node is: floating-point operations and bytes moved, for roofline estimates."""

from __future__ import annotations

import math

from hetero.graph import Model, Node

# Flops per output element for ops whose cost is proportional to their output.
_PER_OUTPUT = {"Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "BatchNormalization": 2,
               "InstanceNormalization": 8, "Resize": 8, "Erf": 10, "Gelu": 12, "Sigmoid": 4, "Tanh": 6,
               "Exp": 4, "Log": 4, "Pow": 6, "HardSwish": 4, "Swish": 5}


def _size(model: Model, name: str) -> int:
    shape = model.tensor(name).shape if name else None
    if shape is None or not all(isinstance(d, int) for d in shape):
        return 0
    return math.prod(shape)


def flops(node: Node, model: Model) -> float:
    """Floating-point operations of one node (multiply-add counts 2); 0 when shapes are unknown."""
    op = node.op_type
    out = _size(model, node.outputs[0]) if node.outputs else 0
    if op in ("Conv", "ConvTranspose"):
        weight = model.tensor(node.inputs[1]).shape
        if weight is None or not all(isinstance(d, int) for d in weight):
            return 0.0
        per_output = math.prod(weight[1:]) if op == "Conv" else weight[0] * math.prod(weight[2:])
        if op == "ConvTranspose":
            return 2.0 * _size(model, node.inputs[0]) * math.prod(weight[1:])
        return 2.0 * out * per_output
    if op in ("MatMul", "Gemm", "MatMulInteger"):
        a = model.tensor(node.inputs[0]).shape
        if not a or not isinstance(a[-1], int):
            return 0.0
        inner = a[0] if op == "Gemm" and node.attributes.get("transA", 0) else a[-1]
        return 2.0 * out * inner
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return float(out * math.prod(node.attributes.get("kernel_shape", [1])))
    if op.startswith("Reduce") or op.startswith("Global"):
        return float(_size(model, node.inputs[0]))
    return float(out * _PER_OUTPUT.get(op, 1))


def bytes_moved(node: Node, model: Model) -> float:
    """Bytes read and written by one node, as far as static shapes tell."""
    total = 0.0
    for name in (*node.all_inputs, *node.outputs):
        if name:
            total += model.tensor(name).nbytes or 0
    return total
