"""Capability and the simple placement policies: `priority` and `manual`.

`priority` is what ONNX Runtime and OpenVINO HETERO do: each node goes to the first executor in
the user's order that supports it. `manual` applies affinity rules (op type or node-name
pattern -> executor) and places the remaining nodes by priority.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hetero import executors as executor_registry
from hetero.errors import PlanError
from hetero.executors import Executor
from hetero.graph import Model, Node

RUN_FAILURE_TTL_S = 300.0  # how long a run-time failure keeps a node off an executor


@dataclass(frozen=True)
class Rejection:
    """Why a node is kept off an executor: `cause` is "compile" (the library refused it, for good)
    or "run" (it failed while running; may be transient, so it expires)."""

    cause: str
    reason: str
    expires: float | None


class Rejections:
    """What failures taught the planner within one session: (executor, node) pairs to avoid.

    Each session (and each `compile_plan`) owns one, so a fault seen by one session never changes
    another's plan. Compile-time refusals last as long as the session; run-time failures expire
    after `run_ttl_s` seconds of `clock`, after which the session may place the node there again.
    """

    def __init__(self, run_ttl_s: float = RUN_FAILURE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.run_ttl_s = run_ttl_s
        self.clock = clock
        self._entries: dict[tuple[str, str], Rejection] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def reject(self, executor: Executor, model: Model, node: Node, cause: str, reason: str = "") -> None:
        """Keep `node` off `executor`; `cause` is "compile" or "run" (the latter expires)."""
        expires = self.clock() + self.run_ttl_s if cause == "run" else None
        with self._lock:
            self._entries[executor.name, model.signature(node)] = Rejection(cause, reason, expires)

    def forget(self, executor: Executor, model: Model, node: Node) -> None:
        """Undo `reject` (the failure turned out not to be the executor's)."""
        with self._lock:
            self._entries.pop((executor.name, model.signature(node)), None)

    def refuses(self, executor: Executor, model: Model, node: Node) -> Rejection | None:
        with self._lock:
            self._purge()
            return self._entries.get((executor.name, model.signature(node)))

    def next_expiry(self) -> float | None:
        """When the first run-time rejection expires (on `clock`), None if none will."""
        with self._lock:
            return min((r.expires for r in self._entries.values() if r.expires is not None), default=None)

    def _purge(self) -> None:
        now = self.clock()
        for key in [k for k, r in self._entries.items() if r.expires is not None and r.expires <= now]:
            del self._entries[key]


class Capability:
    """Which of the given executors can run each node of a model, asked once per node."""

    def __init__(self, model: Model, executors: Sequence[Executor], rejections: Rejections | None = None):
        self.model = model
        self.executors = list(executors)
        self.rejections = rejections
        self._cache: dict[tuple[int, str], bool] = {}

    def can(self, executor: Executor, node: Node) -> bool:
        key = (node.index, executor.name)
        if key not in self._cache:
            refused = self.rejections is not None and self.rejections.refuses(executor, self.model, node)
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
        refused = self.rejections.refuses(executor, self.model, node) if self.rejections is not None else None
        if refused is not None:
            how = "rejected it when compiling" if refused.cause == "compile" else "failed on it while running"
            return f"{how}: {refused.reason}" if refused.reason else how
        return executor.decline(node, self.model) or "declined"


def place_priority(capability: Capability) -> list[Executor]:
    return [capability.first(node) for node in capability.model.nodes]


def place_manual(capability: Capability, affinity: Mapping[str, str | Executor]) -> list[Executor]:
    """Affinity keys are op types ('Conv', 'com.example::BoxDecode') or node-name glob patterns."""
    rules = [(pattern, executor_registry.resolve([target])) for pattern, target in affinity.items()]
    model = capability.model
    for pattern, _ in rules:
        if not any(_matches(pattern, node) for node in model.nodes):
            raise PlanError(f"model {model.label!r}: affinity rule {pattern!r} matches no node (rules name "
                            "an op type such as 'Conv', or a node-name pattern such as 'backbone/*')")
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
