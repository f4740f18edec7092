"""Packet captures on a lab segment (tcpdump inside the lab namespace), read back with
capture filters: what crossed the wire, as an outside observer sees it."""

import subprocess
from pathlib import Path

from kslab.errors import LabError
from kslab.proc import HostProcess
from kslab.wait import wait_until


class Capture:
    def __init__(self, process: HostProcess, path: Path) -> None:
        self.process = process
        self.path = path

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: "listening on" in self.process.log_tail(),
            timeout,
            f"tcpdump ({self.process.name}) to listen",
        )

    def stop(self) -> None:
        self.process.stop()

    def packets(self, capture_filter: str) -> list[str]:
        """One line per captured packet that matches `capture_filter` (pcap-filter syntax)."""
        result = subprocess.run(
            ["tcpdump", "-n", "-r", str(self.path), capture_filter],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"tcpdump -r {self.path} '{capture_filter}': {result.stderr.strip()}")
        return result.stdout.splitlines()
