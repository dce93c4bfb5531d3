"""`hetero.devices()`: every device and executor on this host, and the libraries that are missing."""

from __future__ import annotations

from dataclasses import dataclass

from hetero import executors as executor_registry
from hetero.executors import ExecutorInfo, Library


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
        lines += [f"{lib.library}: {lib.error}" for lib in self.libraries
                  if lib.installed and not lib.executors]
        lines += [f"{lib.library}: {lib.error}" for lib in self.missing]
        return "\n".join(lines)


def devices(refresh: bool = False) -> Inventory:
    """Devices with their executors and library versions; missing libraries name their pip extra."""
    libs = executor_registry.libraries(refresh)
    by_device: dict[str, list[ExecutorInfo]] = {}
    for executor in executor_registry.available():
        by_device.setdefault(str(executor.device), []).append(executor.info())
    entries = tuple(DeviceEntry(device, infos[0].device_name, tuple(infos))
                    for device, infos in by_device.items())
    return Inventory(entries, tuple(libs))
