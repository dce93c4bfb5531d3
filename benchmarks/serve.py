"""Serving throughput: `hetero serve` on loopback against the same model run in-process.

    python benchmarks/serve.py [--model mobilenet_v2] [--executors onnxruntime] [--seconds 5]

The zoo model gets a symbolic batch dim (`zoo.with_dynamic_batch`). In-process throughput is
`ReplicaPool.map` over single images, measured right after each served row (other work on a
shared host makes both drift); the server runs the same replicas in a subprocess (so the
load generator does not share its interpreter), once with dynamic batching and once without, and
is driven at concurrency 1, 8, 16, 32, each request one image: over gRPC with every request
serialized once and resent (as perf_analyzer does; the perf-analyzer package pip finds here is a
placeholder without the binary), or with tritonclient's asyncio HTTP client. The load generator
runs on the same host, so it takes CPU from the server that the in-process run keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
import tritonclient.grpc as grpcclient
import tritonclient.http.aio as httpaio
from tritonclient.grpc import service_pb2

from hetero import zoo
from hetero.bench.serving import serve
from hetero.runtime import ReplicaPool

CONCURRENCY = (1, 8, 16, 32)


@dataclass
class Tally:
    """Requests done, seconds spent and CPU seconds used (by the server and by the load generator,
    or in-process) over the slices of one row."""

    requests: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    client_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def per_request_ms(self, cpu: float) -> float:
        return cpu / self.requests * 1e3


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process, or of process `pid`, all threads."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process(pool: ReplicaPool, images: list[np.ndarray], seconds: float, tally: Tally) -> None:
    """`ReplicaPool.map` over single images for `seconds`."""
    frames = [{"images": x} for x in images]
    cpu, start = cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        tally.requests += sum(1 for _ in pool.map(frames))
    tally.seconds += time.perf_counter() - start
    tally.cpu += cpu_seconds() - cpu


def grpc_sender(port: int, images: list[np.ndarray]) -> tuple[Callable[[int], Awaitable], Callable]:
    """ModelInfer with each request serialized once and sent again and again, as perf_analyzer does,
    so the load generator takes little CPU from the server."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                response_deserializer=service_pb2.ModelInferResponse.FromString)
    requests = []
    for image in images:
        request = service_pb2.ModelInferRequest(model_name="model")
        request.inputs.add(name="images", datatype="FP32", shape=image.shape)
        request.raw_input_contents.append(image.tobytes())
        requests.append(request.SerializeToString())
    return lambda k: infer(requests[k % len(requests)]), channel.close


def http_sender(port: int, images: list[np.ndarray]) -> tuple[Callable[[int], Awaitable], Callable]:
    """tritonclient's asyncio HTTP client with binary tensor data."""
    client = httpaio.InferenceServerClient(f"127.0.0.1:{port}")
    inputs = []
    for image in images:
        inputs.append(httpaio.InferInput("images", list(image.shape), "FP32"))
        inputs[-1].set_data_from_numpy(image)
    return lambda k: client.infer("model", [inputs[k % len(inputs)]]), client.close


async def drive(protocol: str, port: int, server_pid: int, images: list[np.ndarray], concurrency: int,
                seconds: float, tally: Tally) -> None:
    """`concurrency` clients sending one image each for `seconds`, after a short ramp-up."""
    send, close = (grpc_sender if protocol == "grpc" else http_sender)(port, images)
    latencies: list[float] = []

    async def worker(k: int, until: float, record: bool) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            await send(k)
            if record:
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(k, time.perf_counter() + 0.3, False) for k in range(concurrency)))
    cpu, client_cpu, start = cpu_seconds(server_pid), cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(k, start + seconds, True) for k in range(concurrency)))
    tally.seconds += time.perf_counter() - start
    tally.cpu += cpu_seconds(server_pid) - cpu
    tally.client_cpu += cpu_seconds() - client_cpu
    tally.requests += len(latencies)
    tally.latencies += latencies
    await close()


def check(port: int, model: onnx.ModelProto, executors: list[str], image: np.ndarray) -> None:
    """The served result equals the in-process one."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    tensor = grpcclient.InferInput("images", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    served = client.infer("model", [tensor]).as_numpy("logits")
    pool = ReplicaPool.build(model, [executors], cpu_streams=1, warmup=False)
    expected = pool.run({"images": image})["logits"]
    pool.close()
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)


def measure(args: argparse.Namespace, repo: Path, pool: ReplicaPool, model: onnx.ModelProto,
            images: list[np.ndarray], batching: bool) -> list[tuple[int, Tally, Tally]]:
    """One server configuration at every concurrency, each row taking turns with in-process runs."""
    config = f"executors: [{args.executors}]\nmax_queue_size: 256\n"
    if batching:
        config += (f"max_batch_size: {args.max_batch_size}\n"
                   f"dynamic_batching: {{max_queue_delay_microseconds: {args.delay_us}}}\n")
    (repo / "model" / "config.yaml").write_text(config)
    rows = []
    with serve(repo) as server:
        check(server.grpc_port, model, args.executors.split(","), images[0])
        port = server.grpc_port if args.protocol == "grpc" else server.http_port
        piece = args.seconds / args.slices
        for concurrency in CONCURRENCY:
            served, local = Tally(), Tally()
            for _ in range(args.slices):  # in turns, as the load of a shared host drifts
                asyncio.run(drive(args.protocol, port, server.pid, images, concurrency, piece, served))
                in_process(pool, images, piece, local)
            rows.append((concurrency, served, local))
            print(f"  batching {'on ' if batching else 'off'} c={concurrency:<3} {served.rate:7.1f} req/s, "
                  f"in-process {local.rate:7.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2", choices=["small_cnn", "mobilenet_v2", "resnet50"])
    parser.add_argument("--executors", default="onnxruntime", help="one replica's executors, comma-separated")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per row and side")
    parser.add_argument("--slices", type=int, default=3, help="served and in-process take turns this often")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=2000, help="max_queue_delay_microseconds")
    parser.add_argument("--protocol", default="grpc", choices=["grpc", "http"], help="what the clients speak")
    args = parser.parse_args()
    size = 224 if args.model != "small_cnn" else 32
    model = zoo.with_dynamic_batch(getattr(zoo, args.model)())
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((1, 3, size, size)).astype(np.float32) for _ in range(32)]
    print(f"{args.model}, executors {args.executors}, {os.cpu_count()} cores, {args.protocol}, "
          f"{args.seconds:g} s per row and side")
    pool = ReplicaPool.build(model, [args.executors.split(",")])
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        (repo / "model" / "1").mkdir(parents=True)
        onnx.save(model, repo / "model" / "1" / "model.onnx")
        results = {batching: measure(args, repo, pool, model, images, batching) for batching in (True, False)}
    pool.close()
    print("\n| batching | concurrency | served req/s | p99 ms | in-process req/s | served / in-process | "
          "CPU ms/req: server | load generator | in-process |\n|---|---|---|---|---|---|---|---|---|")
    for batching, rows in results.items():
        for concurrency, served, local in rows:
            print(f"| {'on' if batching else 'off'} | {concurrency} | {served.rate:.1f} | "
                  f"{np.percentile(served.latencies, 99) * 1e3:.1f} | {local.rate:.1f} | "
                  f"{served.rate / local.rate:.2f} | {served.per_request_ms(served.cpu):.2f} | "
                  f"{served.per_request_ms(served.client_cpu):.2f} | {local.per_request_ms(local.cpu):.2f} |")


if __name__ == "__main__":
    main()
