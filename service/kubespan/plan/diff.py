"""Diff the desired state against what the kernel has, as a list of operations keyed by identity.

Each operation renders as the `ip`/`wg` command an operator would type, for logs and golden
tests; secrets render as `(hidden)`. An unchanged state yields no operations at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from kubespan.model import DesiredState, LinkSpec, ObservedLink, ObservedPeer, PeerSpec
from kubespan.netaddr import Endpoint, IPNetwork, network_sort_key
from kubespan.plan.dataplane import DataplaneOperation, ObservedRouting, SetRpFilter, diff_dataplane
from kubespan.plan.routing import UNREACHABLE


@dataclass(frozen=True)
class CreateLink:
    name: str

    def render(self) -> str:
        return f"ip link add {self.name} type wireguard"


@dataclass(frozen=True)
class SetLinkMtu:
    name: str
    mtu: int

    def render(self) -> str:
        return f"ip link set {self.name} mtu {self.mtu}"


@dataclass(frozen=True)
class SetLinkUp:
    name: str

    def render(self) -> str:
        return f"ip link set {self.name} up"


@dataclass(frozen=True)
class AddAddress:
    name: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    def render(self) -> str:
        return f"ip address add {self.address} dev {self.name}"


@dataclass(frozen=True)
class RemoveAddress:
    name: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    def render(self) -> str:
        return f"ip address del {self.address} dev {self.name}"


@dataclass(frozen=True)
class ConfigureDevice:
    name: str
    private_key: str | None = field(repr=False)
    listen_port: int | None
    fwmark: int | None

    def render(self) -> str:
        parts = [f"wg set {self.name}"]
        if self.private_key is not None:
            parts.append("private-key (hidden)")
        if self.listen_port is not None:
            parts.append(f"listen-port {self.listen_port}")
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}")
        return " ".join(parts)


@dataclass(frozen=True)
class SetPeer:
    """Create a peer or change some of its settings (None: leave unchanged)."""

    name: str
    public_key: str
    label: str
    preshared_key: str | None = field(repr=False)
    endpoint: Endpoint | None
    keepalive: int | None
    allowed_ips: tuple[IPNetwork, ...] | None

    def render(self) -> str:
        parts = [f"wg set {self.name} peer {self.public_key}"]
        if self.preshared_key is not None:
            parts.append("preshared-key (hidden)")
        if self.endpoint is not None:
            parts.append(f"endpoint {self.endpoint}")
        if self.keepalive is not None:
            parts.append(f"persistent-keepalive {self.keepalive}")
        if self.allowed_ips is not None:
            parts.append("allowed-ips " + (",".join(str(n) for n in self.allowed_ips) or '""'))
        return " ".join(parts) + f"  # {self.label}"


@dataclass(frozen=True)
class RemovePeer:
    name: str
    public_key: str

    def render(self) -> str:
        return f"wg set {self.name} peer {self.public_key} remove"


@dataclass(frozen=True)
class NudgePeer:
    """Make WireGuard send to the peer at once: persistent keepalive off, then on again (the
    kernel sends a keepalive, or starts a handshake when there is no session, when it goes
    from off to on). Starts an endpoint trial, and tells peers where we are after we moved."""

    name: str
    public_key: str
    label: str
    keepalive: int

    def render(self) -> str:
        return (
            f"wg set {self.name} peer {self.public_key} persistent-keepalive 0 "
            f"&& wg set {self.name} peer {self.public_key} persistent-keepalive {self.keepalive}"
            f"  # {self.label}"
        )


LinkOperation = (
    CreateLink
    | SetLinkMtu
    | SetLinkUp
    | AddAddress
    | RemoveAddress
    | ConfigureDevice
    | SetPeer
    | RemovePeer
    | NudgePeer
)
Operation = LinkOperation | DataplaneOperation


def diff_link(link: LinkSpec, observed: ObservedLink | None) -> list[LinkOperation]:
    ops: list[LinkOperation] = []
    if observed is None:
        ops.append(CreateLink(link.name))
    if observed is None or observed.mtu != link.mtu:
        ops.append(SetLinkMtu(link.name, link.mtu))
    present = set(observed.addresses) if observed else set()
    for stale in sorted(present - {link.address}, key=str):
        ops.append(RemoveAddress(link.name, stale))
    if link.address not in present:
        ops.append(AddAddress(link.name, link.address))
    private_key = (
        link.private_key if observed is None or observed.private_key != link.private_key else None
    )
    port = (
        link.listen_port if observed is None or observed.listen_port != link.listen_port else None
    )
    fwmark = link.fwmark if observed is None or observed.fwmark != link.fwmark else None
    if (private_key, port, fwmark) != (None, None, None):
        ops.append(ConfigureDevice(link.name, private_key, port, fwmark))
    if observed is None or not observed.up:
        ops.append(SetLinkUp(link.name))
    return ops


def diff_peer(link: LinkSpec, want: PeerSpec, have: ObservedPeer | None) -> SetPeer | None:
    if have is None:
        return SetPeer(
            link.name,
            want.public_key,
            want.name,
            link.preshared_key,
            want.endpoint,
            want.keepalive,
            _sorted_ips(want.allowed_ips),
        )
    psk = link.preshared_key if have.preshared_key != link.preshared_key else None
    endpoint = (
        want.endpoint if want.endpoint is not None and want.endpoint != have.endpoint else None
    )
    keepalive = want.keepalive if have.keepalive != want.keepalive else None
    same = _same_ips(want.public_key, have.allowed_ips, want.allowed_ips)
    ips = None if same else _sorted_ips(want.allowed_ips)
    if (psk, endpoint, keepalive, ips) == (None, None, None, None):
        return None
    return SetPeer(link.name, want.public_key, want.name, psk, endpoint, keepalive, ips)


# Per peer, the kernel's and the wanted allowed-IP lists last found to hold the same
# networks. Both are the same objects pass after pass (the dump's parser and the planner
# keep them), so a peer that answers (a new kernel peer at every pass: its counters moved)
# costs two pointer comparisons here, not a sort and a comparison of every network. The
# lists are held: no other object can come to have their identity.
_SAME_IPS: dict[str, tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]] = {}


def _same_ips(key: str, have: tuple[IPNetwork, ...], want: tuple[IPNetwork, ...]) -> bool:
    last = _SAME_IPS.get(key)
    if last is not None and last[0] is have and last[1] is want:
        return True
    wanted = _sorted_ips(want)
    # Both sorted alike (the kernel's as parsed): equal tuples are the common case, and
    # cheaper than hashing every network; the sets judge what differs in order only.
    same = have == wanted or set(have) == set(wanted)
    if same:
        if len(_SAME_IPS) >= _UNCHANGED_MAX:
            _SAME_IPS.clear()
        _SAME_IPS[key] = (have, want)
    return same


def _sorted_ips(networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(networks, key=network_sort_key))


def diff(
    desired: DesiredState,
    observed: ObservedLink | None,
    routing: ObservedRouting | None = None,
) -> list[Operation]:
    """Operations that turn what the kernel has into `desired`, touching only what differs,
    in an order that never lets member traffic out in the clear: the link, then routes and
    rules (marked traffic can only go into the tunnel or nowhere), then marking, and peers
    last. A peer added before its marking could deliver a member's packet whose answer then
    follows the main table unencrypted; marked traffic to a peer not yet configured is only
    dropped (fail closed) for the moment it takes."""
    if observed is not None and observed.foreign:
        return blocked_by_foreign_link(desired, routing)
    ops: list[Operation] = list(diff_link(desired.link, observed))
    routing_ops, marking_ops = diff_dataplane(
        desired.ruleset, desired.routing, desired.link.name, routing
    )
    ops.extend(routing_ops)
    ops.extend(marking_ops)
    have = observed.peer_by_key if observed else {}
    wanted = {p.public_key for p in desired.peers}
    for key in sorted(have.keys() - wanted):
        ops.append(RemovePeer(desired.link.name, key))
    link, preshared_key = desired.link, desired.link.preshared_key
    seen_of, unchanged_of = have.get, _UNCHANGED.get
    for peer in desired.peers:
        seen = seen_of(peer.public_key)
        kept = unchanged_of(peer.public_key)
        if (
            kept is not None
            and kept[0] is peer
            and kept[2] == preshared_key
            and seen is not None
            and (kept[1] is seen or _only_counters_moved(kept[1], seen))
        ):
            continue
        change = diff_peer(link, peer, seen)
        if change is not None:
            ops.append(change)
        elif seen is not None:
            _remember_unchanged(peer, seen, preshared_key)
    return ops


# Peers found to need nothing, by public key: the wanted and the kernel's peer (compared by
# identity: the planner's memo and the kernel dump's parser hand out the same objects while
# nothing changed, so an idle pass compares pointers, not a hundred peers' fields) and the
# preshared key they were compared under.
_UNCHANGED: dict[str, tuple[PeerSpec, ObservedPeer, str]] = {}
_UNCHANGED_MAX = 4096


def _only_counters_moved(before: ObservedPeer, now: ObservedPeer) -> bool:
    """Whether the kernel's peer is `before` but for what diff_peer does not read (its
    counters and handshake): told by identity, as the dump's parser hands a peer that only
    answered out with the very field objects it had (a live mesh: every peer, every pass)."""
    return (
        now.endpoint is before.endpoint
        and now.allowed_ips is before.allowed_ips
        and now.preshared_key is before.preshared_key
        and now.keepalive == before.keepalive
    )


def _remember_unchanged(peer: PeerSpec, seen: ObservedPeer, preshared_key: str) -> None:
    if len(_UNCHANGED) >= _UNCHANGED_MAX:
        _UNCHANGED.clear()
    _UNCHANGED[peer.public_key] = (peer, seen, preshared_key)


def restart_peers(
    operations: list[Operation], desired: DesiredState, keys: Iterable[str]
) -> list[Operation]:
    """`operations` with these peers removed and created anew (last, as peers are), in
    place of any change to them."""
    restarted = set(keys)
    by_key = {p.public_key: p for p in desired.peers if p.public_key in restarted}
    kept = [
        op
        for op in operations
        if not (isinstance(op, SetPeer | RemovePeer) and op.public_key in by_key)
    ]
    for key in sorted(by_key):
        kept.append(RemovePeer(desired.link.name, key))
        created = diff_peer(desired.link, by_key[key], None)
        if created is not None:
            kept.append(created)
    return kept


def blocked_by_foreign_link(
    desired: DesiredState, routing: ObservedRouting | None
) -> list[Operation]:
    """Another program's link holds our name: we neither touch it nor route into it. Member
    traffic is still marked, and table 180 keeps only its unreachable floor, so it is
    refused rather than sent in the clear or into a link that is not ours (fail closed)."""
    floor_only = replace(
        desired.routing, routes=tuple(r for r in desired.routing.routes if r.kind == UNREACHABLE)
    )
    routing_ops, marking_ops = diff_dataplane(
        desired.ruleset, floor_only, desired.link.name, routing
    )
    kept: list[Operation] = [op for op in routing_ops if not isinstance(op, SetRpFilter)]
    return kept + list(marking_ops)


def link_warnings(name: str, observed: ObservedLink | None) -> list[str]:
    if observed is None or not observed.foreign:
        return []
    return [
        f"a link named {name} of kind {observed.kind or 'unknown'} exists and is not kubespan's "
        "WireGuard link; traffic to members is blocked (not sent in the clear) until it is "
        f"removed or renamed (ip link del {name})"
    ]
