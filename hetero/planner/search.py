"""Placement search for the `latency` policy: candidates from estimated costs, to be measured whole.

Nodes are taken in topological order as a chain; a dynamic programme (as Collage does) picks an
executor per node minimising node costs plus a switch cost at every change of executor (the new
partition's call overhead and the transfer of what crosses). Graph compilers fuse across nodes,
so node costs are only a first estimate: the search returns a few candidates (the programme at
several switch penalties, and every single-library plan), and the runtime measures them whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetero.executors import Executor
from hetero.graph import Model
from hetero.planner.cost import CostModel
from hetero.planner.placement import Capability
from hetero.planner.plan import Plan, build_plan

SWITCH_PENALTIES = (1.0, 3.0, 10.0)


@dataclass
class Candidate:
    """One placement to consider: a name saying where it came from, and its estimated time."""

    name: str
    assignment: list[Executor]
    estimate_ms: float
    plan: Plan


def estimate(plan: Plan, costs: CostModel) -> float:
    """Estimated time of one request through a plan: node costs, one call overhead per partition,
    transfers; partitions run one after another (executors sharing a device never overlap)."""
    total = 0.0
    previous = None
    for part in plan.partitions:
        total += costs.overhead_ms(part.executor) + costs.switch_ms(previous, part.executor)
        total += sum(costs.node(node, part.executor).ms for node in part.nodes)
        previous = part.executor
    by_space = {p.executor.memory_space: p.executor for p in plan.partitions}
    for transfer in plan.transfers:
        source, target = by_space.get(transfer.source), by_space.get(transfer.target)
        total += costs.transfer_ms(transfer.nbytes, source, target)
    return total


def chain_assignment(model: Model, capability: Capability, costs: CostModel,
                     penalty: float = 1.0) -> list[Executor]:
    """Minimum of node costs + penalty x switch costs over the topological chain (Viterbi); a
    switch costs the new partition's call overhead, the measured cost of handing the resource from
    one library to the other, and the transfer of what crosses.

    A node reading the model's inputs, or producing its outputs, away from host memory also pays
    for their copies: so a device with a slow link is not chosen for small work at the edges."""
    executors = capability.executors
    best = {e.name: 0.0 for e in executors}
    back: list[dict[str, str]] = []
    previous: Executor | None = None
    graph_inputs, graph_outputs = set(model.input_names), set(model.output_names)
    for node in model.nodes:
        able = capability.candidates(node)
        incoming_bytes = sum(model.tensor(n).nbytes or 0 for n in node.all_inputs
                             if model.producer(n) is not None)
        from_host = sum(model.tensor(n).nbytes or 0 for n in set(node.all_inputs) & graph_inputs)
        to_host = sum(model.tensor(n).nbytes or 0 for n in set(node.outputs) & graph_outputs)
        scores: dict[str, float] = {}
        choice: dict[str, str] = {}
        for executor in able:
            own = costs.node(node, executor).ms
            if from_host:
                own += costs.transfer_ms(from_host, None, executor)
            if to_host:
                own += costs.transfer_ms(to_host, executor, None)
            options = []
            for before in (executors if previous is not None else [executor]):
                if best.get(before.name, math.inf) == math.inf:
                    continue
                switch = 0.0
                if before.name != executor.name:
                    moved = costs.transfer_ms(incoming_bytes, before, executor) if incoming_bytes else 0.0
                    switch = penalty * (costs.overhead_ms(executor) + costs.switch_ms(before, executor)
                                        + moved)
                options.append((best[before.name] + switch, before.name))
            if options:
                score, came_from = min(options)
                scores[executor.name] = score + own
                choice[executor.name] = came_from
        if not scores:
            raise ValueError(f"no executor can run node {node.name!r}")
        best = {e.name: scores.get(e.name, math.inf) for e in executors}
        back.append(choice)
        previous = node
    by_name = {e.name: e for e in executors}
    current = min(best, key=best.get)
    assignment = []
    for choice in reversed(back):
        assignment.append(by_name[current])
        current = choice[current]
    return assignment[::-1]


def single_library(model: Model, capability: Capability, executor: Executor) -> list[Executor]:
    """Everything on `executor` that it supports, the rest by the remaining priority order."""
    rest = [e for e in capability.executors if e is not executor]
    return [executor if capability.can(executor, node) else capability.first(node, rest)
            for node in model.nodes]


def candidates(model: Model, capability: Capability, costs: CostModel) -> list[Candidate]:
    """Distinct placements worth measuring, best estimate first; every single-library plan is in."""
    found: dict[tuple[str, ...], Candidate] = {}

    def add(name: str, assignment: list[Executor]) -> None:
        key = tuple(e.name for e in assignment)
        if key in found:
            return
        plan = build_plan(model, assignment, "latency")
        found[key] = Candidate(name, assignment, estimate(plan, costs), plan)

    for executor in capability.executors:
        if any(capability.can(executor, node) for node in model.nodes):
            add(f"{executor.name} alone", single_library(model, capability, executor))
    for penalty in SWITCH_PENALTIES:
        add(f"search (switch cost x{penalty:g})", chain_assignment(model, capability, costs, penalty))
    return sorted(found.values(), key=lambda c: c.estimate_ms)
