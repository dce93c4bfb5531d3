"""The latency search on synthetic cost tables where the optimum is known by brute force, and the
measured policies on stub executors whose speeds are set."""

import itertools
import random
import re
import time

import numpy as np
import pytest
from conftest import StubExecutor
from onnx import TensorProto, helper

import hetero
from hetero.graph import example_feeds
from hetero.planner import Capability
from hetero.planner.search import candidates, chain_assignment, estimate
from hetero.zoo import small_cnn


class TableCosts:
    """A cost model from a table: node ms per executor, a call overhead, switch costs per executor
    pair, transfers by bytes."""

    def __init__(self, table, overhead, per_byte, switch=None):
        self.table, self.overhead, self.per_byte, self.switch = table, overhead, per_byte, switch or {}

    def node(self, node, executor):
        class Cost:
            ms = self.table[node.index][executor.name]
        return Cost

    def overhead_ms(self, executor):
        return self.overhead[executor.name]

    def switch_ms(self, source, target):
        return 0.0 if source is None else self.switch.get((source.name, target.name), 0.0)

    def transfer_ms(self, nbytes, source, target):
        if source is None or target is None or source.memory_space == target.memory_space:
            return 0.0
        return (nbytes or 0) * self.per_byte


def _chain_model(count, width=64):
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"t{i - 1}"], [f"t{i}"], name=f"n{i}")
             for i in range(count)]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [width])],
                              [helper.make_tensor_value_info(f"t{count - 1}", TensorProto.FLOAT, [width])])
    return hetero.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _objective(model, assignment, costs, penalty=1.0):
    total, previous = 0.0, None
    for node, executor in zip(model.nodes, assignment, strict=True):
        total += costs.node(node, executor).ms
        if previous is not None and previous.name != executor.name:
            incoming = sum(model.tensor(n).nbytes or 0 for n in node.all_inputs if model.producer(n))
            total += penalty * (costs.overhead_ms(executor) + costs.switch_ms(previous, executor)
                                + costs.transfer_ms(incoming, previous, executor))
        previous = executor
    return total


@pytest.mark.parametrize("seed", range(12))
def test_chain_search_finds_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    count = rng.randint(2, 6)
    model = _chain_model(count)
    executors = [StubExecutor(40 + i) for i in range(3)]
    executors[2] = hetero.executors.resolve(["numpy"])[0]  # one in host memory: switches cost transfers
    table = {i: {e.name: rng.uniform(0.1, 5.0) for e in executors} for i in range(count)}
    overhead = {e.name: rng.uniform(0.0, 2.0) for e in executors}
    switch = {(a.name, b.name): rng.uniform(0.0, 3.0) for a in executors for b in executors if a is not b}
    costs = TableCosts(table, overhead, per_byte=rng.uniform(0, 0.01), switch=switch)
    capability = Capability(model, executors)
    for penalty in (1.0, 3.0):
        found = chain_assignment(model, capability, costs, penalty)
        best = min(_objective(model, list(a), costs, penalty)
                   for a in itertools.product(executors, repeat=count))
        assert _objective(model, found, costs, penalty) == pytest.approx(best)


def test_searched_plan_is_never_estimated_slower_than_a_single_library():
    rng = random.Random(3)
    model = _chain_model(8)
    executors = [StubExecutor(50), StubExecutor(51)]
    table = {i: {e.name: rng.uniform(0.5, 3.0) for e in executors} for i in range(8)}
    costs = TableCosts(table, {e.name: 0.3 for e in executors}, per_byte=0.0)
    found = candidates(model, Capability(model, executors), costs)
    singles = [c for c in found if c.name.endswith(" alone")]
    assert len(singles) == 2
    best_chain = chain_assignment(model, Capability(model, executors), costs)
    searched = next(c for c in found if c.assignment == best_chain)
    assert searched.estimate_ms <= min(c.estimate_ms for c in singles) + 1e-9
    assert found[0].estimate_ms == min(c.estimate_ms for c in found)
    assert all(c.estimate_ms == pytest.approx(estimate(c.plan, costs)) for c in found)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    from hetero.planner import cost
    from hetero.runtime import samples, tuning
    for store in (cost._costs, tuning._plans, samples._shapes):
        store.clear_memory()
    yield tmp_path
    for store in (cost._costs, tuning._plans, samples._shapes):
        store.clear_memory()


