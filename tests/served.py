"""The discovery service as its own process (`kubespan discovery serve`), as in production."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery.signing import sign

KUBESPAN = Path(sys.executable).parent / "kubespan"


def signed_headers(
    keys: ClusterKeys, method: str, target: str, service_url: str, body: bytes = b""
) -> dict[str, str]:
    """Headers signing one request, now, with a fresh nonce, for the service at the URL."""
    headers = sign(
        keys.signing_key,
        method,
        target,
        body,
        int(time.time()),
        os.urandom(16),
        service_url=service_url,
    )
    return headers.as_dict()


LISTENING = re.compile(r"listening url=(\S+) pid=(\d+) metrics=(\S+)")


@dataclass
class ServedProcess:
    url: str
    pid: int
    log: Path
    metrics_url: str
    process: subprocess.Popen[bytes]

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the service and wait for it to exit; its exit status."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)


def wait_listening(log: Path, process: subprocess.Popen[bytes], after: int = 0) -> re.Match[str]:
    deadline = time.monotonic() + 20
    while True:
        match = LISTENING.search(log.read_text(errors="replace"), after)
        if match:
            return match
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"discovery service did not start:\n{log.read_text()}")
        time.sleep(0.05)


@contextmanager
def served(tmp_path: Path, *extra: str, listen: str = "127.0.0.1:0") -> Iterator[ServedProcess]:
    """The service with its metrics on another loopback port; stopped (SIGTERM) at the end."""
    log = tmp_path / "discovery.log"
    start = log.stat().st_size if log.exists() else 0
    argv = [
        str(KUBESPAN),
        "-v",
        "discovery",
        "serve",
        "--listen",
        listen,
        "--metrics-listen",
        "127.0.0.1:0",
        *extra,
    ]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        match = wait_listening(log, process, start)
        # The sockets are bound before the line is logged; wait for /healthz, not for luck.
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"{match.group(3)}/healthz", timeout=2)
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with warnings.catch_warnings():
            yield ServedProcess(match.group(1), int(match.group(2)), log, match.group(3), process)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tls_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
