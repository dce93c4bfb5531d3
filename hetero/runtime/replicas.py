"""ReplicaPool: whole copies of a model on several devices or CPU streams, dispatched by speed.

Each replica is a `Session` of its own (on a GPU, an OpenCL device, or a CPU stream: a slice of
the cores with its own thread budget, as OpenVINO's streams are). Requests wait in one queue;
an idle replica takes a request only if no faster replica would finish it sooner, judged from
each replica's measured time per request (scaled by input bytes, so a server's batches of any
size compare) and what it is busy with. So replicas of different speeds add up, and a slow one
never holds back work a fast one would have done first.

A replica need not be local: anything with a Session's `model` and `run(arrays, output_names)`
will do (`hetero.ray` runs replicas on the nodes of a Ray cluster). Replicas may join a running
pool (`add`) and leave it (`retire`, or a `ReplicaLostError` raised by their `run`).

The pool has no threads of its own: a request runs as a `Session.submit` on the replica's
devices' workers (a replica with only `run` gets a single-thread executor of its own), and the
pool dispatches the next when one finishes. A request whose replica fails is retried on another;
one whose replica stalls (far past its measured time) is started on another too, and the first
answer wins. A replica that answers NaN or infinity from finite inputs (`NonFiniteError`, see
`Session`) has the request retried too; if every replica tried answers so, that is the model's
own answer and is returned, and no replica counts as failed. A request with a `timeout` fails
with `DeadlineExceededError` when it passes; a cancelled one leaves the queue at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetero import executors as executor_registry
from hetero.errors import (
    DeadlineExceededError,
    HeteroError,
    InputError,
    NonFiniteError,
    QueueFullError,
    ReplicaLostError,
)
from hetero.executors import CPU, Executor, default_threads, is_accelerator
from hetero.graph import Model, example_feeds, load
from hetero.graph.load import ModelSource
from hetero.planner import Plan
from hetero.runtime.session import (
    Feeds,
    Requests,
    Session,
    check_feeds,
    compile_plan,
    resolve_outputs,
    settle,
)
from hetero.runtime.workers import Timer, call_later

HOST = str(CPU)  # the host libraries (every executor not on an accelerator) among `devices` names
_SMOOTHING = 0.2  # weight of the newest measurement in the per-replica time estimate


@dataclass
class Replica:
    """One copy of the model and what the pool knows of its speed."""

    session: Session  # or anything with a Session's `model` and `run`
    name: str
    seconds_per_request: float | None = None  # for a request of the pool's reference size
    served: int = 0
    failed: int = 0
    stalls: int = 0
    busy_seconds: float = 0.0
    running_since: float | None = None
    running_size: float = 1.0
    stalled: bool = False  # its request ran far past its measured time; it gets no other until done
    retired: bool = False  # takes no new request; the one it runs finishes
    lane: ThreadPoolExecutor | None = field(default=None, repr=False)  # for a replica with only `run`

    @property
    def live(self) -> bool:
        return not self.retired

    def remaining(self, now: float) -> float:
        if self.running_since is None:
            return 0.0
        return max(0.0, (self.seconds_per_request or 0.0) * self.running_size - (now - self.running_since))

    def attempt(self, arrays: dict[str, Any], wanted: list[str]) -> Future:
        """Start one request on this replica: a Session's own `submit`, else `run` on its lane."""
        submit = getattr(self.session, "submit", None)
        if submit is not None:
            return submit(arrays, wanted, block=False)
        if self.lane is None:
            self.lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hetero-replica-{self.name}")
        return self.lane.submit(self.session.run, arrays, wanted)


@dataclass(eq=False)
class _Job:
    arrays: dict[str, Any]
    wanted: list[str]
    future: Future
    size: float = 1.0  # input bytes relative to the pool's reference request
    timeout: float | None = None
    excluded: set[int] = field(default_factory=set)
    running: set[int] = field(default_factory=set)  # replicas working on it now
    error: BaseException | None = None  # the last attempt's, returned if no replica is left
    non_finite: dict[int, NonFiniteError] = field(default_factory=dict)  # replicas that answered NaN
    timer: Timer | None = None


