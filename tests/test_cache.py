"""The disk cache: values survive the process, and processes writing at once lose nothing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hetero.cache import JsonStore

_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from hetero.cache import JsonStore

    name, go = sys.argv[1], Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    store = JsonStore("race")
    for batch in range(40):
        for k in range(5):
            store.put(f"{name}-{batch}-{k}", {"ms": batch + k / 10})
        store.save()
""")


def test_values_survive_and_other_processes_see_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    first, second = JsonStore("costs"), JsonStore("costs")
    first.put("node|a", 1.5)
    first.put("node|inf", float("inf"))  # an executor that cannot run a node alone
    assert second.get("node|a") is None  # not saved yet
    first.save()
    assert second.get("node|a") == 1.5 and second.get("node|inf") == float("inf")
    first.put("node|a", 2.5)
    first.save()
    second.clear_memory()
    assert second.get("node|a") == 2.5
    assert (tmp_path / "costs.sqlite").is_file()


def test_two_processes_writing_at_once_lose_nothing(tmp_path, monkeypatch):
    go, cache = tmp_path / "go", tmp_path / "cache"
    env = {**os.environ, "HETERO_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, name, str(go)], env=env) for name in "ab"]
    go.touch()
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    monkeypatch.setenv("HETERO_CACHE_DIR", str(cache))
    store = JsonStore("race")
    missing = [f"{name}-{batch}-{k}" for name in "ab" for batch in range(40) for k in range(5)
               if store.get(f"{name}-{batch}-{k}") != {"ms": batch + k / 10}]
    assert missing == []
