"""The model repository, laid out as Triton's: `REPO/<model>/<version>/model.onnx` and an optional
`REPO/<model>/config.yaml` (see `hetero.serve.config`).

Version folders are positive integers; by default only the highest is loaded (`version_policy:
latest`), with `all` every one is. Requests that name no version go to the highest loaded. A model
that fails to load never stops the others: the index shows it UNAVAILABLE with the error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2

from hetero.errors import HeteroError, ModelError
from hetero.graph import Model, TensorInfo, load
from hetero.runtime import ReplicaPool
from hetero.runtime.replanning import Replanning, serving_pool
from hetero.serve.batcher import Batcher
from hetero.serve.config import ModelConfig
from hetero.serve.metrics import Metrics
from hetero.serve.protocol import InferInput, ServeError, datatype_of, dims, public_message

log = logging.getLogger("hetero.serve")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"
UNLOADED = "unloaded"
MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# (model, replicas, cpu_streams=, policy=, warmup=) -> a pool; hetero.ray's Cluster.deploy is another
PoolBuilder = Callable[..., ReplicaPool | Replanning]


class ServedModel:
    """One loaded version of a model: its replica pool, its batcher and its protocol metadata."""

    def __init__(self, name: str, version: str, model: Model, config: ModelConfig, metrics: Metrics,
                 build_pool: PoolBuilder = serving_pool):
        self.name, self.version, self.model, self.config = name, version, model, config
        self.label = f"{name}/{version}"
        self.inputs = {info.name: info for info in model.inputs}
        self.outputs = config.outputs or model.output_names
        _check(self, config)
        numeric = all(info.dtype is not None and info.dtype.kind in "biuf" for info in model.inputs)
        self.pool = build_pool(model, replicas=config.replicas or (
            [config.executors] if config.executors else None), cpu_streams=config.cpu_streams,
            policy=config.policy, warmup=numeric)  # warm-up makes random inputs: numbers only
        self.stats = metrics.model(name, version)
        batching = config.dynamic_batching
        self.batcher = Batcher(
            self.pool, self.label, max_batch_size=config.max_batch_size if batching else 0,
            delay_s=batching.max_queue_delay_microseconds / 1e6 if batching else 0.0,
            preferred=batching.preferred_batch_size if batching else (), max_queue_size=config.max_queue_size,
            observe=self.stats.batch)

    def infer(self, inputs: Sequence[InferInput], outputs: Sequence[str] | None) -> Future:
        """Check, decode and queue a request; bad requests raise at once."""
        return self.submit(*self.decode(inputs, outputs))

    def decode(self, inputs: Sequence[InferInput], outputs: Sequence[str] | None
               ) -> tuple[dict[str, np.ndarray], list[str]]:
        """A request's tensors checked against the model and decoded, and the outputs it wants;
        `ServeError` (400) names the input or output at fault."""
        arrays: dict[str, np.ndarray] = {}
        for tensor in inputs:
            info = self.inputs.get(tensor.name)
            if info is None:
                raise ServeError(f"model {self.label!r} has no input {tensor.name!r}; inputs are "
                                 f"{', '.join(self.inputs)}")
            if tensor.name in arrays:
                raise ServeError(f"model {self.label!r}: input {tensor.name!r} is given twice")
            expected = datatype_of(info.dtype, self.label)
            if tensor.datatype != expected:
                raise ServeError(f"model {self.label!r}: input {tensor.name!r} has datatype {expected}, "
                                 f"got {tensor.datatype!r}")
            arrays[tensor.name] = tensor.decode(f"model {self.label!r}")
        arrays = self.pool.replicas[0].session.check_feeds(arrays)
        wanted = list(outputs or self.outputs)
        unknown = [n for n in wanted if n not in self.outputs]
        if unknown:
            raise ServeError(f"model {self.label!r} has no output {unknown[0]!r}; outputs are "
                             f"{', '.join(self.outputs)}")
        if self.config.max_batch_size:
            rows = {len(a) for a in arrays.values()}
            if len(rows) > 1:
                raise ServeError(f"model {self.label!r}: inputs disagree on the batch size (dim 0): "
                                 f"{sorted(rows)}")
            if rows and not 1 <= min(rows) <= self.config.max_batch_size:
                raise ServeError(f"model {self.label!r}: batch size (dim 0) {min(rows)} is outside 1.."
                                 f"{self.config.max_batch_size} (max_batch_size)")
        return arrays, wanted

    def submit(self, arrays: dict[str, np.ndarray], wanted: list[str]) -> Future:
        """Queue decoded tensors; the Future gives the outputs (cancel it to drop a waiting request)."""
        return self.batcher.submit(arrays, wanted)

    def metadata(self, versions: Sequence[str]) -> dict[str, Any]:
        """The protocol's model metadata: -1 marks dynamic dims (the batch dim among them)."""
        def tensor(info: TensorInfo) -> dict[str, Any]:
            return {"name": info.name, "datatype": datatype_of(info.dtype, self.label),
                    "shape": dims(info.shape)}
        return {"name": self.name, "versions": list(versions), "platform": "onnx",
                "inputs": [tensor(i) for i in self.model.inputs],
                "outputs": [tensor(self.model.tensor(n)) for n in self.outputs]}

    def triton_config(self) -> dict[str, Any]:
        """The config as Triton reports it (model_config.proto as JSON); dims leave out the batch dim."""
        skip = 1 if self.config.max_batch_size else 0

        def tensor(info: TensorInfo) -> dict[str, Any]:
            datatype = datatype_of(info.dtype, self.label)
            return {"name": info.name, "data_type": f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}",
                    "dims": dims(info.shape)[skip:]}
        latest = self.config.version_policy == "latest"
        config: dict[str, Any] = {
            "name": self.name, "platform": "onnx", "backend": "hetero",
            "version_policy": {"latest": {"num_versions": 1}} if latest else {"all": {}},
            "max_batch_size": self.config.max_batch_size,
            "input": [tensor(i) for i in self.model.inputs],
            "output": [tensor(self.model.tensor(n)) for n in self.outputs],
            "instance_group": [{"name": name, "count": 1}
                               for name in dict.fromkeys(r.name for r in self.pool.replicas if r.live)],
            "parameters": {"policy": {"string_value": self.config.policy}},
        }
        batching = self.config.dynamic_batching
        if batching:
            config["dynamic_batching"] = {
                "preferred_batch_size": list(batching.preferred_batch_size),
                "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
                "default_queue_policy": {"max_queue_size": self.config.max_queue_size}}
        return config

    def config_proto(self) -> model_config_pb2.ModelConfig:
        return json_format.ParseDict(self.triton_config(), model_config_pb2.ModelConfig())

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish every queued request (for at most `timeout_s`), then release the replicas."""
        self.batcher.close(timeout_s)


def _check(served: ServedModel, config: ModelConfig) -> None:
    """The config must fit the model: names it lists exist, batched tensors have a dynamic dim 0."""
    model, where = served.model, f"model {served.label!r}: config.yaml"
    for field, names, known in (("inputs", config.inputs, model.input_names),
                                ("outputs", config.outputs, model.output_names)):
        missing = [n for n in names or () if n not in known]
        if missing:
            raise ModelError(f"{where}: {field}: the model has no {field[:-1]} {missing[0]!r}; it has "
                             f"{', '.join(known)}")
    tensors = [*model.inputs, *(model.tensor(n) for n in served.outputs)]
    for info in tensors:
        datatype_of(info.dtype, f"model {served.label!r}: tensor {info.name!r}")
        batchable = info.shape is None or (info.shape and not isinstance(info.shape[0], int))
        if config.max_batch_size and not batchable:
            raise ModelError(f"{where}: max_batch_size {config.max_batch_size} needs a dynamic dim 0 on "
                             f"every input and output, but {info.name!r} is {info.describe()}; "
                             "set max_batch_size: 0")


class Repository:
    """Models under `root`, loaded and unloaded by name; each version served by a `ServedModel`.

    A model name is checked before it touches the file system (letters, digits, `_`, `-`, `.`, not
    starting with a dot), and no message a client sees carries a file-system path.
    """

    def __init__(self, root: str | Path, metrics: Metrics, build_pool: PoolBuilder = serving_pool):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ModelError(f"model repository {str(self.root)!r} is not a directory")
        self.metrics = metrics
        self.build_pool = build_pool
        self._served: dict[str, dict[str, ServedModel]] = {}
        self._states: dict[str, dict[str, tuple[str, str]]] = {}  # model -> version -> (state, reason)
        self._lock = threading.Lock()  # guards the two dicts
        self._changing = threading.Lock()  # one load or unload at a time
        self._paths = re.compile("|".join(re.escape(f"{p}{os.sep}") for p in {str(self.root),
                                                                             str(self.root.resolve())}))

    def names(self) -> list[str]:
        """Every model folder in the repository, and every model still loaded from one since removed."""
        found = {p.name for p in self.root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)}
        return sorted(found | set(self._served))

    def load_all(self) -> None:
        for name in self.names():
            with contextlib.suppress(HeteroError):  # recorded in the index; the server serves the rest
                self.load(name)

    def load(self, name: str) -> None:
        """Load (or reload) every version the policy selects; old versions stop once the new are ready.

        A reload where no version loads leaves the old ones serving; the error goes to the caller.
        """
        if not _NAME.fullmatch(name) or not (self.root / name).is_dir():
            raise ServeError(f"model repository has no model {name!r}", 404)
        with self._changing:
            loaded, states = self._load_versions(name, self.root / name)
            with self._lock:
                old = self._served.get(name, {})
                if loaded or not old:
                    self._served[name], self._states[name] = loaded, states
                else:
                    old = {}
            for served in old.values():
                served.close()
        for version, (state, reason) in states.items():
            fields = {"model": name, "version": version}
            if state == READY:
                log.info("model loaded", extra={"fields": fields})
            else:
                log.error("model load failed", extra={"fields": {**fields, "error": reason}})
        failed = [reason for state, reason in states.values() if state != READY]
        if failed:
            raise ModelError(f"model {name!r} failed to load: {'; '.join(failed)}")

    def _load_versions(self, name: str, folder: Path) -> tuple[dict[str, ServedModel],
                                                               dict[str, tuple[str, str]]]:
        """Every version the config selects, with the state of each (errors recorded, not raised)."""
        try:
            config = ModelConfig.read(folder / "config.yaml", f"{name}/config.yaml")
            versions = _versions(folder, config)
        except ModelError as exc:
            return {}, {"": (UNAVAILABLE, self._public(str(exc)))}
        with self._lock:
            if not self._served.get(name):
                self._states[name] = {v: (LOADING, "") for v in versions}
        loaded, states = {}, {}
        for version in versions:
            try:
                model = load(folder / version / MODEL_FILE, name=f"{name}/{version}")
                loaded[version] = ServedModel(name, version, model, config, self.metrics, self.build_pool)
                states[version] = (READY, "")
            except Exception as exc:
                states[version] = (UNAVAILABLE, self._public(str(exc)))
        return loaded, states

    def _public(self, message: str) -> str:
        """`message` with the repository's own path dropped and any other absolute path hidden."""
        return public_message(ModelError(self._paths.sub("", message)))

    def unload(self, name: str, timeout_s: float = 30.0) -> None:
        """Stop taking requests for the model, finish those queued (within `timeout_s` for all its
        versions together), release its replicas."""
        deadline = time.monotonic() + timeout_s
        with self._changing:
            with self._lock:
                if name not in self._served and name not in self._states:
                    raise ServeError(f"model repository has no model {name!r}", 404)
                served = self._served.pop(name, {})
                self._states[name] = {v: (UNLOADING, "") for v in served}
            for model in served.values():
                model.close(max(0.0, deadline - time.monotonic()))
            with self._lock:
                self._states[name] = {v: (UNAVAILABLE, UNLOADED) for v in served or [""]}
            log.info("model unloaded", extra={"fields": {"model": name}})

    def get(self, name: str, version: str = "") -> ServedModel:
        """The served version (the highest when `version` is empty); 404 unknown, 503 not ready.

        Answers from what was loaded, never from the file system."""
        with self._lock:
            served = self._served.get(name, {})
            states = self._states.get(name)
        if version and version in served:
            return served[version]
        if not version and served:
            return served[max(served, key=int)]
        if states is None:
            raise ServeError(f"unknown model {name!r}", 404)
        label = f"model {name!r}" + (f" version {version!r}" if version else "")
        if version in states or "" in states:
            state, reason = states.get(version) or states[""]
        elif version:
            known = ", ".join(sorted(served, key=int)) or "none loaded"
            raise ServeError(f"model {name!r} has no version {version!r} (versions: {known})", 404)
        else:
            state, reason = states[max(states, key=int)]
        raise ServeError(f"{label} is not ready ({state}{': ' + reason if reason else ''})", 503)

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._served.get(name, {}), key=int)

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """One entry per model version (per model when it has none): name, version, state, reason."""
        entries = []
        with self._lock:
            states = {name: dict(self._states.get(name) or {"": (UNAVAILABLE, "not loaded")})
                      for name in self.names()}
        for name, versions in states.items():
            for version, (state, reason) in sorted(versions.items()):
                if not ready_only or state == READY:
                    entries.append({"name": name, "version": version, "state": state, "reason": reason})
        return entries

    def ready(self) -> list[ServedModel]:
        with self._lock:
            return [m for versions in self._served.values() for m in versions.values()]

    def all_ready(self) -> bool:
        """Every model loaded at start or since is ready (models unloaded on request do not count)."""
        with self._lock:
            return all(state == READY or reason == UNLOADED
                       for versions in self._states.values() for state, reason in versions.values())

    def close(self, timeout_s: float = 30.0) -> None:
        """Unload everything, finishing queued requests within `timeout_s` for all models together."""
        deadline = time.monotonic() + timeout_s
        for name in list(self._served):
            self.unload(name, max(0.0, deadline - time.monotonic()))


def _versions(folder: Path, config: ModelConfig) -> list[str]:
    versions = sorted((p.name for p in folder.iterdir()
                       if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILE).is_file()),
                      key=int)
    if not versions:
        raise ModelError(f"model {folder.name!r}: no version folder {folder.name}/<N>/{MODEL_FILE}")
    return versions if config.version_policy == "all" else versions[-1:]
