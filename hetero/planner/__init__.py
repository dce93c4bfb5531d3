"""Planner: capability -> placement -> partitions + transfers -> Plan. It names no vendor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hetero import executors as executor_registry
from hetero.errors import PlanError
from hetero.executors import Executor
from hetero.graph import Model
from hetero.planner.placement import Capability, forget, place_manual, place_priority, reject
from hetero.planner.plan import HOST, Partition, Plan, Transfer, build_plan

POLICIES = ("priority", "manual")


def plan(model: Model, executors: Sequence[str | Executor] | None = None, policy: str = "priority", *,
         affinity: Mapping[str, str | Executor] | None = None) -> Plan:
    """Place every node of `model` on one of `executors` by `policy` and cut it into partitions."""
    chosen = executor_registry.resolve(executors)
    capability = Capability(model, chosen)
    if policy == "priority":
        if affinity:
            raise PlanError("affinity rules need policy='manual'")
        assignment = place_priority(capability)
    elif policy == "manual":
        assignment = place_manual(capability, affinity or {})
    else:
        raise PlanError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return build_plan(model, assignment, policy)


__all__ = ["HOST", "POLICIES", "Capability", "Partition", "Plan", "Transfer", "forget", "plan", "reject"]
