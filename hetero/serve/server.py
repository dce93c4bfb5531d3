"""One process serving a model repository over HTTP/REST (an asyncio event loop) and gRPC (a
thread pool, one thread per call in progress).

The loop runs in a thread of its own, so the caller (the CLI's main thread, a test) keeps its
signals and can stop the server from outside. Stopping is graceful: both listeners stop taking
new requests, the requests in flight finish, then every model finishes its queue and unloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import uvicorn
from tritonclient.grpc import service_pb2_grpc

import hetero
from hetero.runtime.replanning import serving_pool
from hetero.serve.grpc_api import InferenceService
from hetero.serve.http_api import build_app
from hetero.serve.limits import ByteBudget, HttpProtocol
from hetero.serve.metrics import Metrics
from hetero.serve.protocol import InferInput, ServeError, http_status
from hetero.serve.repository import PoolBuilder, Repository, ServedModel

log = logging.getLogger("hetero.serve")

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]
MiB = 1 << 20


class Server:
    """A KServe v2 / Open Inference Protocol server for the models under `repository`.

    Ports may be 0 (any free port); `http_port` and `grpc_port` hold the bound ones after `start`.
    With `api_key`, every call but server health (live, ready) and metrics needs `Authorization:
    Bearer KEY` or `api-key: KEY` (HTTP header or gRPC metadata).

    Limits: `max_request_bytes` per request body (413 beyond); `max_inflight_bytes` across all
    requests, each counting twice its body (503 beyond); `max_connections` open HTTP connections
    and gRPC calls in progress (default: half the process's file limit, at most 1024); request
    headers within `header_timeout_s`, the body within `body_timeout_s` (408); idle connections
    closed after `idle_timeout_s`. `build_pool` makes each model's replica pool (default: on this
    host's devices; `hetero.ray.serving.ClusterServer` builds them on a Ray cluster).
    """

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, api_key: str | None = None, max_request_bytes: int = 64 * MiB,
                 max_inflight_bytes: int = 1024 * MiB, max_connections: int | None = None,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, idle_timeout_s: float = 60.0,
                 shutdown_timeout_s: float = 30.0, build_pool: PoolBuilder = serving_pool):
        self.metrics = Metrics()
        self.repository = Repository(repository, self.metrics, build_pool)
        self.host, self.http_port, self.grpc_port = host, http_port, grpc_port
        self.api_key = api_key or None
        self.max_request_bytes = max_request_bytes
        self.budget = ByteBudget(max_inflight_bytes)
        self.max_connections = max_connections or max(16, min(1024, resource.getrlimit(
            resource.RLIMIT_NOFILE)[0] // 2))
        self.header_timeout_s, self.body_timeout_s = header_timeout_s, body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.ready = False
        self._thread: threading.Thread | None = None
        self._grpc: grpc.Server | None = None
        self._grpc_workers: ThreadPoolExecutor | None = None  # the gRPC calls' threads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Server:
        """Load every model in the repository, then listen; returns once both listeners are up."""
        self.repository.load_all()
        try:
            self._grpc = self._grpc_server()
        except BaseException:
            self.repository.close()
            raise
        started: Future = Future()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(started)), name="hetero-serve")
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            self._grpc.stop(None)
            self._grpc_workers.shutdown(wait=False)
            self.repository.close()
            raise
        self._grpc.start()
        self.ready = True
        log.info("serving", extra={"fields": {"http": f"{self.host}:{self.http_port}",
                                              "grpc": f"{self.host}:{self.grpc_port}",
                                              "models": [m.label for m in self.repository.ready()]}})
        return self

    def stop(self) -> None:
        """Stop listening, finish the requests in flight and queued, unload every model. Thread-safe."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None or self._stop is None or self._grpc is None:
            return
        self.ready = False
        deadline = time.monotonic() + self.shutdown_timeout_s
        self._loop.call_soon_threadsafe(self._stop.set)
        stopped = self._grpc.stop(self.shutdown_timeout_s)
        thread.join()
        stopped.wait(max(0.0, deadline - time.monotonic()))
        self._grpc_workers.shutdown(wait=False)  # grpcio leaves the pool it was given running
        self.repository.close(max(0.0, deadline - time.monotonic()))
        log.info("stopped")

    def serve_forever(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully."""
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        self.start()
        while not stopping.wait(0.5):
            pass
        log.info("stopping on signal")
        self.stop()

    def _grpc_server(self) -> grpc.Server:
        """The gRPC listener, bound and not yet started: one pool thread per call in progress."""
        self._grpc_workers = ThreadPoolExecutor(self.max_connections, thread_name_prefix="hetero-grpc")
        rpc = grpc.server(self._grpc_workers, maximum_concurrent_rpcs=self.max_connections, options=[
            ("grpc.max_receive_message_length", self.max_request_bytes),
            ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1e3))])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(self), rpc)
        try:
            self.grpc_port = rpc.add_insecure_port(f"{self.host}:{self.grpc_port}")
        except RuntimeError as exc:
            rpc.stop(None)
            self._grpc_workers.shutdown(wait=False)
            raise OSError(f"cannot listen for gRPC on {self.host}:{self.grpc_port}: {exc}") from None
        return rpc

    async def _main(self, started: Future) -> None:
        """The HTTP listener on this thread's event loop, until `stop`."""
        self._loop = asyncio.get_running_loop()
        self._results = _Results(self._loop)
        self._loop.set_exception_handler(_QuietErrors().handle)
        self._stop = asyncio.Event()
        try:
            try:
                sock = socket.create_server((self.host, self.http_port), family=socket.AF_INET6
                                            if ":" in self.host else socket.AF_INET)
            except OSError as exc:
                raise OSError(f"cannot listen for HTTP on {self.host}:{self.http_port}: {exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it
            self.http_port = sock.getsockname()[1]
            protocol = functools.partial(HttpProtocol, max_connections=self.max_connections,
                                         header_timeout_s=self.header_timeout_s)
            config = uvicorn.Config(build_app(self), http=protocol, log_config=None, access_log=False,
                                    lifespan="off", timeout_keep_alive=int(max(1, self.idle_timeout_s)),
                                    timeout_graceful_shutdown=self.shutdown_timeout_s)
            http = uvicorn.Server(config)
            serving = asyncio.create_task(http.serve(sockets=[sock]))
            while not http.started and not serving.done():
                await asyncio.sleep(0.01)
            if serving.done():
                raise RuntimeError(f"the HTTP listener on {self.host}:{self.http_port} did not start")
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(None)
        await self._stop.wait()
        http.should_exit = True
        await serving

    def authorize(self, headers: Mapping[str, str]) -> None:
        """Raise a 401 unless the headers (lower-case names) carry the API key, when one is set."""
        if self.api_key is None:
            return
        bearer = headers.get("authorization", "")
        given = bearer[7:] if bearer[:7].lower() == "bearer " else headers.get("api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ServeError("missing or wrong API key: send 'Authorization: Bearer KEY' or 'api-key: KEY'",
                             401)

    def metadata(self) -> dict:
        return {"name": "hetero", "version": hetero.__version__, "extensions": EXTENSIONS}

    def is_ready(self) -> bool:
        """Listening, and every model that should be loaded is ready."""
        return self.ready and self.repository.all_ready()

    def statistics(self, name: str, version: str) -> list[dict]:
        """The statistics extension's entries: every loaded model version, or those of `name`."""
        if name:
            self.repository.get(name, version)  # 404 or 503 for a model or version not served
            versions = [version] if version else self.repository.versions(name)
            models = [self.repository.get(name, v) for v in versions]
        else:
            models = self.repository.ready()
        return [m.stats.statistics() for m in models]

    async def infer(self, protocol: str, name: str, version: str, inputs: Sequence[InferInput],
                    outputs: Sequence[str] | None, *, timeout_s: float | None = None,
                    offload: bool = False) -> tuple[ServedModel, dict[str, np.ndarray]]:
        """Run one request on a served model within `timeout_s` (504 past it; a request still queued
        then is dropped); `offload` decodes its tensors off the event loop. Counts the request and
        logs one line, whatever the outcome."""
        with self._accounted(protocol, name, version, timeout_s) as entry:
            deadline = asyncio.timeout(timeout_s)
            try:
                async with deadline:
                    served = entry.served = self.repository.get(name, version)
                    decoded = await asyncio.to_thread(served.decode, inputs, outputs) if offload else \
                        served.decode(inputs, outputs)
                    return served, await self._results.wait(served.submit(*decoded))
            except TimeoutError:
                if deadline.expired():
                    raise _past(name, timeout_s) from None
                raise

    def infer_blocking(self, protocol: str, name: str, version: str, inputs: Sequence[InferInput],
                       outputs: Sequence[str] | None, *, timeout_s: float | None = None,
                       on_end: Callable[[Callable[[], None]], object] = lambda _: None,
                       ) -> tuple[ServedModel, dict[str, np.ndarray]]:
        """`infer` for a caller on a thread of its own (a gRPC call): waits for the answer there.
        `on_end` registers a callback for when the call ends (the client cancelled it, went away or
        its deadline passed), returning False if the call is already over: the request is then
        cancelled (dropped if still queued) and this returns at once."""
        expires = None if timeout_s is None else time.monotonic() + timeout_s
        with self._accounted(protocol, name, version, timeout_s) as entry:
            served = entry.served = self.repository.get(name, version)
            future = served.submit(*served.decode(inputs, outputs))
            settled = threading.Event()
            future.add_done_callback(lambda _: settled.set())

            def ended() -> None:
                future.cancel()
                settled.set()
            if on_end(ended) is False:
                ended()
            settled.wait(timeout_s)
            if not future.done() or future.cancelled():
                future.cancel()
                if expires is not None and time.monotonic() >= expires:
                    raise _past(name, timeout_s)
                raise ServeError(f"model {name!r}: the call ended before its answer (its client "
                                 "cancelled it, or the server is stopping)", 499)
            return served, future.result()

    @contextlib.contextmanager
    def _accounted(self, protocol: str, name: str, version: str, timeout_s: float | None
                   ) -> Iterator[SimpleNamespace]:
        """Time one request, count it in its model's statistics and log one line, however it ends;
        the caller sets `served` once it knows the model."""
        start = time.perf_counter()
        entry = SimpleNamespace(served=None)
        error: BaseException | None = None
        try:
            yield entry
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - start
            served = entry.served
            if served is not None:
                served.stats.request(seconds, error is None)
            if log.isEnabledFor(logging.INFO):
                fields = {"protocol": protocol, "model": name,
                          "version": served.version if served else version,
                          "status": 200 if error is None else http_status(error),
                          "latency_ms": round(seconds * 1e3, 3)}
                if error is not None:
                    fields["error"] = str(error) or type(error).__name__
                log.info("infer", extra={"fields": fields})


def _past(name: str, timeout_s: float | None) -> ServeError:
    return ServeError(f"model {name!r}: no answer within the request's timeout of "
                      f"{(timeout_s or 0) * 1e3:g} ms", 504)


class _Results:
    """Results handed from the model's threads to the event loop, one loop wakeup per burst (the
    requests of a batch finish together) rather than one per request as `asyncio.wrap_future` does.
    Cancelling the awaited future cancels the request (dropped if it is still queued)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._done: list[tuple[asyncio.Future, Future]] = []
        self._lock = threading.Lock()

    def wait(self, future: Future) -> asyncio.Future:
        waiter = self.loop.create_future()
        waiter.add_done_callback(lambda _: future.cancel() if waiter.cancelled() else None)
        future.add_done_callback(lambda _: self._finished(waiter, future))
        return waiter

    def _finished(self, waiter: asyncio.Future, future: Future) -> None:
        with self._lock:
            self._done.append((waiter, future))
            first = len(self._done) == 1
        if first:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody awaits the result any more
                self.loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            done, self._done = self._done, []
        for waiter, future in done:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
            elif future.exception() is not None:
                waiter.set_exception(future.exception())
            else:
                waiter.set_result(future.result())


class _QuietErrors:
    """The event loop's handler for errors nothing awaited (a failed accept when out of file
    descriptors, a connection reset): one line each, at most one a second, never a traceback."""

    def __init__(self) -> None:
        self.last = 0.0
        self.dropped = 0

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        now = time.monotonic()
        if now - self.last < 1.0:
            self.dropped += 1
            return
        error = context.get("exception")
        log.warning("event loop error", extra={"fields": {
            "message": context.get("message", ""), "dropped": self.dropped,
            "error": f"{type(error).__name__}: {error}" if error else ""}})
        self.last, self.dropped = now, 0
