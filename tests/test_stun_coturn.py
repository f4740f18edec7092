"""Interoperability with a STUN server we did not write: Debian's coturn (`turnserver`),
STUN only, on loopback, probed through our raw socket from the WireGuard port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubespan.netaddr import Endpoint
from kubespan.stun.prober import probe

LISTEN_PORT = 51820
START_TIMEOUT = 15.0


def free_udp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def coturn(tmp_path: Path) -> Iterator[list[Endpoint]]:
    """turnserver answering STUN on 127.0.0.1 and ::1 (each a free port), with FINGERPRINT."""
    if shutil.which("turnserver") is None:
        pytest.fail("needs coturn's turnserver (.ci/apt-packages.txt installs it)", pytrace=False)
    port = free_udp_port("127.0.0.1")
    reflectors = [Endpoint.parse(f"127.0.0.1:{port}"), Endpoint.parse(f"[::1]:{port}")]
    log = tmp_path / "turnserver.log"
    config = tmp_path / "turnserver.conf"
    config.write_text("# everything on the command line; not the host's /etc/turnserver.conf\n")
    argv = [
        "turnserver",
        "-c",
        str(config),
        "--stun-only",
        "--no-auth",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-cli",
        "--fingerprint",
        "--listening-ip",
        "127.0.0.1",
        "--listening-ip",
        "::1",
        "--listening-port",
        str(port),
        "--pidfile",
        str(tmp_path / "turnserver.pid"),
        "--userdb",
        str(tmp_path / "turndb"),
        "--log-file",
        str(log),
        "--simple-log",
        "--no-stdout-log",
    ]
    with (tmp_path / "turnserver.out").open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Ready when it answers: ask until it does, within the deadline.
        deadline = time.monotonic() + START_TIMEOUT
        while any(a.mapped is None for a in probe(LISTEN_PORT, reflectors, timeout=0.3).answers):
            if process.poll() is not None or time.monotonic() > deadline:
                shown = log.read_text(errors="replace") if log.exists() else ""
                raise AssertionError(f"turnserver did not answer: {shown[-2000:]}")
        yield reflectors
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_our_prober_reads_coturns_answers(coturn: list[Endpoint]) -> None:
    started = time.monotonic()
    result = probe(LISTEN_PORT, coturn)
    elapsed = time.monotonic() - started
    assert result.ipv4 == (Endpoint.parse(f"127.0.0.1:{LISTEN_PORT}"),)
    assert result.ipv6 == (Endpoint.parse(f"[::1]:{LISTEN_PORT}"),)
    assert [a.reflector for a in result.answers] == coturn
    assert elapsed < 1.0, elapsed
    print(f"coturn probe_s={elapsed:.4f}")
