"""Hetero on a real Ray cluster on this machine (`ray.cluster_utils.Cluster`): nodes with their own
resources and labels, replicas of different speeds (paced stub executors, or other libraries),
nodes that join, drain and die under load. One cluster serves the whole module."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import StubExecutor

import hetero
from hetero.graph import example_feeds
from hetero.zoo import small_cnn, with_dynamic_batch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster as RayCluster  # noqa: E402

import hetero.ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLOW, FAST = 0.03, 0.01  # seconds per request of the paced replicas: speeds 1 and 3


def _paced(node: hetero.ray.NodeInfo):
    """Each node's replica: a stub accelerator paced by the node's `pace` label."""
    return [[StubExecutor(seconds_per_call=float(node.labels["pace"]))]] if "pace" in node.labels else None


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "labels": {"pace": str(SLOW)}, "include_dashboard": False})
    # the second node also has simulated cards (only `hetero cluster` looks at them here)
    cluster.add_node(num_cpus=1, labels={"pace": str(FAST)},
                     env_vars={"HETERO_SIMULATE": str(ROOT / "examples" / "devices" / "two-cards.yaml")})
    # the workers import hetero from this checkout, and conftest (the stub executor) from tests/
    ray.init(address=cluster.address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    with hetero.ray.Cluster(None, poll_s=0.2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def model() -> hetero.Model:
    return hetero.load(small_cnn())


@pytest.fixture(scope="module")
def reference(model) -> hetero.Session:
    return hetero.compile(model, ["numpy"])


def _requests(model: hetero.Model, count: int) -> list[dict[str, np.ndarray]]:
    return [example_feeds(model, seed=i) for i in range(count)]


def _close(got: dict, want: dict) -> None:
    # another library, or numpy with another BLAS thread count, sums in another order
    np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


class Load:
    """Requests sent to a pool from a thread of its own until stopped: (feeds, outputs) of each."""

    def __init__(self, pool, model: hetero.Model):
        self.sent: list[dict] = []
        self._stop = threading.Event()
        self._requests = _requests(model, 20)
        self._thread = ThreadPoolExecutor(1)
        self._running = self._thread.submit(lambda: list(pool.map(self._feeds())))

    def _feeds(self):
        while not self._stop.is_set():
            self.sent.append(self._requests[len(self.sent) % len(self._requests)])
            yield self.sent[-1]

    def stop(self) -> list[tuple[dict, dict]]:
        self._stop.set()
        results = self._running.result(timeout=300)
        self._thread.shutdown()
        return list(zip(self.sent, results, strict=True))


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.1)


def test_results_equal_session_run_on_every_node(cluster, model, reference) -> None:
    """A replica limited to another library on each node; each answers as in-process Session.run."""
    libraries = {str(SLOW): "onnxruntime", str(FAST): "numpy"}
    with cluster.deploy(model, lambda node: [[libraries[node.labels["pace"]]]]) as pool:
        assert sorted(name.split("/")[1] for name in pool.plans) == ["numpy@cpu", "onnxruntime@cpu"]
        assert {r.session.node.info.name for r in pool.replicas} == {n.name for n in cluster.nodes()}
        requests = _requests(model, 8)
        for replica in pool.replicas:  # each node's replica, asked directly
            for feeds in requests[:2]:
                _close(replica.session.run(feeds), reference.run(feeds))
        for got, feeds in zip(pool.map(requests), requests, strict=True):
            _close(got, reference.run(feeds))
        with pytest.raises(hetero.InputError, match="no input 'x'"):
            pool.run({"x": np.zeros(1, np.float32)})


def test_routing_adds_up_replicas_of_speeds_one_and_three(cluster, model, reference) -> None:
    with cluster.deploy(model, _paced) as pool:
        assert len(pool.replicas) == 2 * cluster.lanes
        slow, fast = sorted(pool.figures(), key=lambda r: -r["seconds_per_request"])
        assert slow["seconds_per_request"] > 1.5 * fast["seconds_per_request"]  # measured, round trip in
        requests = _requests(model, 120)
        start = time.perf_counter()
        results = list(pool.map(requests))
        elapsed = time.perf_counter() - start
        for got, feeds in zip(results, requests, strict=True):
            _close(got, reference.run(feeds))
        slow, fast = sorted(pool.figures(), key=lambda r: -r["seconds_per_request"])
    assert slow["served"] + fast["served"] == 120 and slow["served"] >= 1  # the slow one adds, too
    # each did the share its measured speed implies, and together they were never slower than
    # their measured rates summed allow (generous margins for a loaded machine; the benchmark
    # holds the 0.9x target)
    rates = 1 / slow["seconds_per_request"], 1 / fast["seconds_per_request"]
    assert abs(fast["served"] / 120 - rates[1] / sum(rates)) < 0.15, (fast, slow)
    assert elapsed <= 1.5 * 120 / sum(rates), (elapsed, 120 / sum(rates))


def test_bad_node_spec_is_left_out_and_none_left_is_an_error(cluster, model) -> None:
    fast_only = lambda node: [["numpy"]] if node.labels.get("pace") == str(FAST) else [["nosuchlib"]]  # noqa: E731
    with cluster.deploy(model, fast_only) as pool:
        assert [name.split("/")[1] for name in pool.plans] == ["numpy@cpu"]
    with pytest.raises(hetero.ModelError, match="no node of the cluster could load it.*nosuchlib"):
        cluster.deploy(model, [["nosuchlib"]])


@pytest.mark.slow
def test_a_node_joins_under_load_then_dies_and_no_request_is_lost(ray_cluster, cluster, model,
                                                                   reference) -> None:
    with cluster.deploy(model, _paced) as pool:
        load = Load(pool, model)
        joined = ray_cluster.add_node(num_cpus=1, labels={"pace": str(FAST)})  # used without a restart
        _wait_for(lambda: any(r.served for r in pool.on_node(joined.node_id)), 120, "the new node to serve")
        newcomer = pool.on_node(joined.node_id)
        ray_cluster.remove_node(joined)  # killed under load: its requests in flight are retried elsewhere
        _wait_for(lambda: not any(lane.live for lane in newcomer), 30, "the dead node's replica to retire")
        served = sum(r.served for r in pool.replicas)
        _wait_for(lambda: sum(r.served for r in pool.replicas) > served + 10, 60, "more requests served")
        answered = load.stop()
    for feeds, got in answered:
        _close(got, reference.run(feeds))
    assert len(answered) > 20 and sum(lane.served for lane in newcomer) >= 1
    _wait_for(lambda: joined.node_id not in {n.id for n in cluster.nodes()}, 30, "the node to be dropped")


@pytest.mark.slow
def test_a_worker_that_dies_under_load_is_replaced_and_no_request_is_lost(cluster, model, reference,
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(hetero.ray.cluster, "RETRY_S", 1.0)  # a new worker after 1 s, not 10
    with cluster.deploy(model, _paced) as pool:
        fast = min(pool.figures(), key=lambda r: r["seconds_per_request"])
        [node_id] = {lane.session.node.info.id for lane in pool.replicas if lane.name == fast["replica"]}
        first = pool.on_node(node_id)
        load = Load(pool, model)
        _wait_for(lambda: sum(lane.served for lane in first) >= 5, 60, "the fast node to serve")
        ray.kill(first[0].session.node.worker)  # the worker process dies; its node lives on
        _wait_for(lambda: len(pool.on_node(node_id)) > len(first), 120, "a new worker's replica")
        _wait_for(lambda: any(lane.served for lane in pool.on_node(node_id)[len(first):]), 60,
                  "the new worker to serve")
        answered = load.stop()
    for feeds, got in answered:
        _close(got, reference.run(feeds))
    assert not any(lane.live for lane in first)


@pytest.mark.slow
def test_ray_drain_node_finishes_its_requests_then_sends_no_more(ray_cluster, cluster, model,
                                                                reference) -> None:
    with cluster.deploy(model, _paced) as pool:
        node = ray_cluster.add_node(num_cpus=1, labels={"pace": str(SLOW)})
        _wait_for(lambda: pool.on_node(node.node_id), 120, "the new node's replica")
        leaving = pool.on_node(node.node_id)
        load = Load(pool, model)
        _wait_for(lambda: sum(lane.served for lane in leaving) >= 2, 60, "the new node to serve")
        subprocess.run([Path(sys.executable).with_name("ray"), "drain-node", "--address", ray_cluster.address,
                        "--node-id", node.node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message", "maintenance", "--deadline-remaining-seconds", "60"],
                       check=True, capture_output=True, timeout=120)
        _wait_for(lambda: not any(lane.live for lane in leaving), 30, "Hetero to see the drain")
        assert all(pool.wait_idle(lane, 30) for lane in leaving)
        served = sum(lane.served for lane in leaving)
        time.sleep(0.5)
        answered = load.stop()
    for feeds, got in answered:
        _close(got, reference.run(feeds))
    # it finished what it ran, then got no more
    assert sum(lane.failed for lane in leaving) == 0 and sum(lane.served for lane in leaving) == served
    assert node.node_id not in {n.id for n in cluster.nodes()}


@pytest.mark.slow
def test_serve_on_the_cluster(cluster, tmp_path: Path, reference) -> None:
    """The same repository and config served over HTTP and gRPC; batches formed at the front end;
    /metrics per node and per replica; `hetero cluster` lists every node with its own devices."""
    tritonhttp = pytest.importorskip("tritonclient.http")
    tritongrpc = pytest.importorskip("tritonclient.grpc")
    import httpx
    from typer.testing import CliRunner

    from hetero.cli import app
    from hetero.ray.serving import ClusterServer

    folder = tmp_path / "cnn" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(with_dynamic_batch(small_cnn()).SerializeToString())
    (tmp_path / "cnn" / "config.yaml").write_text(
        "executors: [numpy]\nmax_batch_size: 8\ndynamic_batching: {max_queue_delay_microseconds: 20000}\n")
    server = ClusterServer(tmp_path, address=None, http_port=0, grpc_port=0).start()
    try:
        nodes = {n.name for n in server.cluster.nodes()}
        assert {r.session.node.info.name for r in server.repository.get("cnn").pool.replicas} == nodes
        image = example_feeds(hetero.load(small_cnn()), seed=3)["images"]
        want = reference.run({"images": image})["logits"]
        http = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        grpc = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        for client, module in ((http, tritonhttp), (grpc, tritongrpc)):
            tensor = module.InferInput("images", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            got = client.infer("cnn", [tensor]).as_numpy("logits")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        def ask(seed: int) -> None:
            x = example_feeds(hetero.load(small_cnn()), seed=seed)["images"]
            tensor = tritongrpc.InferInput("images", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            got = grpc.infer("cnn", [tensor]).as_numpy("logits")
            np.testing.assert_allclose(got, reference.run({"images": x})["logits"], rtol=1e-5, atol=1e-6)

        with ThreadPoolExecutor(16) as clients:
            list(clients.map(ask, range(64)))
        metrics = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics").text
        executions = _sample(metrics, 'hetero_model_executions_total{model="cnn",version="1"}')
        assert executions < 66  # 2 single requests + 64 merged into fewer batches
        served = _samples(metrics, "hetero_replica_requests_total")
        assert sorted(_label(key, "node") for key in served) == sorted(nodes)
        assert sum(served.values()) == executions
        up = _samples(metrics, "hetero_node_up{")
        assert sorted(_label(key, "node") for key, value in up.items() if value == 1) == sorted(nodes)
        for node in nodes:
            busy = _samples(metrics, f'hetero_node_device_busy_seconds_total{{node="{node}"')
            assert sum(busy.values()) > 0
        found = {node["node"]: {e["executor"] for e in node["executors"]} for node in hetero.ray.probe(None)}
        simulated = {name for name, executors in found.items() if "sim@sim:1" in executors}
        assert set(found) == nodes and len(simulated) == 1 and all("numpy@cpu" in e for e in found.values())
        listing = CliRunner().invoke(app, ["cluster"])
        assert listing.exit_code == 0, listing.output
        assert all(node in listing.output for node in nodes) and "sim@sim:1" in listing.output
    finally:
        server.stop()
    assert not server.repository.ready()


def _samples(metrics: str, prefix: str) -> dict[str, float]:
    """Prometheus samples whose name and labels start with `prefix`: {labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith(prefix)}


def _sample(metrics: str, name: str) -> float:
    found = _samples(metrics, name + " ")
    assert found, f"{name} not in /metrics"
    return next(iter(found.values()))


def _label(sample: str, name: str) -> str:
    return sample.split(f'{name}="', 1)[1].split('"', 1)[0]
