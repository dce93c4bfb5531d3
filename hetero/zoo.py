"""Reference networks built in code, with seeded random weights, for tests, benchmarks and demos.

No weights can be downloaded here, so the shapes of well-known models (ResNet-50, MobileNetV2,
a BERT-base encoder) are rebuilt with `onnx.helper`. Weights are scaled so activations stay in
a sane range; numbers are meaningless, timings and numerics comparisons are real.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class GraphBuilder:
    """A small helper to write ONNX graphs: each method adds a node and returns its output name."""

    def __init__(self, name: str, seed: int = 0):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.rng = np.random.default_rng(seed)
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, shape: list, dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int = TensorProto.FLOAT, shape: list | None = None) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def const(self, array: np.ndarray, hint: str = "w") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, name: str | None = None,
           **attrs) -> str | list[str]:
        """Named nodes (graph outputs) give their output the same name."""
        node_name = name or self.fresh(op_type.lower())
        if outputs == 1:
            outs = [node_name if name else f"{node_name}_out"]
        else:
            outs = [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **attrs))
        return outs if outputs > 1 else outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
             act: str | None = "Relu", gain: float = 1.0) -> str:
        fan_in = cin // group * k * k
        scale = gain * math.sqrt(2.0 / fan_in)
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * scale).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        y = self.op("Conv", [x, self.const(w), self.const(b, "b")], kernel_shape=[k, k],
                    strides=[stride, stride], pads=[k // 2] * 4, group=group)
        if act == "Relu":
            y = self.op("Relu", [y])
        elif act == "Relu6":
            y = self.op("Clip", [y, self.const(np.float32(0), "lo"), self.const(np.float32(6), "hi")])
        elif act == "LeakyRelu":
            y = self.op("LeakyRelu", [y], alpha=0.1)
        return y

    def linear(self, x: str, fin: int, fout: int, gain: float = 1.0) -> str:
        w = self.rng.standard_normal((fin, fout)).astype(np.float32) * (gain / math.sqrt(fin))
        b = (self.rng.standard_normal(fout) * 0.01).astype(np.float32)
        return self.op("Add", [self.op("MatMul", [x, self.const(w)]), self.const(b, "b")])

    def build(self, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name="hetero.zoo")
        model.ir_version = 8
        return onnx.shape_inference.infer_shapes(model)


def resnet50(batch: int = 1, image: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 v1.5 as exporters write it (BatchNorm folded into Conv): 4.1 GFLOPs at 224x224."""
    g = GraphBuilder("resnet50")
    x = g.input("images", [batch, 3, image, image])
    x = g.conv(x, 3, 64, 7, stride=2)
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            y = g.conv(x, cin, width, 1)
            y = g.conv(y, width, width, 3, stride=stride)
            y = g.conv(y, width, width * 4, 1, act=None, gain=0.3)
            shortcut = x if block > 0 else g.conv(x, cin, width * 4, 1, stride=stride, act=None)
            x = g.op("Relu", [g.op("Add", [y, shortcut])])
            cin = width * 4
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = (g.rng.standard_normal((classes, cin)) / math.sqrt(cin)).astype(np.float32)
    logits = g.op("Gemm", [x, g.const(w), g.const(np.zeros(classes, np.float32), "b")], transB=1,
                  name="logits")
    g.output(logits, shape=[batch, classes])
    return g.build()


