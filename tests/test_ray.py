"""Hetero on a real Ray cluster on this machine (`ray.cluster_utils.Cluster`): nodes with their own
resources and labels, replicas of different speeds (paced stub executors, or other libraries),
nodes that join, drain and die under load, nodes split into device groups (a node with two
simulated cards). One Ray cluster serves the whole module."""

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
def grouped(ray_cluster):
    """Hetero on the same nodes, a worker per device group: the head's host; the card node's
    sim:0, sim:1 and host."""
    with hetero.ray.Cluster(None, groups="device", poll_s=0.2) as cluster:
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
        assert {r.session.worker.info.name for r in pool.replicas} == {n.name for n in cluster.nodes()}
        requests = _requests(model, 8)
        for replica in pool.replicas:  # each node's replica, asked directly
            for feeds in requests[:2]:
                _close(replica.session.run(feeds), reference.run(feeds))
        for got, feeds in zip(pool.map(requests), requests, strict=True):
            _close(got, reference.run(feeds))
        with pytest.raises(hetero.InputError, match="no input 'x'"):
            pool.run({"x": np.zeros(1, np.float32)})


def test_device_groups_split_a_node_and_its_host_cores(monkeypatch) -> None:
    from hetero.executors.numpy_executor import NumpyExecutor
    from hetero.ray import node
    from hetero.ray.cluster import _groups

    executors = [StubExecutor(0), StubExecutor(1), NumpyExecutor()]
    monkeypatch.setattr(hetero.executors, "available", lambda: executors)
    monkeypatch.setattr(node, "default_threads", lambda: 16)
    split = node.device_groups
    cards = [(("stub:0",), 1), (("stub:1",), 1)]  # each card's worker: the host libraries on one thread
    assert split("device", 8) == [*cards, (("cpu",), 6)]  # the host's: the cores left
    assert split("device", 2) == [*cards, (("cpu",), 1)]  # at least one
    assert split("device", 0) == [*cards, (("cpu",), 14)]  # 0: all of the node's
    assert split([["stub:0", "stub:1"], ["cpu"]], 8) == [(("stub:0", "stub:1"), 1), (("cpu",), 7)]
    assert split([["stub:1", "cpu"], ["stub:0"]], 8) == [(("stub:1", "cpu"), 7), (("stub:0",), 1)]
    assert split([["stub:0", "cuda:0"], ["cuda:1"]], 8) == [(("stub:0",), 1)]  # what this node has
    assert split([["cuda:7"]], 8) == []  # no worker on this node
    described = node.describe_node(8, [["cuda:7"]])
    assert described["groups"] == [] and {e["group"] for e in described["executors"]} == {""}
    assert _groups("cuda:0, cuda:1;cpu") == (("cuda:0", "cuda:1"), ("cpu",))
    assert _groups("node ") is None and _groups(None) is None and _groups(" device") == "device"
    for bad, why in [("cuda:0;cuda:0,cpu", "cuda:0 named twice"), ("cuda:0,cuda:0", "cuda:0 named twice"),
                     ("cuda:0;;cpu", "a group names no device"), ("", "no group"), (" ; ", "no group"),
                     ([], "no group"), ("gpu", "'gpu' is not a device name"), ("cuda:0;CPU", "'CPU' is not"),
                     ("Device", "'Device' is not"), (["cuda:0", "cpu"], "each group is a list")]:
        with pytest.raises(hetero.HeteroError, match=why):
            _groups(bad)


def test_cluster_listing_names_each_device_once_and_nodes_left_without_a_worker(monkeypatch) -> None:
    from typer.testing import CliRunner

    from hetero.cli import app

    host = {"device": "cpu", "description": "a CPU", "library": "x", "version": "1", "group": ""}
    card = {**host, "device": "sim:0", "description": "a card", "group": "sim:0"}
    nodes = [{"node": "aaaa", "address": "10.0.0.1", "cores": 4, "groups": [],
              "executors": [{**host, "executor": "onnxruntime@cpu"}, {**host, "executor": "numpy@cpu"}]},
             {"node": "bbbb", "address": "10.0.0.2", "cores": 4,
              "executors": [{**card, "executor": "sim@sim:0"}],
              "groups": [{"group": "sim:0", "devices": ["sim:0"], "threads": 1}]}]
    monkeypatch.setattr(hetero.ray, "probe", lambda address, groups: nodes)
    listing = CliRunner().invoke(app, ["cluster", "--groups", "sim:0"])
    assert listing.exit_code == 0, listing.output
    assert listing.output.count("a CPU") == 1  # once a device, not once an executor
    assert "aaaa: no worker: none of the groups' devices is here" in listing.output
    assert "bbbb/sim:0: a worker on sim:0, host libraries on 1 thread(s)" in listing.output
    alone = CliRunner().invoke(app, ["serve", str(ROOT), "--ray-groups", "device"])
    assert alone.exit_code == 2 and "give --ray too" in alone.output


