"""Executor discovery: installed, missing and third-party libraries."""

import importlib.metadata

import pytest
from conftest import StubExecutor

import hetero
from hetero import executors


def test_missing_library_names_its_extra(monkeypatch):
    real_import = executors.importlib.import_module

    def refuse(name, *args):
        if name.endswith("openvino_executor"):
            raise ModuleNotFoundError("No module named 'openvino'", name="openvino")
        return real_import(name, *args)

    monkeypatch.setattr(executors.importlib, "import_module", refuse)
    try:
        libraries = {lib.library: lib for lib in executors.libraries(refresh=True)}
        assert not libraries["openvino"].installed
        assert "pip install 'hetero[openvino]'" in libraries["openvino"].error
        assert "openvino" in str(hetero.devices())
        with pytest.raises(hetero.ExecutorUnavailableError, match=r"hetero\[openvino\]"):
            executors.resolve(["openvino"])
    finally:
        monkeypatch.undo()
        executors.libraries(refresh=True)


def test_third_party_executors_arrive_through_entry_points(monkeypatch):
    entry = importlib.metadata.EntryPoint("stub", "conftest:StubExecutor", "hetero.executors")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [entry] if kw.get("group") == "hetero.executors" else real(**kw))
    try:
        found = {lib.library: lib for lib in executors.libraries(refresh=True)}
        assert found["stub"].installed and isinstance(found["stub"].executors[0], StubExecutor)
        assert "stub@stub:0" in [e.name for e in executors.available()]
    finally:
        monkeypatch.undo()
        executors.libraries(refresh=True)


class WrappingExecutor(StubExecutor):
    """A plugin whose discovery asks the registry for another library (the one it wraps), or for
    itself, as a careless plugin might."""

    wraps = "numpy"

    @classmethod
    def discover(cls):
        if executors.library(cls.wraps).installed:
            return [cls()]
        return []


def test_a_plugin_may_ask_for_other_libraries_while_it_is_discovered(monkeypatch):
    loaders = dict(executors._loaders())
    monkeypatch.setattr(executors, "_loaders", lambda: {**loaders, "wrapping": lambda: WrappingExecutor})
    try:
        assert executors.library("wrapping").installed  # used to deadlock on the registry
        monkeypatch.setattr(WrappingExecutor, "wraps", "wrapping")
        del executors._found["wrapping"]
        found = executors.library("wrapping")
        assert not found.installed and "asked for itself (wrapping -> wrapping)" in found.error
    finally:
        executors._found.pop("wrapping", None)


def test_library_not_installed_is_named_in_the_error(monkeypatch):
    monkeypatch.setitem(executors._found, "openvino",
                        executors.Library("openvino", "openvino", (), "not installed (openvino); hint"))
    with pytest.raises(hetero.ExecutorUnavailableError) as raised:
        executors.resolve(["openvino@cpu"])
    assert str(raised.value) == ("executor 'openvino@cpu' is not available: openvino not installed "
                                 "(openvino); hint")