def mobilenet_v2(batch: int = 1, image: int = 224, classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV2 (width 1.0): inverted residuals with depthwise 3x3 convolutions and ReLU6."""
    g = GraphBuilder("mobilenet_v2")
    x = g.input("images", [batch, 3, image, image])
    x = g.conv(x, 3, 32, 3, stride=2, act="Relu6")
    cin = 32
    for expand, cout, repeats, first_stride in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            hidden = cin * expand
            y = g.conv(x, cin, hidden, 1, act="Relu6") if expand != 1 else x
            y = g.conv(y, hidden, hidden, 3, stride=stride, group=hidden, act="Relu6")
            y = g.conv(y, hidden, cout, 1, act=None, gain=0.5)
            x = g.op("Add", [x, y]) if stride == 1 and cin == cout else y
            cin = cout
    x = g.conv(x, cin, 1280, 1, act="Relu6")
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = (g.rng.standard_normal((classes, 1280)) / math.sqrt(1280)).astype(np.float32)
    logits = g.op("Gemm", [x, g.const(w), g.const(np.zeros(classes, np.float32), "b")], transB=1,
                  name="logits")
    g.output(logits, shape=[batch, classes])
    return g.build()


def _encoder_layer(g: GraphBuilder, x: str, batch: int, seq: int, hidden: int, heads: int,
                   ffn: int) -> str:
    head = hidden // heads

    def split_heads(t: str) -> str:
        t = g.op("Reshape", [t, g.const(np.array([batch, seq, heads, head], np.int64), "shape")])
        return g.op("Transpose", [t], perm=[0, 2, 1, 3])

    q, k, v = (split_heads(g.linear(x, hidden, hidden)) for _ in range(3))
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = g.op("Mul", [scores, g.const(np.float32(1 / math.sqrt(head)), "scale")])
    probs = g.op("Softmax", [scores], axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    context = g.op("Reshape", [context, g.const(np.array([batch, seq, hidden], np.int64), "shape")])
    attn = g.linear(context, hidden, hidden, gain=0.5)
    x = _layer_norm(g, g.op("Add", [x, attn]), hidden)
    inner = g.linear(x, hidden, ffn)
    gelu = g.op("Mul", [g.op("Mul", [inner, g.const(np.float32(0.5), "half")]), g.op(
        "Add", [g.op("Erf", [g.op("Div", [inner, g.const(np.float32(math.sqrt(2)), "sqrt2")])]),
                g.const(np.float32(1), "one")])])
    out = g.linear(gelu, ffn, hidden, gain=0.5)
    return _layer_norm(g, g.op("Add", [x, out]), hidden)


def _layer_norm(g: GraphBuilder, x: str, hidden: int) -> str:
    return g.op("LayerNormalization", [x, g.const(np.ones(hidden, np.float32), "gamma"),
                                       g.const(np.zeros(hidden, np.float32), "beta")], axis=-1, epsilon=1e-12)


def bert_encoder(batch: int = 1, seq: int = 128, layers: int = 12, hidden: int = 768, heads: int = 12,
                 ffn: int = 3072) -> onnx.ModelProto:
    """A BERT-base encoder stack (12 layers, 768 hidden, 12 heads) on token embeddings, Gelu as Erf."""
    g = GraphBuilder("bert_encoder")
    x = g.input("embeddings", [batch, seq, hidden])
    for _ in range(layers):
        x = _encoder_layer(g, x, batch, seq, hidden, heads, ffn)
    out = g.op("Identity", [x], name="last_hidden_state")
    g.output(out, shape=[batch, seq, hidden])
    return g.build()


def small_cnn(batch: int = 1, image: int = 32, seed: int = 0) -> onnx.ModelProto:
    """A ResNet-style CNN small enough for tests: stem, two residual blocks, pooling, classifier."""
    g = GraphBuilder("small_cnn", seed)
    x = g.input("images", [batch, 3, image, image])
    x = g.conv(x, 3, 16, 3, stride=2)
    x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    cin = 16
    for width in (16, 32):
        y = g.conv(x, cin, width, 3)
        y = g.conv(y, width, width, 3, act=None, gain=0.5)
        shortcut = x if width == cin else g.conv(x, cin, width, 1, act=None)
        x = g.op("Relu", [g.op("Add", [y, shortcut])])
        cin = width
    x = g.op("Flatten", [g.op("AveragePool", [x], kernel_shape=[image // 4, image // 4])])
    w = (g.rng.standard_normal((10, 32)) / math.sqrt(32)).astype(np.float32)
    g.output(g.op("Gemm", [x, g.const(w), g.const(np.zeros(10, np.float32), "b")], transB=1, name="logits"),
             shape=[batch, 10])
    return g.build()


def small_transformer(batch: int = 1, seq: int = 16, hidden: int = 64, heads: int = 4,
                      seed: int = 0) -> onnx.ModelProto:
    """One transformer encoder block: attention (MatMul, Softmax), LayerNormalization, Gelu via Erf."""
    g = GraphBuilder("small_transformer", seed)
    x = g.input("tokens", [batch, seq, hidden])
    x = _encoder_layer(g, x, batch, seq, hidden, heads, hidden * 4)
    g.output(g.op("Identity", [x], name="hidden"), shape=[batch, seq, hidden])
    return g.build()


def detector_head(batch: int = 1, channels: int = 32, size: int = 16, classes: int = 8,
                  seed: int = 0) -> onnx.ModelProto:
    """A detector neck and head: upsampling (Resize), Concat, Split into boxes and scores, Sigmoid,
    Transpose to (batch, anchors, values)."""
    g = GraphBuilder("detector_head", seed)
    fine = g.input("fine", [batch, channels, size, size])
    coarse = g.input("coarse", [batch, channels, size // 2, size // 2])
    up = g.op("Resize", [coarse, "", g.const(np.array([1, 1, 2, 2], np.float32), "scales")], mode="nearest")
    x = g.op("Concat", [fine, up], axis=1)
    x = g.conv(x, 2 * channels, channels, 3, act="LeakyRelu")
    x = g.conv(x, channels, 4 + classes, 1, act=None)
    boxes, scores = g.op("Split", [x, g.const(np.array([4, classes], np.int64), "split")], outputs=2, axis=1)
    scores = g.op("Sigmoid", [scores])
    for name, t, width in (("boxes", boxes, 4), ("scores", scores, classes)):
        flat = g.op("Reshape", [t, g.const(np.array([batch, width, -1], np.int64), "shape")])
        g.output(g.op("Transpose", [flat], perm=[0, 2, 1], name=name), shape=[batch, size * size, width])
    return g.build()


MODELS = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "bert_encoder": bert_encoder,
          "small_cnn": small_cnn, "small_transformer": small_transformer, "detector_head": detector_head}



def with_dynamic_batch(model: onnx.ModelProto, dim: str = "batch") -> onnx.ModelProto:
    """A copy whose inputs and outputs have a symbolic dim 0, so a server can batch requests.

    Intermediate shapes are dropped and inferred again. Only valid when no node bakes the batch
    size in (a Reshape to a constant [1, ...] shape, say); run the copy at two batch sizes to check.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for value in [*copy.graph.input, *copy.graph.output]:
        shape = value.type.tensor_type.shape
        if shape.dim:
            shape.dim[0].Clear()
            shape.dim[0].dim_param = dim
    del copy.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(copy)
