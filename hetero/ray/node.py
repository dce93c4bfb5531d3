"""What runs on each node of a Ray cluster: `NodeWorker` actors, each holding every deployed model's
replicas compiled for its share of that node's devices and libraries.

By default one worker per node (not one per model or per replica), because partitions on one
device take turns through that process's resource locks: two processes would run two libraries
on the same cores or card at once. A node may instead be split into device groups, one worker
each (`device_groups`): each card then has a process of its own (a crash, a driver reset or a
library's global lock stays with it), and no device is in two groups. The host's cores are the
one resource groups share, as the fallback for what a card cannot run, so they are split too: a
group without the host uses the host libraries on one thread, and the host's group gets the
node's cores less one per such group. The front end sends each request to the replica it chose;
the worker only runs it.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Collection, Sequence
from typing import Any

from hetero import executors as executor_registry
from hetero.executors import default_threads, is_accelerator
from hetero.graph import load
from hetero.inventory import devices
from hetero.runtime.replanning import measured_replicas
from hetero.runtime.replicas import HOST, replica_sessions
from hetero.runtime.session import Feeds, Session
from hetero.runtime.workers import busy_snapshot

#: How a node's devices split into workers: None (one worker for the whole node), "device" (one
#: per accelerator device, and one for the host), or groups of device names ("cpu": the host).
Groups = str | Sequence[Sequence[str]] | None


def _cores(cores: int) -> int:
    return min(cores, default_threads()) if cores else default_threads()


def describe_node(cores: int = 0, groups: Groups = None, devices_of: Collection[str] | None = None,
                  ) -> dict[str, Any]:
    """This node as plain data: host name, cores Hetero uses, every device and executor, and the
    libraries that are missing or found no device (with why). With `groups`, the workers they
    make here (`device_groups`; none when no group has a device here) and each executor's group
    ('' where none has its device). `devices_of` keeps the executors of those devices and the
    host libraries (every worker's fallback), as one worker sees them."""
    inventory, accelerators = devices(), _accelerators()
    cores = _cores(cores)
    split = device_groups(groups, cores) if groups is not None else None
    executors = []
    for entry in inventory.devices:
        where = entry.device if entry.device in accelerators else HOST
        if devices_of is not None and where not in (*devices_of, HOST):
            continue
        group = {} if split is None else {"group": next((group_name(g) for g, _ in split if where in g), "")}
        executors += [{"device": entry.device, "description": entry.description, "executor": info.name,
                       "library": info.library, "version": info.version, "threads": min(info.threads, cores),
                       "precision": info.precision, **group} for info in entry.executors]
    found = {"hostname": socket.gethostname(), "cores": cores, "executors": executors,
             "missing": {lib.library: lib.error for lib in inventory.libraries if not lib.executors}}
    if split is not None:
        found["groups"] = [{"group": group_name(g), "devices": list(g), "threads": threads}
                           for g, threads in split]
    return found


def device_groups(groups: Groups, cores: int = 0) -> list[tuple[tuple[str, ...], int]]:
    """This node's workers when split by `groups`: each one's devices and host thread budget.

    "device": one group per accelerator device, then the host ("cpu"). Explicit groups (lists of
    device names, "cpu" the host libraries) keep the devices this node has; a group with none of
    them is left out, as is a device no group names. A group without the host uses the host
    libraries on one thread; the host's group gets the node's `cores` (0: all of this host's)
    less one per such group, at least one.
    """
    accelerators = _accelerators()
    if groups == "device":
        chosen = [(device,) for device in accelerators] + [(HOST,)]
    else:
        present = {*accelerators, HOST}
        chosen = [kept for group in groups or () if (kept := tuple(d for d in group if d in present))]
    without_host = sum(HOST not in group for group in chosen)
    return [(group, max(1, _cores(cores) - without_host) if HOST in group else 1) for group in chosen]


def _accelerators() -> list[str]:
    """This node's accelerator devices, in the registry's order."""
    return list(dict.fromkeys(str(e.device) for e in executor_registry.available() if is_accelerator(e)))


def group_name(devices: Sequence[str] | None) -> str:
    """A group's name in replica names and metrics: its devices joined by '+' ('' for a whole node)."""
    return "+".join(devices or ())


class NodeWorker:
    """Replicas of the deployed models on this node; made a Ray actor by `hetero.ray.Cluster`.

    `cores`: the thread budget of the host libraries here (the node's CPU count as Ray knows it,
    `ray start --num-cpus`, or a group's share of it). `imports`: modules to import first (ones
    registering custom kernels). `devices`: this worker's device group (see `device_groups`;
    None: every device of the node); it compiles replicas only on those.
    """

    def __init__(self, cores: int, imports: Sequence[str] = (), devices: Sequence[str] | None = None):
        self.cores = _cores(cores)
        self.devices = None if devices is None else tuple(devices)
        for module in imports:
            importlib.import_module(module)
        self._models: dict[str, list[Session]] = {}

    def ping(self) -> dict[str, Any]:
        """Cheap proof of life; `describe` finds the devices, which imports every library."""
        return {"hostname": socket.gethostname(), "cores": self.cores, "pid": os.getpid(),
                "group": group_name(self.devices)}

    def describe(self) -> dict[str, Any]:
        """`describe_node` as this worker sees the node: its own devices' executors and the host's."""
        return {**describe_node(self.cores, devices_of=self.devices), "pid": os.getpid(),
                "group": group_name(self.devices)}

    def load(self, key: str, model: bytes, replicas: Sequence[Sequence[Any]] | None, cpu_streams: int | None,
             policy: str, samples: list[Feeds] | None = None) -> list[tuple[str, str]]:
        """Compile a model's replicas on this worker's devices (as `ReplicaPool.build` would); with
        `samples`, each placed by the measured `policy` on them. (name, plan) of each; none when
        no replica belongs to this worker's devices."""
        named = replica_sessions(load(model, name=key.rpartition("#")[0]), replicas, cpu_streams=cpu_streams,
                                 policy=policy, cores=self.cores, devices=self.devices,
                                 compile_replica=measured_replicas(policy, samples) if samples else None)
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
