"""A Ray cluster as one pool of replicas: a `NodeWorker` on every node (or on every device group
of a node), every worker's replicas in one `ReplicaPool` at the front end.

The front end's pool routes each request to the replica that will finish it first (measured
time per request, round trip included, and what each is busy with), retries a failed request on
another replica, and feeds the server's dynamic batching, exactly as within one host. Ray places
the workers, carries the tensors and reports nodes that join, leave or die; a watcher thread
reconciles the pools with the cluster every `poll_s` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hetero.errors import HeteroError, ModelError, ReplicaLostError, RunError
from hetero.executors import Device, Executor
from hetero.graph import Model, load
from hetero.graph.load import ModelSource
from hetero.planner import Plan
from hetero.ray.node import Groups, NodeWorker, describe_node, device_groups, group_name
from hetero.runtime.replicas import Replica, ReplicaPool
from hetero.runtime.session import Feeds, check_feeds, resolve_outputs

log = logging.getLogger("hetero.ray")

ACTIVE, STARTING, DRAINING, LOST = "active", "starting", "draining", "lost"
UNUSED = "unused"  # a node with none of the configured device groups' devices
INLINE_BYTES = 16 << 20  # request tensors up to this size travel with the call, not via the object store
RETRY_S = 10.0  # a node whose worker died or could not start gets a new one after this
ReplicaSpec = Sequence[Sequence[str | Executor]]


@dataclass(frozen=True)
class NodeInfo:
    """A Ray node as Hetero sees it. `name` (the first 8 hex digits of Ray's node id) labels its
    replicas and metrics."""

    id: str
    address: str
    cores: int
    resources: Mapping[str, float]
    labels: Mapping[str, str]

    @property
    def name(self) -> str:
        return self.id[:8]


@dataclass(eq=False)
class _Worker:
    """A `NodeWorker` actor: a whole node's, or one device group's of it."""

    info: NodeInfo
    devices: tuple[str, ...] | None = None  # its device group; None: every device of the node
    cores: int = 0  # the host libraries' thread budget (0: every core of the node)
    actor: Any = None
    state: str = STARTING
    facts: dict[str, Any] = field(default_factory=dict)  # NodeWorker.describe()
    error: str = ""
    retry_at: float = 0.0  # when lost: when to start it again (time.monotonic)

    @property
    def group(self) -> str:
        return group_name(self.devices)

    @property
    def name(self) -> str:
        """NODE, or NODE/GROUP for a device group's worker: what replica names start with."""
        return f"{self.info.name}/{self.group}" if self.group else self.info.name


class RemoteReplica:
    """One replica compiled on a cluster node; `run` calls the `NodeWorker` holding it.

    A node or worker that died raises `ReplicaLostError` (the pool retries the request elsewhere
    and drops the replica); a call unanswered within `timeout_s` raises `RunError` (retried
    elsewhere, the replica kept). `worker.info` is its node.
    """

    def __init__(self, worker: _Worker, key: str, index: int, model: Model, plan: str, timeout_s: float):
        self.worker, self.key, self.index, self.model = worker, key, index, model
        self.plan_text = plan
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"<RemoteReplica {self.model.label!r} #{self.index} on {self.worker.name}>"

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run one request on the node (the node's Session checks the feeds, as the pool did)."""
        worker = self.worker
        where = f"model {self.model.label!r} on node {worker.name} ({worker.info.address})"
        if worker.state == LOST:  # another lane of this replica found the worker gone
            raise ReplicaLostError(f"{where}: the node or its worker is gone")
        try:
            ref = worker.actor.run.remote(self.key, self.index, dict(feeds), output_names)
            return ray.get(ref, timeout=self.timeout_s)
        except RayActorError as exc:
            if worker.state != DRAINING:
                worker.state, worker.retry_at = LOST, time.monotonic() + RETRY_S
            raise ReplicaLostError(f"{where}: the node or its worker is gone ({type(exc).__name__})") \
                from None
        except GetTimeoutError:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
            raise RunError(f"{where}: no answer within {self.timeout_s:g} s") from None
        except RayTaskError as exc:
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise RunError(f"{where}: {_reason(exc)}") from None
        except RayError as exc:
            raise RunError(f"{where}: {_reason(exc)}") from None

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        return check_feeds(self.model, feeds)

    def resolve_outputs(self, output_names: Sequence[str] | None) -> list[str]:
        return resolve_outputs(self.model, output_names)


@dataclass(frozen=True)
class _Spec:
    """How to build a model's replicas on a node; `replicas` may be a function of the node."""

    key: str
    model: Model
    blob: Any  # ray.ObjectRef of the serialized model
    replicas: ReplicaSpec | Callable[[NodeInfo], ReplicaSpec | None] | None
    cpu_streams: int | None
    policy: str
    samples: Any  # ray.ObjectRef of the feeds the measured policy places replicas on, or None

    def replicas_for(self, node: NodeInfo) -> ReplicaSpec | bool | None:
        """The node's replica spec (None: every device); False when the node is left out."""
        if not callable(self.replicas):
            return self.replicas
        return self.replicas(node) or False


class ClusterPool(ReplicaPool):
    """A ReplicaPool whose replicas run on the nodes of a Ray cluster (see `Cluster.deploy`).

    Replicas of nodes that join are added while it serves; those of nodes that die or drain are
    retired. `plans` gives each replica's plan as its node made it.
    """

    def __init__(self, cluster: Cluster, spec: _Spec, replicas: Sequence[RemoteReplica],
                 names: Sequence[str], max_in_flight: int | None):
        super().__init__(replicas, names=names, max_in_flight=max_in_flight)
        self.cluster, self.spec = cluster, spec
        self.owns_cluster = False  # `hetero.ray.deploy` made the cluster for this pool alone

    @property
    def plan(self) -> Plan:
        raise HeteroError(f"model {self.model.label!r}: its plans were made on the cluster's nodes; "
                          "see ClusterPool.plans")

    @property
    def plans(self) -> dict[str, str]:
        """Each live replica's plan, as text."""
        return {r.name: r.session.plan_text for r in self.replicas if r.live}

    def on_node(self, node_id: str) -> list[Replica]:
        """The pool's entries (a replica's lanes) on a node, of every device group there."""
        return [r for r in self.replicas if r.session.worker.info.id == node_id]

    def figures(self) -> list[dict[str, Any]]:
        """Per replica, its lanes together: node and device group, requests served and failed, busy
        seconds, and while live the measured seconds per request (the lanes' rates added) and
        requests running."""
        grouped: dict[str, list[Replica]] = {}
        for lane in self.replicas:
            grouped.setdefault(lane.name, []).append(lane)
        figures = []
        for name, lanes in grouped.items():
            live = [lane for lane in lanes if lane.live]
            speeds = [lane.seconds_per_request for lane in live]
            figures.append({
                "replica": name, "node": lanes[0].session.worker.info.name,
                "group": lanes[0].session.worker.group, "live": bool(live),
                "served": sum(lane.served for lane in lanes), "failed": sum(lane.failed for lane in lanes),
                "busy_seconds": sum(lane.busy_seconds for lane in lanes),
                "seconds_per_request": 1 / sum(1 / s for s in speeds) if speeds and all(speeds) else None,
                "running": sum(lane.running_since is not None for lane in live)})
        return figures

    def join(self, built: Sequence[tuple[RemoteReplica, str]]) -> list[str]:
        """Replicas of workers that started while the pool serves join it, each measured first
        (`add`); one that fails that (its worker died meanwhile, its card fails) stays out and the
        others join. The errors of those left out; `HeteroError` when the pool closed meanwhile."""
        errors, failed = [], set()
        for remote, name in built:
            if remote in failed:  # another lane of a replica that failed
                continue
            try:
                self.add(remote, name)
            except Exception as exc:
                if self._closing:
                    raise HeteroError(f"model {self.model.label!r}: the replica pool is closed") from exc
                failed.add(remote)
                errors.append(f"{name}: {_reason(exc)}")
        return errors

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Finish the queued requests (as `ReplicaPool.close`), then free the replicas on every node."""
        try:
            super().close(wait, timeout)
        finally:
            self.cluster._forget(self)
            if self.owns_cluster:
                self.cluster.close()


class Cluster:
    """Hetero on a Ray cluster: `NodeWorker`s on every alive node and the pools deployed on them.

    `address`: "local" starts a single-node Ray here (for trying it), "auto" or an address joins
    a running cluster (`ray start --head` on one server, `ray start --address=HEAD:6379` on the
    others); None uses the Ray this process already connected to. `groups` splits each node into
    workers: None (or "node") one per node, "device" one per accelerator device and one for the
    host, or groups of device names, "cuda:0,cuda:1;cpu" or [["cuda:0", "cuda:1"], ["cpu"]]
    ("cpu": the host libraries; see `hetero.ray.node`). `imports` are modules every worker
    imports first (custom kernels). `call_timeout_s` bounds one request's round trip.
    Each replica joins the pool as `lanes` entries, so while it runs one request the next is
    already on its way (the round trip hidden; measured per lane, their speeds add up to the
    replica's). Nodes that join are used within `poll_s` seconds; `close` (or `with`) stops.
    `HeteroError` for malformed groups (see `_groups`) or when no node has a worker.
    """

    def __init__(self, address: str | None = "auto", *, groups: Groups = None,
                 imports: Sequence[str] = (), poll_s: float = 1.0, lanes: int = 2,
                 call_timeout_s: float = 120.0, start_timeout_s: float = 120.0,
                 load_timeout_s: float = 900.0, drain_timeout_s: float = 60.0):
        self.groups = _groups(groups)
        self._holds_ray = _connect(address)
        self.imports = tuple(imports)
        self.poll_s, self.lanes, self.call_timeout_s = poll_s, lanes, call_timeout_s
        self.start_timeout_s, self.load_timeout_s, self.drain_timeout_s = (start_timeout_s, load_timeout_s,
                                                                           drain_timeout_s)
        self._workers: dict[tuple[str, str], _Worker] = {}  # by node id and group
        self._pools: list[ClusterPool] = []
        self._lock = threading.Lock()  # guards the two collections above and worker states
        self._changing = threading.Lock()  # one deploy or worker start at a time
        self._stop = threading.Event()
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise
        if not self.nodes():
            self.close()
            raise HeteroError("no node of the Ray cluster runs a Hetero worker: "
                              f"{'; '.join(w.error for w in self._workers.values()) or 'no alive node'}")
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="hetero-ray-watcher")
        self._watcher.start()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nodes(self, state: str = ACTIVE) -> list[NodeInfo]:
        """Nodes with a worker in `state` (active: serving)."""
        with self._lock:
            found = {w.info.id: w.info for w in self._workers.values() if w.state == state}
        return list(found.values())

    def describe(self, devices: bool = True, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Every worker known, one entry each (`node`, and `group`: '' for a whole node's): its
        state, facts (with `devices`, its devices and executors: the first time, every library is
        imported there) or error, and the replicas each pool has on it with their requests served
        and seconds per request."""
        with self._lock:
            workers, pools = list(self._workers.values()), list(self._pools)
        unknown = [w for w in workers if w.state in (ACTIVE, DRAINING) and "executors" not in w.facts] \
            if devices else []
        for worker, facts in _gather([(w, w.actor.describe.remote()) for w in unknown], timeout_s):
            if not isinstance(facts, Exception):
                worker.facts = facts
        return [{"node": w.info.name, "group": w.group, "id": w.info.id, "address": w.info.address,
                 "state": w.state, "error": w.error, **w.facts,
                 "replicas": [{"model": p.model.label, **figures} for p in pools for figures in p.figures()
                              if (figures["node"], figures["group"]) == (w.info.name, w.group)]}
                for w in workers]

    def busy(self, timeout_s: float = 2.0) -> dict[tuple[str, str], dict[str, float]]:
        """Busy seconds per compute resource of each active worker ((node name, group) -> resource
        -> s); workers that do not answer within `timeout_s` are left out."""
        with self._lock:
            workers = [w for w in self._workers.values() if w.state in (ACTIVE, DRAINING)]
        return {(worker.info.name, worker.group): busy for worker, busy in
                _gather([(w, w.actor.busy.remote()) for w in workers], timeout_s)
                if not isinstance(busy, Exception)}

    def deploy(self, model: ModelSource, replicas: ReplicaSpec | Callable[[NodeInfo], ReplicaSpec | None]
               | None = None, *, cpu_streams: int | None = None, policy: str = "priority",
               samples: Sequence[Feeds] | None = None, feeds: Feeds | None = None, warmup: bool = True,
               max_in_flight: int | None = None) -> ClusterPool:
        """Compile `model` on every active worker and pool all their replicas; a warmed-up pool.

        `replicas`, `cpu_streams` and `policy` are `ReplicaPool.build`'s, applied by each worker
        to its own devices (default: every device of its node or group, one CPU stream per core
        it has); `replicas` may also be a function of the `NodeInfo` (None: leave that node out).
        With `samples` (feeds dicts), each worker places its replicas by the measured `policy` on
        them, as `hetero.runtime.replanning.serving_pool` does in-host (without, measured
        policies place by estimates). `feeds` are what the replicas are timed with (needed for
        symbolic input dims; without `warmup` they are timed by the requests they serve, as
        `ReplicaPool.build`'s). A worker that cannot build its replicas, and a replica that fails
        its warm-up, is left out (logged); `ModelError` if none is left, `InputError` for `feeds`
        that do not fit the model.
        """
        loaded = load(model)
        if feeds is not None:
            feeds = check_feeds(loaded, feeds)
        blob = ray.put(loaded.proto.SerializeToString())
        spec = _Spec(f"{loaded.label}#{uuid.uuid4().hex[:8]}", loaded, blob, replicas, cpu_streams, policy,
                     ray.put(list(samples)) if samples else None)
        with self._changing:
            with self._lock:
                workers = [w for w in self._workers.values() if w.state == ACTIVE]
            built, errors = self._build(spec, workers)
            if not built:
                self._unload(spec, workers)
                raise ModelError(f"model {loaded.label!r}: no node of the cluster could load it: "
                                 f"{'; '.join(errors) or 'no replica on the devices of any node or group'}")
            pool = ClusterPool(self, spec, [r for r, _ in built], [name for _, name in built],
                               max_in_flight or 1024)
            try:
                if warmup:
                    pool.warm_up(feeds, left_out=errors)
            except Exception as exc:
                pool.close(wait=False)
                raise ModelError(f"model {loaded.label!r}: no node of the cluster could run it: "
                                 f"{'; '.join(errors)}") from exc
            except BaseException:
                pool.close(wait=False)
                raise
            with self._lock:
                self._pools.append(pool)
        log.info("deployed", extra={"fields": {"model": loaded.label, "replicas": sorted(pool.plans),
                                               "left_out": errors}})
        _left_out(loaded, errors)
        return pool

    def drain(self, node_id: str) -> None:
        """Stop sending requests to a node, wait (at most `drain_timeout_s`) for those it runs,
        then stop its workers. The node stays out until it leaves Ray and joins again."""
        with self._lock:
            workers = [w for w in self._workers.values()
                       if w.info.id == node_id and w.state not in (DRAINING, LOST, UNUSED)]
            for worker in workers:
                worker.state = DRAINING
            replicas = [(p, r) for p in self._pools for r in p.on_node(node_id)] if workers else []
        if not workers:
            return
        for pool, replica in replicas:
            pool.retire(replica)
        deadline = time.monotonic() + self.drain_timeout_s
        for pool, replica in replicas:
            pool.wait_idle(replica, max(0.0, deadline - time.monotonic()))
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor)
        log.info("node drained", extra={"fields": {"node": workers[0].info.name}})

    def refresh(self) -> None:
        """Reconcile with Ray's view now: drop dead nodes' replicas, drain those Ray drains, start
        workers on new nodes (and again where a worker died, leaving the node's other groups be)
        and add their replicas to every pool."""
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        draining = self._draining() & set(alive)
        now = time.monotonic()
        with self._lock:
            for worker in self._workers.values():
                if worker.info.id not in alive and worker.state != LOST:
                    worker.state, worker.retry_at = LOST, now
            lost = {w for w in self._workers.values() if w.state == LOST}
            retire = [(p, r) for p in self._pools for r in p.replicas if r.live and r.session.worker in lost]
            again = [w for w in lost
                     if w.info.id in alive and w.info.id not in draining and now >= w.retry_at]
            unsplit = [w for w in again if self.groups is not None and w.devices is None]  # listing failed
            for worker in unsplit:
                del self._workers[(worker.info.id, worker.group)]
            known = {w.info.id for w in self._workers.values()}
            fresh = [_node_info(node) for node_id, node in alive.items()
                     if node_id not in draining and node_id not in known]
        for pool, replica in retire:
            pool.retire(replica)
        for node_id in draining:
            self.drain(node_id)
        if fresh:
            self._join(fresh)
        restart = [_Worker(w.info, w.devices, w.cores) for w in again if w not in unsplit]
        if restart:
            self._start(restart)

    def close(self) -> None:
        """Stop watching, close the pools (finishing their queued requests), stop the workers,
        and disconnect from Ray if Hetero connected and no other `Cluster` uses the connection."""
        self._stop.set()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.join()
        with self._lock:
            pools, workers = list(self._pools), list(self._workers.values())
        for pool in pools:
            pool.close()
        for worker in workers:
            if worker.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(worker.actor)
        if self._holds_ray:
            self._holds_ray = False
            _disconnect()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the cluster answered badly this time; the next poll tries again
                log.exception("cluster refresh failed")

    def _join(self, infos: Sequence[NodeInfo]) -> None:
        """Start the workers of nodes new to Hetero: one per node, or one per device group (which
        a short task on each node lists first: only the node knows its devices)."""
        if self.groups is None:
            split: list[tuple[NodeInfo, Any]] = [(info, [(None, info.cores)]) for info in infos]
        else:
            task = ray.remote(device_groups)
            split = _gather([(info, task.options(num_cpus=0, scheduling_strategy=_on(info)).remote(
                self.groups, info.cores)) for info in infos], self.start_timeout_s)
        workers, others = [], []
        for info, groups in split:
            if isinstance(groups, Exception):
                others.append(_Worker(info, state=LOST, retry_at=time.monotonic() + RETRY_S, error=(
                    f"node {info.name} ({info.address}): its devices could not be listed: "
                    f"{_reason(groups)}")))
            elif not groups:
                others.append(_Worker(info, state=UNUSED, error=(
                    f"node {info.name} ({info.address}) has no device of the groups "
                    f"'{_described(self.groups)}'")))
            else:
                workers += [_Worker(info, devices, cores) for devices, cores in groups]
        with self._lock:
            for worker in others:
                self._workers[(worker.info.id, worker.group)] = worker
        for worker in others:
            log.error("node left out: %s", worker.error, extra={"fields": {"node": worker.info.name}})
        self._start(workers)

    def _start(self, workers: Sequence[_Worker]) -> None:
        """Start each worker's actor (replacing the record of one that died); once it answers,
        build every pool's replicas there."""
        options = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": 0}
        for worker in workers:
            # Ray runs its workers at niceness 15, to yield to its own daemons; a node's inference
            # server must not yield to every other process there, so it runs at 0, as Ray's job
            # drivers do. BLAS threads follow the worker's thread budget.
            environment = {"RAY_worker_niceness": "0", "OMP_NUM_THREADS": str(max(1, worker.cores))}
            worker.actor = ray.remote(NodeWorker).options(
                scheduling_strategy=_on(worker.info), runtime_env={"env_vars": environment}, **options,
            ).remote(worker.cores, self.imports, worker.devices)
        with self._lock:
            for worker in workers:
                self._workers[(worker.info.id, worker.group)] = worker
        for worker, facts in _gather([(w, w.actor.ping.remote()) for w in workers], self.start_timeout_s):
            if isinstance(facts, Exception):
                worker.state, worker.retry_at = LOST, time.monotonic() + RETRY_S
                worker.error = (f"node {worker.name} ({worker.info.address}): worker did not start: "
                                f"{_reason(facts)}")
                log.error("node left out: %s", worker.error, extra={"fields": {"node": worker.name}})
                with contextlib.suppress(Exception):
                    ray.kill(worker.actor)
            else:
                worker.facts = facts
        started = [w for w in workers if w.state != LOST]
        if not started:
            return
        with self._changing:
            with self._lock:
                pools = list(self._pools)
            for pool in pools:
                built, errors = self._build(pool.spec, started)
                try:
                    errors += pool.join(built)
                except HeteroError:  # the pool closed meanwhile: free what was built for it
                    self._unload(pool.spec, started)
                _left_out(pool.model, errors)
            with self._lock:
                for worker in started:
                    worker.state = DRAINING if worker.state == DRAINING else ACTIVE
        for worker in started:
            log.info("node joined", extra={"fields": {"node": worker.name, "address": worker.info.address}})

    def _build(self, spec: _Spec, workers: Sequence[_Worker]) -> tuple[list[tuple[RemoteReplica, str]],
                                                                      list[str]]:
        """Compile the spec's replicas on each worker at once; the replicas built and one error
        per worker that could not build them."""
        chosen = [(w, spec.replicas_for(w.info)) for w in workers]
        calls = [(w, w.actor.load.remote(spec.key, spec.blob, replicas, spec.cpu_streams, spec.policy,
                                         spec.samples))
                 for w, replicas in chosen if replicas is not False]
        built, errors = [], []
        for worker, loaded in _gather(calls, self.load_timeout_s):
            if isinstance(loaded, Exception):
                errors.append(f"node {worker.name} ({worker.info.address}): {_reason(loaded)}")
                continue
            for index, (name, plan) in enumerate(loaded):
                remote = RemoteReplica(worker, spec.key, index, spec.model, plan, self.call_timeout_s)
                built += [(remote, f"{worker.name}/{name}")] * self.lanes
        return built, errors

    def _forget(self, pool: ClusterPool) -> None:
        with self._lock:
            if pool in self._pools:
                self._pools.remove(pool)
            workers = [w for w in self._workers.values() if w.actor is not None and w.state != LOST]
        self._unload(pool.spec, workers)

    def _unload(self, spec: _Spec, workers: Sequence[_Worker]) -> None:
        _gather([(w, w.actor.unload.remote(spec.key)) for w in workers], self.call_timeout_s)

    def _draining(self) -> set[str]:
        """Nodes Ray is draining (`ray drain-node`, or the autoscaler taking them away)."""
        try:
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
        except Exception:  # an older Ray, or the GCS busy: drains are then seen as deaths
            return set()
        return {n.node_id for n in status.active_nodes + status.idle_nodes if n.node_status == "DRAINING"}


def _groups(groups: Groups) -> str | tuple[tuple[str, ...], ...] | None:
    """`Cluster`'s `groups` checked: None (a worker per node), "device", or device-name groups.
    `HeteroError` for no group, a group naming no device, a device named twice, or a name that is
    not a device's ('cpu', 'cuda:0': as `hetero devices` names them)."""
    if isinstance(groups, str):
        groups = groups.strip()
    if groups in (None, "node", "device"):
        return None if groups == "node" else groups
    split = [group.split(",") for group in groups.split(";")] if isinstance(groups, str) else groups
    loose = [group for group in split if isinstance(group, str)]
    if loose:
        raise HeteroError(f"device groups {groups!r}: each group is a list of device names, got "
                          f"{loose[0]!r}; write them as [['cuda:0', 'cuda:1'], ['cpu']] or "
                          "'cuda:0,cuda:1;cpu'")
    chosen = tuple(tuple(d.strip() for d in group if d.strip()) for group in split)
    named = [device for group in chosen for device in group]
    twice = sorted({device for device in named if named.count(device) > 1})
    unknown = [device for device in named if not _is_device(device)]
    problem = ("no group" if not named else "a group names no device" if not all(chosen) else
               f"{', '.join(twice)} named twice" if twice else
               f"{unknown[0]!r} is not a device name ('cpu', 'cuda:0', 'opencl:1')" if unknown else "")
    if problem:
        raise HeteroError(f"device groups {groups!r}: {problem}; write them as 'cuda:0,cuda:1;cpu' (';' "
                          "between groups, 'cpu' for the host libraries), or 'node' or 'device'")
    return chosen


def _is_device(name: str) -> bool:
    try:
        return str(Device.parse(name)) == name
    except ValueError:
        return False


def _described(groups: str | tuple[tuple[str, ...], ...] | None) -> str:
    """Groups as `--ray-groups` writes them."""
    return groups if isinstance(groups, str) else ";".join(",".join(group) for group in groups or ())


_connection = threading.Lock()
_holders = 0  # Clusters and probes using the Ray connection Hetero made (0: none, or the caller's)


def _connect(address: str | None) -> bool:
    """Connect this process to Ray unless it is; True when the connection is Hetero's, held until
    `_disconnect`: the last holder disconnects, so closing one `Cluster` leaves the others theirs."""
    global _holders
    with _connection:
        if ray.is_initialized():
            if not _holders:  # the caller's connection: theirs to close
                return False
            _holders += 1
            return True
        # Ray puts call arguments over 100 KiB in its object store (a copy and a fetch: ~3 ms for
        # a 600 KB image here); the caller's setting decides, so the front end raises it.
        os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
        ray.init(address=address or "auto", logging_level=logging.WARNING,
                 **({"include_dashboard": False} if address == "local" else {}))
        _holders = 1
        return True


def _disconnect() -> None:
    global _holders
    with _connection:
        _holders -= 1
        if not _holders:
            ray.shutdown()


def _left_out(model: Model, errors: Sequence[str]) -> None:
    for error in errors:
        log.error("model %r left out on %s", model.label, error, extra={"fields": {"model": model.label}})


def _on(node: NodeInfo) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node.id, soft=False)


def _node_info(node: Mapping[str, Any]) -> NodeInfo:
    resources = dict(node.get("Resources") or {})
    return NodeInfo(node["NodeID"], node.get("NodeManagerAddress", ""), int(resources.get("CPU", 0)),
                    resources, dict(node.get("Labels") or {}))


def _gather(calls: Sequence[tuple[Any, Any]], timeout_s: float) -> list[tuple[Any, Any]]:
    """(key, ObjectRef) pairs -> (key, value, or the exception it raised or a TimeoutError),
    waiting at most `timeout_s` in all."""
    if not calls:
        return []
    refs = [ref for _, ref in calls]
    ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0])
    results = []
    for key, ref in calls:
        try:
            if ref not in ready:
                raise TimeoutError(f"no answer within {timeout_s:g} s")
            results.append((key, ray.get(ref, timeout=0)))
        except Exception as exc:
            results.append((key, exc))
    return results


