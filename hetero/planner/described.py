"""Devices that are not on this host, described by their figures, so plans can be sketched for
hardware you do not have (yet): "what if this server had an A100 next to its CPU?".

A profile file (YAML or JSON) lists them:

    devices:
      - executor: torch@cuda:0      # library@device it would be driven by
        like: torch                 # an installed library whose capability it borrows (optional)
        peak_gflops: 60000
        bandwidth_gbs: 1500
        overhead_us: 20             # cost of one partition call
        link_gbs: 24                # its link to host memory (PCIe)
        link_us: 10

The planner places nodes on them and estimates times with the roofline; nothing runs on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx

from hetero import executors as executor_registry
from hetero.errors import ExecutorUnavailableError, PlanError
from hetero.executors import CompiledPartition, Device, Executor, ExecutorInfo
from hetero.graph import Model, Node
from hetero.planner.cost import ExecutorProfile


class DescribedExecutor(Executor):
    """An executor known only from a profile file: it can be planned for, not run."""

    extra = ""
    accelerator = True

    def __init__(self, library: str, device: Device, like: Executor | None):
        super().__init__(device)
        self.library = library
        self._like = like

    @classmethod
    def discover(cls) -> list[Executor]:
        return []

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.library, "described", str(self.device),
                            "described in a profile", 0, "fp32")

    def supports_op(self, node: Node, model: Model) -> bool:
        if self._like is not None:
            return self._like.supports(node, model)
        return node.domain == ""

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        raise ExecutorUnavailableError(f"{self.name} is described in a profile, not present: it can be "
                                       "planned for, not run")


def load_described(path: str | Path) -> tuple[list[Executor], dict[str, ExecutorProfile]]:
    """Executors and roofline profiles from a profile file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"device profile {str(path)!r} cannot be read: {exc}") from exc
    data = json.loads(text) if path.suffix == ".json" else _yaml(text, path)
    entries = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PlanError(f"device profile {str(path)!r}: expected a 'devices' list")
    executors: list[Executor] = []
    profiles: dict[str, ExecutorProfile] = {}
    for index, entry in enumerate(entries):
        where = f"device profile {str(path)!r}, devices[{index}]"
        try:
            library, _, device = str(entry["executor"]).partition("@")
            like = executor_registry.resolve([entry["like"]])[0] if entry.get("like") else None
            executor = DescribedExecutor(library, Device.parse(device or "cpu"), like)
            profiles[executor.name] = ExecutorProfile(
                peak_gflops=float(entry["peak_gflops"]), bandwidth_gbs=float(entry["bandwidth_gbs"]),
                overhead_ms=float(entry.get("overhead_us", 10)) / 1e3,
                link_gbs=float(entry.get("link_gbs", 0)), link_ms=float(entry.get("link_us", 0)) / 1e3)
        except KeyError as exc:
            raise PlanError(f"{where}: missing field {exc.args[0]!r}") from exc
        except (TypeError, ValueError, ExecutorUnavailableError) as exc:
            raise PlanError(f"{where}: {exc}") from exc
        executors.append(executor)
    return executors, profiles


def _yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise PlanError(f"device profile {str(path)!r} is YAML: pip install pyyaml, or write it as "
                        ".json") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"device profile {str(path)!r} is not valid YAML: {exc}") from exc
