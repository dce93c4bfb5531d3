"""Applications of Hetero: whole pipelines as one ONNX model, and the demos built on them."""
