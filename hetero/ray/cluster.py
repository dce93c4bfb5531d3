"""A Ray cluster as one pool of replicas: a `NodeWorker` on every node, every node's replicas in
one `ReplicaPool` at the front end.

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
from hetero.executors import Executor
from hetero.graph import Model, load
from hetero.graph.load import ModelSource
from hetero.planner import Plan
from hetero.ray.node import NodeWorker, describe_node
from hetero.runtime.replicas import Replica, ReplicaPool
from hetero.runtime.session import Feeds, check_feeds, resolve_outputs

log = logging.getLogger("hetero.ray")

ACTIVE, STARTING, DRAINING, LOST = "active", "starting", "draining", "lost"
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
class _Node:
    info: NodeInfo
    worker: Any = None  # the NodeWorker actor handle
    state: str = STARTING
    facts: dict[str, Any] = field(default_factory=dict)  # NodeWorker.describe()
    error: str = ""
    retry_at: float = 0.0  # when lost: when to start a worker there again (time.monotonic)


class RemoteReplica:
    """One replica compiled on a cluster node; `run` calls that node's `NodeWorker`.

    A node or worker that died raises `ReplicaLostError` (the pool retries the request elsewhere
    and drops the replica); a call unanswered within `timeout_s` raises `RunError` (retried
    elsewhere, the replica kept).
    """

    def __init__(self, node: _Node, key: str, index: int, model: Model, plan: str, timeout_s: float):
        self.node, self.key, self.index, self.model = node, key, index, model
        self.plan_text = plan
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"<RemoteReplica {self.model.label!r} #{self.index} on node {self.node.info.name}>"

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Run one request on the node (the node's Session checks the feeds, as the pool did)."""
        where = f"model {self.model.label!r} on node {self.node.info.name} ({self.node.info.address})"
        if self.node.state == LOST:  # another lane of this replica found the node gone
            raise ReplicaLostError(f"{where}: the node or its worker is gone")
        try:
            ref = self.node.worker.run.remote(self.key, self.index, dict(feeds), output_names)
            return ray.get(ref, timeout=self.timeout_s)
        except RayActorError as exc:
            if self.node.state != DRAINING:
                self.node.state, self.node.retry_at = LOST, time.monotonic() + RETRY_S
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
        """The pool's entries (a replica's lanes) on a node."""
        return [r for r in self.replicas if r.session.node.info.id == node_id]

    def figures(self) -> list[dict[str, Any]]:
        """Per replica, its lanes together: node, requests served and failed, busy seconds, and
        while live the measured seconds per request (the lanes' rates added) and requests running."""
        grouped: dict[str, list[Replica]] = {}
        for lane in self.replicas:
            grouped.setdefault(lane.name, []).append(lane)
        figures = []
        for name, lanes in grouped.items():
            live = [lane for lane in lanes if lane.live]
            speeds = [lane.seconds_per_request for lane in live]
            figures.append({
                "replica": name, "node": lanes[0].session.node.info.name, "live": bool(live),
                "served": sum(lane.served for lane in lanes), "failed": sum(lane.failed for lane in lanes),
                "busy_seconds": sum(lane.busy_seconds for lane in lanes),
                "seconds_per_request": 1 / sum(1 / s for s in speeds) if speeds and all(speeds) else None,
                "running": sum(lane.running_since is not None for lane in live)})
        return figures

    def close(self, wait: bool = True) -> None:
        """Finish the queued requests, then free the replicas on every node."""
        super().close(wait)
        self.cluster._forget(self)
        if self.owns_cluster:
            self.cluster.close()


