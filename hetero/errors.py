"""One exception family, so callers can catch `hetero.HeteroError` and users read what went wrong.

Every message names the model, node, tensor or field at fault.
"""

from __future__ import annotations


class HeteroError(Exception):
    """Base of every error Hetero raises on purpose."""


class ModelError(HeteroError, ValueError):
    """The model cannot be loaded or is not valid ONNX."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The path given does not name a readable file."""


class ModelDecodeError(ModelError):
    """The bytes are not an ONNX ModelProto (random bytes, truncated protobuf, other format)."""


class UnsupportedOpsetError(ModelError):
    """The model imports an opset version outside the range Hetero supports."""


class UnknownDomainError(ModelError):
    """A node uses an operator domain with no schema and no registered custom kernel."""


class MissingInitializerError(ModelError):
    """An initializer's data is absent (external data file not found or unreadable)."""


class DanglingInputError(ModelError):
    """A node consumes a tensor that no graph input, initializer or node provides."""


class GraphCycleError(ModelError):
    """The graph's nodes depend on each other in a cycle."""


class InvalidModelError(ModelError):
    """The ONNX checker or strict shape inference rejected the model."""


class InputError(HeteroError, ValueError):
    """The feeds given to `Session.run` do not match the model's inputs."""


class QueueFullError(HeteroError):
    """Too many requests are in flight; the caller should back off and retry."""


class DeadlineExceededError(HeteroError, TimeoutError):
    """A request got no answer within its timeout; the message says what was still running."""


class PlanError(HeteroError):
    """No valid placement exists for the model with the executors and policy given."""


class ExecutorError(HeteroError):
    """An executor is unavailable, or failed to compile or run a partition."""


class ExecutorUnavailableError(ExecutorError):
    """The executor's library is not installed or its device is absent."""


class CompileError(ExecutorError):
    """An executor rejected a partition at compile time.

    `nodes` names the nodes the library reported as the cause, when it said; the planner uses
    them to narrow the partition and re-plan.
    """

    def __init__(self, message: str, nodes: tuple[str, ...] = ()):
        super().__init__(message)
        self.nodes = nodes


class RunError(ExecutorError):
    """A compiled partition failed while running a request."""


class NonFiniteError(RunError):
    """A partition gave NaN or infinity in `tensors` from finite inputs, and its session had no
    other executor to ask whether that is the model's own answer (`outputs`, {name: array}). A
    session in a `ReplicaPool` raises it so that the pool asks another replica; the pool returns
    `outputs` when every replica it tried gave NaN or infinity too."""

    def __init__(self, message: str, outputs: dict, tensors: tuple[str, ...] = ()):
        super().__init__(message)
        self.outputs = outputs
        self.tensors = tensors


class ReplicaLostError(RunError):
    """A replica is gone for good (its process or its node died): a `ReplicaPool` retries the
    request on another replica and sends that one no more."""
