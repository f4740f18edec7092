"""Frozen values that flow between discovery, the planner and the kernel appliers."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from kubespan.netaddr import Endpoint, IPAddress, IPNetwork
from kubespan.plan.ruleset import RoutingSpec, RulesetSpec

PERSISTENT_KEEPALIVE = 25


@dataclass(frozen=True)
class AffiliateInfo:
    """What a node tells the other members about itself (sealed before it leaves the node)."""

    node_id: str
    hostname: str
    public_key: str
    ula: ipaddress.IPv6Address
    addresses: tuple[IPAddress, ...]
    pod_cidrs: tuple[IPNetwork, ...] = ()
    # The node relays for other members on these ports: (first, count). None: it does not.
    relay_ports: tuple[int, int] | None = None
    # Round trips from this node to the relays it reaches, in ms: ((relay node id, ms), ...)
    # sorted by node id. Two sides of a pair rank relays by the sum of theirs (relay.choice).
    relay_rtts: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class MemberRecord:
    """One sealed registration of a node: what it says about itself, which version of that
    it is (strictly increasing per node, so an older record served again is ignored), until
    when it holds, and whether it says the node has left the cluster. All of it is inside
    the sealed blob: the discovery service can neither forge, extend, shorten nor roll back
    any of it."""

    info: AffiliateInfo
    endpoints: tuple[Endpoint, ...]
    version: int
    valid_until: int  # Unix seconds, the node's own clock
    leave: bool = False
    # XEdDSA by the node's WireGuard key over everything above (discovery/payload.py).
    signature: bytes = field(default=b"", repr=False)
    # Fields of a later payload version this one ignores, as canonical JSON of one object:
    # kept so the record can be encoded again exactly as it was signed (the peer cache).
    later_fields: bytes = field(default=b"", repr=False)


# Endpoints other members saw a node at (harvested), kept per node beside its own.
MAX_HINTS = 16


@dataclass(frozen=True)
class ListedRecord:
    """A record as one listing carries it: authenticated and parsed, with the endpoints the
    listing adds to it (harvested by other members; not part of the sealed record)."""

    record: MemberRecord
    hints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Member:
    """Another node of the cluster: its record's data, the endpoints it announces (in its
    order), and those other members saw it at (harvested)."""

    info: AffiliateInfo
    endpoints: tuple[Endpoint, ...]
    hints: tuple[Endpoint, ...] = ()


class PeerState(Enum):
    UP = "up"
    DOWN = "down"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class PeerSpec:
    """The desired WireGuard peer for one member. endpoint None: leave the kernel's as it is."""

    public_key: str
    name: str
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: Endpoint | None
    keepalive: int = PERSISTENT_KEEPALIVE


@dataclass(frozen=True)
class LinkSpec:
    """The desired kubespan link and its WireGuard device settings."""

    name: str
    mtu: int
    listen_port: int
    fwmark: int
    private_key: str = field(repr=False)
    preshared_key: str = field(repr=False)
    address: ipaddress.IPv6Interface


@dataclass(frozen=True)
class DesiredState:
    link: LinkSpec
    peers: tuple[PeerSpec, ...]
    ruleset: RulesetSpec
    routing: RoutingSpec


@dataclass(frozen=True)
class ObservedPeer:
    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    keepalive: int
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    preshared_key: str = field(default="", repr=False)


@dataclass(frozen=True)
class ObservedLink:
    """The kubespan link as the kernel has it."""

    mtu: int
    up: bool
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    private_key: str | None = field(repr=False)
    listen_port: int
    fwmark: int
    peers: tuple[ObservedPeer, ...]
    # Another program's link may carry our name; only a WireGuard link can be ours.
    kind: str = "wireguard"

    @property
    def foreign(self) -> bool:
        return self.kind != "wireguard"

    @cached_property
    def peer_by_key(self) -> dict[str, ObservedPeer]:
        """The peers by public key (made once: the planner and the diff both look up every
        member's). Not to be changed by callers."""
        return {p.public_key: p for p in self.peers}


@dataclass(frozen=True)
class LocalAddress:
    """An address configured on one of this node's links."""

    interface: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    scope: int
    link_up: bool
    link_kind: str