def test_the_ray_connection_hetero_made_stays_until_its_last_cluster_closes(monkeypatch) -> None:
    """`hetero.ray.deploy` connects (its pool owns that Cluster), then a `Cluster` of the caller's
    shares the connection: closing the first pool must not take Ray from the second."""
    from hetero.ray import cluster

    ray_state = {"up": False, "inits": 0}
    monkeypatch.setenv("RAY_max_direct_call_object_size", "1")
    monkeypatch.setattr(cluster, "_holders", 0)
    monkeypatch.setattr(ray, "is_initialized", lambda: ray_state["up"])
    monkeypatch.setattr(ray, "init", lambda **_: ray_state.update(up=True, inits=ray_state["inits"] + 1))
    monkeypatch.setattr(ray, "shutdown", lambda: ray_state.update(up=False))
    assert cluster._connect("local") and cluster._connect("local")
    cluster._disconnect()
    assert ray_state == {"up": True, "inits": 1}
    cluster._disconnect()
    assert ray_state == {"up": False, "inits": 1}
    ray_state["up"] = True  # the caller's own connection: never Hetero's to close
    assert not cluster._connect("auto") and ray_state == {"up": True, "inits": 1}


def _on_cards(node: hetero.ray.NodeInfo):
    """Each card's replica and a host one where the simulated cards are, a host one elsewhere (only
    the libraries named are imported: a group's worker keeps what is on its devices)."""
    cards = [["sim@sim:0", "numpy"], ["sim@sim:1", "numpy"]] if node.labels["pace"] == str(FAST) else []
    return [*cards, ["numpy"]]


def _group_workers(cluster: hetero.ray.Cluster) -> dict[tuple[str, str], dict]:
    return {(w["node"], w["group"]): w for w in cluster.describe(devices=False)}


@pytest.mark.slow  # its own workers: each node lists its devices first (every library imported)
def test_one_worker_per_device_group_each_on_its_own_devices(grouped, model, reference) -> None:
    cards = next(n for n in grouped.nodes() if n.labels["pace"] == str(FAST)).name  # the sim cards' node
    workers = _group_workers(grouped)
    assert sorted(workers) == sorted([(n.name, "cpu") for n in grouped.nodes()] + [(cards, "sim:0"),
                                                                                   (cards, "sim:1")])
    assert all(w["state"] == "active" for w in workers.values()), workers
    assert len({w["pid"] for w in workers.values()}) == 4  # a process each
    assert all(w["cores"] == 1 for w in workers.values())  # one-core nodes: a card's fallback, and the host
    with grouped.deploy(model, _on_cards) as pool:
        for replica in pool.figures():
            node, group, executors = replica["replica"].split("/")
            assert (node, group) == (replica["node"], replica["group"])
            on_cards = {e.split("@")[1] for e in executors.split("+")} - {"cpu"}
            assert on_cards == ({group} if group != "cpu" else set()), replica  # its group's card alone
        assert sorted((r["node"], r["group"]) for r in pool.figures()) == sorted(workers)
        requests = _requests(model, 12)
        for got, feeds in zip(pool.map(requests), requests, strict=True):
            _close(got, reference.run(feeds))


