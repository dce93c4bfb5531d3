"""The gRPC front end: KServe v2's GRPCInferenceService, with the messages tritonclient ships.

Health calls are open; the rest check the API key in the call's metadata. Errors end the call
with the status code matching the HTTP one (400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from hetero.errors import ModelError
from hetero.serve.protocol import DATATYPES, InferInput, ServeError, datatype_of, http_status, to_bytes

if TYPE_CHECKING:
    from hetero.serve.server import Server

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
          404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _rpc(*, open_: bool = False) -> Callable[[Handler], Handler]:
    """Check the API key (unless open) and turn errors into the matching status code."""
    def wrap(method: Handler) -> Handler:
        @functools.wraps(method)
        async def call(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if not open_:
                    self.server.authorize(dict(context.invocation_metadata() or ()))
                return await method(self, request, context)
            except Exception as exc:
                await context.abort(_CODES.get(http_status(exc), grpc.StatusCode.INTERNAL), str(exc))
        return call
    return wrap


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, server: Server):
        self.server = server

    @_rpc(open_=True)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc(open_=True)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server.ready)

    @_rpc(open_=True)
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.server.repository.get(request.name, request.version)
        except ServeError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.server.metadata())

    @_rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        served = self.server.repository.get(request.name, request.version)
        return pb.ModelMetadataResponse(**served.metadata(self.server.repository.versions(request.name)))

    @_rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        served = self.server.repository.get(request.name, request.version)
        return pb.ModelConfigResponse(config=served.config_proto())

    @_rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        served, results = await self.server.infer("grpc", request.model_name, request.model_version,
                                                  _inputs(request), [o.name for o in request.outputs] or None)
        response = pb.ModelInferResponse(model_name=served.name, model_version=served.version, id=request.id)
        for name, array in results.items():
            response.outputs.add(name=name, datatype=datatype_of(array.dtype, f"output {name!r}"),
                                 shape=array.shape)
            response.raw_output_contents.append(to_bytes(array))
        return response

    @_rpc()
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Any) -> pb.RepositoryIndexResponse:
        entries = self.server.repository.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e)
                                                  for e in entries])

    @_rpc()
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise ServeError(f"load parameters are not supported (got {', '.join(request.parameters)}); edit "
                             f"the repository's {request.model_name}/config.yaml instead")
        try:
            await asyncio.to_thread(self.server.repository.load, request.model_name)
        except ModelError as exc:
            raise ServeError(str(exc)) from None
        return pb.RepositoryModelLoadResponse()

    @_rpc()
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        await asyncio.to_thread(self.server.repository.unload, request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _inputs(request: pb.ModelInferRequest) -> list[InferInput]:
    """Inputs from raw_input_contents (one per input, in order) or each input's typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise ServeError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give "
                         "one per input or none")
    inputs = []
    for index, tensor in enumerate(request.inputs):
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise ServeError(f"inputs[{index}] ({tensor.name!r}).shape must be non-negative, "
                             f"got {list(shape)}")
        if raw:
            inputs.append(InferInput(tensor.name, tensor.datatype, shape, raw=raw[index]))
            continue
        field = _CONTENTS.get(tensor.datatype)
        if field is None and tensor.datatype in DATATYPES:
            raise ServeError(f"inputs[{index}] ({tensor.name!r}): datatype {tensor.datatype} has no typed "
                             "contents; send it in raw_input_contents")
        data = getattr(tensor.contents, field) if field else ()  # an unknown datatype fails when decoded
        inputs.append(InferInput(tensor.name, tensor.datatype, shape, data=data))
    return inputs
