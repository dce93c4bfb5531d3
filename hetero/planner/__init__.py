"""Planner: capability -> cost -> placement -> partitions + transfers -> Plan. It names no vendor."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from hetero import executors as executor_registry
from hetero.errors import PlanError
from hetero.executors import Executor
from hetero.graph import Model
from hetero.planner.cost import CostModel, ExecutorProfile, Progress, learn_switches
from hetero.planner.placement import Capability, Rejections, place_manual, place_priority
from hetero.planner.plan import HOST, CandidateReport, Handoff, Partition, Plan, Transfer, build_plan
from hetero.planner.search import Candidate, candidates, estimate

POLICIES = ("priority", "manual", "latency", "throughput", "auto")
MEASURED_POLICIES = ("latency", "throughput", "auto")


def plan(model: Model, executors: Sequence[str | Executor] | None = None, policy: str = "priority", *,
         affinity: Mapping[str, str | Executor] | None = None, assignment: Mapping[str, str] | None = None,
         progress: Progress | None = None, profiles: Mapping[str, ExecutorProfile] | None = None,
         rejections: Rejections | None = None) -> Plan:
    """Place every node of `model` on one of `executors` by `policy` and cut it into partitions.

    `assignment` (node name -> executor name, e.g. a measured candidate) is honoured wherever the
    executor can still run the node; the rest falls back by priority. For the measured policies
    this returns the best estimate; `hetero.plan` and `hetero.compile` measure candidates whole.
    `rejections` (a session's) keeps nodes off executors that failed on them.
    """
    chosen = executor_registry.resolve(executors)
    capability = Capability(model, chosen, rejections)
    if assignment is not None:
        by_name = {e.name: e for e in chosen}
        placed = []
        for node in model.nodes:
            wanted = by_name.get(assignment.get(node.name, ""))
            placed.append(wanted if wanted is not None and capability.can(wanted, node)
                          else capability.first(node))
        return build_plan(model, placed, policy)
    if policy == "priority":
        if affinity:
            raise PlanError("affinity rules need policy='manual'")
        return build_plan(model, place_priority(capability), policy)
    if policy == "manual":
        return build_plan(model, place_manual(capability, affinity or {}), policy)
    if policy in MEASURED_POLICIES:
        return search(model, chosen, progress=progress, profiles=profiles, rejections=rejections)[0].plan
    raise PlanError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def search(model: Model, executors: Sequence[str | Executor] | None = None, *,
           progress: Progress | None = None, profiles: Mapping[str, ExecutorProfile] | None = None,
           scale: Mapping[str, float] | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
           values: Callable[[], Mapping[str, Any]] | None = None,
           profile: Collection[str] | None = None, budget_s: float | None = None,
           rejections: Rejections | None = None) -> list[Candidate]:
    """Profile what is not measured yet, then return candidate placements, best estimate first.

    `scale` calibrates each executor's node costs (see `CostModel.node`); `shapes` and `values`
    are the run planned for (concrete shapes, and the values every node sees: see `CostModel`);
    without `values` unmeasured nodes are estimated. `profile` limits node measurements to the
    executors named (the others are estimated); `budget_s` bounds the time spent measuring nodes
    (the heaviest first)."""
    chosen = executor_registry.resolve(executors)
    capability = Capability(model, chosen, rejections)
    costs = CostModel(model, chosen, profiles, scale, shapes=shapes, values=values, profile=profile)
    able = {node.index: capability.candidates(node) for node in model.nodes}
    costs.measure(costs.unmeasured(able), progress, budget_s)
    found = candidates(model, capability, costs)
    for candidate in found:
        parts = candidate.plan.partitions
        candidate.plan.partition_estimates = {
            p.index: costs.overhead_ms(p.executor) + sum(costs.node(n, p.executor).ms for n in p.nodes)
            + (costs.switch_ms(parts[p.index - 1].executor, p.executor) if p.index else 0.0)
            for p in parts}
    return found


__all__ = ["HOST", "MEASURED_POLICIES", "POLICIES", "Candidate", "CandidateReport", "Capability",
           "CostModel", "ExecutorProfile", "Handoff", "Partition", "Plan", "Rejections", "Transfer",
           "estimate",
           "learn_switches", "plan", "search"]
