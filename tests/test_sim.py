"""Simulated cards (`sim@sim:N`): memory spaces, transfers and peer copies counted by the simulated
hardware itself, one partition at a time per card, replica scaling over 1, 2 and 4 cards, honest
pacing, and the devices file. Times are simulated (declared) seconds and counts, with margins."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

import hetero
from hetero.executors.sim_executor import SimArray, read_devices, simulate
from hetero.graph import example_feeds
from hetero.zoo import small_cnn


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """A fresh cache: the host library's reference times and the planner's measurements."""
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    from hetero.executors import sim_executor
    from hetero.planner import cost
    from hetero.runtime import tuning

    stores = (cost._costs, tuning._plans, sim_executor._references)
    for store in stores:
        store.clear_memory()
    yield tmp_path
    for store in stores:
        store.clear_memory()


def cards(count: int, **figures) -> list:
    spec = {"like": "onnxruntime", "speed": 0.05, "count": count, **figures}
    return simulate({"devices": [spec]})


def chain(ops: list[str], shape=(1, 8, 16, 16)) -> hetero.Model:
    """x -> ops[0] -> ops[1] -> ... -> y, node i named 'n{i}' (for affinity by name)."""
    names = ["x", *[f"t{i}" for i in range(len(ops) - 1)], "y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]], name=f"n{i}") for i, op in enumerate(ops)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def reference(model: hetero.Model, feeds: dict) -> dict:
    return hetero.compile(model, ["onnxruntime"]).run(feeds)


def test_a_card_has_its_own_memory_space():
    card, = cards(1)
    on_card = card.to_device(np.arange(6, dtype=np.float32))
    assert isinstance(on_card, SimArray) and on_card.nbytes == 24
    with pytest.raises(TypeError, match="sim:0's memory"):
        np.asarray(on_card)  # host code cannot read it without a transfer
    back = card.to_host(on_card)
    back[0] = 42.0  # a copy in host memory: the card's tensor is untouched
    np.testing.assert_array_equal(card.to_host(on_card), np.arange(6, dtype=np.float32))
    compiled = card.compile(chain(["Relu"], (6,)).proto)
    with pytest.raises(hetero.RunError, match="host memory.*transfer is missing"):
        compiled([np.ones(6, np.float32)])


def test_one_card_transfers_are_inserted_and_counted():
    card, = cards(1)
    model = hetero.load(small_cnn())
    session = hetero.compile(model, ["numpy"], "manual", affinity={"Conv": card, "Relu": card, "Add": card})
    feeds = example_feeds(model)
    outputs = session.run(feeds)
    np.testing.assert_allclose(outputs["logits"], reference(model, feeds)["logits"], rtol=1e-4, atol=1e-5)
    plan = session.plan
    to_card = [t for t in plan.transfers if t.target == "sim:0"]
    from_card = [t for t in plan.transfers if t.source == "sim:0"]
    assert to_card and from_card and len(to_card) + len(from_card) == len(plan.transfers)
    links = card.card.links
    assert (links["cpu -> sim:0"].count, links["cpu -> sim:0"].nbytes) == (len(to_card),
                                                                            sum(t.nbytes for t in to_card))
    assert (links["sim:0 -> cpu"].count, links["sim:0 -> cpu"].nbytes) == (len(from_card),
                                                                            sum(t.nbytes for t in from_card))
    assert session.stats.transfers == len(plan.transfers)
    assert session.stats.transfer_bytes == plan.transfer_bytes
    assert card.card.compute.count == sum(p.executor is card for p in plan.partitions)


@pytest.mark.parametrize("count", [2, 4])
def test_peer_copies_where_declared_else_through_the_host(count):
    """Cards 0 and 1 have a direct link; 1 -> 2 -> 3 go through host memory."""
    spec = {"like": "onnxruntime", "speed": 0.05}
    entries = [{**spec, "count": 2, "peers": "all"}] + ([{**spec, "count": count - 2}] if count > 2 else [])
    sims = simulate({"devices": entries})
    model = chain(["Relu", "Neg", "Relu", "Neg"][:count])
    affinity = {f"n{i}": sims[i] for i in range(count)}
    session = hetero.compile(model, ["numpy"], "manual", affinity=affinity)
    feeds = example_feeds(model)
    np.testing.assert_allclose(session.run(feeds)["y"], reference(model, feeds)["y"])
    nbytes = feeds["x"].nbytes
    links = {name: (line.count, line.nbytes) for sim in sims for name, line in sim.card.links.items()}
    assert links["sim:0 -> sim:1"] == (1, nbytes)  # the direct link, not the host
    assert links["sim:0 -> cpu"] == (0, 0) and links["cpu -> sim:1"] == (0, 0)
    assert links["sim:1 -> sim:0"] == (0, 0)
    assert links["cpu -> sim:0"] == (1, nbytes) and links[f"sim:{count - 1} -> cpu"] == (1, nbytes)
    for i in range(1, count - 1):  # no direct link: down to the host and up again
        assert f"sim:{i} -> sim:{i + 1}" not in links
        assert links[f"sim:{i} -> cpu"] == (1, nbytes) and links[f"cpu -> sim:{i + 1}"] == (1, nbytes)
    assert session.stats.transfers == count + 1


def test_one_partition_at_a_time_per_card_while_cards_overlap(booked):
    """Many requests in flight through a plan over two cards: each card's work never overlaps
    itself, and the two cards work at the same time (stage k of request i+1 beside stage k+1 of i)."""
    first, second = cards(2, overhead_us=10_000)  # 10 ms a partition
    model = chain(["Relu", "Neg"])
    session = hetero.compile(model, ["numpy"], "manual", affinity={"n0": first, "n1": second})
    feeds = example_feeds(model)
    futures = [session.submit(feeds) for _ in range(12)]
    for future in futures:
        np.testing.assert_array_equal(future.result()["y"], -np.maximum(feeds["x"], 0))
    for sim in (first, second):
        assert sim.card.most_at_once == 1  # the runtime never calls a card from two threads at once
        slots = sorted(booked[f"{sim.device} compute"])
        assert len(slots) == 12
        assert all(end <= next_start + 1e-9 for (_, end), (next_start, _) in itertools.pairwise(slots))
    together = sum(max(0.0, min(a_end, b_end) - max(a_start, b_start))
                   for a_start, a_end in booked["sim:0 compute"]
                   for b_start, b_end in booked["sim:1 compute"])
    assert together > 0.3 * second.card.compute.busy_s, together  # about 0.9 when the host is quiet


@pytest.fixture
def booked(monkeypatch) -> dict[str, list[tuple[float, float]]]:
    """Every slot booked on a simulated time line, by line name ("sim:0 compute", "cpu -> sim:0")."""
    from hetero.executors.sim_executor import Line

    slots: dict[str, list[tuple[float, float]]] = {}
    book = Line.book

    def recording(self, *args, **kwargs):
        before = self.busy_s
        end, overrun = book(self, *args, **kwargs)
        slots.setdefault(self.name, []).append((end - (self.busy_s - before), end))
        return end, overrun

    monkeypatch.setattr(Line, "book", recording)
    return slots


def _union(slots: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(slots):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


@pytest.mark.slow
def test_replica_throughput_scales_with_cards(booked):
    """1 -> 2 -> 4 cards, one replica each: requests per second of simulated time (the time any card
    was working) grow at least 0.9x linearly, and every card serves its share. Simulated time, not
    the wall: a host busy with other work delays every card alike."""
    model = hetero.load(small_cnn())
    feeds = example_feeds(model)
    rates = {}
    for count in (1, 2, 4):
        sims = cards(count, overhead_us=60_000)  # about 62 ms a request, mostly sleep
        pool = hetero.ReplicaPool.build(model, [[sim] for sim in sims])
        booked.clear()
        requests = 6 * count
        for outputs in pool.map(feeds for _ in range(requests)):
            assert outputs["logits"].shape == (1, 10)
        pool.close()
        assert all(r.served >= requests / count / 2 for r in pool.replicas)
        working = _union([slot for sim in sims for slot in booked[f"{sim.device} compute"]])
        rates[count] = requests / working
    for count in (2, 4):
        assert rates[count] >= 0.9 * count * rates[1], rates


def test_declared_speed_is_what_the_cost_model_measures():
    """Work on a card is asynchronous: timing a call measures the launch, timing it with
    `synchronize` the execution, which is the host library's time over the declared speed."""
    from hetero.planner.cost import time_call

    card, = cards(1, speed=0.02, overhead_us=0)
    model = chain(["Relu"], (1, 64, 64, 64))
    compiled = card.compile(model.proto)
    args = [card.to_device(example_feeds(model)["x"])]
    compiled(args)
    declared = compiled._reference[next(iter(compiled._reference))] / 0.02
    executed = time_call(lambda: (compiled(args), card.synchronize()))
    card.synchronize()
    launched = time_call(lambda: compiled(args))
    card.synchronize()
    assert 0.8 * declared <= executed <= 2 * declared  # loaded hosts wake sleepers late, never early
    assert launched < 0.5 * declared


