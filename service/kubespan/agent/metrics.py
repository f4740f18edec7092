"""The node's metrics in the Prometheus text format, off unless `metricsListen` is set.

Rendered when scraped from the latest status document (peers, handshakes, bytes, readiness,
discovery) and the loop's counters, so the two never disagree. Label values come from
peers (their names) and are escaped as the format requires and cut to a bounded length.
The server answers one request at a time with a short timeout: a scraper is one client,
and nobody else gets threads out of it.
"""

from __future__ import annotations

import logging
import select
import threading
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
REQUEST_TIMEOUT = 2.0
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


class MetricsServer:
    def __init__(self, listen: Endpoint, scrape: Callable[[], str]) -> None:
        self.listen = listen
        self.scrape = scrape
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wakeup = Wakeup()

    def start(self) -> None:
        """Bind now (OSError for the caller to report) and serve in a thread."""
        scrape = self.scrape

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                try:
                    body = scrape().encode()
                except Exception:  # a scrape must never take the server down
                    log.exception("metrics could not be rendered")
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape would drown the journal

        family_server = _server_class(self.listen)
        self._server = family_server((str(self.listen.address), self.listen.port), Handler)
        self._server.timeout = REQUEST_TIMEOUT  # handle_request's wait, should a client vanish
        self._thread = named_thread(self._serve, "metrics", args=(self._server,))
        self._thread.start()

    def _serve(self, server: HTTPServer) -> None:
        """Blocks in select() until a scrape or stop() comes (serve_forever would look
        whether to stop twice a second: an idle agent's wake-ups)."""
        while not self._stopping.is_set():
            try:
                select.select([server.socket, self._wakeup.reader], [], [])
                self._wakeup.drain()
                if not self._stopping.is_set():
                    server.handle_request()
            except (OSError, ValueError):
                if self._stopping.is_set():
                    return
                log.exception("metrics: serving a request failed")
                self._stopping.wait(REQUEST_TIMEOUT)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.poke()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT + 1.0)
        if self._server is not None:
            self._server.server_close()
            self._server = None
        if self._thread is None or not self._thread.is_alive():
            self._wakeup.close()


def _server_class(listen: Endpoint) -> type[HTTPServer]:
    import socket

    if listen.address.version == 6:

        class V6Server(HTTPServer):
            address_family = socket.AF_INET6

        return V6Server
    return HTTPServer
