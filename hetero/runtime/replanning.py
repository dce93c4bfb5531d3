"""A runner that answers from the first request and plans on real ones: for serving models whose
input dims are unknown until requests arrive.

It starts on a `priority` runner (no measuring, so no inputs needed), keeps copies of its first
answered requests, then builds the measured runner on them in a background thread and swaps it
in. Requests keep being answered throughout: each runs on the runner current when it was
submitted, and the replaced runner is closed once its requests are done. A request the model
refuses or fails on, or an empty one (a zero dim: nothing to measure), is never planned on.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from hetero.executors import Executor
from hetero.graph import Model
from hetero.planner import MEASURED_POLICIES
from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.samples import representative
from hetero.runtime.session import Feeds, Requests, Session, check_feeds, compile_plan
from hetero.runtime.tuning import tune_latency

log = logging.getLogger("hetero.runtime")
Runner = Session | ReplicaPool


class Replanning(Requests):
    """Requests go to `first` until `replan(samples)` built a runner from the first `samples`
    requests answered (copies of their feeds, none empty); that runner then takes every new request.

    `status` says where it stands: "planning on first requests", "planning", "measured",
    "kept priority plan: <error>" (a failed re-plan leaves the first runner serving) or "closed
    before planning finished".
    """

    def __init__(self, first: Runner, replan: Callable[[list[Feeds]], Runner], *, samples: int = 1):
        self._current = first
        self._replan = replan
        self._wanted = max(1, samples)
        self._samples: list[Feeds] = []
        self._lock = threading.Lock()
        self._planning = False  # planning started
        self._planned = threading.Event()
        self._closed = False
        self.status = "planning on first requests"
        self.max_in_flight = first.max_in_flight

    @property
    def runner(self) -> Runner:
        """The runner new requests go to."""
        with self._lock:
            return self._current

    @property
    def model(self) -> Model:
        return self.runner.model

    @property
    def plan(self):
        return self.runner.plan

    @property
    def replicas(self):
        runner = self.runner
        return runner.replicas if isinstance(runner, ReplicaPool) else []

    @property
    def live(self) -> int:
        """Replicas taking requests (a Session counts as one)."""
        runner = self.runner
        return runner.live if isinstance(runner, ReplicaPool) else 1

    def submit(self, feeds: Feeds, output_names: Sequence[str] | None = None, *, block: bool = True,
               timeout: float | None = None) -> Future:
        runner = self.runner
        if self._planning or self._closed:  # nothing more to keep
            return runner.submit(feeds, output_names, block=block, timeout=timeout)
        arrays = check_feeds(runner.model, feeds)  # bad feeds raise here, before anything is kept
        future = runner.submit(arrays, output_names, block=block, timeout=timeout)
        if not any(isinstance(value, np.ndarray) and value.size == 0 for value in arrays.values()):
            sample = copy.deepcopy(arrays)  # the caller may reuse its arrays once answered
            future.add_done_callback(lambda done: self._sample(sample, done))
        return future

    def run(self, feeds: Feeds, output_names: Sequence[str] | None = None, *,
            timeout: float | None = None) -> dict[str, Any]:
        return self.submit(feeds, output_names, timeout=timeout).result()

    def _sample(self, feeds: Feeds, done: Future) -> None:
        """Keep a request the model answered; plan once there are enough."""
        if done.cancelled() or done.exception() is not None:
            return
        with self._lock:
            if self._planning or self._closed:
                return
            self._samples.append(feeds)
            if len(self._samples) < self._wanted:
                return
            self._planning = True
        threading.Thread(target=self._build, name="hetero-replan", daemon=True).start()

    def _build(self) -> None:
        self.status = "planning"
        try:
            measured = self._replan(list(self._samples))
        except Exception as exc:  # the first runner keeps serving; the error is kept for the operator
            self.status = f"kept priority plan: {exc}"
            log.warning("re-planning on real requests failed; keeping the priority plan: %s", exc)
            self._planned.set()
            return
        with self._lock:
            if self._closed:
                old = measured
                self.status = "closed before planning finished"
            else:
                old, self._current = self._current, measured
                self.status = "measured"
        try:
            old.close(wait=True)  # its requests in flight finish first
        finally:
            self._planned.set()

    def wait_planned(self, timeout: float | None = None) -> bool:
        """Wait until planning on the first requests is over (it starts once they are answered);
        True if it is within `timeout` seconds."""
        return self._planned.wait(timeout)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Close the current runner (`wait`: after its requests in flight, for at most `timeout`
        seconds). A planning still under way is not waited for: the runner it builds is closed as
        soon as it is done."""
        with self._lock:
            self._closed = True
        self.runner.close(wait=wait, timeout=timeout)


