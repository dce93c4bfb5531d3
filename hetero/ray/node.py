"""What runs on each node of a Ray cluster: one `NodeWorker` actor, holding every deployed model's
replicas compiled for that node's own devices and libraries.

One process per node (not one per model or per replica) because partitions on one device take
turns through that process's resource locks: two processes would run two libraries on the same
cores or card at once. The front end sends each request to the replica it chose; the worker only
runs it.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Sequence
from typing import Any

from hetero.executors import default_threads
from hetero.graph import load
from hetero.inventory import devices
from hetero.runtime.replicas import replica_sessions
from hetero.runtime.session import Session
from hetero.runtime.workers import busy_snapshot


def describe_node(cores: int = 0) -> dict[str, Any]:
    """This node as plain data: host name, cores Hetero uses, every device and executor, and the
    libraries that are missing or found no device (with why)."""
    inventory = devices()
    cores = min(cores, default_threads()) if cores else default_threads()
    return {
        "hostname": socket.gethostname(),
        "cores": cores,
        "executors": [{"device": entry.device, "description": entry.description, "executor": info.name,
                       "library": info.library, "version": info.version, "threads": min(info.threads, cores),
                       "precision": info.precision}
                      for entry in inventory.devices for info in entry.executors],
        "missing": {lib.library: lib.error for lib in inventory.libraries if not lib.executors},
    }


class NodeWorker:
    """Replicas of the deployed models on this node; made a Ray actor by `hetero.ray.Cluster`.

    `cores`: the node's CPU count as Ray knows it (`ray start --num-cpus`), the thread budget of
    the host libraries here. `imports`: modules to import first (ones registering custom kernels).
    """

    def __init__(self, cores: int, imports: Sequence[str] = ()):
        self.cores = min(cores, default_threads()) if cores else default_threads()
        for module in imports:
            importlib.import_module(module)
        self._models: dict[str, list[Session]] = {}

    def ping(self) -> dict[str, Any]:
        """Cheap proof of life; `describe` finds the devices, which imports every library."""
        return {"hostname": socket.gethostname(), "cores": self.cores, "pid": os.getpid()}

    def describe(self) -> dict[str, Any]:
        return {**describe_node(self.cores), "pid": os.getpid()}

    def load(self, key: str, model: bytes, replicas: Sequence[Sequence[Any]] | None,
             cpu_streams: int | None, policy: str) -> list[tuple[str, str]]:
        """Compile a model's replicas here (as `ReplicaPool.build` would); (name, plan) of each."""
        named = replica_sessions(load(model, name=key.rpartition("#")[0]), replicas,
                                 cpu_streams=cpu_streams, policy=policy, cores=self.cores)
        self._models[key] = [session for _, session in named]
        return [(name, str(session.plan)) for name, session in named]

    def run(self, key: str, index: int, feeds: dict[str, Any], wanted: list[str] | None) -> dict[str, Any]:
        return self._models[key][index].run(feeds, wanted)

    def unload(self, key: str) -> None:
        for session in self._models.pop(key, []):
            session.close()

    def busy(self) -> dict[str, float]:
        """Seconds each compute resource here (device or CPU stream) has spent running partitions."""
        return busy_snapshot()
