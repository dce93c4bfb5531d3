"""A served model's `config.yaml`: where it runs, how requests are batched and queued.

Every field is optional::

    executors: [openvino, onnxruntime, numpy]   # one replica, executors in priority order
    replicas: [[torch@cuda:0, numpy], [openvino]]   # or several (not both); default: every device
    cpu_streams: 2            # host-only replicas become this many CPU streams
    policy: priority          # or latency, throughput, auto (measured placements)
    max_batch_size: 16        # > 0: dim 0 of every input and output is the batch dim
    dynamic_batching:         # present: merge concurrent requests along dim 0
      max_queue_delay_microseconds: 2000
      preferred_batch_size: [8, 16]
    max_queue_size: 128       # requests waiting beyond this are refused (HTTP 503)
    version_policy: latest    # or all: which numbered version folders are loaded
    inputs: [images]          # names the model must have
    outputs: [logits]         # outputs served (default: all)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from hetero.errors import ModelError
from hetero.planner import POLICIES


@dataclass(frozen=True)
class Batching:
    max_queue_delay_microseconds: int = 0
    preferred_batch_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    executors: tuple[str, ...] | None = None
    replicas: tuple[tuple[str, ...], ...] | None = None
    cpu_streams: int | None = None
    policy: str = "priority"
    max_batch_size: int = 0
    dynamic_batching: Batching | None = None
    max_queue_size: int = 128
    version_policy: str = "latest"
    inputs: tuple[str, ...] | None = None
    outputs: tuple[str, ...] | None = None

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        """The config at `path`, or the defaults when there is none."""
        if not path.exists():
            return cls()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ModelError(f"{path}: cannot read it as YAML: {exc}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: Any, where: str) -> ModelConfig:
        """Check every field's type and range; errors name the file and the field."""
        values = _mapping(data, where)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ModelError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(known))}")
        parsed = {key: _FIELDS[key](value, f"{where}: {key}") for key, value in values.items()}
        config = cls(**parsed)
        if config.executors is not None and config.replicas is not None:
            raise ModelError(f"{where}: give executors or replicas, not both")
        batching = config.dynamic_batching
        if batching and any(size > config.max_batch_size for size in batching.preferred_batch_size):
            raise ModelError(f"{where}: dynamic_batching: preferred_batch_size "
                             f"{list(batching.preferred_batch_size)} must not exceed max_batch_size "
                             f"{config.max_batch_size}")
        if batching and config.max_batch_size == 0:
            raise ModelError(f"{where}: dynamic_batching needs max_batch_size > 0")
        return config


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ModelError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _int(minimum: int) -> Callable[[Any, str], int]:
    def check(value: Any, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ModelError(f"{where}: must be an integer >= {minimum}, got {value!r}")
        return value
    return check


def _names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ModelError(f"{where}: must be a non-empty list of names, got {value!r}")
    return tuple(value)


def _choice(*options: str) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in options:
            raise ModelError(f"{where}: must be one of {', '.join(options)}, got {value!r}")
        return value
    return check


def _replicas(value: Any, where: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ModelError(f"{where}: must be a non-empty list of executor lists, got {value!r}")
    return tuple(_names(spec, f"{where}[{i}]") for i, spec in enumerate(value))


def _batching(value: Any, where: str) -> Batching:
    values = _mapping(value or {}, where)
    known = {f.name for f in fields(Batching)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ModelError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(known))}")
    delay = _int(0)(values.get("max_queue_delay_microseconds", 0), f"{where}: max_queue_delay_microseconds")
    sizes = values.get("preferred_batch_size", [])
    sizes = [sizes] if isinstance(sizes, int) else sizes
    if not isinstance(sizes, list):
        raise ModelError(f"{where}: preferred_batch_size must be a list of integers, got {sizes!r}")
    preferred = tuple(_int(1)(s, f"{where}: preferred_batch_size") for s in sizes)
    return Batching(delay, tuple(sorted(set(preferred))))


_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "executors": _names, "replicas": _replicas, "cpu_streams": _int(1), "policy": _choice(*POLICIES),
    "max_batch_size": _int(0), "dynamic_batching": _batching, "max_queue_size": _int(1),
    "version_policy": _choice("latest", "all"), "inputs": _names, "outputs": _names,
}
