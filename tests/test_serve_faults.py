"""Faults under `hetero serve`, driven by tritonclient over HTTP and gRPC: a kernel that raises, hangs or
is slow on command (the request's own data says which), clients whose deadline passes in the queue or
inside a batch, clients that cancel or drop their connection. Every request is answered or failed
with a clear error within its deadline, none runs after its client gave up while queued, no thread
dies, and the server holds no request bytes afterwards."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import hetero
from hetero.serve import Server

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

NORMAL, RAISE, HANG, SLOW = 0.0, 1.0, 2.0, 3.0  # column 0 of a row: what the kernel does with it
GATE = threading.Event()  # a hanging row waits for this (at most 30 s)
RAN: list[float] = []  # column 1 of every row the kernel ran: the request's id


@hetero.kernel("test.faults", "Fault")
def _fault(x: np.ndarray) -> np.ndarray:
    RAN.extend(x[:, 1].tolist())
    codes = set(x[:, 0].tolist())
    if RAISE in codes:
        raise RuntimeError("injected fault")
    if HANG in codes:
        GATE.wait(30)
    if SLOW in codes:
        time.sleep(0.5)
    return x + 1


def _faulty() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Fault", ["x"], ["y"], domain="test.faults")], "faulty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("test.faults", 1)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("faults")
    for name, config in [("faulty", ""), ("batched", "max_batch_size: 8\ndynamic_batching: "
                                                      "{max_queue_delay_microseconds: 200000, "
                                                      "preferred_batch_size: [2]}\n")]:
        (root / name / "1").mkdir(parents=True)
        onnx.save(_faulty(), root / name / "1" / "model.onnx")
        (root / name / "config.yaml").write_text("executors: [numpy]\ncpu_streams: 1\n" + config)
    GATE.set()  # warm-up runs unhindered
    with Server(root, http_port=0, grpc_port=0) as running:
        yield running


@pytest.fixture(autouse=True)
def healthy_afterwards(server: Server, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No hetero thread dies, nothing stays queued, no request bytes stay reserved, no fault is logged
    as the server's own internal error."""
    GATE.clear()
    RAN.clear()
    before = {t.name for t in threading.enumerate() if t.name.startswith("hetero-")}
    yield
    GATE.set()
    deadline = time.monotonic() + 10
    while server.budget.held and time.monotonic() < deadline:
        time.sleep(0.05)
    after = {t.name for t in threading.enumerate() if t.name.startswith("hetero-")}
    assert before <= after, before - after
    assert server.budget.held == 0
    assert not [r for r in caplog.get_records("call") if r.getMessage() == "internal error"]
    for served in server.repository.ready():
        assert not served.batcher._pending
    assert _grpc_infer(server, "faulty", NORMAL, 99.0, timeout=10).as_numpy("y").tolist() == [[1.0, 100.0]]


def _rows(code: float, ident: float) -> np.ndarray:
    return np.array([[code, ident]], np.float32)


def _grpc_infer(server: Server, model: str, code: float, ident: float, timeout: float):
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    tensor = tritongrpc.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(_rows(code, ident))
    try:
        return client.infer(model, [tensor], client_timeout=timeout)
    finally:
        client.close()


def _http_infer(server: Server, model: str, code: float, ident: float, timeout_us: int | None = None):
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=30)
    tensor = tritonhttp.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(_rows(code, ident))
    try:
        return client.infer(model, [tensor], timeout=timeout_us)
    finally:
        client.close()


def _until_running(ident: float) -> None:
    """Wait (at most 10 s) until the kernel has started on the request `ident`."""
    deadline = time.monotonic() + 10
    while ident not in RAN and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ident in RAN


