"""Session: one compiled plan, run one request at a time with `Session.run`.

Values stay in the memory space of the executor that produced them; a value crosses to another
space only when a partition there reads it, once per space and request. Executors that share a
memory space (every host library) hand each other the same numpy arrays, no copies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import numpy_helper

from hetero import planner
from hetero.errors import CompileError, HeteroError, InputError, RunError
from hetero.executors import CompiledPartition, Executor
from hetero.graph import Model, TensorInfo, load
from hetero.graph.load import ModelSource
from hetero.planner import HOST, Plan


@dataclass
class RunStats:
    """Counters since the session was built: requests, transfers made and bytes moved."""

    runs: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Step:
    index: int
    executor: Executor
    compiled: CompiledPartition
    release: tuple[str, ...]


class _PartitionFailed(Exception):
    def __init__(self, step: _Step, error: Exception):
        super().__init__(str(error))
        self.step = step
        self.error = error


class _Program:
    """A plan with its compiled partitions, ready to run: immutable, shared by concurrent runs."""

    def __init__(self, plan: Plan, compiled: Sequence[CompiledPartition]):
        self.plan = plan
        model = plan.model
        last_use: dict[str, int] = {}
        for part, comp in zip(plan.partitions, compiled, strict=True):
            for name in comp.input_names:
                last_use[name] = part.index
        keep = set(model.output_names)
        self.steps = [
            _Step(part.index, part.executor, comp,
                  tuple(n for n, last in last_use.items() if last == part.index and n not in keep))
            for part, comp in zip(plan.partitions, compiled, strict=True)]
        produced = {o for p in plan.partitions for o in p.outputs} | set(model.input_names)
        self.constants = {name: _initializer(model, name) for name in model.output_names
                          if name not in produced}

    def execute(self, arrays: dict[str, np.ndarray], wanted: Sequence[str], moved: list[int]) -> dict:
        values: dict[str, dict[str, tuple[Executor | None, Any]]] = {
            name: {HOST: (None, array)} for name, array in arrays.items()}
        for step in self.steps:
            args = [_fetch(values, name, step.executor, moved) for name in step.compiled.input_names]
            try:
                outputs = step.compiled(args)
            except Exception as exc:
                raise _PartitionFailed(step, exc) from exc
            for name, value in zip(step.compiled.output_names, outputs, strict=True):
                values[name] = {step.executor.memory_space: (step.executor, value)}
            for name in step.release:
                values.pop(name, None)
        result = {}
        for name in wanted:
            if name in self.constants:
                result[name] = self.constants[name]
            else:
                value = _fetch(values, name, None, moved)
                result[name] = np.asarray(value) if isinstance(value, np.generic) else value
        return result


def _fetch(values: dict, name: str, target: Executor | None, moved: list[int]) -> Any:
    """`name` in the target's memory space (None: host), moving it there once if needed."""
    space = HOST if target is None else target.memory_space
    held = values[name]
    if space in held:
        return held[space][1]
    owner, value = held.get(HOST) or next(iter(held.values()))
    host = value if owner is None or owner.memory_space == HOST else owner.to_host(value)
    result = host if target is None or space == HOST else target.to_device(host)
    held[space] = (target, result)
    moved[0] += 1
    moved[1] += int(getattr(host, "nbytes", 0))
    return result


Rebuild = Callable[[], tuple[Plan, list[CompiledPartition]]]


