"""The plan: partitions, the transfers between memory spaces, and the order they may run in."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from hetero.executors import Executor, hands_off
from hetero.graph import Model, Node
from hetero.planner.partition import partition

HOST = "cpu"


@dataclass(frozen=True)
class Partition:
    """A set of nodes placed on one executor and compiled as one unit."""

    index: int
    executor: Executor
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    depends_on: tuple[int, ...]

    @property
    def op_histogram(self) -> Counter:
        return Counter(n.op_type for n in self.nodes)

    def describe_ops(self, limit: int = 4) -> str:
        common = self.op_histogram.most_common()
        text = ", ".join(f"{op} {count}" for op, count in common[:limit])
        return text + (f", +{len(common) - limit} more" if len(common) > limit else "")


@dataclass(frozen=True)
class Transfer:
    """A tensor crossing from one memory space to another; `consumer` None means the caller."""

    tensor: str
    nbytes: int | None
    source: str
    target: str
    producer: int | None
    consumer: int | None

    @property
    def link(self) -> str:
        return f"{self.source} -> {self.target}"


@dataclass(frozen=True)
class Handoff:
    """A tensor one library made on a device, read there by another library: no copy (DLPack or
    the CUDA Array Interface), only the producer's synchronization."""

    tensor: str
    nbytes: int | None
    space: str
    source: str
    target: str
    producer: int
    consumer: int


@dataclass(frozen=True)
class CandidateReport:
    """A placement the planner considered: estimated and (when measured) measured ms per request."""

    name: str
    estimated_ms: float
    measured_ms: float | None
    chosen: bool
    note: str = ""


