"""Faults on purpose: cancelled and timed-out requests, executors that raise, hang, return NaN or
die mid-transfer. Every request is answered or fails with a clear error within its deadline, none
is lost, no worker thread dies, memory stays bounded, and what a failure teaches stays in its
session and expires."""

import asyncio
import gc
import threading
import time
import tracemalloc
from concurrent.futures import CancelledError, wait

import numpy as np
import pytest
from faults import FaultyExecutor
from onnx import TensorProto, helper

import hetero
from hetero.graph import example_feeds
from hetero.planner import Rejections
from hetero.runtime import compile_plan
from hetero.runtime.session import _Values
from hetero.zoo import small_cnn

MARGIN_S = 5.0  # generous: the machine is shared; a hang is much longer than this


@pytest.fixture(scope="module")
def model():
    return hetero.load(small_cnn())


@pytest.fixture(scope="module")
def reference(model):
    exact = hetero.compile(model, ["numpy"])
    return lambda feeds: exact.run(feeds)["logits"]


def _hetero_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("hetero-")}


def _check(result, feeds, reference):
    np.testing.assert_allclose(result["logits"], reference(feeds), rtol=1e-5, atol=1e-6)


def test_cancelled_requests_never_kill_a_worker(model, reference):
    device = FaultyExecutor(80, seconds_per_call=0.01)
    session = hetero.compile(model, [device], max_in_flight=8)
    feeds = [example_feeds(model, seed=i) for i in range(8)]
    session.run(feeds[0])
    before = _hetero_threads()
    futures = [session.submit(f) for f in feeds]
    cancelled = [f.cancel() for f in futures[1::2]]
    assert all(cancelled)  # a request not answered yet can always be cancelled
    _, lost = wait(futures, timeout=MARGIN_S)
    assert not lost
    for future, request in zip(futures[0::2], feeds[0::2], strict=True):
        _check(future.result(), request, reference)
    with pytest.raises(CancelledError):
        futures[1].result()
    assert before <= _hetero_threads()  # every worker alive
    _check(session.run(feeds[1], timeout=MARGIN_S), feeds[1], reference)
    again = hetero.compile(model, [FaultyExecutor(80)])  # a new session on the same device
    _check(again.run(feeds[2], timeout=MARGIN_S), feeds[2], reference)


def test_a_cancelled_request_frees_its_slot_at_once(model):
    device = FaultyExecutor(81)
    session = hetero.compile(model, [device], max_in_flight=1)
    feeds = example_feeds(model)
    device.inject("hang")
    stuck = session.submit(feeds)
    with pytest.raises(hetero.QueueFullError):
        session.submit(feeds, block=False)
    assert stuck.cancel()
    queued = session.submit(feeds, block=False)  # the slot is free though the device still hangs
    device.release()
    assert queued.result(timeout=MARGIN_S)["logits"].shape == (1, 10)


def test_a_timeout_on_a_hung_executor_fails_clearly_then_the_session_recovers(model, reference):
    device = FaultyExecutor(82)
    session = hetero.compile(model, [device], max_in_flight=4)
    feeds = example_feeds(model)
    device.inject("hang")
    start = time.perf_counter()
    hung = r"'small_cnn': no answer within 0.3 s \(partition #0 on stub@stub:82 still running"
    with pytest.raises(hetero.DeadlineExceededError, match=hung):
        session.run(feeds, timeout=0.3)
    assert time.perf_counter() - start < 0.3 + MARGIN_S
    behind = session.submit(feeds, timeout=0.2)  # queued behind the hung call on the same device
    with pytest.raises(hetero.DeadlineExceededError, match="waiting for its devices"):
        behind.result(timeout=MARGIN_S)
    assert device.hanging == 1
    device.release()
    _check(session.run(feeds, timeout=MARGIN_S), feeds, reference)
    assert session.stats.runs >= 1