class ReplicaPool(Requests):
    """Requests spread over replicas; the same `run` / `submit` / `run_async` / `map` as a Session.

    A replica whose request runs longer than `stall_factor` times its measured time per request
    (and at least `min_stall_s`) is considered stalled: the request is started on another replica
    as well, and the replica takes no other request until its own returns.
    """

    def __init__(self, replicas: Sequence[Session], *, names: Sequence[str] | None = None,
                 max_in_flight: int | None = None, stall_factor: float = 10.0, min_stall_s: float = 2.0):
        if not replicas:
            raise HeteroError("a ReplicaPool needs at least one replica")
        self.model = replicas[0].model
        for session in replicas:
            _defer_non_finite(session)
        self.replicas = [Replica(s, name) for s, name in
                         zip(replicas, names or [_describe(s) for s in replicas], strict=True)]
        self.max_in_flight = max_in_flight or 4 * len(replicas)
        self.stall_factor = stall_factor
        self.min_stall_s = min_stall_s
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._queue: deque[_Job] = deque()
        self._pending: set[_Job] = set()  # submitted, not answered yet
        self._cond = threading.Condition()
        self._closing = False
        self._reference_bytes = 0
        self._feeds: Feeds | None = None  # what warm_up measured with, for replicas that join later

    @classmethod
    def build(cls, model: ModelSource, replicas: Sequence[Sequence[str | Executor]] | None = None, *,
              cpu_streams: int | None = None, policy: str = "priority", warmup: bool = True,
              feeds: Feeds | None = None, max_in_flight: int | None = None,
              compile_replica: Callable[[Model, list[Executor]], Session] | None = None) -> ReplicaPool:
        """Compile one replica per executor list; host-only lists become `cpu_streams` CPU streams.
        `compile_replica(model, executors)` replaces planning each by `policy` (see
        `hetero.runtime.replanning.measured_replicas`). `warmup` measures each replica on `feeds`
        (default: made from the model's dims).

        With no `replicas`, every accelerator device gets one (its libraries first, numpy as
        fallback) and the host libraries one per CPU stream. `cpu_streams` defaults to the number of cores
        (one thread per stream, as OpenVINO's throughput hint does on small hosts).
        """
        named = replica_sessions(model, replicas, cpu_streams=cpu_streams, policy=policy,
                                 compile_replica=compile_replica)
        pool = cls([s for _, s in named], names=[n for n, _ in named], max_in_flight=max_in_flight)
        if warmup:
            try:
                pool.warm_up(feeds)
            except BaseException:
                pool.close(wait=False)
                raise
        return pool

    def warm_up(self, feeds: Feeds | None = None, repeats: int = 3, *, left_out: list[str] | None = None
                ) -> None:
        """Measure each replica's time per request (one at a time, so they do not disturb each
        other); models with symbolic input dims need `feeds`. The first failure raises; with
        `left_out`, a replica that fails is retired instead and its error added there (a cluster:
        one failing node must not keep a model off the others), unless every replica fails."""
        self._feeds = feeds if feeds is not None else example_feeds(self.model)
        self._reference_bytes = _nbytes(self._feeds)
        failed: dict[int, Exception] = {}  # by session: entries sharing one (a remote's lanes) fail together
        for replica in self.replicas:
            if id(replica.session) not in failed:
                try:
                    replica.seconds_per_request = _measure(replica.session, self._feeds, repeats)
                    continue
                except Exception as exc:
                    if left_out is None:
                        raise
                    failed[id(replica.session)] = exc
                    left_out.append(f"{replica.name}: {type(exc).__name__}: {exc}")
            self.retire(replica)
        if failed and not self.live:
            raise next(iter(failed.values()))

    def add(self, session: Session, name: str | None = None) -> Replica:
        """A replica joins the running pool: measured alone first (on what `warm_up` measured
        with), then it takes requests as the others do."""
        _defer_non_finite(session)
        replica = Replica(session, name or _describe(session))
        if self._feeds is not None:
            replica.seconds_per_request = _measure(session, self._feeds, 3)
        with self._cond:
            if self._closing:
                raise HeteroError(f"model {self.model.label!r}: the replica pool is closed")
            self.replicas.append(replica)
        self._dispatch()
        return replica

    def retire(self, replica: Replica) -> None:
        """The replica takes no new request; the one it runs finishes (a graceful drain)."""
        with self._cond:
            replica.retired = True
            stranded = self._stranded()
            self._cond.notify_all()
        self._fail(stranded)
        if replica.lane is not None:
            replica.lane.shutdown(wait=False)

    def wait_idle(self, replica: Replica, timeout: float | None = None) -> bool:
        """Wait until `replica` runs no request (a retired one has finished its last); True if so."""
        with self._cond:
            return self._cond.wait_for(lambda: replica.running_since is None, timeout)

    @property
    def live(self) -> int:
        """Replicas taking requests."""
        return sum(r.live for r in self.replicas)

    @property
    def queued(self) -> int:
        """Requests waiting for a replica."""
        return len(self._queue)

    @property
    def plan(self) -> Plan:
        """The plan of the first replica (the others differ only in stream or device)."""
        return self.replicas[0].session.plan

    def __repr__(self) -> str:
        return f"<ReplicaPool {self.model.label!r}: {', '.join(r.name for r in self.replicas)}>"

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None, *,
            timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one request on the replica that finishes it first; `timeout` as in `Session.run`."""
        return self.submit(feeds, output_names, timeout=timeout).result()

    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future:
        """Queue a request for the replica that will finish it first; bad feeds raise at once.

        `block` and `timeout` as in `Session.submit`: the Future fails with
        `DeadlineExceededError` if no replica answers within `timeout` seconds.
        """
        if self._closing:
            raise HeteroError(f"model {self.model.label!r}: the replica pool is closed")
        arrays, wanted = check_feeds(self.model, feeds), resolve_outputs(self.model, output_names)
        if not self.live:
            raise HeteroError(f"model {self.model.label!r}: no replica left to run the request")
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._slots.acquire(block, timeout if block else None):
            raise QueueFullError(f"model {self.model.label!r}: {self.max_in_flight} requests already in "
                                 "flight; try again later")
        nbytes = _nbytes(arrays)
        self._reference_bytes = self._reference_bytes or nbytes
        job = _Job(arrays, wanted, Future(), nbytes / self._reference_bytes if nbytes else 1.0, timeout)
        job.future.add_done_callback(lambda _: self._closed(job))
        if deadline is not None:
            job.timer = call_later(deadline - time.monotonic(), lambda: self._expire(job))
        with self._cond:
            if not job.future.done():
                self._pending.add(job)
                self._queue.append(job)
        self._dispatch()
        return job.future

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; the replicas finish every queued one. With `wait`, return once
        every request is answered (`DeadlineExceededError` if not within `timeout` seconds)."""
        with self._cond:
            self._closing = True
            if wait and not self._cond.wait_for(lambda: not self._pending, timeout):
                raise DeadlineExceededError(f"model {self.model.label!r}: {len(self._pending)} request(s) "
                                            f"still in flight {timeout:g} s after close")
        if wait:
            for replica in self.replicas:
                if replica.lane is not None:
                    replica.lane.shutdown(wait=False)

    def _closed(self, job: _Job) -> None:
        """The job's future is done (answered, failed, cancelled or timed out): free its place."""
        if job.future.cancelled():
            job.future.set_running_or_notify_cancel()  # so concurrent.futures.wait counts it as done
        if job.timer is not None:
            job.timer.cancel()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
            self._pending.discard(job)
            self._cond.notify_all()
        self._slots.release()

    def _expire(self, job: _Job) -> None:
        where = (", ".join(self.replicas[i].name for i in sorted(job.running)) + " still running"
                 if job.running else "waiting for a replica")
        settle(job.future, error=DeadlineExceededError(
            f"model {self.model.label!r}: no answer within {job.timeout:g} s ({where})"))

    def _dispatch(self) -> None:
        """Start queued jobs on idle replicas, each on the replica that will finish it first."""
        while True:
            with self._cond:
                start = None
                for index, replica in enumerate(self.replicas):
                    if replica.live and replica.running_since is None:
                        job = self._take(index)
                        if job is not None:
                            replica.running_since, replica.running_size = time.perf_counter(), job.size
                            job.running.add(index)
                            start = index, job
                            break
            if start is None:
                return
            self._start(*start)

    def _take(self, index: int) -> _Job | None:
        """The next job for replica `index`, if no faster replica would finish it sooner.

        Times scale with the job's size, so batches of different sizes (a server's dynamic
        batching) compare with what each replica measured.
        """
        eligible = [job for job in self._queue if index not in job.excluded]
        if not eligible:
            return None
        size = eligible[0].size
        mine = self.replicas[index].seconds_per_request
        if mine is not None:
            now = time.perf_counter()
            sooner = 0
            for other_index, other in enumerate(self.replicas):
                theirs = other.seconds_per_request
                if (other_index == index or not theirs or not other.live or other.stalled
                        or other_index in eligible[0].excluded):
                    continue
                sooner += max(0, int((mine * size - other.remaining(now)) / (theirs * size) * (1 - 1e-9)))
            if len(eligible) <= sooner:
                return None
        job = eligible[0]
        self._queue.remove(job)
        return job

    def _start(self, index: int, job: _Job) -> None:
        replica = self.replicas[index]
        start = time.perf_counter()
        try:
            attempt = replica.attempt(job.arrays, job.wanted)
        except Exception as exc:
            self._finished(index, job, None, exc, start, None)
            return
        expected = (replica.seconds_per_request or 0.0) * job.size
        stall = call_later(max(self.stall_factor * expected, self.min_stall_s),
                           lambda: self._stalled(index, job, attempt))
        attempt.add_done_callback(lambda done: self._finished(index, job, done, _error(done), start, stall))

    def _stalled(self, index: int, job: _Job, attempt: Future) -> None:
        with self._cond:
            if attempt.done() or job.future.done():
                return
            replica = self.replicas[index]
            replica.stalled = True
            replica.stalls += 1
            job.excluded.add(index)
            if job not in self._queue and self._others(job):
                self._queue.appendleft(job)
        self._dispatch()

    def _others(self, job: _Job) -> bool:
        """Whether a live replica the job has not failed on (or stalled on) is left."""
        return any(r.live and i not in job.excluded for i, r in enumerate(self.replicas))

    def _finished(self, index: int, job: _Job, attempt: Future | None, error: BaseException | None,
                  start: float, stall: Timer | None) -> None:
        if stall is not None:
            stall.cancel()
        elapsed = time.perf_counter() - start
        replica = self.replicas[index]
        stranded: list[_Job] = []
        with self._cond:
            replica.running_since, replica.stalled = None, False
            job.running.discard(index)
            if error is None:
                previous, scaled = replica.seconds_per_request, elapsed / job.size
                replica.seconds_per_request = scaled if previous is None else (
                    (1 - _SMOOTHING) * previous + _SMOOTHING * scaled)
                replica.served += 1
                replica.busy_seconds += elapsed
                for other in job.non_finite:  # their NaN or infinity was wrong after all
                    self.replicas[other].failed += 1
            else:
                if isinstance(error, NonFiniteError):
                    job.non_finite[index] = error
                else:
                    replica.failed += 1
                replica.retired = replica.retired or isinstance(error, ReplicaLostError)
                job.excluded.add(index)
                job.error = error
                retry = not isinstance(error, InputError) and not job.future.done() and self._others(job)
                if retry and job not in self._queue:
                    self._queue.appendleft(job)
                give_up = not retry and not job.running and job not in self._queue
                stranded = self._stranded() if replica.retired else []
            self._cond.notify_all()
        if error is None:
            settle(job.future, attempt.result())
        elif give_up and isinstance(job.error, NonFiniteError) and job.non_finite.keys() == job.excluded:
            for other, answer in job.non_finite.items():  # every replica tried gave it: the model's own
                if isinstance(self.replicas[other].session, Session):
                    self.replicas[other].session.confirm_non_finite(answer.tensors)
            settle(job.future, job.error.outputs)
        elif give_up:
            settle(job.future, error=job.error)
        self._fail(stranded)
        self._dispatch()

    def _stranded(self) -> list[_Job]:
        """Queued jobs no live replica may take any more (each has failed on the rest); taken
        out of the queue. Called holding the condition."""
        live = {i for i, r in enumerate(self.replicas) if r.live}
        stranded = [job for job in self._queue if not live - job.excluded]
        for job in stranded:
            self._queue.remove(job)
        return stranded

    def _fail(self, jobs: Sequence[_Job]) -> None:
        for job in jobs:
            settle(job.future, error=job.error or HeteroError(
                f"model {self.model.label!r}: no replica left to run the request"))