@dataclass
class Plan:
    """Where each part of a model runs, and what crosses between memory spaces.

    Measured policies fill `partition_estimates` / `partition_measured` (ms per partition) and
    `candidates` (the placements considered, with their times), so the plan explains itself.
    """

    model: Model
    policy: str
    partitions: tuple[Partition, ...]
    transfers: tuple[Transfer, ...]
    notes: list[str] = field(default_factory=list)
    partition_estimates: dict[int, float] = field(default_factory=dict)
    partition_measured: dict[int, float] = field(default_factory=dict)
    candidates: list[CandidateReport] = field(default_factory=list)
    handoffs: tuple[Handoff, ...] = ()

    @property
    def executors(self) -> list[Executor]:
        return list(dict.fromkeys(p.executor for p in self.partitions))

    def executor_of(self, node: Node | str) -> Executor:
        name = node if isinstance(node, str) else node.name
        for part in self.partitions:
            if any(n.name == name for n in part.nodes):
                return part.executor
        raise KeyError(f"node {name!r} is not in the plan of model {self.model.label!r}")

    @property
    def transfer_bytes(self) -> int:
        return sum(t.nbytes or 0 for t in self.transfers)

    def rows(self) -> tuple[list[list[str]], list[list[str]]]:
        """Table rows for partitions and transfers (what `hetero plan` prints)."""
        parts = [[str(p.index), p.executor.name, str(len(p.nodes)), p.describe_ops(),
                  ", ".join(map(str, p.depends_on)) or "-", _ms(self.partition_estimates.get(p.index)),
                  _ms(self.partition_measured.get(p.index))] for p in self.partitions]
        transfers = [[t.tensor, _bytes(t.nbytes), t.link,
                      "input" if t.producer is None else f"#{t.producer}",
                      "output" if t.consumer is None else f"#{t.consumer}"] for t in self.transfers]
        return parts, transfers

    def dot(self) -> str:
        """The graph as Graphviz DOT: a cluster per partition, nodes coloured by executor, tensors
        crossing memory spaces drawn bold with their size."""
        palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f"]
        colour = {e.name: palette[i % len(palette)] for i, e in enumerate(self.executors)}
        crossing = {(t.tensor, t.consumer): t for t in self.transfers}
        lines = ["digraph plan {",
                 '  rankdir=TB; node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=10,'
                 ' fontcolor=white]; edge [fontsize=8, color="#888888"];']
        producer = {}
        for part in self.partitions:
            fill = colour[part.executor.name]
            lines.append(f'  subgraph cluster_{part.index} {{ label="#{part.index} {part.executor.name}"; '
                         f'color="{fill}"; fontname=Helvetica; fontsize=11;')
            for node in part.nodes:
                lines.append(f'    n{node.index} [label="{node.op_type}", fillcolor="{fill}", '
                             f'tooltip={_quote(node.name)}];')
                for out in node.outputs:
                    producer[out] = (node.index, part.index)
            lines.append("  }")
        for part in self.partitions:
            for node in part.nodes:
                for name in dict.fromkeys(node.all_inputs):
                    if name not in producer:
                        continue
                    source, source_part = producer[name]
                    moved = crossing.get((name, part.index)) if source_part != part.index else None
                    style = f' [penwidth=2.5, color=black, label="{_bytes(moved.nbytes)}"]' if moved else ""
                    lines.append(f"  n{source} -> n{node.index}{style};")
        lines.append("}")
        return "\n".join(lines)

    def __str__(self) -> str:
        parts, transfers = self.rows()
        lines = [f"plan for {self.model.label} ({len(self.model.nodes)} nodes, policy {self.policy}): "
                 f"{len(self.partitions)} partitions, {len(self.transfers)} transfers, "
                 f"{_bytes(self.transfer_bytes)} moved"]
        timed = self.partition_estimates or self.partition_measured
        lines += [f"  #{r[0]:<3} {r[1]:<22} {r[2]:>4} nodes  [{r[3]}]  after: {r[4]}"
                  + (f"  est {r[5]} ms, measured {r[6]} ms" if timed else "") for r in parts]
        lines += [f"  transfer {r[0]} ({r[1]}) {r[2]}  {r[3]} -> {r[4]}" for r in transfers]
        lines += [f"  hand-off {h.tensor} ({_bytes(h.nbytes)}) {h.source} -> {h.target} in {h.space}, "
                  f"no copy  #{h.producer} -> #{h.consumer}" for h in self.handoffs]
        lines += [f"  candidate {c.name}: est {_ms(c.estimated_ms)} ms, measured {_ms(c.measured_ms)} ms"
                  + (" (chosen)" if c.chosen else "") + (f" - {c.note}" if c.note else "")
                  for c in self.candidates]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def build_plan(model: Model, assignment: Sequence[Executor], policy: str,
               notes: Sequence[str] = ()) -> Plan:
    """Partition a node -> executor assignment and derive the transfers it implies."""
    groups = partition(model, [e.name for e in assignment])
    producer_part: dict[str, int] = {}
    partitions: list[Partition] = []
    for index, members in enumerate(groups):
        executor = assignment[members[0]]
        inputs, outputs = model.boundary(members)
        depends = sorted({producer_part[i] for i in inputs if i in producer_part})
        partitions.append(Partition(index, executor, tuple(model.nodes[m] for m in members),
                                    tuple(inputs), tuple(outputs), tuple(depends)))
        for out in outputs:
            producer_part[out] = index
    transfers: dict[tuple[str, str], Transfer] = {}
    handoffs: list[Handoff] = []
    for part in partitions:
        for name in part.inputs:
            source_part = producer_part.get(name)
            source = HOST if source_part is None else partitions[source_part].executor.memory_space
            if source_part is not None and hands_off(partitions[source_part].executor, part.executor):
                handoffs.append(Handoff(name, model.tensor(name).nbytes, source,
                                        partitions[source_part].executor.name, part.executor.name,
                                        source_part, part.index))
            if source != part.executor.memory_space:
                transfers.setdefault((name, part.executor.memory_space), Transfer(
                    name, model.tensor(name).nbytes, source, part.executor.memory_space,
                    source_part, part.index))
    for name in model.output_names:
        source_part = producer_part.get(name)
        if source_part is not None and partitions[source_part].executor.memory_space != HOST:
            transfers.setdefault((name, HOST), Transfer(
                name, model.tensor(name).nbytes, partitions[source_part].executor.memory_space, HOST,
                source_part, None))
    return Plan(model, policy, tuple(partitions), tuple(transfers.values()), list(notes),
                handoffs=tuple(handoffs))
