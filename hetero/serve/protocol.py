"""The Open Inference Protocol's tensors and errors, shared by the HTTP and gRPC front ends.

Tensors travel as a datatype string, a shape and either flat data (JSON lists, gRPC typed
contents) or raw little-endian bytes (the binary tensor data extension, gRPC raw contents). BYTES
tensors' raw form is each element as a 4-byte little-endian length followed by its bytes
(`tritonclient.utils` encodes and decodes it). Every value is checked against its datatype: a
value outside the datatype's range or of the wrong kind is refused, never wrapped or rounded.
NaN and infinities travel in JSON as Triton writes and reads them (RapidJSON's NaN, Infinity and
-Infinity, which tritonclient's JSON parser reads too), not as strict JSON's null.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from hetero.errors import HeteroError, InputError, QueueFullError

DATATYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t in [
    ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
    ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
    ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ("BYTES", np.object_)]}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
MAX_RANK = 32  # numpy allows 64; no model has more than a handful
_CHUNK = 1 << 20  # JSON number text parsed this many bytes at a time
_NON_FINITE = re.compile(rb"NaN|Infinity")
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(=])/(?:[^\s/'\"]+/)*[^\s/'\"]+")  # /a/b at a word's start


class ServeError(HeteroError):
    """A request the server refuses; `status` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def public_message(error: BaseException) -> str:
    """What a client is told of an error: its message with every absolute file-system path hidden."""
    return _ABSOLUTE_PATH.sub("<path>", str(error)) or type(error).__name__


def http_status(error: BaseException) -> int:
    if isinstance(error, ServeError):
        return error.status
    if isinstance(error, InputError):
        return 400
    if isinstance(error, QueueFullError):
        return 503
    if isinstance(error, TimeoutError):
        return 504
    if isinstance(error, asyncio.CancelledError):  # an HTTP request the stopping server gave up on
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


def loads(text: bytes | memoryview) -> Any:
    """JSON parsed by orjson, or where it holds NaN, Infinity or -Infinity (which orjson refuses),
    by Python's parser; raises orjson's `JSONDecodeError`."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        if _NON_FINITE.search(text):
            with contextlib.suppress(ValueError, RecursionError):
                return json.loads(bytes(text))
        raise error from None


@dataclass(frozen=True)
class JsonNumbers:
    """The text of a flat JSON array of numbers, left unparsed until its datatype is known, so a big
    request never becomes a list of Python objects (about 32 bytes per number)."""

    text: bytes | memoryview  # between the brackets: "1, 2.5, -3e4"


@dataclass
class InferInput:
    """One input tensor of a request as it arrived: JSON/typed `data` or `raw` bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Sequence[Any] | np.ndarray | JsonNumbers | None = None
    raw: bytes | memoryview | None = None

    def decode(self, where: str) -> np.ndarray:
        """The tensor as a numpy array (BYTES as an object array of str, as ONNX Runtime takes them);
        `ServeError` names the input and what is wrong."""
        where = f"{where}: input {self.name!r}"
        dtype = DATATYPES.get(self.datatype)
        if dtype is None:
            raise ServeError(f"{where}: unknown datatype {self.datatype!r}; datatypes are "
                             f"{', '.join(DATATYPES)}")
        if len(self.shape) > MAX_RANK:
            raise ServeError(f"{where}: shape has rank {len(self.shape)}; at most {MAX_RANK} dims")
        count = math.prod(self.shape)
        if self.raw is not None:
            array = _from_bytes(self.raw, dtype, count, where)
        elif isinstance(self.data, JsonNumbers):
            array = _from_text(self.data.text, dtype, where)
        elif isinstance(self.data, np.ndarray):
            array = convert(self.data, dtype, where)
        elif self.data is not None:
            array = _from_list(self.data, dtype, where)
        else:
            raise ServeError(f"{where}: no data (give 'data' or binary data)")
        if array.size != count:
            raise ServeError(f"{where}: {array.size} data elements, but its shape {list(self.shape)} needs "
                             f"{count}")
        return array.reshape(self.shape)


def _from_bytes(raw: bytes | memoryview, dtype: np.dtype, count: int, where: str) -> np.ndarray:
    if dtype.kind == "O":
        try:
            return _texts(deserialize_bytes_tensor(bytes(raw)), where)
        except Exception:  # struct.error: a length prefix that runs past the end
            raise ServeError(f"{where}: BYTES data is not a sequence of 4-byte little-endian lengths "
                             "each followed by that many bytes") from None
    if len(raw) != count * dtype.itemsize:
        raise ServeError(f"{where}: {len(raw)} bytes of binary data, but shape and datatype need "
                         f"{count} x {dtype.itemsize} = {count * dtype.itemsize}")
    array = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype, copy=False)
    if dtype.kind == "b" and array.view(np.uint8).max(initial=0) > 1:
        raise ServeError(f"{where}: BOOL binary data must be bytes 0 or 1")
    return array


def _texts(items: np.ndarray, where: str) -> np.ndarray:
    """BYTES elements as str (ONNX strings are UTF-8 text)."""
    out = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode()
            except UnicodeDecodeError:
                raise ServeError(f"{where}: BYTES element {index} is not UTF-8 text") from None
        elif not isinstance(item, str):
            raise ServeError(f"{where}: BYTES data must be strings, got {type(item).__name__} at {index}")
        out[index] = item
    return out


