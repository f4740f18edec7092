"""Selective encryption as data: the member set and the nftables table that marks traffic to
members (policy routing, which sends marked traffic into the tunnel, is in plan.routing).

    table inet kubespan
      set members_v4/members_v6   every member's allowed IPs but the ULAs, prefixes collapsed
      chain prerouting (filter)   forwarded traffic (pods): mark members' traffic
      chain output (route)        local traffic: WireGuard's own packets, loopback and IPv6
                                  neighbour discovery pass, TCP MSS is clamped to the
                                  tunnel, members' traffic marked

Where the chains run. Netfilter runs the chains of one hook in order of priority: conntrack
(-200), mangle (-150), destination NAT (-100: kube-proxy's Service DNAT, on prerouting and
on output), filter (0), source NAT (100, postrouting only). Both our chains run at filter
priority, after destination NAT, so they see the address a packet really goes to:
- a packet to a Service address whose backend is a member has been rewritten to the member by
  the time we look, so it is marked (every packet of the connection: conntrack applies the NAT
  binding at -100 on each one); replies whose destination conntrack un-NATs are rewritten at
  the same point, before us;
- in prerouting the routing decision comes after every prerouting chain, so our mark decides
  the route of forwarded traffic;
- in output the NAT chain re-routes a packet whose destination it rewrote, then our chain sets
  the mark, and a `route` chain makes the kernel route the packet again when the mark changed:
  local traffic moves to table 180 after DNAT, as forwarded traffic does;
- conntrack (-200) and other programs' mangle chains (-150) have run before us; we neither
  depend on nor change conntrack state, and keep every mark bit but 0x60.

WireGuard's own packets. The kernel WireGuard socket marks its encrypted UDP with 0x20 (the
device's fwmark) and sends it from the listen port, which no other socket can bind while the
device holds it. A packet is let through unmarked only if it has both: the mark alone can be
anyone's (Istio's 0x539 has the 0x20 bit, and such UDP to a member went out in the clear).
Without the exception WireGuard's packets to a member's node address would loop into the
tunnel. The prerouting chain has no such exception: WireGuard's packets are generated locally
and never traverse prerouting, so a forwarded packet carrying 0x20 was marked by someone else
and must be encrypted like any other traffic to a member.

Only the bits 0x60 of the mark are touched: 0x20 is WireGuard's own encrypted packets, 0x40
forces a packet into the tunnel. Other programs' mark bits (Cilium 0xf00, Calico 0xffff0000,
Flannel 0x4000) pass through unchanged.
"""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from functools import cached_property

from kubespan.names import MARK_MASK, MARK_TUNNEL, MARK_WIREGUARD, NFT_FAMILY, NFT_TABLE
from kubespan.netaddr import IPNetwork
from kubespan.plan.routing import (
    UNREACHABLE_METRIC,
    RouteSpec,
    RoutingSpec,
    RuleSpec,
    routing_spec,
)

# Routing specs are re-exported: callers built them from this module before plan.routing.
__all__ = [
    "UNREACHABLE_METRIC",
    "RouteSpec",
    "RoutingSpec",
    "RuleSpec",
    "RulesetSpec",
    "routing_spec",
    "teardown_batch",
]

TABLE = NFT_TABLE
FAMILY = NFT_FAMILY
SET_V4 = "members_v4"
SET_V6 = "members_v6"
CHAIN_PREROUTING = "prerouting"
CHAIN_OUTPUT = "output"
# filter: after destination NAT (-100), see the module docstring.
CHAIN_PRIORITY = 0
MSS_OVERHEAD_V4 = 52
MSS_OVERHEAD_V6 = 72

_KEEP_MARK = 0xFFFFFFFF & ~MARK_MASK
RELAY_TAG = 0x4B537262  # "KSrb", relay.bind.TAG (kept here: the planner imports no relay)
RELAY_ANSWER_UDP_BYTES = 8 + 126  # UDP header + relay.bind.MESSAGE_BYTES
# Link-level control of IPv6, never data: a neighbour advertisement to a member's underlay
# address pulled into the tunnel means the neighbour is never resolved, and then not even
# WireGuard's own packets reach the member (an IPv6-only underlay stalled this way).
NEIGHBOUR_DISCOVERY = (
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "nd-redirect",
)


