"""The HTTP/REST front end: the KServe v2 endpoints, the binary tensor data and repository extensions.

Every error is the protocol's `{"error": "..."}` with a 4xx status naming the field at fault (5xx
only for the server's own failures). Bodies are read under a size cap and a time limit, so a huge
or slow upload costs one connection an error, never the server its memory or its loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from hetero.errors import HeteroError, ModelError
from hetero.serve.protocol import InferInput, ServeError, datatype_of, http_status, to_bytes, to_list

if TYPE_CHECKING:
    from hetero.serve.server import Server

HEADER_LENGTH = "Inference-Header-Content-Length"
_INLINE_BYTES = 1 << 20  # bigger requests are parsed off the event loop (JSON data is slow to read)


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="hetero", docs_url=None, redoc_url=None, openapi_url=None)
    public = APIRouter()

    def authorize(request: Request) -> None:
        server.authorize(request.headers)

    private = APIRouter(dependencies=[Depends(authorize)])

    async def body(request: Request) -> bytes:
        """The request body, refused past `max_request_bytes` (413) or `body_timeout_s` (408)."""
        limit = server.max_request_bytes
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > limit:
            raise ServeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(server.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ServeError(f"request body exceeds the limit of {limit} bytes", 413)
                    chunks.append(chunk)
        except TimeoutError:
            raise ServeError(f"request body not received within {server.body_timeout_s:g} s", 408) from None
        except ClientDisconnect:
            raise ServeError(f"the client disconnected after {size} bytes of the body") from None
        return b"".join(chunks)

    async def json_body(request: Request) -> dict[str, Any]:
        data = await body(request)
        return _object(data, "request body") if data.strip() else {}

    @public.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @public.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": server.ready}, 200 if server.ready else 503)

    @public.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @private.get("/v2")
    async def server_metadata() -> dict:
        return server.metadata()

    def both(router: APIRouter, method: str, suffix: str) -> Callable:
        """Register a handler for the model path with and without `/versions/{version}`."""
        def register(handler: Callable) -> Callable:
            for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
                router.add_api_route(base + suffix, handler, methods=[method])
            return handler
        return register

    @both(public, "GET", "/ready")
    async def model_ready(model: str, version: str = "") -> Response:
        try:
            served = server.repository.get(model, version)
        except ServeError as exc:
            return JSONResponse({"name": model, "ready": False, "error": str(exc)}, exc.status)
        return JSONResponse({"name": served.name, "version": served.version, "ready": True})

    @both(private, "GET", "")
    async def model_metadata(model: str, version: str = "") -> dict:
        served = server.repository.get(model, version)
        return served.metadata(server.repository.versions(model))

    @both(private, "GET", "/config")
    async def model_config(model: str, version: str = "") -> dict:
        return server.repository.get(model, version).triton_config()

    @both(private, "POST", "/infer")
    async def infer(request: Request, model: str, version: str = "") -> Response:
        data = await body(request)
        parse = functools.partial(_parse, data, request.headers.get(HEADER_LENGTH))
        header, inputs = await asyncio.to_thread(parse) if len(data) > _INLINE_BYTES else parse()
        wanted, binary_outputs = _outputs(header)
        served, results = await server.infer("http", model, version, inputs, wanted)
        return _response(served.name, served.version, header.get("id"), results, binary_outputs)

    @private.post("/v2/repository/index")
    async def repository_index(request: Request) -> list:
        ready_only = (await json_body(request)).get("ready", False)
        return server.repository.index(ready_only=ready_only is True)

    @private.post("/v2/repository/models/{model}/load")
    async def load(request: Request, model: str) -> dict:
        parameters = (await json_body(request)).get("parameters") or {}
        if parameters:
            raise ServeError(f"load parameters are not supported (got {', '.join(map(repr, parameters))}); "
                             f"edit the repository's {model}/config.yaml instead")
        try:
            await asyncio.to_thread(server.repository.load, model)
        except ModelError as exc:  # the repository's fault, not the server's: a 400, as Triton says
            raise ServeError(str(exc)) from None
        return {}

    @private.post("/v2/repository/models/{model}/unload")
    async def unload(request: Request, model: str) -> dict:
        await json_body(request)
        await asyncio.to_thread(server.repository.unload, model)
        return {}

    app.include_router(public)
    app.include_router(private)

    @app.exception_handler(HeteroError)
    async def refused(request: Request, exc: HeteroError) -> Response:
        return JSONResponse({"error": str(exc)}, http_status(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    return app


def _object(data: bytes | memoryview, where: str) -> dict[str, Any]:
    try:
        value = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ServeError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _parse(data: bytes, header_length: str | None) -> tuple[dict[str, Any], list[InferInput]]:
    header, binary = _split(data, header_length)
    return header, _inputs(header, binary)


def _split(data: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary tensor data after it (binary tensor data extension)."""
    if header_length is None:
        return _object(data, "inference request"), memoryview(b"")
    if not header_length.isdigit() or not 0 < int(header_length) <= len(data):
        raise ServeError(f"header {HEADER_LENGTH}: {header_length!r} must be an integer in 1..{len(data)} "
                         "(the body's length)")
    size = int(header_length)
    return _object(memoryview(data)[:size], "inference request header"), memoryview(data)[size:]


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in obj:
        if default is ...:
            raise ServeError(f"{where}: missing field {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ServeError(f"{where}.{key} must be {names}, got {json.dumps(value)[:80]}")
    return value


def _inputs(header: dict[str, Any], binary: memoryview) -> list[InferInput]:
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
            raise ServeError(f"{where}.shape must be a list of non-negative integers, got {shape}")
        datatype = _get(tensor, "datatype", str, where)
        parameters = _get(tensor, "parameters", dict, where, {})
        size = _get(parameters, "binary_data_size", int, f"{where}.parameters", None)
        if size is None:
            try:
                data = np.array(_get(tensor, "data", list, where))
            except ValueError as exc:
                raise ServeError(f"{where}.data is not a regular array: {exc}") from None
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


def _outputs(header: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool] | bool]:
    """Requested output names (None: all) and which come back as binary data."""
    default = _get(_get(header, "parameters", dict, "inference request", {}), "binary_data_output", bool,
                   "parameters", False)
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
            entry["data"] = to_list(array)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:
        head["id"] = request_id
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(text, media_type="application/json")
    return Response(text + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(text))})
