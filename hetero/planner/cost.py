"""The cost model: how long a node takes on an executor, and a tensor on a link between memory spaces.

Measured where possible: the node alone, compiled by the executor, run on the real values it sees
in the model on representative inputs (captured by the caller, see `hetero.runtime.samples`) —
warm-up, repeats, median — minus the executor's cost of an empty call, which is charged once per
partition instead. Measurements are cached on disk keyed by executor (library, version, device,
threads, precision), node signature (op, attributes, input shapes and dtypes) and the concrete
shapes of the run (the shape profile), so the second planning of a model, or of another model
sharing its layers, measures nothing.

Estimated otherwise: a roofline from the executor's probed peak GFLOP/s and bandwidth
(`hetero devices --probe`), or from a described device's figures in a profile file.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from hetero.cache import JsonStore
from hetero.executors import Executor, is_accelerator
from hetero.graph import Model, Node
from hetero.planner.work import bytes_moved, flops

Progress = Callable[[int, int, str], None]
_costs = JsonStore("costs")


@dataclass(frozen=True)
class ExecutorProfile:
    """Roofline figures of one executor: what it reaches on a big GEMM and a big elementwise add,
    and what an empty call costs. `link_gbs`/`link_ms` describe its host link (0 on the host)."""

    peak_gflops: float
    bandwidth_gbs: float
    overhead_ms: float
    link_gbs: float = 0.0
    link_ms: float = 0.0

    def estimate_ms(self, node: Node, model: Model) -> float:
        compute = flops(node, model) / (self.peak_gflops * 1e6)
        memory = bytes_moved(node, model) / (self.bandwidth_gbs * 1e6)
        return max(compute, memory)


def executor_key(executor: Executor) -> str:
    info = executor.info()
    return f"{info.library}={info.version}@{info.device}:{info.device_name}/t{info.threads}/{info.precision}"


def time_call(call: Callable[[], Any], min_repeats: int = 3, max_repeats: int = 25,
              budget_s: float = 0.05) -> float:
    """Median seconds of `call` after one warm-up: at least `min_repeats` runs, more within budget."""
    call()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _single_op_model(op_type: str, shapes: Sequence[Sequence[int]], out_shape: Sequence[int],
                     **attrs: Any) -> onnx.ModelProto:
    names = [f"x{i}" for i in range(len(shapes))]
    graph = helper.make_graph(
        [helper.make_node(op_type, names, ["y"], **attrs)], f"probe_{op_type.lower()}",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, list(s)) for n, s in zip(names, shapes,
                                                                                           strict=True)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(out_shape))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _time_model(executor: Executor, model: onnx.ModelProto, repeats: int = 5) -> float:
    compiled = executor.compile(model)
    rng = np.random.default_rng(0)
    args = []
    for value in model.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        args.append(executor.to_device(rng.standard_normal(shape).astype(np.float32)))

    def call() -> None:
        compiled(args)
        executor.synchronize()

    return time_call(call, min_repeats=repeats)


def probe(executor: Executor, refresh: bool = False) -> ExecutorProfile:
    """Measure (or recall) an executor's roofline figures with three tiny models."""
    key = f"profile|{executor_key(executor)}"
    cached = _costs.get(key)
    if cached and not refresh:
        return ExecutorProfile(**cached)
    n = 1024
    gemm = _time_model(executor, _single_op_model("MatMul", [[n, n], [n, n]], [n, n]))
    size = 1 << 22
    add = _time_model(executor, _single_op_model("Add", [[size], [size]], [size]))
    empty = _time_model(executor, _single_op_model("Relu", [[1]], [1]), repeats=20)
    link_gbs = link_ms = 0.0
    if executor.memory_space != "cpu":
        host = np.ones(size, np.float32)
        small = np.ones(1, np.float32)
        big_s = time_call(lambda: (executor.to_host(executor.to_device(host)), executor.synchronize()))
        small_s = time_call(lambda: (executor.to_host(executor.to_device(small)), executor.synchronize()))
        link_ms = small_s * 1e3 / 2
        link_gbs = 2 * host.nbytes / max(big_s - small_s, 1e-9) / 1e9
    profile = ExecutorProfile(
        peak_gflops=2 * n**3 / max(gemm - empty, 1e-9) / 1e9,
        bandwidth_gbs=3 * 4 * size / max(add - empty, 1e-9) / 1e9,
        overhead_ms=empty * 1e3, link_gbs=link_gbs, link_ms=link_ms)
    _costs.put(key, asdict(profile))
    _costs.save()
    return profile


