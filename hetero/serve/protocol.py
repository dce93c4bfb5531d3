"""The Open Inference Protocol's tensors and errors, shared by the HTTP and gRPC front ends.

Tensors travel as a datatype string, a shape and either flat data (JSON lists, gRPC typed
contents) or raw little-endian bytes (the binary tensor data extension, gRPC raw contents). BYTES
tensors' raw form is each element as a 4-byte little-endian length followed by its bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetero.errors import HeteroError, InputError, QueueFullError

DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in [
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
    ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
    ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ("BYTES", np.object_)]}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}


class ServeError(HeteroError):
    """A request the server refuses; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def http_status(error: BaseException) -> int:
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, InputError):
        return 400
    if isinstance(error, QueueFullError):
        return 503
    return 500


def datatype_of(dtype: np.dtype | None, where: str) -> str:
    """The protocol's name for a numpy dtype (strings are BYTES)."""
    if dtype is not None and dtype.kind in "OSU":
        return "BYTES"
    name = _NAMES.get(dtype) if dtype is not None else None
    if name is None:
        raise ServeError(f"{where}: element type {dtype} has no Open Inference Protocol datatype", 500)
    return name


@dataclass
class InferInput:
    """One input tensor of a request as it arrived: JSON/typed `data` or `raw` bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Sequence[Any] | np.ndarray | None = None
    raw: bytes | memoryview | None = None

    def decode(self, where: str) -> np.ndarray:
        """The tensor as a numpy array; the message names the input and what is wrong."""
        where = f"{where}: input {self.name!r}"
        dtype = DATATYPES.get(self.datatype)
        if dtype is None:
            raise ServeError(f"{where}: unknown datatype {self.datatype!r}; datatypes are "
                             f"{', '.join(DATATYPES)}")
        count = math.prod(self.shape)
        if self.raw is not None:
            array = _from_bytes(self.raw, dtype, count, where)
        elif self.data is not None:
            array = _from_list(self.data, dtype, count, where)
        else:
            raise ServeError(f"{where}: no data (give 'data' or binary data)")
        return array.reshape(self.shape)


def _from_bytes(raw: bytes | memoryview, dtype: np.dtype, count: int, where: str) -> np.ndarray:
    if dtype.kind == "O":
        return np.array(deserialize_bytes(raw, count, where), dtype=object)
    if len(raw) != count * dtype.itemsize:
        raise ServeError(f"{where}: {len(raw)} bytes of binary data, but shape and datatype need "
                         f"{count} x {dtype.itemsize} = {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype, copy=False)


def _from_list(data: Sequence[Any], dtype: np.dtype, count: int, where: str) -> np.ndarray:
    if dtype.kind == "O":
        items = np.array(data, dtype=object).ravel()
        if not all(isinstance(x, str | bytes) for x in items):
            raise ServeError(f"{where}: BYTES data must be strings")
        array = np.array([x.encode() if isinstance(x, str) else x for x in items], dtype=object)
    else:
        try:
            array = np.array(data).ravel()
        except ValueError as exc:
            raise ServeError(f"{where}: data is not a regular array: {exc}") from None
        if array.size and not _fits(array, dtype):
            raise ServeError(f"{where}: data of kind {array.dtype} does not match its datatype "
                             f"{_NAMES[dtype]}")
        array = array.astype(dtype)
    if array.size != count:
        raise ServeError(f"{where}: {array.size} data elements, but its shape needs {count}")
    return array


def _fits(array: np.ndarray, dtype: np.dtype) -> bool:
    """JSON numbers may be read as any wider kind: ints as floats, bools only as bools."""
    allowed = {"b": "b", "u": "bu", "i": "bui", "f": "buif"}[dtype.kind]
    return array.dtype.kind in allowed and (dtype.kind != "u" or array.dtype.kind != "i" or array.min() >= 0)


def to_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of a tensor (length-prefixed elements for BYTES)."""
    if array.dtype.kind in "OSU":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def to_list(array: np.ndarray) -> list[Any]:
    """Flat JSON data of a tensor (BYTES as UTF-8 text)."""
    if array.dtype.kind in "OS":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    return array.ravel().tolist()


def serialize_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts += [struct.pack("<I", len(data)), data]
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, count: int, where: str) -> list[bytes]:
    items, offset, raw = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ServeError(f"{where}: BYTES data is cut inside an element's length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            raise ServeError(f"{where}: BYTES element {len(items)} claims {size} bytes past the end")
        items.append(bytes(raw[offset + 4:offset + 4 + size]))
        offset += 4 + size
    if len(items) != count:
        raise ServeError(f"{where}: {len(items)} BYTES elements, but its shape needs {count}")
    return items


def dims(shape: Sequence[int | str | None] | None) -> list[int]:
    """A model shape as the protocol shows it: -1 for every dynamic dim."""
    return [d if isinstance(d, int) else -1 for d in (shape or ())]
