"""The measured policies: candidates from the planner's search, measured whole, the best kept.

`latency`: every single-library plan and the best few searched placements are compiled and timed
(median of warm runs), the fastest few raced again in interleaved rounds; the fastest wins, so the
result is never slower than the best single library beyond noise. `throughput`: replicas of the
model on CPU streams and accelerators (each replica placed by `latency`) against one pipelined
session with many requests in flight, chosen by measured requests per second. Measurements are
cached on disk by model structure and placement, so planning again measures nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from hetero import executors as executor_registry
from hetero import planner
from hetero.cache import JsonStore
from hetero.errors import ExecutorUnavailableError, PlanError
from hetero.executors import Executor, default_threads, is_accelerator
from hetero.graph import Model, example_feeds
from hetero.planner import Candidate, CandidateReport, Plan
from hetero.planner.cost import Progress, executor_key, time_call
from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.session import Session, compile_plan

MEASURE_TOP = 3  # searched placements measured besides every single-library plan
FINALISTS = 3  # the fastest measured candidates, raced again in interleaved rounds
PRECISION_TOLERANCE = 0.01  # relative L2 output error a reduced-precision candidate may add
_plans = JsonStore("plans")


def _key(model: Model, kind: str, names: Sequence[str]) -> str:
    executors = {e.name: e for e in executor_registry.available()}
    identities = sorted({executor_key(executors[n]) if n in executors else n for n in names})
    return f"{kind}|{model.fingerprint}|{'/'.join(names)}|{'/'.join(identities)}"


def tune_latency(model: Model, executors: Sequence[str | Executor] | None, *,
                 progress: Progress | None = None, max_in_flight: int = 16,
                 allow_precision: str | None = None, tolerance: float = PRECISION_TOLERANCE) -> Session:
    """Measure candidate placements whole and return a session of the fastest.

    First every single-library plan is measured; their measured-over-estimated ratios calibrate
    each executor's node costs; the search then runs again on calibrated costs and its best few
    placements are measured too. With `allow_precision="bf16"`, executors' bf16 variants join the
    search, and a candidate using one is kept only if every output stays within `tolerance`
    (relative L2 error against the exact fp32 reference, on the calibration inputs).
    """
    chosen = executor_registry.resolve(executors)
    if allow_precision:
        chosen += _variants(chosen, allow_precision)
    feeds = example_feeds(model)
    reference = _reference_outputs(model, feeds) if allow_precision else None
    measured: dict[tuple[str, ...], tuple[Candidate, float, Session | None]] = {}
    rejected: list[CandidateReport] = []

    def measure(candidate: Candidate) -> None:
        names = tuple(e.name for e in candidate.assignment)
        if names in measured or any(r.name == candidate.name for r in rejected):
            return
        key = _key(model, "latency", names)
        cached = _plans.get(key)
        reduced = any(getattr(e, "precision", "fp32") != "fp32" for e in candidate.assignment)
        if cached is not None and not reduced:
            measured[names] = (candidate, float(cached), None)
            return
        try:
            session = _session(model, chosen, candidate, max_in_flight)
            if reduced and reference is not None:
                error = _relative_error(session.run(feeds), reference)
                if error > tolerance:
                    rejected.append(CandidateReport(candidate.name, candidate.estimate_ms, None, False,
                                                    f"output error {error:.2%} > {tolerance:.2%}"))
                    return
            ms = float(cached) if cached is not None else (
                time_call(lambda: session.run(feeds), min_repeats=5, budget_s=1.0) * 1e3)
        except Exception as exc:
            candidate.plan.notes.append(f"candidate {candidate.name} failed: {exc}")
            return
        _plans.put(key, ms)
        measured[names] = (candidate, ms, session)

    executors = chosen
    found = planner.search(model, executors, progress=progress)
    singles = [c for c in found if c.name.endswith(" alone")]
    for candidate in singles:
        measure(candidate)
    scale = {}
    for candidate in singles:
        names = tuple(e.name for e in candidate.assignment)
        if names in measured and candidate.estimate_ms > 0:
            scale[candidate.name.removesuffix(" alone")] = measured[names][1] / candidate.estimate_ms
    for candidate in [c for c in planner.search(model, executors, scale=scale)
                      if not c.name.endswith(" alone")][:MEASURE_TOP]:
        measure(candidate)
    live = sorted((item for item in measured.items() if item[1][2] is not None), key=lambda item: item[1][1])
    if len(live) > 1:  # raced times are kept apart: calibration stays on the single measurements
        finalists = {names: session for names, (_, _, session) in live[:FINALISTS]}
        for names, ms in _race(finalists, feeds).items():
            _plans.put(_key(model, "raced", names), ms)
    for names, (candidate, ms, session) in measured.items():
        raced = _plans.get(_key(model, "raced", names))
        measured[names] = (candidate, ms if raced is None else float(raced), session)
    _plans.save()
    if not measured:
        raise PlanError(f"model {model.label!r}: no candidate placement could be compiled and run")
    best, _, session = min(measured.values(), key=lambda item: item[1])
    for _, _, other in measured.values():
        if other is not None and other is not session:
            other.close()
    if session is None:
        session = _session(model, executors, best, max_in_flight)
    reports = [CandidateReport(c.name, c.estimate_ms, ms, c is best) for c, ms, _ in measured.values()]
    _explain(session, reports + rejected, best.plan.partition_estimates, feeds)
    return session


def _race(sessions: dict[tuple[str, ...], Session], feeds: dict, min_rounds: int = 3, max_rounds: int = 9,
          budget_s: float = 2.0) -> dict[tuple[str, ...], float]:
    """Median ms of each session over interleaved rounds: candidates measured one after another
    see a shared machine at different moments; raced in turns, its drift hits them all alike."""
    times: dict[tuple[str, ...], list[float]] = {names: [] for names in sessions}
    deadline = time.perf_counter() + budget_s
    for round_ in range(max_rounds):
        if round_ >= min_rounds and time.perf_counter() > deadline:
            break
        for names, session in sessions.items():
            session.run(feeds)  # untimed: the previous candidate's library may still spin
            start = time.perf_counter()
            session.run(feeds)
            times[names].append(time.perf_counter() - start)
    return {names: statistics.median(t) * 1e3 for names, t in times.items()}


def _variants(executors: list[Executor], precision: str) -> list[Executor]:
    variants = []
    for executor in executors:
        try:
            variant = executor_registry.variant_of(executor, precision)
        except ExecutorUnavailableError:
            continue
        if variant is not executor and variant not in executors:
            variants.append(variant)
    return variants


def _reference_outputs(model: Model, feeds: dict) -> dict:
    return compile_plan(model, [executor_registry.reference()]).run(feeds)


def _relative_error(outputs: dict, reference: dict) -> float:
    """Largest relative L2 error over the outputs (float outputs; others must match exactly)."""
    worst = 0.0
    for name, expected in reference.items():
        got, want = np.asarray(outputs[name]), np.asarray(expected)
        if want.dtype.kind != "f":
            worst = max(worst, 0.0 if np.array_equal(got, want) else float("inf"))
            continue
        scale = float(np.linalg.norm(want.astype(np.float64))) or 1.0
        worst = max(worst, float(np.linalg.norm((got - want).astype(np.float64))) / scale)
    return worst


def _session(model: Model, executors: Sequence[str | Executor] | None, candidate: Candidate,
             max_in_flight: int) -> Session:
    assignment = {node.name: e.name for node, e in zip(model.nodes, candidate.assignment, strict=True)}
    return compile_plan(model, executors, "latency", assignment=assignment, max_in_flight=max_in_flight)


def _explain(session: Session, reports: list[CandidateReport], estimates: dict[int, float],
             feeds: dict) -> None:
    """Attach the candidates and per-partition estimated and measured times to the plan."""
    plan: Plan = session.plan
    plan.candidates = sorted(reports, key=lambda r: (r.measured_ms is None, r.measured_ms))
    plan.partition_estimates = dict(estimates) if len(estimates) == len(plan.partitions) else {}
    with session.tracing() as trace:
        for _ in range(3):
            session.run(feeds)
    measured = trace.partition_ms()
    plan.partition_measured = {p.index: measured[f"#{p.index}"] for p in plan.partitions
                               if f"#{p.index}" in measured}


def tune_throughput(model: Model, executors: Sequence[str | Executor] | None, *,
                    progress: Progress | None = None, seconds: float = 2.0) -> Session | ReplicaPool:
    """Replicas against one pipelined session: the higher measured requests per second wins.

    Replicas are one per accelerator (placed by `latency` on it and the host libraries, once per
    kind of card) and one per CPU stream (host libraries alone, each stream a slice of the cores).
    Partitions on one device take turns, so an accelerator gets one replica, never one per stream.
    Measured: the accelerators' replicas, the CPU streams', and both together.
    """
    latency_session = tune_latency(model, executors, progress=progress)
    chosen = executor_registry.resolve(executors)
    feeds = example_feeds(model)
    host = [e for e in chosen if not is_accelerator(e)]
    cards = _accelerator_replicas(model, chosen, host, latency_session, progress)
    streams = _stream_replicas(model, host, latency_session, progress) if default_threads() > 1 else []
    options: list[tuple[str, Session | ReplicaPool]] = [("one session, pipelined", latency_session)]
    if cards:
        options.append((f"{len(cards)} accelerator replicas", ReplicaPool(cards)))
    if streams:
        options.append((f"{len(streams)} CPU-stream replicas", ReplicaPool(streams)))
    if cards and streams:
        options.append((f"{len(cards)} accelerator + {len(streams)} CPU-stream replicas",
                        ReplicaPool([*cards, *streams])))
    results = []
    for name, runner in options:
        key = _key(model, "throughput", [name, *(e.name for e in chosen)])
        rate = _plans.get(key)
        if rate is None:
            rate = measure_rate(runner, feeds, seconds)
            _plans.put(key, rate)
        results.append((rate, name, runner))
    _plans.save()
    _, name, winner = max(results, key=lambda item: item[0])
    winner.plan.notes.append("throughput: " + ", ".join(f"{n} {r:.1f} req/s" for r, n, _ in results)
                             + f"; chose {name}")
    for _, _, runner in results:
        if runner is not winner and isinstance(runner, ReplicaPool):
            runner.close()
    return winner


def _accelerator_replicas(model: Model, chosen: list[Executor], host: list[Executor], placed: Session,
                          progress: Progress | None) -> list[Session]:
    """One session per accelerator, on it and the host libraries. Each kind of card (library and
    device model) is placed by `latency` once; its twins take the same placement."""
    sessions: list[Session] = []
    placements: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    for card in (e for e in chosen if is_accelerator(e)):
        kind = (card.library, card.info().device_name)
        if kind not in placements:
            alone = placed if set(placed.plan.executors) <= {card, *host} else tune_latency(
                model, [card, *host], progress=progress)
            placements[kind] = (card.name, {n.name: alone.plan.executor_of(n).name for n in model.nodes})
            if alone is not placed:
                alone.close()
        first, placement = placements[kind]
        assignment = {node: card.name if name == first else name for node, name in placement.items()}
        sessions.append(compile_plan(model, [card, *host], "latency", assignment=assignment))
    return sessions


def _stream_replicas(model: Model, host: list[Executor], placed: Session,
                     progress: Progress | None) -> list[Session]:
    """One session per CPU stream, each on the host libraries' variants for that stream."""
    if not host:
        return []
    on_host = placed if set(placed.plan.executors) <= set(host) else tune_latency(model, host,
                                                                                    progress=progress)
    placement = {n.name: on_host.plan.executor_of(n).name for n in model.nodes}
    if on_host is not placed:
        on_host.close()
    streams = default_threads()
    sessions = []
    for stream in range(streams):
        variants = {e.name: executor_registry.variant_of(e, threads=max(1, default_threads() // streams),
                                                         stream=stream) for e in host}
        assignment = {node: variants[name].name for node, name in placement.items()}
        sessions.append(compile_plan(model, list(variants.values()), "latency", assignment=assignment))
    return sessions


def measure_rate(runner: Session | ReplicaPool, feeds: dict, seconds: float) -> float:
    """Requests per second with the runner's queue kept full for about `seconds`."""
    for _ in runner.map(feeds for _ in range(2)):
        pass
    count = 0
    start = time.perf_counter()
    deadline = start + seconds

    def stream():
        while time.perf_counter() < deadline:
            yield feeds

    for _ in runner.map(stream()):
        count += 1
    return count / (time.perf_counter() - start)