def _from_list(data: Sequence[Any], dtype: np.dtype, where: str, *, literals: bool = True) -> np.ndarray:
    """Parsed JSON (or typed contents) as `dtype`; `literals`: true/false may be among the numbers."""
    if dtype.kind == "O":
        try:
            items = np.array(data, dtype=object).ravel()
        except (ValueError, RecursionError) as exc:
            raise ServeError(f"{where}: data is not a regular array: {exc}") from None
        return _texts(items, where)
    try:
        array = np.array(data).ravel()
        # numpy reads true as 1 beside numbers, and ints past int64 beside small ones as float64:
        # look at the Python values themselves then
        if (literals and dtype.kind != "b" and array.dtype.kind in "iuf") or (
                array.dtype.kind == "f" and dtype.kind in "iu"):
            values = np.array(data, dtype=object).ravel()
            if (array.dtype.kind == "f" and dtype.kind in "iu") or any(isinstance(x, bool) for x in values):
                array = values
    except (ValueError, RecursionError, OverflowError) as exc:
        raise ServeError(f"{where}: data is not a regular array: {exc}") from None
    return convert(array, dtype, where)


def _from_text(text: bytes | memoryview, dtype: np.dtype, where: str) -> np.ndarray:
    """Numbers from JSON text, parsed a chunk at a time (orjson) straight into the datatype's array."""
    pieces, start = [], 0
    while start < len(text):
        stop = bytes(text[start + _CHUNK:start + _CHUNK + 64]).find(b",")  # numbers are short
        stop = len(text) if stop < 0 else start + _CHUNK + stop
        try:
            values = loads(b"".join((b"[", text[start:stop], b"]")))
        except orjson.JSONDecodeError as exc:
            raise ServeError(f"{where}: data is not valid JSON: {exc}") from None
        pieces.append(_from_list(values, dtype, where, literals=False))  # the cut text has no letters
        start = stop + 1
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.empty(0, dtype)


def convert(array: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """`array` as `dtype`, refusing values of the wrong kind or outside the datatype's range."""
    name, kind = _NAMES[dtype], array.dtype.kind
    if dtype.kind == "O":
        return _texts(array.ravel(), where)
    if dtype.kind == "b":
        if kind != "b" and array.size:
            raise ServeError(f"{where}: BOOL data must be true or false, got {_sample(array)}")
        return array.astype(dtype, copy=False)
    if kind == "O" and all(isinstance(x, int | float) and not isinstance(x, bool) for x in array.flat):
        if dtype.kind in "iu" and all(isinstance(x, int) for x in array.flat):
            kind = "i"  # Python ints, compared exactly below
        else:
            try:
                array, kind = array.astype(np.float64), "f"
            except OverflowError:
                raise ServeError(f"{where}: a value is outside {name}'s range") from None
    if kind not in "iuf" or (kind == "f" and dtype.kind in "iu" and not _integral(array)):
        what = "numbers" if dtype.kind == "f" else "integers"
        raise ServeError(f"{where}: {name} data must be {what}, got {_sample(array)}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        past = float(info.max) + 1 if kind == "f" else info.max + 1  # floats: 2**63 - 1 rounds to 2**63
        if low < info.min or high >= past:
            raise ServeError(f"{where}: value {low if low < info.min else high} is outside {name}'s range "
                             f"{info.min}..{info.max}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = array.astype(dtype, copy=False)
    if dtype.kind == "f" and kind in "iuf" and array.size:
        overflow = ~np.isfinite(out) & np.isfinite(array)
        if overflow.any():
            raise ServeError(f"{where}: value {array[overflow][0]} is outside {name}'s range "
                             f"(largest {np.finfo(dtype).max})")
    return out


def _integral(array: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.mod(array, 1) == 0))


def _sample(array: np.ndarray) -> str:
    """The first offending-looking value, for messages."""
    for value in array.flat:
        number = isinstance(value, int | float | np.integer | np.floating)
        if not number or isinstance(value, bool | np.bool_):
            return repr(value.item() if isinstance(value, np.generic) else value)[:40]
        if isinstance(value, float | np.floating) and not float(value).is_integer():
            return repr(float(value))
    first = array.flat[0] if array.size else None
    return repr(first.item() if isinstance(first, np.generic) else first)[:40]


def to_bytes(array: np.ndarray) -> bytes:
    """Raw little-endian bytes of a tensor (length-prefixed elements for BYTES)."""
    if array.dtype.kind in "OSU":
        return serialize_byte_tensor(np.asarray(array, dtype=object)).item() if array.size else b""
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()


def to_json(array: np.ndarray) -> np.ndarray | list[Any] | orjson.Fragment:
    """Flat JSON data of a tensor (numbers as a flat array orjson writes, BYTES as UTF-8 text; NaN
    and infinities as Triton writes them, where orjson would write null)."""
    if array.dtype.kind in "OSU":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.ravel()]
    flat = np.ascontiguousarray(array).ravel()
    if flat.dtype.kind != "f" or np.isfinite(flat).all():
        return flat
    pieces = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY).split(b"null")  # one per non-finite
    text = [pieces[0]]
    for value, piece in zip(flat[~np.isfinite(flat)].tolist(), pieces[1:], strict=True):
        text += [b"NaN" if value != value else b"Infinity" if value > 0 else b"-Infinity", piece]
    return orjson.Fragment(b"".join(text))


def dims(shape: Sequence[int | str | None] | None) -> list[int]:
    """A model shape as the protocol shows it: -1 for every dynamic dim."""
    return [d if isinstance(d, int) else -1 for d in (shape or ())]