def test_asyncio_cancellation_leaves_sessions_and_pools_working(model, reference):
    slow = [FaultyExecutor(83, seconds_per_call=0.05), FaultyExecutor(84, seconds_per_call=0.05)]
    session = hetero.compile(model, [slow[0]], max_in_flight=2)
    pool = hetero.ReplicaPool([hetero.compile(model, [d]) for d in slow], max_in_flight=4)
    feeds = example_feeds(model)

    async def scenario(runner):
        for _ in range(6):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(runner.run_async(feeds), 0.005)
        return await asyncio.wait_for(asyncio.gather(*(runner.run_async(feeds) for _ in range(6))), 30)

    for runner in (session, pool):
        before = _hetero_threads()
        for result in asyncio.run(scenario(runner)):
            _check(result, feeds, reference)
        assert before <= _hetero_threads()
        runner.close(timeout=MARGIN_S)


def test_a_hung_replica_is_bypassed_within_the_deadline(model, reference):
    hung, healthy = FaultyExecutor(85), FaultyExecutor(86, seconds_per_call=0.2)
    pool = hetero.ReplicaPool([hetero.compile(model, [hung]), hetero.compile(model, [healthy])],
                              stall_factor=3, min_stall_s=0.2)
    pool.warm_up()
    feeds = [example_feeds(model, seed=i) for i in range(6)]
    hung.inject("hang")
    start = time.perf_counter()
    first = pool.run(feeds[0], timeout=MARGIN_S)  # the fast replica takes it, stalls; the other answers
    assert time.perf_counter() - start < MARGIN_S
    _check(first, feeds[0], reference)
    assert pool.replicas[0].stalls == 1 and pool.replicas[0].stalled
    for result, request in zip(pool.map(feeds), feeds, strict=True):
        _check(result, request, reference)
    assert pool.replicas[0].served == 0  # stalled: no work until its call returns
    hung.release()
    deadline = time.monotonic() + MARGIN_S
    while pool.replicas[0].stalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pool.replicas[0].stalled
    for result, request in zip(pool.map(feeds * 3), feeds * 3, strict=True):
        _check(result, request, reference)
    assert pool.replicas[0].served > 0
    pool.close(timeout=MARGIN_S)


def test_failures_are_retried_elsewhere_or_answered_with_a_clear_error(model, reference):
    broken, healthy = FaultyExecutor(87), FaultyExecutor(88)
    broken.inject("raise", times=1000)
    sessions = [hetero.compile(model, [broken]), hetero.compile(model, [healthy])]
    pool = hetero.ReplicaPool(sessions)
    feeds = [example_feeds(model, seed=i) for i in range(6)]
    for result, request in zip(pool.map(feeds), feeds, strict=True):
        _check(result, request, reference)
    assert pool.replicas[0].failed >= 1 and pool.replicas[1].served == 6
    healthy.inject("raise", times=1000)
    with pytest.raises(hetero.RunError, match=r"partition #0 on stub@stub:8[78] failed: .*injected"):
        pool.run(feeds[0], timeout=MARGIN_S)
    pool.close(timeout=MARGIN_S)


def _storm(pool, model, reference, count, timeout):
    feeds = [example_feeds(model, seed=i % 4) for i in range(count)]
    start = time.perf_counter()
    futures = [pool.submit(f, timeout=timeout) for f in feeds]
    _, lost = wait(futures, timeout=timeout + MARGIN_S)
    assert not lost, f"{len(lost)} requests lost"
    assert time.perf_counter() - start < count * 0.05 + timeout + MARGIN_S
    answered = failed = 0
    for future, request in zip(futures, feeds, strict=True):
        error = future.exception()
        if error is None:  # a replica's NaN is caught and the request retried on another
            np.testing.assert_allclose(future.result()["logits"], reference(request), rtol=1e-5, atol=1e-6)
            answered += 1
        else:
            assert isinstance(error, hetero.HeteroError) and "'small_cnn'" in str(error), repr(error)
            failed += 1
    return answered, failed