def _reason(exc: BaseException) -> str:
    """A remote failure's own message, without Ray's wrapping."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def probe(address: str | None = "auto", timeout_s: float = 120.0, *, groups: Groups = None
          ) -> list[dict[str, Any]]:
    """Every alive node of a Ray cluster with its devices and executors (`hetero cluster`), found
    by a short task on each node; a node where that fails shows its error. With `groups` (as
    `Cluster` takes them), each node also lists the workers they would make there and each
    executor its group (see `describe_node`)."""
    groups = _groups(groups)
    holds = _connect(address)
    try:
        infos = [_node_info(n) for n in ray.nodes() if n["Alive"]]
        task = ray.remote(describe_node)
        calls = [(info, task.options(num_cpus=0, scheduling_strategy=_on(info)).remote(info.cores, groups))
                 for info in infos]
        found = []
        for info, facts in _gather(calls, timeout_s):
            labels = {k: v for k, v in info.labels.items() if not k.startswith("ray.io/")}
            entry = {"node": info.name, "id": info.id, "address": info.address, "labels": labels}
            found.append({**entry, **({"error": _reason(facts)} if isinstance(facts, Exception) else facts)})
        return found
    finally:
        if holds:
            _disconnect()


def deploy(model: ModelSource, address: str | None = "auto", *, groups: Groups = None,
           imports: Sequence[str] = (), **options: Any) -> ClusterPool:
    """`Cluster(address, groups=groups, imports=imports).deploy(model, **options)`: a pool on a
    cluster of its own, which closing the pool closes too."""
    cluster = Cluster(address, groups=groups, imports=imports)
    try:
        pool = cluster.deploy(model, **options)
    except BaseException:
        cluster.close()
        raise
    pool.owns_cluster = True
    return pool