class Cluster:
    """Hetero on a Ray cluster: a `NodeWorker` on every alive node and the pools deployed on them.

    `address`: "local" starts a single-node Ray here (for trying it), "auto" or an address joins
    a running cluster (`ray start --head` on one server, `ray start --address=HEAD:6379` on the
    others); None uses the Ray this process already connected to. `imports` are modules every
    worker imports first (custom kernels). `call_timeout_s` bounds one request's round trip.
    Each replica joins the pool as `lanes` entries, so while it runs one request the next is
    already on its way (the round trip hidden; measured per lane, their speeds add up to the
    replica's). Nodes that join are used within `poll_s` seconds; `close` (or `with`) stops.
    """

    def __init__(self, address: str | None = "auto", *, imports: Sequence[str] = (), poll_s: float = 1.0,
                 lanes: int = 2, call_timeout_s: float = 120.0, start_timeout_s: float = 120.0,
                 load_timeout_s: float = 900.0, drain_timeout_s: float = 60.0):
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # Ray puts call arguments over 100 KiB in its object store (a copy and a fetch: ~3 ms
            # for a 600 KB image here); the caller's setting decides, so the front end raises it.
            os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
            ray.init(address=address or "auto", logging_level=logging.WARNING,
                     **({"include_dashboard": False} if address == "local" else {}))
        self.imports = tuple(imports)
        self.poll_s, self.lanes, self.call_timeout_s = poll_s, lanes, call_timeout_s
        self.start_timeout_s, self.load_timeout_s, self.drain_timeout_s = (start_timeout_s, load_timeout_s,
                                                                           drain_timeout_s)
        self._nodes: dict[str, _Node] = {}
        self._pools: list[ClusterPool] = []
        self._lock = threading.Lock()  # guards the two collections above and node states
        self._changing = threading.Lock()  # one deploy or node join at a time
        self._stop = threading.Event()
        try:
            self.refresh()
        except BaseException:
            self.close()
            raise
        if not self.nodes():
            self.close()
            raise HeteroError("no node of the Ray cluster runs a Hetero worker: "
                              f"{'; '.join(n.error for n in self._nodes.values()) or 'no alive node'}")
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="hetero-ray-watcher")
        self._watcher.start()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nodes(self, state: str = ACTIVE) -> list[NodeInfo]:
        """Nodes in `state` (active: serving)."""
        with self._lock:
            return [n.info for n in self._nodes.values() if n.state == state]

    def describe(self, devices: bool = True, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Every node known: its state, facts (with `devices`, its devices and executors: the first
        time, every library is imported there) or error, and the replicas each pool has on it with
        their requests served and seconds per request."""
        with self._lock:
            nodes, pools = list(self._nodes.values()), list(self._pools)
        unknown = [n for n in nodes if n.state in (ACTIVE, DRAINING) and "executors" not in n.facts] \
            if devices else []
        for node, facts in _gather([(n, n.worker.describe.remote()) for n in unknown], timeout_s):
            if not isinstance(facts, Exception):
                node.facts = facts
        return [{"node": n.info.name, "id": n.info.id, "address": n.info.address, "state": n.state,
                 "error": n.error, **n.facts,
                 "replicas": [{"model": p.model.label, **figures} for p in pools for figures in p.figures()
                              if figures["node"] == n.info.name]}
                for n in nodes]

    def busy(self, timeout_s: float = 2.0) -> dict[str, dict[str, float]]:
        """Busy seconds per compute resource of each active node (node name -> resource -> s);
        nodes that do not answer within `timeout_s` are left out."""
        with self._lock:
            nodes = [n for n in self._nodes.values() if n.state in (ACTIVE, DRAINING)]
        return {node.info.name: busy for node, busy in
                _gather([(n, n.worker.busy.remote()) for n in nodes], timeout_s)
                if not isinstance(busy, Exception)}

    def deploy(self, model: ModelSource, replicas: ReplicaSpec | Callable[[NodeInfo], ReplicaSpec | None]
               | None = None, *, cpu_streams: int | None = None, policy: str = "priority",
               feeds: Feeds | None = None, warmup: bool = True,
               max_in_flight: int | None = None) -> ClusterPool:
        """Compile `model` on every active node and pool all their replicas; a warmed-up pool.

        `replicas`, `cpu_streams` and `policy` are `ReplicaPool.build`'s, applied on each node to
        its own devices (default: every device of the node, one CPU stream per core it gives
        Ray); `replicas` may also be a function of the `NodeInfo` (None: leave that node out).
        `feeds` are what the replicas are timed with (needed for symbolic input dims; without
        `warmup` they are timed by the requests they serve, as `ReplicaPool.build`'s). A node
        that cannot build its replicas is left out; `ModelError` if none can.
        """
        loaded = load(model)
        blob = ray.put(loaded.proto.SerializeToString())
        spec = _Spec(f"{loaded.label}#{uuid.uuid4().hex[:8]}", loaded, blob, replicas, cpu_streams, policy)
        with self._changing:
            with self._lock:
                nodes = [n for n in self._nodes.values() if n.state == ACTIVE]
            built, errors = self._build(spec, nodes)
            if not built:
                self._unload(spec, nodes)
                raise ModelError(f"model {loaded.label!r}: no node of the cluster could load it: "
                                 f"{'; '.join(errors) or 'no node'}")
            pool = ClusterPool(self, spec, [r for r, _ in built], [name for _, name in built],
                               max_in_flight or 1024)
            try:
                if warmup:
                    pool.warm_up(feeds)
            except BaseException:
                pool.close(wait=False)
                raise
            with self._lock:
                self._pools.append(pool)
        log.info("deployed", extra={"fields": {"model": loaded.label, "replicas": sorted(pool.plans),
                                               "left_out": errors}})
        return pool

    def drain(self, node_id: str) -> None:
        """Stop sending requests to a node, wait (at most `drain_timeout_s`) for those it runs,
        then stop its worker. The node stays out until it leaves Ray and joins again."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.state in (DRAINING, LOST):
                return
            node.state = DRAINING
            replicas = [(p, r) for p in self._pools for r in p.on_node(node_id)]
        for pool, replica in replicas:
            pool.retire(replica)
        deadline = time.monotonic() + self.drain_timeout_s
        for pool, replica in replicas:
            pool.wait_idle(replica, max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            ray.kill(node.worker)
        log.info("node drained", extra={"fields": {"node": node.info.name}})

    def refresh(self) -> None:
        """Reconcile with Ray's view now: drop dead nodes' replicas, drain those Ray drains, start
        workers on new nodes (and on nodes whose worker died) and add their replicas to every pool."""
        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        draining = self._draining() & set(alive)
        now = time.monotonic()
        with self._lock:
            for node_id, node in self._nodes.items():
                if node_id not in alive and node.state != LOST:
                    node.state, node.retry_at = LOST, now
            lost = {node_id for node_id, n in self._nodes.items() if n.state == LOST}
            retire = [(p, r) for p in self._pools for r in p.replicas
                      if r.live and r.session.node.info.id in lost]
            fresh = [node_id for node_id in alive if node_id not in draining and (
                node_id not in self._nodes or (node_id in lost and now >= self._nodes[node_id].retry_at))]
        for pool, replica in retire:
            pool.retire(replica)
        for node_id in draining:
            self.drain(node_id)
        if fresh:
            self._join([_node_info(alive[node_id]) for node_id in fresh])

    def close(self) -> None:
        """Stop watching, close the pools (finishing their queued requests), stop the workers,
        and disconnect from Ray if this object connected."""
        self._stop.set()
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.join()
        with self._lock:
            pools, nodes = list(self._pools), list(self._nodes.values())
        for pool in pools:
            pool.close()
        for node in nodes:
            if node.worker is not None:
                with contextlib.suppress(Exception):
                    ray.kill(node.worker)
        if self._owns_ray:
            ray.shutdown()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the cluster answered badly this time; the next poll tries again
                log.exception("cluster refresh failed")

    def _join(self, infos: Sequence[NodeInfo]) -> None:
        """Start a worker on each node; once it answers, build every pool's replicas there."""
        options = {"num_cpus": 0, "max_concurrency": 1000, "max_restarts": 0}
        nodes = []
        for info in infos:
            # Ray runs its workers at niceness 15, to yield to its own daemons; a node's inference
            # server must not yield to every other process there, so it runs at 0, as Ray's job
            # drivers do. BLAS threads follow the cores the node gives Ray.
            environment = {"RAY_worker_niceness": "0", "OMP_NUM_THREADS": str(max(1, info.cores))}
            worker = ray.remote(NodeWorker).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(info.id, soft=False),
                runtime_env={"env_vars": environment}, **options,
            ).remote(info.cores, self.imports)
            nodes.append(_Node(info, worker))
        with self._lock:
            for node in nodes:
                self._nodes[node.info.id] = node
        for node, facts in _gather([(n, n.worker.ping.remote()) for n in nodes], self.start_timeout_s):
            if isinstance(facts, Exception):
                node.state, node.retry_at = LOST, time.monotonic() + RETRY_S
                node.error = (f"node {node.info.name} ({node.info.address}): worker did not start: "
                              f"{_reason(facts)}")
                log.error("node left out", extra={"fields": {"node": node.info.name, "error": node.error}})
                with contextlib.suppress(Exception):
                    ray.kill(node.worker)
            else:
                node.facts = facts
        started = [n for n in nodes if n.state != LOST]
        if not started:
            return
        with self._changing:
            with self._lock:
                pools = list(self._pools)
            for pool in pools:
                built, _ = self._build(pool.spec, started)
                try:
                    for remote, name in built:
                        pool.add(remote, name)
                except HeteroError:  # the pool closed meanwhile: free what was built for it
                    self._unload(pool.spec, started)
            with self._lock:
                for node in started:
                    node.state = DRAINING if node.state == DRAINING else ACTIVE
        for node in started:
            log.info("node joined", extra={"fields": {"node": node.info.name, "address": node.info.address}})

    def _build(self, spec: _Spec, nodes: Sequence[_Node]) -> tuple[list[tuple[RemoteReplica, str]],
                                                                    list[str]]:
        """Compile the spec's replicas on each node at once; the replicas built and one error per
        node that could not build them."""
        chosen = [(n, spec.replicas_for(n.info)) for n in nodes]
        calls = [(n, n.worker.load.remote(spec.key, spec.blob, replicas, spec.cpu_streams, spec.policy))
                 for n, replicas in chosen if replicas is not False]
        built, errors = [], []
        for node, loaded in _gather(calls, self.load_timeout_s):
            if isinstance(loaded, Exception):
                errors.append(f"node {node.info.name} ({node.info.address}): {_reason(loaded)}")
                continue
            for index, (name, plan) in enumerate(loaded):
                remote = RemoteReplica(node, spec.key, index, spec.model, plan, self.call_timeout_s)
                built += [(remote, f"{node.info.name}/{name}")] * self.lanes
        return built, errors

    def _forget(self, pool: ClusterPool) -> None:
        with self._lock:
            if pool in self._pools:
                self._pools.remove(pool)
            nodes = [n for n in self._nodes.values() if n.state != LOST]
        self._unload(pool.spec, nodes)

    def _unload(self, spec: _Spec, nodes: Sequence[_Node]) -> None:
        _gather([(n, n.worker.unload.remote(spec.key)) for n in nodes], self.call_timeout_s)

    def _draining(self) -> set[str]:
        """Nodes Ray is draining (`ray drain-node`, or the autoscaler taking them away)."""
        try:
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
        except Exception:  # an older Ray, or the GCS busy: drains are then seen as deaths
            return set()
        return {n.node_id for n in status.active_nodes + status.idle_nodes if n.node_status == "DRAINING"}


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


def probe(address: str | None = "auto", timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Every alive node of a Ray cluster with its devices and executors (`hetero cluster`), found
    by a short task on each node; a node where that fails shows its error."""
    owns = not ray.is_initialized()
    if owns:
        ray.init(address=address or "auto", logging_level=logging.WARNING)
    try:
        infos = [_node_info(n) for n in ray.nodes() if n["Alive"]]
        task = ray.remote(describe_node)
        calls = [(info, task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            info.id, soft=False)).remote(info.cores)) for info in infos]
        found = []
        for info, facts in _gather(calls, timeout_s):
            labels = {k: v for k, v in info.labels.items() if not k.startswith("ray.io/")}
            entry = {"node": info.name, "id": info.id, "address": info.address, "labels": labels}
            found.append({**entry, **({"error": _reason(facts)} if isinstance(facts, Exception) else facts)})
        return found
    finally:
        if owns:
            ray.shutdown()


def deploy(model: ModelSource, address: str | None = "auto", *, imports: Sequence[str] = (),
           **options: Any) -> ClusterPool:
    """`Cluster(address, imports=imports).deploy(model, **options)`: a pool on a cluster of its
    own, which closing the pool closes too."""
    cluster = Cluster(address, imports=imports)
    try:
        pool = cluster.deploy(model, **options)
    except BaseException:
        cluster.close()
        raise
    pool.owns_cluster = True
    return pool
