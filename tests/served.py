"""The discovery service as its own process (`kubespan discovery serve`), as in production."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KUBESPAN = Path(sys.executable).parent / "kubespan"
LISTENING = re.compile(r"listening url=(\S+) pid=(\d+)")


@dataclass
class ServedProcess:
    url: str
    pid: int
    log: Path


@contextmanager
def served(tmp_path: Path, *extra: str) -> Iterator[ServedProcess]:
    log = tmp_path / "discovery.log"
    argv = [str(KUBESPAN), "-v", "discovery", "serve", "--listen", "127.0.0.1:0", *extra]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            match = LISTENING.search(log.read_text())
            if match:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"discovery service did not start:\n{log.read_text()}")
            time.sleep(0.05)
        # uvicorn accepts connections once its loop runs; wait for /healthz, not for luck.
        import requests
        from urllib3.exceptions import InsecureRequestWarning

        while True:
            try:
                # Only "is it answering": the TLS test checks certificates with its own client.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", InsecureRequestWarning)
                    requests.get(f"{match.group(1)}/healthz", timeout=2, verify=False)  # noqa: S501
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield ServedProcess(match.group(1), int(match.group(2)), log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
