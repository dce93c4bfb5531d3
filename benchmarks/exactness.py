"""Differential exactness harness: Hetero's executors against ONNX Runtime and the spec's formulas.

    python benchmarks/exactness.py [--ops Resize,BatchNormalization] [--failures] [--thorough]

The exact numpy executor is the fallback of last resort, so every (op, version) it claims must
compute the spec's numbers. The ONNX backend suite tests only the newest version of each op; here
each single-node backend case also runs at every other version of its op: converted by
`onnx.version_converter` (which keeps the semantics, so the expected outputs hold unless the
converter is wrong: ONNX Runtime's agreement also passes a case) or restamped (the same node under
an opset whose schema accepts it as it is), plus `generated_cases()` for what those miss. Truth is
ONNX Runtime running the same model (graph optimisations off), or the spec's values (backend data,
formulas) where ONNX Runtime cannot run it or `onnxruntime_executor.known_deviation` says it
computes other numbers. Then every executor runs `edge_cases()` (edge values against formulas) and
the generated cases (`--thorough`: the backend cases too); each must compute exactly or decline.

Prints one line per failure and the tables of the README.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import onnx
import onnx.defs
from onnx import TensorProto, helper, version_converter

import hetero
from hetero.executors import Executor
from hetero.executors.numpy_executor import NumpyExecutor, implements

#: Ops whose outputs are random draws: no two libraries agree on them.
RANDOM_OPS = {"Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform",
              "RandomUniformLike"}


@dataclass
class Case:
    """One model to run and what its outputs must be.

    `expected` holds the spec's values when known (backend data, a formula); `source` says how the
    model came about: "backend", "converted", "restamped" or "generated". A converted case's
    `expected` is only as right as the converter, so ONNX Runtime's agreement also passes it.
    """

    name: str
    model: onnx.ModelProto
    feeds: dict[str, Any]
    expected: list[Any] | None
    source: str
    rtol: float = 1e-4
    atol: float = 1e-5
    under_test: int = -1  # the node whose (op, version) the case exercises
    op: str = field(init=False)
    version: int = field(init=False)

    def __post_init__(self) -> None:
        node = self.model.graph.node[self.under_test]
        self.op = node.op_type
        opset = next(o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx"))
        self.version = onnx.defs.get_schema(node.op_type, opset, node.domain).since_version


@dataclass(frozen=True)
class Result:
    case: str
    op: str
    version: int
    source: str
    verdict: str  # "exact", "declined", "wrong", "raised", "no truth"
    detail: str = ""


# -- comparison -------------------------------------------------------------------------------------

def mismatch(got: Any, want: Any, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """Why `got` is not `want` (dtype, shape, values; NaN equals NaN), or None if it is."""
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return f"a sequence of {len(want)} expected, got {type(got).__name__}"
        return next((m for g, w in zip(got, want, strict=True) if (m := mismatch(g, w, rtol, atol))), None)
    if want is None or got is None:
        return None if want is got else f"{got!r} instead of {want!r}"
    got, want = np.asarray(got), np.asarray(want)
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{got.dtype}{list(got.shape)} instead of {want.dtype}{list(want.shape)}"
    if want.dtype.kind in "fc":
        if np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            return None
        bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        index = tuple(int(i[0]) for i in np.nonzero(bad))
        return f"{bad.sum()} of {want.size} values differ, e.g. {got[index]!r} instead of {want[index]!r}"
    same = got.tolist() == want.tolist() if want.dtype == object else np.array_equal(got, want)
    if same:
        return None
    bad = got != want
    index = tuple(int(i[0]) for i in np.nonzero(bad)) if bad.ndim else ()
    return f"{np.sum(bad)} of {want.size} values differ, e.g. {got[index]!r} instead of {want[index]!r}"


# -- running a model on one executor ----------------------------------------------------------------

def run_on(executor: Executor, model: hetero.Model, feeds: dict[str, Any]) -> list[Any] | str:
    """The outputs of `model` computed by `executor` alone, or why it declines the model: a node it
    does not claim (as the planner would ask it)."""
    declined = [n for n in model.nodes if not executor.supports(n, model)]
    if declined:
        return f"declines {', '.join(f'{n.op_type}-{n.since_version}' for n in declined)}"
    compiled = executor.compile(model.proto)
    outputs = compiled([executor.to_device(feeds[name]) for name in compiled.input_names])
    return [executor.to_host(o) for o in outputs]


def onnxruntime_outputs(model: hetero.Model, feeds: dict[str, Any]) -> list[Any] | None:
    """ONNX Runtime's outputs with graph optimisations off (its kernels, as written), or None when
    it cannot run the model or its known_deviation says it computes other numbers for it."""
    try:
        import onnxruntime as ort

        from hetero.executors.onnxruntime_executor import known_deviation
    except ImportError:
        return None
    if any(known_deviation(n, model) for n in model.nodes):
        return None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    except Exception:
        return None


def check(case: Case, executor: Executor) -> Result:
    """Run a case on an executor and judge it against the spec's values or ONNX Runtime."""
    def result(verdict: str, detail: str = "") -> Result:
        return Result(case.name, case.op, case.version, case.source, verdict, detail)

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            model = hetero.load(case.model, fold=False)
        except Exception as exc:
            return result("raised", f"not a valid model: {exc}")
        try:
            got = run_on(executor, model, case.feeds)
        except Exception as exc:
            got = exc
        reference = None if case.source in ("backend", "generated", "edge") and case.expected is not None \
            else onnxruntime_outputs(model, case.feeds)
    if isinstance(got, str):
        return result("declined", got)
    if executor.library == "onnxruntime":
        reference = None  # not its own judge, nor judged by what a converter may have changed
        if case.source == "converted":
            return result("no truth", "converted expected values hold only where ONNX Runtime agrees")
    if reference is None and case.expected is None:
        return result("no truth", "ONNX Runtime cannot run it and the spec's values are unknown")
    if isinstance(got, Exception):
        return result("raised", f"{type(got).__name__}: {str(got).splitlines()[0][:300]}")
    errors = [mismatch(got, truth, case.rtol, case.atol) for truth in (case.expected, reference)
              if truth is not None]
    if any(e is None for e in errors):
        return result("exact")
    return result("wrong", errors[0])


# -- cases from the ONNX backend node tests ---------------------------------------------------------

#: Ops whose older versions differ from the newer only in the types they accept, legacy
#: broadcasting attributes, consumed_inputs or attributes a node does not set (so a restamped
#: node's expected outputs hold at every version that accepts it).
SAME_SEMANTICS = {
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "Ceil",
    "Concat", "Cos", "Cosh", "DepthToSpace", "Div", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten",
    "Floor", "GRU", "Gather", "Greater", "GreaterOrEqual", "GridSample", "HardSigmoid", "Identity",
    "InstanceNormalization", "IsInf", "IsNaN", "LSTM", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LpPool", "MatMul", "Max", "MaxPool", "MaxUnpool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Or",
    "PRelu", "Pow", "Reciprocal", "Relu", "Reshape", "Shape", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Sqrt", "Sub", "Sum", "Tan", "Tanh", "Tile", "Transpose", "Where", "Xor",
}


