"""Capability and the simple placement policies: `priority` and `manual`.

`priority` is what ONNX Runtime and OpenVINO HETERO do: each node goes to the first executor in
the user's order that supports it. `manual` applies affinity rules (op type or node-name
pattern -> executor) and places the remaining nodes by priority.
"""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Mapping, Sequence

from hetero import executors as executor_registry
from hetero.errors import PlanError
from hetero.executors import Executor
from hetero.graph import Model, Node

_rejected: set[tuple[str, str]] = set()
_rejected_lock = threading.Lock()


def reject(executor: Executor, model: Model, node: Node) -> None:
    """Remember that `executor` refused `node` at compile time, so no plan places it there again."""
    with _rejected_lock:
        _rejected.add((executor.name, model.signature(node)))


def forget(executor: Executor, model: Model, node: Node) -> None:
    """Undo `reject` (the failure turned out not to be the executor's)."""
    with _rejected_lock:
        _rejected.discard((executor.name, model.signature(node)))


class Capability:
    """Which of the given executors can run each node of a model, asked once per node."""

    def __init__(self, model: Model, executors: Sequence[Executor]):
        self.model = model
        self.executors = list(executors)
        self._cache: dict[tuple[int, str], bool] = {}

    def can(self, executor: Executor, node: Node) -> bool:
        key = (node.index, executor.name)
        if key not in self._cache:
            with _rejected_lock:
                refused = (executor.name, self.model.signature(node)) in _rejected
            self._cache[key] = not refused and executor.supports(node, self.model)
        return self._cache[key]

    def candidates(self, node: Node, executors: Sequence[Executor] | None = None) -> list[Executor]:
        return [e for e in (executors or self.executors) if self.can(e, node)]

    def first(self, node: Node, executors: Sequence[Executor] | None = None) -> Executor:
        for executor in executors or self.executors:
            if self.can(executor, node):
                return executor
        tried = "; ".join(f"{e.name}: {self.reason(e, node)}" for e in executors or self.executors)
        raise PlanError(
            f"model {self.model.label!r}: no executor can run node {node.name!r} "
            f"({node.qualified_type}, opset {node.since_version}). Tried {tried}. Add 'numpy' to the "
            "executors, or register a kernel with hetero.kernel() for a custom op")

    def reason(self, executor: Executor, node: Node) -> str:
        """Why `executor` does not run `node` (for errors)."""
        with _rejected_lock:
            if (executor.name, self.model.signature(node)) in _rejected:
                return "rejected it when compiling"
        return executor.decline(node, self.model) or "declined"


def place_priority(capability: Capability) -> list[Executor]:
    return [capability.first(node) for node in capability.model.nodes]


def place_manual(capability: Capability, affinity: Mapping[str, str | Executor]) -> list[Executor]:
    """Affinity keys are op types ('Conv', 'com.example::BoxDecode') or node-name glob patterns."""
    rules = [(pattern, executor_registry.resolve([target])) for pattern, target in affinity.items()]
    assignment = []
    for node in capability.model.nodes:
        rule = next(((p, targets) for p, targets in rules if _matches(p, node)), None)
        if rule is None:
            assignment.append(capability.first(node))
            continue
        pattern, targets = rule
        able = capability.candidates(node, targets)
        if not able:
            raise PlanError(
                f"model {capability.model.label!r}: affinity {pattern!r} -> "
                f"{', '.join(t.name for t in targets)} cannot be honoured for node {node.name!r} "
                f"({node.qualified_type}): the executor does not support it")
        assignment.append(able[0])
    return assignment


def _matches(pattern: str, node: Node) -> bool:
    exact = pattern in (node.op_type, node.qualified_type, node.name)
    return exact or fnmatch.fnmatchcase(node.name, pattern)
