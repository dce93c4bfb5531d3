"""Compute resources, background work and the runtime's clock, on concurrent.futures and asyncio.

A resource (`cpu`, `cuda:0`, `cpu#1`, or a link `cpu -> cuda:0`) is a lock and one worker thread
(a single-thread `ThreadPoolExecutor`). Every partition runs under its resource's lock, whether
called inline by `Session.run` or submitted to the resource's worker, so two libraries never
compete for the same cores and a device's work runs in arrival order. A task that raises fails
only its own future; the worker lives on. Deadlines and stall checks are timers on one asyncio
event loop, which likewise outlives any callback that raises.

A task stuck inside a library holds its resource's worker until the library returns; requests
behind it fail at their deadlines, and the interpreter waits for the task at exit.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


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

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[], Any]):
        self._fn: Callable[[], Any] | None = fn

    def cancel(self) -> None:
        self._fn = None

    def _fire(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


_clock: asyncio.AbstractEventLoop | None = None


def _clock_loop() -> asyncio.AbstractEventLoop:
    global _clock
    with _lock:
        if _clock is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="hetero-clock", daemon=True).start()
            _clock = loop
        return _clock


def call_later(delay: float, fn: Callable[[], Any]) -> Timer:
    """Call `fn()` on the clock's thread after `delay` seconds, unless cancelled first. `fn` must be
    quick: it delays every other timer while it runs."""
    timer = Timer(fn)
    loop = _clock_loop()
    loop.call_soon_threadsafe(loop.call_later, max(0.0, delay), timer._fire)
    return timer
