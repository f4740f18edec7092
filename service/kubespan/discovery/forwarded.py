"""The client's address: the socket's peer, or, only when that peer is a trusted proxy, the
address it reports in X-Forwarded-For (the rightmost one that is not itself trusted)."""

from __future__ import annotations

import ipaddress

from kubespan.netaddr import IPNetwork


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]
) -> str | None:
    if peer is None or not trusted or not forwarded_for:
        return peer
    if not _trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed chain is not believed
        if not _trusted(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _trusted(address: str, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(parsed.version == net.version and parsed in net for net in trusted)