def _numpy_values(test: Any) -> tuple[list, list] | None:
    """The first data set with tensors as numpy arrays, or None if a value has no numpy type."""
    converted: list[list] = []
    for values in test.data_sets[0]:
        converted.append([])
        for value in values:
            if isinstance(value, onnx.TensorProto):
                value = onnx.numpy_helper.to_array(value)
            elif isinstance(value, np.generic):
                value = np.asarray(value)
            if not isinstance(value, np.ndarray | list) or (
                    isinstance(value, np.ndarray) and value.dtype.kind not in "biufcO"):
                return None
            converted[-1].append(value)
    return converted[0], converted[1]


def _single_node(test: Any) -> bool:
    nodes = test.model.graph.node
    return (len(nodes) == 1 and nodes[0].domain in ("", "ai.onnx") and "expanded" not in test.name
            and nodes[0].op_type not in RANDOM_OPS and bool(test.data_sets)
            and _numpy_values(test) is not None)


@cache
def backend_tests(modules: tuple[str, ...] | None = None) -> tuple[Any, ...]:
    """The onnx wheel's node test cases (all of them, about 16 s to generate, or those of some
    modules of `onnx.backend.test.case.node`), single-node ones in the default domain. A module
    makes its cases on first import only: after that (the whole suite loaded, say) this returns
    every case made so far, so pick by op as well."""
    from onnx.backend.test.case import node as cases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if modules is None:
            from onnx.backend.test.loader import load_node_model_tests

            tests = load_node_model_tests()
        else:
            for module in modules:
                importlib.import_module(f"onnx.backend.test.case.node.{module}")
            tests = cases._NodeTestCases
    return tuple(t for t in tests if _single_node(t))


def _feeds(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, Any]:
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return dict(zip(names, inputs, strict=False))


@cache
def _since_versions(domain: str, op: str) -> tuple[int, ...]:
    return tuple(sorted({s.since_version for s in onnx.defs.get_all_schemas_with_history()
                         if s.name == op and s.domain == domain}))


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _restamped(model: onnx.ModelProto, version: int) -> onnx.ModelProto | None:
    """The model under another default opset, if that version's schema accepts the node as it is."""
    older = onnx.ModelProto()
    older.CopyFrom(model)
    for opset in older.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    older.ir_version = min(older.ir_version, helper.find_min_ir_version_for([
        helper.make_opsetid("", version)], ignore_unknown=True) + 2)
    try:
        onnx.checker.check_model(older, full_check=True)
    except Exception:
        return None
    return older


def _fits(model: onnx.ModelProto, inputs: Sequence[Any]) -> bool:
    """The test's inputs still fit the model's declared input ranks (converters may add axes)."""
    declared = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    return all(not i.type.tensor_type.HasField("shape") or len(i.type.tensor_type.shape.dim) == np.ndim(v)
               for i, v in zip(declared, inputs, strict=False))


def _converted(model: onnx.ModelProto, version: int) -> onnx.ModelProto | None:
    try:
        older = version_converter.convert_version(model, version)
        onnx.checker.check_model(older, full_check=True)
    except Exception:
        return None
    return older if older.graph.node and older.graph.node[-1].op_type == model.graph.node[0].op_type else None


def backend_cases(ops: Iterable[str] | None = None, modules: tuple[str, ...] | None = None,
                  versions: bool = True) -> Iterator[Case]:
    """Each single-node backend case at its own version, and (`versions`) converted or restamped
    to every other version of its op."""
    wanted = set(ops) if ops else None
    for test in backend_tests(modules):
        node = test.model.graph.node[0]
        if wanted and node.op_type not in wanted:
            continue
        inputs, outputs = _numpy_values(test)
        feeds = _feeds(test.model, inputs)
        yield Case(test.name, test.model, feeds, list(outputs), "backend", test.rtol, test.atol)
        if not versions:
            continue
        own = onnx.defs.get_schema(node.op_type, _opset(test.model), node.domain).since_version
        for version in (v for v in _since_versions(node.domain, node.op_type) if v != own):
            converted = _converted(test.model, version)
            if converted is not None and _fits(converted, inputs):
                yield Case(f"{test.name}@{version}", converted, _feeds(converted, inputs), list(outputs),
                           "converted", test.rtol, test.atol)
                continue
            restamped = _restamped(test.model, version)
            if restamped is not None:
                same = node.op_type in SAME_SEMANTICS
                yield Case(f"{test.name}@{version}", restamped, feeds, list(outputs) if same else None,
                           "restamped", test.rtol, test.atol)


# -- generated cases ---------------------------------------------------------------------------------

_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
         np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int64): TensorProto.INT64,
         np.dtype(np.int32): TensorProto.INT32, np.dtype(np.int8): TensorProto.INT8,
         np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL,
         np.dtype(object): TensorProto.STRING}


def node_model(op: str, version: int, inputs: dict[str, Any], outputs: Sequence[str] | int = 1, *,
               constant: Iterable[str] = (), output_types: dict[str, tuple[Any, Sequence]] | None = None,
               domain: str = "", **attributes: Any) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """A one-node model at opset `version` and its feeds. `inputs` are the node's inputs in order
    (an empty name is an omitted optional input), those named in `constant` initializers. Output
    types are inferred, else given in `output_types` (name -> (numpy dtype, shape)), else those of
    the first input."""
    constant = set(constant)
    outs = [f"y{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
    node = helper.make_node(op, list(inputs), outs, domain=domain, **attributes)

    def info(name: str, value: Any) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, _ELEM[np.dtype(value[0])], value[1])

    graph = helper.make_graph(
        [node], f"{op}_{version}",
        [info(n, (np.asarray(v).dtype, np.shape(v))) for n, v in inputs.items() if n and n not in constant],
        [onnx.ValueInfoProto(name=o) for o in outs if o],
        initializer=[onnx.numpy_helper.from_array(np.asarray(inputs[n]), n) for n in constant])
    opsets = [helper.make_opsetid("", version)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=7 if version < 14 else 8)
    given = {o: info(o, t) for o, t in (output_types or {}).items()}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {vi.name: vi for vi in (*inferred.graph.value_info, *inferred.graph.output)
             if vi.type.WhichOneof("value") and (not vi.type.HasField("tensor_type")
                                                 or vi.type.tensor_type.HasField("shape"))}
    first = np.asarray(next(v for n, v in inputs.items() if n))
    del model.graph.output[:]
    model.graph.output.extend(given.get(o) or known.get(o) or info(o, (first.dtype, first.shape))
                              for o in outs if o)
    return model, {n: v for n, v in inputs.items() if n and n not in constant}