def test_every_request_is_answered_or_fails_clearly_under_random_faults(model, reference):
    devices = [FaultyExecutor(90 + i, hang_s=0.3) for i in range(3)]
    sessions = [hetero.compile(model, [d]) for d in devices]  # nowhere to re-plan: the pool retries
    pool = hetero.ReplicaPool(sessions, stall_factor=5, min_stall_s=0.1)
    pool.warm_up()
    for i, device in enumerate(devices):
        device.chaos(seed=i, rate=0.15)
    answered, failed = _storm(pool, model, reference, 60, timeout=3.0)
    threads = _hetero_threads()
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        answered2, failed2 = _storm(pool, model, reference, 60, timeout=3.0)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answered + answered2 > 0.8 * 120, (answered, failed, answered2, failed2)
    assert sum(len(d.faults_done) for d in devices) > 10  # faults did happen
    assert sum(d.faults_done.count("nan") for d in devices) > 2
    assert threads <= _hetero_threads() and len(_hetero_threads()) <= len(threads) + 4  # no growth
    request_bytes = 60 * example_feeds(model)["images"].nbytes
    assert after - before < request_bytes / 2, (after - before, request_bytes)  # no request kept
    for device in devices:
        device.release()
    pool.close(timeout=MARGIN_S)


def test_a_failed_prefetch_leaves_the_reader_to_move_the_value_itself():
    device = FaultyExecutor(95)
    device.inject("transfer")  # the first copy to the device dies
    array = np.arange(4, dtype=np.float32)
    values = _Values({"x": array}, {"x": 2}, set())
    started, reader_waiting = threading.Event(), threading.Event()
    copy = device.to_device
    errors = []

    def first_copy_waits_for_the_reader(value):
        if not started.is_set():
            started.set()
            reader_waiting.wait(MARGIN_S)
            time.sleep(0.05)  # the reader is now waiting on this move
        return copy(value)

    def prefetch():
        try:
            values.fetch("x", device)
        except ConnectionError as exc:
            errors.append(exc)

    device.to_device = first_copy_waits_for_the_reader
    thread = threading.Thread(target=prefetch)
    thread.start()
    started.wait(MARGIN_S)
    reader_waiting.set()
    moved = values.fetch("x", device)  # waits for the prefetch, which fails; then moves it itself
    thread.join(MARGIN_S)
    np.testing.assert_array_equal(moved.array, array)
    assert device.faults_done == ["transfer"] and len(errors) == 1


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _executors_used(session):
    return {p.executor.name for p in session.plan.partitions}


def test_a_transient_fault_stays_in_its_session_and_expires(model, reference):
    device = FaultyExecutor(96)
    clock = Clock()
    session = compile_plan(model, [device, "numpy"], rejections=Rejections(run_ttl_s=60, clock=clock))
    assert _executors_used(session) == {device.name}
    feeds = example_feeds(model)
    device.inject("raise")
    _check(session.run(feeds), feeds, reference)  # answered on a re-planned session
    assert _executors_used(session) == {"numpy@cpu"}
    assert any("failed at run time" in note for note in session.plan.notes)
    fresh = hetero.compile(model, [device, "numpy"])
    assert _executors_used(fresh) == {device.name}  # another session never learns a transient fault
    _check(fresh.run(feeds), feeds, reference)
    clock.now = 59
    session.run(feeds)
    assert _executors_used(session) == {"numpy@cpu"}
    clock.now = 61
    session.run(feeds)  # the rejection expired: re-planned in the background with the device again
    deadline = time.monotonic() + MARGIN_S
    while _executors_used(session) != {device.name} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _executors_used(session) == {device.name}
    assert any("expired" in note for note in session.plan.notes)
    _check(session.run(feeds), feeds, reference)


def test_the_session_stays_responsive_while_a_fallback_re_plans(model, reference):
    device = FaultyExecutor(97)
    session = hetero.compile(model, [device, "numpy"])
    feeds = example_feeds(model)
    rebuild, entered, proceed = session._rebuild, threading.Event(), threading.Event()

    def slow_rebuild():
        entered.set()
        proceed.wait(MARGIN_S)
        return rebuild()

    session._rebuild = slow_rebuild
    device.inject("raise")
    failing = session.submit(feeds)
    assert entered.wait(MARGIN_S)
    _check(session.submit(feeds).result(timeout=MARGIN_S), feeds, reference)  # not held up by the re-plan
    assert session.stats.runs == 1
    proceed.set()
    _check(failing.result(timeout=MARGIN_S), feeds, reference)
    assert _executors_used(session) == {"numpy@cpu"}


