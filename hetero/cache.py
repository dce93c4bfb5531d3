"""Where Hetero keeps what it measured or compiled between runs: $HETERO_CACHE_DIR or ~/.cache/hetero.

Each store is one SQLite database (`<name>.sqlite`) of key -> JSON value. SQLite makes writes
from several processes safe: every key any of them saves is kept, the last value per key wins.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write to finish
_SCHEMA = "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def cache_dir() -> Path:
    path = Path(os.environ.get("HETERO_CACHE_DIR") or Path.home() / ".cache" / "hetero")
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonStore:
    """A key -> JSON value store shared by the processes of one user.

    `get` reads through a memory copy (a key not found there is looked up on disk, so what other
    processes saved meanwhile is seen); `put` keeps the value in memory until `save` writes every
    pending value in one transaction.
    """

    def __init__(self, name: str):
        self.name = name
        self._data: dict[str, Any] | None = None
        self._pending: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @property
    def path(self) -> Path:
        return cache_dir() / f"{self.name}.sqlite"

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection to the current path (the cache dir may change, e.g. in tests)."""
        path = self.path
        opened = getattr(self._local, "opened", None)
        if opened is not None and opened[0] == (path, os.getpid()):
            return opened[1]
        connection = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        deadline = time.monotonic() + _BUSY_TIMEOUT_S
        # SQLite answers "locked" at once, without its busy wait, while another process creates
        # the same database or switches it to WAL: retry until the busy timeout.
        while True:
            try:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(_SCHEMA)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    connection.close()
                    raise
                time.sleep(0.01)
        self._local.opened = (path, os.getpid()), connection
        return connection

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            rows = self._connect().execute("SELECT key, value FROM entries").fetchall()
            self._data = {key: json.loads(value) for key, value in rows}
        return self._data

    def get(self, key: str) -> Any:
        with self._lock:
            data = self._load()
            if key in data:
                return data[key]
            row = self._connect().execute("SELECT value FROM entries WHERE key = ?", (key,)).fetchone()
            if row is None:
                return None
            data[key] = json.loads(row[0])
            return data[key]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._load()[key] = value
            self._pending[key] = value

    def save(self) -> None:
        """Write the values put since the last save, in one transaction."""
        with self._lock:
            if not self._pending:
                return
            rows = [(key, json.dumps(value)) for key, value in self._pending.items()]
            connection = self._connect()
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                connection.executemany("INSERT OR REPLACE INTO entries (key, value) VALUES (?, ?)", rows)
            self._pending.clear()

    def clear_memory(self) -> None:
        """Forget what was read and not saved, so the next `get` reads the disk again (e.g. after
        a cache reset)."""
        with self._lock:
            self._data = None
            self._pending.clear()
