"""`onnxruntime@cpu`: ONNX Runtime's CPU execution provider (MLAS).

A graph compiler: each partition becomes one InferenceSession. Capability is asked of ONNX
Runtime itself: its registered kernel definitions (op, version range, type constraints) and,
for nodes that pass, whether a session can be built for the node alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import _pybind_state

from hetero.errors import CompileError, RunError
from hetero.executors.base import (
    NUMPY_NATIVE_TYPES,
    CompiledPartition,
    Executor,
    ExecutorInfo,
    ProbeAnswers,
    shrinks,
)
from hetero.graph import Model, Node

_PROVIDER = "CPUExecutionProvider"
ort.set_default_logger_severity(3)


@lru_cache(maxsize=1)
def _kernel_defs() -> dict[tuple[str, str], list]:
    defs: dict[tuple[str, str], list] = {}
    for kd in _pybind_state.get_all_opkernel_def():
        if kd.provider == _PROVIDER:
            defs.setdefault((kd.domain, kd.op_name), []).append(kd)
    return defs


def _type_string(value_info: onnx.ValueInfoProto | None) -> str | None:
    """ONNX Runtime's spelling of a value's type: 'tensor(float)', 'seq(tensor(int64))'."""
    if value_info is None:
        return None
    type_proto = value_info.type
    if type_proto.HasField("sequence_type"):
        inner = type_proto.sequence_type.elem_type
        return f"seq(tensor({_elem(inner.tensor_type.elem_type)}))" if inner.HasField("tensor_type") else None
    if type_proto.HasField("tensor_type") and type_proto.tensor_type.elem_type:
        return f"tensor({_elem(type_proto.tensor_type.elem_type)})"
    return None


def _elem(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def has_kernel(node: Node, model: Model) -> bool:
    """ONNX Runtime registers a CPU kernel for this op version and these input/output types."""
    if node.since_version is None:
        return False
    candidates = _kernel_defs().get((node.domain, node.op_type), [])
    schema = onnx.defs.get_schema(node.op_type, model.opsets[node.domain], node.domain)
    bound: dict[str, set[str]] = {}
    for formals, names in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for position, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(position, len(formals) - 1)]
            text = _type_string(model.value_info(name))
            if text is not None:
                bound.setdefault(formal.type_str, set()).add(text)
    for kd in candidates:
        low, high = kd.version_range
        if not low <= node.since_version <= high:
            continue
        constraints = kd.type_constraints
        if all(param not in constraints or types <= set(constraints[param])
               for param, types in bound.items()):
            return True
    return False


def known_deviation(node: Node, model: Model) -> str | None:
    """Why ONNX Runtime's CPU kernel gives other numbers than the ONNX spec for this node, if it does.

    Found by the ONNX backend test suite (ONNX Runtime's own test filter lists the same cases);
    such nodes are left to an executor that follows the spec.
    """
    op, attrs = node.op_type, node.attributes
    given = [bool(name) for name in node.inputs] + [False] * 8
    if op in ("DFT", "STFT"):
        return "axis and onesided handling differ from DFT-20/STFT-17"
    if op in ("GRU", "LSTM", "RNN") and attrs.get("layout", 0) == 1:
        return "batch-major layout=1 is computed as layout=0"
    if op == "MaxUnpool" and given[2]:
        return "the output_shape input is ignored"
    if op == "RoiAlign" and attrs.get("mode", b"avg") == b"max":
        return "max mode takes the max of weighted samples, not of bilinear values"
    if op == "Dropout" and given[2]:
        return "training-mode masks come from another random generator"
    if op == "Attention" and attrs.get("is_causal", 0):
        fp16 = model.tensor(node.inputs[0]).dtype == np.float16
        if fp16 or (given[3] and given[4]):
            return "causal masking with fp16 inputs or with both a mask and a past cache differs"
    if op == "Resize" and attrs.get("coordinate_transformation_mode") == b"align_corners" \
            and attrs.get("mode", b"nearest") != b"nearest" and shrinks(node, model):
        return "align_corners downsampling samples other positions"
    return None


class _Session(CompiledPartition):
    def __init__(self, session: ort.InferenceSession, label: str, name: str):
        self._session = session
        self._label = label
        self._name = name
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        try:
            return self._session.run(self.output_names, dict(zip(self.input_names, inputs, strict=True)))
        except Exception as exc:
            raise RunError(f"{self._name} failed running partition {self._label!r}: {exc}") from exc


class OnnxRuntimeExecutor(Executor):
    library = "onnxruntime"
    extra = "onnxruntime"
    compiles_graphs = True
    _probes: ClassVar[ProbeAnswers] = ProbeAnswers()
    exchange_dtypes = NUMPY_NATIVE_TYPES | {"string"}

    @classmethod
    def discover(cls) -> list[Executor]:
        return [cls()] if _PROVIDER in ort.get_available_providers() else []

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.library, ort.__version__, "cpu", "host CPU (MLAS)",
                            self.threads, "fp32")

    def _options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Spinning between the nodes of one run saves a wake-up per parallel op; spinning after
        # the run would steal the cores from the next partition's library, so it stops there.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def supports_op(self, node: Node, model: Model) -> bool:
        if not has_kernel(node, model) or known_deviation(node, model):
            return False
        def probe() -> bool:
            options = self._options()
            options.intra_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort.InferenceSession(model.extract([node]).SerializeToString(), options, providers=[_PROVIDER])
            return True

        return self._probes.ask(model.signature(node), probe)

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        try:
            session = ort.InferenceSession(part.SerializeToString(), self._options(), providers=[_PROVIDER])
        except Exception as exc:
            text = str(exc)
            nodes = tuple(n.name for n in part.graph.node if n.name and n.name in text)
            raise CompileError(f"{self.name} rejected partition {part.graph.name!r}: {text}", nodes) from exc
        return _Session(session, part.graph.name, self.name)
