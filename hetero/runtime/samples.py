"""Representative inputs for the measured policies, and what every node sees on them.

The inputs are the caller's (`sample_inputs`, or `input_shapes` as trtexec's `--optShapes` and
OpenVINO's `-shape`), else made from the model's dims and `DEFAULT_DIMS`. One run on them is
captured with every intermediate value as an output, by the fastest exact executor present (ONNX
Runtime, before the numpy reference): the values that nodes are measured on, and the types and
shapes that shape inference could not tell. Types and shapes are kept on disk per model and shape
profile, so planning again runs nothing when nothing is left to measure.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from hetero import executors as executor_registry
from hetero.cache import JsonStore
from hetero.errors import InputError
from hetero.graph import Model, example_feeds
from hetero.graph.model import default_shape
from hetero.runtime.session import compile_plan

Feeds = dict[str, np.ndarray]
SampleInputs = Mapping[str, Any] | Sequence[Mapping[str, Any]]
_shapes = JsonStore("shapes")


def representative(model: Model, sample_inputs: SampleInputs | None = None,
                   input_shapes: Mapping[str, Sequence[int]] | None = None, count: int = 1) -> list[Feeds]:
    """Feeds to plan on: the caller's samples (one dict or several), inputs they leave out made up
    like the rest; else `count` random draws of `input_shapes` or the model's default shapes.

    Raises InputError naming an input the model does not have, or a shape that does not fit it.
    """
    known = {i.name: i for i in model.inputs}
    for name, shape in (input_shapes or {}).items():
        info = known.get(name)
        if info is None:
            raise InputError(f"model {model.label!r} has no input {name!r} (input_shapes); inputs are "
                             f"{', '.join(known)}")
        if info.shape is not None and (len(shape) != len(info.shape) or any(
                isinstance(d, int) and d > 0 and d != s for d, s in zip(info.shape, shape, strict=True))):
            raise InputError(f"model {model.label!r}: input_shapes gives {name!r} shape {list(shape)}, "
                             f"which does not fit its declared {info.describe()}")
    if sample_inputs is None:
        return [example_feeds(model, seed=i, shapes=input_shapes) for i in range(count)]
    samples = [sample_inputs] if isinstance(sample_inputs, Mapping) else list(sample_inputs)
    if not samples:
        raise InputError(f"model {model.label!r}: sample_inputs is empty")
    made = []
    for i, sample in enumerate(samples):
        unknown = [n for n in sample if n not in known]
        if unknown:
            raise InputError(f"model {model.label!r} has no input {unknown[0]!r} (sample_inputs); inputs "
                             f"are {', '.join(known)}")
        feeds = {n: np.asarray(v) for n, v in sample.items()}
        if len(feeds) < len(known):
            shapes = {**(input_shapes or {}), **{n: a.shape for n, a in feeds.items()}}
            feeds = {**example_feeds(model, seed=i, shapes=shapes), **feeds}
        made.append(feeds)
    return made


def made_up(model: Model, sample_inputs: SampleInputs | None,
            input_shapes: Mapping[str, Sequence[int]] | None) -> list[str]:
    """The inputs whose values (or dims) were not given, described for a message."""
    given = set()
    if sample_inputs is not None:
        samples = [sample_inputs] if isinstance(sample_inputs, Mapping) else sample_inputs
        given = set.intersection(*(set(s) for s in samples)) if samples else set()
    found = []
    for info in model.inputs:
        if info.name in given:
            continue
        shape = list(input_shapes[info.name]) if input_shapes and info.name in input_shapes else list(
            default_shape(info))
        guessed = "" if info.is_static or (input_shapes and info.name in input_shapes) else ", dims defaulted"
        values = "N(0, 1)" if info.dtype is not None and info.dtype.kind == "f" else "random in [0, 10)"
        found.append(f"{info.name} ({info.describe()} as {shape}{guessed}, values {values})")
    return found


def profile(feeds: Mapping[str, Any]) -> str:
    """The shape profile of a set of feeds: what plans and measurements are cached under."""
    return ",".join(f"{n}:{'x'.join(map(str, np.shape(v)))}" for n, v in sorted(feeds.items()))


def exact_executors() -> list[executor_registry.Executor]:
    """Exact executors present on the host (ONNX Runtime, the numpy reference), fastest first:
    the numpy reference, slowest, comes last in the default order."""
    return [e for e in executor_registry.available() if e.exact]


@dataclass
class Observed:
    """Dtype and shape of every value in one run (graph inputs and node outputs), and the values
    themselves, captured when first asked for."""

    types: dict[str, tuple[np.dtype, tuple[int, ...]]]
    values: Callable[[], Mapping[str, Any]]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: shape for name, (_, shape) in self.types.items()}


def observe(model: Model, feeds: Feeds) -> Observed:
    """What the nodes of `model` see on `feeds`: types and shapes recalled from disk or captured,
    and the values (captured at most once, when asked for). Raises whatever running fails with."""
    key = f"{model.fingerprint}|{profile(feeds)}"
    lock = threading.Lock()
    captured: dict[str, Any] = {}

    def values() -> Mapping[str, Any]:
        with lock:
            if not captured:
                captured.update(capture(model, feeds))
            return captured

    cached = _shapes.get(key)
    if cached is None:
        types = {name: (np.asarray(v).dtype, tuple(np.shape(v))) for name, v in values().items()
                 if isinstance(v, np.ndarray | np.generic)}
        _shapes.put(key, {name: [dtype.str, list(shape)] for name, (dtype, shape) in types.items()})
        _shapes.save()
    else:
        types = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in cached.items()}
    return Observed(types, values)


def capture(model: Model, feeds: Feeds) -> dict[str, Any]:
    """Every value of one run of `model` on `feeds` (graph inputs and every node output), run by
    the exact executors present (ONNX Runtime where it can, the numpy reference for the rest)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    known = {o.name for o in proto.graph.output}
    for node in model.nodes:
        for name in node.outputs:
            if name and name not in known:
                info = model.value_info(name)
                proto.graph.output.append(info if info is not None else onnx.ValueInfoProto(name=name))
                known.add(name)
    everything = Model(proto, model.label, model.folded)
    session = compile_plan(everything, exact_executors(), "priority", max_in_flight=1)
    try:
        values = session.run(feeds)
    finally:
        session.close()
    return {**values, **feeds}
