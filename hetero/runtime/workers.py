"""Compute resources: one lock, one worker thread and a busy clock per device or CPU stream.

Every partition runs under its resource's lock, whether called inline by `Session.run` or posted
to the resource's worker by the scheduler, so two libraries never compete for the same cores
and a device's work is serialised in arrival order.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class Resource:
    """One compute resource (`cpu`, `cuda:0`, `cpu#1`): partitions on it take turns."""

    def __init__(self, name: str):
        self.name = name
        self.lock = threading.Lock()
        self.busy_seconds = 0.0
        self.tasks = 0
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

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

    def post(self, task: Callable[[], None]) -> None:
        """Run `task` later on this resource's worker thread (tasks call `run` themselves)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=f"hetero-{self.name}",
                                                    daemon=True)
                    self._thread.start()
        self._queue.put(task)

    def _loop(self) -> None:
        while True:
            self._queue.get()()


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
