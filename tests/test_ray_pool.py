"""What `hetero.ray` stands on, tested without Ray: replicas that join a running ReplicaPool,
leave it gracefully or are lost mid-request, and a Batcher that follows the pool's size."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import StubExecutor

import hetero
from hetero.errors import HeteroError, ReplicaLostError
from hetero.graph import example_feeds
from hetero.zoo import small_cnn


class Remote:
    """A replica as hetero.ray's RemoteReplica looks to the pool: a `model` and `run`; it can be
    made to die (every later call raises ReplicaLostError) or to hold each call until released."""

    def __init__(self, session: hetero.Session):
        self.model, self.session = session.model, session
        self.dead = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def run(self, feeds, output_names=None):
        self.calls += 1
        self.entered.release()
        assert self.gate.wait(10), "test gate never opened"
        if self.dead:
            raise ReplicaLostError("the node is gone")
        return self.session.run(feeds, output_names)


def _requests(count: int) -> list[dict[str, np.ndarray]]:
    model = hetero.load(small_cnn())
    return [example_feeds(model, seed=i) for i in range(count)]


@pytest.fixture(scope="module")
def reference() -> hetero.Session:
    return hetero.compile(small_cnn(), ["numpy"])


def _check(results, requests, reference) -> None:
    for got, feeds in zip(results, requests, strict=True):
        np.testing.assert_array_equal(got["logits"], reference.run(feeds)["logits"])


def test_a_lost_replica_mid_request_is_retried_elsewhere_and_dropped(reference) -> None:
    doomed, healthy = Remote(reference), Remote(hetero.compile(small_cnn(), ["numpy"]))
    pool = hetero.ReplicaPool([doomed, healthy], names=["doomed", "healthy"], max_in_flight=32)
    doomed.gate.clear()
    healthy.gate.clear()
    requests = _requests(12)
    futures = [pool.submit(f) for f in requests]
    assert doomed.entered.acquire(timeout=10)  # the doomed replica holds a request...
    doomed.dead = True
    doomed.gate.set()  # ...and dies with it
    healthy.gate.set()
    _check([f.result(timeout=30) for f in futures], requests, reference)
    assert pool.replicas[0].failed == 1 and pool.replicas[0].retired and not pool.replicas[0].live
    assert doomed.calls == 1 and pool.replicas[1].served == 12
    assert pool.live == 1
    pool.close()


def test_a_replica_that_joins_takes_requests_after_being_measured(reference) -> None:
    slow = hetero.compile(small_cnn(), [StubExecutor(0, seconds_per_call=0.1)])
    pool = hetero.ReplicaPool([slow], names=["slow"])
    pool.warm_up()
    fast = Remote(hetero.compile(small_cnn(), [StubExecutor(1)]))
    joined = pool.add(fast, "fast")
    assert joined.seconds_per_request is not None
    assert joined.seconds_per_request < pool.replicas[0].seconds_per_request
    assert fast.calls == 4  # one untimed run and three timed, as warm_up does
    requests = _requests(40)
    _check(list(pool.map(requests)), requests, reference)
    assert joined.served > pool.replicas[0].served  # the faster newcomer did most of the work
    pool.close()
    with pytest.raises(HeteroError, match="closed"):
        pool.add(fast, "late")


def test_retire_finishes_the_running_request_then_sends_no_more(reference) -> None:
    leaving, staying = Remote(reference), Remote(hetero.compile(small_cnn(), ["numpy"]))
    pool = hetero.ReplicaPool([leaving, staying], names=["leaving", "staying"], max_in_flight=32)
    leaving.gate.clear()
    staying.gate.clear()
    requests = _requests(10)
    futures = [pool.submit(f) for f in requests]
    assert leaving.entered.acquire(timeout=10)
    pool.retire(pool.replicas[0])
    leaving.gate.set()
    staying.gate.set()
    _check([f.result(timeout=30) for f in futures], requests, reference)
    assert leaving.calls == 1 and pool.replicas[0].served == 1 and pool.replicas[0].failed == 0
    assert pool.wait_idle(pool.replicas[0], 10) and not pool.replicas[0].live  # done, and out
    pool.close()


def test_requests_fail_clearly_when_the_last_replica_is_lost(reference) -> None:
    only = Remote(reference)
    pool = hetero.ReplicaPool([only], names=["only"], max_in_flight=32)
    only.gate.clear()
    futures = [pool.submit(f) for f in _requests(3)]
    assert only.entered.acquire(timeout=10)
    only.dead = True
    only.gate.set()
    errors = [f.exception(timeout=10) for f in futures]
    assert isinstance(errors[0], ReplicaLostError)
    assert all(isinstance(e, HeteroError) and "no replica left" in str(e) for e in errors[1:])
    with pytest.raises(HeteroError, match="no replica left"):
        pool.submit(_requests(1)[0])
    pool.close()


def test_batcher_sends_one_batch_per_live_replica() -> None:
    from hetero.serve.batcher import Batcher

    model = hetero.load(hetero.zoo.with_dynamic_batch(small_cnn()))
    first = Remote(hetero.compile(model, ["numpy"]))
    pool = hetero.ReplicaPool([first], names=["first"], max_in_flight=32)
    first.gate.clear()
    batcher = Batcher(pool, "cnn", max_batch_size=8)
    requests = [example_feeds(model, seed=i) for i in range(6)]
    futures = [batcher.submit(f, ["logits"]) for f in requests[:1]]
    assert first.entered.acquire(timeout=10)  # one batch in flight on the one replica
    second = Remote(hetero.compile(model, ["numpy"]))
    second.gate.clear()
    pool.add(second, "second")
    futures += [batcher.submit(f, ["logits"]) for f in requests[1:]]
    assert second.entered.acquire(timeout=10)  # the newcomer got the next batch at once
    first.gate.set()
    second.gate.set()
    reference = hetero.compile(model, ["numpy"])
    for future, feeds in zip(futures, requests, strict=True):
        np.testing.assert_allclose(future.result(timeout=30)["logits"], reference.run(feeds)["logits"],
                                   rtol=1e-5, atol=1e-6)
    batcher.close()


def test_replicas_kept_to_a_device_group_use_only_its_devices_and_the_host_as_fallback() -> None:
    """What a worker of one device group compiles: its cards' replicas (host libraries as fallback,
    within its thread budget), the host-only ones only in the host's group."""
    from hetero.runtime.replicas import replica_sessions

    cards = [StubExecutor(0, ops={"Conv", "Relu"}), StubExecutor(1, ops={"Conv", "Relu"})]
    spec = [[cards[0], "numpy"], [cards[1], "numpy"], [*cards, "numpy"], ["numpy"]]

    def used(devices, cores=4, streams=2):
        """Each replica's executors, the host's with their threads."""
        named = replica_sessions(small_cnn(), spec, cpu_streams=streams, cores=cores, devices=devices)
        return [sorted(e.name if e.device.kind == "stub" else f"{e.name} x{e.threads}"
                       for e in session.plan.executors) for _, session in named]

    # a card's group: the replicas with that card (the two-card one kept to it), host on 1 thread
    assert used({"stub:0"}, cores=1) == [["numpy@cpu x1", "stub@stub:0"]] * 2
    assert used({"stub:1"}, cores=1) == [["numpy@cpu x1", "stub@stub:1"]] * 2
    # the host's group: the host-only replica, as its CPU streams over the group's cores
    assert used({"cpu"}, cores=4, streams=2) == [["numpy@cpu#0 x2"], ["numpy@cpu#1 x2"]]
    assert len(used({"stub:0", "stub:1", "cpu"})) == 2 + 1 + 2  # every replica, as with no groups
    assert used({"cuda:0"}) == []  # no replica belongs there