@pytest.mark.slow
def test_a_group_worker_that_dies_is_replaced_and_the_others_are_left_be(grouped, model, reference,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(hetero.ray.cluster, "RETRY_S", 1.0)
    with grouped.deploy(model, _on_cards) as pool:
        first = [lane for lane in pool.replicas if lane.session.worker.group == "sim:0"]
        [node_id] = {lane.session.worker.info.id for lane in first}
        before = _group_workers(grouped)
        load = Load(pool, model)
        _wait_for(lambda: sum(lane.served for lane in first) >= 2, 60, "the sim:0 group to serve")
        ray.kill(first[0].session.worker.actor)  # the card's worker process dies; its node lives on
        again = lambda: [lane for lane in pool.on_node(node_id)  # noqa: E731
                         if lane.session.worker.group == "sim:0" and lane not in first]
        _wait_for(lambda: any(lane.served for lane in again()), 120, "a new sim:0 worker to serve")
        answered = load.stop()
        after = _group_workers(grouped)
        described = {(w["node"], w["group"]): w for w in grouped.describe()}
    for feeds, got in answered:
        _close(got, reference.run(feeds))
    assert not any(lane.live for lane in first)
    others = [lane for lane in pool.replicas if lane not in first and lane not in again()]
    assert others and all(lane.live and not lane.failed for lane in others)  # no other group touched
    card = next(key for key in before if key[1] == "sim:0")
    assert after[card]["pid"] != before[card]["pid"]
    assert all(after[key]["pid"] == before[key]["pid"] for key in before if key != card)
    executors = {group: {e["executor"]: e["threads"] for e in described[card[0], group]["executors"]}
                 for group in ("sim:0", "cpu")}
    assert "sim@sim:0" in executors["sim:0"] and "sim@sim:1" not in executors["sim:0"]
    assert executors["sim:0"]["numpy@cpu"] == 1  # the host libraries as a one-thread fallback
    assert not any(e.startswith("sim@sim:") for e in executors["cpu"]) and "numpy@cpu" in executors["cpu"]


def test_a_model_with_unknown_dims_is_planned_on_the_nodes_on_its_first_request(cluster, reference) -> None:
    """A measured policy on a symbolic batch dim: a priority pool answers first, then every node
    measures its replicas on the first request's values and the measured pool takes over."""
    from hetero.runtime.replanning import Replanning, serving_pool

    model = hetero.load(with_dynamic_batch(small_cnn()))
    pool = serving_pool(model, replicas=[["onnxruntime", "numpy"]], cpu_streams=1, policy="latency",
                        build=cluster.deploy)
    try:
        assert isinstance(pool, Replanning)
        assert all("policy priority" in plan for plan in pool.runner.plans.values())
        # odd first requests: refused, or answered (an empty batch) but never planned on
        with pytest.raises(hetero.InputError, match="must be float32"):
            pool.run({"images": np.zeros((1, 3, 32, 32), np.int64)})
        assert pool.run({"images": np.zeros((0, 3, 32, 32), np.float32)})["logits"].shape == (0, 10)
        assert not pool.wait_planned(timeout=0.5) and pool.status == "planning on first requests"
        singles = _requests(model, 3)  # a batch of 3 as the first request, measured on
        images = np.concatenate([feeds["images"] for feeds in singles])
        want = {"logits": np.concatenate([reference.run(feeds)["logits"] for feeds in singles])}
        _close(pool.run({"images": images}), want)
        assert pool.wait_planned(timeout=300), pool.status
        assert pool.status == "measured"
        plans = pool.runner.plans
        assert {name.split("/")[0] for name in plans} == {n.name for n in cluster.nodes()}
        # measured whole on each node: the single-library candidates timed, one chosen
        assert all("policy latency" in plan and "(chosen)" in plan for plan in plans.values()), plans
        _close(pool.run({"images": images}), want)
        _close(pool.run(singles[1]), reference.run(singles[1]))  # another batch size than planned on
    finally:
        pool.close()


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


def _broken_first(node: hetero.ray.NodeInfo):
    """`_paced`, and first on the fast node a replica whose kernel crashes on every request."""
    broken = [[StubExecutor(1, run_fail_ops={"Gemm"})]] if node.labels["pace"] == str(FAST) else []
    return [*broken, *_paced(node)]


def test_a_replica_that_fails_its_warm_up_is_left_out_and_the_others_serve(cluster, model, reference) -> None:
    with cluster.deploy(model, _broken_first) as pool:
        out = {r.name for r in pool.replicas if not r.live}
        assert len(out) == 1 and next(iter(out)).endswith("/stub@stub:1"), out
        assert sum(r.live for r in pool.replicas) == 2 * cluster.lanes  # each node's paced replica
        requests = _requests(model, 6)
        for got, feeds in zip(pool.map(requests), requests, strict=True):
            _close(got, reference.run(feeds))
    with pytest.raises(hetero.ModelError, match="no node of the cluster could run it: .*stub kernel crashed"):
        cluster.deploy(model, [[StubExecutor(1, run_fail_ops={"Gemm"})]])


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
    # the node's broken replica fails its measurement each time the worker starts: it stays out,
    # and the node's other replica joins
    with cluster.deploy(model, _broken_first) as pool:
        fast = min((r for r in pool.figures() if r["live"]), key=lambda r: r["seconds_per_request"])
        [node_id] = {lane.session.worker.info.id for lane in pool.replicas if lane.name == fast["replica"]}
        first = pool.on_node(node_id)
        load = Load(pool, model)
        _wait_for(lambda: sum(lane.served for lane in first) >= 5, 60, "the fast node to serve")
        ray.kill(first[0].session.worker.actor)  # the worker process dies; its node lives on
        _wait_for(lambda: len(pool.on_node(node_id)) > len(first), 120, "a new worker's replica")
        _wait_for(lambda: any(lane.served for lane in pool.on_node(node_id)[len(first):]), 60,
                  "the new worker to serve")
        answered = load.stop()
        again = pool.on_node(node_id)[len(first):]
    for feeds, got in answered:
        _close(got, reference.run(feeds))
    assert not any(lane.live for lane in first)
    assert [lane.name for lane in again] == [fast["replica"]] * cluster.lanes
    assert all(lane.live for lane in again)


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
    """The same repository and config served over HTTP and gRPC, a worker per device group; a
    measured policy on a symbolic batch dim planned on the nodes on the first request; batches
    formed at the front end; /metrics per node, group and replica; `hetero cluster` lists every
    node with its own devices and groups."""
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
        "executors: [numpy]\npolicy: latency\nmax_batch_size: 8\n"
        "dynamic_batching: {max_queue_delay_microseconds: 20000}\n")
    server = ClusterServer(tmp_path, address=None, groups="device", http_port=0, grpc_port=0).start()
    try:
        nodes = {n.name for n in server.cluster.nodes()}
        hosts = sorted((node, "cpu") for node in nodes)  # the host groups: where numpy replicas go
        pool = server.repository.get("cnn").pool
        assert sorted({(r.session.worker.info.name, r.session.worker.group) for r in pool.replicas}) == hosts
        image = example_feeds(hetero.load(small_cnn()), seed=3)["images"]
        want = reference.run({"images": image})["logits"]
        http = tritonhttp.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        grpc = tritongrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        for client, module in ((http, tritonhttp), (grpc, tritongrpc)):
            tensor = module.InferInput("images", list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            got = client.infer("cnn", [tensor]).as_numpy("logits")
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            if client is http:  # the first request: planned on, then the measured replicas answer
                assert pool.wait_planned(300) and pool.status == "measured", pool.status
                assert all("(chosen)" in plan for plan in pool.runner.plans.values())

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
        assert sorted((_label(key, "node"), _label(key, "group")) for key in served) == hosts
        assert sum(served.values()) == executions - 1  # all but the first, answered before the re-plan
        cards = next(n.name for n in server.cluster.nodes() if n.labels["pace"] == str(FAST))
        up = _samples(metrics, "hetero_node_up{")
        serving = sorted((_label(key, "node"), _label(key, "group")) for key, value in up.items() if value)
        assert serving == sorted([*hosts, (cards, "sim:0"), (cards, "sim:1")])
        for node in nodes:
            busy = _samples(metrics, f'hetero_node_device_busy_seconds_total{{group="cpu",node="{node}"')
            assert sum(busy.values()) > 0, _samples(metrics, "hetero_node_device_busy_seconds_total")
        found = {node["node"]: node for node in hetero.ray.probe(None, groups="device")}
        assert set(found) == nodes
        assert {e["group"] for e in found[cards]["executors"] if e["device"] == "sim:1"} == {"sim:1"}
        listing = CliRunner().invoke(app, ["cluster", "--groups", "device"])
        assert listing.exit_code == 0, listing.output
        assert all(node in listing.output for node in nodes) and "sim@sim:1" in listing.output
        assert f"{cards}/sim:1: a worker on sim:1" in listing.output
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