def test_latency_policy_measures_and_keeps_the_fastest(cache_dir):
    from hetero.runtime import tuning

    slow, fast = StubExecutor(60, seconds_per_call=0.06), StubExecutor(61, seconds_per_call=0.002)
    session = hetero.compile(small_cnn(), [slow, fast], "latency")
    assert {p.executor.name for p in session.plan.partitions} == {fast.name}
    names = {c.name for c in session.plan.candidates}
    assert {f"{slow.name} alone", f"{fast.name} alone"} <= names
    chosen = [c for c in session.plan.candidates if c.chosen]
    fastest = min(c.measured_ms for c in session.plan.candidates)
    # the fastest, or the best single library when a mixed placement wins by no more than the margin
    assert len(chosen) == 1 and chosen[0].measured_ms <= fastest * (1 + tuning.MIXED_MARGIN)
    assert session.plan.partition_measured and "candidate" in str(session.plan)
    feeds = example_feeds(session.model)
    want = hetero.compile(small_cnn(), ["numpy"]).run(feeds)["logits"]
    np.testing.assert_allclose(session.run(feeds)["logits"], want, rtol=1e-5, atol=1e-6)


def test_second_planning_measures_nothing(cache_dir):
    executors = ["onnxruntime", "numpy"]
    first = hetero.compile(small_cnn(), executors, "latency")
    measured_files = sorted(p.name for p in cache_dir.iterdir())
    assert "costs.sqlite" in measured_files and "plans.sqlite" in measured_files
    calls = []
    from hetero.planner import cost
    original = cost.CostModel._measure_one
    cost.CostModel._measure_one = lambda self, *a: calls.append(a) or original(self, *a)
    try:
        second = hetero.compile(small_cnn(), executors, "latency")
    finally:
        cost.CostModel._measure_one = original
    assert calls == []
    assert [c.name for c in second.plan.candidates] == [c.name for c in first.plan.candidates]
    assert [(c.name, c.measured_ms) for c in second.plan.candidates if c.chosen] == \
        [(c.name, c.measured_ms) for c in first.plan.candidates if c.chosen]


def test_race_interleaves_the_finalists_and_ranks_them_by_median():
    from hetero.runtime.tuning import _race

    calls = []

    class Timed:
        def __init__(self, name: str, seconds: float):
            self.name, self.seconds = name, seconds

        def run(self, feeds):
            calls.append(self.name)
            time.sleep(self.seconds)

    times = _race({("slow",): Timed("slow", 0.006), ("fast",): Timed("fast", 0.001)}, {},
                  min_rounds=3, max_rounds=3)
    assert calls == ["slow", "slow", "fast", "fast"] * 3  # an untimed run, then a timed one, in turns
    assert times[("fast",)] < times[("slow",)] and times[("slow",)] >= 6


def test_throughput_policy_keeps_the_option_it_measured_fastest(cache_dir):
    runner = hetero.compile(small_cnn(), ["onnxruntime", "numpy"], "throughput")
    note = next(n for n in runner.plan.notes if n.startswith("throughput:"))
    chosen = note.rsplit("; chose ", 1)[1]
    rates = [float(rate) for rate in re.findall(r"([\d.]+) req/s", note)]
    assert float(re.search(re.escape(chosen) + r" ([\d.]+) req/s", note)[1]) == max(rates), note
    assert isinstance(runner, hetero.ReplicaPool) == ("replicas" in chosen)
    feeds = example_feeds(runner.model)
    want = hetero.compile(small_cnn(), ["numpy"]).run(feeds)["logits"]
    np.testing.assert_allclose(runner.run(feeds)["logits"], want, rtol=1e-4, atol=1e-5)
    runner.close()


