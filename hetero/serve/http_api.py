"""The HTTP/REST front end: the KServe v2 endpoints, the binary tensor data, repository and
statistics extensions.

Every error is the protocol's `{"error": "..."}` with a 4xx status naming the field at fault (5xx
only for the server's own failures, and then without details). Bodies are read under a size cap,
a time limit and the server's budget of bytes in flight, so a huge or slow upload costs its
client an error, never the server its memory or its loop. JSON is parsed by orjson; big numeric
`data` arrays are cut out of the text first and parsed a chunk at a time straight into numpy
(off the event loop), so a request never becomes millions of Python objects.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from hetero.errors import HeteroError, ModelError
from hetero.serve.config import describe
from hetero.serve.limits import Reservation
from hetero.serve.protocol import (
    InferInput,
    JsonNumbers,
    ServeError,
    datatype_of,
    http_status,
    loads,
    public_message,
    to_bytes,
    to_json,
)

if TYPE_CHECKING:
    from hetero.serve.server import Server

HEADER_LENGTH = "Inference-Header-Content-Length"
_INLINE_BYTES = 64 << 10  # requests with more JSON are parsed and decoded off the event loop
_SPAN_BYTES = 16 << 10  # numeric data arrays this long are cut out of the JSON before orjson parses it
_TOKENS = re.compile(rb'"data"\s*:\s*\[|"[^"\\]*(?:\\.[^"\\]*)*"')  # a data array's start, or any string
_NUMBERS = re.compile(rb"[-+0-9.eENaInfity,\s]*\]")  # the rest of a flat array of numbers (NaN, Infinity)
_SPAN = "\x00span:"
_INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")

log = logging.getLogger("hetero.serve")


class _IndexRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    ready: StrictBool = False


class _LoadRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    parameters: dict[str, Any] = {}


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


def build_app(server: Server) -> ASGIApp:
    """The server's ASGI app: FastAPI's routing, and a direct path for `POST .../infer`.

    FastAPI's middleware, router and dependency layers cost about 0.5 ms of CPU per request on these
    cores, as much as a small model's inference, so inference requests skip them: matched here, they
    call the same handlers FastAPI would. The infer route stays registered with FastAPI for what only
    it answers (405 with `Allow` for other methods)."""
    app = FastAPI(title="hetero", docs_url=None, redoc_url=None, openapi_url=None)
    public = APIRouter()

    async def authorize(request: Request) -> None:  # async: FastAPI runs a plain def on a worker thread
        server.authorize(request.headers)

    private = APIRouter(dependencies=[Depends(authorize)])

    async def body(request: Request, reservation: Reservation) -> bytes | memoryview:
        """The request body, refused past `max_request_bytes` (413), `body_timeout_s` (408) or the
        server's budget of bytes in flight (503; each byte counts twice, body and decoded tensors).
        A body of declared length is received straight into one buffer (chunks joined afterwards
        would hold it twice), left uninitialised: `bytearray(n)` zero-fills on the event loop,
        ~50 ms per 100 MiB here."""
        limit = server.max_request_bytes
        declared = request.headers.get("content-length", "")
        buffer = None
        if declared.isdigit():  # leading zeros stripped: int() refuses over 4300 digits
            declared = declared.lstrip("0") or "0"
            if len(declared) > 19 or int(declared) > limit:
                raise ServeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
            reservation.grow(2 * int(declared))
            buffer = memoryview(np.empty(int(declared), np.uint8))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(server.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ServeError(f"request body exceeds the limit of {limit} bytes", 413)
                    if buffer is not None:
                        if size > len(buffer):
                            raise ServeError(f"request body runs past its Content-Length {declared}")
                        buffer[size - len(chunk):size] = chunk
                        continue
                    if size > reservation.nbytes // 2:
                        reservation.grow(2 * size - reservation.nbytes)
                    chunks.append(chunk)
        except TimeoutError:
            raise ServeError(f"request body not received within {server.body_timeout_s:g} s", 408) from None
        except ClientDisconnect:
            raise ServeError(f"the client disconnected after {size} bytes of the body") from None
        if buffer is not None:
            if size != int(declared):
                raise ServeError(f"request body of {size} bytes does not match its Content-Length {declared}")
            return buffer
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def small_body(request: Request, schema: type[BaseModel]) -> Any:
        """A small JSON body (repository calls) checked against `schema`; empty is `{}`."""
        with server.budget.reserve(0) as reservation:
            data = await body(request, reservation)
        try:
            return schema.model_validate(_object(data, "request body") if bytes(data).strip() else {})
        except ValidationError as exc:
            raise ServeError(f"request body: {describe(exc, schema)}") from None

    @public.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @public.get("/v2/health/ready")
    async def ready() -> Response:
        is_ready = server.is_ready()
        return _json({"ready": is_ready}, 200 if is_ready else 503)

    @public.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @private.get("/v2/")
    @private.get("/v2")
    async def server_metadata() -> Response:
        return _json(server.metadata())

    def both(router: APIRouter, method: str, suffix: str) -> Callable:
        """Register a handler for the model path with and without `/versions/{version}`."""
        def register(handler: Callable) -> Callable:
            for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
                router.add_api_route(base + suffix, handler, methods=[method])
            return handler
        return register

    @private.get("/v2/models/stats")
    async def all_statistics() -> Response:
        return _json({"model_stats": server.statistics("", "")})

    @both(private, "GET", "/ready")
    async def model_ready(model: str, version: str = "") -> Response:
        try:
            served = server.repository.get(model, version)
        except ServeError as exc:
            return _json({"name": model, "ready": False, "error": str(exc)}, exc.status)
        return _json({"name": served.name, "version": served.version, "ready": True})

    @both(private, "GET", "")
    async def model_metadata(model: str, version: str = "") -> Response:
        served = server.repository.get(model, version)
        return _json(served.metadata(server.repository.versions(model)))

    @both(private, "GET", "/config")
    async def model_config(model: str, version: str = "") -> Response:
        return _json(server.repository.get(model, version).triton_config())

    @both(private, "GET", "/stats")
    async def model_statistics(model: str, version: str = "") -> Response:
        return _json({"model_stats": server.statistics(model, version)})

    @both(private, "POST", "/infer")
    async def infer(request: Request, model: str, version: str = "") -> Response:
        with server.budget.reserve(0) as reservation:
            data = await body(request, reservation)
            header_length = request.headers.get(HEADER_LENGTH)
            offload = _json_bytes(len(data), header_length) > _INLINE_BYTES
            if offload:
                header, inputs = await asyncio.to_thread(_parse, data, header_length)
            else:
                header, inputs = _parse(data, header_length)
            wanted, binary_outputs = _outputs(header)
            served, results = await server.infer("http", model, version, inputs, wanted,
                                                 timeout_s=_timeout(header), offload=offload)
            return _response(served.name, served.version, header.get("id"), results, binary_outputs)

    @private.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        ready_only = (await small_body(request, _IndexRequest)).ready
        return _json(server.repository.index(ready_only=ready_only))

    @private.post("/v2/repository/models/{model}/load")
    async def load(request: Request, model: str) -> Response:
        parameters = (await small_body(request, _LoadRequest)).parameters
        if parameters:
            raise ServeError(f"load parameters are not supported (got {', '.join(map(repr, parameters))}); "
                             f"edit the repository's {model}/config.yaml instead")
        try:
            await asyncio.to_thread(server.repository.load, model)
        except ModelError as exc:  # the repository's fault, not the server's: a 400, as Triton says
            raise ServeError(str(exc)) from None
        return _json({})

    @private.post("/v2/repository/models/{model}/unload")
    async def unload(request: Request, model: str) -> Response:
        await small_body(request, _LoadRequest)
        await asyncio.to_thread(server.repository.unload, model)
        return _json({})

    app.include_router(public)
    app.include_router(private)

    @app.exception_handler(HeteroError)
    async def refused(request: Request, exc: HeteroError) -> Response:
        status = http_status(exc)  # a 408 closes the connection (RFC 9110): its client could dribble on
        closing = {"connection": "close"} if status == 408 else None
        return _json({"error": public_message(exc)}, status, closing)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _json({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code,
                     exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        return _json({"error": f"internal error ({type(exc).__name__}); the server log has the details"}, 500)

    async def routed(scope: Scope, receive: Receive, send: Send) -> None:
        found = _INFER.fullmatch(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if found is None:
            await app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await authorize(request)
            response = await infer(request, found["model"], found["version"] or "")
        except HeteroError as exc:
            response = await refused(request, exc)
        except asyncio.CancelledError:  # the server is stopping and its shutdown timeout passed first
            response = _json({"error": "the server stopped before answering (its shutdown timeout passed)"},
                             503, {"connection": "close"})
        except Exception as exc:
            log.error("internal error", exc_info=exc, extra={"fields": {"path": scope["path"]}})
            response = await crashed(request, exc)
        await response(scope, receive, send)

    return routed


def _object(data: bytes | memoryview, where: str) -> dict[str, Any]:
    try:
        value = loads(data)
    except orjson.JSONDecodeError as exc:
        raise ServeError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ServeError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _cut_numbers(text: memoryview) -> tuple[bytes | memoryview, list[memoryview]]:
    """The JSON with every long flat numeric `data` array replaced by a placeholder string, and the
    arrays' text (between the brackets). Strings are skipped whole, so a `"data": [` inside one is
    never taken for an array."""
    pieces: list[bytes | memoryview] = []
    spans: list[memoryview] = []
    done = position = 0
    while found := _TOKENS.search(text, position):
        position = found.end()
        if not found.group().endswith(b"["):
            continue
        numbers = _NUMBERS.match(text, position)
        if numbers is None or numbers.end() - position < _SPAN_BYTES:
            continue
        pieces += [text[done:position - 1], orjson.dumps(f"{_SPAN}{len(spans)}")]
        spans.append(text[position:numbers.end() - 1])
        done = position = numbers.end()
    if not spans:
        return text, spans
    return b"".join([*pieces, text[done:]]), spans


def _json_bytes(size: int, header_length: str | None) -> int:
    """Bytes of JSON in a body of `size` bytes: all of them, or only the header when tensors come as
    binary data (which decode without parsing, so need no thread of their own)."""
    if header_length is not None and header_length.isdigit() and len(header_length) < 19:
        return min(size, int(header_length))
    return size


def _parse(data: bytes | memoryview, header_length: str | None) -> tuple[dict[str, Any], list[InferInput]]:
    """The JSON header and the inputs (binary tensor data extension: the header's length given)."""
    view = memoryview(data)
    if header_length is None:
        head, binary = view, view[:0]
    elif header_length.isdigit() and 0 < int(header_length) <= len(data):
        head, binary = view[:int(header_length)], view[int(header_length):]
    else:
        raise ServeError(f"header {HEADER_LENGTH}: {header_length!r} must be an integer in 1..{len(data)} "
                         "(the body's length)")
    text, spans = _cut_numbers(head) if len(head) > _SPAN_BYTES else (head, [])
    header = _object(text, "inference request" if header_length is None else "inference request header")
    return header, _inputs(header, binary, spans)


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise ServeError(f"{where}: missing field {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ServeError(f"{where}.{key} must be {names}, got {orjson.dumps(value).decode()[:80]}")
    return value


def _inputs(header: dict[str, Any], binary: memoryview, spans: list[memoryview]) -> list[InferInput]:
    tensors = _get(header, "inputs", list, "inference request")
    inputs, offset = [], 0
    for index, tensor in enumerate(tensors):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise ServeError(f"{where} must be a JSON object")
        name = _get(tensor, "name", str, where)
        where = f"{where} ({name!r})"
        shape = _get(tensor, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ServeError(f"{where}.shape must be a list of non-negative integers, got "
                             f"{orjson.dumps(shape).decode()[:80]}")
        datatype = _get(tensor, "datatype", str, where)
        parameters = _get(tensor, "parameters", dict, where, {})
        size = _get(parameters, "binary_data_size", int, f"{where}.parameters", None)
        if size is None:
            data = _get(tensor, "data", (list, str), where)
            if isinstance(data, str):
                if not (data.startswith(_SPAN) and data[len(_SPAN):].isdigit()
                        and int(data[len(_SPAN):]) < len(spans)):
                    raise ServeError(f"{where}.data must be a list, got a string")
                data = JsonNumbers(spans[int(data[len(_SPAN):])])
            inputs.append(InferInput(name, datatype, tuple(shape), data=data))
            continue
        if size < 0 or offset + size > len(binary):
            raise ServeError(f"{where}.parameters.binary_data_size {size} runs past the binary data "
                             f"({len(binary) - offset} bytes left)")
        inputs.append(InferInput(name, datatype, tuple(shape), raw=binary[offset:offset + size]))
        offset += size
    if offset != len(binary):
        raise ServeError(f"{len(binary) - offset} bytes of binary data after the inputs' binary_data_size "
                         "add up")
    return inputs


def _parameters(header: dict[str, Any]) -> dict[str, Any]:
    return _get(header, "parameters", dict, "inference request", {})


def _timeout(header: dict[str, Any]) -> float | None:
    """The request's `timeout` parameter (microseconds, as tritonclient sends it; 0: none) in seconds."""
    micros = _get(_parameters(header), "timeout", int, "parameters", 0)
    if micros < 0:
        raise ServeError(f"parameters.timeout must be microseconds >= 0, got {micros}")
    return micros / 1e6 or None


def _outputs(header: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool] | bool]:
    """Requested output names (None: all) and which come back as binary data."""
    default = _get(_parameters(header), "binary_data_output", bool, "parameters", False)
    requested = _get(header, "outputs", list, "inference request", None)
    if not requested:
        return None, default
    names, binary = [], {}
    for index, output in enumerate(requested):
        where = f"outputs[{index}]"
        if not isinstance(output, dict):
            raise ServeError(f"{where} must be a JSON object")
        name = _get(output, "name", str, where)
        names.append(name)
        binary[name] = _get(_get(output, "parameters", dict, where, {}), "binary_data", bool,
                            f"{where}.parameters", default)
    return names, binary


def _response(model: str, version: str, request_id: Any, results: dict[str, np.ndarray],
              binary: dict[str, bool] | bool) -> Response:
    outputs, blobs = [], []
    for name, value in results.items():
        array = np.asarray(value)
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype, f"output {name!r}"),
                                 "shape": list(array.shape)}
        if binary if isinstance(binary, bool) else binary.get(name, False):
            blobs.append(to_bytes(array))
            entry["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            entry["data"] = to_json(array)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        head["id"] = request_id
    text = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(b"".join([text, *blobs]), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})
