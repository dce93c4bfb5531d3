"""Graph layer: load and validate ONNX models, view them read-only, extract partitions."""

from hetero.graph.load import MAX_OPSET, MIN_OPSET, complete, load
from hetero.graph.model import Model, Node, TensorInfo, example_feeds

__all__ = ["MAX_OPSET", "MIN_OPSET", "Model", "Node", "TensorInfo", "complete", "example_feeds", "load"]
