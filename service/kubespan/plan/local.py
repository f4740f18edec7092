"""What this node advertises: its routable addresses and the endpoints peers may try."""

from __future__ import annotations

import ipaddress

from kubespan.config import EndpointFilter, KubeSpanConfig
from kubespan.model import LocalAddress
from kubespan.names import LINK_NAME
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork, address_sort_key

RT_SCOPE_UNIVERSE = 0
_SKIPPED_KINDS = frozenset({"wireguard"})


def underlay_networks(
    local: tuple[LocalAddress, ...], cluster_prefix: ipaddress.IPv6Network
) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
    """Global-scope addresses, with their prefixes, of links that are up, our overlay
    excluded; stable order."""
    out: set[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = set()
    for entry in local:
        address = entry.address.ip
        if (
            entry.scope != RT_SCOPE_UNIVERSE
            or not entry.link_up
            or entry.interface == LINK_NAME
            or entry.link_kind in _SKIPPED_KINDS
            or address.is_loopback
            or address.is_link_local
            or address.is_multicast
            or address.is_unspecified
            or (address.version == 6 and address in cluster_prefix)
        ):
            continue
        out.add(entry.address)
    return tuple(sorted(out, key=lambda n: (*address_sort_key(n.ip), n.network.prefixlen)))


def advertised_addresses(
    local: tuple[LocalAddress, ...], cluster_prefix: ipaddress.IPv6Network
) -> tuple[IPAddress, ...]:
    """Global-scope addresses of links that are up, our overlay excluded; stable order."""
    addresses = {n.ip for n in underlay_networks(local, cluster_prefix)}
    return tuple(sorted(addresses, key=address_sort_key))


def filter_endpoint_addresses(
    addresses: tuple[IPAddress, ...], filters: tuple[EndpointFilter, ...]
) -> tuple[IPAddress, ...]:
    """Apply `filters.endpoints`: the output follows the filter order; `!` removes matches."""
    if not filters:
        return addresses
    removed: set[IPAddress] = set()
    out: list[IPAddress] = []
    for rule in filters:
        for address in addresses:
            if address.version != rule.network.version or address not in rule.network:
                continue
            if rule.negate:
                removed.add(address)
            elif address not in removed and address not in out:
                out.append(address)
    return tuple(out)


def advertised_endpoints(
    addresses: tuple[IPAddress, ...],
    reflexive: IPAddress | None,
    config: KubeSpanConfig,
    mapped: tuple[Endpoint, ...] = (),
    limit: int | None = None,
) -> tuple[Endpoint, ...]:
    """Own addresses, then the NAT mappings of the WireGuard port learned by STUN (`mapped`),
    then, for a family STUN gave nothing for, the public address discovery saw (its port
    assumed); filtered by address; then extra endpoints. Peers rank host addresses first
    and keep the rest in this order (plan/candidates.py)."""
    endpoints = [Endpoint(a, config.listen_port) for a in addresses]
    endpoints.extend(e for e in mapped if e not in endpoints)
    if reflexive is not None and all(e.address.version != reflexive.version for e in mapped):
        guessed = Endpoint(reflexive, config.listen_port)
        if guessed not in endpoints:
            endpoints.append(guessed)
    if config.endpoint_filters:
        unique = tuple(dict.fromkeys(e.address for e in endpoints))
        order = {
            a: i for i, a in enumerate(filter_endpoint_addresses(unique, config.endpoint_filters))
        }
        endpoints = sorted(
            (e for e in endpoints if e.address in order), key=lambda e: order[e.address]
        )
    extras = [e for e in dict.fromkeys(config.extra_announced_endpoints) if e not in endpoints]
    if limit is not None:
        # The operator's extra endpoints are kept whatever else there is.
        endpoints = endpoints[: max(0, limit - len(extras))]
    return tuple(endpoints + extras)[:limit]


def excluded(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether `filters.excludeAdvertisedNetworks` keeps `address` out of what this node
    advertises (peers must not route it to this node)."""
    return any(address.version == n.version and address in n for n in networks)
