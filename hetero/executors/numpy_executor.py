"""`numpy@cpu`: the exact host executor, always present.

Built on the `onnx.reference` kernels, so it runs every standard operator with ONNX's own
semantics; the hot operators take fast numpy/BLAS paths (`array_kernels`). It is the executor
of last resort: vendor libraries add speed, this one keeps every case running.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, partial
from typing import Any

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun, RuntimeContextError

from hetero import kernels
from hetero.errors import CompileError, RunError
from hetero.executors.array_kernels import FAST_OPS
from hetero.executors.base import CompiledPartition, Executor, ExecutorInfo
from hetero.executors.exact_ops import EXACT_OPS, UNIMPLEMENTED, declines, strings_as_objects
from hetero.graph import Model, Node

_REFERENCE_DOMAINS = ("", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training", "experimental")


@cache
def implements(domain: str, op_type: str, version: int) -> bool:
    """Whether a kernel here or in onnx.reference computes this op at this opset version."""
    if domain not in _REFERENCE_DOMAINS:
        return False
    if domain == "":
        try:
            if (op_type, onnx.defs.get_schema(op_type, version).since_version) in UNIMPLEMENTED:
                return False
        except onnx.defs.SchemaError:
            return False
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


def _with_own_defaults(cls: Any, schema: onnx.defs.OpSchema, node: onnx.NodeProto, run_params: dict) -> OpRun:
    op = cls(node, run_params)
    given = {a.name for a in node.attribute}
    for name, attr in schema.attributes.items():
        default = attr.default_value
        undefined = default.type == 0 or (default.type == onnx.AttributeProto.TENSOR
                                          and not default.t.data_type)
        if name not in given and name in getattr(op, "attributes_names_", ()) and not undefined:
            setattr(op, name, op._extract_attribute_value(default, attr))
    return op


class _Evaluator(ReferenceEvaluator):
    """onnx.reference's evaluator with each node's attribute defaults taken from the schema of its
    own op version: the reference takes them from the newest (Softmax-11 would get axis=-1 rather
    than 1, Selu-1 another alpha)."""

    def _load_impl(self, node: onnx.NodeProto, input_types: Any = None) -> Any:
        cls = super()._load_impl(node, input_types)
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opsets[node.domain], node.domain)
        except (onnx.defs.SchemaError, KeyError):
            return cls
        return partial(_with_own_defaults, cls, schema)


class _Interpreted(CompiledPartition):
    def __init__(self, part: onnx.ModelProto, new_ops: list[type[OpRun]]):
        self.input_names = [i.name for i in part.graph.input]
        self.output_names = [o.name for o in part.graph.output]
        self._label = part.graph.name
        self._evaluator = _Evaluator(part, new_ops=new_ops)

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        try:
            outputs = self._evaluator.run(None, dict(zip(self.input_names, inputs, strict=True)))
        except Exception as exc:
            raise RunError(f"numpy@cpu failed running partition {self._label!r}: {exc}") from exc
        return [strings_as_objects(np.asarray(o) if isinstance(o, np.generic) else o) for o in outputs]


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
        if node.domain == "" and declines(node.proto, version):
            return False
        return implements(node.domain, node.op_type, version)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        custom = []
        for node in part.graph.node:
            spec = kernels.lookup(node.domain, node.op_type, "numpy")
            if spec is not None:
                custom.append(host_kernel_op(spec))
        try:
            return _Interpreted(part, [*custom, *FAST_OPS, *EXACT_OPS])
        except Exception as exc:
            raise CompileError(f"numpy@cpu cannot build partition {part.graph.name!r}: {exc}") from exc
