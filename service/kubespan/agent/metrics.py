"""The node's metrics in the Prometheus text format, off unless `metricsListen` is set.

Rendered when scraped from the latest status document (peers, handshakes, bytes, readiness,
discovery) and the loop's counters, so the two never disagree. Label values come from
peers (their names) and are escaped as the format requires and cut to a bounded length.
A few workers serve them; a connection has REQUEST_TIMEOUT to send at most REQUEST_LIMIT
bytes of request, and a render answers every scrape for a second: a slow client holds one
worker for seconds at most, and a flood of scrapes costs one render a second.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from kubespan import __version__
from kubespan.netaddr import Endpoint
from kubespan.threads import named_thread
from kubespan.wakeup import Wakeup

log = logging.getLogger(__name__)

PREFIX = "kubespan"
LABEL_LIMIT = 128
REQUEST_TIMEOUT = 2.0  # for the whole request to arrive, then again for the answer to go
REQUEST_LIMIT = 8192  # bytes of request line and headers
RENDER_REUSE = 1.0  # seconds a render answers scrapes for
WORKERS = 4  # connections served at once; more wait in the listen backlog
STATES = ("up", "down", "unknown")


@dataclass
class LoopCounters:
    """What the reconcile loop counts (only it writes them)."""

    passes: int = 0
    pass_errors: int = 0
    last_pass_seconds: float = 0.0
    endpoint_changes: int = 0
    peer_restarts: int = 0


def label(value: Any) -> str:
    """A label value as the text format wants it: backslash, quote and newline escaped."""
    text = str(value)[:LABEL_LIMIT]
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {PREFIX}_{name} {help_text}")
    lines.append(f"# TYPE {PREFIX}_{name} {kind}")


def render(document: dict[str, Any], counters: LoopCounters, wall_now: float) -> str:
    lines: list[str] = []
    _metric(lines, "build_info", "gauge", "The agent's version.")
    lines.append(f'{PREFIX}_build_info{{version="{label(__version__)}"}} 1')
    _metric(lines, "ready", "gauge", "1 once the link and known members are configured.")
    lines.append(f"{PREFIX}_ready {1 if document.get('ready') else 0}")
    peers = document.get("peers", [])
    _metric(lines, "peers", "gauge", "Peers by state.")
    for state in STATES:
        count = sum(1 for p in peers if p.get("state") == state)
        lines.append(f'{PREFIX}_peers{{state="{state}"}} {count}')
    _metric(lines, "peer_up", "gauge", "1 when the peer is up.")
    for peer in peers:
        lines.append(
            f"{PREFIX}_peer_up{{{_peer_labels(peer)}}} {1 if peer.get('state') == 'up' else 0}"
        )
    _metric(lines, "peer_handshake_age_seconds", "gauge", "Seconds since the last handshake.")
    for peer in peers:
        handshake = peer.get("last_handshake")
        if isinstance(handshake, int | float) and handshake > 0:
            age = max(0.0, wall_now - handshake)
            lines.append(f"{PREFIX}_peer_handshake_age_seconds{{{_peer_labels(peer)}}} {age:.1f}")
    for direction, key in (("receive", "rx_bytes"), ("transmit", "tx_bytes")):
        _metric(lines, f"peer_{direction}_bytes", "gauge", f"Bytes the kernel counts ({key}).")
        for peer in peers:
            lines.append(
                f"{PREFIX}_peer_{direction}_bytes{{{_peer_labels(peer)}}} {int(peer.get(key, 0))}"
            )
    _metric(lines, "peers_relayed", "gauge", "Peers reached through a relay member.")
    lines.append(f"{PREFIX}_peers_relayed {sum(1 for p in peers if p.get('relay'))}")
    _relay_metrics(lines, document.get("node", {}).get("relay"))
    _metric(lines, "endpoint_changes_total", "counter", "Peer endpoints written by the agent.")
    lines.append(f"{PREFIX}_endpoint_changes_total {counters.endpoint_changes}")
    _metric(lines, "peer_restarts_total", "counter", "Peers recreated to handshake at once.")
    lines.append(f"{PREFIX}_peer_restarts_total {counters.peer_restarts}")
    _metric(lines, "reconcile_passes_total", "counter", "Reconcile passes that finished.")
    lines.append(f"{PREFIX}_reconcile_passes_total {counters.passes}")
    _metric(lines, "reconcile_errors_total", "counter", "Reconcile passes that failed.")
    lines.append(f"{PREFIX}_reconcile_errors_total {counters.pass_errors}")
    _metric(lines, "reconcile_duration_seconds", "gauge", "How long the last pass took.")
    lines.append(f"{PREFIX}_reconcile_duration_seconds {counters.last_pass_seconds:.4f}")
    _metric(lines, "discovery_up", "gauge", "1 when the service's last exchange succeeded.")
    for source in document.get("discovery", []):
        up = 0 if source.get("last_error") else 1
        lines.append(f'{PREFIX}_discovery_up{{url="{label(source.get("url", ""))}"}} {up}')
    return "\n".join(lines) + "\n"


def _relay_metrics(lines: list[str], relay: Any) -> None:
    """What this node relays for others, when it offers to."""
    if not isinstance(relay, dict):
        return
    pairs = [p for p in relay.get("pairs", []) if isinstance(p, dict)]
    _metric(lines, "relay_pairs", "gauge", "Pairs of members this relay forwards between.")
    lines.append(f"{PREFIX}_relay_pairs {len(pairs)}")
    _metric(lines, "relay_pair_bytes", "gauge", "Bytes a relayed pair sent through this relay.")
    for pair in pairs:
        sides = f'first="{label(pair.get("first", ""))}",second="{label(pair.get("second", ""))}"'
        sent = pair.get("bytes")
        lines.append(f"{PREFIX}_relay_pair_bytes{{{sides}}} {sent if isinstance(sent, int) else 0}")


def _peer_labels(peer: dict[str, Any]) -> str:
    return f'name="{label(peer.get("name", ""))}",public_key="{label(peer.get("public_key", ""))}"'


class _RequestTooLarge(http.client.HTTPException):
    """The request line and headers went past REQUEST_LIMIT."""


class _RequestReader(io.RawIOBase):
    """A connection's bytes until a deadline and up to a limit, for the request handler's
    rfile: the socket's own timeout bounds each receive only, so a client sending a byte
    just before each one ran out would hold a worker for as long as it liked."""

    def __init__(self, connection: socket.socket, deadline: float, limit: int) -> None:
        self._connection = connection
        self._deadline = deadline
        self._left = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            # http.server answers 431 to this while it reads the headers.
            raise _RequestTooLarge(f"request line and headers past {REQUEST_LIMIT} bytes")
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request took too long to arrive")
        self._connection.settimeout(remaining)
        with memoryview(buffer) as view:
            received = self._connection.recv_into(view, min(len(view), self._left))
        self._left -= received
        return received


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT

    def setup(self) -> None:
        super().setup()
        # Closed, or the socket would stay open after the server closes it.
        self.rfile.close()
        deadline = time.monotonic() + REQUEST_TIMEOUT
        self.rfile = io.BufferedReader(_RequestReader(self.connection, deadline, REQUEST_LIMIT))

    def do_GET(self) -> None:
        # The answer gets a deadline of its own: a client taking a big body slowly is cut off
        # too (sendall's timeout bounds the whole send).
        self.connection.settimeout(REQUEST_TIMEOUT)
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = self.server.body()
        if body is None:
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the journal


class _Server(HTTPServer):
    def __init__(self, listen: Endpoint, body: Callable[[], bytes | None]) -> None:
        if listen.address.version == 6:
            self.address_family = socket.AF_INET6
        self.body = body
        super().__init__((str(listen.address), listen.port), _Handler)
        # Every worker waits on this socket and only one accepts a connection: the others
        # must find nothing to accept rather than block in accept().
        self.socket.setblocking(False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Anyone who can connect can end a connection early (a reset, a timeout): one line,
        # and only at debug, instead of socketserver's traceback on stderr.
        error = sys.exc_info()[1]
        log.debug("metrics: a connection from %s failed: %r", client_address[0], error)


class MetricsServer:
    """Serves the metrics from WORKERS threads, each waiting for connections on the same
    socket: a slow client holds one of them, for REQUEST_TIMEOUT to send its request and as
    long again to take the answer at most."""

    def __init__(
        self,
        listen: Endpoint,
        scrape: Callable[[], str],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listen = listen
        self.scrape = scrape
        self._monotonic = monotonic
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._wakeup = Wakeup()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # being served, for stop() to cut
        self._render_lock = threading.Lock()
        self._rendered: bytes | None = None
        self._rendered_at: float | None = None

    def start(self) -> None:
        """Bind now (OSError for the caller to report) and serve in threads."""
        self._server = _Server(self.listen, self._body)
        self._threads = [
            named_thread(self._serve, f"metrics-{n}", args=(self._server,)) for n in range(WORKERS)
        ]
        for thread in self._threads:
            thread.start()

    def _body(self) -> bytes | None:
        """The rendered metrics, or None if rendering failed, kept for RENDER_REUSE seconds:
        a render costs milliseconds of CPU with the GIL held in a big cluster, and a flood of
        scrapes must not cost more than one a second. Held while rendering, so that scrapes
        arriving meanwhile wait for this render instead of making their own."""
        with self._render_lock:
            now = self._monotonic()
            if self._rendered_at is None or now - self._rendered_at >= RENDER_REUSE:
                try:
                    self._rendered = self.scrape().encode()
                except Exception:  # a scrape must never take the server down
                    log.exception("metrics could not be rendered")
                    self._rendered = None
                self._rendered_at = now
            return self._rendered

    def _serve(self, server: _Server) -> None:
        """Blocks in select() until a connection or stop() comes (serve_forever would look
        whether to stop twice a second: an idle agent's wake-ups)."""
        while not self._stopping.is_set():
            try:
                select.select([server.socket, self._wakeup.reader], [], [])
                # The wake-up is left pending: every worker must see it.
                if self._stopping.is_set():
                    return
                try:
                    connection, address = server.get_request()
                except (BlockingIOError, ConnectionAbortedError):
                    continue  # another worker was first, or the client left already
                self._handle(server, connection, address)
            except Exception:  # the metrics would end with the last worker
                if self._stopping.is_set():
                    return
                log.exception("metrics: serving a connection failed")
                self._stopping.wait(REQUEST_TIMEOUT)  # rather than fail in a busy loop

    def _handle(self, server: _Server, connection: socket.socket, address: Any) -> None:
        with self._lock:
            if self._stopping.is_set():  # stop() has cut the connections being served
                server.shutdown_request(connection)
                return
            self._connections.add(connection)
        try:
            server.finish_request(connection, address)
        except Exception:  # noqa: BLE001 - handle_error logs it: one client harms only itself
            server.handle_error(connection, address)
        finally:
            with self._lock:
                self._connections.discard(connection)
            server.shutdown_request(connection)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.poke()
        with self._lock:
            for connection in self._connections:
                # A worker waiting on its client sees the end of the stream at once.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + REQUEST_TIMEOUT + 1.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._server is not None:
            self._server.server_close()
            self._server = None
        if not any(thread.is_alive() for thread in self._threads):
            self._wakeup.close()
