"""ReplicaPool: whole copies of a model on several devices or CPU streams, dispatched by speed.

Each replica is a `Session` of its own (on a GPU, an OpenCL device, or a CPU stream: a slice of
the cores with its own thread budget, as OpenVINO's streams are). Requests wait in one queue;
an idle replica takes a request only if no faster replica would finish it sooner, judged from
each replica's measured time per request (scaled by input bytes, so a server's batches of any
size compare) and what it is busy with. So replicas of different speeds add up, and a slow one
never holds back work a fast one would have done first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hetero import executors as executor_registry
from hetero.errors import HeteroError, InputError, QueueFullError
from hetero.executors import Executor, default_threads, is_accelerator
from hetero.graph import Model, example_feeds, load
from hetero.graph.load import ModelSource
from hetero.planner import Plan
from hetero.runtime.session import Feeds, Requests, Session, compile_plan

_SMOOTHING = 0.2  # weight of the newest measurement in the per-replica time estimate


@dataclass
class Replica:
    """One copy of the model and what the pool knows of its speed."""

    session: Session
    name: str
    seconds_per_request: float | None = None  # for a request of the pool's reference size
    served: int = 0
    failed: int = 0
    busy_seconds: float = 0.0
    running_since: float | None = None
    running_size: float = 1.0
    thread: threading.Thread | None = field(default=None, repr=False)

    def remaining(self, now: float) -> float:
        if self.running_since is None:
            return 0.0
        return max(0.0, (self.seconds_per_request or 0.0) * self.running_size - (now - self.running_since))


@dataclass(eq=False)
class _Job:
    arrays: dict[str, Any]
    wanted: list[str]
    future: Future
    size: float = 1.0  # input bytes relative to the pool's reference request
    excluded: set[int] = field(default_factory=set)


class ReplicaPool(Requests):
    """Requests spread over replicas; the same `run` / `submit` / `run_async` / `map` as a Session."""

    def __init__(self, replicas: Sequence[Session], *, names: Sequence[str] | None = None,
                 max_in_flight: int | None = None):
        if not replicas:
            raise HeteroError("a ReplicaPool needs at least one replica")
        self.model = replicas[0].model
        self.replicas = [Replica(s, name) for s, name in
                         zip(replicas, names or [_describe(s) for s in replicas], strict=True)]
        self.max_in_flight = max_in_flight or 4 * len(replicas)
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._reference_bytes = 0
        for index, replica in enumerate(self.replicas):
            replica.thread = threading.Thread(target=self._serve, args=(index,), daemon=True,
                                              name=f"hetero-replica-{replica.name}")
            replica.thread.start()

    @classmethod
    def build(cls, model: ModelSource, replicas: Sequence[Sequence[str | Executor]] | None = None, *,
              cpu_streams: int | None = None, policy: str = "priority", warmup: bool = True,
              max_in_flight: int | None = None,
              compile_replica: Callable[[Model, list[Executor]], Session] | None = None) -> ReplicaPool:
        """Compile one replica per executor list; host-only lists become `cpu_streams` CPU streams.
        `compile_replica(model, executors)` replaces planning each by `policy` (see
        `hetero.runtime.replanning.measured_replicas`).

        With no `replicas`, every accelerator gets one (its library first, numpy as fallback)
        and the host libraries one per CPU stream. `cpu_streams` defaults to the number of cores
        (one thread per stream, as OpenVINO's throughput hint does on small hosts).
        """
        model = load(model)
        available = executor_registry.available()
        if replicas is None:
            accelerators = [e for e in available if is_accelerator(e)]
            host = [e for e in available if not is_accelerator(e)]
            replicas = [[e, *host] for e in accelerators] + [host]
        streams = cpu_streams or default_threads()
        sessions, names = [], []
        for spec in replicas:
            chosen = executor_registry.resolve(spec)
            if any(is_accelerator(e) for e in chosen) or streams <= 1:
                variants = [chosen]
            else:
                threads = max(1, default_threads() // streams)
                variants = [[executor_registry.variant_of(e, threads=threads, stream=k) for e in chosen]
                            for k in range(streams)]
            for executors in variants:
                sessions.append(compile_replica(model, executors) if compile_replica
                                else compile_plan(model, executors, policy))
                names.append(_describe(sessions[-1]))
        pool = cls(sessions, names=names, max_in_flight=max_in_flight)
        if warmup:
            try:
                pool.warm_up()
            except BaseException:
                pool.close(wait=False)  # else its replica threads wait forever
                raise
        return pool

    def warm_up(self, feeds: Feeds | None = None, repeats: int = 3) -> None:
        """Measure each replica's time per request (one at a time, so they do not disturb each
        other); models with symbolic input dims need `feeds`."""
        feeds = feeds if feeds is not None else example_feeds(self.model)
        self._reference_bytes = _nbytes(feeds)
        for replica in self.replicas:
            replica.session.run(feeds)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                replica.session.run(feeds)
                times.append(time.perf_counter() - start)
            replica.seconds_per_request = float(np.median(times))

    @property
    def plan(self) -> Plan:
        """The plan of the first replica (the others differ only in stream or device)."""
        return self.replicas[0].session.plan

    def __repr__(self) -> str:
        return f"<ReplicaPool {self.model.label!r}: {', '.join(r.name for r in self.replicas)}>"

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self.submit(feeds, output_names).result()

    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future:
        """Queue a request for the replica that will finish it first; bad feeds raise at once."""
        if self._closing:
            raise HeteroError(f"model {self.model.label!r}: the replica pool is closed")
        first = self.replicas[0].session
        arrays, wanted = first.check_feeds(feeds), first.resolve_outputs(output_names)
        if not self._slots.acquire(block, timeout if block else None):
            raise QueueFullError(f"model {self.model.label!r}: {self.max_in_flight} requests already in "
                                 "flight; try again later")
        nbytes = _nbytes(arrays)
        self._reference_bytes = self._reference_bytes or nbytes
        job = _Job(arrays, wanted, Future(), nbytes / self._reference_bytes if nbytes else 1.0)
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def close(self, wait: bool = True) -> None:
        """Refuse new requests; the replicas finish every queued one, then stop."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if wait:
            for replica in self.replicas:
                if replica.thread is not None:
                    replica.thread.join()

    def _serve(self, index: int) -> None:
        replica = self.replicas[index]
        while True:
            with self._cond:
                job = self._take(index)
                while job is None:
                    if self._closing and not self._queue:
                        return
                    self._cond.wait()
                    job = self._take(index)
                replica.running_since, replica.running_size = time.perf_counter(), job.size
            self._execute(index, job)

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
                if other_index == index or not theirs or not other.thread or not other.thread.is_alive():
                    continue
                sooner += max(0, int((mine * size - other.remaining(now)) / (theirs * size) * (1 - 1e-9)))
            if len(eligible) <= sooner:
                return None
        job = eligible[0]
        self._queue.remove(job)
        return job

    def _execute(self, index: int, job: _Job) -> None:
        replica = self.replicas[index]
        start = time.perf_counter()
        try:
            result = replica.session.run(job.arrays, job.wanted)
        except Exception as exc:
            with self._cond:
                replica.running_since = None
                replica.failed += 1
                job.excluded.add(index)
                retry = not isinstance(exc, InputError) and len(job.excluded) < len(self.replicas)
                if retry:
                    self._queue.appendleft(job)
                self._cond.notify_all()
            if not retry:
                self._slots.release()
                job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        with self._cond:
            previous, scaled = replica.seconds_per_request, elapsed / job.size
            replica.seconds_per_request = scaled if previous is None else (
                (1 - _SMOOTHING) * previous + _SMOOTHING * scaled)
            replica.served += 1
            replica.busy_seconds += elapsed
            replica.running_since = None
            self._cond.notify_all()
        self._slots.release()
        job.future.set_result(result)


def _nbytes(arrays: Feeds) -> int:
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())


def _describe(session: Session) -> str:
    return "+".join(dict.fromkeys(e.name for e in session.plan.executors))
