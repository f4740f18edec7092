"""The relay's forwarding as data: the pairs a relay carries and the nftables table that
forwards between their sides, statelessly.

    table inet kubespan_relay
      chain prerouting (raw, before conntrack)   a WireGuard-shaped packet from a bound side's
                                                 mapping to that side's relay port: untracked,
                                                 and sent on to the other side's mapping
      chain exempt (after the member table)      the same packets, sent on: out of this
                                                 node's own tunnel (they are WireGuard's
                                                 already), whoever the other side is
      chain postrouting                          the same packets, once routed: from the
                                                 relay's address and the other side's port

Each relayed pair holds two ports of the relay's, one per side. Side A sends to port_a and
its packets reach B from port_b, the port B sends to: both WireGuard peers see the relay's
address and a fixed port as the other's endpoint, and neither NAT needs more than the
mapping its side opened by sending to the relay. The relay never holds a key that could
open what it forwards.

Every packet is judged on its own, without conntrack: only a WireGuard-shaped packet (its
type, 1 to 4, then three zero bytes) from the bound mapping of a side is forwarded. Anything
else sent to a relay port (the bind messages that set up a pair, a stranger's packets)
reaches the relay's own sockets as before; nothing is left in conntrack that could keep
forwarding to an old mapping when a pair changes. The source is rewritten after routing, in
postrouting: rewritten before, a packet from one of the relay's own addresses arriving from
outside would be dropped as a martian.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from kubespan.names import MARK_TUNNEL
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.relay.ports import PortRange

_NOT_TUNNEL = 0xFFFFFFFF & ~MARK_TUNNEL
RELAY_FAMILY = "inet"
RELAY_TABLE = "kubespan_relay"
# A WireGuard message's first four bytes, read as one big-endian number: type 1 to 4
# (initiation, response, cookie reply, data) and three reserved zero bytes.
WIREGUARD_HEADERS = "0x01000000, 0x02000000, 0x03000000, 0x04000000"


@dataclass(frozen=True)
class RelaySide:
    """One side of a relayed pair: the relay port it sends to, and where its packets come
    from as the relay sees them (its NAT's mapping towards that port). `address`: the relay's
    address this side sends to, when not the pair's (a relay with several addresses, each
    side reaching it at another)."""

    port: int
    mapping: Endpoint
    address: IPAddress | None = None


@dataclass(frozen=True)
class RelayedPair:
    """Two sides the relay forwards between, at one of its own addresses."""

    address: IPAddress
    first: RelaySide
    second: RelaySide

    def __post_init__(self) -> None:
        for side in (self.first, self.second):
            if not 1 <= side.port <= 65535:
                raise ValueError(f"relay port {side.port} is not a UDP port")
            versions = {side.mapping.address.version, self.relay_address(side).version}
            if versions != {self.address.version}:
                raise ValueError(
                    f"relay address {self.address} and side {side.mapping} are of different "
                    "IP versions"
                )
        if self.first.port == self.second.port:
            raise ValueError(f"both sides of a relayed pair use port {self.first.port}")

    @property
    def ports(self) -> tuple[int, int]:
        return (self.first.port, self.second.port)

    def relay_address(self, side: RelaySide) -> IPAddress:
        """The relay's address `side` sends to (and receives the other side's packets from)."""
        return side.address if side.address is not None else self.address

    def directions(self) -> tuple[tuple[RelaySide, RelaySide], tuple[RelaySide, RelaySide]]:
        return ((self.first, self.second), (self.second, self.first))


@dataclass(frozen=True)
class RelaySpec:
    """Everything the relay forwards; the table holds exactly these pairs."""

    pairs: tuple[RelayedPair, ...]
    # The relay's ports: the kernel's "port unreachable" for the binds sent to them (no
    # socket holds them; raw sockets read the binds) is not sent.
    ports: PortRange | None = None

    def __post_init__(self) -> None:
        seen: dict[tuple[IPAddress, int], RelayedPair] = {}
        for pair in self.pairs:
            for side in (pair.first, pair.second):
                address = pair.relay_address(side)
                taken = seen.setdefault((address, side.port), pair)
                if taken is not pair:
                    raise ValueError(f"relay port {side.port} on {address} is in two pairs")

    @classmethod
    def of(
        cls, pairs: list[RelayedPair] | tuple[RelayedPair, ...], ports: PortRange | None = None
    ) -> RelaySpec:
        """The spec of these pairs, in a stable order (the same pairs render the same)."""
        return cls(tuple(sorted(pairs, key=_pair_order)), ports)

    def render(self) -> str:
        prerouting: list[str] = []
        exempt: list[str] = []
        postrouting: list[str] = []
        counters: list[str] = []
        redirects: list[str] = []
        for pair in self.pairs:
            ip = "ip" if pair.address.version == 4 else "ip6"
            for sender, receiver in pair.directions():
                source, target = sender.mapping, receiver.mapping
                counters.append(f"  counter {counter_name(sender.port)} {{ }}")
                from_source = f"{ip} saddr {source.address} udp sport {source.port}"
                prerouting.append(
                    f"    {ip} daddr {pair.relay_address(sender)} udp dport {sender.port} "
                    f"{from_source} "
                    f"@th,64,32 {{ {WIREGUARD_HEADERS} }} notrack "
                    f'counter name "{counter_name(sender.port)}" '
                    f"{ip} daddr set {target.address} udp dport set {target.port}"
                )
                forwarded = f"{from_source} {ip} daddr {target.address} udp dport {target.port}"
                # Already encrypted end to end: never pulled into this node's own tunnel,
                # even when the other side's mapping is a member's address.
                exempt.append(
                    f"{forwarded} @th,64,32 {{ {WIREGUARD_HEADERS} }} ct state untracked "
                    f"meta mark set meta mark & {_NOT_TUNNEL:#010x}"
                )
                postrouting.append(
                    f"    {forwarded} {ip} saddr set {pair.relay_address(receiver)} "
                    f"udp sport set {receiver.port}"
                )
                if ip == "ip":
                    # A relay with one interface forwards out where packets came in, and the
                    # kernel would tell the sender's NAT to "go directly" (an ICMP redirect
                    # quoting the packet, source address at bit 160, source port at 224).
                    redirects.append(
                        "    icmp type redirect "
                        f"@th,160,32 {int(source.address):#010x} @th,224,16 {source.port} drop"
                    )
        return "\n".join(
            [
                f"table {RELAY_FAMILY} {RELAY_TABLE} {{",
                *counters,
                "  chain prerouting {",
                "    type filter hook prerouting priority raw; policy accept;",
                *prerouting,
                "  }",
                "  chain exempt {",
                # After the member table's prerouting chain (filter), before routing.
                "    type filter hook prerouting priority 10; policy accept;",
                *(f"    {rule}" for rule in exempt),
                "  }",
                "  chain postrouting {",
                "    type filter hook postrouting priority srcnat; policy accept;",
                *postrouting,
                "  }",
                *self._quiet(redirects),
                "}",
            ]
        )

    def _quiet(self, redirects: list[str]) -> list[str]:
        """ICMP the kernel would send about what the relay does, and must not."""
        rules = list(redirects)
        if self.ports is not None:
            span = f"{self.ports.first}-{self.ports.first + self.ports.count - 1}"
            # "Port unreachable" for the binds (no socket holds the relay's ports; raw
            # sockets read the binds): the quoted datagram's destination port follows the
            # ICMP header (8 bytes) and the quoted IP header (20 for IPv4 without options,
            # 40 for IPv6).
            rules += [
                "    icmp type destination-unreachable icmp code port-unreachable "
                f"@th,240,16 {span} drop",
                "    icmpv6 type destination-unreachable icmpv6 code port-unreachable "
                f"@th,400,16 {span} drop",
            ]
        if not rules:
            return []
        return [
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            *rules,
            "  }",
        ]

    def batch(self) -> str:
        """One nft script, one transaction, that replaces the table whole."""
        return f"{teardown_batch()}{self.render()}\n"

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.render().encode()).hexdigest()[:32]


def counter_name(port: int) -> str:
    """The named counter of what one side sends through its relay port."""
    return f"side_{port}"


def teardown_batch() -> str:
    """Delete the table, whether it exists or not."""
    return f"add table {RELAY_FAMILY} {RELAY_TABLE}\ndelete table {RELAY_FAMILY} {RELAY_TABLE}\n"


def _pair_order(pair: RelayedPair) -> tuple[int, int, int, int]:
    return (pair.address.version, int(pair.address), pair.first.port, pair.second.port)
