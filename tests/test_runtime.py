"""Many requests in flight: pipelines across devices, replicas of different speeds, backpressure,
retries and draining. Scheduling is checked with stub executors that sleep a set time per call."""

import asyncio
import threading
import time

import numpy as np
import pytest
from conftest import StubExecutor

import hetero
from hetero.graph import example_feeds
from hetero.zoo import detector_head, small_cnn


def _feeds(model, count, seed=0):
    return [example_feeds(model, seed=seed + i) for i in range(count)]


def test_submit_map_and_async_equal_sequential_runs_in_order():
    session = hetero.compile(small_cnn(), ["onnxruntime", "numpy"], max_in_flight=4)
    requests = _feeds(session.model, 12)
    expected = [session.run(f)["logits"] for f in requests]
    futures = [session.submit(f) for f in requests[:4]]
    for future, want in zip(futures, expected, strict=False):
        np.testing.assert_array_equal(future.result()["logits"], want)
    for got, want in zip(session.map(requests), expected, strict=True):
        np.testing.assert_array_equal(got["logits"], want)
    unordered = [float(r["logits"].sum()) for r in session.map(requests, ordered=False)]
    assert sorted(unordered) == sorted(float(e.sum()) for e in expected)

    async def run_all():
        return await asyncio.gather(*(session.run_async(f) for f in requests))

    for got, want in zip(asyncio.run(run_all()), expected, strict=True):
        np.testing.assert_array_equal(got["logits"], want)


def test_pipeline_overlaps_stages_on_two_devices():
    """Conv on one stub device, the rest on another: with requests in flight the two stages
    overlap, so the stream takes well under the sum of its stages."""
    convs, rest = StubExecutor(10, ops={"Conv"}, seconds_per_call=0.02), \
        StubExecutor(11, seconds_per_call=0.02)
    session = hetero.compile(detector_head(), [convs, rest], max_in_flight=8)
    assert {p.executor.resource for p in session.plan.partitions} == {"stub:10", "stub:11"}
    stages = len(session.plan.partitions)
    requests = _feeds(session.model, 10)
    expected = [hetero.compile(detector_head(), ["numpy"]).run(f) for f in requests]
    start = time.perf_counter()
    results = list(session.map(requests))
    elapsed = time.perf_counter() - start
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    sequential = 10 * stages * 0.02
    assert elapsed < 0.75 * sequential, (elapsed, sequential)


def test_transfers_overlap_compute():
    """Stage two's input crosses a slow link: prefetched on the link's own worker, the copy of
    request i overlaps stage two computing request i-1, so the link does not add to its time."""
    first = StubExecutor(16, ops={"Conv", "Relu", "MaxPool", "Add"}, seconds_per_call=0.02)
    second = StubExecutor(17, seconds_per_call=0.02, seconds_per_transfer=0.03)
    session = hetero.compile(small_cnn(), [first, second], max_in_flight=8)
    assert [p.executor for p in session.plan.partitions] == [first, second]
    requests = _feeds(session.model, 12)
    list(session.map(requests[:2]))
    start = time.perf_counter()
    results = list(session.map(requests))
    elapsed = time.perf_counter() - start
    assert elapsed < 12 * (0.02 + 0.03) * 0.8, elapsed  # serialised link + compute would take 0.6 s
    want = hetero.compile(small_cnn(), ["numpy"]).run(requests[-1])["logits"]
    np.testing.assert_allclose(results[-1]["logits"], want, rtol=1e-5, atol=1e-6)


def test_independent_partitions_on_two_devices_run_at_once():
    """The detector head's two output branches on two devices: one request's branches overlap."""
    left, right = StubExecutor(12, seconds_per_call=0.05), StubExecutor(13, seconds_per_call=0.05)
    session = hetero.compile(detector_head(), ["numpy"], "manual",
                             affinity={"boxes": left, "scores": right})
    assert session._program.parallel
    feeds = example_feeds(session.model)
    session.run(feeds)
    start = time.perf_counter()
    out = session.run(feeds)
    assert time.perf_counter() - start < 0.09
    want = hetero.compile(detector_head(), ["numpy"]).run(feeds)
    np.testing.assert_allclose(out["boxes"], want["boxes"], rtol=1e-5, atol=1e-6)