class _HostChecked(FaultyExecutor):
    """A device whose library cannot reduce in its own memory: its values are checked on the host."""

    def all_finite(self, value):
        return None


@pytest.mark.parametrize("kind, ops", [(FaultyExecutor, None),
                                       (_HostChecked, {"Conv", "Relu", "Add", "MaxPool"})],
                         ids=["whole-model-checked-on-device", "first-partition-checked-on-host"])
def test_nan_from_an_executor_is_re_planned_elsewhere(model, reference, kind, ops):
    device = kind(60, ops)
    session = hetero.compile(model, [device, "numpy"])
    assert device.name in _executors_used(session)
    feeds = example_feeds(model)
    device.inject("nan")
    _check(session.submit(feeds).result(timeout=MARGIN_S), feeds, reference)
    assert device.faults_done == ["nan"]
    assert _executors_used(session) == {"numpy@cpu"}  # kept off the device for a while, as after a crash
    assert any(f"{device.name} failed at run time" in note and "NaN or infinity" in note
               for note in session.plan.notes)
    _check(session.run(feeds), feeds, reference)
    assert device.name in _executors_used(hetero.compile(model, [device, "numpy"]))  # this session's alone


def test_nan_with_nowhere_else_to_run_names_model_partition_and_executor(model):
    device = FaultyExecutor(61)
    session = hetero.compile(model, [device])
    session.defer_non_finite = True  # as in a ReplicaPool, which then asks another replica
    device.inject("nan")
    with pytest.raises(hetero.NonFiniteError, match=r"model 'small_cnn': partition #0 on stub@stub:61 "
                                                    r"failed: NaN or infinity in 'logits' from finite inputs"
                       ) as raised:
        session.run(example_feeds(model))
    assert np.isnan(raised.value.outputs["logits"]).all()


def test_a_replica_that_answers_nan_has_the_request_retried_on_another(model, reference):
    faulty, healthy = FaultyExecutor(62), FaultyExecutor(63)
    pool = hetero.ReplicaPool([hetero.compile(model, [faulty]), hetero.compile(model, [healthy])])
    feeds = example_feeds(model)
    faulty.inject("nan")
    _check(pool.run(feeds, timeout=MARGIN_S), feeds, reference)  # the first idle replica took it
    assert faulty.faults_done == ["nan"]
    assert pool.replicas[0].failed == 1 and pool.replicas[1].served == 1
    pool.close(timeout=MARGIN_S)


def test_without_check_finite_nan_is_answered_as_it_is(model):
    device = FaultyExecutor(64)
    session = hetero.compile(model, [device, "numpy"], check_finite=False)
    device.inject("nan")
    assert np.isnan(session.run(example_feeds(model))["logits"]).all()
    assert _executors_used(session) == {device.name}


def _edge_model(outputs):
    """Log and Sqrt on the device (NaN and -inf where x <= 0: the model's own), Exp on the host."""
    nodes = [helper.make_node("Log", ["x"], ["log_x"], name="log"),
             helper.make_node("Sqrt", ["x"], ["root"], name="sqrt"),
             helper.make_node("Exp", ["log_x"], ["back"], name="exp")]
    vector = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [6])  # noqa: E731
    graph = helper.make_graph(nodes, "edges", [vector("x")], [vector(name) for name in outputs])
    return hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


EDGES = {"x": np.array([0, -1, 1, 2, 0.5, 3], np.float32)}


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("outputs", [["log_x", "root", "back"], ["back"]],
                         ids=["non-finite-outputs", "non-finite-between-partitions-only"])
