"""Many requests in flight: pipelines across devices, replicas of different speeds, backpressure,
retries and draining. Scheduling is checked deterministically: overlap by barriers that only pass
if two things run at once, dispatch by counts of requests served, never by wall-clock rates."""

import asyncio
import threading

import numpy as np
import pytest
from conftest import StubExecutor

import hetero
from hetero.executors import CompiledPartition
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


class Hooked(StubExecutor):
    """A stub that calls `on_call()` at the start of each partition call and `on_copy()` at the
    start of each copy onto it: tests block there to prove two things run at the same time."""

    def __init__(self, index, ops=None, on_call=lambda: None, on_copy=lambda: None):
        super().__init__(index, ops)
        self.on_call, self.on_copy = on_call, on_copy

    def compile(self, part):
        inner = super().compile(part)
        stub = self

        class Call(CompiledPartition):
            input_names, output_names = inner.input_names, inner.output_names

            def __call__(self, inputs):
                stub.on_call()
                return inner(inputs)

        return Call()

    def to_device(self, array):
        self.on_copy()
        return super().to_device(array)


def _meet(barrier, after=None, skip=0):
    """A hook that, on its call number `skip` + 1 (once), waits for `after` and then at `barrier`.
    The test fails (a BrokenBarrierError inside a partition) if the other party never comes, i.e.
    if the two things could not run at the same time."""
    calls = []

    def hook():
        calls.append(1)
        if len(calls) == skip + 1:
            if after is not None:
                assert after.wait(30)
            barrier.wait()
    return hook


def test_pipeline_overlaps_stages_on_two_devices():
    """Conv on one stub device, the rest on another; the plan is a chain, so only a pipeline
    keeps both busy. The first Conv call (request 1) waits until the other device makes its
    second call, which can only be request 2's first stage, running at the same time."""
    barrier, conv_started = threading.Barrier(2, timeout=30), threading.Event()
    meet = _meet(barrier)

    def conv_call():
        conv_started.set()
        meet()

    convs = Hooked(10, ops={"Conv"}, on_call=conv_call)
    rest = Hooked(11, on_call=_meet(barrier, after=conv_started, skip=1))
    session = hetero.compile(detector_head(), [convs, rest], max_in_flight=8)
    assert [p.executor.resource for p in session.plan.partitions][:2] == ["stub:11", "stub:10"]
    assert not session._program.parallel
    requests = _feeds(session.model, 4)
    expected = [hetero.compile(detector_head(), ["numpy"]).run(f) for f in requests]
    for got, want in zip(session.map(requests), expected, strict=True):
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
    assert not barrier.broken


def test_transfers_overlap_compute():
    """Stage two's input crosses to its device on the link's own worker: stage two computing
    request 1 waits until the copy of request 2 starts, which stage one produces only once that
    computation has begun; a copy made by stage two's own worker could never start meanwhile."""
    barrier, computing = threading.Barrier(2, timeout=30), threading.Event()
    meet = _meet(barrier)

    def compute():
        computing.set()
        meet()

    first = Hooked(16, ops={"Conv", "Relu", "MaxPool", "Add"}, on_call=_meet(
        threading.Barrier(1), after=computing, skip=1))
    second = Hooked(17, on_call=compute, on_copy=_meet(barrier, skip=1))
    session = hetero.compile(small_cnn(), [first, second], max_in_flight=8)
    assert [p.executor for p in session.plan.partitions] == [first, second]
    assert len(session.plan.transfers) == 3  # images in, one tensor between the stages, logits out
    requests = _feeds(session.model, 4)
    results = list(session.map(requests))
    assert not barrier.broken
    want = hetero.compile(small_cnn(), ["numpy"]).run(requests[-1])["logits"]
    np.testing.assert_allclose(results[-1]["logits"], want, rtol=1e-5, atol=1e-6)


