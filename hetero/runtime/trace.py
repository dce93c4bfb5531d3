"""A timeline of partitions and transfers per device, as a Chrome trace / Perfetto JSON file."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Event:
    name: str
    category: str  # "partition" or "transfer"
    resource: str
    executor: str
    start: float
    end: float
    request: int

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


class Trace:
    """Events recorded while a session runs with tracing on; open the saved file in ui.perfetto.dev."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._origin = time.perf_counter()
        self._requests = 0

    def new_request(self) -> int:
        with self._lock:
            self._requests += 1
            return self._requests

    def record(self, name: str, category: str, resource: str, executor: str, start: float, end: float,
               request: int) -> None:
        with self._lock:
            self.events.append(Event(name, category, resource, executor, start, end, request))

    def partition_ms(self) -> dict[str, float]:
        """Median ms of each partition over the traced requests."""
        times: dict[str, list[float]] = {}
        for event in self.events:
            if event.category == "partition":
                times.setdefault(event.name, []).append(event.ms)
        return {name: sorted(values)[len(values) // 2] for name, values in times.items()}

    def chrome(self) -> dict:
        resources = sorted({e.resource for e in self.events})
        pids = {r: i + 1 for i, r in enumerate(resources)}
        events: list[dict] = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": resource}}
                              for resource, pid in pids.items()]
        for e in self.events:
            events.append({"name": e.name, "cat": e.category, "ph": "X", "pid": pids[e.resource],
                           "tid": e.executor, "ts": (e.start - self._origin) * 1e6,
                           "dur": (e.end - e.start) * 1e6, "args": {"request": e.request}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chrome()))
        return path
