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
- TLS is started on an accepted connection (`start_tls`), so handshakes count against the
  same limits and deadlines.
- a handler that raises answers a JSON 500, logs one line and is counted; nothing else of
  the connection or the server is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import socket
import ssl
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import httptools

from kubespan.discovery import limits
from kubespan.discovery.forwarded import source_key, unmap

log = logging.getLogger(__name__)

JSON = b"application/json"
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # the request target exactly as sent (origin form, ASCII)
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    peer: str | None  # the socket's peer address, IPv4-mapped addresses unmapped


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def error_body(field_name: str, message: str) -> bytes:
    document = {"error": {"field": field_name, "message": message}}
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = limits.MAX_CONNECTIONS
    max_per_source: int = limits.MAX_CONNECTIONS_PER_SOURCE
    max_head_bytes: int = limits.MAX_HEAD_BYTES
    max_headers: int = limits.MAX_HEADERS
    max_body_bytes: int = limits.MAX_BODY_BYTES
    max_pipelined: int = limits.MAX_PIPELINED
    head_timeout: float = limits.HEAD_TIMEOUT_SECONDS
    body_timeout: float = limits.BODY_TIMEOUT_SECONDS
    idle_timeout: float = limits.IDLE_TIMEOUT_SECONDS
    write_timeout: float = limits.WRITE_TIMEOUT_SECONDS
    tls_timeout: float = limits.TLS_HANDSHAKE_TIMEOUT_SECONDS


@dataclass
class TransportCounters:
    """What the transport refused or cut short, for metrics."""

    refused: Counter[str] = field(default_factory=Counter)  # reason -> connections
    errors: int = 0  # handler exceptions answered with 500


class _Refuse(Exception):
    """Answer `status` with an error naming `field`, then close the connection."""

    def __init__(self, status: int, field_name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field_name
        self.message = message


_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def encode_response(response: Response, close: bool) -> bytes:
    reason = _REASONS.get(response.status, b"Unknown")
    head = [
        b"HTTP/1.1 %d %s" % (response.status, reason),
        b"content-type: " + response.content_type,
        b"content-length: %d" % len(response.body),
    ]
    head += [name + b": " + value for name, value in response.headers]
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body


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
        self.connections: set[_Connection] = set()
        self._waiting: OrderedDict[_Connection, None] = OrderedDict()
        self._per_source: Counter[str] = Counter()
        self._servers: list[asyncio.AbstractServer] = []
        self.closing = False

    async def listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), sock=sock, backlog=1024)
        self._servers.append(server)

    @property
    def waiting(self) -> int:
        """Connections that have not delivered a complete request (new, slow or idle)."""
        return len(self._waiting)

    # --- the connection table --------------------------------------------------------------

    def _admit(self, connection: _Connection) -> bool:
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

    def _gone(self, connection: _Connection) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self._waiting.pop(connection, None)
        source = connection.source
        if source is not None:
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    def _set_waiting(self, connection: _Connection, waiting: bool, first: bool = False) -> None:
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


