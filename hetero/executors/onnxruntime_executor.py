"""`onnxruntime@cpu`: ONNX Runtime's CPU execution provider (MLAS).

A graph compiler: each partition becomes one InferenceSession. Capability is asked of ONNX
Runtime itself: its registered kernel definitions (op, version range, type constraints) and,
for nodes that pass, whether a session can be built for the node alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
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


@lru_cache(maxsize=1)
def _vendor_schemas() -> dict[tuple[str, str], list]:
    """ONNX Runtime's own operator schemas (contrib ops) by (domain, op), newest first."""
    schemas: dict[tuple[str, str], list] = {}
    for schema in _pybind_state.get_all_operator_schema():
        if schema.domain in VENDOR_DOMAINS:
            schemas.setdefault((schema.domain, schema.name), []).append(schema)
    for found in schemas.values():
        found.sort(key=lambda s: -s.since_version)
    return schemas


#: Domains of ONNX Runtime's contrib operators that its CPU provider runs.
VENDOR_DOMAINS = frozenset({"com.microsoft"})
#: Element types ONNX Runtime runs by casting to float around a float kernel when the CPU provider
#: has none for them (its InsertCastTransformer): computed in fp32, rounded once at the end.
_CAST_TYPES = frozenset({"tensor(float16)", "tensor(bfloat16)"})


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


def _since_version(node: Node, model: Model) -> int | None:
    if node.since_version is not None:
        return node.since_version
    found = _vendor_schemas().get((node.domain, node.op_type), [])
    version = model.opsets.get(node.domain, 1)
    return next((s.since_version for s in found if s.since_version <= version), None)


def _schema(node: Node, model: Model) -> Any:
    if node.domain in VENDOR_DOMAINS:
        version = _since_version(node, model)
        return next(s for s in _vendor_schemas()[node.domain, node.op_type] if s.since_version == version)
    return onnx.defs.get_schema(node.op_type, model.opsets[node.domain], node.domain)


def kernel_mismatch(node: Node, model: Model) -> str | None:
    """Why ONNX Runtime's CPU provider has no kernel for this node (op version or types), or None
    when it has one, or runs the node another way: a function op (expanded into its body) or a
    float16/bfloat16 node (cast to float around a float kernel)."""
    version = _since_version(node, model)
    if version is None:
        return f"no schema for {node.qualified_type} at opset {model.opsets.get(node.domain)}"
    candidates = _kernel_defs().get((node.domain, node.op_type), [])
    in_range = [kd for kd in candidates if kd.version_range[0] <= version <= kd.version_range[1]]
    schema = _schema(node, model)
    if not in_range:
        expanded = schema.has_function or schema.has_context_dependent_function
        if node.domain not in VENDOR_DOMAINS and expanded:
            return None
        return f"no CPU kernel for {node.qualified_type}-{version}"
    bound: dict[str, set[str]] = {}
    for formals, names in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for position, name in enumerate(names):
            if not name or not formals:
                continue
            formal = formals[min(position, len(formals) - 1)]
            text = _type_string(model.value_info(name))
            if text is not None:
                bound.setdefault(getattr(formal, "type_str", None) or formal.typeStr, set()).add(text)
    for kd in in_range:
        constraints = kd.type_constraints
        if all(param not in constraints or types <= {*constraints[param], *_cast_to_float(constraints[param])}
               for param, types in bound.items()):
            return None
    types = sorted({t for ts in bound.values() for t in ts})
    return f"no CPU kernel for {node.qualified_type}-{version} on {', '.join(types)}"


def _cast_to_float(allowed: Sequence[str]) -> frozenset[str]:
    return _CAST_TYPES if "tensor(float)" in allowed else frozenset()


def has_kernel(node: Node, model: Model) -> bool:
    """ONNX Runtime's CPU provider runs this op version with these input/output types."""
    return kernel_mismatch(node, model) is None


