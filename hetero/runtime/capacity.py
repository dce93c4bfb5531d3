"""Capacity what-if: the throughput and latency of a mix of cards and CPU streams (and of N such
servers), predicted from one profile per kind of replica, before the cards are bought.

A profile is one replica serving requests alone, one at a time: its seconds per request, the host
CPU seconds it burns (every thread of this process: libraries' thread pools, PoCL, Hetero itself),
and where its time goes (each device and link). Replicas on this host's executors are measured;
cards from a devices file are profiled on their simulation, so their figures are the declared ones
(labelled "declared"; the simulation says when the host could not keep their pace).

Combining them: every replica works at its own pace and they add up, unless together they need
more host CPU than there are cores; then the host's share of every request stretches until the
demand fits (all replicas slow down by their host-bound part). The bottleneck named is the host
CPU in that case, else the part (device or link) that takes most of the fastest replica's time.
N servers serve N times the requests, each request as fast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hetero import executors as executor_registry
from hetero.executors import Executor, default_threads, is_accelerator
from hetero.executors.sim_executor import simulate
from hetero.graph import Model, example_feeds
from hetero.runtime.session import Session, compile_plan

HOST_PART = "host CPU (host partitions, Hetero's own work)"


@dataclass(frozen=True)
class ReplicaProfile:
    """One replica's cost of one request, served alone."""

    name: str
    source: str  # "measured" or "declared"
    seconds: float
    host_cpu_s: float  # CPU seconds of this process per request, all threads
    host_wall_s: float  # the part of `seconds` the host computes (stretches when cores are short)
    parts: dict[str, float] = field(default_factory=dict)  # seconds per device or link

    @property
    def bound_by(self) -> tuple[str, float]:
        """The part taking most of a request's time, and its share."""
        name, seconds = max(self.parts.items(), key=lambda item: item[1])
        return name, seconds / self.seconds


@dataclass(frozen=True)
class Prediction:
    """Throughput and latency of replicas together on one server (and on `servers` of them)."""

    replicas: tuple[ReplicaProfile, ...]
    cores: int
    servers: int
    requests_per_s: float  # one server
    latency_s: float  # one request alone, on the fastest replica
    host_demand: float  # cores the replicas would burn at their own pace
    stretch: float  # factor on the host's share of each request (1: the cores suffice)
    bottleneck: str

    @property
    def total_requests_per_s(self) -> float:
        return self.requests_per_s * self.servers


def predict(replicas: Sequence[ReplicaProfile], cores: int | None = None, servers: int = 1) -> Prediction:
    """Combine replica profiles on a host with `cores` cores (default: this one's)."""
    cores = cores or default_threads()

    def demand(stretch: float) -> float:
        return sum(r.host_cpu_s / (r.seconds + r.host_wall_s * (stretch - 1)) for r in replicas)

    stretch = 1.0
    if demand(1.0) > cores:
        low, high = 1.0, 2.0
        while demand(high) > cores:
            high *= 2
        for _ in range(60):
            stretch = (low + high) / 2
            low, high = (stretch, high) if demand(stretch) > cores else (low, stretch)
        stretch = high
    rate = sum(1 / (r.seconds + r.host_wall_s * (stretch - 1)) for r in replicas)
    fastest = min(replicas, key=lambda r: r.seconds)
    if stretch > 1.0:
        bottleneck = (f"the host CPU: the replicas would burn {demand(1.0):.2f} of its {cores} cores at "
                      f"their own pace, so each request's host share takes {stretch:.2f}x longer")
    else:
        part, share = fastest.bound_by
        bottleneck = (f"{part}: {share:.0%} of a request on {fastest.name} (host CPU {demand(1.0):.2f} of "
                      f"{cores} cores)")
    return Prediction(tuple(replicas), cores, servers, rate, fastest.seconds, demand(1.0), stretch,
                      bottleneck)


