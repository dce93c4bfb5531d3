"""What `hetero serve` lets its clients hold: open connections, time to send headers, idle keep-alive
connections, request bytes across all requests; and keep-alive HTTP without Nagle's delay."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from hetero.bench.serving import identity_repository
from hetero.serve import Server

tritonhttp = pytest.importorskip("tritonclient.http")
tritongrpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return identity_repository(tmp_path_factory.mktemp("limits"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[Server]:
    with Server(repo, http_port=0, grpc_port=0, max_connections=8, header_timeout_s=0.5, idle_timeout_s=1.0,
                max_inflight_bytes=1 << 20, max_request_bytes=4 << 20) as running:
        yield running


def _infer(server: Server, values: np.ndarray) -> np.ndarray:
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = tritonhttp.InferInput("x", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    try:
        return client.infer("identity", [tensor]).as_numpy("y")
    finally:
        client.close()


def _read_all(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


def test_connection_cap_and_header_timeout(server: Server) -> None:
    """Eight idle connections fill the cap: the ninth is refused at once (503); the idle ones are closed
    with a 408 when their headers do not come; then clients are served again."""
    idle = [socket.create_connection(("127.0.0.1", server.http_port), timeout=10) for _ in range(8)]
    try:
        time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as extra:
            start = time.perf_counter()
            refused = _read_all(extra)
        assert refused.startswith(b"HTTP/1.1 503") and b"too many open connections" in refused
        assert time.perf_counter() - start < 0.4  # before any header timeout
        idle[0].sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        for sock in idle:
            reply = _read_all(sock)
            assert reply.startswith(b"HTTP/1.1 408") and b"headers not received in time" in reply, reply
    finally:
        for sock in idle:
            sock.close()
    np.testing.assert_array_equal(_infer(server, np.arange(3, dtype=np.float32)), np.arange(3))


def test_idle_keep_alive_connection_closed(server: Server) -> None:
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[5]}]}'
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        first = b""
        while b"[5.0]" not in first and (chunk := sock.recv(65536)):  # headers, body: separate segments
            first += chunk
        assert first.startswith(b"HTTP/1.1 200")
        start = time.perf_counter()
        assert _read_all(sock) == b""  # closed by the server after idle_timeout_s
        assert 0.5 < time.perf_counter() - start < 5


def test_bytes_in_flight_budget(server: Server) -> None:
    """Clients holding big bodies share a budget of 1 MiB (each byte counted twice): the first holds
    800 kB, the others are refused with 503 at once, over HTTP and gRPC; once it lets go, all is served."""
    holders = []
    try:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
            sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n"
                         b"\r\n{\"inputs\"")
            holders.append(sock)
        time.sleep(0.3)
        refused = [_read_all(sock) for sock in holders[1:]]
        for reply in refused:
            assert reply.startswith(b"HTTP/1.1 503") and b"max_inflight_bytes" in reply, reply
        with pytest.raises(InferenceServerException, match="max_inflight_bytes"):
            _infer(server, np.zeros(40_000, np.float32))  # 160 kB: 320 kB more is past the budget
        client = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        tensor = tritongrpc.InferInput("x", [40_000], "FP32")
        tensor.set_data_from_numpy(np.zeros(40_000, np.float32))
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            client.infer("identity", [tensor])
    finally:
        for sock in holders:
            sock.close()
    deadline = time.monotonic() + 5
    while server.budget.held and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.budget.held == 0
    np.testing.assert_array_equal(_infer(server, np.ones(40_000, np.float32)), np.ones(40_000))
    assert client.infer("identity", [tensor]).as_numpy("y").shape == (40_000,)
    client.close()


def test_keep_alive_http_has_no_nagle_delay(server: Server) -> None:
    """tritonclient.http on one keep-alive connection: without TCP_NODELAY each request waited ~40 ms
    (Nagle's algorithm against delayed ACKs); the bound leaves a loaded machine a wide margin."""
    client = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    tensor = tritonhttp.InferInput("x", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, np.float32))
    seconds = []
    for _ in range(40):
        start = time.perf_counter()
        client.infer("identity", [tensor])
        seconds.append(time.perf_counter() - start)
    client.close()
    assert np.median(seconds) < 0.02, np.median(seconds)


def test_connection_flood_past_the_file_limit(tmp_path: Path) -> None:
    """The issue's case: a server limited to 256 files, 300 connections that send nothing. It keeps
    serving once their header time is up, and logs a handful of lines, not a storm of tracebacks."""
    identity_repository(tmp_path)
    script = ("import resource, sys, time\n"
              "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
              "from hetero.serve import Server, logs\n"
              "logs.configure('warning')\n"
              "s = Server(sys.argv[1], http_port=0, grpc_port=0, header_timeout_s=1.0).start()\n"
              "print(s.http_port, flush=True); time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    flood = []
    try:
        port = int(process.stdout.readline())
        for _ in range(300):
            try:
                flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        served, deadline = None, time.monotonic() + 15
        while served is None and time.monotonic() < deadline:
            try:
                served = httpx.post(f"http://127.0.0.1:{port}/v2/models/identity/infer", timeout=5, json={
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [2]}]})
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            if served.status_code == 503:
                served = None
                time.sleep(0.2)
        assert served is not None and served.json()["outputs"][0]["data"] == [2.0]
    finally:
        for sock in flood:
            sock.close()
        process.kill()
        _, errors = process.communicate(timeout=30)
    assert errors.count("\n") < 20 and "Traceback" not in errors, errors[:3000]


def test_content_length_with_thousands_of_leading_zeros(server: Server) -> None:
    """The HTTP parser takes any number of leading zeros; the body is then read as declared."""
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[7]}]}'
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %s%d\r\n\r\n" % (b"0" * 5000, len(body)) + body)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'"data":[7.0]}]}'), reply


def test_body_timeout_closes_the_connection(repo: Path) -> None:
    """Clients dribbling their bodies get a 408 and lose their connections, though they keep sending:
    they would hold every connection slot for as long as their declared bodies last."""
    with Server(repo, http_port=0, grpc_port=0, max_connections=2, body_timeout_s=0.3) as running:
        slow = [socket.create_connection(("127.0.0.1", running.http_port), timeout=10) for _ in range(2)]
        replies = [b"", b""]
        try:
            for sock in slow:
                sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 1000\r\n\r\n")
                sock.setblocking(False)
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline and not all(r.endswith(b"\0") for r in replies):
                for index, sock in enumerate(slow):
                    try:
                        sock.send(b" ")
                        replies[index] += sock.recv(4096) or b"\0"  # \0: closed by the server
                    except BlockingIOError:
                        pass
                    except OSError:
                        replies[index] += b"\0"
                time.sleep(0.05)
        finally:
            for sock in slow:
                sock.close()
        for reply in replies:
            assert reply.startswith(b"HTTP/1.1 408") and reply.endswith(b"\0"), reply
        np.testing.assert_array_equal(_infer(running, np.arange(3, dtype=np.float32)), np.arange(3))


@pytest.mark.parametrize("length", [b"-5", b"abc", b"99999999999999999999999999999"])
def test_malformed_content_length_is_a_json_400(server: Server, length: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}"
                     % length)
        reply = _read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head, reply
    assert json.loads(body) == {"error": "Invalid HTTP request received."}, reply
