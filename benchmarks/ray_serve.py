"""Hetero on Ray against Ray Serve, in one run on a local two-node Ray cluster.

    python benchmarks/ray_serve.py [--models small_cnn,mobilenet_v2] [--seconds 5] [--rounds 10]

1. Added latency. Small models served in-host (`hetero serve`) and on the cluster
   (`hetero serve --ray`), the same repository and config (ONNX Runtime, one CPU stream), both
   asked over gRPC at concurrency 1 in interleaved rounds: a 32x32 CNN (12 KiB a request) and
   MobileNetV2 (a 588 KiB image). Target: what the Ray path adds is no more than the round trip of
   a no-op Ray Serve deployment over HTTP, measured in the same rounds (a no-op Ray actor call is
   shown too).
2. Routing. Two simulated nodes, a card on each paced to 90 and 30 ms a request (`--pace-ms`; speeds 1 and 3;
   the pacing sleeps, so the nodes do not share this machine's cores, and is long enough that the
   cores are not what limits the rate), driven at concurrency 16:
   each node alone, then both, through Hetero's pool (speed-aware) and through a Ray Serve
   deployment on the same replicas (its default router: power of two choices by queue length).
   Target: both together >= 0.9x the sum of each alone.
3. Faults. A third node joins under load, serves, and is killed: requests lost (target 0) and
   answers that differ from the model's.

The nodes are `ray.cluster_utils.Cluster` processes on this machine; the figures are ratios from
one run, as the README's tables are.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import ray
import tritonclient.grpc as grpcclient
from ray import serve
from ray.cluster_utils import Cluster as RayCluster

import hetero
from hetero import zoo
from hetero.bench.serving import free_port
from hetero.executors import CompiledPartition, Device
from hetero.executors.numpy_executor import NumpyExecutor
from hetero.graph import example_feeds
from hetero.ray import Cluster, NodeInfo
from hetero.ray.cluster import INLINE_BYTES
from hetero.ray.serving import ClusterServer
from hetero.serve import Server

ROOT = Path(__file__).resolve().parents[1]
PACE = {"slow": 0.09, "fast": 0.03}  # seconds per request of the simulated cards


class Paced(NumpyExecutor):
    """A simulated card: numpy's results, `seconds` per partition run (sleeping)."""

    library = "paced"
    accelerator = True

    def __init__(self, seconds: float):
        super().__init__(Device("sim", 0))
        self.seconds = seconds

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        return _PacedPartition(super().compile(part), self.seconds)


class _PacedPartition(CompiledPartition):
    def __init__(self, inner: CompiledPartition, seconds: float):
        self.inner, self.seconds = inner, seconds
        self.input_names, self.output_names = inner.input_names, inner.output_names

    def __call__(self, inputs: list[Any]) -> list[Any]:
        time.sleep(self.seconds)
        return self.inner(inputs)


def paced_on(*speeds: str) -> Callable[[NodeInfo], list | None]:
    """Hetero's replicas: a paced card on each node whose `speed` label is in `speeds`."""
    def replicas(node: NodeInfo) -> list | None:
        speed = node.labels.get("speed")
        return [[Paced(PACE[speed])]] if speed in speeds else None
    return replicas


@serve.deployment(ray_actor_options={"num_cpus": 0})
class PacedReplica:
    """The same paced card as a Ray Serve replica: its pace is its node's."""

    def __init__(self, model: bytes, paces: dict[str, float]):
        self.session = hetero.compile(model, [Paced(paces[ray.get_runtime_context().get_node_id()])])

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(feeds)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class NoOp:
    async def __call__(self, request: Any) -> bytes:
        return b""


@ray.remote(num_cpus=0)
class NoOpActor:
    def ping(self) -> None:
        return None


def drive(call: Callable[[int], Awaitable], concurrency: int, seconds: float) -> tuple[float, int]:
    """`await call(i)` from `concurrency` asyncio tasks for `seconds`: (requests per second,
    failures). Both Ray Serve's handles and Hetero's `run_async` are awaited the same way."""
    done, failed = [0], [0]

    async def worker(k: int, until: float) -> None:
        i = k
        while time.perf_counter() < until:
            try:
                await call(i)
                done[0] += 1
            except Exception:
                failed[0] += 1
            i += concurrency

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(worker(k, start + seconds) for k in range(concurrency)))
        return time.perf_counter() - start

    elapsed = asyncio.run(main())
    return done[0] / elapsed, failed[0]


