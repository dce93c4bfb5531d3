"""Operator domains beyond ONNX's that an installed library implements (`com.microsoft` on ONNX
Runtime): the graph layer admits their nodes at load and asks the library for their output types.

The executor layer registers where the answers come from (`set_source`), so the graph layer
names no library and imports nothing above it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

import onnx

# (node, its input ValueInfos (None where unknown), the model's opsets, initializers it reads)
# -> one ValueInfoProto (or None) per output.
TypeFn = Callable[[onnx.NodeProto, Sequence[onnx.ValueInfoProto | None], Mapping[str, int],
                   Sequence[onnx.TensorProto]], Sequence[onnx.ValueInfoProto | None]]

_source: Callable[[], Mapping[str, tuple[str, TypeFn]]] | None = None
_lock = threading.Lock()


def set_source(source: Callable[[], Mapping[str, tuple[str, TypeFn]]]) -> None:
    """Where vendor domains come from: a callable giving domain -> (library, type function)."""
    global _source
    with _lock:
        _source = source


def vendor_domains() -> Mapping[str, tuple[str, TypeFn]]:
    """Domain -> (library that implements it, its type function), for the libraries installed."""
    with _lock:
        source = _source
    return dict(source()) if source is not None else {}
