"""`hetero serve REPO --ray ADDRESS`: the same server, repository and config, with every model's
replicas on the nodes of a Ray cluster, and `/metrics` per node and per replica."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hetero.ray.cluster import Cluster
from hetero.serve import Server
from hetero.serve.repository import Repository


class ClusterServer(Server):
    """A KServe v2 server (HTTP and gRPC, as `hetero.serve.Server`) whose models run on a Ray
    cluster: `address` is "local", "auto" or the head's address; `imports` are modules every node
    imports first (custom kernels). Other arguments are `Server`'s."""

    def __init__(self, repository: str | Path, *, address: str | None = "auto", imports: Sequence[str] = (),
                 poll_s: float = 1.0, **options: Any):
        self.cluster = Cluster(address, imports=imports, poll_s=poll_s)
        try:
            super().__init__(repository, build_pool=self.cluster.deploy, **options)
        except BaseException:
            self.cluster.close()
            raise
        self.metrics.registry.register(ClusterMetrics(self.cluster, self.repository))

    def start(self) -> ClusterServer:
        try:
            super().start()
        except BaseException:
            self.cluster.close()
            raise
        return self

    def stop(self) -> None:
        """Stop as `Server.stop` does (queued requests answered), then leave the cluster."""
        super().stop()
        self.cluster.close()


class ClusterMetrics(Collector):
    """Per-replica and per-node figures, read at scrape time: requests served and failed, busy
    seconds and measured seconds per request of each replica (labelled with its node), requests
    queued per model, and busy seconds of every device of every node."""

    def __init__(self, cluster: Cluster, repository: Repository):
        self.cluster, self.repository = cluster, repository

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "node", "replica"]
        served = CounterMetricFamily("hetero_replica_requests", "Requests (or batches) each replica ran.",
                                     labels=labels)
        failed = CounterMetricFamily("hetero_replica_failures", "Requests that failed on each replica (then "
                                     "retried on another).", labels=labels)
        busy = CounterMetricFamily("hetero_replica_busy_seconds", "Seconds each replica spent on requests, "
                                   "round trip to its node included.", labels=labels)
        speed = GaugeMetricFamily("hetero_replica_seconds_per_request", "Measured seconds per request of "
                                  "the pool's reference size (what routing uses).", labels=labels)
        running = GaugeMetricFamily("hetero_replica_running", "Requests the replica runs or has waiting on "
                                    "its node now.", labels=labels)
        queued = GaugeMetricFamily("hetero_pool_queued", "Requests (or batches) waiting for a replica.",
                                   labels=["model", "version"])
        for model in self.repository.ready():
            queued.add_metric([model.name, model.version], model.pool.queued)
            for replica in model.pool.figures():
                if not replica["live"]:
                    continue
                values = [model.name, model.version, replica["node"], replica["replica"]]
                served.add_metric(values, replica["served"])
                failed.add_metric(values, replica["failed"])
                busy.add_metric(values, replica["busy_seconds"])
                speed.add_metric(values, replica["seconds_per_request"] or 0.0)
                running.add_metric(values, replica["running"])
        yield from (served, failed, busy, speed, running, queued)
        nodes = GaugeMetricFamily("hetero_node_up", "1 for each node serving, 0 for one draining or lost.",
                                  labels=["node", "address", "state"])
        for node in self.cluster.describe(devices=False):
            nodes.add_metric([node["node"], node["address"], node["state"]], float(node["state"] == "active"))
        yield nodes
        devices = CounterMetricFamily("hetero_node_device_busy_seconds", "Seconds each compute resource "
                                      "(device or CPU stream) of each node spent running partitions.",
                                      labels=["node", "resource"])
        for node, resources in sorted(self.cluster.busy().items()):
            for resource, seconds in sorted(resources.items()):
                devices.add_metric([node, resource], seconds)
        yield devices
