"""Dynamic batching: concurrent requests to one model merged along dim 0 and run as one.

Requests wait in one bounded queue. A dispatcher thread forms a batch whenever a replica is
free: the oldest request and the later ones with the same non-batch dims, up to the maximum
batch size. It sends the batch at once when it is full or reaches a preferred size, else when
the oldest request has waited the queue delay. At most one batch per live replica is in flight
(replicas may join and leave the pool), so while every replica is busy the queue grows into
bigger batches instead of piling up behind.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from hetero.errors import QueueFullError, RunError
from hetero.runtime import ReplicaPool
from hetero.serve.protocol import ServeError

BatchObserver = Callable[[int, Sequence[float], float], None]  # (rows, each request's queue s, run s)


@dataclass(eq=False)
class _Request:
    arrays: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    key: tuple
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Requests to one ReplicaPool, merged when `max_batch_size` > 0 (each run alone when 0).

    A request's Future may be cancelled while it waits (a client gone, a deadline passed): it is
    dropped from the queue and never run. Once in a batch it runs; each request of a batch gets its
    own rows, whatever becomes of its batch-mates.
    """

    def __init__(self, pool: ReplicaPool, label: str, *, max_batch_size: int = 0, delay_s: float = 0.0,
                 preferred: Sequence[int] = (), max_queue_size: int = 128,
                 observe: BatchObserver | None = None):
        self.pool = pool
        self.label = label
        self.max_batch_size = max_batch_size
        self.delay_s = delay_s
        self.preferred = frozenset(preferred)
        self.max_queue_size = max_queue_size
        self._observe = observe
        self._pending: deque[_Request] = deque()
        lock = threading.Lock()  # guards the queue and the counts
        self._cond = threading.Condition(lock)  # a request queued (or closing)
        self._freed = threading.Condition(lock)  # a batch answered (or closing)
        self._in_flight = 0  # batches sent and not yet answered
        self._closing = False
        self._thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                        name=f"hetero-batcher-{label}")
        self._thread.start()

    def submit(self, arrays: dict[str, np.ndarray], outputs: Sequence[str]) -> Future:
        """Queue one request (arrays already checked); the Future gives its outputs."""
        rows = len(next(iter(arrays.values()))) if self.max_batch_size and arrays else 1
        key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in arrays.items())
        request = _Request(arrays, list(outputs), rows, key)
        with self._cond:
            if self._closing:
                raise ServeError(f"model {self.label!r} is unloading", 503)
            if len(self._pending) >= self.max_queue_size:
                raise QueueFullError(f"model {self.label!r}: {self.max_queue_size} requests already queued "
                                     "(max_queue_size); try again later")
            self._pending.append(request)
            self._cond.notify()  # wakes the dispatcher only while it waits for requests, not for a replica
        request.future.add_done_callback(lambda future: self._forget(request) if future.cancelled() else None)
        return request.future

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, run every queued one and wait for the batches in flight, for at most
        `timeout_s`; requests still queued then fail (503)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify()
            self._freed.notify()
        self._thread.join(timeout_s)
        with self._cond:
            left, self._pending = list(self._pending), deque()
        for request in left:
            _deliver(request.future, error=ServeError(f"model {self.label!r} unloaded before running the "
                                                      "request", 503))
        with self._cond:
            drained = self._freed.wait_for(lambda: not self._in_flight, max(0.0, deadline - time.monotonic()))
        self.pool.close(wait=drained)

    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while self._in_flight >= max(1, self.pool.live):
                    self._freed.wait()
                batch = self._next_batch()
                if batch is None:
                    return
                self._in_flight += 1
            self._run(batch)

    def _answered(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._freed.notify_all()

    def _forget(self, request: _Request) -> None:
        """Drop a request cancelled while it waits (its client gone or past its deadline)."""
        with self._cond, contextlib.suppress(ValueError):
            self._pending.remove(request)

    def _next_batch(self) -> list[_Request] | None:
        """Wait (holding the condition) until a batch is due; None once closing and drained.

        The requests returned are marked running, so none of them can be cancelled any more."""
        while True:
            if not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            if not self.max_batch_size:
                group = [self._pending.popleft()]
            else:
                group, sizes = self._group()
                due = self._pending[0].arrived + self.delay_s - time.perf_counter()
                if sizes[-1] < self.max_batch_size and not self._closing and due > 0:
                    preferred = [i for i, size in enumerate(sizes) if size in self.preferred]
                    if not preferred:
                        self._cond.wait(due)
                        continue
                    group = group[:preferred[-1] + 1]
                for request in group:
                    self._pending.remove(request)
            batch = [r for r in group if r.future.set_running_or_notify_cancel()]  # cancelled: dropped
            if batch:
                return batch

    def _group(self) -> tuple[list[_Request], list[int]]:
        """The oldest request and the later ones that fit with it, with the running batch size."""
        first = self._pending[0]
        group, sizes = [first], [first.rows]
        for request in itertools.islice(self._pending, 1, None):
            if request.key == first.key and sizes[-1] + request.rows <= self.max_batch_size:
                group.append(request)
                sizes.append(sizes[-1] + request.rows)
        return group, sizes

    def _run(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        try:
            outputs = list(dict.fromkeys(itertools.chain.from_iterable(r.outputs for r in batch)))
            arrays = batch[0].arrays if len(batch) == 1 else {
                name: np.concatenate([r.arrays[name] for r in batch]) for name in batch[0].arrays}
            future = self.pool.submit(arrays, outputs)
        except Exception as exc:
            self._answered()
            for request in batch:
                _deliver(request.future, error=exc)
            return
        future.add_done_callback(lambda done: self._finish(batch, done, start))

    def _finish(self, batch: list[_Request], done: Future, start: float) -> None:
        """Hand each request its rows (or the batch's error); runs on the thread that ran the batch."""
        self._answered()
        error = done.exception()
        rows = sum(r.rows for r in batch)
        if error is None and len(batch) > 1:
            wrong = [name for name, value in done.result().items()
                     if np.ndim(value) == 0 or len(value) != rows]
            if wrong:
                error = RunError(f"model {self.label!r}: output {wrong[0]!r} has no batch dim of {rows} "
                                 "rows; this model cannot be batched (set max_batch_size: 0)")
        if error is not None:
            for request in batch:
                _deliver(request.future, error=error)
            return
        if self._observe is not None:
            self._observe(rows, [start - r.arrived for r in batch], time.perf_counter() - start)
        results = done.result()
        offset = 0
        for request in batch:
            stop = offset + request.rows
            _deliver(request.future, {name: results[name][offset:stop] if len(batch) > 1 else results[name]
                                      for name in request.outputs})
            offset = stop


def _deliver(future: Future, result: dict[str, np.ndarray] | None = None, error: BaseException | None = None
             ) -> None:
    """Settle one request's Future; one already settled or cancelled is left as it is."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
