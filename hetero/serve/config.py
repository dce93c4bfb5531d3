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

Checked by pydantic; an error names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from hetero.errors import ModelError
from hetero.planner import POLICIES


def _listed(value: Any) -> Any:
    """`a, b` as well as `[a, b]`; one integer as a list of one."""
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [value] if isinstance(value, int) and not isinstance(value, bool) else value


Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[int, Field(strict=True, ge=1)]
Name = Annotated[str, Field(strict=True, min_length=1)]
Names = Annotated[tuple[Name, ...], BeforeValidator(_listed), Field(min_length=1)]


class Batching(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_queue_delay_microseconds: Count = 0
    preferred_batch_size: Annotated[tuple[Positive, ...], BeforeValidator(_listed)] = ()

    @model_validator(mode="after")
    def _sorted(self) -> Batching:
        object.__setattr__(self, "preferred_batch_size", tuple(sorted(set(self.preferred_batch_size))))
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    executors: Names | None = None
    replicas: Annotated[tuple[Names, ...], Field(min_length=1)] | None = None
    cpu_streams: Positive | None = None
    policy: Literal[POLICIES] = "priority"  # type: ignore[valid-type]
    max_batch_size: Count = 0
    dynamic_batching: Batching | None = None
    max_queue_size: Positive = 128
    version_policy: Literal["latest", "all"] = "latest"
    inputs: Names | None = None
    outputs: Names | None = None

    @model_validator(mode="before")
    @classmethod
    def _present(cls, data: Any) -> Any:
        """`dynamic_batching:` with nothing after it turns batching on with the defaults."""
        if isinstance(data, dict) and "dynamic_batching" in data and data["dynamic_batching"] is None:
            return {**data, "dynamic_batching": {}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.executors is not None and self.replicas is not None:
            raise ValueError("give executors or replicas, not both")
        batching = self.dynamic_batching
        if batching and self.max_batch_size == 0:
            raise ValueError("dynamic_batching needs max_batch_size > 0")
        if batching and any(size > self.max_batch_size for size in batching.preferred_batch_size):
            raise ValueError(f"dynamic_batching: preferred_batch_size {list(batching.preferred_batch_size)} "
                             f"must not exceed max_batch_size {self.max_batch_size}")
        return self

    @classmethod
    def read(cls, path: Path, where: str | None = None) -> ModelConfig:
        """The config at `path` (named `where` in errors), or the defaults when there is none."""
        where = where or str(path)
        if not path.exists():
            return cls()
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ModelError(f"{where}: cannot read it as YAML: {exc}") from None
        return cls.parse(data, where)

    @classmethod
    def parse(cls, data: Any, where: str) -> ModelConfig:
        """Check every field's type and range; errors name the file and the field."""
        if not isinstance(data, dict):
            raise ModelError(f"{where}: must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelError(f"{where}: {describe(exc, cls)}") from None


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """The first problem pydantic found, as `field: what is wrong`."""
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        known = f"; fields are {', '.join(model.model_fields)}" if len(first["loc"]) == 1 else ""
        return f"unknown field {field!r}{known}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{field}: {message}, got {first['input']!r}" if field else message