def test_trace_is_a_chrome_timeline(tmp_path):
    stub = StubExecutor(70, ops={"Conv"}, seconds_per_call=0.01)
    session = hetero.compile(small_cnn(), [stub, "numpy"])
    with session.tracing() as trace:
        session.run(example_feeds(session.model))
    chrome = trace.chrome()
    partitions = [e for e in chrome["traceEvents"] if e.get("cat") == "partition"]
    assert [(e["name"], e["tid"]) for e in partitions] == [
        (f"#{p.index}", p.executor.name) for p in session.plan.partitions]
    assert all(e["dur"] >= 10_000 for e in partitions if e["tid"] == stub.name)  # us; the stub sleeps 10 ms
    transfers = sorted(e["name"] for e in chrome["traceEvents"] if e.get("cat") == "transfer")
    assert transfers == sorted(f"{t.tensor} {t.source} -> {t.target}" for t in session.plan.transfers)
    assert trace.save(tmp_path / "t.json").stat().st_size > 0


def test_described_devices_sketch_a_plan_with_estimates(tmp_path):
    from hetero.planner.described import load_described

    profile = tmp_path / "devices.json"
    profile.write_text('{"devices": [{"executor": "torch@cuda:7", "like": "numpy", "peak_gflops": 50000, '
                       '"bandwidth_gbs": 2000, "overhead_us": 20, "link_gbs": 25, "link_us": 10}]}')
    described, profiles = load_described(profile)
    model = hetero.load(small_cnn())
    found = hetero.planner.search(model, [*described, "numpy"], profiles=profiles)
    best = found[0]
    assert {p.executor.name for p in best.plan.partitions} == {"torch@cuda:7"}
    assert {t.link for t in best.plan.transfers} == {"cpu -> cuda:7", "cuda:7 -> cpu"}
    assert best.estimate_ms < next(c for c in found if c.name == "numpy@cpu alone").estimate_ms
    with pytest.raises(hetero.ExecutorUnavailableError, match="described"):
        described[0].compile(model.proto)
    (tmp_path / "bad.json").write_text('{"devices": [{"executor": "x@cuda:0"}]}')
    with pytest.raises(hetero.PlanError, match=r"devices\[0\]: needs 'like' and 'speed'.*'peak_gflops'"):
        load_described(tmp_path / "bad.json")


def test_search_keeps_one_library_when_switching_costs_more_than_it_saves():
    model = _chain_model(6)
    executors = [StubExecutor(70), StubExecutor(71)]
    # each library is faster on alternate nodes by 1 ms; a switch costs 2 ms
    table = {i: {executors[0].name: 1.0 + i % 2, executors[1].name: 2.0 - i % 2} for i in range(6)}
    switch = {(executors[0].name, executors[1].name): 2.0, (executors[1].name, executors[0].name): 2.0}
    cheap = TableCosts(table, {e.name: 0.0 for e in executors}, per_byte=0.0)
    dear = TableCosts(table, {e.name: 0.0 for e in executors}, per_byte=0.0, switch=switch)
    capability = Capability(model, executors)
    assert len({e.name for e in chain_assignment(model, capability, cheap)}) == 2
    assert len({e.name for e in chain_assignment(model, capability, dear)}) == 1


def test_measured_mixed_plans_correct_the_switch_costs(cache_dir):
    from hetero.planner import cost

    a, b = StubExecutor(80), StubExecutor(81)
    key = cost._switch_key(cost.executor_key(a), cost.executor_key(b))
    cost._costs.put(key, 1.0)
    cost.learn_switches([(a, b), (b, a), (a, b)], excess_ms=6.0)  # 2 ms more per switch
    assert cost._costs.get(key) == pytest.approx(3.0)
    back = cost._switch_key(cost.executor_key(b), cost.executor_key(a))
    assert cost._costs.get(back) == pytest.approx(2.0)
    cost.learn_switches([(a, b)], excess_ms=-10.0)  # never below zero
    assert cost._costs.get(key) == 0.0


def test_a_mixed_placement_must_win_by_the_margin():
    from hetero.runtime.tuning import MIXED_MARGIN, _choose

    def candidate(name):
        return hetero.planner.Candidate(name, [], 0.0, None)

    single, mixed = candidate("a alone"), candidate("search (switch cost x1)")
    close = [(single, 10.0, None), (mixed, 10.0 / (1 + MIXED_MARGIN / 2), None)]
    assert _choose(close)[0] is single
    clear = [(single, 10.0, None), (mixed, 10.0 / (1 + 2 * MIXED_MARGIN), None)]
    assert _choose(clear)[0] is mixed
