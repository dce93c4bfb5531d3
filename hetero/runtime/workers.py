"""Compute resources, background work and the runtime's clock, on concurrent.futures and threading.

A resource (`cpu`, `cuda:0`, `cpu#1`, or a link `cpu -> cuda:0`) is a lock and one worker thread
(a single-thread `ThreadPoolExecutor`). Every partition runs under its resource's lock, whether
called inline by `Session.run` or submitted to the resource's worker, so two libraries never
compete for the same cores and a device's work runs in arrival order. A task that raises fails
only its own future; the worker lives on. Deadlines and stall checks are timers on one clock
thread, which likewise outlives any callback that raises.

A task stuck inside a library holds its resource's worker until the library returns; requests
behind it fail at their deadlines, and the interpreter waits for the task at exit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("hetero.runtime")


class Resource:
    """One compute resource (`cpu`, `cuda:0`, `cpu#1`): partitions on it take turns."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.busy_seconds = 0.0
        self.tasks = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hetero-{name}")

    def __repr__(self) -> str:
        return f"<resource {self.name}: {self.tasks} tasks, {self.busy_seconds:.3f} s busy>"

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call `fn(*args)` holding this resource, counting the time as busy."""
        with self.lock:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.busy_seconds += time.perf_counter() - start
                self.tasks += 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Call `fn(*args)` later on this resource's worker thread (`fn` calls `run` itself where it
        computes); cancelling the future before it starts skips the call."""
        return self._worker.submit(fn, *args)


_resources: dict[str, Resource] = {}
_lock = threading.Lock()


def resource(name: str) -> Resource:
    with _lock:
        if name not in _resources:
            _resources[name] = Resource(name)
        return _resources[name]


def running() -> list[str]:
    """Resources with a partition running now; once nothing should be running (a server stopped),
    those stuck inside a library call."""
    with _lock:
        return [name for name, r in _resources.items() if r.lock.locked()]


def busy_snapshot() -> dict[str, float]:
    """Busy seconds per resource so far; subtract two snapshots to get busy time over a window."""
    with _lock:
        return {name: r.busy_seconds for name, r in _resources.items()}


_background = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hetero-fallback")


def background(fn: Callable[..., Any], *args: Any) -> Future:
    """Run slow bookkeeping (re-planning and recompiling after a failure) off the devices' workers."""
    return _background.submit(fn, *args)


class Timer:
    """A callback due later on the runtime's clock; after `cancel` it never runs and is released."""

    __slots__ = ("_clock", "_fn")

    def __init__(self, fn: Callable[[], Any], clock: _Clock):
        self._fn: Callable[[], Any] | None = fn
        self._clock = clock

    def cancel(self) -> None:
        if self._fn is not None:
            self._fn = None
            self._clock.cancelled()

    def _fire(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


_MAX_SLEEP_S = 3600.0  # Condition.wait raises OverflowError past ~300 years (a timeout of 1e10 s or inf)


class _Clock:
    """Timers on one thread: a heap of due times, the thread asleep until the soonest. Adding a timer
    wakes the thread only when it is due before every other one (requests add two timers each, a
    deadline and a stall check, nearly always later than one already waiting), so a request costs no
    thread switch here; an asyncio loop's `call_soon_threadsafe` would cost one each time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._cancelled = 0  # timers cancelled but still in the heap
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="hetero-clock", daemon=True).start()

    def call_later(self, delay: float, fn: Callable[[], Any]) -> Timer:
        timer = Timer(fn, self)
        with self._cond:
            if self._cancelled > 256 and self._cancelled * 2 > len(self._heap):  # keep memory bounded
                self._heap = [entry for entry in self._heap if entry[2]._fn is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0
            heapq.heappush(self._heap, (time.monotonic() + max(0.0, delay), next(self._order), timer))
            if self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    def cancelled(self) -> None:
        with self._cond:
            self._cancelled += 1

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2]._fn is None:
                        heapq.heappop(self._heap)
                        self._cancelled -= 1
                    left = self._heap[0][0] - time.monotonic() if self._heap else None
                    if left is not None and left <= 0:
                        timer = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(None if left is None else min(left, _MAX_SLEEP_S))
            try:
                timer._fire()
            except BaseException:  # a callback's bug must not stop every later timer
                log.exception("timer callback failed")


_clock: _Clock | None = None


def call_later(delay: float, fn: Callable[[], Any]) -> Timer:
    """Call `fn()` on the clock's thread after `delay` seconds, unless cancelled first. `fn` must be
    quick: it delays every other timer while it runs."""
    global _clock
    if _clock is None:
        with _lock:
            if _clock is None:
                _clock = _Clock()
    return _clock.call_later(delay, fn)