def measure_switch(source: Executor, target: Executor, rounds: int = 9) -> float:
    """Milliseconds one switch from `source` to `target` adds to a request, measured: the same
    convolution compiled on both, run in turns (source, target) against each run twice in a row.
    What it catches is what node timings cannot: a library's threads spinning or sleeping after
    its call while the next library wants the cores, caches refilled, thread pools woken."""
    model = _single_op_model("Conv", [[1, 32, 56, 56], [32, 32, 3, 3]], [1, 32, 56, 56], pads=[1, 1, 1, 1])
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(s).astype(np.float32) for s in ([1, 32, 56, 56], [32, 32, 3, 3])]
    runs = []
    for executor in (source, target):
        compiled = executor.compile(model)
        args = [executor.to_device(a) for a in data]
        runs.append(lambda compiled=compiled, args=args, executor=executor: (
            compiled(args), executor.synchronize()))
    first, second = runs

    def pair(a: Callable[[], Any], b: Callable[[], Any]) -> Callable[[], None]:
        return lambda: (a(), b())

    times = {}
    for name, call in (("switch", pair(first, second)), ("source", pair(first, first)),
                       ("target", pair(second, second))):
        times[name] = time_call(call, min_repeats=rounds, max_repeats=rounds)
    return max(times["switch"] - (times["source"] + times["target"]) / 2, 0.0) * 1e3


def _switch_key(source: str, target: str) -> str:
    return f"switch|{source}|{target}"


def learn_switches(switches: Sequence[tuple[Executor, Executor]], excess_ms: float) -> None:
    """Correct the switch costs of the executor pairs a measured plan switches between by what the
    plan took beyond its estimate (negative: less), spread evenly over its switches. Measured
    mixed plans are the truth a two-library probe only approximates: thread pools and fusion lost
    at every cut cost more inside a real model."""
    if not switches:
        return
    delta = excess_ms / len(switches)
    for source, target in dict.fromkeys((a.name, b.name) for a, b in switches):
        by_name = {e.name: e for pair in switches for e in pair}
        key = _switch_key(executor_key(by_name[source]), executor_key(by_name[target]))
        _costs.put(key, max(float(_costs.get(key) or 0.0) + delta, 0.0))
    _costs.save()


@dataclass(frozen=True)
class NodeCost:
    ms: float
    measured: bool


