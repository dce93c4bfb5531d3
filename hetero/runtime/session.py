"""Session: a compiled plan, run one request at a time or many in flight.

Values stay in the memory space of the executor that produced them; a value crosses to another
space only when a partition there reads it, once per space and request. Executors that share a
memory space (every host library) hand each other the same numpy arrays, no copies; what a
request returns is the caller's own (copied only where it would share memory with an input, an
initializer or another output).

Every partition runs holding its compute resource (see `workers`): partitions on one device take
turns, partitions on different devices run at once. `run` executes a plan inline when it is a
chain; plans with independent partitions on different resources, and every `submit`, go through
the resources' workers, so stage k of request i+1 runs while stage k+1 of request i runs on
another device. At most `max_in_flight` requests are in flight; `submit` blocks (or raises
`QueueFullError`) beyond that, so memory stays bounded.

A request can be cancelled (`future.cancel()`, or cancelling the asyncio task awaiting
`run_async`) or given a `timeout`: it then frees its slot at once, and the steps it has not
started are skipped. When a library fails on a partition it claimed, the session keeps those
nodes off it (for a while: see `Rejections`), re-plans, and answers the request on the new plan;
the new plan is kept only if that succeeds, so a bad request cannot degrade it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from hetero import planner
from hetero.errors import (
    CompileError,
    DeadlineExceededError,
    HeteroError,
    InputError,
    NonFiniteError,
    QueueFullError,
    RunError,
)
from hetero.executors import CompiledPartition, Executor, hands_off, host_all_finite
from hetero.graph import Model, TensorInfo, load
from hetero.graph.load import ModelSource
from hetero.planner import HOST, Plan, Rejections
from hetero.runtime.trace import Trace
from hetero.runtime.workers import Resource, Timer, background, call_later, resource

Feeds = Mapping[str, Any]
_MAX_FALLBACKS = 3  # re-plans one request may go through before its error is returned


@dataclass
class RunStats:
    """Counters since the session was built: requests answered, transfers made and bytes moved."""

    runs: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    direct_transfers: int = 0  # device to device, not through host memory (GPU peer copies)
    handoffs: int = 0  # one library's device tensor read by another on the same device, no copy (DLPack)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Step:
    index: int
    executor: Executor
    compiled: CompiledPartition
    resource: Resource
    depends_on: tuple[int, ...]
    dependents: tuple[int, ...]


class _PartitionFailed(Exception):
    def __init__(self, step: _Step, error: BaseException):
        super().__init__(str(error))
        self.step = step
        self.error = error


class _NonFinite(Exception):
    """Partitions of `program` gave NaN or infinity from finite inputs (`suspects`: each step with
    those tensors); `result` and `values` are the attempt's complete answer, in case that is the
    model's own."""

    def __init__(self, program: _Program, suspects: list[tuple[_Step, list[str]]], result: dict[str, Any],
                 values: _Values):
        names = ", ".join(repr(name) for name in suspects[0][1])
        super().__init__(f"NaN or infinity in {names} from finite inputs")
        self.program, self.suspects, self.result, self.values = program, suspects, result, values
        self.tensors = tuple(name for _, names in suspects for name in names)

    def nodes(self, step: _Step) -> set[str]:
        return {node.name for node in self.program.plan.partitions[step.index].nodes}


class _Stopped(Exception):
    """The request was cancelled or ran out of time: what is left of it is skipped."""


