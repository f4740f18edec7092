"""Address types shared by every layer: IP addresses, prefixes and UDP endpoints."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, order=True)
class Endpoint:
    """A UDP endpoint: where a WireGuard peer can be reached."""

    address: IPAddress
    port: int

    def __post_init__(self) -> None:
        # ipaddress hashes through a hex string, and endpoints are hashed a dozen times per
        # candidate and pass: hashed once, when made. Kept outside the fields (asdict,
        # astuple and fields() see address and port only). An IPv4 and an IPv6 address
        # with the same number share a hash and still differ.
        self.__dict__["_hash"] = hash((int(self.address), self.port))

    def __hash__(self) -> int:
        cached: int = self.__dict__["_hash"]
        return cached

    def __str__(self) -> str:
        return _endpoint_text(self.address, self.port)

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse `ip:port` or `[ipv6]:port`; ValueError with a readable message otherwise."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not ip:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 endpoint as [address]:port")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
        return cls(address, int(port_text))


@lru_cache(maxsize=4096)  # every candidate of every peer is shown at every pass
def _endpoint_text(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def endpoint_bytes(endpoint: Endpoint | None) -> tuple[bytes, int]:
    """An endpoint as 16 address bytes (IPv4 mapped into IPv6) and a port, for fixed-size
    wire formats; None is all zeros."""
    if endpoint is None:
        return bytes(16), 0
    address = endpoint.address
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address.packed, endpoint.port


def endpoint_from_bytes(packed: bytes, port: int) -> Endpoint | None:
    """The endpoint `endpoint_bytes` wrote; None for all zeros, an unspecified address or
    port 0."""
    address = ipaddress.IPv6Address(packed)
    unmapped = address.ipv4_mapped or address
    if port == 0 or unmapped.is_unspecified:
        return None
    return Endpoint(unmapped, port)


@lru_cache(maxsize=1 << 16)
def host_network(address: IPAddress) -> IPNetwork:
    """The /32 or /128 network holding exactly `address` (cached: every pass asks again for
    the same few thousand addresses)."""
    if address.version == 4:
        return ipaddress.IPv4Network((int(address), 32))
    return ipaddress.IPv6Network((int(address), 128))


def network_sort_key(network: IPNetwork) -> tuple[int, int, int]:
    return (network.version, int(network.network_address), network.prefixlen)


def address_sort_key(address: IPAddress) -> tuple[int, int]:
    return (address.version, int(address))


@lru_cache(maxsize=4096)  # asked of every member's every endpoint at every pass
def reachable_unicast(address: IPAddress) -> bool:
    """Whether another host could send to `address`: not unspecified, loopback, multicast,
    link-local (no zone to go with it), reserved or the IPv4 broadcast address."""
    return not (
        address.is_unspecified
        or address.is_loopback
        or address.is_multicast
        or address.is_link_local
        or address.is_reserved
        or (address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"))
    )