class CostModel:
    """Node and transfer costs for one model on a set of executors (measured, else estimated).

    `shapes` (value name -> concrete shape in the run planned for) keys measurements by shape
    profile; `values` gives the values every node sees in that run, called only when something
    is to be measured. Without `values` nothing is measured: unmeasured nodes are estimated.
    """

    def __init__(self, model: Model, executors: Sequence[Executor],
                 profiles: Mapping[str, ExecutorProfile] | None = None,
                 scale: Mapping[str, float] | None = None, *,
                 shapes: Mapping[str, Sequence[int]] | None = None,
                 values: Callable[[], Mapping[str, Any]] | None = None,
                 profile: Collection[str] | None = None):
        self.model = model
        self.executors = list(executors)
        self.scale = dict(scale or {})
        self._profiles = dict(profiles or {})
        self._keys = {e.name: executor_key(e) for e in self.executors if e.name not in self._profiles}
        self._shapes = dict(shapes or {})
        self._capture = values
        self._profile = None if profile is None else set(profile)
        self._switches: dict[tuple[str, str], float] = {}
        self._values: Mapping[str, Any] | None = None

    def profile_of(self, executor: Executor) -> ExecutorProfile:
        if executor.name not in self._profiles:
            self._profiles[executor.name] = probe(executor)
        return self._profiles[executor.name]

    def _key(self, node: Node, executor: Executor) -> str:
        profile = ";".join("x".join(map(str, self._shapes[n])) if n in self._shapes else "?"
                           for n in node.all_inputs)
        return f"node|{self._keys[executor.name]}|{self.model.signature(node)}|{profile}"

    def node(self, node: Node, executor: Executor) -> NodeCost:
        """Cost of `node` alone on `executor`, without the per-partition call overhead, times the
        executor's calibration `scale` (measured whole-model time over the sum of its nodes: graph
        compilers fuse, so a node costs less inside a partition than alone)."""
        factor = self.scale.get(executor.name, 1.0)
        if executor.name in self._keys:
            measured = _costs.get(self._key(node, executor))
            if measured is not None:
                return NodeCost(float(measured) * factor, True)
        return NodeCost(self.profile_of(executor).estimate_ms(node, self.model) * factor, False)

    def overhead_ms(self, executor: Executor) -> float:
        return self.profile_of(executor).overhead_ms

    def switch_ms(self, source: Executor | None, target: Executor) -> float:
        """What a request pays when `target` takes over from `source` on one resource (measured
        once per pair and cached; see `measure_switch`), besides `target`'s call overhead. Zero
        when either end is an accelerator (its work overlaps the host's) or was described, not
        measured. Host libraries, and OpenCL on the CPU, share the cores: there it is measured."""
        if source is None or source.name == target.name:
            return 0.0
        if source.resource != target.resource and (is_accelerator(source) or is_accelerator(target)):
            return 0.0
        if source.name not in self._keys or target.name not in self._keys:
            return 0.0
        pair = (source.name, target.name)
        if pair not in self._switches:  # the search asks for every node: look up once per pair
            self._switches[pair] = self._switch_ms(source, target)
        return self._switches[pair]

    def _switch_ms(self, source: Executor, target: Executor) -> float:
        key = _switch_key(self._keys[source.name], self._keys[target.name])
        cached = _costs.get(key)
        if cached is None and self._profile is not None and not {source.name, target.name} <= self._profile:
            return 0.0  # executors not worth profiling here are not worth a measurement either
        if cached is None:
            try:
                cached = measure_switch(source, target)
            except Exception:
                cached = 0.0  # one of them cannot run the probe: no evidence of a cost
            _costs.put(key, cached)
            _costs.save()
        return float(cached)

    def transfer_ms(self, nbytes: int | None, source: Executor | None, target: Executor | None) -> float:
        """Moving `nbytes` from one executor's memory space to another's, through the host."""
        if source is not None and target is not None and source.memory_space == target.memory_space:
            return 0.0
        total = 0.0
        for end in (source, target):
            if end is None or end.memory_space == "cpu":
                continue
            profile = self.profile_of(end)
            total += profile.link_ms + (nbytes or 0) / max(profile.link_gbs, 1e-9) / 1e6
        return total

    def unmeasured(self, capable: Mapping[int, Sequence[Executor]]) -> list[tuple[Node, Executor]]:
        """(node, executor) pairs with no measurement yet, one per distinct signature, on the
        executors to profile."""
        seen: set[str] = set()
        missing = []
        for node in self.model.nodes:
            for executor in capable.get(node.index, ()):
                if executor.name not in self._keys or (self._profile is not None
                                                       and executor.name not in self._profile):
                    continue
                key = self._key(node, executor)
                if key not in seen and _costs.get(key) is None:
                    seen.add(key)
                    missing.append((node, executor))
        return missing

    def measure(self, pairs: Sequence[tuple[Node, Executor]], progress: Progress | None = None,
                budget_s: float | None = None) -> int:
        """Measure nodes on executors with the model's real values; returns how many were measured.

        With `budget_s`, the heaviest nodes (by roofline estimate) go first and measuring stops
        when the budget is spent: the rest keep their estimates (and are measured next time)."""
        if not pairs or self._capture is None:
            return 0
        if self._values is None:
            self._values = self._capture()
        if budget_s is not None:
            pairs = sorted(pairs, key=lambda p: -self.profile_of(p[1]).estimate_ms(p[0], self.model))
        deadline = time.perf_counter() + (budget_s if budget_s is not None else float("inf"))
        done = 0
        for node, executor in pairs:
            if time.perf_counter() > deadline:
                break
            done += 1
            if progress:
                progress(done, len(pairs), f"{node.op_type} on {executor.name}")
            _costs.put(self._key(node, executor), self._measure_one(node, executor))
            if done % 20 == 0:
                _costs.save()
        _costs.save()
        return done

    def _measure_one(self, node: Node, executor: Executor) -> float:
        overhead = self.overhead_ms(executor)
        try:
            compiled = executor.compile(self.model.extract([node]))
            args = [executor.to_device(self._values[name]) for name in compiled.input_names]

            def call() -> None:
                compiled(args)
                executor.synchronize()

            return max(time_call(call) * 1e3 - overhead, 0.0)
        except Exception:
            return float("inf")  # the library claimed the node but cannot run it alone