def test_a_card_faster_than_its_host_library_says_so():
    card, = cards(1, speed=50.0)
    model = hetero.load(small_cnn())
    session = hetero.compile(model, [card])
    for _ in range(5):
        session.run(example_feeds(model))
    assert card.overruns.count >= 4
    assert "took longer than declared" in card.report()
    calm, = cards(1, speed=0.002)  # 500x the library's time: room for a busy host
    hetero.compile(model, [calm]).run(example_feeds(model))
    assert "the host library" not in calm.report()


def test_devices_file_errors_name_the_field(tmp_path):
    with pytest.raises(hetero.PlanError, match=r"devices\[0\]: unknown field 'sped'"):
        read_devices({"devices": [{"like": "numpy", "sped": 2}]})
    with pytest.raises(hetero.PlanError, match=r"devices\[0\]: 'speed' must be positive"):
        read_devices({"devices": [{"like": "numpy", "speed": 0}]})
    with pytest.raises(hetero.PlanError, match=r"devices\[0\]: needs 'like' and 'speed'"):
        read_devices({"devices": [{"executor": "torch@cuda:0"}]})
    with pytest.raises(hetero.PlanError, match="peer 'sim:5' is not another simulated card"):
        simulate({"devices": [{"like": "numpy", "speed": 1, "count": 2, "peers": ["sim:5"]}]})
    with pytest.raises(hetero.PlanError, match="sketch"):
        simulate({"devices": [{"executor": "torch@cuda:0", "peak_gflops": 1e4, "bandwidth_gbs": 900}]})
    bad = tmp_path / "devices.yaml"
    bad.write_text("devices: [")
    with pytest.raises(hetero.PlanError, match="not valid YAML"):
        read_devices(bad)


