"""A small HTTP/1.1 server (asyncio + the httptools parser) in which every byte and every wait
of a stranger is bounded.

Why not uvicorn: it has no deadline for reading a request's head (a connection that sends
half a header is kept forever), no limit on the head's size with httptools (a 64 MiB header
was accepted), and its only concurrency limit answers 503 to everyone once slow connections
fill it. Here:

- a connection must deliver a complete request head within HEAD_TIMEOUT of connecting (or of
  the first byte of a later request), and its body within BODY_TIMEOUT; heads are at most
  MAX_HEAD_BYTES in MAX_HEADERS fields, bodies at most the handler's limit, pipelining at
  most MAX_PIPELINED requests deep; an answer the client does not read within WRITE_TIMEOUT
  ends the connection. Memory per unauthenticated connection is therefore bounded.
- at most `max_connections` connections, and `max_per_source` from one source (an IPv4
  address or an IPv6 /64; trusted proxies are exempt). When the table is full, the
  connection that has waited longest without delivering a request is dropped to make room,
  so slow connections cannot lock out fast ones.
- TLS runs on the bytes an accepted connection receives (tlswire.py), so handshakes count
  against the same limits and deadlines.
- a handler that raises answers a JSON 500, logs one line and is counted; nothing else of
  the connection or the server is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from kubespan.discovery.httpconn import Connection
from kubespan.discovery.httpwire import (
    JSON,
    Handler,
    HttpLimits,
    Request,
    Response,
    TransportCounters,
    encode_response,
    error_body,
)

__all__ = [
    "JSON",
    "Handler",
    "HttpLimits",
    "HttpServer",
    "Request",
    "Response",
    "TransportCounters",
    "encode_response",
    "error_body",
    "tune_loop",
]


class HttpServer:
    """Serves `handler` on listening sockets; `exempt(peer)` tells trusted proxies, whose
    connections carry many clients and are not limited per source."""

    def __init__(
        self,
        handler: Handler,
        http_limits: HttpLimits,
        exempt: Callable[[str], bool] = lambda _peer: False,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "api",
    ) -> None:
        self.handler = handler
        self.limits = http_limits
        self.exempt = exempt
        self.ssl_context = ssl_context
        self.name = name
        self.counters = TransportCounters()
        self.connections: set[Connection] = set()
        self._waiting: OrderedDict[Connection, None] = OrderedDict()
        self._per_source: Counter[str] = Counter()
        self._servers: list[asyncio.AbstractServer] = []
        self.closing = False

    async def listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Connection(self), sock=sock, backlog=1024)
        self._servers.append(server)

    @property
    def waiting(self) -> int:
        """Connections that have not delivered a complete request (new, slow or idle)."""
        return len(self._waiting)

    # --- the connection table --------------------------------------------------------------

    def _admit(self, connection: Connection) -> bool:
        if self.closing:
            return False
        source = connection.source
        if source is not None and self._per_source[source] >= self.limits.max_per_source:
            self.counters.refused["per_source"] += 1
            return False
        if len(self.connections) >= self.limits.max_connections:
            if not self._waiting:
                self.counters.refused["full"] += 1
                return False
            oldest, _ = self._waiting.popitem(last=False)
            self.counters.refused["evicted"] += 1
            oldest.abort()
        self.connections.add(connection)
        if source is not None:
            self._per_source[source] += 1
        return True

    def _gone(self, connection: Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self._waiting.pop(connection, None)
        source = connection.source
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def _set_waiting(self, connection: Connection, waiting: bool, first: bool = False) -> None:
        if waiting:
            self._waiting[connection] = None
            self._waiting.move_to_end(connection, last=not first)
        else:
            self._waiting.pop(connection, None)

    # --- shutdown ----------------------------------------------------------------------------

    async def close(self, grace: float) -> None:
        """Stop accepting, close connections that wait for a request, let requests being
        handled finish for up to `grace` seconds, then cut whatever is left."""
        self.closing = True
        for server in self._servers:
            server.close()
        for connection in list(self._waiting):
            connection.close()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def tune_loop() -> Any:
    """uvloop when installed (faster accept and parse paths), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
