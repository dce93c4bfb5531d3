"""The cost model: how long a node takes on an executor, and a tensor on a link between memory spaces.

Measured where possible: the node alone, compiled by the executor, run on the real values it sees
in the model (captured once by the exact host executor) — warm-up, repeats, median — minus the
executor's cost of an empty call, which is charged once per partition instead. Measurements are
cached on disk keyed by executor (library, version, device, threads, precision) and node
signature (op, attributes, input shapes and dtypes), so the second planning of a model, or of
another model sharing its layers, measures nothing.

Estimated otherwise: a roofline from the executor's probed peak GFLOP/s and bandwidth
(`hetero devices --probe`), or from a described device's figures in a profile file.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from hetero import executors as executor_registry
from hetero.cache import JsonStore
from hetero.executors import Executor
from hetero.graph import Model, Node, example_feeds
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


def capture_values(model: Model, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every value of one run of the model on the exact host executor (real inputs for profiling)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    known = {o.name for o in proto.graph.output}
    for node in model.nodes:
        for name in node.outputs:
            if name and name not in known:
                info = model.value_info(name)
                proto.graph.output.append(info if info is not None else onnx.ValueInfoProto(name=name))
                known.add(name)
    compiled = executor_registry.reference().compile(proto)
    feeds = dict(feeds) if feeds is not None else example_feeds(model)
    values = dict(zip(compiled.output_names, compiled([feeds[n] for n in compiled.input_names]),
                      strict=True))
    values.update(feeds)
    return values


@dataclass(frozen=True)
class NodeCost:
    ms: float
    measured: bool


class CostModel:
    """Node and transfer costs for one model on a set of executors (measured, else estimated)."""

    def __init__(self, model: Model, executors: Sequence[Executor],
                 profiles: Mapping[str, ExecutorProfile] | None = None,
                 scale: Mapping[str, float] | None = None):
        self.model = model
        self.executors = list(executors)
        self.scale = dict(scale or {})
        self._profiles = dict(profiles or {})
        self._keys = {e.name: executor_key(e) for e in self.executors if e.name not in self._profiles}
        self._values: dict[str, Any] | None = None

    def profile_of(self, executor: Executor) -> ExecutorProfile:
        if executor.name not in self._profiles:
            self._profiles[executor.name] = probe(executor)
        return self._profiles[executor.name]

    def _key(self, node: Node, executor: Executor) -> str:
        return f"node|{self._keys[executor.name]}|{self.model.signature(node)}"

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
        """(node, executor) pairs with no measurement yet, one per distinct signature."""
        seen: set[str] = set()
        missing = []
        for node in self.model.nodes:
            for executor in capable.get(node.index, ()):
                if executor.name not in self._keys:
                    continue
                key = self._key(node, executor)
                if key not in seen and _costs.get(key) is None:
                    seen.add(key)
                    missing.append((node, executor))
        return missing

    def measure(self, pairs: Sequence[tuple[Node, Executor]], progress: Progress | None = None) -> int:
        """Measure nodes on executors with the model's real values; returns how many were measured."""
        if not pairs:
            return 0
        if self._values is None:
            self._values = capture_values(self.model)
        for done, (node, executor) in enumerate(pairs, 1):
            if progress:
                progress(done, len(pairs), f"{node.op_type} on {executor.name}")
            _costs.put(self._key(node, executor), self._measure_one(node, executor))
            if done % 20 == 0:
                _costs.save()
        _costs.save()
        return len(pairs)

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
