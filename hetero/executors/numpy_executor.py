"""`numpy@cpu`: the exact host executor, always present.

Built on the `onnx.reference` kernels, so it runs every standard operator with ONNX's own
semantics; the hot operators take fast numpy/BLAS paths (`array_kernels`). It is the executor
of last resort: vendor libraries add speed, this one keeps every case running.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun, RuntimeContextError
from onnx.reference.ops.op_loop import Loop as ReferenceLoop

from hetero import kernels
from hetero.errors import CompileError, RunError
from hetero.executors.array_kernels import FAST_OPS
from hetero.executors.base import CompiledPartition, Executor, ExecutorInfo
from hetero.graph import Model, Node

_REFERENCE_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training", "experimental")


@cache
def _reference_has(domain: str, op_type: str, version: int) -> bool:
    if domain not in _REFERENCE_DOMAINS:
        return False
    if domain == "":
        from onnx.reference.ops import load_op
    elif domain == "ai.onnx.ml":
        from onnx.reference.ops.aionnxml import load_op
    elif domain == "experimental":
        from onnx.reference.ops.experimental import load_op
    elif domain == "ai.onnx.preview":
        from onnx.reference.ops.aionnx_preview import load_op
    else:
        from onnx.reference.ops.aionnx_preview_training import load_op
    try:
        if domain == "":
            load_op(domain, op_type, version, evaluator_cls=ReferenceEvaluator)
        else:
            load_op(domain, op_type, version)
    except RuntimeContextError:
        return True  # implemented, its function body depends on input types
    except (NotImplementedError, RuntimeError, KeyError, ValueError, TypeError, AssertionError):
        return False
    return True


def host_kernel_op(spec: kernels.Kernel) -> type[OpRun]:
    """Wrap a registered numpy kernel as an onnx.reference op."""

    def _run(self: OpRun, *inputs: Any, **attributes: Any) -> tuple:
        result = spec.fn(*inputs, **{**self._attributes, **attributes})
        return tuple(result) if isinstance(result, tuple | list) else (result,)

    def __init__(self: OpRun, onnx_node: Any, run_params: dict, schema: Any = None) -> None:
        OpRun.__init__(self, onnx_node, run_params, schema)
        self._attributes = {a.name: onnx.helper.get_attribute_value(a) for a in onnx_node.attribute}

    return type(spec.op_type, (OpRun,), {"op_domain": spec.domain, "_run": _run, "__init__": __init__})


class Loop(ReferenceLoop):
    """onnx.reference's Loop, with scan outputs stacked along a new first axis as the spec says
    (the reference `vstack`s them, which turns N scalars into an [N, 1] tensor)."""

    def _run(self, M, cond, *args, context=None, body=None, attributes=None, bindings=None):
        names = self.body.input_names
        inputs = dict.fromkeys(names)
        for name, value in zip(names[2:], args, strict=False):
            inputs[name] = value
        inputs.update(context or {})
        scans: list[list] = [[] for _ in range(self.K)]
        carried = [inputs[n] for n in names[2:]]
        iteration = 0
        while cond and (M is None or iteration < M):
            if names[0] is not None:
                inputs[names[0]] = np.array(iteration, dtype=None if M is None else M.dtype)
            if len(names) > 1 and names[1] is not None:
                inputs[names[1]] = cond
            outputs = self._run_body(inputs, attributes=attributes, bindings=bindings)
            for k in range(self.K):
                scans[k].append(outputs[-self.K + k])
            cond = outputs[self.output_index[self.body.output_names[0]]]
            carried = outputs[1:1 + self.N]
            for name, value in zip(names[2:], carried, strict=False):
                inputs[name] = value
            iteration += 1
        results = list(carried) + [np.stack(values) if values else np.empty((0,)) for values in scans]
        return self._check_and_fix_outputs(tuple(results))


class _Interpreted(CompiledPartition):
    def __init__(self, part: onnx.ModelProto, new_ops: list[type[OpRun]]):
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]
        self._label = part.graph.name
        self._evaluator = ReferenceEvaluator(part, new_ops=new_ops)

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        try:
            outputs = self._evaluator.run(None, dict(zip(self.input_names, inputs, strict=True)))
        except Exception as exc:
            raise RunError(f"numpy@cpu failed running partition {self._label!r}: {exc}") from exc
        return [np.asarray(o) if isinstance(o, np.generic) else o for o in outputs]


class NumpyExecutor(Executor):
    library = "numpy"
    extra = ""
    kernel_kind = "numpy"
    exact = True

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls()]

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.library, np.__version__, "cpu", "host CPU (BLAS)",
                            self.threads, "fp32 (exact ONNX semantics)")

    def supports_op(self, node: Node, model: Model) -> bool:
        version = model.opsets.get(node.domain)
        if version is None:
            return any(f.domain == node.domain and f.name == node.op_type for f in model.proto.functions)
        return _reference_has(node.domain, node.op_type, version)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        custom = []
        for node in part.graph.node:
            spec = kernels.lookup(node.domain, node.op_type, "numpy")
            if spec is not None:
                custom.append(host_kernel_op(spec))
        try:
            return _Interpreted(part, [*custom, *FAST_OPS, Loop])
        except Exception as exc:
            raise CompileError(f"numpy@cpu cannot build partition {part.graph.name!r}: {exc}") from exc