def test_backpressure_bounds_requests_in_flight():
    slow = StubExecutor(14, seconds_per_call=0.05)
    session = hetero.compile(small_cnn(), [slow], max_in_flight=2)
    feeds = example_feeds(session.model)
    first = [session.submit(feeds), session.submit(feeds)]
    with pytest.raises(hetero.QueueFullError, match="2 requests already in flight"):
        session.submit(feeds, block=False)
    with pytest.raises(hetero.QueueFullError):
        session.submit(feeds, timeout=0.01)
    for future in first:
        future.result()
    session.submit(feeds, block=False).result()


def test_close_drains_requests_in_flight():
    slow = StubExecutor(15, seconds_per_call=0.03)
    session = hetero.compile(small_cnn(), [slow], max_in_flight=4)
    futures = [session.submit(example_feeds(session.model)) for _ in range(4)]
    session.close()
    assert all(f.done() and f.exception() is None for f in futures)
    with pytest.raises(hetero.HeteroError, match="closed"):
        session.submit(example_feeds(session.model))


def _rate_pool(seconds: list[float], requests: int, in_flight: int = 16):
    sessions = [hetero.compile(small_cnn(), [StubExecutor(20 + i, seconds_per_call=s)])
                for i, s in enumerate(seconds)]
    pool = hetero.ReplicaPool(sessions, max_in_flight=in_flight)
    pool.warm_up(repeats=3)
    alone = [1 / r.seconds_per_request for r in pool.replicas]
    feeds = example_feeds(sessions[0].model)
    start = time.perf_counter()
    for _ in pool.map(feeds for _ in range(requests)):
        pass
    rate = requests / (time.perf_counter() - start)
    pool.close()
    return rate, pool, alone


def test_replicas_of_speeds_one_and_three_add_up():
    rate, pool, alone = _rate_pool([0.06, 0.02], 120)
    assert rate >= 0.95 * sum(alone), (rate, alone)  # each replica's rate alone, stub work included
    assert all(r.served > 0 for r in pool.replicas)


def test_a_very_slow_replica_never_lowers_the_total():
    alone, _, _ = _rate_pool([0.02], 60)
    together, _, _ = _rate_pool([0.2, 0.02], 60)
    assert together >= 0.97 * alone, (together, alone)


def test_a_failing_replica_is_retried_elsewhere_and_nothing_is_lost():
    broken = StubExecutor(30, run_fail_ops={"Conv"})
    sessions = [hetero.compile(small_cnn(), [broken]), hetero.compile(small_cnn(), ["numpy"])]
    sessions[0]._rebuild = None  # no re-planning: the replica itself must fail
    pool = hetero.ReplicaPool(sessions)
    requests = _feeds(sessions[1].model, 8)
    results = list(pool.map(requests))
    expected = [sessions[1].run(f)["logits"] for f in requests]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got["logits"], want)
    assert pool.replicas[0].failed >= 1 and pool.replicas[1].served == 8
    pool.close()


def test_replica_pool_on_cpu_streams_matches_a_session():
    pool = hetero.ReplicaPool.build(small_cnn(), [["onnxruntime", "numpy"]], cpu_streams=2)
    assert [r.name for r in pool.replicas] == ["onnxruntime@cpu#0", "onnxruntime@cpu#1"]
    feeds = _feeds(pool.model, 6)
    reference = hetero.compile(small_cnn(), ["numpy"])
    for got, request in zip(pool.map(feeds), feeds, strict=True):
        np.testing.assert_allclose(got["logits"], reference.run(request)["logits"], rtol=1e-4, atol=1e-5)
    with pytest.raises(hetero.InputError):
        pool.submit({})
    pool.close()
    assert threading.active_count() >= 1
