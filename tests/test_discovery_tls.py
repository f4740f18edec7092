"""TLS of the discovery service: the session on memory buffers, and the served process
handshaking every client whenever its ClientHello arrives."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.tlswire import TlsSession

from served import served, tls_pair


def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = tls_pair(tmp_path, "tls")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


class Client:
    """A TLS client on memory buffers, to talk to a TlsSession without sockets."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def give(self, data: bytes) -> None:
        self.incoming.write(data)

    def take(self) -> bytes:
        return self.outgoing.read()


def shake_hands(server: TlsSession, client: Client, piece: int) -> None:
    """Run the handshake to its end, delivering the client's bytes `piece` bytes at a time."""
    for _ in range(100):
        done = client.handshake()
        sent = client.take()
        for start in range(0, len(sent), piece):
            client.give(server.receive(sent[start : start + piece]).to_send)
        if done and server.established:
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("piece", [1, 7, 65536])
def test_a_session_handshakes_and_carries_data_however_the_bytes_are_cut(
    tmp_path: Path, piece: int
) -> None:
    server_context, client_context = contexts(tmp_path)
    server, client = TlsSession(server_context), Client(client_context)
    assert not server.established
    shake_hands(server, client, piece)

    client.tls.write(b"GET / HTTP/1.1\r\n\r\n" * 1000)
    sent = client.take()
    plaintext = b"".join(
        server.receive(sent[start : start + piece]).plaintext
        for start in range(0, len(sent), piece)
    )
    assert plaintext == b"GET / HTTP/1.1\r\n\r\n" * 1000

    answer = os.urandom(100_000)
    client.give(server.send(answer))
    read = b""
    while len(read) < len(answer):
        read += client.tls.read(65536)
    assert read == answer


def test_the_clients_close_notify_ends_the_session_and_ours_reaches_the_client(
    tmp_path: Path,
) -> None:
    server_context, client_context = contexts(tmp_path)
    server, client = TlsSession(server_context), Client(client_context)
    shake_hands(server, client, 65536)
    client.tls.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()
    received = server.receive(client.take())
    assert received.plaintext == b"last words"
    assert received.peer_closed and server.peer_closed

    fresh_server, fresh_client = TlsSession(server_context), Client(client_context)
    shake_hands(fresh_server, fresh_client, 65536)
    with pytest.raises(ssl.SSLWantReadError):  # nothing yet
        fresh_client.tls.read(10)
    fresh_client.give(fresh_server.close_notify())
    assert fresh_client.tls.read(10) == b""  # the end of the session, not a wait


def test_a_client_that_does_not_speak_tls_is_an_error_and_no_session(tmp_path: Path) -> None:
    server_context, _ = contexts(tmp_path)
    server = TlsSession(server_context)
    with pytest.raises(ssl.SSLError):
        server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not server.established
    assert TlsSession(server_context).close_notify() == b""  # nothing to end


def test_clienthellos_waiting_before_the_service_accepts_are_all_answered(
    tmp_path: Path,
) -> None:
    """The service stopped (SIGSTOP) while clients connect and send their ClientHello: when
    it runs again, every handshake completes at once (with start_tls under uvloop, such a
    ClientHello went to the plain protocol and the client waited for the deadline)."""
    cert, key = tls_pair(tmp_path, "tls")
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with served(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as service:
        host, port = service.url.removeprefix("https://").rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(cert))

        def handshake_seconds() -> float:
            with socket.create_connection((host, int(port)), timeout=30) as raw:
                started = time.monotonic()
                with context.wrap_socket(raw, server_hostname=host):
                    return time.monotonic() - started

        os.kill(service.pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(max_workers=20) as pool:
                handshakes = [pool.submit(handshake_seconds) for _ in range(20)]
                time.sleep(0.5)  # deliberately: the ClientHellos must be waiting in the kernel
                os.kill(service.pid, signal.SIGCONT)
                seconds = [handshake.result(timeout=30) for handshake in handshakes]
        finally:
            os.kill(service.pid, signal.SIGCONT)
        assert max(seconds) < 5, seconds

        # The service still answers signed requests over TLS, and a plain-HTTP stranger
        # costs it nothing but that connection.
        with pytest.raises(requests.RequestException):
            requests.get(f"http://{host}:{port}/healthz", timeout=5)
        client = DiscoveryClient(service.url, keys, verify=str(cert))
        client.put("member", os.urandom(64), [], 600)
        assert [item.id for item in client.listing().affiliates] == ["member"]