class _SourceFailed(Exception):
    """Moving `name` off the device that produced it failed: that device is at fault."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(str(error))
        self.name = name
        self.error = error


class _Values:
    """One attempt at a request: its values by name and memory space, released when their last
    reader is done, what is under way (so `stop` can skip or end it), and, when the session
    checks for NaN and infinity, each partition's finiteness flags (read once the request ends,
    so no device is waited for)."""

    def __init__(self, arrays: dict[str, Any], uses: dict[str, int], keep: set[str],
                 trace: Trace | None = None, own_non_finite: set[str] | None = None):
        self.trace = trace
        self.request = trace.new_request() if trace else 0
        self.inputs = arrays
        self.feeds = list(arrays.values())
        self.own_non_finite = own_non_finite  # None: not checked
        self.checks: list[tuple[_Step, list[tuple[str, Any]]]] = []
        self.unchecked: set[str] = set()  # on a device whose library cannot tell: checked on the host
        self.host_finite: dict[str, bool] = {}
        self._held: dict[str, dict[str, tuple[Executor | None, Any]]] = {
            name: {HOST: (None, array)} for name, array in arrays.items()}
        self._left = dict(uses)
        self._keep = keep
        self._lock = threading.Lock()
        self._moving: dict[tuple[str, str], threading.Event] = {}
        self._tasks: set[Future] = set()
        self.running: set[int] = set()
        self.stopped = False
        self.transfers = 0
        self.transfer_bytes = 0
        self.direct_transfers = 0
        self.handoffs = 0

    def fetch(self, name: str, target: Executor | None) -> Any:
        """`name` in the target's memory space (None: host), moving it there once if needed. A
        fetch that finds the same move under way (a prefetch) waits for it; if that move failed,
        this fetch makes it itself, so the error (if any) is raised where the value is needed."""
        space = HOST if target is None else target.memory_space
        handoff = False
        while True:
            with self._lock:
                if self.stopped:
                    raise _Stopped
                held = self._held[name]
                if space in held:
                    owner, value = held[space]
                    if not hands_off(owner, target):
                        return value
                    self.handoffs += 1
                    handoff = True
                    break
                moving = self._moving.get((name, space))
                if moving is None:
                    self._moving[name, space] = threading.Event()
                    owner, value = held.get(HOST) or next(iter(held.values()))
                    break
            moving.wait()  # set when that move ends, or when the request stops
        if handoff:
            # Another library's tensor in this device's memory: wrapped, not copied, once its
            # producer's queued work is done.
            owner.synchronize()
            return target.adopt(value)
        start = time.perf_counter()
        try:
            direct = None
            if owner is not None and target is not None and HOST not in (owner.memory_space, space):
                direct = target.copy_from(value, owner)
            on_host = direct is not None or owner is None or owner.memory_space == HOST
            try:
                host = value if on_host else owner.to_host(value)
            except Exception as exc:
                raise _SourceFailed(name, exc) from exc
            if not on_host and name in self.unchecked and isinstance(host, np.ndarray):
                self.host_finite[name] = host_all_finite(host)
            moved = direct if direct is not None else (
                host if target is None or space == HOST else target.to_device(host))
            if self.trace is not None:
                source = held_space(owner)
                self.trace.record(f"{name} {source} -> {space}", "transfer", f"link {source} -> {space}",
                                  "transfer", start, time.perf_counter(), self.request)
            with self._lock:
                held[space] = (target, moved)
                self.transfers += 1
                self.transfer_bytes += int(getattr(host, "nbytes", 0))
                self.direct_transfers += direct is not None
                return moved
        finally:
            with self._lock:
                self._moving.pop((name, space)).set()

    def put(self, executor: Executor, names: Sequence[str], outputs: Sequence[Any]) -> None:
        with self._lock:
            for name, value in zip(names, outputs, strict=True):
                self._held[name] = {executor.memory_space: (executor, value)}

    def check(self, step: _Step, outputs: Sequence[Any]) -> None:
        """Record whether each of the step's outputs is free of NaN and infinity (one reduction)."""
        flags = [(name, step.executor.all_finite(value))
                 for name, value in zip(step.compiled.output_names, outputs, strict=True)]
        with self._lock:
            self.checks.append((step, flags))
            self.unchecked.update(name for name, flag in flags if flag is None)

    def non_finite(self, program: _Program, result: dict[str, Any]) -> _NonFinite | None:
        """Partitions whose outputs hold NaN or infinity although every input they read was
        finite (the session's own non-finite tensors aside), in the order they ran."""
        seen: set[str] = set()
        suspects: list[tuple[_Step, list[str]]] = []
        for step, flags in self.checks:
            bad = [name for name, flag in flags
                   if not (self.host_finite.get(name, True) if flag is None else bool(flag))]
            if not bad:
                continue
            finite_inputs = not any(name in seen or not self._finite_input(name)
                                    for name in step.compiled.input_names)
            seen.update(bad)
            new = [name for name in bad if name not in self.own_non_finite]
            if finite_inputs and new:
                suspects.append((step, new))
        return _NonFinite(program, suspects, result, self) if suspects else None

    def _finite_input(self, name: str) -> bool:
        value = self.inputs.get(name)
        return not isinstance(value, np.ndarray) or host_all_finite(value)

    def consumed(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self._left[name] -= 1
                if self._left[name] == 0 and name not in self._keep:
                    self._held.pop(name, None)

    def track(self, task: Future) -> None:
        """Remember a step or prefetch queued on a worker, so `stop` can cancel it."""
        with self._lock:
            stopped = self.stopped
            if not stopped:
                self._tasks.add(task)
        if stopped:
            task.cancel()
        else:
            task.add_done_callback(self._untrack)  # at once if done: outside the lock

    def _untrack(self, task: Future) -> None:
        with self._lock:
            self._tasks.discard(task)

    def stop(self) -> None:
        """Skip the rest: queued steps are cancelled, waits end, values are released."""
        with self._lock:
            self.stopped = True
            tasks, self._tasks = list(self._tasks), set()
            events = list(self._moving.values())
            self._held.clear()
        for task in tasks:
            task.cancel()
        for event in events:
            event.set()


def held_space(owner: Executor | None) -> str:
    return HOST if owner is None else owner.memory_space


class _Program:
    """A plan with its compiled partitions, ready to run: immutable, shared by concurrent runs."""

    def __init__(self, plan: Plan, compiled: Sequence[CompiledPartition]):
        self.plan = plan
        model = plan.model
        dependents: dict[int, list[int]] = {p.index: [] for p in plan.partitions}
        for part in plan.partitions:
            for before in part.depends_on:
                dependents[before].append(part.index)
        self.steps = [_Step(p.index, p.executor, c, resource(p.executor.resource), tuple(p.depends_on),
                            tuple(dependents[p.index]))
                      for p, c in zip(plan.partitions, compiled, strict=True)]
        self.producers = {name: step for step in self.steps for name in step.compiled.output_names}
        self.uses: dict[str, int] = {}
        for step in self.steps:
            for name in step.compiled.input_names:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.keep = set(model.output_names)
        produced = {o for p in plan.partitions for o in p.outputs} | set(model.input_names)
        self.constants = {name: _initializer(model, name) for name in model.output_names
                          if name not in produced}
        self.parallel = _has_parallel_branches(plan)

    def values(self, arrays: dict[str, Any], trace: Trace | None, own_non_finite: set[str] | None) -> _Values:
        return _Values(arrays, self.uses, self.keep, trace, own_non_finite)

    def _run_step(self, step: _Step, values: _Values) -> None:
        if values.stopped:
            raise _Stopped
        values.running.add(step.index)
        try:
            args = [values.fetch(name, step.executor) for name in step.compiled.input_names]
            start = time.perf_counter()
            outputs = step.resource.run(step.compiled, args)
            if values.trace is not None:
                values.trace.record(f"#{step.index}", "partition", step.resource.name, step.executor.name,
                                    start, time.perf_counter(), values.request)
            values.put(step.executor, step.compiled.output_names, outputs)
            if values.own_non_finite is not None:
                values.check(step, outputs)
        except _Stopped:
            raise
        except _SourceFailed as failed:
            raise _PartitionFailed(self.producers[failed.name], failed.error) from failed.error
        except Exception as exc:
            raise _PartitionFailed(step, exc) from exc
        finally:
            values.running.discard(step.index)
        values.consumed(step.compiled.input_names)

    def _prefetch(self, step: _Step, values: _Values) -> None:
        """Start moving the step's outputs to the other memory spaces that will read them, on the
        link's own worker, so the copy overlaps whatever the devices compute meanwhile."""
        produced = set(step.compiled.output_names)
        for index in step.dependents:
            reader = self.steps[index]
            if reader.executor.memory_space == step.executor.memory_space:
                continue
            for name in produced.intersection(reader.compiled.input_names):
                link = resource(f"link {step.executor.memory_space} -> {reader.executor.memory_space}")
                values.track(link.submit(_quietly, values.fetch, name, reader.executor))

    def _collect(self, values: _Values, wanted: Sequence[str]) -> dict[str, Any]:
        try:
            result = {name: np.array(self.constants[name]) if name in self.constants
                      else values.fetch(name, None) for name in wanted}
        except _SourceFailed as failed:
            raise _PartitionFailed(self.producers[failed.name], failed.error) from failed.error
        result = _owned(result, values.feeds)
        if values.own_non_finite is not None:
            suspect = values.non_finite(self, result)
            if suspect is not None:
                raise _PartitionFailed(suspect.suspects[0][0], suspect)
        return result

    def execute(self, values: _Values, wanted: Sequence[str]) -> dict[str, Any]:
        """Run the steps one after another in the calling thread."""
        for step in self.steps:
            self._run_step(step, values)
        return self._collect(values, wanted)

    def launch(self, values: _Values, wanted: Sequence[str],
               done: Callable[[dict | None, BaseException | None], None]) -> None:
        """Submit each step to its resource's worker as soon as its inputs exist; call `done` once
        (after a failure, the rest of this attempt is stopped)."""
        waiting = {step.index: len(step.depends_on) for step in self.steps}
        state = {"left": len(self.steps), "reported": False}
        lock = threading.Lock()

        def report(result: dict | None, error: BaseException | None) -> None:
            with lock:
                if state["reported"]:
                    return
                state["reported"] = True
            if error is not None:
                values.stop()
            done(result, error)

        def run(step: _Step) -> None:
            try:
                self._run_step(step, values)
                with lock:
                    state["left"] -= 1
                    ready = [d for d in step.dependents if _decrement(waiting, d) == 0]
                    complete = state["left"] == 0
                self._prefetch(step, values)
                for index in ready:
                    post(self.steps[index])
                if complete:
                    report(self._collect(values, wanted), None)
            except Exception as exc:
                report(None, exc)

        def post(step: _Step) -> None:
            values.track(step.resource.submit(run, step))

        if not self.steps:
            try:
                report(self._collect(values, wanted), None)
            except Exception as exc:
                report(None, exc)
        for step in self.steps:
            if not step.depends_on:
                post(step)


def _owned(result: dict[str, Any], feeds: Sequence[Any]) -> dict[str, Any]:
    """Make every output the caller's own: copy an array that is read-only (an initializer's
    memory) or may share memory with an input (an Identity or Reshape view of it on a library that
    makes views) or with an output before it; other arrays are returned as they are."""
    seen = [f for f in feeds if isinstance(f, np.ndarray)]
    for name, value in result.items():
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if isinstance(value, np.ndarray):
            if not value.flags.writeable or any(np.may_share_memory(value, other) for other in seen):
                value = value.copy()
            seen.append(value)
        result[name] = value
    return result


def _same_answer(first: dict[str, Any], second: dict[str, Any]) -> bool:
    """The same outputs from two plans: NaN and infinities in the same places, numbers within the
    rounding of different libraries (`hetero run --check`'s tolerance)."""
    for name, a in first.items():
        b = second[name]
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            continue
        if a.shape != b.shape or not (np.allclose(a, b, rtol=1e-3, atol=1e-3, equal_nan=True)
                                      if a.dtype.kind in "fc" else np.array_equal(a, b)):
            return False
    return True


def _quietly(fetch: Callable[[str, Executor], Any], name: str, target: Executor) -> None:
    """A prefetch that fails leaves the value where it was: the reader's own fetch then moves it
    and reports the error inside its partition."""
    with contextlib.suppress(Exception):
        fetch(name, target)


def _decrement(counts: dict[int, int], key: int) -> int:
    counts[key] -= 1
    return counts[key]


def _has_parallel_branches(plan: Plan) -> bool:
    """Two partitions on different resources with no path between them could run at once."""
    reach: dict[int, set[int]] = {}
    for part in plan.partitions:
        reach[part.index] = set(part.depends_on).union(*(reach[d] for d in part.depends_on))
    parts = plan.partitions
    return any(a.executor.resource != b.executor.resource and a.index not in reach[b.index]
               for i, a in enumerate(parts) for b in parts[i + 1:])


Rebuild = Callable[[], tuple[Plan, list[CompiledPartition]]]


class Requests(ABC):
    """What a Session and a ReplicaPool share: `run`, `run_async` and `map` on top of `submit`."""

    max_in_flight: int

    @abstractmethod
    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future: ...

    @abstractmethod
    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None, *,
            timeout: float | None = None) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def close(self, wait: bool = True, timeout: float | None = None) -> None: ...

    def __enter__(self) -> Requests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def run_async(self, feeds: Feeds, output_names: Sequence[str] | None = None, *,
                        timeout: float | None = None) -> dict[str, np.ndarray]:
        """The asyncio twin of `run`: awaits a slot and the result without blocking the loop.
        Cancelling the awaiting task (e.g. `asyncio.wait_for` timing out) cancels the request."""
        try:
            future = self.submit(feeds, output_names, block=False, timeout=timeout)
        except QueueFullError:
            waiting = asyncio.ensure_future(asyncio.to_thread(self.submit, feeds, output_names,
                                                              timeout=timeout))
            try:
                future = await asyncio.shield(waiting)
            except asyncio.CancelledError:
                waiting.add_done_callback(_cancel_submitted)
                raise
        return await asyncio.wrap_future(future)

    def map(self, requests: Iterable[Feeds], output_names: Sequence[str] | None = None, *,
            ordered: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Run a stream of requests (e.g. video frames) with up to `max_in_flight` in flight.

        Results come in input order when `ordered`, else as they complete.
        """
        window: deque[Future] = deque()
        for feeds in requests:
            window.append(self.submit(feeds, output_names))
            if ordered:
                while window and (window[0].done() or len(window) >= self.max_in_flight):
                    yield window.popleft().result()
            else:
                finished, _ = wait(window, timeout=0 if len(window) < self.max_in_flight else None,
                                   return_when=FIRST_COMPLETED)
                for future in [f for f in window if f in finished]:
                    window.remove(future)
                    yield future.result()
        while window:
            if ordered:
                yield window.popleft().result()
            else:
                finished, _ = wait(window, return_when=FIRST_COMPLETED)
                for future in [f for f in window if f in finished]:
                    window.remove(future)
                    yield future.result()


def _cancel_submitted(waiting: asyncio.Future) -> None:
    """The awaiting task was cancelled while its request waited for a slot: cancel the request."""
    if not waiting.cancelled() and waiting.exception() is None:
        waiting.result().cancel()


def settle(future: Future, result: Any = None, error: BaseException | None = None) -> bool:
    """Resolve `future` unless it is already done (cancelled, timed out, answered by another
    attempt); True if this call resolved it."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        return False
    return True


class _Call:
    """One request submitted to a session: its future, its deadline, its current attempt."""

    def __init__(self, session: Session, arrays: dict[str, Any], wanted: list[str], timeout: float | None,
                 deadline: float | None):
        self.session, self.arrays, self.wanted = session, arrays, wanted
        self.timeout, self.deadline = timeout, deadline
        self.started = time.perf_counter()
        self.future: Future = Future()
        self.values: _Values | None = None
        self.program: _Program | None = None
        self.replanning = False
        self._timer: Timer | None = None
        if deadline is not None:
            self._timer = call_later(deadline - time.monotonic(), self.expire)
        self.future.add_done_callback(self._closed)

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def attempt(self, program: _Program) -> _Values:
        """Fresh values for an attempt on `program`; stopped at once if the call is already over."""
        values = self.session._values(program, self.arrays)
        self.values, self.program = values, program
        if self.future.done():
            values.stop()
        return values

    def expire(self) -> None:
        settle(self.future, error=DeadlineExceededError(
            f"model {self.session.model.label!r}: no answer within {self.timeout:g} s ({self._where()})"))

    def _where(self) -> str:
        if self.replanning:
            return "re-planning after a partition failed"
        values, program = self.values, self.program
        running = sorted(values.running) if values is not None else []
        if program is None or not running:
            return "waiting for its devices"
        names = ", ".join(f"partition #{i} on {program.steps[i].executor.name}" for i in running)
        return f"{names} still running"

    def wait(self) -> dict[str, Any]:
        try:
            return self.future.result(self.remaining())
        except FutureTimeout:
            if self.future.done():
                raise
            self.expire()
            return self.future.result()

    def _closed(self, future: Future) -> None:
        if future.cancelled():
            future.set_running_or_notify_cancel()  # so concurrent.futures.wait counts it as done
        if self._timer is not None:
            self._timer.cancel()
        if (future.cancelled() or future.exception() is not None) and self.values is not None:
            self.values.stop()
        self.session._slots.release()


class Session(Requests):
    """A model compiled for this host's executors; build it with `hetero.compile`.

    If a library fails while running a partition it claimed it could run, the session records
    the nodes at fault in its own `Rejections` (run-time ones expire), re-plans them elsewhere
    and runs the request again; the new plan is kept only if it succeeds, so a bad request cannot
    degrade the plan. Once the rejections expire, the session re-plans with every executor again.

    With `check_finite` (the default), a partition whose outputs hold NaN or infinity although
    its inputs were finite counts as its library failing, and is re-planned likewise. When the
    nodes give NaN or infinity on the other executor too, those are the model's own values: the
    answer is returned as it is, nothing is held against the first library, and the session stops
    checking those tensors. When no other executor is left to ask, the answer is returned as it
    is too (`defer_non_finite`, which a `ReplicaPool` sets, raises `NonFiniteError` instead, so
    the pool asks another replica).
    """

    def __init__(self, plan: Plan, compiled: Sequence[CompiledPartition], rebuild: Rebuild | None = None,
                 max_in_flight: int = 16, rejections: Rejections | None = None, check_finite: bool = True):
        self.model: Model = plan.model
        self.stats = RunStats()
        self.max_in_flight = max_in_flight
        self.rejections = rejections if rejections is not None else Rejections()
        self.check_finite = check_finite
        self.defer_non_finite = False
        self._own_non_finite: set[str] = set()  # tensors another executor confirmed non-finite
        self._lock = threading.Lock()  # stats and the current program; held only briefly
        self._replanning = threading.Lock()  # one fallback trial at a time; plain requests never wait on it
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._closed = False
        self._rebuild = rebuild
        self._program = _Program(plan, compiled)
        self._restore_at: float | None = None
        self._trace: Trace | None = None

    @property
    def plan(self) -> Plan:
        return self._program.plan

    def __repr__(self) -> str:
        return (f"<Session {self.model.label!r}: {len(self.plan.partitions)} partitions on "
                f"{', '.join(e.name for e in self.plan.executors)}>")

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.model.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.model.outputs

    def run(self, feeds: Feeds | Sequence[str] | None, output_names: Feeds | Sequence[str] | None = None,
            *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one request: `run(feeds)` or `run(feeds, output_names)` -> {output name: array}.

        ONNX Runtime's argument order `run(output_names, feeds)` is accepted too; either way the
        result is a dict of host numpy arrays the caller owns, all outputs when `output_names` is
        None. With `timeout` (seconds), raises `DeadlineExceededError` when no answer comes in
        time (naming what was still running) and skips what is left of the request.
        """
        arrays, wanted = self._prepare(feeds, output_names)
        program = self._program
        if program.parallel or timeout is not None:
            return self._submit(arrays, wanted, True, timeout).wait()
        start = time.perf_counter()
        values = self._values(program, arrays)
        try:
            result = program.execute(values, wanted)
        except _PartitionFailed as failed:
            result, values = self._fall_back(program, failed, arrays, wanted)
        self._count(values, start)
        return result

    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future:
        """Start a request; the Future gives what `run` returns. Bad feeds raise here, at once.

        Beyond `max_in_flight` requests in flight this waits for a slot, or raises
        `QueueFullError` when `block` is False or no slot frees within `timeout` seconds. With
        `timeout`, the Future fails with `DeadlineExceededError` if no answer comes within it
        (slot wait included). `future.cancel()` frees the slot at once and skips what is left.
        """
        arrays, wanted = self._prepare(feeds, output_names)
        return self._submit(arrays, wanted, block, timeout).future

    @contextmanager
    def tracing(self) -> Iterator[Trace]:
        """Record a timeline of partitions and transfers for the requests run inside the block."""
        trace = self._trace = Trace()
        try:
            yield trace
        finally:
            self._trace = None

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `wait`, return once the requests in flight have finished
        (`DeadlineExceededError` if they have not within `timeout` seconds)."""
        self._closed = True
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        taken = 0
        try:
            for _ in range(self.max_in_flight):
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._slots.acquire(timeout=left):
                    raise DeadlineExceededError(
                        f"model {self.model.label!r}: {self.max_in_flight - taken} request(s) still in "
                        f"flight {timeout:g} s after close")
                taken += 1
        finally:
            for _ in range(taken):
                self._slots.release()

    def _prepare(self, feeds: Any, output_names: Any) -> tuple[dict[str, Any], list[str]]:
        if self._closed:
            raise HeteroError(f"model {self.model.label!r}: the session is closed")
        if not isinstance(feeds, Mapping) and isinstance(output_names, Mapping):
            feeds, output_names = output_names, feeds
        if not isinstance(feeds, Mapping):
            raise InputError(f"model {self.model.label!r}: feeds must be a mapping of input name -> array, "
                             f"got {type(feeds).__name__}")
        self._maybe_restore()
        return self.check_feeds(feeds), self.resolve_outputs(output_names)

    def _submit(self, arrays: dict[str, Any], wanted: list[str], block: bool, timeout: float | None) -> _Call:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._slots.acquire(block, timeout if block else None):
            raise QueueFullError(f"model {self.model.label!r}: {self.max_in_flight} requests already in "
                                 "flight; try again later")
        call = _Call(self, arrays, wanted, timeout, deadline)
        program = self._program
        values = call.attempt(program)

        def done(result: dict | None, error: BaseException | None) -> None:
            if isinstance(error, _PartitionFailed):
                call.replanning = True
                background(self._recover, call, program, error)
                return
            if error is None:
                self._count(values, call.started)
            settle(call.future, result, error)

        program.launch(values, wanted, done)
        return call

    def _recover(self, call: _Call, program: _Program, failed: _PartitionFailed) -> None:
        try:
            result, values = self._fall_back(program, failed, call.arrays, call.wanted, call)
        except BaseException as exc:
            settle(call.future, error=exc)
            return
        self._count(values, call.started)
        settle(call.future, result)

    def _count(self, values: _Values, start: float) -> None:
        with self._lock:
            self.stats.runs += 1
            self.stats.transfers += values.transfers
            self.stats.transfer_bytes += values.transfer_bytes
            self.stats.direct_transfers += values.direct_transfers
            self.stats.handoffs += values.handoffs
            self.stats.seconds += time.perf_counter() - start

    def _values(self, program: _Program, arrays: dict) -> _Values:
        return program.values(arrays, self._trace, self._own_non_finite if self.check_finite else None)

    def _fall_back(self, program: _Program, failed: _PartitionFailed, arrays: dict, wanted: list[str],
                   call: _Call | None = None) -> tuple[dict, _Values]:
        """Answer a request whose partition failed: on a plan re-planned without the nodes at fault
        (tried here, one trial at a time), or on the plan another request re-planned meanwhile."""
        for _ in range(_MAX_FALLBACKS):
            if self._rebuild is None:
                return self._give_up(failed)
            left = None if call is None else call.remaining()
            if not self._replanning.acquire(timeout=-1 if left is None else left):
                if call is not None:
                    call.expire()
                raise _Stopped
            try:
                error = failed.error
                if isinstance(error, _NonFinite) and self._own_non_finite.issuperset(error.tensors):
                    return error.result, error.values  # confirmed the model's own meanwhile
                if self._program is program:
                    return self._trial(program, failed, arrays, wanted, call)
                program = self._program
            finally:
                self._replanning.release()
            try:
                return self._execute(program, arrays, wanted, call)
            except _PartitionFailed as again:
                failed = again
        return self._give_up(failed)

    def _trial(self, program: _Program, failed: _PartitionFailed, arrays: dict, wanted: list[str],
               call: _Call | None) -> tuple[dict, _Values]:
        """Re-plan without the failing partition's culprits and answer on the new plan; keep it
        only if that succeeds, else forget the culprits and give up (`_give_up`).

        After NaN or infinity, the new plan succeeds also when it gives NaN or infinity itself,
        but only from the nodes that moved (the other libraries agree). If its answer is then the
        first attempt's (the same NaN and infinities, the other values close), the values were
        the model's own: the culprits are forgotten, and the session stops checking the tensors
        flagged."""
        text = str(failed.error)
        if isinstance(failed.error, _NonFinite):
            culprits = [(step.executor, node) for step, _ in failed.error.suspects
                        for node in program.plan.partitions[step.index].nodes]
        else:
            part = program.plan.partitions[failed.step.index]
            culprits = [(failed.step.executor, n)
                        for n in [n for n in part.nodes if f"'{n.name}'" in text] or part.nodes]
        reason = text.splitlines()[0] if text else type(failed.error).__name__
        for executor, node in culprits:
            self.rejections.reject(executor, self.model, node, "run", reason)
        try:
            new_program = _Program(*self._rebuild())
            try:
                result, values = self._execute(new_program, arrays, wanted, call)
            except _PartitionFailed as again:
                moved = {node.name for _, node in culprits}
                if not (isinstance(again.error, _NonFinite)
                        and all(again.error.nodes(step) & moved for step, _ in again.error.suspects)):
                    raise
                result, values = again.error.result, again.error.values
        except BaseException as exc:
            for executor, node in culprits:
                self.rejections.forget(executor, self.model, node)
            if isinstance(exc, (HeteroError, _PartitionFailed)):
                return self._give_up(failed)
            raise
        if isinstance(failed.error, _NonFinite) and _same_answer(failed.error.result, result):
            for executor, node in culprits:
                self.rejections.forget(executor, self.model, node)
            self.confirm_non_finite(failed.error.tensors)
            return result, values
        new_program.plan.notes.append(
            f"{failed.step.executor.name} failed at run time on {len(culprits)} node(s) "
            f"({', '.join(n.name for _, n in culprits[:3])}): {reason}; re-planned them elsewhere")
        with self._lock:
            self._program = new_program
            self._restore_at = self.rejections.next_expiry()
        return result, values

    def confirm_non_finite(self, tensors: Iterable[str]) -> None:
        """NaN or infinity in these tensors is the model's own (other executors gave the same):
        the session stops checking them."""
        with self._lock:
            self._own_non_finite.update(tensors)

    def _give_up(self, failed: _PartitionFailed) -> tuple[dict, _Values]:
        """No executor left to try: raise the failure's error; but NaN or infinity that no other
        executor could check is answered as it is (with `defer_non_finite`, raised as
        `NonFiniteError` carrying that answer)."""
        error = failed.error
        if isinstance(error, _NonFinite) and not self.defer_non_finite:
            return error.result, error.values
        raise self._run_error(failed) from error

    def _execute(self, program: _Program, arrays: dict, wanted: list[str],
                 call: _Call | None) -> tuple[dict, _Values]:
        if call is None:
            values = self._values(program, arrays)
        else:
            values = call.attempt(program)
            call.replanning = False
        return program.execute(values, wanted), values

    def _run_error(self, failed: _PartitionFailed) -> RunError:
        message = (f"model {self.model.label!r}: partition #{failed.step.index} on "
                   f"{failed.step.executor.name} failed: {failed.error}")
        if isinstance(failed.error, _NonFinite):
            return NonFiniteError(message, failed.error.result, failed.error.tensors)
        return RunError(message)

    def _maybe_restore(self) -> None:
        """Once the run-time rejections behind the current plan expire, re-plan in the background
        with every executor again (if one still fails, the fallback answers and learns again)."""
        due = self._restore_at
        if due is None or self.rejections.clock() < due:
            return
        with self._lock:
            if self._restore_at != due:
                return
            self._restore_at = None
        background(self._restore)

    def _restore(self) -> None:
        if not self._replanning.acquire(timeout=0):
            with self._lock:
                self._restore_at = self.rejections.clock()  # a fallback is under way: try again later
            return
        try:
            plan, compiled = self._rebuild()
        except HeteroError:
            return
        finally:
            self._replanning.release()
        plan.notes.append("run-time failures expired; re-planned with every executor again")
        with self._lock:
            self._program = _Program(plan, compiled)
            self._restore_at = self.rejections.next_expiry()

    def resolve_outputs(self, output_names: Sequence[str] | None) -> list[str]:
        return resolve_outputs(self.model, output_names)

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return check_feeds(self.model, feeds)


def resolve_outputs(model: Model, output_names: Sequence[str] | None) -> list[str]:
    """Output names to return: all when None; an unknown name is an `InputError`."""
    if output_names is None:
        return list(model.output_names)
    if isinstance(output_names, str):
        output_names = [output_names]
    unknown = [n for n in output_names if n not in model.output_names]
    if unknown:
        raise InputError(f"model {model.label!r} has no output {unknown[0]!r}; outputs are "
                         f"{', '.join(model.output_names)}")
    return list(output_names)


def check_feeds(model: Model, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Feeds as numpy arrays, checked against the model's inputs; `InputError` names the field."""
    label = model.label
    expected = {i.name: i for i in model.inputs}
    unknown = [n for n in feeds if n not in expected]
    if unknown:
        raise InputError(f"model {label!r} has no input {unknown[0]!r}; inputs are "
                         f"{', '.join(expected) or '(none)'}")
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise InputError(f"model {label!r}: input {missing[0]!r} ({expected[missing[0]].describe()}) "
                         "is missing from the feeds")
    arrays: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[str, int]] = {}
    for name, info in expected.items():
        value = feeds[name]
        if info.kind != "tensor":
            arrays[name] = value
            continue
        array = np.asarray(value)
        if info.dtype is not None and array.dtype != info.dtype:
            raise InputError(f"model {label!r}: input {name!r} must be {info.dtype.name}, got "
                             f"{array.dtype.name} (convert with .astype(np.{info.dtype.name}))")
        if info.shape is not None:
            if array.ndim != len(info.shape):
                raise InputError(f"model {label!r}: input {name!r} must have rank {len(info.shape)} "
                                 f"({info.describe()}), got shape {array.shape}")
            for axis, (want, got) in enumerate(zip(info.shape, array.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise InputError(f"model {label!r}: input {name!r} dimension {axis} must be {want} "
                                     f"({info.describe()}), got shape {array.shape}")
                if isinstance(want, str):
                    seen = symbols.setdefault(want, (name, got))
                    if seen[1] != got:
                        raise InputError(
                            f"model {label!r}: dimension {want!r} is {seen[1]} in input {seen[0]!r} "
                            f"but {got} in input {name!r}")
        arrays[name] = array
    return arrays


def _initializer(model: Model, name: str) -> np.ndarray:
    for tensor in model.proto.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def compile_plan(model: ModelSource, executors: Sequence[str | Executor] | str | None = None,
                 policy: str = "priority", *, affinity: Mapping[str, str | Executor] | None = None,
                 assignment: Mapping[str, str] | None = None, max_in_flight: int = 16,
                 max_replans: int = 16, rejections: Rejections | None = None,
                 check_finite: bool = True) -> Session:
    """Plan (priority, manual, or a given assignment) and compile a model; returns a `Session`
    (`check_finite`: see `Session`).

    When a library rejects a partition at compile time, the nodes it rejects are recorded in the
    session's `rejections` and the model re-planned without them on that executor; the plan's
    notes say what happened.
    """
    model = load(model)
    rejections = rejections if rejections is not None else Rejections()

    def build() -> tuple[Plan, list[CompiledPartition]]:
        notes: list[str] = []
        for _ in range(max_replans):
            the_plan = planner.plan(model, executors, policy, affinity=affinity, assignment=assignment,
                                    rejections=rejections)
            try:
                compiled = [compile_partition(model, part, rejections) for part in the_plan.partitions]
            except _Rejected as rejected:
                notes.append(rejected.note)
                continue
            the_plan.notes.extend(notes)
            return the_plan, compiled
        raise CompileError(f"model {model.label!r}: gave up after {max_replans} re-plans; last: {notes[-1]}")

    return Session(*build(), rebuild=build, max_in_flight=max_in_flight, rejections=rejections,
                   check_finite=check_finite)


class _Rejected(Exception):
    def __init__(self, note: str):
        self.note = note


def compile_partition(model: Model, part: planner.Partition, rejections: Rejections) -> CompiledPartition:
    """Compile one partition; on rejection, record the culprit nodes and raise `_Rejected`."""
    executor = part.executor
    name = f"{model.proto.graph.name or 'model'}#{part.index}@{executor.name}"
    try:
        return executor.compile(model.extract(part.nodes, name=name))
    except CompileError as exc:
        culprits = [n for n in part.nodes if n.name in exc.nodes] or _find_culprits(model, part)
        for node in culprits:
            rejections.reject(executor, model, node, "compile", str(exc).splitlines()[0] if str(exc) else "")
        names = ", ".join(n.name for n in culprits[:5]) + (" ..." if len(culprits) > 5 else "")
        raise _Rejected(f"{executor.name} rejected {len(culprits)} node(s) at compile time ({names}); "
                        "re-planned them elsewhere") from exc


def _find_culprits(model: Model, part: planner.Partition) -> list:
    """Nodes the executor cannot compile alone; all of them if none fails alone."""
    failing = []
    for node in part.nodes:
        try:
            part.executor.compile(model.extract([node]))
        except CompileError:
            failing.append(node)
    return failing or list(part.nodes)
