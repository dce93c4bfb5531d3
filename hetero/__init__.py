"""Hetero: one ONNX model, every device and vendor library on the host.

    import hetero
    session = hetero.compile("model.onnx", executors=["openvino", "onnxruntime", "numpy"])
    outputs = session.run({"input": x})
"""

from hetero.errors import (
    CompileError,
    DanglingInputError,
    DeadlineExceededError,
    ExecutorError,
    ExecutorUnavailableError,
    GraphCycleError,
    HeteroError,
    InputError,
    InvalidModelError,
    MissingInitializerError,
    ModelDecodeError,
    ModelError,
    ModelNotFoundError,
    NonFiniteError,
    PlanError,
    QueueFullError,
    ReplicaLostError,
    RunError,
    UnknownDomainError,
    UnsupportedOpsetError,
)
from hetero.graph import Model, Node, TensorInfo, load
from hetero.inventory import devices
from hetero.kernels import kernel
from hetero.planner import Plan
from hetero.runtime import ReplicaPool, Session, compile, plan

__version__ = "0.1.0"

__all__ = [
    "CompileError",
    "DanglingInputError",
    "DeadlineExceededError",
    "ExecutorError",
    "ExecutorUnavailableError",
    "GraphCycleError",
    "HeteroError",
    "InputError",
    "InvalidModelError",
    "MissingInitializerError",
    "Model",
    "ModelDecodeError",
    "ModelError",
    "ModelNotFoundError",
    "Node",
    "NonFiniteError",
    "Plan",
    "PlanError",
    "QueueFullError",
    "ReplicaLostError",
    "ReplicaPool",
    "RunError",
    "Session",
    "TensorInfo",
    "UnknownDomainError",
    "UnsupportedOpsetError",
    "compile",
    "devices",
    "kernel",
    "load",
    "plan",
]
