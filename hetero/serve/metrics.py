"""Prometheus metrics of one server, in a registry of its own (several servers may share a process)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from hetero.runtime.workers import busy_snapshot
from hetero.serve.batcher import BatchObserver

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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

    def request(self, model: str, version: str, seconds: float, ok: bool) -> None:
        self.requests.labels(model, version, "success" if ok else "failure").inc()
        if ok:
            self.latency.labels(model, version).observe(seconds)

    def batch_observer(self, model: str, version: str) -> BatchObserver:
        """What the batcher calls for every batch it sends."""
        batch, queue, executions = (metric.labels(model, version)
                                    for metric in (self.batch, self.queue, self.executions))

        def observe(rows: int, waits: Sequence[float]) -> None:
            executions.inc()
            batch.observe(rows)
            for seconds in waits:
                queue.observe(seconds)
        return observe

    def text(self) -> bytes:
        return generate_latest(self.registry)