class Session:
    """A model compiled for this host's executors; build it with `hetero.compile`.

    If a library fails while running a partition it claimed it could run, the session records
    the nodes at fault, re-plans them elsewhere and runs the request again; the new plan is
    kept only if it succeeds, so a bad request cannot degrade the plan.
    """

    def __init__(self, plan: Plan, compiled: Sequence[CompiledPartition], rebuild: Rebuild | None = None):
        self.model: Model = plan.model
        self.stats = RunStats()
        self._lock = threading.Lock()
        self._rebuild = rebuild
        self._program = _Program(plan, compiled)

    @property
    def plan(self) -> Plan:
        return self._program.plan

    def __repr__(self) -> str:
        return (f"<Session {self.model.label!r}: {len(self.plan.partitions)} partitions on "
                f"{', '.join(e.name for e in self.plan.executors)}>")

    @property
    def inputs(self) -> tuple[TensorInfo, ...]:
        return self.model.inputs

    @property
    def outputs(self) -> tuple[TensorInfo, ...]:
        return self.model.outputs

    def run(self, feeds: Mapping[str, Any] | Sequence[str] | None,
            output_names: Mapping[str, Any] | Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one request: `run(feeds)` or `run(feeds, output_names)` -> {output name: array}.

        ONNX Runtime's argument order `run(output_names, feeds)` is accepted too; either way the
        result is a dict of host numpy arrays, all outputs when `output_names` is None.
        """
        if not isinstance(feeds, Mapping) and isinstance(output_names, Mapping):
            feeds, output_names = output_names, feeds
        if not isinstance(feeds, Mapping):
            raise InputError(f"model {self.model.label!r}: feeds must be a mapping of input name -> array, "
                             f"got {type(feeds).__name__}")
        wanted = self._wanted(output_names)
        arrays = self.check_feeds(feeds)
        start = time.perf_counter()
        moved = [0, 0]
        program = self._program
        try:
            result = program.execute(arrays, wanted, moved)
        except _PartitionFailed as failed:
            result = self._fall_back(program, failed, arrays, wanted, moved)
        with self._lock:
            self.stats.runs += 1
            self.stats.transfers += moved[0]
            self.stats.transfer_bytes += moved[1]
            self.stats.seconds += time.perf_counter() - start
        return result

    def _fall_back(self, program: _Program, failed: _PartitionFailed, arrays: dict, wanted: list[str],
                   moved: list[int]) -> dict:
        step = failed.step
        part = program.plan.partitions[step.index]
        error = RunError(f"model {self.model.label!r}: partition #{step.index} on {step.executor.name} "
                         f"failed: {failed.error}")
        if self._rebuild is None:
            raise error from failed.error
        text = str(failed.error)
        culprits = [n for n in part.nodes if f"'{n.name}'" in text] or list(part.nodes)
        with self._lock:
            if self._program is not program:  # another request already re-planned
                return self._program.execute(arrays, wanted, moved)
            for node in culprits:
                planner.reject(step.executor, self.model, node)
            try:
                new_program = _Program(*self._rebuild())
                result = new_program.execute(arrays, wanted, moved)
            except (HeteroError, _PartitionFailed):
                for node in culprits:
                    planner.forget(step.executor, self.model, node)
                raise error from failed.error
            new_program.plan.notes.append(
                f"{step.executor.name} failed at run time on {len(culprits)} node(s) "
                f"({', '.join(n.name for n in culprits[:3])}); re-planned them elsewhere")
            self._program = new_program
            return result

    def _wanted(self, output_names: Sequence[str] | None) -> list[str]:
        if output_names is None:
            return list(self.model.output_names)
        if isinstance(output_names, str):
            output_names = [output_names]
        unknown = [n for n in output_names if n not in self.model.output_names]
        if unknown:
            raise InputError(f"model {self.model.label!r} has no output {unknown[0]!r}; outputs are "
                             f"{', '.join(self.model.output_names)}")
        return list(output_names)

    def check_feeds(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Feeds as numpy arrays, checked against the model's inputs; `InputError` names the field."""
        label = self.model.label
        expected = {i.name: i for i in self.model.inputs}
        unknown = [n for n in feeds if n not in expected]
        if unknown:
            raise InputError(f"model {label!r} has no input {unknown[0]!r}; inputs are "
                             f"{', '.join(expected) or '(none)'}")
        missing = [n for n in expected if n not in feeds]
        if missing:
            raise InputError(f"model {label!r}: input {missing[0]!r} ({expected[missing[0]].describe()}) "
                             "is missing from the feeds")
        arrays: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[str, int]] = {}
        for name, info in expected.items():
            value = feeds[name]
            if info.kind != "tensor":
                arrays[name] = value
                continue
            array = np.asarray(value)
            if info.dtype is not None and array.dtype != info.dtype:
                raise InputError(f"model {label!r}: input {name!r} must be {info.dtype.name}, got "
                                 f"{array.dtype.name} (convert with .astype(np.{info.dtype.name}))")
            if info.shape is not None:
                if array.ndim != len(info.shape):
                    raise InputError(f"model {label!r}: input {name!r} must have rank {len(info.shape)} "
                                     f"({info.describe()}), got shape {array.shape}")
                for axis, (want, got) in enumerate(zip(info.shape, array.shape, strict=True)):
                    if isinstance(want, int) and want != got:
                        raise InputError(f"model {label!r}: input {name!r} dimension {axis} must be {want} "
                                         f"({info.describe()}), got shape {array.shape}")
                    if isinstance(want, str):
                        seen = symbols.setdefault(want, (name, got))
                        if seen[1] != got:
                            raise InputError(
                                f"model {label!r}: dimension {want!r} is {seen[1]} in input {seen[0]!r} "
                                f"but {got} in input {name!r}")
            arrays[name] = array
        return arrays


def _initializer(model: Model, name: str) -> np.ndarray:
    for tensor in model.proto.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


def compile(model: ModelSource, executors: Sequence[str | Executor] | str | None = None,
            policy: str = "priority", *, affinity: Mapping[str, str | Executor] | None = None,
            max_replans: int = 16) -> Session:
    """Load (if needed), plan and compile a model for this host; returns a `Session`.

    When a library rejects a partition at compile time, the nodes it rejects are recorded and the
    model re-planned without them on that executor; the plan's notes say what happened.
    """
    model = load(model)

    def build() -> tuple[Plan, list[CompiledPartition]]:
        notes: list[str] = []
        for _ in range(max_replans):
            the_plan = planner.plan(model, executors, policy, affinity=affinity)
            try:
                compiled = [compile_partition(model, part) for part in the_plan.partitions]
            except _Rejected as rejected:
                notes.append(rejected.note)
                continue
            the_plan.notes.extend(notes)
            return the_plan, compiled
        raise CompileError(f"model {model.label!r}: gave up after {max_replans} re-plans; last: {notes[-1]}")

    return Session(*build(), rebuild=build)


class _Rejected(Exception):
    def __init__(self, note: str):
        self.note = note


def compile_partition(model: Model, part: planner.Partition) -> CompiledPartition:
    """Compile one partition; on rejection, record the culprit nodes and raise `_Rejected`."""
    executor = part.executor
    name = f"{model.proto.graph.name or 'model'}#{part.index}@{executor.name}"
    try:
        return executor.compile(model.extract(part.nodes, name=name))
    except CompileError as exc:
        culprits = [n for n in part.nodes if n.name in exc.nodes] or _find_culprits(model, part)
        for node in culprits:
            planner.reject(executor, model, node)
        names = ", ".join(n.name for n in culprits[:5]) + (" ..." if len(culprits) > 5 else "")
        raise _Rejected(f"{executor.name} rejected {len(culprits)} node(s) at compile time ({names}); "
                        "re-planned them elsewhere") from exc


def _find_culprits(model: Model, part: planner.Partition) -> list:
    """Nodes the executor cannot compile alone; all of them if none fails alone."""
    failing = []
    for node in part.nodes:
        try:
            part.executor.compile(model.extract([node]))
        except CompileError:
            failing.append(node)
    return failing or list(part.nodes)
