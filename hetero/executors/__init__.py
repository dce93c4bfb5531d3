"""Executor discovery: which vendor libraries and devices this host has.

Built-in executors live one library per file here; third-party ones arrive through the
`hetero.executors` entry-point group (`pip install hetero-<vendor>`). A library that is not
installed is reported with the pip extra that installs it, never as a crash.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hetero import domains
from hetero.errors import ExecutorUnavailableError, HeteroError
from hetero.executors.base import (
    CPU,
    CompiledPartition,
    Device,
    Executor,
    ExecutorInfo,
    default_threads,
    host_all_finite,
)

# library -> (module, class); the order is the default priority among host libraries.
BUILTIN: dict[str, tuple[str, str]] = {
    "cupy": ("hetero.executors.cupy_executor", "CupyExecutor"),
    "onnxruntime": ("hetero.executors.onnxruntime_executor", "OnnxRuntimeExecutor"),
    "tensorrt": ("hetero.executors.tensorrt_executor", "TensorRTExecutor"),
    "openvino": ("hetero.executors.openvino_executor", "OpenVinoExecutor"),
    "torch": ("hetero.executors.torch_executor", "TorchExecutor"),
    "opencl": ("hetero.executors.opencl_executor", "OpenCLExecutor"),
    "sim": ("hetero.executors.sim_executor", "SimExecutor"),
    "numpy": ("hetero.executors.numpy_executor", "NumpyExecutor"),
}
EXTRAS = {"tensorrt": "tensorrt", "cupy": "cuda", "onnxruntime": "onnxruntime", "openvino": "openvino",
          "torch": "torch", "opencl": "opencl", "sim": "", "numpy": ""}


@dataclass(frozen=True)
class Library:
    """One executor library as found on this host: its executors, or why there are none, and
    `notes` on what it could drive here but does not (hardware without its back end, ...)."""

    library: str
    extra: str
    executors: tuple[Executor, ...]
    error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def installed(self) -> bool:
        return self.error is None


_lock = threading.Lock()  # guards the dicts below and the precision variants
_found: dict[str, Library] = {}
_discovery_locks: dict[str, threading.RLock] = {}  # one per library: discovering one never waits on another
_discovering = threading.local()  # the libraries this thread is discovering, innermost last


@functools.cache
def _loaders() -> dict[str, Callable[[], type[Executor]]]:
    """Each library's executor class loader, built-in ones first, then plugins' entry points (read
    once: scanning the installed packages' metadata takes milliseconds)."""
    loaders: dict[str, Callable[[], type[Executor]]] = {lib: functools.partial(_load_class, lib)
                                                        for lib in BUILTIN}
    for ep in importlib.metadata.entry_points(group="hetero.executors"):
        loaders.setdefault(ep.name, ep.load)
    return loaders


def _load_class(library: str) -> type[Executor]:
    module_name, class_name = BUILTIN[library]
    return getattr(importlib.import_module(module_name), class_name)


def _discover(library: str, cls_loader: Callable[[], type[Executor]]) -> Library:
    extra = EXTRAS.get(library, library)
    try:
        cls = cls_loader()
        executors = tuple(cls.discover())
        notes = tuple(cls.missing())
    except ImportError as exc:
        hint = f"pip install 'hetero[{extra}]'" if extra else "reinstall hetero"
        return Library(library, extra, (), f"not installed ({exc.name or exc}); {hint}")
    except Exception as exc:
        return Library(library, extra, (), f"unavailable: {type(exc).__name__}: {exc}")
    return Library(library, extra, executors, notes=notes)


def library(name: str, refresh: bool = False) -> Library | None:
    """One executor library as found here (discovered on first use, then cached: naming one
    library imports that library alone), or None when Hetero knows no library of that name."""
    if refresh:
        _loaders.cache_clear()
    return _library(name, refresh)


def libraries(refresh: bool = False) -> list[Library]:
    """Every executor library Hetero knows of, installed or not (cached after the first call)."""
    if refresh:
        _loaders.cache_clear()
    return [_library(name, refresh) for name in _loaders()]


def _library(name: str, rediscover: bool) -> Library | None:
    loader = _loaders().get(name)
    if loader is None:
        return None
    with _lock:
        lock = _discovery_locks.setdefault(name, threading.RLock())
    with lock:  # a plugin's discover() may ask for another library (one it wraps) meanwhile
        if name not in _found or rediscover:
            chain = _discovering.__dict__.setdefault("names", [])
            if name in chain:
                raise HeteroError(f"executor library {name!r}: its discover() asked for itself "
                                  f"({' -> '.join([*chain, name])})")
            chain.append(name)
            try:
                _found[name] = _discover(name, loader)
            finally:
                chain.pop()
        return _found[name]


def available() -> list[Executor]:
    """Executors usable here, in default priority order: accelerators first, numpy last."""
    executors = [e for lib in libraries() for e in lib.executors]
    return sorted(executors, key=lambda e: 0 if is_accelerator(e) else 1)


def vendor_domains() -> dict[str, tuple[str, domains.TypeFn]]:
    """Operator domains beyond ONNX's that an installed library implements: domain -> (library,
    the function typing its nodes' outputs)."""
    found: dict[str, tuple[str, domains.TypeFn]] = {}
    for lib in libraries():
        for executor in lib.executors:
            for domain in type(executor).vendor_domains:
                found.setdefault(domain, (lib.library, type(executor).output_types))
    return found


domains.set_source(vendor_domains)


def reference() -> Executor:
    """The exact host executor (ONNX semantics for every standard op): the fallback of last resort
    and the source of reference values."""
    return _resolve_one("numpy")[0]


def is_accelerator(executor: Executor) -> bool:
    """A device with its own compute (a GPU or other card), as opposed to the host CPU."""
    return bool(getattr(executor, "accelerator", executor.device.kind != "cpu"))


def hands_off(source: Executor | None, target: Executor | None) -> bool:
    """A tensor `source` made is read by `target` in the same device memory through another
    library's arrays: no copy, but a hand-off (the producer synchronizes, the reader wraps the
    buffer through DLPack). Host memory needs none: every library takes numpy arrays."""
    return (source is not None and target is not None and type(source) is not type(target)
            and source.memory_space == target.memory_space != str(CPU))


def resolve(specs: Iterable[str | Executor] | None) -> list[Executor]:
    """Executors from names `ENGINE@DEVICE[PRECISION]`, each part optional but the library:
    'numpy', 'torch' (all its devices), 'torch@cuda:0', 'openvino@cpu[bf16]', 'onnxruntime' (every
    execution provider on every device), 'onnxruntime/cuda' (the CUDA provider on every GPU),
    'onnxruntime@cpu' (the library's own back end on that device: the CPU provider; where it has
    none there, all its back ends on that device)."""
    if specs is None:
        return available()
    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    chosen: list[Executor] = []
    for spec in specs:
        for executor in _resolve_one(spec):
            if executor not in chosen:
                chosen.append(executor)
    if not chosen:
        raise ExecutorUnavailableError("no executors given")
    return chosen


def _resolve_one(spec: str | Executor) -> list[Executor]:
    if isinstance(spec, Executor):
        return [spec]
    engine, _, rest = spec.partition("@")
    device, _, variant = rest.partition("[")
    lib = library(engine.partition("/")[0])
    if lib is None:
        raise ExecutorUnavailableError(
            f"unknown executor {spec!r}; known libraries: {', '.join(sorted(_loaders()))}")
    if not lib.installed:
        raise ExecutorUnavailableError(f"executor {spec!r} is not available: {lib.library} {lib.error}")
    matches = [e for e in lib.executors if not device or str(e.device) == device]
    if "/" in engine or device:
        named = [e for e in matches if e.engine == engine]
        matches = named if named or "/" in engine else matches
    if variant:
        matches = [variant_of(e, variant.rstrip("]")) for e in matches]
    if not matches:
        present = ", ".join(e.name for e in lib.executors) or "none"
        raise ExecutorUnavailableError(f"executor {spec!r} is not available on this host (found: {present})")
    return matches


# Variants by the executor they vary: two executors may share a name (simulated devices from two
# devices files), and a variant lives as long as its base.
_variants: weakref.WeakKeyDictionary[Executor, dict[tuple, Executor]] = weakref.WeakKeyDictionary()


def variant_of(executor: Executor, precision: str | None = None, *, threads: int | None = None,
               stream: int | None = None) -> Executor:
    """The same library and device at another precision (OpenVINO bf16), thread budget or CPU
    stream; one instance per variant, so capability probes are shared. `ExecutorUnavailableError`
    when the library has no such precision."""
    precision = precision or executor.precision
    threads = threads or executor.threads
    if (precision, threads, stream) == (executor.precision, executor.threads, executor.stream):
        return executor
    key = (precision, threads, stream)
    with _lock:
        known = _variants.setdefault(executor, {})
        if key not in known:
            if precision not in executor.precisions:
                raise ExecutorUnavailableError(
                    f"executor {executor.name} has no precision variant {precision!r} (it offers "
                    f"{', '.join(executor.precisions)})")
            changes = {"precision": precision} if len(executor.precisions) > 1 else {}
            known[key] = executor.variant(threads=threads, stream=stream, **changes)
        return known[key]


__all__ = [
    "CPU",
    "CompiledPartition",
    "Device",
    "Executor",
    "ExecutorInfo",
    "Library",
    "available",
    "default_threads",
    "hands_off",
    "host_all_finite",
    "is_accelerator",
    "libraries",
    "reference",
    "resolve",
    "variant_of",
]
