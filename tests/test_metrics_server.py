"""The metrics server against hostile clients: one trickling its request holds a worker until
the request's deadline and stalls nobody else's scrape; a request past the size limit is
refused; a flood of scrapes costs one render a second; a connection reset by its client
costs one debug line, not a traceback on stderr."""

from __future__ import annotations

import http.client
import ipaddress
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import pytest

from kubespan.agent.metrics import RENDER_REUSE, REQUEST_LIMIT, REQUEST_TIMEOUT, MetricsServer
from kubespan.netaddr import Endpoint

from agents import wait_for

LOOPBACK = "127.0.0.1"
TRICKLE = 0.3  # well inside REQUEST_TIMEOUT: a timeout per receive never ends such a client


@contextmanager
def serving(
    scrape: Callable[[], str], monotonic: Callable[[], float] = time.monotonic
) -> Iterator[MetricsServer]:
    server = MetricsServer(Endpoint(ipaddress.ip_address(LOOPBACK), 0), scrape, monotonic)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get(port: int, path: str = "/metrics") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT + 1.0)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answer_to(port: int, request: bytes) -> bytes:
    """Everything the server sends back to `request` until it closes the connection."""
    with socket.create_connection((LOOPBACK, port), timeout=REQUEST_TIMEOUT + 1.0) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


class Trickler:
    """A client sending the start of a request, then one more header byte every TRICKLE
    seconds, until the server ends the connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=REQUEST_TIMEOUT)
        self.sock.sendall(b"GET /metrics HTTP/1.1\r\nX: ")
        self.connected_at = time.monotonic()
        self.cut_at: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                readable, _, _ = select.select([self.sock], [], [], TRICKLE)
                if readable:  # the server closed, or answered: either way, done with us
                    break
                self.sock.sendall(b"a")
        except OSError:
            pass  # reset by the server: cut off too
        if not self._done.is_set():
            self.cut_at = time.monotonic()

    def __enter__(self) -> Trickler:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join(REQUEST_TIMEOUT)
        self.sock.close()


def test_a_trickling_client_stalls_no_scrape_and_is_cut_off_at_the_deadline() -> None:
    with serving(lambda: "kubespan_ready 1\n") as server, Trickler(server.port) as trickler:
        # Connected first, so a server serving one connection at a time would take the
        # trickler first and never get to this scrape while the trickle goes on.
        assert get(server.port) == (200, b"kubespan_ready 1\n")
        wait_for(lambda: trickler.cut_at is not None, "the trickler cut off", REQUEST_TIMEOUT + 3)
        assert trickler.cut_at is not None
        assert trickler.cut_at - trickler.connected_at <= REQUEST_TIMEOUT + 1.0


def test_stop_ends_a_connection_being_served_at_once() -> None:
    with serving(lambda: "kubespan_ready 1\n") as server, Trickler(server.port) as trickler:
        assert get(server.port)[0] == 200  # meanwhile a worker took the trickler
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < REQUEST_TIMEOUT / 2
        wait_for(lambda: trickler.cut_at is not None, "the trickler cut off", REQUEST_TIMEOUT)


def test_a_request_past_the_size_limit_is_refused() -> None:
    request_line = b"GET /metrics HTTP/1.0\r\n"
    with serving(lambda: "kubespan_ready 1\n") as server:
        fits = request_line + b"X: " + b"a" * (REQUEST_LIMIT - 100) + b"\r\n\r\n"
        assert answer_to(server.port, fits).startswith(b"HTTP/1.0 200 ")
        too_big = request_line + b"X: " + b"a" * REQUEST_LIMIT + b"\r\n\r\n"
        assert answer_to(server.port, too_big).startswith(b"HTTP/1.0 431 ")
        many = request_line + b"".join(b"X%d: %s\r\n" % (n, b"a" * 90) for n in range(99))
        assert answer_to(server.port, many + b"\r\n").startswith(b"HTTP/1.0 431 ")


def test_scrapes_within_a_second_share_one_render() -> None:
    now = [1_000.0]
    renders = [0]

    def render() -> str:
        renders[0] += 1
        return f"kubespan_reconcile_passes_total {renders[0]}\n"

    with serving(render, lambda: now[0]) as server:
        first = get(server.port)
        assert first == (200, b"kubespan_reconcile_passes_total 1\n")
        now[0] += RENDER_REUSE - 0.01
        for _ in range(10):
            assert get(server.port) == first
        answers: list[tuple[int, bytes]] = []
        scrapers = [
            threading.Thread(target=lambda: answers.append(get(server.port))) for _ in range(8)
        ]
        for scraper in scrapers:
            scraper.start()
        for scraper in scrapers:
            scraper.join(REQUEST_TIMEOUT * 3)
        assert answers == [first] * 8
        assert renders[0] == 1
        now[0] += 0.01
        assert get(server.port) == (200, b"kubespan_reconcile_passes_total 2\n")
        assert renders[0] == 2


def test_a_failed_render_is_reused_too(caplog: pytest.LogCaptureFixture) -> None:
    renders = [0]

    def render() -> str:
        renders[0] += 1
        raise RuntimeError("broken")

    with serving(render, lambda: 1_000.0) as server:
        assert [get(server.port)[0] for _ in range(5)] == [500] * 5
    assert renders[0] == 1
    assert caplog.text.count("metrics could not be rendered") == 1


def test_a_connection_reset_by_its_client_logs_one_debug_line(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, logger="kubespan.agent.metrics")
    rendering = threading.Event()
    reset = threading.Event()

    def render() -> str:
        rendering.set()
        reset.wait(REQUEST_TIMEOUT)  # the answer goes to a connection reset meanwhile
        return "x" * 1_000_000

    with serving(render) as server:
        with socket.create_connection((LOOPBACK, server.port), timeout=REQUEST_TIMEOUT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert rendering.wait(REQUEST_TIMEOUT * 2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.set()
        wait_for(lambda: "failed" in caplog.text, "the reset logged", REQUEST_TIMEOUT * 2)
        assert get(server.port)[0] == 200  # and serving goes on
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG and failures[0].exc_info is None
    assert "\n" not in failures[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err
