"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from hetero.runtime.workers import busy_snapshot

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
              "cache_hit", "cache_miss")


class _DeviceBusy(Collector):
    """Busy seconds per compute resource, read from the runtime's workers at scrape time."""

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("hetero_device_busy_seconds", "Seconds each compute resource (device "
                                     "or CPU stream) spent running partitions.", labels=["resource"])
        for name, seconds in sorted(busy_snapshot().items()):
            family.add_metric([name], seconds)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter("hetero_inference_requests", "Inference requests by outcome (success or "
                                "failure).", [*labels, "outcome"], registry=self.registry)
        self.latency = Histogram("hetero_request_duration_seconds", "Inference request latency, from "
                                 "decoded request to outputs.", labels, buckets=_SECONDS,
                                 registry=self.registry)
        self.queue = Histogram("hetero_queue_duration_seconds", "Time a request waited for its batch to "
                               "be sent.", labels, buckets=_SECONDS, registry=self.registry)
        self.batch = Histogram("hetero_batch_size", "Rows in each batch sent to a model.", labels,
                               buckets=_SIZES, registry=self.registry)
        self.executions = Counter("hetero_model_executions", "Batches (model runs) sent to a model.", labels,
                                  registry=self.registry)
        self.registry.register(_DeviceBusy())

    def model(self, name: str, version: str) -> ModelStats:
        """The counters of one served model version."""
        return ModelStats(self, name, version)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class ModelStats:
    """What one model version has served: its Prometheus series, and the statistics extension's
    counts (Triton's `ModelStatistics`: requests, queue and compute time, executions per batch size)."""

    def __init__(self, metrics: Metrics, name: str, version: str):
        self.name, self.version = name, version
        self._success, self._failure = (metrics.requests.labels(name, version, outcome)
                                        for outcome in ("success", "failure"))
        self._latency, self._queue, self._batch, self._executions = (
            metric.labels(name, version) for metric in (metrics.latency, metrics.queue, metrics.batch,
                                                        metrics.executions))
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {key: [0, 0] for key in _DURATIONS}  # key -> [count, ns]
        self._batches: dict[int, list[int]] = {}  # batch rows -> [executions, ns]
        self._inferences = self._runs = self._last_ms = 0

    def request(self, seconds: float, ok: bool) -> None:
        """One request answered (`ok`) or failed, `seconds` after it was decoded."""
        (self._success if ok else self._failure).inc()
        if ok:
            self._latency.observe(seconds)
        with self._lock:
            count = self._counts["success" if ok else "fail"]
            count[0] += 1
            count[1] += int(seconds * 1e9)

    def batch(self, rows: int, waits: Sequence[float], seconds: float) -> None:
        """One batch of `rows` rows run in `seconds`, its requests having waited `waits` (a BatchObserver)."""
        self._executions.inc()
        self._batch.observe(rows)
        for wait in waits:
            self._queue.observe(wait)
        with self._lock:
            self._inferences += rows
            self._runs += 1
            self._last_ms = int(time.time() * 1e3)
            queue, compute = self._counts["queue"], self._counts["compute_infer"]
            queue[0] += len(waits)
            queue[1] += int(sum(waits) * 1e9)
            compute[0] += len(waits)
            compute[1] += int(seconds * 1e9) * len(waits)
            executions = self._batches.setdefault(rows, [0, 0])
            executions[0] += 1
            executions[1] += int(seconds * 1e9)

    def statistics(self) -> dict[str, Any]:
        """The statistics extension's entry for this model version (Triton's JSON; the gRPC
        `ModelStatistics` message parses from it)."""
        def duration(pair: Sequence[int]) -> dict[str, int]:
            return {"count": pair[0], "ns": pair[1]}
        with self._lock:
            return {"name": self.name, "version": self.version, "last_inference": self._last_ms,
                    "inference_count": self._inferences, "execution_count": self._runs,
                    "inference_stats": {key: duration(pair) for key, pair in self._counts.items()},
                    "batch_stats": [{"batch_size": rows, "compute_input": duration((runs, 0)),
                                     "compute_infer": duration((runs, ns)),
                                     "compute_output": duration((runs, 0))}
                                    for rows, (runs, ns) in sorted(self._batches.items())]}
