"""`hetero.compile` and `hetero.plan`: every policy, measured ones included."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from hetero import planner
from hetero.executors import Executor
from hetero.graph import load
from hetero.graph.load import ModelSource
from hetero.planner import MEASURED_POLICIES, Plan
from hetero.planner.cost import Progress
from hetero.runtime.replicas import ReplicaPool
from hetero.runtime.samples import SampleInputs
from hetero.runtime.session import Session, compile_plan
from hetero.runtime.tuning import tune_latency, tune_throughput


def compile(model: ModelSource, executors: Sequence[str | Executor] | str | None = None,
            policy: str = "priority", *, affinity: Mapping[str, str | Executor] | None = None,
            progress: Progress | None = None, max_in_flight: int = 16,
            allow_precision: str | None = None, sample_inputs: SampleInputs | None = None,
            input_shapes: Mapping[str, Sequence[int]] | None = None,
            check_finite: bool = True) -> Session | ReplicaPool:
    """Load (if needed), place and compile a model for this host's executors.

    Policies: `priority` (first executor in `executors` order that supports each node), `manual`
    (`affinity` rules: op type or node-name pattern -> executor, the rest by priority), `latency`
    / `auto` (measured: the fastest of the single-library plans and the searched placements),
    `throughput` (measured: replicas on CPU streams and devices, or one pipelined session).
    Everything runs in fp32 unless `allow_precision="bf16"` lets measured policies use bf16
    variants (OpenVINO's) where the outputs stay within 1% relative error of fp32.

    Measured policies plan on representative inputs: `sample_inputs` (a feeds dict, or a list of
    them: the first is timed, all check reduced precision), else random values shaped by
    `input_shapes` ({"images": [1, 3, 640, 640]}), else by the model's dims with
    `hetero.graph.model.DEFAULT_DIMS` for symbolic ones. If the model cannot run on inputs made
    up that way, a `RuntimeWarning` names the inputs it needs and the `priority` plan is kept.
    `check_finite` (on by default; one reduction per float output of each partition) treats NaN
    or infinity from finite inputs as the partition's library failing: the nodes are run elsewhere,
    and if they give NaN or infinity there too, that is the model's answer (see `Session`).
    Returns a `Session`, or a `ReplicaPool` when `throughput` chooses replicas; both have `run`,
    `submit`, `run_async` and `map`.
    """
    model = load(model)
    if policy in ("latency", "auto"):
        runner = tune_latency(model, executors, progress=progress, max_in_flight=max_in_flight,
                              allow_precision=allow_precision, sample_inputs=sample_inputs,
                              input_shapes=input_shapes)
    elif policy == "throughput":
        runner = tune_throughput(model, executors, progress=progress, sample_inputs=sample_inputs,
                                 input_shapes=input_shapes)
    else:
        runner = compile_plan(model, executors, policy, affinity=affinity, max_in_flight=max_in_flight)
    for session in [r.session for r in runner.replicas] if isinstance(runner, ReplicaPool) else [runner]:
        session.check_finite = check_finite
    return runner


def plan(model: ModelSource, executors: Sequence[str | Executor] | str | None = None,
         policy: str = "priority", *, affinity: Mapping[str, str | Executor] | None = None,
         progress: Progress | None = None, sample_inputs: SampleInputs | None = None,
         input_shapes: Mapping[str, Sequence[int]] | None = None) -> Plan:
    """Where each part of the model would run. Measured policies compile and time candidates (and
    cache what they measured) on representative inputs (see `compile`), so their plan shows
    estimated and measured times and the candidates rejected."""
    model = load(model)
    if policy in MEASURED_POLICIES:
        runner = compile(model, executors, policy, progress=progress, sample_inputs=sample_inputs,
                         input_shapes=input_shapes)
        return runner.plan
    return planner.plan(model, executors, policy, affinity=affinity)