@dataclass(frozen=True)
class RulesetSpec:
    """The whole `inet kubespan` table. Applied as one atomic nftables transaction."""

    members_v4: tuple[IPNetwork, ...]
    members_v6: tuple[IPNetwork, ...]
    mtu: int
    listen_port: int
    # A relay's ports (first, count): its answers to binds (126-byte "KSrb" messages) leave
    # from them with WireGuard's mark and are never pulled into the tunnel; nothing else
    # from those ports is let out (any program can bind them).
    relay_ports: tuple[int, int] | None = None

    def render(self) -> str:
        """The table in nft syntax: what an operator reads, what the fingerprint covers, and
        (in `batch`) what is applied."""
        return self._text

    @cached_property
    def _text(self) -> str:
        mark = f"meta mark set meta mark & {_KEEP_MARK:#010x} | {MARK_TUNNEL:#04x}"
        hook = f"priority {CHAIN_PRIORITY}; policy accept;"
        lines = [
            f"table {FAMILY} {TABLE} {{",
            _set(SET_V4, "ipv4_addr", self.members_v4),
            _set(SET_V6, "ipv6_addr", self.members_v6),
            f"  chain {CHAIN_PREROUTING} {{",
            f"    type filter hook prerouting {hook}",
            f"    ip daddr @{SET_V4} {mark}",
            f"    ip6 daddr @{SET_V6} {mark}",
            "  }",
            f"  chain {CHAIN_OUTPUT} {{",
            f"    type route hook output {hook}",
            f"    meta l4proto udp udp sport {self.listen_port} "
            f"meta mark & {MARK_MASK:#04x} == {MARK_WIREGUARD:#04x} accept",
            *self._relay_answers(),
            '    oifname "lo" accept',
            f"    icmpv6 type {{ {', '.join(NEIGHBOUR_DISCOVERY)} }} accept",
            f"    ip daddr @{SET_V4} tcp flags syn tcp option maxseg size > {self.mss_v4} "
            f"tcp option maxseg size set {self.mss_v4}",
            f"    ip6 daddr @{SET_V6} tcp flags syn tcp option maxseg size > {self.mss_v6} "
            f"tcp option maxseg size set {self.mss_v6}",
            f"    ip daddr @{SET_V4} {mark}",
            f"    ip6 daddr @{SET_V6} {mark}",
            "  }",
            "}",
        ]
        return "\n".join(lines)

    def _relay_answers(self) -> list[str]:
        if self.relay_ports is None:
            return []
        first, count = self.relay_ports
        return [
            f"    meta l4proto udp udp sport {first}-{first + count - 1} "
            f"udp length {RELAY_ANSWER_UDP_BYTES} @th,64,32 {RELAY_TAG:#010x} "
            f"meta mark & {MARK_MASK:#04x} == {MARK_WIREGUARD:#04x} accept"
        ]

    def batch(self) -> str:
        """One nft script, one transaction, that replaces the table whole: add it (so that
        the delete cannot fail), delete it, and create it anew."""
        return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n{self.render()}\n"

    @property
    def mss_v4(self) -> int:
        return self.mtu - MSS_OVERHEAD_V4

    @property
    def mss_v6(self) -> int:
        return self.mtu - MSS_OVERHEAD_V6

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.render().encode()).hexdigest()[:32]


def teardown_batch() -> str:
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


def _set(name: str, kind: str, networks: tuple[IPNetwork, ...]) -> str:
    # nft refuses an empty `elements = { }`: an empty set has no elements clause.
    elements = f" elements = {{ {', '.join(map(_prefix, networks))} }};" if networks else ""
    return f"  set {name} {{ type {kind}; flags interval;{elements} }}"


def _prefix(network: IPNetwork) -> str:
    # inet_ntop: three times as fast as str() on ipaddress objects, for thousands of members.
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, network.network_address.packed)}/{network.prefixlen}"
