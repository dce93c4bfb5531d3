"""Session: a compiled plan, run one request at a time or many in flight.

Values stay in the memory space of the executor that produced them; a value crosses to another
space only when a partition there reads it, once per space and request. Executors that share a
memory space (every host library) hand each other the same numpy arrays, no copies.

Every partition runs holding its compute resource (see `workers`): partitions on one device take
turns, partitions on different devices run at once. `run` executes a plan inline when it is a
chain; plans with independent partitions on different resources, and every `submit`, go through
the resources' worker threads, so stage k of request i+1 runs while stage k+1 of request i runs
on another device. At most `max_in_flight` requests are in flight; `submit` blocks (or raises
`QueueFullError`) beyond that, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from hetero import planner
from hetero.errors import CompileError, HeteroError, InputError, QueueFullError, RunError
from hetero.executors import CompiledPartition, Executor
from hetero.graph import Model, TensorInfo, load
from hetero.graph.load import ModelSource
from hetero.planner import HOST, Plan
from hetero.runtime.trace import Trace
from hetero.runtime.workers import Resource, resource

Feeds = Mapping[str, Any]


@dataclass
class RunStats:
    """Counters since the session was built: requests, transfers made and bytes moved."""

    runs: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    direct_transfers: int = 0  # device to device, not through host memory (GPU peer copies)
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


class _Values:
    """One request's values by name and memory space, released when their last reader is done."""

    def __init__(self, arrays: dict[str, Any], uses: dict[str, int], keep: set[str],
                 trace: Trace | None = None):
        self.trace = trace
        self.request = trace.new_request() if trace else 0
        self._held: dict[str, dict[str, tuple[Executor | None, Any]]] = {
            name: {HOST: (None, array)} for name, array in arrays.items()}
        self._left = dict(uses)
        self._keep = keep
        self._lock = threading.Lock()
        self._moving: dict[tuple[str, str], threading.Event] = {}
        self.transfers = 0
        self.transfer_bytes = 0
        self.direct_transfers = 0

    def fetch(self, name: str, target: Executor | None) -> Any:
        """`name` in the target's memory space (None: host), moving it there once if needed; a
        fetch that finds the same move under way (a prefetch) waits for it instead."""
        space = HOST if target is None else target.memory_space
        with self._lock:
            held = self._held[name]
            if space in held:
                return held[space][1]
            moving = self._moving.get((name, space))
            if moving is None:
                self._moving[name, space] = threading.Event()
                owner, value = held.get(HOST) or next(iter(held.values()))
        if moving is not None:
            moving.wait()
            with self._lock:
                return self._held[name][space][1]
        start = time.perf_counter()
        try:
            direct = None
            if owner is not None and target is not None and HOST not in (owner.memory_space, space):
                direct = target.copy_from(value, owner)
            on_host = direct is not None or owner is None or owner.memory_space == HOST
            host = value if on_host else owner.to_host(value)
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

    def consumed(self, names: Sequence[str]) -> None:
        with self._lock:
            for name in names:
                self._left[name] -= 1
                if self._left[name] == 0 and name not in self._keep:
                    self._held.pop(name, None)


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
        self.uses: dict[str, int] = {}
        for step in self.steps:
            for name in step.compiled.input_names:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.keep = set(model.output_names)
        produced = {o for p in plan.partitions for o in p.outputs} | set(model.input_names)
        self.constants = {name: _initializer(model, name) for name in model.output_names
                          if name not in produced}
        self.parallel = _has_parallel_branches(plan)

    def _values(self, arrays: dict[str, Any], trace: Trace | None) -> _Values:
        return _Values(arrays, self.uses, self.keep, trace)

    def _run_step(self, step: _Step, values: _Values) -> None:
        try:
            args = [values.fetch(name, step.executor) for name in step.compiled.input_names]
            start = time.perf_counter()
            outputs = step.resource.run(step.compiled, args)
            if values.trace is not None:
                values.trace.record(f"#{step.index}", "partition", step.resource.name, step.executor.name,
                                    start, time.perf_counter(), values.request)
        except Exception as exc:
            raise _PartitionFailed(step, exc) from exc
        values.put(step.executor, step.compiled.output_names, outputs)
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
                link.post(lambda name=name, target=reader.executor: _quietly(values.fetch, name, target))

    def _collect(self, values: _Values, wanted: Sequence[str]) -> dict[str, Any]:
        result = {}
        for name in wanted:
            value = self.constants[name] if name in self.constants else values.fetch(name, None)
            result[name] = np.asarray(value) if isinstance(value, np.generic) else value
        return result

    def execute(self, arrays: dict[str, Any], wanted: Sequence[str],
                trace: Trace | None = None) -> tuple[dict, _Values]:
        """Run the steps one after another in the calling thread."""
        values = self._values(arrays, trace)
        for step in self.steps:
            self._run_step(step, values)
        return self._collect(values, wanted), values

    def launch(self, arrays: dict[str, Any], wanted: Sequence[str],
               done: Callable[[dict | None, BaseException | None, _Values], None],
               trace: Trace | None = None) -> None:
        """Post each step to its resource's worker as soon as its inputs exist; call `done` once."""
        values = self._values(arrays, trace)
        waiting = {step.index: len(step.depends_on) for step in self.steps}
        state = {"finished": 0, "failed": False}
        lock = threading.Lock()

        def run(step: _Step) -> None:
            if state["failed"]:
                return
            try:
                self._run_step(step, values)
            except _PartitionFailed as failed:
                with lock:
                    first, state["failed"] = not state["failed"], True
                if first:
                    done(None, failed, values)
                return
            with lock:
                state["finished"] += 1
                ready = [d for d in step.dependents if _decrement(waiting, d) == 0]
                complete = state["finished"] == len(self.steps)
            self._prefetch(step, values)
            for index in ready:
                post(self.steps[index])
            if complete:
                finish()

        def post(step: _Step) -> None:
            step.resource.post(lambda: run(step))

        def finish() -> None:
            try:
                result = self._collect(values, wanted)
            except Exception as exc:
                done(None, exc, values)
                return
            done(result, None, values)

        starts = [step for step in self.steps if not step.depends_on]
        if not self.steps:
            finish()
        for step in starts:
            post(step)


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
    """What a Session and a ReplicaPool share: `run_async` and `map` on top of `submit`."""

    max_in_flight: int

    @abstractmethod
    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future: ...

    @abstractmethod
    def close(self, wait: bool = True) -> None: ...

    def __enter__(self) -> Requests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def run_async(self, feeds: Feeds,
                        output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The asyncio twin of `run`: awaits a slot and the result without blocking the loop."""
        future = await asyncio.to_thread(self.submit, feeds, output_names)
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



class Session(Requests):
    """A model compiled for this host's executors; build it with `hetero.compile`.

    If a library fails while running a partition it claimed it could run, the session records
    the nodes at fault, re-plans them elsewhere and runs the request again; the new plan is
    kept only if it succeeds, so a bad request cannot degrade the plan.
    """

    def __init__(self, plan: Plan, compiled: Sequence[CompiledPartition], rebuild: Rebuild | None = None,
                 max_in_flight: int = 16):
        self.model: Model = plan.model
        self.stats = RunStats()
        self.max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._closed = False
        self._rebuild = rebuild
        self._program = _Program(plan, compiled)
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

    def run(self, feeds: Feeds | Sequence[str] | None,
            output_names: Feeds | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one request: `run(feeds)` or `run(feeds, output_names)` -> {output name: array}.

        ONNX Runtime's argument order `run(output_names, feeds)` is accepted too; either way the
        result is a dict of host numpy arrays, all outputs when `output_names` is None.
        """
        arrays, wanted = self._prepare(feeds, output_names)
        program = self._program
        if program.parallel:
            return self._submit(arrays, wanted, True, None).result()
        start = time.perf_counter()
        try:
            result, values = program.execute(arrays, wanted, self._trace)
        except _PartitionFailed as failed:
            result, values = self._fall_back(program, failed, arrays, wanted)
        self._count(values, start)
        return result

    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future:
        """Start a request; the Future gives what `run` returns. Bad feeds raise here, at once.

        Beyond `max_in_flight` requests in flight this waits for a slot, or raises
        `QueueFullError` when `block` is False or `timeout` passes.
        """
        arrays, wanted = self._prepare(feeds, output_names)
        return self._submit(arrays, wanted, block, timeout)

    @contextmanager
    def tracing(self) -> Iterator[Trace]:
        """Record a timeline of partitions and transfers for the requests run inside the block."""
        trace = self._trace = Trace()
        try:
            yield trace
        finally:
            self._trace = None

    def close(self, wait: bool = True) -> None:
        """Refuse new requests; with `wait`, return once the requests in flight have finished."""
        self._closed = True
        if wait:
            for _ in range(self.max_in_flight):
                self._slots.acquire()
            for _ in range(self.max_in_flight):
                self._slots.release()

    def _prepare(self, feeds: Any, output_names: Any) -> tuple[dict[str, Any], list[str]]:
        if self._closed:
            raise HeteroError(f"model {self.model.label!r}: the session is closed")
        if not isinstance(feeds, Mapping) and isinstance(output_names, Mapping):
            feeds, output_names = output_names, feeds
        if not isinstance(feeds, Mapping):
            raise InputError(f"model {self.model.label!r}: feeds must be a mapping of input name -> array, "
                             f"got {type(feeds).__name__}")
        return self.check_feeds(feeds), self.resolve_outputs(output_names)

    def _submit(self, arrays: dict[str, Any], wanted: list[str], block: bool,
                timeout: float | None) -> Future:
        if not self._slots.acquire(block, timeout if block else None):
            raise QueueFullError(f"model {self.model.label!r}: {self.max_in_flight} requests already in "
                                 "flight; try again later")
        future: Future = Future()
        start = time.perf_counter()
        program = self._program

        def done(result: dict | None, error: BaseException | None, values: _Values) -> None:
            if isinstance(error, _PartitionFailed):
                threading.Thread(target=recover, args=(error,), daemon=True).start()
                return
            self._slots.release()
            self._count(values, start)
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def recover(failed: _PartitionFailed) -> None:
            try:
                result, values = self._fall_back(program, failed, arrays, wanted)
            except BaseException as exc:
                self._slots.release()
                future.set_exception(exc)
                return
            done(result, None, values)

        program.launch(arrays, wanted, done, self._trace)
        return future

    def _count(self, values: _Values, start: float) -> None:
        with self._lock:
            self.stats.runs += 1
            self.stats.transfers += values.transfers
            self.stats.transfer_bytes += values.transfer_bytes
            self.stats.direct_transfers += values.direct_transfers
            self.stats.seconds += time.perf_counter() - start

    def _fall_back(self, program: _Program, failed: _PartitionFailed, arrays: dict,
                   wanted: list[str]) -> tuple[dict, _Values]:
        step = failed.step
        part = program.plan.partitions[step.index]
        error = RunError(f"model {self.model.label!r}: partition #{step.index} on {step.executor.name} "
                         f"failed: {failed.error}")
        if self._rebuild is None:
            raise error from failed.error
        text = str(failed.error)
        culprits = [n for n in part.nodes if f"'{n.name}'" in text] or list(part.nodes)
        with self._lock:
            if self._program is not program:  # another request already re-planned
                return self._program.execute(arrays, wanted)
            for node in culprits:
                planner.reject(step.executor, self.model, node)
            try:
                new_program = _Program(*self._rebuild())
                result = new_program.execute(arrays, wanted)
            except (HeteroError, _PartitionFailed):
                for node in culprits:
                    planner.forget(step.executor, self.model, node)
                raise error from failed.error
            new_program.plan.notes.append(
                f"{step.executor.name} failed at run time on {len(culprits)} node(s) "
                f"({', '.join(n.name for n in culprits[:3])}); re-planned them elsewhere")
            self._program = new_program
            return result

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
                 max_replans: int = 16) -> Session:
    """Plan (priority, manual, or a given assignment) and compile a model; returns a `Session`.

    When a library rejects a partition at compile time, the nodes it rejects are recorded and the
    model re-planned without them on that executor; the plan's notes say what happened.
    """
    model = load(model)

    def build() -> tuple[Plan, list[CompiledPartition]]:
        notes: list[str] = []
        for _ in range(max_replans):
            the_plan = planner.plan(model, executors, policy, affinity=affinity, assignment=assignment)
            try:
                compiled = [compile_partition(model, part) for part in the_plan.partitions]
            except _Rejected as rejected:
                notes.append(rejected.note)
                continue
            the_plan.notes.extend(notes)
            return the_plan, compiled
        raise CompileError(f"model {model.label!r}: gave up after {max_replans} re-plans; last: {notes[-1]}")

    return Session(*build(), rebuild=build, max_in_flight=max_in_flight)


class _Rejected(Exception):
    def __init__(self, note: str):
        self.note = note


def compile_partition(model: Model, part: planner.Partition) -> CompiledPartition:
    """Compile one partition; on rejection, record the culprit nodes and raise `_Rejected`."""
    executor = part.executor
    name = f"{model.proto.graph.name or 'model'}#{part.index}@{executor.name}"
    try:
        return executor.compile(model.extract(part.nodes, name=name))
    except CompileError as exc:
        culprits = [n for n in part.nodes if n.name in exc.nodes] or _find_culprits(model, part)
        for node in culprits:
            planner.reject(executor, model, node)
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
