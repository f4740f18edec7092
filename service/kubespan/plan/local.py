"""What this node advertises: its routable addresses and the endpoints peers may try."""

from __future__ import annotations

import ipaddress

from kubespan.config import EndpointFilter, KubeSpanConfig
from kubespan.model import LocalAddress
from kubespan.names import LINK_NAME
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork, address_sort_key

RT_SCOPE_UNIVERSE = 0
_SKIPPED_KINDS = frozenset({"wireguard"})


def advertised_addresses(
    local: tuple[LocalAddress, ...], cluster_prefix: ipaddress.IPv6Network
) -> tuple[IPAddress, ...]:
    """Global-scope addresses of links that are up, our overlay excluded; stable order."""
    out: set[IPAddress] = set()
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
        out.add(address)
    return tuple(sorted(out, key=address_sort_key))


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
) -> tuple[Endpoint, ...]:
    """Own addresses, then the public address discovery saw; filtered; then extra endpoints."""
    candidates = list(addresses)
    if reflexive is not None and reflexive not in candidates:
        candidates.append(reflexive)
    kept = filter_endpoint_addresses(tuple(candidates), config.endpoint_filters)
    endpoints = [Endpoint(address, config.listen_port) for address in kept]
    for extra in config.extra_announced_endpoints:
        if extra not in endpoints:
            endpoints.append(extra)
    return tuple(endpoints)


def excluded(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether `filters.excludeAdvertisedNetworks` keeps `address` out of what this node
    advertises (peers must not route it to this node)."""
    return any(address.version == n.version and address in n for n in networks)
