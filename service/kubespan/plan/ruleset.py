"""Selective encryption as data: the member set, the nftables table that marks traffic to
members, and the policy routing that sends marked traffic into the tunnel.

    table inet kubespan
      set members_v4/members_v6   every member's allowed IPs but the ULAs, prefixes collapsed
      chain prerouting (filter)   forwarded traffic (pods): mark members' traffic
      chain output (route)        local traffic: same, after WireGuard's own packets and
                                  loopback are let through, with TCP MSS clamped to the tunnel
    ip rule  priority 32500 fwmark 0x40/0x60 lookup 180            (IPv4 and IPv6)
    table 180: default dev kubespan mtu MTU, and an unreachable default behind it, so marked
               traffic never falls through to the main table in the clear

Only the bits 0x60 of the mark are touched: 0x20 is WireGuard's own encrypted packets (set
by the device's fwmark), 0x40 forces a packet into the tunnel. Other programs' mark bits
(Cilium 0xf00, Calico 0xffff0000, Flannel 0x4000) pass through unchanged.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kubespan.names import (
    LINK_NAME,
    MARK_MASK,
    MARK_TUNNEL,
    MARK_WIREGUARD,
    NFT_FAMILY,
    NFT_TABLE,
    ROUTE_TABLE,
    RULE_PRIORITY,
)
from kubespan.netaddr import IPNetwork

TABLE = NFT_TABLE
FAMILY = NFT_FAMILY
SET_V4 = "members_v4"
SET_V6 = "members_v6"
CHAIN_PREROUTING = "prerouting"
CHAIN_OUTPUT = "output"
# mangle priority + 1: after conntrack and other mangle chains set their marks.
CHAIN_PRIORITY = -149
MSS_OVERHEAD_V4 = 52
MSS_OVERHEAD_V6 = 72
UNREACHABLE_METRIC = 0xFFFFFFFF
FINGERPRINT_PREFIX = "kubespan fingerprint "

_KEEP_MARK = 0xFFFFFFFF & ~MARK_MASK


@dataclass(frozen=True)
class RulesetSpec:
    """The whole `inet kubespan` table. Applied as one atomic nftables transaction."""

    members_v4: tuple[IPNetwork, ...]
    members_v6: tuple[IPNetwork, ...]
    mtu: int

    def render(self) -> str:
        """The table in nft syntax: what an operator reads, and what the fingerprint covers."""
        v4 = ", ".join(str(n) for n in self.members_v4)
        v6 = ", ".join(str(n) for n in self.members_v6)
        mark = f"meta mark set meta mark & {_KEEP_MARK:#010x} | {MARK_TUNNEL:#04x}"
        own = f"meta mark & {MARK_MASK:#04x} == {MARK_WIREGUARD:#04x} accept"
        lines = [
            f"table {FAMILY} {TABLE} {{",
            f"  set {SET_V4} {{ type ipv4_addr; flags interval; elements = {{ {v4} }} }}",
            f"  set {SET_V6} {{ type ipv6_addr; flags interval; elements = {{ {v6} }} }}",
            f"  chain {CHAIN_PREROUTING} {{",
            f"    type filter hook prerouting priority {CHAIN_PRIORITY}; policy accept;",
            f"    {own}",
            f"    ip daddr @{SET_V4} {mark}",
            f"    ip6 daddr @{SET_V6} {mark}",
            "  }",
            f"  chain {CHAIN_OUTPUT} {{",
            f"    type route hook output priority {CHAIN_PRIORITY}; policy accept;",
            f"    {own}",
            '    oifname "lo" accept',
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

    @property
    def mss_v4(self) -> int:
        return self.mtu - MSS_OVERHEAD_V4

    @property
    def mss_v6(self) -> int:
        return self.mtu - MSS_OVERHEAD_V6

    @cached_property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.render().encode()).hexdigest()[:32]

    @property
    def rule_counts(self) -> dict[str, int]:
        return {CHAIN_PREROUTING: 3, CHAIN_OUTPUT: 6}

    @property
    def set_sizes(self) -> dict[str, int]:
        return {SET_V4: len(self.members_v4), SET_V6: len(self.members_v6)}

    def to_json(self) -> dict[str, Any]:
        """One batch that replaces the table whole: add (so delete cannot fail), delete, add."""
        table = {"family": FAMILY, "name": TABLE}
        commands: list[dict[str, Any]] = [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            {"add": {"table": table}},
            {"add": {"set": _set(SET_V4, "ipv4_addr", self.members_v4)}},
            {"add": {"set": _set(SET_V6, "ipv6_addr", self.members_v6)}},
            {"add": {"chain": _chain(CHAIN_PREROUTING, "filter", "prerouting")}},
            {"add": {"chain": _chain(CHAIN_OUTPUT, "route", "output")}},
        ]
        comment = FINGERPRINT_PREFIX + self.fingerprint
        prerouting = [
            [*_wireguard_own(), {"accept": None}],
            [_daddr("ip", SET_V4), _set_mark()],
            [_daddr("ip6", SET_V6), _set_mark()],
        ]
        output = [
            [*_wireguard_own(), {"accept": None}],
            [_match({"meta": {"key": "oifname"}}, "lo"), {"accept": None}],
            _clamp("ip", SET_V4, self.mss_v4),
            _clamp("ip6", SET_V6, self.mss_v6),
            [_daddr("ip", SET_V4), _set_mark()],
            [_daddr("ip6", SET_V6), _set_mark()],
        ]
        for chain, rules in ((CHAIN_PREROUTING, prerouting), (CHAIN_OUTPUT, output)):
            for index, expr in enumerate(rules):
                rule: dict[str, Any] = {
                    "family": FAMILY,
                    "table": TABLE,
                    "chain": chain,
                    "expr": expr,
                }
                if chain == CHAIN_PREROUTING and index == 0:
                    rule["comment"] = comment
                commands.append({"add": {"rule": rule}})
        return {"nftables": commands}


def teardown_json() -> dict[str, Any]:
    table = {"family": FAMILY, "name": TABLE}
    return {"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]}


def _set(name: str, kind: str, networks: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": kind,
        "flags": ["interval"],
    }
    if networks:
        out["elem"] = [
            {"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in networks
        ]
    return out


def _chain(name: str, kind: str, hook: str) -> dict[str, Any]:
    return {
        "family": FAMILY,
        "table": TABLE,
        "name": name,
        "type": kind,
        "hook": hook,
        "prio": CHAIN_PRIORITY,
        "policy": "accept",
    }


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _mark() -> dict[str, Any]:
    return {"meta": {"key": "mark"}}


def _wireguard_own() -> list[dict[str, Any]]:
    return [_match({"&": [_mark(), MARK_MASK]}, MARK_WIREGUARD)]


def _daddr(protocol: str, set_name: str) -> dict[str, Any]:
    return _match({"payload": {"protocol": protocol, "field": "daddr"}}, f"@{set_name}")


def _set_mark() -> dict[str, Any]:
    return {"mangle": {"key": _mark(), "value": {"|": [{"&": [_mark(), _KEEP_MARK]}, MARK_TUNNEL]}}}


def _clamp(protocol: str, set_name: str, mss: int) -> list[dict[str, Any]]:
    maxseg = {"tcp option": {"name": "maxseg", "field": "size"}}
    return [
        _daddr(protocol, set_name),
        _match({"payload": {"protocol": "tcp", "field": "flags"}}, "syn", op="in"),
        _match(maxseg, mss, op=">"),
        {"mangle": {"key": maxseg, "value": mss}},
    ]


@dataclass(frozen=True)
class RuleSpec:
    """An ip rule. Ours are those at our priority that look up our table."""

    family: int  # 4 or 6
    fwmark: int = MARK_TUNNEL
    mask: int = MARK_MASK
    priority: int = RULE_PRIORITY
    table: int = ROUTE_TABLE

    def render(self, action: str = "add") -> str:
        return (
            f"ip -{self.family} rule {action} priority {self.priority} "
            f"fwmark {self.fwmark:#x}/{self.mask:#x} lookup {self.table}"
        )


@dataclass(frozen=True)
class RouteSpec:
    """A default route in table 180: via the link, or (link None) unreachable, as the floor."""

    family: int
    link: str | None
    mtu: int | None

    @property
    def key(self) -> tuple[int, bool]:
        return self.family, self.link is None

    def render(self, action: str = "replace") -> str:
        if self.link is None:
            return (
                f"ip -{self.family} route {action} unreachable default table {ROUTE_TABLE} "
                f"metric {UNREACHABLE_METRIC}"
            )
        return (
            f"ip -{self.family} route {action} default dev {self.link} table {ROUTE_TABLE} "
            f"mtu {self.mtu}"
        )


@dataclass(frozen=True)
class RoutingSpec:
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]


def routing_spec(mtu: int, link: str = LINK_NAME) -> RoutingSpec:
    return RoutingSpec(
        rules=(RuleSpec(4), RuleSpec(6)),
        routes=tuple(
            route
            for family in (4, 6)
            for route in (RouteSpec(family, link, mtu), RouteSpec(family, None, None))
        ),
    )
