"""The server's limits as figures: keep-alive latency, and memory under big JSON bodies.

    python benchmarks/serve_limits.py [--quick]

Starts `hetero serve` in a process of its own on a temporary repository holding a one-element
Identity model (ONNX Runtime, one CPU stream) and prints a markdown table, figure | measured |
target | met?, for issue 11's targets:

- p50 and p99 of tritonclient.http on one keep-alive connection, --requests sequential requests;
  tritonclient.grpc's p50 for comparison, and `Session.run` of the same model in-process as the
  peer;
- the server's resident peak (VmHWM in /proc) over its resident size before one JSON request of
  --big-mb, as a multiple of the body;
- --clients clients that each send the headers and first MiB of a --body-mb JSON request, wait
  for each other, then send the rest: the server's resident peak, absolute and over its size
  before, against --budget-mb (`hetero serve --max-inflight-mb`, 1 GiB by default), and how many
  were answered 200 and 503.

A minute or so on 2 cores; --quick is a smoke of a few seconds (8 MiB bodies, a 128 MiB budget
whose absolute row the server's own footprint exceeds), not the figures.
"""

from __future__ import annotations

import argparse
import http.client
import os
import select
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import hetero
from hetero.bench import settled_times
from hetero.bench.serving import MiB, identity_repository, json_infer_body, memory_kib, reset_peak, serve

Row = tuple[str, str, str, str]


def post(port: int, body: bytes, start: threading.Barrier | None = None) -> int:
    """POST a JSON `body` to the Identity model and return the answer's HTTP status: the headers and
    the first MiB, then (once every client of `start` has got that far) the rest a MiB at a time,
    unless the server has answered already (a 503 comes before the body is read)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.putrequest("POST", "/v2/models/identity/infer")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(body)))
        view = memoryview(body)
        connection.endheaders(view[:MiB])
        settle = 0.0
        if start is not None:
            start.wait()
            settle = 0.5  # time for the server to read every client's headers
        for offset in range(MiB, len(body), MiB):
            if select.select([connection.sock], [], [], settle)[0]:
                break
            settle = 0.0
            connection.send(view[offset:offset + MiB])
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def latency(port: int, grpc_port: int, model: Path, requests: int) -> list[Row]:
    """Sequential one-element requests: HTTP keep-alive, gRPC, and in-process `Session.run`."""
    x = np.ones(1, np.float32)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{port}", connection_timeout=30, network_timeout=30)
    rpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    session = hetero.compile(model, ["onnxruntime"])
    try:
        inputs = {}
        for name, client in (("http", httpclient), ("grpc", grpcclient)):
            inputs[name] = client.InferInput("x", [1], "FP32")
            inputs[name].set_data_from_numpy(x)
        np.testing.assert_array_equal(http.infer("identity", [inputs["http"]]).as_numpy("y"), x)
        np.testing.assert_array_equal(rpc.infer("identity", [inputs["grpc"]]).as_numpy("y"), x)
        served = settled_times(lambda: http.infer("identity", [inputs["http"]]), requests)
        grpc = settled_times(lambda: rpc.infer("identity", [inputs["grpc"]], client_timeout=30), requests)
        local = settled_times(lambda: session.run({"x": x}), requests)
    finally:
        session.close()
        rpc.close()
        http.close()
    p50, p99 = np.percentile(served, [50, 99]) * 1e3
    return [("HTTP keep-alive p50, Identity of 1 element, ms", f"{p50:.2f}", "<= 3",
             "yes" if p50 <= 3 else "NO"),
            ("HTTP keep-alive p99, ms", f"{p99:.2f}", "", ""),
            ("gRPC p50, ms (comparison)", f"{np.median(grpc) * 1e3:.2f}", "", ""),
            ("in-process `Session.run` p50, ms (peer)", f"{np.median(local) * 1e3:.3f}", "", "")]


def one_big_request(pid: int, port: int, mib: float) -> list[Row]:
    """Resident peak over the resident size before one JSON request, as a multiple of its body."""
    body = json_infer_body(int(mib * MiB))
    before = memory_kib(pid)
    reset_peak(pid)
    status = post(port, body)
    growth = (memory_kib(pid, "VmHWM") - before) * 1024 / len(body)
    figure = f"server RSS growth for one {len(body) / MiB:.0f} MiB JSON request, x body"
    if status != 200:
        return [(figure, f"answered {status}", "<= 6", "NO")]
    return [(figure, f"{growth:.2f}", "<= 6", "yes" if growth <= 6 else "NO")]


def crowd(pid: int, port: int, clients: int, mib: float, budget_mib: float) -> list[Row]:
    """`clients` clients holding a JSON body each at once: the resident peak and who was answered what."""
    body = json_infer_body(int(mib * MiB))
    before = memory_kib(pid) / 1024
    reset_peak(pid)
    start = threading.Barrier(clients, timeout=60)
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(post, port, body, start) for _ in range(clients)]
        answers = Counter()
        for future in futures:
            try:
                answers[future.result(timeout=300)] += 1
            except Exception as exc:  # a failed client is a figure of its own
                answers[type(exc).__name__] += 1
    peak = memory_kib(pid, "VmHWM") / 1024
    ok, refused = answers.pop(200, 0), answers.pop(503, 0)
    others = "".join(f", {count} {what}" for what, count in answers.items())
    what = f"{clients} clients x {len(body) / MiB:.0f} MiB JSON"
    target = f"<= {budget_mib:g} (--max-inflight-mb)"
    return [(f"peak server RSS, {what}, MiB", f"{peak:.0f} (idle {before:.0f})", target,
             "yes" if peak <= budget_mib else "NO"),
            ("server RSS growth over idle, same, MiB", f"{peak - before:.0f}", target,
             "yes" if peak - before <= budget_mib else "NO"),
            ("clients answered 200 / 503", f"{ok} / {refused}{others}", "the rest 503, none else",
             "yes" if ok and not answers else "NO")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="sequential requests per latency row")
    parser.add_argument("--big-mb", type=float, default=57.0, help="the single JSON request's body, MiB")
    parser.add_argument("--clients", type=int, default=40, help="clients holding a body each at once")
    parser.add_argument("--body-mb", type=float, default=60.0, help="each of those clients' body, MiB")
    parser.add_argument("--budget-mb", type=float, default=1024.0, help="hetero serve --max-inflight-mb")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke: 200 requests a row, 8 MiB bodies, a 128 MiB budget")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.big_mb, args.body_mb, args.budget_mb = 200, 8.0, 8.0, 128.0
    if min(args.requests, args.big_mb, args.body_mb, args.budget_mb, args.clients) <= 0:
        parser.error("--requests, --big-mb, --body-mb, --budget-mb and --clients must be positive")
    limits = ("--max-request-mb", f"{max(64.0, args.big_mb + 1, args.body_mb + 1):g}",
              "--max-inflight-mb", f"{args.budget_mb:g}")
    print(f"hetero serve, {os.cpu_count()} cores, {args.requests} sequential requests per latency row")
    with tempfile.TemporaryDirectory() as tmp:
        repo = identity_repository(Path(tmp))
        with serve(repo, *limits) as server:
            rows = latency(server.http_port, server.grpc_port, repo / "identity" / "1" / "model.onnx",
                           args.requests)
            rows += one_big_request(server.pid, server.http_port, args.big_mb)
            rows += crowd(server.pid, server.http_port, args.clients, args.body_mb, args.budget_mb)
    print("\n| figure | measured | target | met? |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
