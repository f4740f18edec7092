"""The lab's network: a network namespace made for the test, bridges ("segments") and taps.

Only objects inside that namespace are ever created or changed; the host's own interfaces,
addresses, routes and firewall are never touched. NAT routers (router.py) are further
namespaces joined to segments by veth pairs.
"""

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

from kslab.errors import LabError

# No STP and no br_netfilter hooks: a plain switch that forwards at once.
BRIDGE_OPTIONS = {
    "stp_state": "0",
    "forward_delay": "0",
    "nf_call_iptables": "0",
    "nf_call_ip6tables": "0",
    "nf_call_arptables": "0",
}

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network


def _run(argv: Sequence[str], timeout: float = 30.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class Segment:
    """One L2 network: a bridge in the lab namespace. The bridge holds host address 1 of
    each subnet (the host side: servers spawned in the namespace listen there)."""

    name: str
    bridge: str
    subnet: IPv4Net
    subnet6: IPv6Net | None = None

    def address(self, host: int) -> ipaddress.IPv4Interface:
        """Host number `host` of the subnet, with prefix length (e.g. 192.0.2.11/24)."""
        return ipaddress.IPv4Interface(f"{self.subnet[host]}/{self.subnet.prefixlen}")

    def address6(self, host: int) -> ipaddress.IPv6Interface:
        if self.subnet6 is None:
            raise LabError(f"segment {self.name} has no IPv6 subnet")
        return ipaddress.IPv6Interface(f"{self.subnet6[host]}/{self.subnet6.prefixlen}")

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The host side's address on this segment (host number 1)."""
        return self.address(1)


class Namespace:
    """A network namespace owned by the harness; `destroy()` removes it and its devices."""

    def __init__(self, name: str) -> None:
        self.name = name
        _run(["ip", "netns", "add", name])
        self.ip("link", "set", "lo", "up")

    @classmethod
    def create(cls, prefix: str = "ks") -> "Namespace":
        return cls(f"{prefix}-{secrets.token_hex(4)}")

    def ip(self, *args: str) -> str:
        """Run `ip -n NS ARGS...`."""
        return _run(["ip", "-n", self.name, *args])

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        check: bool = True,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"in {self.name}: {' '.join(argv)}: exit {result.returncode}: "
                f"{result.stderr.strip()}"
            )
        return result

    def add_bridge(self, ifname: str, addresses: Sequence[str]) -> None:
        self.ip(
            "link", "add", ifname, "type", "bridge", *chain.from_iterable(BRIDGE_OPTIONS.items())
        )
        for address in addresses:
            self.ip("address", "add", address, "dev", ifname, "nodad")
        self.ip("link", "set", ifname, "up")

    def add_tap(self, ifname: str, bridge: str) -> None:
        self.ip("tuntap", "add", "dev", ifname, "mode", "tap")
        self.ip("link", "set", ifname, "master", bridge, "up")

    def add_veth_to(self, ifname: str, bridge: str, other: "Namespace", peer: str) -> None:
        """A veth pair: `ifname` here, enslaved to `bridge`; `peer` in namespace `other`."""
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer, "netns", other.name)
        self.ip("link", "set", ifname, "master", bridge, "up")

    def pids(self) -> list[int]:
        result = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(p) for p in result.stdout.split()]

    def destroy(self) -> None:
        """Kill whatever still runs in the namespace, then delete it (and its devices)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for line in self._links():
            subprocess.run(
                ["ip", "-n", self.name, "link", "del", line], capture_output=True, check=False
            )
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def _links(self) -> list[str]:
        result = subprocess.run(
            ["ip", "-n", self.name, "-o", "link", "show"],
            capture_output=True,
            text=True,
            check=False,
        )
        names = [line.split(":")[1].strip().split("@")[0] for line in result.stdout.splitlines()]
        return [n for n in names if n and n != "lo"]

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"
