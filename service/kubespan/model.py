"""Frozen values that flow between discovery, the planner and the kernel appliers."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

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


@dataclass(frozen=True)
class Member:
    """Another node of the cluster, as discovery reports it."""

    info: AffiliateInfo
    endpoints: tuple[Endpoint, ...]


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


@dataclass(frozen=True)
class LocalAddress:
    """An address configured on one of this node's links."""

    interface: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    scope: int
    link_up: bool
    link_kind: str