def latency(args: argparse.Namespace, models: dict[str, onnx.ModelProto]) -> None:
    repo = Path(tempfile.mkdtemp(prefix="ray-bench-repo-"))
    images = {}
    for name, model in models.items():
        (repo / name / "1").mkdir(parents=True)
        onnx.save(model, repo / name / "1" / "model.onnx")
        (repo / name / "config.yaml").write_text("executors: [onnxruntime]\ncpu_streams: 1\n")
        images[name] = example_feeds(hetero.load(model))["images"]
    in_host = Server(repo, http_port=0, grpc_port=0).start()
    on_ray = ClusterServer(repo, address=None, http_port=0, grpc_port=0).start()
    serve_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    serve.run(NoOp.bind(), name="noop", route_prefix="/noop")
    actor = NoOpActor.remote()
    ray.get(actor.ping.remote())
    try:
        clients = {name: grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
                   for name, server in (("in-host", in_host), ("ray", on_ray))}
        http = httpx.Client()
        calls: dict[tuple[str, str], Callable[[], object]] = {}
        for name, image in images.items():
            tensor = grpcclient.InferInput("images", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            reference = clients["in-host"].infer(name, [tensor]).as_numpy("logits")
            np.testing.assert_allclose(clients["ray"].infer(name, [tensor]).as_numpy("logits"), reference,
                                       rtol=1e-4, atol=1e-5)
            calls[name, "in-host"] = lambda n=name, t=tensor: clients["in-host"].infer(n, [t])
            calls[name, "ray"] = lambda n=name, t=tensor: clients["ray"].infer(n, [t])
        calls["-", "serve"] = lambda: http.post(f"http://127.0.0.1:{serve_port}/noop",
                                                content=b"x").raise_for_status()
        calls["-", "actor"] = lambda: ray.get(actor.ping.remote())
        times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        for call in calls.values():  # warm every path
            for _ in range(5):
                call()
        for _ in range(args.rounds):
            for key, call in calls.items():
                time.sleep(0.05)
                for _ in range(args.per_round):
                    start = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - start)
        http.close()
    finally:
        serve.delete("noop")
        ray.kill(actor)
        on_ray.stop()
        in_host.stop()
    median = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    p90 = {key: np.percentile(t, 90) * 1e3 for key, t in times.items()}
    noop = median["-", "serve"]
    print(f"\n## Added latency: concurrency 1, gRPC, {args.rounds} interleaved rounds of {args.per_round}\n")
    print("| model (input) | in-host `hetero serve` ms | `hetero serve --ray` ms | added ms "
          "| added <= Serve's round trip |\n|---|---|---|---|---|")
    for name, image in images.items():
        added = median[name, "ray"] - median[name, "in-host"]
        print(f"| {name} ({image.nbytes / 1024:.0f} KiB) | {median[name, 'in-host']:.2f} (p90 "
              f"{p90[name, 'in-host']:.1f}) | {median[name, 'ray']:.2f} (p90 {p90[name, 'ray']:.1f}) | "
              f"{added:.2f} | {'met' if added <= noop else 'NOT met'} |")
    print(f"\nno-op Ray Serve deployment over HTTP: {noop:.2f} ms (p90 {p90['-', 'serve']:.1f}); "
          f"no-op Ray actor call: {median['-', 'actor']:.2f} ms")


def routing(args: argparse.Namespace, cluster: Cluster, paces: dict[str, float]) -> None:
    model = zoo.small_cnn()
    feeds = [example_feeds(hetero.load(model), seed=i) for i in range(16)]
    rows = []
    hetero_rates = {}
    for label, speeds in (("slow", ("slow",)), ("fast", ("fast",)), ("both", ("slow", "fast"))):
        with cluster.deploy(model, paced_on(*speeds), max_in_flight=64) as pool:
            hetero_rates[label], failed = drive(lambda i, pool=pool: pool.run_async(feeds[i % 16]),
                                                args.concurrency, args.seconds)
            assert not failed
    rows.append(("Hetero (speed-aware, measured per replica)", hetero_rates))
    blob = model.SerializeToString()
    serve_rates = {}
    for label, resource, replicas in (("slow", "slow", 1), ("fast", "fast", 1), ("both", "paced", 2)):
        app = PacedReplica.options(num_replicas=replicas, ray_actor_options={
            "num_cpus": 0, "resources": {resource: 1}}).bind(blob, paces)
        handle = serve.run(app, name=f"paced-{label}", route_prefix=None)
        for i in range(8):
            handle.remote(feeds[i]).result()
        serve_rates[label], failed = drive(lambda i, h=handle: h.remote(feeds[i % 16]),
                                           args.concurrency, args.seconds)
        assert not failed
        serve.delete(f"paced-{label}")
    rows.append(("Ray Serve, default router (power of two choices)", serve_rates))
    print(f"\n## Routing: nodes paced to {PACE['slow'] * 1e3:g} and {PACE['fast'] * 1e3:g} ms a request "
          f"(speeds 1 and 3), concurrency {args.concurrency}, {args.seconds:g} s each\n")
    print("| router | slow node alone req/s | fast node alone req/s | sum | both req/s | both / sum |")
    print("|---|---|---|---|---|---|")
    for name, rates in rows:
        total = rates["slow"] + rates["fast"]
        print(f"| {name} | {rates['slow']:.1f} | {rates['fast']:.1f} | {total:.1f} | {rates['both']:.1f} | "
              f"{rates['both'] / total:.2f} |")
    ratio = hetero_rates["both"] / (hetero_rates["slow"] + hetero_rates["fast"])
    print(f"\nHetero: both / sum = {ratio:.2f} -> {'met' if ratio >= 0.9 else 'NOT met'} (target >= 0.9)")


