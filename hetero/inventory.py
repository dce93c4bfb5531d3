"""`hetero.devices()`: every device and executor on this host, and the libraries that are missing."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

from hetero import executors as executor_registry
from hetero.executors import ExecutorInfo, Library, default_threads


@dataclass(frozen=True)
class DeviceEntry:
    """One device and the executors (vendor libraries) that can drive it."""

    device: str
    description: str
    executors: tuple[ExecutorInfo, ...]


@dataclass(frozen=True)
class Inventory:
    devices: tuple[DeviceEntry, ...]
    libraries: tuple[Library, ...]

    @property
    def missing(self) -> tuple[Library, ...]:
        return tuple(lib for lib in self.libraries if not lib.installed)

    def __str__(self) -> str:
        lines = []
        for entry in self.devices:
            lines.append(f"{entry.device}: {entry.description}")
            lines += [f"  {e.name:<26} {e.library} {e.version}, {e.threads} threads, {e.precision}"
                      for e in entry.executors]
        lines += [f"{lib.library}: no device found" for lib in self.libraries
                  if lib.installed and not lib.executors and not lib.notes]
        lines += [f"{lib.library}: {lib.error}" for lib in self.missing]
        lines += [f"{lib.library}: {note}" for lib in self.libraries for note in lib.notes]
        return "\n".join(lines)


def cpu_name() -> str:
    """The host CPU's model name and the cores this process may use."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        models = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {default_threads()} cores"


def devices(refresh: bool = False) -> Inventory:
    """Devices with their executors and library versions; missing libraries name their pip extra."""
    libs = executor_registry.libraries(refresh)
    by_device: dict[str, list[ExecutorInfo]] = {}
    for executor in executor_registry.available():
        by_device.setdefault(str(executor.device), []).append(executor.info())
    entries = tuple(DeviceEntry(device, cpu_name() if device == "cpu" else infos[0].device_name,
                                tuple(infos)) for device, infos in by_device.items())
    return Inventory(entries, tuple(libs))
