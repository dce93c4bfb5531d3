"""What one server lets all its clients hold at once: connections, request bytes, time to send headers.

Limits answer early and cheaply (a 503 before a body is read, a closed idle socket), so a flood of
connections or of large bodies costs the clients that send them an error, never the server its
file descriptors, its memory or its other clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hetero.serve.protocol import ServeError


class ByteBudget:
    """Bytes of request data held across all requests; a reservation past the budget is refused (503).

    Thread-safe (the HTTP and gRPC front ends share one). Each request reserves twice its body: the
    body itself and the tensors decoded from it, for as long as it is served.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> Reservation:
        """A reservation of `nbytes` (release it, or use it as a context manager); `ServeError` 503 when
        the budget cannot hold it."""
        reservation = Reservation(self)
        reservation.grow(nbytes)
        return reservation


class Reservation:
    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        budget = self.budget
        with budget._lock:
            if budget.held + nbytes > budget.limit:
                raise ServeError(f"the server holds {budget.held} bytes of requests; {nbytes} more would "
                                 f"exceed its budget of {budget.limit} bytes (max_inflight_bytes); try again "
                                 "later", 503)
            budget.held += nbytes
            self.nbytes += nbytes

    def release(self) -> None:
        with self.budget._lock:
            self.budget.held -= self.nbytes
            self.nbytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_REFUSED = b'{"error":"too many open connections; try again later"}'
_TIMED_OUT = b'{"error":"request headers not received in time"}'


def _response(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with TCP_NODELAY, a cap on open connections and a time limit on
    each request's headers (a connection that sends nothing, or dribbles its headers, is closed)."""

    def __init__(self, *args: Any, max_connections: int, header_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else Nagle meets delayed ACK: 40 ms
        if len(self.connections) >= self.max_connections:
            self.transport = transport
            transport.write(_response(b"503 Service Unavailable", _REFUSED))
            transport.close()
            return
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        if self._header_timer is None:
            self._start_header_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        """The HTTP parser's refusal (a malformed request line, header or body framing) as the
        protocol's JSON error, not uvicorn's plain text."""
        self.transport.write(_response(b"400 Bad Request", json.dumps({"error": msg}).encode()))
        self.transport.close()

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined request is still being answered; the body's own time limit applies
        if not self.transport.is_closing():
            self.transport.write(_response(b"408 Request Timeout", _TIMED_OUT))
            self.transport.close()