def vendor_output_types(node: onnx.NodeProto, inputs: Sequence[onnx.ValueInfoProto | None],
                        opsets: Mapping[str, int], weights: Sequence[onnx.TensorProto]
                        ) -> list[onnx.ValueInfoProto | None]:
    """Output types of a contrib-op node as ONNX Runtime infers them: a session for the node alone
    (its inputs typed as the model types them), whose outputs say their types and shapes."""
    given = {t.name for t in weights}
    graph_inputs = []
    for name, info in zip(node.input, inputs, strict=False):
        if not name or name in given:
            continue
        if info is None or _type_string(info) is None:
            return [None] * len(node.output)
        graph_inputs.append(info)
    graph = helper.make_graph([node], "vendor_types", list({i.name: i for i in graph_inputs}.values()),
                              [onnx.ValueInfoProto(name=o) for o in node.output if o], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[_PROVIDER])
    typed = {}
    for output in session.get_outputs():
        elem = _ELEMENT_TYPES.get(output.type)
        if elem is not None:
            dims = None if output.shape is None else [d if isinstance(d, int | str) else None
                                                       for d in output.shape]
            typed[output.name] = helper.make_tensor_value_info(output.name, elem, dims)
    return [typed.get(o) for o in node.output]


_ELEMENT_TYPES = {f"tensor({_elem(t)})": t for t in onnx.TensorProto.DataType.values()
                  if t != onnx.TensorProto.UNDEFINED}


def known_deviation(node: Node, model: Model) -> str | None:
    """Why ONNX Runtime's CPU kernel gives other numbers than the ONNX spec for this node, if it does.

    Found by the ONNX backend test suite (ONNX Runtime's own test filter lists the same cases)
    and by `benchmarks/exactness.py`; such nodes are left to an executor that follows the spec.
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
    if op == "Scan" and node.since_version >= 9 and _empty_scan(node, model):
        return "a scan over zero steps fails at run time"
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


def _empty_scan(node: Node, model: Model) -> bool:
    """A scan input whose scan axis is statically zero long."""
    count = node.attributes.get("num_scan_inputs", 0)
    axes = node.attributes.get("scan_input_axes") or [0] * count
    for name, axis in zip(node.inputs[len(node.inputs) - count:], axes, strict=False):
        shape = model.tensor(name).shape
        if shape is not None and shape[axis % max(len(shape), 1)] == 0:
            return True
    return False


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
    exact = True
    vendor_domains = VENDOR_DOMAINS
    _probes: ClassVar[ProbeAnswers] = ProbeAnswers(f"onnxruntime={ort.__version__}")
    exchange_dtypes = NUMPY_NATIVE_TYPES | {"string"}
    output_types = staticmethod(vendor_output_types)

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
        if node.domain not in ("", "ai.onnx.ml", *VENDOR_DOMAINS):
            return False
        if not has_kernel(node, model) or known_deviation(node, model):
            return False
        return self._probes.ask(model.signature(node), lambda: self._session_alone(node, model) is None)

    def _session_alone(self, node: Node, model: Model) -> str | None:
        """Build a session for the node alone: None if ONNX Runtime takes it, else its complaint."""
        options = self._options()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            ort.InferenceSession(model.extract([node]).SerializeToString(), options, providers=[_PROVIDER])
        except Exception as exc:
            return " ".join(str(exc).split())[:300]
        return None

    def decline_op(self, node: Node, model: Model) -> str:
        if node.domain not in ("", "ai.onnx.ml", *VENDOR_DOMAINS):
            return f"ONNX Runtime does not implement domain {node.domain!r}"
        reason = kernel_mismatch(node, model) or known_deviation(node, model)
        if reason:
            return reason
        return f"a session for the node alone fails: {self._session_alone(node, model)}"

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        try:
            session = ort.InferenceSession(part.SerializeToString(), self._options(), providers=[_PROVIDER])
        except Exception as exc:
            text = str(exc)
            nodes = tuple(n.name for n in part.graph.node if n.name and n.name in text)
            raise CompileError(f"{self.name} rejected partition {part.graph.name!r}: {text}", nodes) from exc
        return _Session(session, part.graph.name, self.name)
