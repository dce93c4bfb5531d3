"""Devices that are not on this host, sketched from a devices file, so plans can be drawn for
hardware you do not have (yet): "what if this server had an A100 next to its CPU?".

It is the file `--simulate` runs (format: `hetero.executors.sim_executor.read_devices` and the
README): an entry with roofline figures is estimated from them; one declared as a speed relative
to a host library (`like`, `speed`) from that library's probed roofline scaled by the speed.
Sketched devices are planned for and estimated; nothing runs on them.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from hetero.errors import ExecutorUnavailableError, PlanError
from hetero.executors import CompiledPartition, Device, Executor, ExecutorInfo, resolve
from hetero.executors.sim_executor import DeviceSpec, read_devices
from hetero.graph import Model, Node
from hetero.planner.cost import ExecutorProfile, probe


class DescribedExecutor(Executor):
    """An executor known only from a devices file: it can be planned for, not run."""

    extra = ""

    def __init__(self, library: str, device: Device, like: Executor | None):
        super().__init__(device)
        self.library = library
        self.accelerator = device.kind != "cpu"
        self._like = like

    @classmethod
    def discover(cls) -> list[Executor]:
        return []

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(self.name, self.library, "described", str(self.device),
                            "described in a devices file", 0, "fp32")

    def supports_op(self, node: Node, model: Model) -> bool:
        if self._like is not None:
            return self._like.supports(node, model)
        return node.domain == ""

    def compile(self, part: onnx.ModelProto) -> CompiledPartition:
        raise ExecutorUnavailableError(f"{self.name} is described in a devices file, not present: it can be "
                                       "planned for, not run (hetero ... --simulate FILE runs a simulation)")


def load_described(path: str | Path) -> tuple[list[Executor], dict[str, ExecutorProfile]]:
    """Executors and roofline profiles for what a devices file declares: the cards (named by their
    `executor` field, else `sim@sim:N`) and a declared host CPU (`sim@cpu`)."""
    devices = read_devices(path)
    entries: list[tuple[str, Device, DeviceSpec]] = []
    if devices.host is not None:
        entries.append(("sim", Device("cpu"), devices.host))
    first: dict[int, int] = {}
    for device, spec in devices.cards():
        if spec.executor:
            library, _, named = spec.executor.partition("@")
            base = Device.parse(named or "cpu")
            offset = device.index - first.setdefault(id(spec), device.index)
            entries.append((library, Device(base.kind, base.index + offset), spec))
        else:
            entries.append(("sim", device, spec))
    executors: list[Executor] = []
    profiles: dict[str, ExecutorProfile] = {}
    for library, device, spec in entries:
        try:
            like = resolve([spec.like])[0] if spec.like else None
        except ExecutorUnavailableError as exc:
            raise PlanError(f"{spec.where}: like {spec.like!r}: {exc}") from exc
        executor = DescribedExecutor(library, device, like)
        host = device.kind == "cpu"
        link_gbs, link_ms = (0.0, 0.0) if host else (spec.link_gbs, spec.link_us / 1e3)
        if spec.peak_gflops is not None and spec.bandwidth_gbs is not None:
            profile = ExecutorProfile(spec.peak_gflops, spec.bandwidth_gbs, spec.overhead_us / 1e3, link_gbs,
                                      link_ms)
        else:
            base = probe(like)
            profile = ExecutorProfile(base.peak_gflops * spec.speed, base.bandwidth_gbs * spec.speed,
                                      spec.overhead_us / 1e3, link_gbs, link_ms)
        profiles[executor.name] = profile
        executors.append(executor)
    return executors, profiles
