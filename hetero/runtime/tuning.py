"""The measured policies: candidates from the planner's search, measured whole, the best kept.

`latency`: every single-library plan and the best few searched placements are compiled and timed
(median of warm runs), the fastest few raced again in interleaved rounds; the fastest wins, so the
result is never slower than the best single library beyond noise. `throughput`: replicas of the
model on CPU streams and accelerators (each replica placed by `latency`) against one pipelined
session with many requests in flight, chosen by measured requests per second. Measurements are
cached on disk by model structure and placement, so planning again measures nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hetero import executors as executor_registry
from hetero import planner
from hetero.cache import JsonStore
from hetero.errors import ExecutorUnavailableError, InputError, PlanError
from hetero.executors import Executor, default_threads, is_accelerator
from hetero.executors.base import save_probe_answers
from hetero.graph import Model, complete
from hetero.planner import Candidate, CandidateReport, Plan
from hetero.planner.cost import Progress, executor_key, time_call
from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.samples import SampleInputs, exact_executors, made_up, observe, profile, representative
from hetero.runtime.session import Session, compile_plan

MEASURE_TOP = 3  # searched placements measured besides every single-library plan
FINALISTS = 3  # the fastest measured candidates, raced again in interleaved rounds
PRECISION_TOLERANCE = 0.01  # relative L2 output error a reduced-precision candidate may add
PROFILE_BUDGET_S = 20.0  # seconds of node measurements per planning, heaviest nodes first
PROFILE_WITHIN = 1.5  # executors whose single-library plan is this close to the best get nodes measured
SEARCH_ROUNDS = 2  # searches for mixed placements, each after learning from the last one's measurements
MIXED_MARGIN = 0.05  # how much faster than the best single library a mixed placement must measure
GIVE_UP = 2.0  # a candidate this much slower than the best so far after one warm run is not timed further
GIVE_UP_COLD = 5.0  # the same after its first run, which pays one-time set-up
_plans = JsonStore("plans")


def _key(model: Model, kind: str, names: Sequence[str]) -> str:
    executors = {e.name: e for e in executor_registry.available()}
    identities = sorted({executor_key(executors[n]) if n in executors else n for n in names})
    return f"{kind}|{model.fingerprint}|{'/'.join(names)}|{'/'.join(identities)}"


def tune_latency(model: Model, executors: Sequence[str | Executor] | None, *,
                 progress: Progress | None = None, max_in_flight: int = 16,
                 allow_precision: str | None = None, tolerance: float = PRECISION_TOLERANCE,
                 sample_inputs: SampleInputs | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> Session:
    """Measure candidate placements whole and return a session of the fastest.

    Planning runs on representative inputs: `sample_inputs` (one feeds dict or several), else
    random values of `input_shapes`, else of the model's dims with `DEFAULT_DIMS` for symbolic
    ones. First every single-library plan is measured; their measured-over-estimated ratios
    calibrate each executor's node costs; the search then runs again on calibrated costs and its
    best few placements are measured too. With `allow_precision="bf16"`, executors' bf16 variants
    join the search, and a candidate using one is kept only if every output stays within
    `tolerance` (relative L2 error against the exact fp32 reference, on every sample). When the
    model cannot run on the inputs made up for it, this warns naming them and returns the
    `priority` plan instead of raising.
    """
    chosen = executor_registry.resolve(executors)
    if allow_precision:
        chosen += _variants(chosen, allow_precision)
    try:
        samples = representative(model, sample_inputs, input_shapes, count=1 if sample_inputs else 3)
        feeds = samples[0]
        observed = observe(model, feeds)
    except InputError:
        raise
    except Exception as exc:
        return _fall_back(model, executors, max_in_flight, sample_inputs, input_shapes, exc)
    model = complete(model, observed.types)
    kind = f"latency|{profile(feeds)}"
    decided = _key(model, f"chosen|{kind}|{allow_precision}", [e.name for e in chosen])
    if _plans.get(decided) is not None:  # planned before for this shape profile: nothing to measure
        with contextlib.suppress(Exception):
            return _recall(model, chosen, _plans.get(decided), feeds, max_in_flight)
    reference = _reference_outputs(model, samples) if allow_precision else None
    measured: dict[tuple[str, ...], tuple[Candidate, float, Session | None]] = {}
    rejected: list[CandidateReport] = []
    failures: list[str] = []

    def measure(candidate: Candidate) -> None:
        names = tuple(e.name for e in candidate.assignment)
        if names in measured or any(r.name == candidate.name for r in rejected):
            return
        key = _key(model, kind, names)
        cached = _plans.get(key)
        reduced = any(getattr(e, "precision", "fp32") != "fp32" for e in candidate.assignment)
        if cached is not None and not reduced:
            measured[names] = (candidate, float(cached), None)
            return
        try:
            session = _session(model, chosen, candidate, max_in_flight)
            sessions.append(session)
            if reduced and reference is not None:
                errors = _relative_errors(session, samples, reference)
                worst = max(errors.values(), default=0.0)
                note = "output error " + ", ".join(f"{n} {e:.2%}" for n, e in errors.items())
                if worst > tolerance:
                    session.close()
                    rejected.append(CandidateReport(candidate.name, candidate.estimate_ms, None, False,
                                                    f"{note} > {tolerance:.2%} on {len(samples)} inputs"))
                    return
                candidate.plan.notes.append(f"{candidate.name}: {note} on {len(samples)} inputs")
            ms = float(cached) if cached is not None else _time_candidate(session, feeds, best_ms())
        except Exception as exc:
            failures.append(f"candidate {candidate.name} failed: {exc}")
            return
        _plans.put(key, ms)
        measured[names] = (candidate, ms, session)

    def best_ms() -> float | None:
        return min((ms for _, ms, _ in measured.values()), default=None)

    executors = chosen
    sessions: list[Session] = []
    searching = {"shapes": observed.shapes, "values": observed.values}
    for candidate in _singles(planner.search(model, executors, shapes=observed.shapes)):
        measure(candidate)
    alone = {c.name.removesuffix(" alone"): ms for c, ms, _ in measured.values() if c.name.endswith(" alone")}
    fast = {name for name, ms in alone.items() if ms <= PROFILE_WITHIN * min(alone.values(), default=0)}
    found = planner.search(model, executors, progress=progress, profile=fast, budget_s=PROFILE_BUDGET_S,
                           **searching)
    scale = {}
    for candidate in _singles(found):
        names = tuple(e.name for e in candidate.assignment)
        if names in measured and candidate.estimate_ms > 0:
            scale[candidate.name.removesuffix(" alone")] = measured[names][1] / candidate.estimate_ms
    for round_ in range(SEARCH_ROUNDS):
        mixed = [c for c in planner.search(model, executors, scale=scale, profile=fast, budget_s=0.0,
                                           **searching)  # measured enough above
                 if not c.name.endswith(" alone")][:MEASURE_TOP]
        fresh = [c for c in mixed if tuple(e.name for e in c.assignment) not in measured]
        if round_ and not any(c.estimate_ms < (best_ms() or math.inf) for c in fresh):
            break
        for candidate in fresh:
            measure(candidate)
            names = tuple(e.name for e in candidate.assignment)
            if names in measured:  # what its switches really cost corrects the next search
                planner.learn_switches(_switches(candidate.plan), measured[names][1] - candidate.estimate_ms)
    live = sorted((item for item in measured.items() if item[1][2] is not None), key=lambda item: item[1][1])
    if len(live) > 1:  # raced times are kept apart: calibration stays on the single measurements
        finalists = {names: session for names, (_, _, session) in live[:FINALISTS]}
        for names, ms in _race(finalists, feeds).items():
            _plans.put(_key(model, f"raced|{kind}", names), ms)
    for names, (candidate, ms, session) in measured.items():
        raced = _plans.get(_key(model, f"raced|{kind}", names))
        measured[names] = (candidate, ms if raced is None else float(raced), session)
    _plans.save()
    if not measured:
        return _fall_back(model, executors, max_in_flight, sample_inputs, input_shapes,
                          PlanError("; ".join(failures) or "no candidate placement could be compiled"))
    best, _, session = _choose(list(measured.values()))
    for other in sessions:
        if other is not session:
            other.close()
    if session is None:
        session = _session(model, executors, best, max_in_flight)
    reports = [CandidateReport(c.name, c.estimate_ms, ms, c is best) for c, ms, _ in measured.values()]
    session.plan.notes.extend([*failures, *best.plan.notes])
    _explain(session, reports + rejected, best.plan.partition_estimates, feeds)
    assignment = {n.name: e.name for n, e in zip(model.nodes, best.assignment, strict=True)}
    _plans.put(decided, {"assignment": assignment, "estimates": best.plan.partition_estimates,
                         "candidates": [dataclasses.astuple(r) for r in session.plan.candidates],
                         "notes": session.plan.notes})
    _plans.save()
    save_probe_answers()
    return session


def _recall(model: Model, executors: Sequence[Executor], decided: dict, feeds: dict,
            max_in_flight: int) -> Session:
    """The session of a placement chosen by an earlier planning, with what that planning reported."""
    session = compile_plan(model, executors, "latency", assignment=decided["assignment"],
                           max_in_flight=max_in_flight)
    session.plan.notes.extend(decided["notes"])
    estimates = {int(k): v for k, v in decided["estimates"].items()}
    _explain(session, [CandidateReport(*r) for r in decided["candidates"]], estimates, feeds)
    return session


def profile_nodes(model: Model, executors: Sequence[str | Executor] | None, *,
                  progress: Progress | None = None, sample_inputs: SampleInputs | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[Candidate]:
    """Measure every node on every executor that supports it, on representative inputs (see
    `tune_latency`), into the cache; returns the candidate placements, best estimate first."""
    feeds = representative(model, sample_inputs, input_shapes)[0]
    observed = observe(model, feeds)
    return planner.search(complete(model, observed.types), executors, progress=progress,
                          shapes=observed.shapes, values=observed.values)


Measured = tuple[Candidate, float, Session | None]


def _choose(measured: list[Measured]) -> Measured:
    """The fastest candidate, except that a mixed placement must beat the fastest single-library
    plan by more than `MIXED_MARGIN` to be kept: within that, the difference is noise on a shared
    machine, and the plan with no switches is the one that stays fast."""
    fastest = min(measured, key=lambda item: item[1])
    singles = [item for item in measured if item[0].name.endswith(" alone")]
    if fastest[0].name.endswith(" alone") or not singles:
        return fastest
    single = min(singles, key=lambda item: item[1])
    return fastest if fastest[1] * (1 + MIXED_MARGIN) < single[1] else single


def _switches(plan: Plan) -> list[tuple[Executor, Executor]]:
    """Consecutive partitions on different executors, in the order a request runs them."""
    parts = plan.partitions
    return [(a.executor, b.executor) for a, b in itertools.pairwise(parts)
            if a.executor.name != b.executor.name]


def _singles(found: Sequence[Candidate]) -> list[Candidate]:
    """The single-library candidates: graph compilers first (the fastest are usually among them,
    and an early fast time lets slow candidates stop after one run), then by estimate."""
    alone = [c for c in found if c.name.endswith(" alone")]
    graph_compiler = {c.name: any(e.compiles_graphs and c.name == f"{e.name} alone" for e in c.assignment)
                      for c in alone}
    return sorted(alone, key=lambda c: (not graph_compiler[c.name], c.estimate_ms))


def _time_candidate(session: Session, feeds: dict, best_ms: float | None) -> float:
    """Median ms of a candidate's warm runs; one already `GIVE_UP`x slower than the best so far
    after a warm run (or `GIVE_UP_COLD`x after its first, which pays one-time set-up) is not run
    again: it cannot win, and a slow library's runs are what cold planning waits on."""
    times = []
    for limit in (GIVE_UP_COLD, GIVE_UP):
        start = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - start) * 1e3)
        if best_ms is not None and times[-1] > limit * best_ms:
            return min(times)
    return time_call(lambda: session.run(feeds), min_repeats=5, budget_s=1.0) * 1e3