def profile(session: Session, feeds: dict, *, source: str = "measured", requests: int = 10,
            budget_s: float = 2.0, simulation_cpu: bool = False) -> ReplicaProfile:
    """Serve requests one at a time on `session` (after two to warm up) and profile them.

    The host's work of simulating cards (computing their values) is left out of the host CPU, as
    a real card does it, unless `simulation_cpu` (to predict the simulation itself)."""
    for _ in range(2):
        session.run(feeds)
    cards = [e for e in session.plan.executors if getattr(e, "card", None) is not None]
    before = {e.name: _card_busy(e) for e in cards}
    simulating = sum(e.card.host_cpu_s for e in cards)
    walls: list[float] = []
    cpu = time.process_time()
    deadline = time.perf_counter() + budget_s
    with session.tracing() as trace:
        while len(walls) < requests and (len(walls) < 3 or time.perf_counter() < deadline):
            start = time.perf_counter()
            session.run(feeds)
            walls.append(time.perf_counter() - start)
    count = len(walls)
    seconds = sum(walls) / count  # the mean: what throughput is made of
    simulating = 0.0 if simulation_cpu else sum(e.card.host_cpu_s for e in cards) - simulating
    cpu_s = max(0.0, time.process_time() - cpu - simulating) / count
    # Where the time goes: a simulated card's own counters (its work is asynchronous: the trace
    # sees launches); for the rest, the trace's partitions per device and copies per link.
    parts: dict[str, float] = {}
    for executor in cards:
        for part, busy in _card_busy(executor).items():
            parts[part] = (busy - before[executor.name][part]) / count
    on_cards = sum(parts.values())  # the cards compute and copy; the host only waits
    spaces = [str(e.device) for e in cards]
    host = 0.0
    for event in trace.events:
        where = event.resource.removeprefix("link ")
        if any(space in where.split(" -> ") for space in spaces):
            continue
        if where == "cpu" or where.startswith("cpu#"):
            host += (event.end - event.start) / count
        else:
            parts[where] = parts.get(where, 0.0) + (event.end - event.start) / count
    parts[HOST_PART] = host + max(0.0, seconds - host - sum(parts.values()))
    name = "+".join(dict.fromkeys(e.name for e in session.plan.executors))
    return ReplicaProfile(name, source, seconds, cpu_s, max(0.0, seconds - on_cards),
                          {k: v for k, v in parts.items() if v > 0})


def _card_busy(executor: Executor) -> dict[str, float]:
    card = executor.card
    return {f"{card.device} compute": card.compute.busy_s,
            **{name: line.busy_s for name, line in card.links.items()}}



@dataclass
class Mix:
    """What runs on one server: a replica per card (and per accelerator named), plus CPU streams."""

    cards: list[Executor]  # one replica each, with the host libraries as fallback
    host: list[Executor]
    cpu_streams: int = 0
    simulated: list[Executor] = field(default_factory=list)  # the devices file's, declared

    @classmethod
    def of(cls, devices: str | Path | None = None, executors: Sequence[str | Executor] | None = None,
           cpu_streams: int | None = None) -> Mix:
        """This host's accelerators in `executors` (default: all here) and the cards a devices file
        declares, a replica each; the host libraries (or the file's simulated host, with the exact
        executor as fallback); CPU streams (default: none beside a devices file, else one a core)."""
        simulated = simulate(devices) if devices is not None else []
        present = [e for e in executor_registry.resolve(executors) if e.library != "sim"]
        cards = [e for e in present if is_accelerator(e)] + [e for e in simulated if is_accelerator(e)]
        declared_host = [e for e in simulated if not is_accelerator(e)]
        host = ([*declared_host, executor_registry.reference()] if declared_host
                else [e for e in present if not is_accelerator(e)])
        if cpu_streams is None:
            cpu_streams = 0 if simulated else default_threads()
        return cls(cards, host, cpu_streams, simulated)


def capacity(model: Model, mix: Mix, *, servers: int = 1, policy: str = "priority",
             simulation_cpu: bool = False, say: Callable[[str], None] = lambda text: None) -> Prediction:
    """Profile one replica of each kind in `mix` (a card kind once: its twins are alike) and predict
    the mix on one server and on `servers`. Simulated cards are "declared": see `profile` for
    `simulation_cpu`."""
    feeds = example_feeds(model)
    profiles: list[ReplicaProfile] = []
    kinds: dict[tuple[str, str], ReplicaProfile] = {}
    for card in mix.cards:
        kind = (card.library, card.info().device_name)
        if kind not in kinds:
            say(f"profiling a replica on {card.name}")
            session = compile_plan(model, [card, *mix.host], policy)
            kinds[kind] = profile(session, feeds, source="declared" if card.library == "sim" else "measured",
                                  simulation_cpu=simulation_cpu)
            session.close()
        profiles.append(kinds[kind])
    if mix.cpu_streams:
        threads = max(1, default_threads() // mix.cpu_streams)
        say(f"profiling a CPU stream ({threads} thread{'s' * (threads > 1)})")
        variants = [executor_registry.variant_of(e, threads=threads, stream=0) if mix.cpu_streams > 1 else e
                    for e in mix.host]
        session = compile_plan(model, variants, policy)
        stream = profile(session, feeds)
        session.close()
        profiles += [stream] * mix.cpu_streams
    if not profiles:
        raise ValueError("nothing to predict: no cards, accelerators or CPU streams in the mix")
    return predict(profiles, servers=servers)

