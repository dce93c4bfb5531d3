"""`hetero serve`: a model repository over KServe v2 / the Open Inference Protocol (HTTP and gRPC).

A layer above the runtime: models run on `ReplicaPool`s, concurrent requests are merged into
batches, and nothing below this package imports it.

    from hetero.serve import Server
    with Server("models/", http_port=8000, grpc_port=8001) as server:
        ...
"""

from hetero.serve.config import ModelConfig
from hetero.serve.server import Server

__all__ = ["ModelConfig", "Server"]