def _in_background(call, *args) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        start = time.perf_counter()
        try:
            outcome["result"] = call(*args)
        except InferenceServerException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.perf_counter() - start
    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_deadline_inside_a_batch_never_strands_its_batch_mates(server: Server) -> None:
    """A (0.2 s deadline) and B (10 s) run in one 0.5 s batch: A fails at its deadline, B gets its rows."""
    GATE.set()
    executions = server.repository.get("batched").stats.statistics()["execution_count"]
    a = _in_background(_grpc_infer, server, "batched", SLOW, 1.0, 0.2)
    b = _in_background(_grpc_infer, server, "batched", NORMAL, 2.0, 10)
    for thread, _ in (a, b):
        thread.join(15)
    assert "DEADLINE_EXCEEDED" in str(a[1]["error"]) and a[1]["seconds"] < 3
    assert b[1]["result"].as_numpy("y").tolist() == [[1.0, 3.0]] and b[1]["seconds"] < 5
    stats = server.repository.get("batched").stats.statistics()
    assert stats["execution_count"] == executions + 1  # one batch of two: they were batch-mates
    assert sorted(RAN) == [1.0, 2.0]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_whose_deadline_passes_in_the_queue_never_run(server: Server, protocol: str) -> None:
    """A hung request holds the only replica; five clients give up while queued (gRPC deadline, HTTP
    timeout parameter), one waits. Released, the hung one and the patient one run; the five never."""
    hung = _in_background(_grpc_infer, server, "faulty", HANG, 100.0, 30)
    _until_running(100.0)
    if protocol == "grpc":
        impatient = [_in_background(_grpc_infer, server, "faulty", NORMAL, float(k), 0.3) for k in range(5)]
    else:
        impatient = [_in_background(_http_infer, server, "faulty", NORMAL, float(k), 300_000)
                     for k in range(5)]
    patient = _in_background(_grpc_infer, server, "faulty", NORMAL, 200.0, 30)
    for thread, outcome in impatient:
        thread.join(15)
        assert outcome["seconds"] < 3, outcome
        expected = "DEADLINE_EXCEEDED" if protocol == "grpc" else "no answer within the request's timeout"
        assert expected in str(outcome["error"])
    GATE.set()
    for thread, _ in (hung, patient):
        thread.join(15)
    assert hung[1]["result"].as_numpy("y").tolist() == [[3.0, 101.0]]
    assert patient[1]["result"].as_numpy("y").tolist() == [[1.0, 201.0]]
    assert sorted(RAN) == [100.0, 200.0]


def test_raising_kernel_answers_a_clear_error(server: Server) -> None:
    GATE.set()
    with pytest.raises(InferenceServerException, match="injected fault") as caught:
        _http_infer(server, "faulty", RAISE, 1.0)
    assert "faulty" in str(caught.value)
    with pytest.raises(InferenceServerException, match="injected fault"):
        _grpc_infer(server, "faulty", RAISE, 2.0, 10)
    a = _in_background(_grpc_infer, server, "batched", RAISE, 3.0, 10)  # batch-mates share the error
    b = _in_background(_grpc_infer, server, "batched", NORMAL, 4.0, 10)
    for thread, outcome in (a, b):
        thread.join(15)
        assert "injected fault" in str(outcome["error"])


def test_hanging_kernel_bounded_by_the_client_deadline(server: Server) -> None:
    hung = _in_background(_http_infer, server, "faulty", HANG, 1.0, 500_000)
    hung[0].join(15)
    assert hung[1]["seconds"] < 3 and "timeout of 500 ms" in str(hung[1]["error"])
    over_grpc = _in_background(_grpc_infer, server, "faulty", NORMAL, 2.0, 0.5)
    over_grpc[0].join(15)
    assert over_grpc[1]["seconds"] < 3 and "DEADLINE_EXCEEDED" in str(over_grpc[1]["error"])


def test_cancelled_and_dropped_clients(server: Server) -> None:
    """gRPC calls cancelled by their client and HTTP connections closed mid-request: the server drops
    what is queued, finishes what runs, and answers the next clients."""
    hung = _in_background(_grpc_infer, server, "faulty", HANG, 100.0, 30)
    _until_running(100.0)
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    tensor = tritongrpc.InferInput("x", [1, 2], "FP32")
    calls = []
    for k in range(5):
        tensor.set_data_from_numpy(_rows(NORMAL, float(k)))
        calls.append(client.async_infer("faulty", [tensor], callback=lambda result, error: None))
    body = (b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[0,50]}]}')
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
            sock.sendall(b"POST /v2/models/faulty/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
    time.sleep(0.3)
    for call in calls:
        call.cancel()
    client.close()
    time.sleep(0.3)
    GATE.set()
    hung[0].join(15)
    assert hung[1]["result"].as_numpy("y").tolist() == [[3.0, 101.0]]
    assert set(RAN) <= {100.0, 50.0}  # the cancelled gRPC calls never ran (closed HTTP ones may)


def test_unload_with_a_hung_kernel_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "faulty" / "1").mkdir(parents=True)
    onnx.save(_faulty(), tmp_path / "faulty" / "1" / "model.onnx")
    (tmp_path / "faulty" / "config.yaml").write_text("executors: [numpy]\ncpu_streams: 1\n")
    GATE.set()
    server = Server(tmp_path, http_port=0, grpc_port=0, shutdown_timeout_s=1.0).start()
    GATE.clear()
    try:
        _in_background(_grpc_infer, server, "faulty", HANG, 1.0, 30)
        _until_running(1.0)
        queued = _in_background(_grpc_infer, server, "faulty", NORMAL, 2.0, 30)
        time.sleep(0.2)
        start = time.perf_counter()
        server.stop()
        assert time.perf_counter() - start < 10
        queued[0].join(15)
        assert "unloaded before running" in str(queued[1].get("error")) or "UNAVAILABLE" in str(
            queued[1].get("error")), queued[1]
    finally:
        GATE.set()
        server.stop()