def faults(args: argparse.Namespace, ray_cluster: RayCluster, cluster: Cluster) -> None:
    model = zoo.small_cnn()
    feeds = [example_feeds(hetero.load(model), seed=i) for i in range(16)]
    reference = hetero.compile(model, ["numpy"])
    expected = [reference.run(f)["logits"] for f in feeds]
    lost, wrong, sent = [0], [0], [0]
    with cluster.deploy(model, paced_on("slow", "fast"), max_in_flight=64) as pool:
        stop = threading.Event()

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                sent[0] += 1
                try:
                    got = pool.run(feeds[i % 16])["logits"]
                    wrong[0] += not np.allclose(got, expected[i % 16], rtol=1e-4, atol=1e-5)
                except Exception:
                    lost[0] += 1
                i += args.concurrency

        with ThreadPoolExecutor(args.concurrency) as threads:
            running = [threads.submit(client, k) for k in range(args.concurrency)]
            node = ray_cluster.add_node(num_cpus=2, labels={"speed": "fast"}, resources={"paced": 1})
            deadline = time.monotonic() + 120
            while not any(r.served for r in pool.on_node(node.node_id)):
                assert time.monotonic() < deadline, "the joining node never served"
                time.sleep(0.1)
            time.sleep(1.0)
            ray_cluster.remove_node(node)
            served = sum(r.served for r in pool.on_node(node.node_id))
            time.sleep(args.seconds)
            stop.set()
            for future in running:
                future.result()
    print(f"\n## Faults: a third node joins under load (concurrency {args.concurrency}), then is killed\n")
    print("| requests sent | served by the new node | lost | wrong answers |\n|---|---|---|---|")
    print(f"| {sent[0]} | {served} | {lost[0]} | {wrong[0]} |")
    print(f"\nlost: {lost[0]} -> {'met' if lost[0] == 0 and wrong[0] == 0 else 'NOT met'} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small_cnn,mobilenet_v2",
                        help="zoo models of the latency part, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput row")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds of the latency part")
    parser.add_argument("--per-round", type=int, default=10, help="requests per path and round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--parts", default="latency,routing,faults")
    parser.add_argument("--pace-ms", default="90,30", help="the slow and the fast card's ms a request")
    args = parser.parse_args()
    PACE["slow"], PACE["fast"] = (float(ms) / 1e3 for ms in args.pace_ms.split(","))
    parts = set(args.parts.split(","))
    start = time.perf_counter()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    # what `hetero serve --ray` sets when it connects (see hetero.ray.cluster.INLINE_BYTES)
    os.environ.setdefault("RAY_max_direct_call_object_size", str(INLINE_BYTES))
    ray_cluster = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "labels": {"speed": "slow"}, "resources": {"paced": 1, "slow": 1},
        "include_dashboard": False})
    ray_cluster.add_node(num_cpus=2, labels={"speed": "fast"}, resources={"paced": 1, "fast": 1})
    ray.init(address=ray_cluster.address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print(f"two-node Ray {ray.__version__} cluster up in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    try:
        if "latency" in parts:
            latency(args, {name: getattr(zoo, name)() for name in args.models.split(",")})
        if parts & {"routing", "faults"}:
            paces = {n["NodeID"]: PACE[n["Labels"]["speed"]] for n in ray.nodes() if n["Alive"]}
            with Cluster(None, poll_s=0.5) as cluster:
                if "routing" in parts:
                    routing(args, cluster, paces)
                if "faults" in parts:
                    faults(args, ray_cluster, cluster)
    finally:
        serve.shutdown()
        ray.shutdown()
        ray_cluster.shutdown()
    print(f"\n(the whole run took {time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
