"""Hetero on a Ray cluster: one service across many servers, each with its own mix of devices.

A `NodeWorker` actor on every node (or on every device group of a node: `groups="device"`)
compiles each model for its devices and libraries; the front end pools every worker's replicas in
one `ReplicaPool`, so requests go to the replica that will finish them first, failures are
retried on other nodes, and the server's dynamic batching works across the cluster as within
one host.

    import hetero.ray
    pool = hetero.ray.deploy("model.onnx", address="auto")    # or "local", "HEAD:6379"
    outputs = pool.run({"input": x})

    with hetero.ray.Cluster("auto", groups="device") as cluster:   # several models, a worker per card
        detector = cluster.deploy("detector.onnx")

`hetero serve REPO --ray ADDRESS` serves a model repository this way (`ClusterServer`);
`hetero cluster` lists every node, device and executor. Needs the `ray` extra.
"""

try:
    import ray  # noqa: F401
except ImportError as exc:
    raise ImportError(f"hetero.ray needs Ray: pip install 'hetero[ray]' ({exc.name} missing)") from exc

from hetero.ray.cluster import Cluster, ClusterPool, NodeInfo, RemoteReplica, deploy, probe
from hetero.ray.node import NodeWorker

__all__ = ["Cluster", "ClusterPool", "NodeInfo", "NodeWorker", "RemoteReplica", "deploy", "probe"]