def _batch_norm_formula(x, scale, bias, mean, var, epsilon=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (scale.reshape(shape) * (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon)
            + bias.reshape(shape)).astype(x.dtype)


def generated_cases() -> Iterator[Case]:
    """Cases for what the backend tests miss at older versions, with the spec's values where
    known (else ONNX Runtime judges)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    params = [rng.standard_normal(4).astype(np.float32) for _ in range(3)] + [
        rng.uniform(0.5, 2, 4).astype(np.float32)]
    for version in _since_versions("", "BatchNormalization"):
        if version < 6:
            continue
        extra = {"is_test": 1} if version < 7 else {}
        model, feeds = node_model("BatchNormalization", version, {"x": x} | dict(
            zip(("scale", "bias", "mean", "var"), params, strict=True)),
            constant=("scale", "bias", "mean", "var"), epsilon=1e-3, **extra)
        yield Case(f"batchnorm_inference@{version}", model, feeds,
                   [_batch_norm_formula(x, *params, epsilon=1e-3)], "generated")
    yield from _resize_cases(rng)
    for version, alpha, gamma in ((1, 1.6732, 1.0507), (6, 1.6732632423543772, 1.0507009873554805)):
        model, feeds = node_model("Selu", version, {"x": x})
        selu = np.where(x > 0, x, np.float32(alpha) * (np.exp(x) - 1)) * np.float32(gamma)
        yield Case(f"selu_defaults@{version}", model, feeds, [selu.astype(np.float32)], "generated")
    for op in ("Softmax", "LogSoftmax", "Hardmax"):
        for version in (1, 11):
            model, feeds = node_model(op, version, {"x": x})
            yield Case(f"{op.lower()}_default_axis@{version}", model, feeds, None, "generated")
    yield from _loop_cases()
    yield from _scan_cases()
    yield from _string_normalizer_cases()
    yield from _reduce_cases(rng)
    yield from _shape_cases(rng)
    yield from _cast_cases()
    yield from _misc_cases(rng)
    yield from _judged_by_onnxruntime(rng)


def _resize_cases(rng: np.random.Generator) -> Iterator[Case]:
    image = rng.standard_normal((1, 2, 4, 6)).astype(np.float32)
    for mode in ("nearest", "linear"):
        for scales in ([1, 1, 2, 3], [1, 1, 0.5, 0.5], [1, 1, 1.5, 0.6]):
            scale = np.array(scales, np.float32)
            if min(scales) >= 1:
                model, feeds = node_model("Upsample", 7, {"x": image}, mode=mode,
                                          scales=[float(s) for s in scales])
                yield Case(f"upsample_{mode}_{scales}@7", model, feeds, None, "generated")
                model, feeds = node_model("Upsample", 9, {"x": image, "scales": scale}, constant=["scales"],
                                          mode=mode)
                yield Case(f"upsample_{mode}_{scales}@9", model, feeds, None, "generated")
            model, feeds = node_model("Resize", 10, {"x": image, "scales": scale}, constant=["scales"],
                                      mode=mode)
            yield Case(f"resize_{mode}_{scales}@10", model, feeds, None, "generated")


def _loop_cases() -> Iterator[Case]:
    """Loops whose scan outputs are empty: zero trips, or a false condition from the start."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "step"], ["acc_out"]),
         helper.make_node("Identity", ["acc_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2])],
        initializer=[onnx.numpy_helper.from_array(np.array([1, 2], np.float32), "step")])
    start = np.array([0.5, -1], np.float32)
    for version in _since_versions("", "Loop"):
        for trips, cond in ((0, True), (3, False), (3, True)):
            model, feeds = node_model(
                "Loop", version, {"M": np.array(trips, np.int64), "cond": np.array(cond), "acc": start},
                ["final", "scan"], constant=("M", "cond"), body=body,
                output_types={"final": (np.float32, [2]), "scan": (np.float32, ["trips", 2])})
            ran = trips if cond else 0
            final = start + ran * np.array([1, 2], np.float32)
            scan = np.stack([start + (k + 1) * np.array([1, 2], np.float32) for k in range(ran)]) if ran \
                else np.zeros((0, 2), np.float32)
            yield Case(f"loop_{trips}_trips_cond_{cond}@{version}", model, feeds, [final, scan], "generated")


def _scan_cases() -> Iterator[Case]:
    """Running sums over a scan axis, forwards and backwards, and an empty scan."""
    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
         helper.make_node("Identity", ["sum_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("next", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, [2])])
    start = np.array([1, -1], np.float32)
    for version in _since_versions("", "Scan"):
        if version < 9:
            continue
        for steps, axis, direction in ((3, 0, 0), (3, 1, 1), (3, -1, 0), (0, 0, 0)):
            x = np.arange(steps * 2, dtype=np.float32).reshape(steps, 2)
            x = x.T.copy() if axis else x
            rows = x.T if axis else x
            rows = rows[::-1] if direction else rows
            sums = start + np.cumsum(rows, axis=0) if steps else np.zeros((0, 2), np.float32)
            scanned = sums[::-1] if direction else sums
            model, feeds = node_model(
                "Scan", version, {"start": start, "x": x}, ["final", "scanned"], body=body, num_scan_inputs=1,
                scan_input_axes=[axis], scan_input_directions=[direction], scan_output_axes=[axis],
                scan_output_directions=[direction],
                output_types={"final": (np.float32, [2]), "scanned": (np.float32, [None, None])})
            final = sums[-1] if steps else start
            yield Case(f"scan_{steps}_axis{axis}_dir{direction}@{version}", model, feeds,
                       [final, scanned.T.copy() if axis else scanned], "generated")


def _string_normalizer_cases() -> Iterator[Case]:
    """Expected values are ONNX Runtime's, run where an en_US.UTF-8 locale is installed (without
    one its StringNormalizer refuses to load): elements equal to a stopword are dropped, empty
    strings and accents stay, case maps character by character."""
    words = ["Monday", "", "café", "MONDAY", "tuesday", "Straße", "ǅemal"]
    expected = {
        ("NONE", 0): ["", "tuesday", "Straße", "ǅemal"],
        ("NONE", 1): words,
        ("LOWER", 0): ["", "tuesday", "straße", "ǆemal"],
        ("LOWER", 1): ["monday", "", "café", "monday", "tuesday", "straße", "ǆemal"],
        ("UPPER", 0): ["", "TUESDAY", "STRAßE", "ǄEMAL"],
        ("UPPER", 1): ["MONDAY", "", "CAFÉ", "MONDAY", "TUESDAY", "STRAßE", "ǄEMAL"],
    }
    x = np.array(words, dtype=object)
    for (action, sensitive), want in expected.items():
        for shape in ((-1,), (1, -1)):
            model, feeds = node_model("StringNormalizer", 10, {"x": x.reshape(shape)},
                                      case_change_action=action, is_case_sensitive=sensitive,
                                      stopwords=["monday", "Café"])
            yield Case(f"stringnormalizer_{action}_{sensitive}_{len(shape)}d@10", model, feeds,
                       [np.array(want, dtype=object).reshape(shape)], "generated")
    model, feeds = node_model("StringNormalizer", 10, {"x": x.reshape(1, -1)}, stopwords=words)
    yield Case("stringnormalizer_all_dropped@10", model, feeds, [np.array([[""]], dtype=object)], "generated")


_REDUCE = {
    "ReduceL1": lambda x, a, k: np.sum(np.abs(x), axis=a, keepdims=k),
    "ReduceL2": lambda x, a, k: np.sqrt(np.sum(np.square(x), axis=a, keepdims=k)),
    "ReduceLogSum": lambda x, a, k: np.log(np.sum(x, axis=a, keepdims=k)),
    "ReduceLogSumExp": lambda x, a, k: np.log(np.sum(np.exp(x), axis=a, keepdims=k)),
    "ReduceMax": lambda x, a, k: np.max(x, axis=a, keepdims=k),
    "ReduceMean": lambda x, a, k: np.mean(x, axis=a, keepdims=k),
    "ReduceMin": lambda x, a, k: np.min(x, axis=a, keepdims=k),
    "ReduceProd": lambda x, a, k: np.prod(x, axis=a, keepdims=k),
    "ReduceSum": lambda x, a, k: np.sum(x, axis=a, keepdims=k),
    "ReduceSumSquare": lambda x, a, k: np.sum(np.square(x), axis=a, keepdims=k),
}


def _reduce_cases(rng: np.random.Generator) -> Iterator[Case]:
    """Every reduction at every version, axes as attribute or input, keepdims on and off."""
    x = rng.uniform(0.5, 2, (2, 3, 4)).astype(np.float32)
    for op, formula in _REDUCE.items():
        for version in _since_versions("", op):
            by_attribute = "axes" in onnx.defs.get_schema(op, version, "").attributes
            for axes, keepdims in itertools.product((None, [1], [-1, 0]), (0, 1)):
                want = formula(x, None if axes is None else tuple(axes), bool(keepdims)).astype(x.dtype)
                if by_attribute:
                    model, feeds = node_model(op, version, {"x": x}, keepdims=keepdims,
                                              **({"axes": axes} if axes else {}))
                else:
                    model, feeds = node_model(op, version, {"x": x, "axes": np.array(axes or [], np.int64)},
                                              constant=["axes"], keepdims=keepdims)
                yield Case(f"{op.lower()}_{axes}_{keepdims}@{version}", model, feeds, [want], "generated")


def _shape_cases(rng: np.random.Generator) -> Iterator[Case]:
    """Squeeze, Unsqueeze, Slice, Pad, Tile, Concat, DepthToSpace, TopK at their attribute versions."""
    x = rng.standard_normal((1, 3, 1, 4)).astype(np.float32)
    for version in (1, 11):
        for axes in ([0, 2], [-2] if version >= 11 else [2]):
            model, feeds = node_model("Squeeze", version, {"x": x}, axes=axes)
            yield Case(f"squeeze_{axes}@{version}", model, feeds, [np.squeeze(x, tuple(axes))], "generated")
        model, feeds = node_model("Squeeze", version, {"x": x})
        yield Case(f"squeeze_all@{version}", model, feeds, [np.squeeze(x)], "generated")
        for axes in ([0, 5], [-1, 1] if version >= 11 else [1, 5]):
            model, feeds = node_model("Unsqueeze", version, {"x": x}, axes=axes)
            want = np.expand_dims(x, tuple(a % 6 for a in axes))
            yield Case(f"unsqueeze_{axes}@{version}", model, feeds, [want], "generated")
    y = rng.standard_normal((3, 5, 4)).astype(np.float32)
    for starts, ends, axes, index in (([1, 0], [3, -1], [0, 1], np.s_[1:3, 0:-1]),
                                      ([-2], [2**63 - 1], [2], np.s_[:, :, -2:]),
                                      ([0, 1, 1], [2, 10, 3], None, np.s_[0:2, 1:10, 1:3])):
        attrs = {"starts": starts, "ends": ends} | ({"axes": axes} if axes else {})
        model, feeds = node_model("Slice", 1, {"x": y}, **attrs)
        yield Case(f"slice_{starts}_{ends}@1", model, feeds, [y[index]], "generated")
    for mode in ("constant", "reflect", "edge"):
        pads = [0, 1, 2, 0, 2, 1]
        widths = [(0, 0), (1, 2), (2, 1)]
        extra = {"value": 1.5} if mode == "constant" else {}
        want = np.pad(y, widths, mode=mode, **({"constant_values": 1.5} if mode == "constant" else {}))
        model, feeds = node_model("Pad", 2, {"x": y}, mode=mode, pads=pads, **extra)
        yield Case(f"pad_{mode}@2", model, feeds, [want], "generated")
        model, feeds = node_model("Pad", 1, {"x": y}, mode=mode, paddings=pads, **extra)
        yield Case(f"pad_{mode}@1", model, feeds, [want], "generated")
    model, feeds = node_model("Tile", 1, {"x": y, "tiles": np.array(2, np.float32),
                                          "axis": np.array(1, np.float32)}, constant=["tiles", "axis"])
    yield Case("tile@1", model, feeds, [np.tile(y, (1, 2, 1))], "generated")
    model, feeds = node_model("Concat", 1, {"a": y, "b": y[:, :2]})
    yield Case("concat_default_axis@1", model, feeds, [np.concatenate([y, y[:, :2]], axis=1)], "generated")
    image = rng.standard_normal((1, 8, 2, 3)).astype(np.float32)
    model, feeds = node_model("DepthToSpace", 1, {"x": image}, blocksize=2)
    dcr = image.reshape(1, 2, 2, 2, 2, 3).transpose(0, 3, 4, 1, 5, 2).reshape(1, 2, 4, 6)
    yield Case("depthtospace@1", model, feeds, [dcr], "generated")
    scores = np.array([[3, 1, 3, 2, 5], [0, 0, -1, 7, 7]], np.float32)
    model, feeds = node_model("TopK", 1, {"x": scores}, 2, k=3)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    yield Case("topk@1", model, feeds, [np.take_along_axis(scores, order, 1), order.astype(np.int64)],
               "generated")


def _cast_cases() -> Iterator[Case]:
    """Cast and CastLike between numeric types at every version, values with fractions and signs
    (out-of-range conversions are undefined and left out)."""
    values = np.array([-2.75, -1.5, -0.5, 0, 0.5, 1.5, 2.5, 100.25], np.float32)
    targets = [np.float64, np.float16, np.int32, np.int64, np.int8, np.bool_]
    for version in _since_versions("", "Cast"):
        for target in targets:
            to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(target))
            want = values.astype(target) if target != np.int8 else np.trunc(values).astype(np.int8)
            attr = onnx.TensorProto.DataType.Name(to) if version == 1 else to
            model, feeds = node_model("Cast", version, {"x": values}, to=attr,
                                      output_types={"y0": (target, [8])})
            yield Case(f"cast_float_to_{np.dtype(target).name}@{version}", model, feeds, [want], "generated")
        for source in (np.int64, np.bool_, np.float64):
            x = values.astype(source)
            model, feeds = node_model("Cast", version, {"x": x}, to=onnx.TensorProto.FLOAT if version > 1 else
                                      "FLOAT", output_types={"y0": (np.float32, [8])})
            yield Case(f"cast_{np.dtype(source).name}_to_float@{version}", model, feeds,
                       [x.astype(np.float32)], "generated")
    for version in _since_versions("", "CastLike"):
        for target in targets:
            model, feeds = node_model("CastLike", version, {"x": values, "like": np.zeros(1, target)},
                                      constant=["like"])
            yield Case(f"castlike_{np.dtype(target).name}@{version}", model, feeds, [values.astype(target)],
                       "generated")


def _misc_cases(rng: np.random.Generator) -> Iterator[Case]:
    """Clip, Gemm and Dropout at their attribute versions, with the spec's formulas."""
    x = rng.standard_normal((3, 4)).astype(np.float32)
    for attrs, low, high in (({"min": -0.5, "max": 0.5}, -0.5, 0.5), ({"min": 0.0}, 0.0, None),
                             ({}, None, None)):
        model, feeds = node_model("Clip", 6, {"x": x}, **attrs)
        yield Case(f"clip_{sorted(attrs)}@6", model, feeds, [np.clip(x, low, high)], "generated")
    a, b = rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    c = rng.standard_normal(4).astype(np.float32)
    for version in _since_versions("", "Gemm")[1:]:
        extra = {"broadcast": 1} if version < 7 else {}
        model, feeds = node_model("Gemm", version, {"a": a, "b": b, "c": c}, transB=1, alpha=0.5, beta=2.0,
                                  **extra)
        yield Case(f"gemm_broadcast_c@{version}", model, feeds, [0.5 * a @ b.T + 2 * c], "generated")
    image = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    model, feeds = node_model("LpPool", 1, {"x": image}, kernel_shape=[2, 2], p=3.0)
    windows = np.lib.stride_tricks.sliding_window_view(np.abs(image) ** 3, (2, 2), axis=(2, 3))
    yield Case("lppool_p3@1", model, feeds, [(windows.sum(axis=(-2, -1)) ** (1 / 3)).astype(np.float32)],
               "generated")
    for version in _since_versions("", "Optional"):
        for given in (True, False):
            attrs = {} if given else {"type": helper.make_tensor_type_proto(TensorProto.FLOAT, [3, 4])}
            nodes = [helper.make_node("Optional", ["x"] if given else [], ["opt"], **attrs),
                     helper.make_node("OptionalHasElement", ["opt"], ["has"])]
            x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)
            graph = helper.make_graph(nodes, "optional", [x_info],
                                      [helper.make_tensor_value_info("has", TensorProto.BOOL, [])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)], ir_version=8)
            yield Case(f"optional_{'given' if given else 'empty'}@{version}", model, {"x": x},
                       [np.array(given)], "generated", under_test=0)
    for version in _since_versions("", "Dropout"):
        extra = {"is_test": 1} if version < 7 else {}
        model, feeds = node_model("Dropout", version, {"x": x}, **extra)
        yield Case(f"dropout_inference@{version}", model, feeds, [x], "generated")


def _judged_by_onnxruntime(rng: np.random.Generator) -> Iterator[Case]:
    """Resize-11, RoiAlign-10 and the sequence ops, where ONNX Runtime is the judge."""
    image = rng.standard_normal((1, 2, 4, 6)).astype(np.float32)
    roi = np.array([], np.float32)
    for mode, nearest in (("nearest", "round_prefer_floor"), ("nearest", "floor"), ("nearest", "ceil"),
                          ("nearest", "round_prefer_ceil"), ("linear", None), ("cubic", None)):
        for coordinates in ("half_pixel", "asymmetric", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                            "align_corners"):
            if coordinates == "tf_half_pixel_for_nn" and mode != "nearest":
                continue
            for scales in ([1, 1, 2, 1.5], [1, 1, 0.5, 0.5]):
                attrs = {"mode": mode, "coordinate_transformation_mode": coordinates} | (
                    {"nearest_mode": nearest} if nearest else {})
                model, feeds = node_model("Resize", 11, {"x": image, "roi": roi,
                                                         "scales": np.array(scales, np.float32)},
                                          constant=["roi", "scales"], **attrs)
                name = f"resize_{mode}_{nearest}_{coordinates}_{scales}@11"
                yield Case(name, model, feeds, None, "generated")
    features = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    boxes = np.array([[0.5, 0.5, 4.2, 3.7], [1, 0, 5, 5]], np.float32)
    model, feeds = node_model("RoiAlign", 10, {"x": features, "rois": boxes, "batch": np.zeros(2, np.int64)},
                              output_height=3, output_width=2, sampling_ratio=2, spatial_scale=0.9)
    yield Case("roialign_avg@10", model, feeds, None, "generated")
    parts = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    model, feeds = node_model("SequenceConstruct", 11, {f"x{i}": p for i, p in enumerate(parts)})
    yield Case("sequenceconstruct@11", model, feeds, [parts], "generated")
    for op, extra, want in (("SequenceAt", {"i": np.array(-1, np.int64)}, parts[-1]),
                            ("SequenceLength", {}, np.array(3, np.int64)),
                            ("SequenceErase", {"i": np.array(1, np.int64)}, [parts[0], parts[2]]),
                            ("ConcatFromSequence", {}, np.concatenate(parts, axis=1))):
        attrs = {"axis": 1} if op == "ConcatFromSequence" else {}
        model, feeds = _sequence_model(op, parts, extra, **attrs)
        yield Case(f"{op.lower()}@11", model, feeds, [want], "generated")
    model, feeds = _sequence_model("SequenceEmpty", [], {})
    yield Case("sequenceempty@11", model, feeds, [[]], "generated")
    yield from _recurrent_cases(rng)


def _recurrent_cases(rng: np.random.Generator) -> Iterator[Case]:
    """GRU as PyTorch exports it (linear_before_reset=1), and every direction of GRU, LSTM and
    RNN, judged by ONNX Runtime."""
    seq, batch, size, hidden = 4, 2, 3, 5
    x = rng.standard_normal((seq, batch, size)).astype(np.float32)
    for op, gates in (("GRU", 3), ("LSTM", 4), ("RNN", 1)):
        for direction in ("forward", "reverse", "bidirectional"):
            dirs = 2 if direction == "bidirectional" else 1
            w = rng.standard_normal((dirs, gates * hidden, size)).astype(np.float32) * 0.5
            r = rng.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32) * 0.5
            b = rng.standard_normal((dirs, 2 * gates * hidden)).astype(np.float32) * 0.5
            for linear in ((0, 1) if op == "GRU" else (0,)):
                extra = {"linear_before_reset": linear} if op == "GRU" else {}
                model, feeds = node_model(op, 14, {"x": x, "w": w, "r": r, "b": b}, ["y", "y_h"],
                                          constant=["w", "r", "b"], hidden_size=hidden, direction=direction,
                                          **extra)
                yield Case(f"{op.lower()}_{direction}_{linear}@14", model, feeds, None, "generated")


