"""Who is asking: the socket's peer, or, only when that peer is a configured trusted proxy, the
address it reports in X-Forwarded-For (the rightmost one that is not itself trusted).

Addresses are unmapped everywhere (a dual-stack listener reports IPv4 clients as
`::ffff:192.0.2.7`), and limits count sources, not addresses: an IPv4 address, or an IPv6
/64, since one IPv6 host is normally given a whole /64 and could rotate through it.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from kubespan.netaddr import IPAddress, IPNetwork

MAX_FORWARDED_HOPS = 16


def parse_address(text: str) -> IPAddress | None:
    """An IP address with IPv4-mapped IPv6 unmapped and any zone dropped; None if not one."""
    if not text.isascii() or len(text) > 64:
        return None
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6:
        assert isinstance(address, ipaddress.IPv6Address)
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


@lru_cache(maxsize=4096)
def unmap(text: str) -> str | None:
    address = parse_address(text)
    return None if address is None else str(address)


@lru_cache(maxsize=4096)
def source_key(address: str) -> str:
    """The unit per-source limits count: the address itself (IPv4) or its /64 (IPv6)."""
    parsed = parse_address(address)
    if parsed is None:
        return address
    if parsed.version == 4:
        return str(parsed)
    return str(ipaddress.IPv6Network((int(parsed) >> 64 << 64, 64)))


def is_trusted(address: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    if address is None or not trusted:
        return False
    parsed = parse_address(address)
    if parsed is None:
        return False
    return any(parsed.version == net.version and parsed in net for net in trusted)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]
) -> str | None:
    """The client's address; X-Forwarded-For is believed only from a trusted peer."""
    if peer is None or not forwarded_for or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",", MAX_FORWARDED_HOPS)]
    if len(hops) > MAX_FORWARDED_HOPS:
        return peer  # a chain that long is not a real one
    parsed: list[str] = []
    for hop in hops:
        address = parse_address(hop)
        if address is None:
            return peer  # a malformed chain is not believed
        parsed.append(str(address))
    for hop in reversed(parsed):
        if not is_trusted(hop, trusted):
            return hop
    return parsed[0] if parsed else peer
