"""Registry of user-written kernels for operators no vendor library has (custom ops).

A kernel is registered for an ONNX `(domain, op_type)` on an executor kind: "numpy" (a host
function), "opencl" (OpenCL C source) or "cuda" (CUDA source for CuPy). Executors consult the
registry in `supports()`; the planner never special-cases custom ops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KERNEL_KINDS = ("numpy", "opencl", "cuda")

# (input dtypes, input shapes, attributes) -> [(dtype, shape)] per output; dims may be None.
InferFn = Callable[[Sequence[np.dtype], Sequence[tuple | None], dict[str, Any]],
                   Sequence[tuple[np.dtype, tuple | None]]]


@dataclass(frozen=True)
class Kernel:
    """One registered kernel.

    For "numpy", `fn(*inputs, **attributes)` returns an array or a tuple of arrays. For "opencl"
    and "cuda", `source` holds the device code and `fn` is an optional host-side launcher that
    the executor calls with its device context (see the executor's documentation).
    """

    domain: str
    op_type: str
    executor: str
    fn: Callable[..., Any] | None = None
    source: str | None = None
    entry: str | None = None
    infer: InferFn | None = None
    options: dict[str, Any] = field(default_factory=dict)


_registry: dict[tuple[str, str, str], Kernel] = {}
_lock = threading.Lock()


def kernel(domain: str, op_type: str, *, executor: str = "numpy", source: str | None = None,
           entry: str | None = None, infer: InferFn | None = None, fn: Callable[..., Any] | None = None,
           **options: Any) -> Any:
    """Register a custom kernel for `(domain, op_type)` on an executor kind.

    Used as a decorator for host kernels::

        @hetero.kernel("com.example", "BoxDecode", executor="numpy")
        def box_decode(scores, deltas, *, stride: int): ...

    or called directly with device source::

        hetero.kernel("com.example", "BoxDecode", executor="opencl", source=CL_SOURCE, fn=launch)

    `infer` gives output dtypes and shapes for planning when ONNX shape inference cannot.
    Registering the same key again replaces the kernel.
    """
    if executor not in KERNEL_KINDS:
        raise ValueError(f"kernel executor must be one of {KERNEL_KINDS}, got {executor!r}")
    if not domain or domain in ("ai.onnx", "ai.onnx.ml"):
        raise ValueError(f"custom kernels need their own domain, got {domain!r} for {op_type!r}")

    def register(function: Callable[..., Any] | None) -> Any:
        if executor == "numpy" and function is None:
            raise ValueError(f"numpy kernel {domain}::{op_type} needs a function")
        if executor != "numpy" and source is None:
            raise ValueError(f"{executor} kernel {domain}::{op_type} needs source=")
        spec = Kernel(domain, op_type, executor, function, source, entry, infer, dict(options))
        with _lock:
            _registry[domain, op_type, executor] = spec
        return function

    if executor == "numpy" and fn is None and source is None:
        return register
    return register(fn)


def lookup(domain: str, op_type: str, executor: str) -> Kernel | None:
    return _registry.get((domain, op_type, executor))


def find(domain: str, op_type: str) -> list[Kernel]:
    """Every kernel registered for an op, any executor kind."""
    return [k for (d, o, _), k in _registry.items() if d == domain and o == op_type]


def domains() -> set[str]:
    return {d for d, _, _ in _registry}


def unregister(domain: str, op_type: str, executor: str | None = None) -> None:
    with _lock:
        for key in [k for k in _registry if k[:2] == (domain, op_type) and executor in (None, k[2])]:
            del _registry[key]
