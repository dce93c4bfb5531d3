"""Closed-loop load: C clients each send a request, wait for it, send the next, for S seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hetero.runtime.workers import busy_snapshot


@dataclass
class BenchResult:
    """Requests served, their latencies, and how busy each compute resource was meanwhile."""

    name: str
    requests: int
    seconds: float
    latencies: list[float]
    busy: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")


def run_load(name: str, call: Callable[[], object], *, duration: float = 10.0, concurrency: int = 1,
             warmup: int = 2, progress: Callable[[float], None] | None = None) -> BenchResult:
    """Drive `call` (one blocking request) from `concurrency` threads for `duration` seconds."""
    for _ in range(warmup):
        call()
    latencies: list[float] = []
    lock = threading.Lock()
    before = busy_snapshot()
    start = time.perf_counter()
    deadline = start + duration
    errors: list[BaseException] = []

    def client() -> None:
        while time.perf_counter() < deadline and not errors:
            began = time.perf_counter()
            try:
                call()
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        if progress:
            progress(min(1.0, (time.perf_counter() - start) / duration))
        time.sleep(0.1)
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    after = busy_snapshot()
    busy = {r: (after[r] - before.get(r, 0.0)) / elapsed for r in after if after[r] > before.get(r, 0.0)}
    return BenchResult(name, len(latencies), elapsed, latencies, busy)


def settled_times(call: Callable[[], object], repeats: int = 3, pause_s: float = 0.1) -> list[float]:
    """Seconds of `repeats` back-to-back calls, after a pause and an untimed call.

    For comparing libraries in turns on shared cores: the pause lets the previous library's
    spinning threads (OpenBLAS, OpenMP, TBB, ONNX Runtime) go to sleep, the untimed call wakes
    this one's, so each side is timed in its own steady state."""
    time.sleep(pause_s)
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times