def measured_replicas(policy: str, samples: list[Feeds]) -> Callable[[Model, list[Executor]], Session]:
    """A replica compiler for `ReplicaPool.build` that places the first replica of each library set
    by the measured `policy` on `samples`, and its CPU-stream siblings like it (the same libraries
    per node, measured once)."""
    if policy not in MEASURED_POLICIES:
        raise ValueError(f"policy {policy!r} is not a measured policy")
    placed: dict[tuple[str, ...], tuple[Model, dict[str, str]]] = {}

    def compile_replica(model: Model, executors: list[Executor]) -> Session:
        libraries = tuple(f"{e.engine}@{e.device}" for e in executors)
        if libraries not in placed:
            session = tune_latency(model, executors, sample_inputs=samples)
            chosen = {n.name: f"{e.engine}@{e.device}" for n in session.plan.model.nodes
                      for e in [session.plan.executor_of(n)]}
            placed[libraries] = (session.plan.model, chosen)
            return session
        completed, chosen = placed[libraries]
        by_library = {f"{e.engine}@{e.device}": e.name for e in executors}
        assignment = {node: by_library[library] for node, library in chosen.items() if library in by_library}
        return compile_plan(completed, executors, "latency", assignment=assignment)

    return compile_replica


def build_here(model: Model, replicas: Sequence[Sequence[str | Executor]] | None = None, *,
               policy: str = "priority", samples: list[Feeds] | None = None, **options: Any) -> ReplicaPool:
    """`ReplicaPool.build` on this host; with `samples` (feeds dicts), each replica is placed by the
    measured `policy` on them (`measured_replicas`). Other options are `ReplicaPool.build`'s."""
    compile_replica = measured_replicas(policy, samples) if samples else None
    return ReplicaPool.build(model, replicas, policy=policy, compile_replica=compile_replica, **options)


def serving_pool(model: Model, *, replicas: Sequence[Sequence[str | Executor]] | None = None,
                 cpu_streams: int | None = None, policy: str = "priority", warmup: bool = True,
                 build: Callable[..., ReplicaPool] = build_here) -> ReplicaPool | Replanning:
    """A replica pool for a server. Measured policies measure each replica on real values: on
    inputs made from the model's dims when they are all known and `warmup` allows made-up inputs,
    else on the first request, planned in the background while a `priority` pool answers (a
    `Replanning`).

    `build(model, replicas, cpu_streams=, policy=, samples=, feeds=, warmup=)` makes the pools:
    `build_here` on this host, `hetero.ray.Cluster.deploy` on a Ray cluster. `samples` are the
    feeds the measured policies place replicas on, `feeds` what warm-up times them with.
    """
    def pool(**options: Any) -> ReplicaPool:
        return build(model, replicas, cpu_streams=cpu_streams, **options)

    if policy not in MEASURED_POLICIES:
        return pool(policy=policy, warmup=warmup)
    if warmup and all(info.is_static for info in model.inputs):
        return pool(policy=policy, samples=representative(model))

    def replan(samples: list[Feeds]) -> ReplicaPool:
        return pool(policy=policy, samples=samples, feeds=samples[0])

    return Replanning(pool(policy="priority", warmup=False), replan)