def conv_and_small_ops() -> hetero.Model:
    """Four 3x3 convolutions on an image, and beside them three small ops on a 16-vector."""
    from hetero.zoo import GraphBuilder

    g = GraphBuilder("conv_and_small_ops")
    x = g.input("image", [1, 32, 32, 32])
    for _ in range(4):
        x = g.conv(x, 32, 32, 3)
    g.output(g.op("GlobalAveragePool", [x], name="features"), shape=[1, 32, 1, 1])
    scaled = g.op("Mul", [g.input("meta", [1, 16]), g.const(np.full(16, 2, np.float32))])
    g.output(g.op("Relu", [g.op("Add", [scaled, g.const(np.ones(16, np.float32))])], name="scores"),
             shape=[1, 16])
    return hetero.load(g.build())


@pytest.mark.slow
def test_latency_offloads_convolutions_and_keeps_small_ops_on_the_host():
    """A card 4x faster than the (simulated) host behind a link of 2 ms a copy: `latency` puts the
    convolutions on it and keeps the small ops on the host, whose inputs and outputs would cost
    two copies for a gain of a fraction of a millisecond; the plan beats the best single device
    by at least half the margin the declared figures imply."""
    card, host = simulate({"host": {"like": "onnxruntime", "speed": 0.1, "overhead_us": 100},
                           "devices": [{"like": "onnxruntime", "speed": 0.4, "overhead_us": 100,
                                        "link_us": 2000}]})
    model = conv_and_small_ops()
    session = hetero.compile(model, [card, host], "latency")
    where = {node.op_type: session.plan.executor_of(node) for node in model.nodes}
    assert where["Conv"] is card and where["GlobalAveragePool"] is card
    assert where["Mul"] is host and where["Add"] is host
    singles = {e: hetero.compile(model, [e]) for e in (card, host)}
    feeds = example_feeds(model)
    want = reference(model, feeds)
    times: dict = {}
    for _ in range(5):  # in turns, so the host's drift hits all three alike
        for runner in (session, *singles.values()):
            runner.run(feeds)
            start = time.perf_counter()
            got = runner.run(feeds)
            times.setdefault(runner, []).append(time.perf_counter() - start)
            np.testing.assert_allclose(got["features"], want["features"], rtol=1e-4, atol=1e-5)
    measured = {runner: float(np.median(t)) for runner, t in times.items()}

    def seconds(runner) -> float:
        """What the declared figures give for one request: partitions, copies, and the host's part
        beside the card's (they run at once)."""
        total = {"cpu": 0.0, "sim:0": 0.0}
        for part in runner.plan.partitions:
            compiled = runner._program.steps[part.index].compiled
            spec = part.executor.spec
            total[str(part.executor.device)] += (next(iter(compiled._reference.values())) / spec.speed
                                                 + spec.overhead_us / 1e6)
        copies = sum(2e-3 + (t.nbytes or 0) / 12e9 for t in runner.plan.transfers)
        return max(total["cpu"], total["sim:0"] + copies)

    implied = min(seconds(s) for s in singles.values()) / seconds(session)
    achieved = min(measured[s] for s in singles.values()) / measured[session]
    assert implied > 1.1, implied
    assert achieved >= 1 + 0.5 * (implied - 1), (achieved, implied, measured)