def _defer_non_finite(session: Session) -> None:
    """A replica's NaN or infinity that its session cannot check comes back as `NonFiniteError`,
    so the pool asks another replica."""
    if isinstance(session, Session):
        session.defer_non_finite = True


def _error(attempt: Future) -> BaseException | None:
    if attempt.cancelled():
        return HeteroError("the replica's request was cancelled")
    return attempt.exception()


def replica_sessions(model: ModelSource, replicas: Sequence[Sequence[str | Executor]] | None = None, *,
                     cpu_streams: int | None = None, policy: str = "priority", cores: int | None = None,
                     devices: Collection[str] | None = None,
                     compile_replica: Callable[[Model, list[Executor]], Session] | None = None,
                     ) -> list[tuple[str, Session]]:
    """The replicas `ReplicaPool.build` pools, compiled, each with its name.

    With no `replicas`, every accelerator device gets one (every library on it first, the host
    libraries as fallback) and the host libraries one per CPU stream (`cpu_streams`, default one per core).
    Host libraries use at most `cores` threads in all (default: every core of this process).
    `devices` (names: "cuda:0", and "cpu" for the host libraries) keeps only the replicas on them:
    a replica belongs to the devices of its accelerators, one without any to "cpu"; the host
    libraries stay every replica's fallback (`hetero.ray`'s workers of one device group each).
    """
    model = load(model)
    if replicas is None:
        available = executor_registry.available()
        on_devices: dict[str, list[Executor]] = {}
        for executor in available:
            if is_accelerator(executor):
                on_devices.setdefault(str(executor.device), []).append(executor)
        host = [e for e in available if not is_accelerator(e)]
        replicas = [[*on_device, *host] for on_device in on_devices.values()] + [host]
    specs = [executor_registry.resolve(spec) for spec in replicas]
    if devices is not None:
        specs = [kept for chosen in specs if (kept := _within(chosen, devices))]
    cores = cores or default_threads()
    streams = cpu_streams or cores
    named = []
    for chosen in specs:
        if any(is_accelerator(e) for e in chosen) or streams <= 1:
            variants = [[e if is_accelerator(e) or e.threads <= cores
                         else executor_registry.variant_of(e, threads=cores) for e in chosen]]
        else:
            threads = max(1, cores // streams)
            variants = [[executor_registry.variant_of(e, threads=threads, stream=k) for e in chosen]
                        for k in range(streams)]
        for executors in variants:
            session = (compile_replica(model, executors) if compile_replica
                       else compile_plan(model, executors, policy))
            named.append((_describe(session), session))
    return named


def _within(executors: list[Executor], devices: Collection[str]) -> list[Executor]:
    """A replica's executors kept to `devices` (its accelerators there, with the host libraries);
    empty when it does not belong there."""
    accelerators = [e for e in executors if is_accelerator(e)]
    if not accelerators:
        return executors if HOST in devices else []
    if not any(str(e.device) in devices for e in accelerators):
        return []
    return [e for e in executors if not is_accelerator(e) or str(e.device) in devices]


def _measure(session: Session, feeds: Feeds, repeats: int) -> float:
    """Median seconds per request, after one untimed run."""
    session.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _nbytes(arrays: Feeds) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())


def _describe(session: Session) -> str:
    return "+".join(dict.fromkeys(e.name for e in session.plan.executors))
