"""Where Hetero keeps what it measured or compiled between runs: $HETERO_CACHE_DIR or ~/.cache/hetero."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    path = Path(os.environ.get("HETERO_CACHE_DIR") or Path.home() / ".cache" / "hetero")
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonStore:
    """A small key -> JSON value store in one file, written atomically so readers never see half."""

    def __init__(self, name: str):
        self.name = name
        self._data: dict[str, Any] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}.json"

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, key: str) -> Any:
        with self._lock:
            return self._load().get(key)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._load()[key] = value
            self._dirty = True

    def save(self) -> None:
        """Merge with what other processes wrote meanwhile, then replace the file in one step."""
        with self._lock:
            if not self._dirty:
                return
            try:
                on_disk = json.loads(self.path.read_text())
            except (OSError, ValueError):
                on_disk = {}
            on_disk.update(self._data or {})
            self._data = on_disk
            handle, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.name}.")
            with os.fdopen(handle, "w") as file:
                json.dump(on_disk, file, indent=0, sort_keys=True)
            os.replace(temp, self.path)
            self._dirty = False

    def clear_memory(self) -> None:
        """Forget what was read, so the next `get` reads the file again (e.g. after a cache reset)."""
        with self._lock:
            self._data = None
            self._dirty = False