def _fall_back(model: Model, executors: Sequence[str | Executor] | None, max_in_flight: int,
               sample_inputs: SampleInputs | None, input_shapes: Mapping[str, Sequence[int]] | None,
               error: BaseException) -> Session:
    """The priority plan, with a warning saying why measuring failed and which inputs it needs."""
    guessed = made_up(model, sample_inputs, input_shapes)
    needs = (f"it needs representative values for {'; '.join(guessed)}: pass sample_inputs= (CLI "
             "--input NAME=file.npy) or input_shapes= (--shape NAME=1x3x640x640)") if guessed else \
        "the inputs given do not run"
    message = (f"model {model.label!r}: measured planning failed ({' '.join(str(error).split())[:400]}); "
               f"{needs}. Keeping the priority plan.")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    session = compile_plan(model, executors, "priority", max_in_flight=max_in_flight)
    session.plan.notes.append(message)
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


def _reference_outputs(model: Model, samples: Sequence[dict]) -> list[dict]:
    """The exact outputs for each sample, run by the exact executors present."""
    session = compile_plan(model, exact_executors(), max_in_flight=1)
    try:
        return [session.run(feeds) for feeds in samples]
    finally:
        session.close()


def _relative_errors(session: Session, samples: Sequence[dict],
                     reference: Sequence[dict]) -> dict[str, float]:
    """Worst relative L2 error of each output over the samples (float outputs; others must match
    exactly, else the error is infinite)."""
    worst: dict[str, float] = {}
    for feeds, expected_outputs in zip(samples, reference, strict=True):
        outputs = session.run(feeds)
        for name, expected in expected_outputs.items():
            got, want = np.asarray(outputs[name]), np.asarray(expected)
            if want.dtype.kind != "f":
                error = 0.0 if np.array_equal(got, want) else float("inf")
            else:
                scale = float(np.linalg.norm(want.astype(np.float64))) or 1.0
                error = float(np.linalg.norm((got - want).astype(np.float64))) / scale
            worst[name] = max(worst.get(name, 0.0), error)
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
        session.run(feeds)
    measured = trace.partition_ms()
    plan.partition_measured = {p.index: measured[f"#{p.index}"] for p in plan.partitions
                               if f"#{p.index}" in measured}


