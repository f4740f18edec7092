"""One client connection of the HTTP transport: parse with every byte and wait bounded,
dispatch one request at a time, answer in order (see http.py for the limits and why)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from kubespan.discovery.forwarded import source_key, unmap
from kubespan.discovery.httpwire import Refusal, Request, Response, encode_response, error_body
from kubespan.discovery.tlswire import TlsSession

if TYPE_CHECKING:
    from kubespan.discovery.http import HttpServer

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0


class Connection(asyncio.Protocol):
    """One client connection: parse, bound, dispatch one request at a time, answer in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.tls: TlsSession | None = None
        self.peer: str | None = None
        self.source: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.ready = False  # TLS handshake done (or no TLS)
        self.closed = False
        self.handling = False
        self.write_paused = False
        self.queue: deque[Request | Refusal] = deque()
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
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.peer = unmap(peername[0]) if isinstance(peername, tuple) and peername else None
        if self.peer is not None and not self.server.exempt(self.peer):
            self.source = source_key(self.peer)
        if not self.server._admit(self):
            self.closed = True
            self.transport.abort()
            return
        self.server._set_waiting(self, True)
        if self.server.ssl_context is None:
            self.ready = True
            self._arm(self.limits.head_timeout)
            return
        self.tls = TlsSession(self.server.ssl_context)
        self._arm(self.limits.tls_timeout)

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
                if self.tls is not None:
                    self.transport.write(self.tls.close_notify())
                self.transport.close()
            self.server._gone(self)

    def abort(self) -> None:
        self.closed = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()
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
            self._queue(Refusal(408, "request", "not received in time"))
        else:
            self.server.counters.refused["idle" if not self.write_paused else "slow_reader"] += 1
            self.abort()

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.tls is not None and not self.closed:
            data = self._decrypt(data)
        if self.closed or not self.ready or self.broken:
            return  # (also while draining after a refusal: discarded)
        self._parse(data)
        if self.tls is not None and self.tls.peer_closed and not self.closed:
            self.close()  # as a plain connection closes on the client's end of stream

    def _decrypt(self, data: bytes) -> bytes:
        assert self.tls is not None and self.transport is not None
        try:
            received = self.tls.receive(data)
        except ssl.SSLError:
            self.server.counters.refused["tls"] += 1
            self.abort()
            return b""
        if received.to_send:
            self.transport.write(received.to_send)
        if self.tls.established and not self.ready:
            self.ready = True
            self._arm(self.limits.head_timeout)
        return received.plaintext

    def _parse(self, data: bytes) -> None:
        # The parser keeps a header it has not seen the end of in its own memory: a request
        # head is fed to it at most MAX_HEAD_BYTES at a time, and refused beyond that.
        while data and not self.broken and not self.closed:
            if self.in_body:
                self._feed(data)
                return
            room = self.limits.max_head_bytes - self.head_fed
            if room <= 0:
                self._queue(
                    Refusal(
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
            if not isinstance(refusal, Refusal):
                refusal = Refusal(400, "request", "malformed")
            self._queue(refusal)
        except httptools.HttpParserUpgrade:
            self._queue(Refusal(400, "request", "protocol upgrades are not supported"))
        except httptools.HttpParserError:
            self._queue(Refusal(400, "request", "not a valid HTTP/1.1 request"))
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
            raise Refusal(
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
            raise Refusal(431, "headers", f"more than {self.limits.max_headers} header fields")
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
            raise Refusal(400, "content-length", "must be a decimal number of bytes")
        if length is not None and int(length) > self.limits.max_body_bytes:
            raise Refusal(413, "body", f"must be at most {self.limits.max_body_bytes} bytes")
        self.server._set_waiting(self, False)
        self._arm(self.limits.body_timeout)

    def on_body(self, chunk: bytes) -> None:
        if len(self.body) + len(chunk) > self.limits.max_body_bytes:
            raise Refusal(413, "body", f"must be at most {self.limits.max_body_bytes} bytes")
        self.body += chunk

    def on_message_complete(self) -> None:
        self.in_body = False
        self._disarm()
        try:
            target = self.url.decode("ascii")
        except UnicodeDecodeError:
            target = ""
        if not target.startswith("/") or not target.isprintable():
            raise Refusal(400, "path", "must be an absolute path of printable ASCII")
        method = self.parser.get_method().decode("ascii", "replace")
        request = Request(method, target, self.headers, bytes(self.body), self.peer)
        self.keep_alive = self.parser.should_keep_alive()
        self._queue(request)

    # --- dispatch and answers --------------------------------------------------------------

    def _queue(self, item: Request | Refusal) -> None:
        if len(self.queue) >= self.limits.max_pipelined:
            self.abort()
            return
        self.queue.append(item)
        # Nothing more is read from a connection that is refused or busy: its requests wait
        # in the kernel's buffers, not in ours.
        busy = isinstance(item, Refusal) or self.handling
        if busy and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._next()

    def _next(self) -> None:
        if self.handling or self.closed or self.write_paused or not self.queue:
            return
        item = self.queue.popleft()
        if isinstance(item, Refusal):
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

    def _refuse_now(self, refusal: Refusal) -> None:
        response = Response(refusal.status, error_body(refusal.field, refusal.message))
        self._write(encode_response(response, close=True))
        transport = self.transport
        # TLS has no half-close: its end is the close_notify that closing sends.
        if (
            transport is None
            or self.closed
            or self.tls is not None
            or not transport.can_write_eof()
        ):
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
            self.transport.write(data if self.tls is None else self.tls.send(data))

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