def test_a_call_over_before_its_request_was_queued_is_dropped(server: Server) -> None:
    """A gRPC call that ended (client gone) before its cancel callback could be registered: its request
    is cancelled at once, never run."""
    from hetero.serve.protocol import InferInput, ServeError

    hung = _in_background(_grpc_infer, server, "faulty", HANG, 100.0, 30)
    _until_running(100.0)
    with pytest.raises(ServeError, match="call ended before its answer") as caught:
        server.infer_blocking("grpc", "faulty", "", [InferInput("x", "FP32", (1, 2), data=[NORMAL, 7.0])],
                              None, on_end=lambda _: False)  # what grpcio's add_callback says then
    assert caught.value.status == 499
    GATE.set()
    hung[0].join(15)
    assert sorted(RAN) == [100.0]


def test_stop_with_calls_in_flight(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Three gRPC calls fill max_connections (a kernel hung, a batch of another model waiting for the
    same CPU, a request queued): the next are refused at once. Stopping answers every call in flight
    (HTTP too) within the shutdown timeout, counted once for all models, and leaves none of the
    server's gRPC threads behind."""
    for name in ("faulty", "other"):
        (tmp_path / name / "1").mkdir(parents=True)
        onnx.save(_faulty(), tmp_path / name / "1" / "model.onnx")
        (tmp_path / name / "config.yaml").write_text("executors: [numpy]\ncpu_streams: 1\n")
    GATE.set()
    before = set(threading.enumerate())
    server = Server(tmp_path, http_port=0, grpc_port=0, max_connections=3, shutdown_timeout_s=2.0).start()
    GATE.clear()
    RAN.clear()  # the models' warm-up runs
    try:
        calls = [_in_background(_grpc_infer, server, "faulty", HANG, 1.0, 30)]
        _until_running(1.0)
        calls.append(_in_background(_grpc_infer, server, "other", NORMAL, 2.0, 30))
        other = server.repository.get("other").batcher
        deadline = time.monotonic() + 10
        while not other._in_flight and time.monotonic() < deadline:  # sent to its replica, which
            time.sleep(0.01)  # waits for the CPU
        calls += [_in_background(_grpc_infer, server, "faulty", NORMAL, 3.0, 30),
                  _in_background(_http_infer, server, "other", NORMAL, 4.0)]
        time.sleep(0.3)
        for ident in (5.0, 6.0):
            refused = _in_background(_grpc_infer, server, "faulty", NORMAL, ident, 30)
            refused[0].join(15)
            assert "RESOURCE_EXHAUSTED" in str(refused[1]["error"]) and refused[1]["seconds"] < 3
        start = time.perf_counter()
        server.stop()
        assert time.perf_counter() - start < 4.0  # one 2 s timeout, not one per listener and model
        for thread, outcome in calls:
            thread.join(15)
            assert "error" in outcome and outcome["seconds"] < 10, outcome
        assert "the server stopped before answering" in str(calls[-1][1]["error"])
        assert sorted(RAN) == [1.0]
    finally:
        GATE.set()
        server.stop()
    _until_running(2.0)  # the batch waiting for the CPU runs once it is free; the queued ones never
    assert sorted(RAN) == [1.0, 2.0]
    deadline = time.monotonic() + 10
    while any(t.name.startswith("hetero-grpc") for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "the gRPC thread pool outlived its server"
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.getMessage() == "internal error"]