class _Connection(asyncio.Protocol):
    """One client connection: parse, bound, dispatch one request at a time, answer in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.raw_transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.source: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.ready = False  # TLS handshake done (or no TLS)
        self.closed = False
        self.handling = False
        self.write_paused = False
        self.queue: deque[Request | _Refuse] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.first_request = True
        self.in_head = False
        self.keep_alive = True
        self.broken = False  # the parser failed: nothing more is parsed
        self.draining = False  # refused: our answer is sent, the client's rest is discarded
        self.head_fed = 0  # bytes given to the parser since the last complete head
        self._reset_message()

    # --- lifecycle -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.raw_transport = self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.peer = unmap(peername[0]) if isinstance(peername, tuple) and peername else None
        if self.peer is not None and not self.server.exempt(self.peer):
            self.source = source_key(self.peer)
        if not self.server._admit(self):
            self.closed = True
            self.raw_transport.abort()
            return
        self._arm(self.limits.head_timeout)
        self.server._set_waiting(self, True)
        if self.server.ssl_context is None:
            self.ready = True
            return
        self.raw_transport.pause_reading()
        self.task = self.loop.create_task(self._start_tls(self.server.ssl_context))

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        assert self.raw_transport is not None
        try:
            upgraded = await self.loop.start_tls(
                self.raw_transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.limits.tls_timeout,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError, RuntimeError):
            self.abort()
            return
        if self.closed or upgraded is None:
            return
        self.transport = upgraded
        self.ready = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.server._gone(self)
        if self.task is not None and not self.task.done():
            # A long poll of a client that went away stops waiting: nothing outlives the
            # connection that asked for it.
            self.task.cancel()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._disarm()
            if self.transport is not None:
                self.transport.close()
            self.server._gone(self)

    def abort(self) -> None:
        self.closed = True
        self._disarm()
        for transport in (self.transport, self.raw_transport):
            if transport is not None:
                transport.abort()
        self.server._gone(self)

    # --- deadlines -------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self.draining:
            self.abort()
        elif self.in_head or self.in_body:
            self.server.counters.refused["timeout"] += 1
            # Queued, not written at once: an answer to an earlier request may be pending.
            self.broken = True
            self._queue(_Refuse(408, "request", "not received in time"))
        else:
            self.server.counters.refused["idle" if not self.write_paused else "slow_reader"] += 1
            self.abort()

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed or not self.ready or self.broken:
            return  # (also while draining after a refusal: discarded)
        # The parser keeps a header it has not seen the end of in its own memory: a request
        # head is fed to it at most MAX_HEAD_BYTES at a time, and refused beyond that.
        while data and not self.broken and not self.closed:
            if self.in_body:
                self._feed(data)
                return
            room = self.limits.max_head_bytes - self.head_fed
            if room <= 0:
                self._queue(
                    _Refuse(
                        431,
                        "headers",
                        f"request line and headers exceed {self.limits.max_head_bytes} bytes",
                    )
                )
                self.broken = True
                return
            piece, data = data[:room], data[room:]
            self.head_fed += len(piece)
            self._feed(piece)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
            return
        except httptools.HttpParserCallbackError as error:
            refusal = error.__context__
            if not isinstance(refusal, _Refuse):
                refusal = _Refuse(400, "request", "malformed")
            self._queue(refusal)
        except httptools.HttpParserUpgrade:
            self._queue(_Refuse(400, "request", "protocol upgrades are not supported"))
        except httptools.HttpParserError:
            self._queue(_Refuse(400, "request", "not a valid HTTP/1.1 request"))
        self.broken = True

    def _reset_message(self) -> None:
        self.url = bytearray()
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.body = bytearray()
        self.in_body = False
        self.content_length_checked = False

    def on_message_begin(self) -> None:
        self._reset_message()
        self.in_head = True
        if not self.first_request:
            self._arm(self.limits.head_timeout)
        self.first_request = False

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > self.limits.max_head_bytes:
            raise _Refuse(
                431,
                "headers",
                f"request line and headers exceed {self.limits.max_head_bytes} bytes",
            )

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        if len(self.headers) >= self.limits.max_headers:
            raise _Refuse(431, "headers", f"more than {self.limits.max_headers} header fields")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        known = self.headers.get(key)
        self.headers[key] = text if known is None else f"{known}, {text}"

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        self.head_fed = 0
        length = self.headers.get("content-length")
        if length is not None and (
            not length.isascii() or not length.isdigit() or len(length) > 12
        ):
            raise _Refuse(400, "content-length", "must be a decimal number of bytes")
        if length is not None and int(length) > self.limits.max_body_bytes:
            raise _Refuse(413, "body", f"must be at most {self.limits.max_body_bytes} bytes")
        self.server._set_waiting(self, False)
        self._arm(self.limits.body_timeout)

    def on_body(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.limits.max_body_bytes:
            raise _Refuse(413, "body", f"must be at most {self.limits.max_body_bytes} bytes")
        self.body += chunk

    def on_message_complete(self) -> None:
        self.in_body = False
        self._disarm()
        try:
            target = self.url.decode("ascii")
        except UnicodeDecodeError:
            target = ""
        if not target.startswith("/") or not target.isprintable():
            raise _Refuse(400, "path", "must be an absolute path of printable ASCII")
        method = self.parser.get_method().decode("ascii", "replace")
        request = Request(method, target, self.headers, bytes(self.body), self.peer)
        self.keep_alive = self.parser.should_keep_alive()
        self._queue(request)

    # --- dispatch and answers --------------------------------------------------------------

    def _queue(self, item: Request | _Refuse) -> None:
        if len(self.queue) >= self.limits.max_pipelined:
            self.abort()
            return
        self.queue.append(item)
        # Nothing more is read from a connection that is refused or busy: its requests wait
        # in the kernel's buffers, not in ours.
        busy = isinstance(item, _Refuse) or self.handling
        if busy and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._next()

    def _next(self) -> None:
        if self.handling or self.closed or self.write_paused or not self.queue:
            return
        item = self.queue.popleft()
        if isinstance(item, _Refuse):
            self._refuse_now(item)
            return
        self.handling = True
        # Referenced while it runs: the loop keeps only weak references to tasks.
        self.task = self.loop.create_task(self._handle(item, self.keep_alive))

    async def _handle(self, request: Request, keep_alive: bool) -> None:
        try:
            response = await self.server.handler(request)
        except Exception as error:  # noqa: BLE001 - one bad request harms nothing but itself
            self.server.counters.errors += 1
            where = _innermost(error)
            log.error(
                "internal error method=%s path=%s error=%s: %s at %s",
                request.method,
                request.target.split("?", 1)[0][:100],
                type(error).__name__,
                str(error)[:200],
                where,
            )
            response = Response(500, error_body("server", "internal error"))
        self.handling = False
        if self.closed:
            return
        # After HEAD the client reads no body: the connection cannot carry another answer.
        close = not keep_alive or self.server.closing or request.method == "HEAD"
        self._write(encode_response(response, close))
        if close:
            self.close()
            return
        self.server._set_waiting(self, True)
        if self.in_head or self.in_body:
            self._arm(self.limits.head_timeout)  # a next request is already arriving
        elif not self.write_paused:
            self._arm(self.limits.idle_timeout)
        if self.queue:
            self._next()
        elif self.transport is not None:
            self.transport.resume_reading()

    def _refuse_now(self, refusal: _Refuse) -> None:
        response = Response(refusal.status, error_body(refusal.field, refusal.message))
        self._write(encode_response(response, close=True))
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            self.close()
            return
        # Closing with unread data makes the kernel send a reset, which can destroy the
        # answer before the client reads it: send our side's end, then read and discard
        # for a moment (bounded in time; the parser is no longer fed).
        transport.write_eof()
        self.broken = True
        self.draining = True
        self.server._set_waiting(self, True, first=True)  # the first to go when full
        self._arm(LINGER_SECONDS)
        transport.resume_reading()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._arm(self.limits.write_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self._arm(self.limits.idle_timeout)
            self._next()


def _innermost(error: BaseException) -> str:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    if traceback is None:
        return "?"
    code = traceback.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{traceback.tb_lineno} in {code.co_name}"


def tune_loop() -> Any:
    """uvloop when installed (faster accept and parse paths), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