def tune_throughput(model: Model, executors: Sequence[str | Executor] | None, *,
                    progress: Progress | None = None, seconds: float = 2.0,
                    sample_inputs: SampleInputs | None = None,
                    input_shapes: Mapping[str, Sequence[int]] | None = None) -> Session | ReplicaPool:
    """Replicas against one pipelined session: the higher measured requests per second wins (on
    representative inputs, as `tune_latency`).

    Replicas are one per accelerator device (placed by `latency` on its libraries and the host
    libraries, once per kind of card) and one per CPU stream (host libraries alone, each stream a
    slice of the cores). Partitions on one device take turns, so a device gets one replica, never
    one per stream or per library.
    Measured: the accelerators' replicas, the CPU streams', and both together.
    """
    latency_session = tune_latency(model, executors, progress=progress, sample_inputs=sample_inputs,
                                   input_shapes=input_shapes)
    if latency_session.plan.policy == "priority":  # measuring failed; the session says why
        return latency_session
    model = latency_session.plan.model
    chosen = executor_registry.resolve(executors)
    feeds = representative(model, sample_inputs, input_shapes)[0]
    host = [e for e in chosen if not is_accelerator(e)]
    inputs = {"sample_inputs": sample_inputs, "input_shapes": input_shapes}
    cards = _accelerator_replicas(model, chosen, host, latency_session, progress, inputs)
    streams = []
    if default_threads() > 1:
        streams = _stream_replicas(model, host, latency_session, progress, inputs)
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
        key = _key(model, f"throughput|{profile(feeds)}", [name, *(e.name for e in chosen)])
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
                          progress: Progress | None, inputs: dict[str, Any]) -> list[Session]:
    """One session per accelerator device, on every library there and the host libraries. Each
    kind of card (libraries and device model) is placed by `latency` once (on the caller's
    representative `inputs`); its twins take the same placement."""
    devices: dict[str, list[Executor]] = {}
    for executor in chosen:
        if is_accelerator(executor):
            devices.setdefault(str(executor.device), []).append(executor)
    sessions: list[Session] = []
    placements: dict[tuple, tuple[list[str], dict[str, str]]] = {}
    for cards in devices.values():
        kind = (tuple(c.engine for c in cards), cards[0].info().device_name)
        if kind not in placements:
            alone = placed if set(placed.plan.executors) <= {*cards, *host} else tune_latency(
                model, [*cards, *host], progress=progress, **inputs)
            placements[kind] = ([c.name for c in cards],
                                {n.name: alone.plan.executor_of(n).name for n in model.nodes})
            if alone is not placed:
                alone.close()
        first, placement = placements[kind]
        twin = dict(zip(first, (c.name for c in cards), strict=True))
        assignment = {node: twin.get(name, name) for node, name in placement.items()}
        sessions.append(compile_plan(model, [*cards, *host], "latency", assignment=assignment))
    return sessions


def _stream_replicas(model: Model, host: list[Executor], placed: Session,
                     progress: Progress | None, inputs: dict[str, Any]) -> list[Session]:
    """One session per CPU stream, each on the host libraries' variants for that stream (placed
    by `latency` on the caller's representative `inputs`)."""
    if not host:
        return []
    on_host = placed if set(placed.plan.executors) <= set(host) else tune_latency(model, host,
                                                                                    progress=progress,
                                                                                    **inputs)
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