def test_a_model_whose_own_answer_is_nan_or_inf_is_answered_and_blames_no_one(outputs):
    model = _edge_model(outputs)
    expected = hetero.compile(model, ["numpy"]).run(EDGES)
    device = FaultyExecutor(65, {"Log", "Sqrt"})
    session = hetero.compile(model, [device, "numpy"])
    rebuild, rebuilds = session._rebuild, []
    session._rebuild = lambda: rebuilds.append(1) or rebuild()
    for _ in range(2):
        result = session.run(EDGES)
        for name in outputs:
            np.testing.assert_array_equal(result[name], expected[name])  # NaN and -inf in the same places
    assert len(rebuilds) == 1  # numpy asked once; once confirmed, those tensors are not checked again
    assert len(session.rejections) == 0 and device.name in _executors_used(session)
    assert not any("failed" in note for note in session.plan.notes)
    alone = hetero.compile(model, [FaultyExecutor(69)]).run(EDGES)  # nowhere else to ask: answered as is
    np.testing.assert_array_equal(alone[outputs[0]], expected[outputs[0]])
    devices = [FaultyExecutor(66 + i) for i in range(2)]
    pool = hetero.ReplicaPool([hetero.compile(model, [d]) for d in devices])
    for _ in range(2):
        np.testing.assert_array_equal(pool.run(EDGES, timeout=MARGIN_S)[outputs[0]], expected[outputs[0]])
    assert [r.failed for r in pool.replicas] == [0, 0]
    assert sum(d.calls for d in devices) == 3  # both replicas asked once; then the answer is known
    pool.close(timeout=MARGIN_S)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_requests_flagged_while_the_model_s_own_nan_is_being_confirmed_are_answered_without_re_planning():
    model = _edge_model(["log_x", "root"])
    device = FaultyExecutor(70, {"Log", "Sqrt"})
    session = hetero.compile(model, [device, "numpy"])
    rebuild, entered, proceed, rebuilds = session._rebuild, threading.Event(), threading.Event(), []

    def slow_rebuild():
        rebuilds.append(1)
        entered.set()
        proceed.wait(MARGIN_S)
        return rebuild()

    session._rebuild = slow_rebuild
    first = session.submit(EDGES)
    assert entered.wait(MARGIN_S)
    calls = device.calls
    second = session.submit(EDGES)  # flagged too, while the first re-plans
    deadline = time.monotonic() + MARGIN_S
    while device.calls == calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    proceed.set()
    for future in (first, second):
        np.testing.assert_array_equal(future.result(timeout=MARGIN_S)["log_x"], np.log(EDGES["x"]))
    assert len(rebuilds) == 1


def test_nan_from_a_nan_input_is_no_fault(model):
    device = FaultyExecutor(68)
    session = hetero.compile(model, [device, "numpy"])
    session._rebuild = None  # nothing to re-plan: the NaN is the input's, not the device's
    session.defer_non_finite = True
    feeds = example_feeds(model)
    feeds["images"][0, 0, 0, 0] = np.nan
    assert np.isnan(session.run(feeds)["logits"]).all()


def test_each_library_tells_nan_and_infinity_in_its_own_arrays():
    """`all_finite` on each executor's own arrays (torch's tensors, a simulated card's, CuPy's host
    twin, ...): a bool, a 0-d boolean read later, or None where the library cannot tell."""
    from hetero import executors
    from hetero.executors.cupy_executor import CupyExecutor
    from hetero.executors.sim_executor import simulate

    told = {}
    for executor in [*executors.available(), CupyExecutor.on_host(),
                     *simulate({"devices": [{"like": "numpy", "speed": 1}]})]:
        flags = [executor.all_finite(executor.to_device(np.array(values, dtype)))
                 for values, dtype in [([1, 2], np.float32), ([1, np.nan], np.float32),
                                       ([-np.inf, 0], np.float64), ([1, 2], np.int64)]]
        told[executor.name] = None if flags[0] is None else [bool(flag) for flag in flags]
    assert told["numpy@cpu"] == told["sim@sim:0"] == told["cupy@cpu"] == [True, False, False, True]
    assert told.get("torch@cpu", [True, False, False, True]) == [True, False, False, True]  # on its tensors
    assert all(flags in (None, [True, False, False, True]) for flags in told.values()), told
