"""Rank the endpoints to try for one member, best first, each with the reason for its place.

Order (after ICE's host > server-reflexive and Tailscale's preference for private paths):

1. an address of the member in a subnet this node is on (one hop, no NAT in between);
2. its other IPv4 host addresses, private before global;
3. its IPv6 host addresses;
4. what it announces beyond its host addresses, in its own order: its NAT mapping learned by
   STUN first, then configured extra endpoints (the node lists them in that order);
5. where other members saw it (harvested): a mapping that worked for someone.

Duplicates keep their best place; an endpoint on one of this node's own addresses is never a
candidate (a handshake to ourselves proves nothing).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from kubespan.model import Member
from kubespan.netaddr import Endpoint, IPAddress


class Kind(Enum):
    SAME_SUBNET = "same-subnet"
    PRIVATE = "private"
    GLOBAL = "global"
    IPV6 = "ipv6"
    ANNOUNCED = "announced"
    HARVESTED = "harvested"
    RELAYED = "relayed"


_REASONS = {
    Kind.SAME_SUBNET: "host address in a subnet this node is on",
    Kind.PRIVATE: "private IPv4 host address",
    Kind.GLOBAL: "global IPv4 host address",
    Kind.IPV6: "IPv6 host address",
    Kind.ANNOUNCED: "announced by the node (its NAT mapping, or an extra endpoint)",
    Kind.HARVESTED: "where another member saw the node",
    Kind.RELAYED: "through a relay member (no direct path answered); tried first once bound",
}
_RANK = {kind: index for index, kind in enumerate(Kind)}

LocalNetwork = ipaddress.IPv4Interface | ipaddress.IPv6Interface
# Site-local IPv4 (RFC 1918, and carrier-grade NAT space): reachable only inside some site.
# Not Python's is_private, which also holds the documentation ranges that stand for public
# addresses in tests.
PRIVATE_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10")
)


@dataclass(frozen=True)
class Candidate:
    endpoint: Endpoint
    kind: Kind

    @property
    def reason(self) -> str:
        return _REASONS[self.kind]


def _host_kind(address: IPAddress, local: tuple[LocalNetwork, ...]) -> Kind:
    if any(n.version == address.version and address in n.network for n in local):
        return Kind.SAME_SUBNET
    if address.version == 6:
        return Kind.IPV6
    return Kind.PRIVATE if any(address in n for n in PRIVATE_V4) else Kind.GLOBAL


@functools.lru_cache(maxsize=4096)  # per member and local networks: the same every pass
def rank_candidates(member: Member, local: tuple[LocalNetwork, ...]) -> tuple[Candidate, ...]:
    """The member's endpoints in the order to try them. `local`: this node's addresses with
    their prefix lengths (which subnets it is on)."""
    own = {n.ip for n in local}
    hosts = set(member.info.addresses)
    ranked: list[tuple[int, int, Candidate]] = []
    seen: set[Endpoint] = set()

    def add(endpoints: Iterable[Endpoint], kind_of: Kind | None) -> None:
        for endpoint in endpoints:
            if endpoint in seen or endpoint.address in own:
                continue
            seen.add(endpoint)
            kind = kind_of
            if kind is None:
                address = endpoint.address
                kind = _host_kind(address, local) if address in hosts else Kind.ANNOUNCED
            ranked.append((_RANK[kind], len(ranked), Candidate(endpoint, kind)))

    add(member.endpoints, None)
    add(member.hints, Kind.HARVESTED)
    ranked.sort(key=lambda item: (item[0], item[1]))
    return tuple(candidate for _, _, candidate in ranked)
