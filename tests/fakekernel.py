"""An in-memory stand-in for the kernel shell, for unit and loopback tests of pure logic.

It applies the planner's operations to an ObservedLink the way the kernel would (allowed IPs
replaced, endpoints set, peers removed), so tests can check that a second pass changes nothing.
It proves nothing about the real kernel: the VM suite does that.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from kubespan.identity import LinkHardware
from kubespan.model import LocalAddress, ObservedLink, ObservedPeer
from kubespan.plan.dataplane import (
    AddRule,
    DataplaneOperation,
    DeleteRoute,
    DeleteRule,
    DeleteRuleset,
    ObservedRouting,
    ReplaceRoute,
    ReplaceRuleset,
    SetRpFilter,
    expected_ruleset,
)
from kubespan.plan.diff import (
    AddAddress,
    ConfigureDevice,
    CreateLink,
    LinkOperation,
    NudgePeer,
    Operation,
    RemoveAddress,
    RemovePeer,
    SetLinkMtu,
    SetLinkUp,
    SetPeer,
)
from kubespan.plan.ruleset import RulesetSpec

T = TypeVar("T")


@dataclass
class FakeKernel:
    addresses: tuple[LocalAddress, ...] = ()
    hardware: tuple[LinkHardware, ...] = ()
    link: ObservedLink | None = None
    routing: ObservedRouting = field(default_factory=lambda: ObservedRouting(None, (), (), None))
    applied: list[str] = field(default_factory=list)
    nudged: list[str] = field(default_factory=list)
    probed: list[ipaddress.IPv6Address] = field(default_factory=list)
    probes_fail: bool = False
    last_ruleset: RulesetSpec | None = None

    def observe_link(self, name: str) -> ObservedLink | None:
        return self.link

    def probe(self, targets: Sequence[ipaddress.IPv6Address]) -> int:
        self.probed.extend(targets)
        return 0 if self.probes_fail else len(targets)

    def observe_routing(self, link: str) -> ObservedRouting:
        rp_filter = self.routing.rp_filter if self.link is not None else None
        return replace(self.routing, rp_filter=rp_filter)

    def local_addresses(self) -> tuple[LocalAddress, ...]:
        return self.addresses

    def link_hardware(self) -> tuple[LinkHardware, ...]:
        return self.hardware

    def teardown(self) -> list[str]:
        removed = []
        if self.routing.ruleset is not None:
            removed.append("nftables table inet kubespan")
        removed += [r.render("del") for r in self.routing.rules]
        removed += [r.render("del") for r in self.routing.routes]
        self.routing = ObservedRouting(None, (), (), None)
        if self.link is not None:
            removed.append("link kubespan")
        self.link = None
        return removed

    def apply(self, operations: list[Operation]) -> None:
        for op in operations:
            self.applied.append(op.render())
            self._apply(op)

    def handshake(self, public_key: str, when: float) -> None:
        """The peer completed a handshake (92 bytes received: its response)."""
        self.receive(public_key, 92, when)

    def transmit(self, public_key: str, size: int) -> None:
        """Bytes sent to the peer (handshake initiations to a dead one, keepalives)."""
        assert self.link is not None
        peers = tuple(
            replace(p, tx_bytes=p.tx_bytes + size) if p.public_key == public_key else p
            for p in self.link.peers
        )
        self.link = replace(self.link, peers=peers)

    def receive(self, public_key: str, size: int, handshake: float | None = None) -> None:
        """Authenticated bytes from the peer (and a new handshake time, if given)."""
        assert self.link is not None
        peers = tuple(
            replace(
                p,
                rx_bytes=p.rx_bytes + size,
                last_handshake=p.last_handshake if handshake is None else handshake,
            )
            if p.public_key == public_key
            else p
            for p in self.link.peers
        )
        self.link = replace(self.link, peers=peers)

    def _apply(self, op: Operation) -> None:
        if not isinstance(op, LinkOperation):
            self.routing = self._apply_dataplane(self.routing, op)
            return
        if isinstance(op, CreateLink):
            self.link = ObservedLink(1420, False, (), None, 0, 0, ())
            self.routing = replace(self.routing, rp_filter=2)  # systemd-sysctl's wildcard
            return
        link = self.link
        assert link is not None, f"{op.render()} on a missing link"
        match op:
            case SetLinkMtu(mtu=mtu):
                link = replace(link, mtu=mtu)
            case SetLinkUp():
                link = replace(link, up=True)
            case AddAddress(address=address):
                link = replace(link, addresses=(*link.addresses, address))
            case RemoveAddress(address=address):
                link = replace(link, addresses=tuple(a for a in link.addresses if a != address))
            case ConfigureDevice():
                link = replace(
                    link,
                    private_key=op.private_key if op.private_key is not None else link.private_key,
                    listen_port=op.listen_port if op.listen_port is not None else link.listen_port,
                    fwmark=op.fwmark if op.fwmark is not None else link.fwmark,
                )
            case SetPeer():
                link = replace(link, peers=self._set_peer(link.peers, op))
            case RemovePeer(public_key=key):
                link = replace(link, peers=tuple(p for p in link.peers if p.public_key != key))
            case NudgePeer(public_key=key):
                assert any(p.public_key == key for p in link.peers), "nudge of a missing peer"
                self.nudged.append(key)
        self.link = link

    def _apply_dataplane(self, have: ObservedRouting, op: DataplaneOperation) -> ObservedRouting:
        match op:
            case ReplaceRuleset(spec=spec):
                self.last_ruleset = spec
                return replace(have, ruleset=expected_ruleset(spec))
            case DeleteRuleset():
                return replace(have, ruleset=None)
            case AddRule(rule=rule):
                return replace(have, rules=(*have.rules, rule))
            case DeleteRule(rule=rule):
                return replace(have, rules=_without_first(have.rules, rule))
            case ReplaceRoute(route=route):
                # The kernel replaces the first route under the key, or adds one.
                assert route.link is None or self.link is not None, "route via a missing link"
                keys = [r.key for r in have.routes]
                at = keys.index(route.key) if route.key in keys else len(keys)
                return replace(have, routes=(*have.routes[:at], route, *have.routes[at + 1 :]))
            case DeleteRoute(route=route):
                return replace(have, routes=_without_first(have.routes, route))
            case SetRpFilter(value=value):
                assert self.link is not None, "rp_filter of a missing link"
                return replace(have, rp_filter=value)
        raise AssertionError(f"unknown operation {op}")

    @staticmethod
    def _set_peer(peers: tuple[ObservedPeer, ...], op: SetPeer) -> tuple[ObservedPeer, ...]:
        current = next((p for p in peers if p.public_key == op.public_key), None)
        if current is None:
            current = ObservedPeer(op.public_key, None, (), 0, None, 0, 0, "")
        updated = replace(
            current,
            preshared_key=op.preshared_key
            if op.preshared_key is not None
            else current.preshared_key,
            endpoint=op.endpoint if op.endpoint is not None else current.endpoint,
            keepalive=op.keepalive if op.keepalive is not None else current.keepalive,
            allowed_ips=op.allowed_ips if op.allowed_ips is not None else current.allowed_ips,
        )
        # WireGuard moves an allowed IP to the peer that was given it last.
        moved = set(op.allowed_ips or ())
        out = []
        for peer in peers:
            if peer.public_key != op.public_key:
                kept = tuple(n for n in peer.allowed_ips if n not in moved)
                out.append(replace(peer, allowed_ips=kept))
        out.append(updated)
        return tuple(sorted(out, key=lambda p: p.public_key))


def _without_first(items: tuple[T, ...], item: T) -> tuple[T, ...]:
    """What the kernel does on delete: the first equal object goes (routes and rules may
    repeat)."""
    if item not in items:
        return items
    at = items.index(item)
    return (*items[:at], *items[at + 1 :])


def local_address(interface: str, cidr: str, scope: int = 0, up: bool = True) -> LocalAddress:
    return LocalAddress(interface, ipaddress.ip_interface(cidr), scope, up, "")