def _sequence_model(op: str, parts: list, extra: dict, **attributes: Any) -> tuple[onnx.ModelProto, dict]:
    """A model building a sequence of `parts` and applying `op` to it (SequenceEmpty: alone)."""
    names = [f"x{i}" for i in range(len(parts))]
    nodes = [] if op == "SequenceEmpty" else [helper.make_node("SequenceConstruct", names, ["seq"])]
    nodes.append(helper.make_node(op, [] if op == "SequenceEmpty" else ["seq", *extra], ["y"], **attributes))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, p.shape) for n, p in zip(names, parts,
                                                                                             strict=True)]
    graph = helper.make_graph(nodes, op, inputs, [onnx.ValueInfoProto(name="y")],
                              initializer=[onnx.numpy_helper.from_array(v, n) for n, v in extra.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    return model, dict(zip(names, parts, strict=True))


# -- edge values on every executor ------------------------------------------------------------------

_I64 = np.array([0, 1, -1, 7, -7, 2**31, -(2**31) - 1, 2**40 + 3, -(2**40) - 3, 2**62, -(2**62), 2**63 - 1,
                 -(2**63) + 1], np.int64)
_F32 = np.array([0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 3.5, 1e-40, -1e-40, 1e-38, 3e38, -3e38, 1e20, np.inf,
                 -np.inf, np.nan], np.float32)
#: Denormals may be flushed to zero (FTZ/DAZ, as CPUs run), inputs, results and intermediates alike
#: (Mish(-88) is -5.3e-37, or 0 once softplus(-88) = 6e-39 is flushed): such differences are equal.
EDGE_ATOL = 1e-30


def _trunc_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Integer division rounding toward zero, exactly, at any int64 magnitude."""
    pairs = zip(a.tolist(), b.tolist(), strict=True)
    return np.array([abs(p) // abs(q) * (1 if (p < 0) == (q < 0) else -1) for p, q in pairs], a.dtype)


def edge_cases() -> Iterator[Case]:
    """One-node models on edge values with the spec's results: int64 beyond the int32 range, .5
    rounding ties, NaN and infinities (where IEEE arithmetic defines the result), signed zeros,
    denormal, huge and tiny magnitudes, empty and zero-size tensors."""
    with np.errstate(all="ignore"):
        specs = list(_edge_specs())
    for name, op, version, inputs, want, attrs in specs:
        constant = attrs.pop("constant", ())
        model, feeds = node_model(op, version, inputs, len(want), constant=constant, **attrs)
        yield Case(name, model, feeds, want, "edge", rtol=1e-5, atol=EDGE_ATOL)


def _edge_specs() -> Iterator[tuple[str, str, int, dict, list, dict]]:
    x, ones = _I64, np.ones_like(_I64)
    divisors = np.tile(np.array([11, -3], np.int64), len(x))
    yield "int64 Neg", "Neg", 17, {"x": x}, [-x], {}
    yield "int64 Abs", "Abs", 17, {"x": x}, [np.abs(x)], {}
    yield "int64 Sign", "Sign", 17, {"x": x}, [np.sign(x)], {}
    yield "int64 Identity", "Identity", 17, {"x": x}, [x], {}
    yield "int64 Add", "Add", 17, {"a": x, "b": ones}, [x + 1], {}
    yield "int64 Sub", "Sub", 17, {"a": x // 2, "b": ones * 3}, [x // 2 - 3], {}
    yield "int64 Mul", "Mul", 17, {"a": x // 4, "b": ones * 2}, [x // 4 * 2], {}
    pairs = np.repeat(x, 2)
    yield "int64 Div", "Div", 17, {"a": pairs, "b": divisors}, [_trunc_div(pairs, divisors)], {}
    yield "int64 Mod", "Mod", 17, {"a": x, "b": ones * (2**33 + 1)}, [np.mod(x, 2**33 + 1)], {}
    yield "int64 Max", "Max", 17, {"a": x, "b": ones * 2**40}, [np.maximum(x, 2**40)], {}
    yield "int64 Equal", "Equal", 17, {"a": x, "b": x + 2**33}, [np.zeros(len(x), bool)], {}
    yield "int64 Less", "Less", 17, {"a": x, "b": ones * 2**32}, [x < 2**32], {}
    yield "int64 Concat", "Concat", 17, {"a": x, "b": x[::-1].copy()}, [np.concatenate([x, x[::-1]])], {
        "axis": 0}
    yield "int64 Where", "Where", 17, {"c": x > 0, "a": x, "b": -x}, [np.where(x > 0, x, -x)], {}
    yield "int64 ReduceSum", "ReduceSum", 13, {"x": x[5:9].reshape(2, 2), "axes": np.array([1])}, [
        x[5:9].reshape(2, 2).sum(axis=1, keepdims=True)], {"constant": ["axes"]}
    yield "int64 CumSum", "CumSum", 14, {"x": x[5:9], "axis": np.array(0)}, [np.cumsum(x[5:9])], {
        "constant": ["axis"]}
    yield "int64 Cast to float", "Cast", 19, {"x": x}, [x.astype(np.float32)], {"to": TensorProto.FLOAT}
    yield "int64 Cast to int32", "Cast", 19, {"x": x}, [x.astype(np.int32)], {"to": TensorProto.INT32}
    big = np.array([5e18, -5e18, 3e9, -3e9, 2.5, -2.5, 1e10], np.float32)
    yield "float Cast to int64", "Cast", 19, {"x": big}, [big.astype(np.int64)], {"to": TensorProto.INT64}
    floats = np.arange(5, dtype=np.float32)
    yield "int64 Slice ends at run time", "Slice", 13, {"x": floats, "starts": np.array([1]),
                                                        "ends": np.array([2**63 - 1])}, [floats[1:]], {}
    small = np.array([-7, 7, -8, 9], np.int32)
    yield "int32 Div", "Div", 14, {"a": small, "b": np.array([2, -2, 3, -4], np.int32)}, [
        np.array([-3, -3, -2, -2], np.int32)], {}
    yield "int32 Mod", "Mod", 13, {"a": small, "b": np.array([2, -2, 3, -4], np.int32)}, [
        np.mod(small, np.array([2, -2, 3, -4], np.int32))], {}
    yield "int8 Div", "Div", 14, {"a": small.astype(np.int8), "b": np.array([2, -2, 3, -4], np.int8)}, [
        np.array([-3, -3, -2, -2], np.int8)], {}

    f, reverse = _F32, _F32[::-1].copy()
    finite = f[np.isfinite(f)]
    for op, fn in (("Neg", np.negative), ("Abs", np.abs), ("Floor", np.floor), ("Ceil", np.ceil),
                   ("Round", np.round), ("Sqrt", np.sqrt), ("Exp", np.exp), ("Log", np.log),
                   ("Reciprocal", lambda v: (1 / v).astype(np.float32)), ("Tanh", np.tanh),
                   ("Sigmoid", lambda v: (1 / (1 + np.exp(-v.astype(np.float64)))).astype(np.float32)),
                   ("IsNaN", np.isnan), ("IsInf", np.isinf)):
        yield f"float {op}", op, 13 if op != "IsInf" else 20, {"x": f}, [fn(f)], {}
    for op, fn in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply), ("Div", np.divide),
                   ("Equal", np.equal), ("Less", np.less), ("Greater", np.greater)):
        yield f"float {op}", op, 14 if op in ("Add", "Sub", "Mul", "Div") else 13, {"a": f, "b": reverse}, [
            fn(f, reverse)], {}
    for op, fn in (("Relu", lambda v: np.maximum(v, 0)), ("Sign", np.sign), ("Max", None), ("Min", None)):
        if fn is None:
            yield f"float {op}", op, 13, {"a": finite, "b": finite[::-1].copy()}, [
                (np.maximum if op == "Max" else np.minimum)(finite, finite[::-1])], {}
        else:
            yield f"float {op}", op, 14 if op == "Relu" else 13, {"x": finite}, [fn(finite)], {}
    infinite = np.array([-np.inf, -3e38, -1.0, -0.0, 0.0, 1e-40, 2.0, 3e38, np.inf], np.float32)
    for op, version, fn, attrs in (
            ("Clip", 13, lambda v: np.clip(v, -1, 1), {}),
            ("LeakyRelu", 6, lambda v: np.where(v < 0, v * np.float32(0.1), v), {"alpha": 0.1}),
            ("HardSigmoid", 6, lambda v: np.clip(v * np.float32(0.2) + np.float32(0.5), 0, 1), {}),
            ("HardSwish", 14, lambda v: v * np.clip(v / np.float32(6) + np.float32(0.5), 0, 1), {}),
            ("Elu", 6, lambda v: np.where(v < 0, np.expm1(v), v), {}),
            ("Erf", 13, lambda v: np.array([math.erf(t) for t in v.tolist()], np.float32), {})):
        inputs = {"x": infinite}
        if op == "Clip":
            inputs |= {"lo": np.float32(-1), "hi": np.float32(1)}
            attrs = {"constant": ["lo", "hi"]}
        yield f"float {op} of infinities", op, version, inputs, [fn(infinite).astype(np.float32)], dict(attrs)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 88.0, -88.0, 100.0, -100.0, 3e38, -3e38,
                        0.5], np.float32)
    wide = special.astype(np.float64)
    for op, version, values in (
            ("Softplus", 1, np.logaddexp(0, wide)), ("Softsign", 1, wide / (1 + np.abs(wide))),
            ("Elu", 6, np.where(wide < 0, np.expm1(wide), wide)),
            ("Selu", 6, np.where(wide > 0, wide, 1.6732632423543772 * np.expm1(wide)) * 1.0507009873554805),
            ("Mish", 18, wide * np.tanh(np.logaddexp(0, wide))),
            ("Gelu", 20, 0.5 * wide * (1 + np.array([math.erf(t / math.sqrt(2)) for t in wide.tolist()]))),
            ("Sinh", 9, np.sinh(wide)), ("Cosh", 9, np.cosh(wide)), ("Asinh", 9, np.arcsinh(wide)),
            ("Atan", 7, np.arctan(wide)), ("Sin", 7, np.sin(wide)), ("Cos", 7, np.cos(wide))):
        yield f"float {op} of special values", op, version, {"x": special}, [values.astype(np.float32)], {}
    window = np.array([[[[1, np.inf], [2, 3]], [[-np.inf, 1], [0, 4]]]], np.float32)
    yield "float GlobalAveragePool of infinities", "GlobalAveragePool", 1, {"x": window}, [
        window.mean(axis=(2, 3), keepdims=True)], {}
    pairs = np.array([[2, 0.5], [-8, 1 / 3], [0, 0], [np.nan, 0], [1, np.nan], [-2, 3], [0, -1], [1e20, 3]],
                     np.float32)
    yield "float Pow", "Pow", 15, {"a": pairs[:, 0].copy(), "b": pairs[:, 1].copy()}, [
        np.power(pairs[:, 0], pairs[:, 1])], {}
    yield "float Cast to float16", "Cast", 19, {"x": f}, [f.astype(np.float16)], {"to": TensorProto.FLOAT16}
    yield "float Cast to double", "Cast", 19, {"x": f}, [f.astype(np.float64)], {"to": TensorProto.DOUBLE}
    yield "float Cast to int32", "Cast", 19, {"x": finite[np.abs(finite) < 1e9]}, [
        finite[np.abs(finite) < 1e9].astype(np.int32)], {"to": TensorProto.INT32}
    rows = np.array([[1e30, 0, -1e30], [np.inf, 1, 2], [np.nan, 1, 2], [-np.inf, 0, 1], [88, 89, 90]],
                    np.float32)
    stable = np.exp(rows - rows.max(axis=1, keepdims=True))
    yield "float Softmax", "Softmax", 13, {"x": rows}, [stable / stable.sum(axis=1, keepdims=True)], {}
    yield "float LogSoftmax", "LogSoftmax", 13, {"x": rows}, [
        rows - rows.max(axis=1, keepdims=True) - np.log(stable.sum(axis=1, keepdims=True))], {}
    sums = np.array([[np.nan, 1], [np.inf, -np.inf], [3e38, 3e38], [1e-40, 1e-40]], np.float32)
    yield "float ReduceSum", "ReduceSum", 13, {"x": sums, "axes": np.array([1])}, [
        sums.sum(axis=1, keepdims=True)], {"constant": ["axes"]}
    grid = np.array([[np.nan, 1], [np.inf, 0]], np.float32)
    eye = np.eye(2, dtype=np.float32)
    yield "float MatMul", "MatMul", 13, {"a": grid, "b": eye}, [grid @ eye], {}
    doubles = np.array([1e300, -1e300, 1e-300, 2.0**60 + 1, np.pi], np.float64)
    yield "double Mul", "Mul", 14, {"a": doubles, "b": np.full(5, 3.0)}, [doubles * 3], {}
    yield "double Sqrt", "Sqrt", 13, {"x": np.abs(doubles)}, [np.sqrt(np.abs(doubles))], {}
    halves = np.array([65504, -65504, 1e-7, 0.1, 2.5, np.inf], np.float16)
    yield "float16 Add", "Add", 14, {"a": halves, "b": halves}, [halves + halves], {}
    yield "float16 Cast to float", "Cast", 19, {"x": halves}, [halves.astype(np.float32)], {
        "to": TensorProto.FLOAT}

    ties = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5], np.float32)
    quantize = {"x": ties, "scale": np.float32(1), "zero": np.uint8(128)}
    yield "QuantizeLinear ties", "QuantizeLinear", 13, quantize, [
        (np.round(ties) + 128).astype(np.uint8)], {"constant": ["scale", "zero"]}
    image = np.arange(4, dtype=np.float32).reshape(1, 1, 1, 4)
    up = np.arange(8) / 2  # asymmetric, 4 -> 8: every odd output sits on a .5 coordinate
    down = np.arange(2) * 2 + 0.5  # half_pixel, 4 -> 2: (i + 0.5) * 2 - 0.5
    for mode, rounding in (("round_prefer_floor", lambda c: np.ceil(c - 0.5)),
                           ("round_prefer_ceil", lambda c: np.floor(c + 0.5))):
        for coordinates, source, scale in (("asymmetric", up, 2), ("half_pixel", down, 0.5)):
            index = np.clip(rounding(source).astype(int), 0, 3)
            yield f"Resize nearest {mode} {coordinates} on .5", "Resize", 13, {
                "x": image, "roi": np.array([], np.float32),
                "scales": np.array([1, 1, 1, scale], np.float32)}, [
                image[..., index]], {"constant": ["roi", "scales"], "mode": "nearest", "nearest_mode": mode,
                                     "coordinate_transformation_mode": coordinates}

    empty = np.zeros((0, 3), np.float32)
    yield "empty Add", "Add", 14, {"a": empty, "b": np.ones(3, np.float32)}, [empty], {}
    nothing = np.zeros((2, 0, 3), np.float32)
    yield "zero-size Relu", "Relu", 14, {"x": nothing}, [nothing], {}
    yield "zero-size Transpose", "Transpose", 13, {"x": np.zeros((2, 0, 3), np.float32)}, [
        np.zeros((3, 0, 2), np.float32)], {}
    yield "zero-size Concat", "Concat", 13, {"a": empty, "b": np.ones((2, 3), np.float32)}, [
        np.ones((2, 3), np.float32)], {"axis": 0}
    yield "zero-size Softmax", "Softmax", 13, {"x": empty}, [empty], {}
    yield "MatMul over K=0", "MatMul", 13, {"a": np.zeros((2, 0), np.float32),
                                            "b": np.zeros((0, 3), np.float32)}, [
        np.zeros((2, 3), np.float32)], {}
    yield "ReduceSum over an empty axis", "ReduceSum", 13, {"x": np.zeros((2, 0), np.float32),
                                                            "axes": np.array([1])}, [
        np.zeros((2, 1), np.float32)], {"constant": ["axes"]}
    yield "ReduceMax over an empty axis", "ReduceMax", 18, {"x": np.zeros((2, 0), np.float32),
                                                            "axes": np.array([1])}, [
        np.full((2, 1), -np.inf, np.float32)], {"constant": ["axes"]}
    yield "Gather with no indices", "Gather", 13, {"x": floats, "i": np.zeros(0, np.int64)}, [
        np.zeros(0, np.float32)], {}
    yield "Slice to nothing", "Slice", 13, {"x": floats, "starts": np.array([3]), "ends": np.array([1])}, [
        np.zeros(0, np.float32)], {"constant": ["starts", "ends"]}


def edge_executors() -> list[Executor]:
    """Every executor library here, CuPy through its interpreter on numpy arrays."""
    from hetero import executors
    from hetero.executors.cupy_executor import CupyExecutor

    found = [e for lib in executors.libraries() if lib.library != "cupy" for e in lib.executors
             if e.device.kind in ("cpu", "opencl")]
    return [*found, CupyExecutor.on_host()]


# -- the numpy executor's claims and the coverage table ---------------------------------------------

def claimed_versions() -> set[tuple[str, int]]:
    """(op, since_version) pairs of the default domain that the numpy executor implements, random
    draws left out (no two libraries draw alike)."""
    return {(s.name, s.since_version) for s in onnx.defs.get_all_schemas_with_history()
            if s.domain == "" and not s.deprecated and s.name not in RANDOM_OPS
            and implements("", s.name, s.since_version)}


def run(cases: Iterable[Case], executor: Executor | None = None) -> list[Result]:
    """Every case checked on `executor` (the numpy executor by default)."""
    executor = executor or NumpyExecutor()
    return [check(case, executor) for case in cases]


def coverage(results: Sequence[Result], claimed: set[tuple[str, int]]) -> dict[str, int]:
    """Counts for the README: claimed (op, version) pairs, those exercised exactly at least once,
    and cases by verdict."""
    exact = {(r.op, r.version) for r in results if r.verdict == "exact"}
    counts = collections.Counter(r.verdict for r in results)
    return {"claimed": len(claimed), "covered": len(exact & claimed), "cases": len(results), **counts}


def _report(results: Sequence[Result], failures: bool) -> None:
    for r in results:
        if r.verdict in ("wrong", "raised") or (failures and r.verdict not in ("exact", "declined")):
            print(f"{r.verdict:>9}  {r.op}-{r.version}  {r.case} ({r.source}): {r.detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", help="comma-separated op types (default: all)")
    parser.add_argument("--failures", action="store_true", help="list every case that is not exact")
    parser.add_argument("--thorough", action="store_true",
                        help="every executor also runs the backend cases at every op version (about 15 min)")
    args = parser.parse_args()
    ops = args.ops.split(",") if args.ops else None
    generated = [c for c in generated_cases() if not ops or c.op in ops]
    backend = list(backend_cases(ops))
    results = run([*backend, *generated])
    _report(results, args.failures)
    claimed = claimed_versions()
    if ops:
        claimed = {c for c in claimed if c[0] in ops}
    table = coverage(results, claimed)
    by_source = collections.Counter((r.source, r.verdict) for r in results)
    print("\nnumpy@cpu, op version by op version\n")
    print("| cases | count | exact | declined | no truth | wrong or raised |\n|---|---|---|---|---|---|")
    for source in ("backend", "converted", "restamped", "generated"):
        total = sum(n for (s, _), n in by_source.items() if s == source)
        failed = by_source[source, "wrong"] + by_source[source, "raised"]
        print(f"| {source} | {total} | {by_source[source, 'exact']} | {by_source[source, 'declined']} | "
              f"{by_source[source, 'no truth']} | {failed} |")
    print(f"\n(op, version) pairs claimed by numpy@cpu: {table['claimed']}; exercised and exact: "
          f"{table['covered']}")
    if args.failures:
        exact = {(r.op, r.version) for r in results if r.verdict == "exact"}
        print("not exercised: " + ", ".join(f"{op}-{v}" for op, v in sorted(claimed - exact)))
    edges = [c for c in edge_cases() if not ops or c.op in ops]
    print("\nEvery executor: edge values (spec's formulas) and generated cases (old op versions)\n")
    print("| executor | edge cases run | exact | declined | generated cases run | exact | declined | wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for executor in edge_executors():
        on_edges = run(edges, executor)
        on_generated = run([*generated, *(backend if args.thorough else [])], executor)
        _report([*on_edges, *on_generated], args.failures)
        e = collections.Counter(r.verdict for r in on_edges)
        g = collections.Counter(r.verdict for r in on_generated)
        wrong = e["wrong"] + e["raised"] + g["wrong"] + g["raised"]
        judged = len(on_generated) - g["declined"] - g["no truth"]
        print(f"| {executor.name} | {len(on_edges) - e['declined']} | {e['exact']} | {e['declined']} | "
              f"{judged} | {g['exact']} | {g['declined']} | {wrong} |")


if __name__ == "__main__":
    main()