def test_independent_partitions_on_two_devices_run_at_once():
    """The detector head's two output branches on two devices: one request's branches overlap
    (each branch's first call waits for the other's)."""
    barrier = threading.Barrier(2, timeout=30)
    left, right = Hooked(12, on_call=_meet(barrier)), Hooked(13, on_call=_meet(barrier))
    session = hetero.compile(detector_head(), ["numpy"], "manual",
                             affinity={"boxes": left, "scores": right})
    assert session._program.parallel
    feeds = example_feeds(session.model)
    out = session.run(feeds)
    assert not barrier.broken
    want = hetero.compile(detector_head(), ["numpy"]).run(feeds)
    np.testing.assert_allclose(out["boxes"], want["boxes"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scores"], want["scores"], rtol=1e-5, atol=1e-6)


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


def _served(seconds: list[float], requests: int):
    """Requests each replica served, and its share of the pool's speed as the pool measured it."""
    sessions = [hetero.compile(small_cnn(), [StubExecutor(20 + i, seconds_per_call=s)])
                for i, s in enumerate(seconds)]
    pool = hetero.ReplicaPool(sessions, max_in_flight=16)
    pool.warm_up(repeats=3)
    feeds = example_feeds(sessions[0].model)
    assert sum(1 for _ in pool.map(feeds for _ in range(requests))) == requests
    pool.close()
    speeds = [1 / r.seconds_per_request for r in pool.replicas]
    return [r.served for r in pool.replicas], [v / sum(speeds) for v in speeds]


def test_replicas_of_speeds_one_and_three_share_the_work_by_speed():
    """Counts, not rates: each replica serves about its share of the pool's speed."""
    (slow, fast), (slow_share, _) = _served([0.06, 0.02], 80)
    assert slow + fast == 80 and slow > 0 and fast > slow
    assert abs(slow / 80 - slow_share) < 0.15, (slow, fast, slow_share)


def test_a_very_slow_replica_takes_only_what_it_finishes_first():
    """A replica ten times slower takes a request only when the fast one would finish it later
    (a long queue), so it never holds back work: at most its share by speed, plus the start."""
    (slow, fast), (slow_share, _) = _served([0.2, 0.02], 60)
    assert slow + fast == 60
    assert slow <= 60 * slow_share + 2, (slow, fast, slow_share)


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
    workers = {t for t in threading.enumerate() if t.name.startswith("hetero-cpu#")}
    pool.close(timeout=30)
    assert len(workers) == 2 and all(t.is_alive() for t in workers)  # one worker per stream, kept


def test_clock_fires_by_due_time_skips_cancelled_timers_and_outlives_a_raising_callback() -> None:
    from hetero.runtime import workers

    fired: list[str] = []
    done = threading.Event()
    workers.call_later(0.3, lambda: (fired.append("last"), done.set()))
    cancelled = workers.call_later(0.1, lambda: fired.append("cancelled"))
    workers.call_later(0.2, lambda: 1 / 0)  # logged; the timers after it still fire
    workers.call_later(0.05, lambda: fired.append("first"))  # due before all others: wakes the clock
    cancelled.cancel()
    assert done.wait(30)
    assert fired == ["first", "last"]


def test_cancelled_timers_do_not_pile_up_on_the_clock() -> None:
    from hetero.runtime import workers

    for _ in range(10_000):
        workers.call_later(3600, lambda: None).cancel()
    assert len(workers._clock._heap) < 1000


def test_clock_survives_timers_due_never_and_callbacks_raising_anything() -> None:
    """A timeout of 1e10 s or inf (a caller's 'no deadline') once stopped the clock's thread for good
    (Condition.wait overflowed), and with it every later deadline and stall check."""
    from hetero.runtime import workers

    class Escaped(BaseException):
        pass

    def escape() -> None:
        raise Escaped

    workers.call_later(1e10, lambda: None)
    workers.call_later(float("inf"), lambda: None)
    workers.call_later(0.01, escape)
    done = threading.Event()
    workers.call_later(0.05, done.set)
    assert done.wait(30)


def test_deadlines_fire_after_a_timeout_of_inf() -> None:
    """`Session.submit` and `ReplicaPool.submit` futures fail at their deadline (the clock's timer),
    not when the slow run ends, even after a request whose timeout was inf."""
    session = hetero.compile(small_cnn(), [StubExecutor(16, seconds_per_call=1.0)], max_in_flight=4)
    pool = hetero.ReplicaPool([session])
    feeds = example_feeds(session.model)
    session.submit(feeds, timeout=float("inf")).result(30)
    pool.submit(feeds, timeout=float("inf")).result(30)
    for requests in (session, pool):
        with pytest.raises(hetero.DeadlineExceededError):
            requests.submit(feeds, timeout=0.05).result(0.9)  # the run itself takes 1 s
    pool.close(timeout=30)
