"""`hetero serve REPO --ray ADDRESS`: the same server, repository and config, with every model's
replicas on the nodes of a Ray cluster, and `/metrics` per node, device group and replica."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hetero.ray.cluster import Cluster
from hetero.ray.node import Groups
from hetero.runtime.replanning import Replanning, serving_pool
from hetero.serve import Server
from hetero.serve.repository import Repository


class ClusterServer(Server):
    """A KServe v2 server (HTTP and gRPC, as `hetero.serve.Server`) whose models run on a Ray
    cluster: `address` is "local", "auto" or the head's address; `groups` how each node splits
    into workers (`Cluster`'s); `imports` are modules every node imports first (custom kernels).
    Measured policies measure on the nodes as in-host (`serving_pool`: models with unknown dims
    are planned on their first request). Other arguments are `Server`'s."""

    def __init__(self, repository: str | Path, *, address: str | None = "auto", groups: Groups = None,
                 imports: Sequence[str] = (), poll_s: float = 1.0, **options: Any):
        self.cluster = Cluster(address, groups=groups, imports=imports, poll_s=poll_s)
        try:
            build_pool = functools.partial(serving_pool, build=self.cluster.deploy)
            super().__init__(repository, build_pool=build_pool, **options)
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
    seconds and measured seconds per request of each replica (labelled with its node and device
    group: '' for a whole node's worker), requests queued per model, and busy seconds of every
    device of every worker."""

    def __init__(self, cluster: Cluster, repository: Repository):
        self.cluster, self.repository = cluster, repository

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "node", "group", "replica"]
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
            pool = model.pool.runner if isinstance(model.pool, Replanning) else model.pool
            queued.add_metric([model.name, model.version], pool.queued)
            for replica in pool.figures():
                if not replica["live"]:
                    continue
                values = [model.name, model.version, replica["node"], replica["group"], replica["replica"]]
                served.add_metric(values, replica["served"])
                failed.add_metric(values, replica["failed"])
                busy.add_metric(values, replica["busy_seconds"])
                speed.add_metric(values, replica["seconds_per_request"] or 0.0)
                running.add_metric(values, replica["running"])
        yield from (served, failed, busy, speed, running, queued)
        nodes = GaugeMetricFamily("hetero_node_up", "1 for each node (or device group's worker) serving, 0 "
                                  "for one draining or lost.", labels=["node", "group", "address", "state"])
        for node in self.cluster.describe(devices=False):
            nodes.add_metric([node["node"], node["group"], node["address"], node["state"]],
                             float(node["state"] == "active"))
        yield nodes
        devices = CounterMetricFamily("hetero_node_device_busy_seconds", "Seconds each compute resource "
                                      "(device or CPU stream) of each node's workers spent running "
                                      "partitions.", labels=["node", "group", "resource"])
        for (node, group), resources in sorted(self.cluster.busy().items()):
            for resource, seconds in sorted(resources.items()):
                devices.add_metric([node, group, resource], seconds)
        yield devices
