"""NAT routers for the lab: a further network namespace joined by veth pairs to two lab
segments, a WAN side (the "internet" segment) and a LAN side (a site segment), forwarding
between them through nftables.

The router masquerades what leaves its WAN side and admits from the WAN only what conntrack
knows (`ct state established,related`): a home or site router. `NatKind.ENDPOINT_INDEPENDENT`
is Linux's plain `masquerade` (one mapping per inside address and port, the port kept when it
is free); `NatKind.SYMMETRIC` is `masquerade fully-random` (a fresh random port for every
destination). There is no hairpin: a LAN host sending to the router's public address reaches
the router itself, never another LAN host.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from kslab.errors import LabError
from kslab.netns import Namespace

TABLE = "kslab_nat"
WAN_IF = "wan"
LAN_IF = "lan"


class NatKind(enum.Enum):
    ENDPOINT_INDEPENDENT = "masquerade"
    SYMMETRIC = "masquerade fully-random"


def nat_ruleset(kind: NatKind, wan: str = WAN_IF, lan: str = LAN_IF) -> str:
    """The router's nftables ruleset (pure). Chain `drops` holds rules added at run time
    (`Router.drop`), consulted before anything else in both directions."""
    return "\n".join(
        [
            f"table ip {TABLE} {{",
            "  chain drops {",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy drop;",
            "    jump drops",
            "    ct state established,related accept",
            f'    iifname "{lan}" oifname "{wan}" accept',
            "  }",
            "  chain input {",
            "    type filter hook input priority filter; policy drop;",
            '    iifname "lo" accept',
            "    ct state established,related accept",
            "    icmp type echo-request accept",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "{wan}" {kind.value}',
            "  }",
            "}",
            "",
        ]
    )


def drop_rule(
    source: str | None = None, destination: str | None = None, protocol: str | None = None
) -> str:
    """One rule of the `drops` chain (pure): matches on inside-view addresses (the forward
    hook sees the LAN host's own address, before masquerade and after un-NAT of replies)."""
    parts = []
    if source is not None:
        parts.append(f"ip saddr {ipaddress.IPv4Address(source)}")
    if destination is not None:
        parts.append(f"ip daddr {ipaddress.IPv4Address(destination)}")
    if protocol is not None:
        if protocol not in ("udp", "tcp", "icmp"):
            raise LabError(f"drop rule: unknown protocol {protocol!r}")
        parts.append(f"meta l4proto {protocol}")
    if not parts:
        raise LabError("drop rule: match something (a source, a destination or a protocol)")
    return " ".join([*parts, "drop"])


@dataclass(frozen=True)
class RouterSpec:
    name: str  # short: it names the veths (rNAME-w / rNAME-l, at most 15 characters)
    wan_segment: str
    wan_address: ipaddress.IPv4Interface
    lan_segment: str
    lan_address: ipaddress.IPv4Interface
    kind: NatKind = NatKind.ENDPOINT_INDEPENDENT

    def __post_init__(self) -> None:
        if len(self.name) > 8 or not self.name.isalnum():
            raise ValueError(f"router name {self.name!r}: up to 8 letters and digits")


class Router:
    """A running NAT router (made by `Lab.add_router`); torn down with the lab."""

    def __init__(self, spec: RouterSpec, ns: Namespace) -> None:
        self.spec = spec
        self.ns = ns
        self.wan_address = spec.wan_address

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def public_ip(self) -> str:
        return str(self.wan_address.ip)

    @property
    def lan_ip(self) -> str:
        return str(self.spec.lan_address.ip)

    def configure(self) -> None:
        """Addresses, forwarding, the ruleset. Called once by the lab."""
        self.ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        self.ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"])
        self.ns.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])
        self.ns.ip("address", "add", self.spec.wan_address.with_prefixlen, "dev", WAN_IF)
        self.ns.ip("address", "add", self.spec.lan_address.with_prefixlen, "dev", LAN_IF)
        self.ns.ip("link", "set", WAN_IF, "up")
        self.ns.ip("link", "set", LAN_IF, "up")
        self.nft(nat_ruleset(self.spec.kind))

    def nft(self, script: str) -> None:
        self.ns.run(["nft", "-f", "-"], stdin=script)

    # --- what tests do to a running router ----------------------------------------------

    def drop(self, rule: str) -> None:
        """Add a `drop_rule(...)` to the `drops` chain: matching packets die in both
        directions of forwarding, until `clear_drops()`."""
        self.nft(f"add rule ip {TABLE} drops {rule}\n")

    def clear_drops(self) -> None:
        self.nft(f"flush chain ip {TABLE} drops\n")

    def flush_conntrack(self) -> None:
        """Forget every NAT mapping and every admitted flow (a router reboot, as far as
        the traffic can tell)."""
        self.ns.run(["conntrack", "-F"], check=False)  # exit 1 when the table was empty

    def conntrack(self) -> str:
        """The router's conntrack table, one entry a line (diagnostics)."""
        return self.ns.run(["conntrack", "-L"], check=False).stdout

    def set_wan_address(self, address: ipaddress.IPv4Interface) -> None:
        """Renumber the WAN side (the ISP gave a new public address). Masquerade forgets
        the mappings made with the old address."""
        self.ns.ip("address", "add", address.with_prefixlen, "dev", WAN_IF)
        self.ns.ip("address", "del", self.wan_address.with_prefixlen, "dev", WAN_IF)
        self.wan_address = address

    def set_link(self, side: str, up: bool) -> None:
        """Take the WAN or LAN link (`"wan"`, `"lan"`) down or up."""
        if side not in (WAN_IF, LAN_IF):
            raise LabError(f"router {self.name}: no link {side!r}")
        self.ns.ip("link", "set", side, "up" if up else "down")

    def diagnostics(self) -> str:
        parts = [f"===== router {self.name} ({self.ns.name}) {self.spec.kind.name}"]
        for title, argv in (
            ("ip address", ["ip", "-br", "address"]),
            ("nft list ruleset", ["nft", "list", "ruleset"]),
            ("conntrack -L", ["conntrack", "-L"]),
        ):
            result = self.ns.run(argv, check=False)
            parts.append(f"----- {title}\n{(result.stdout + result.stderr).rstrip()}")
        return "\n".join(parts)

    def destroy(self) -> None:
        self.ns.destroy()

    def __repr__(self) -> str:
        return f"Router({self.name!r}, {self.public_ip})"
