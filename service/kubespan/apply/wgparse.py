"""Turn pyroute2's WireGuard netlink messages into ObservedPeer values.

pyroute2 hands back nested NLA objects whose shapes differ between attribute kinds (keys as
base64 bytes in a 'value' slot, endpoints and handshakes as field dicts); this module is the
one place that knows those shapes. Dumps of many peers span several messages and may repeat a
peer; entries are merged by public key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubespan.model import ObservedPeer
from kubespan.netaddr import Endpoint, IPNetwork, network_sort_key

_ZERO_KEY = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def _text(value: Any) -> str:
    if isinstance(value, dict) or hasattr(value, "get"):
        value = value.get("value", value)
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _field(value: Any, name: str) -> Any:
    if value is None:
        return None
    try:
        return value[name]
    except (KeyError, TypeError, IndexError):
        return None


@dataclass
class DeviceInfo:
    private_key: str | None = field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, ObservedPeer] = field(default_factory=dict)


def parse_endpoint(value: Any) -> Endpoint | None:
    addr = _field(value, "addr")
    port = _field(value, "port")
    if not addr or not port:
        return None
    address = ipaddress.ip_address(addr)
    if address.is_unspecified:
        return None
    return Endpoint(address, int(port))


def parse_handshake(value: Any) -> float | None:
    seconds = _field(value, "tv_sec")
    if not seconds:
        return None
    nanos = _field(value, "tv_nsec") or 0
    return float(seconds) + float(nanos) / 1e9


def parse_allowed_ips(values: Iterable[Any]) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for item in values or ():
        entries = item if isinstance(item, list) else [item]
        for entry in entries:
            text = _field(entry, "addr")
            if text:
                out.append(ipaddress.ip_network(text, strict=False))
    return out


def parse_peer(peer: Any) -> ObservedPeer:
    public_key = _text(peer.get_attr("WGPEER_A_PUBLIC_KEY"))
    psk_attr = peer.get_attr("WGPEER_A_PRESHARED_KEY")
    psk = _text(psk_attr) if psk_attr is not None else ""
    allowed = parse_allowed_ips(peer.get_attrs("WGPEER_A_ALLOWEDIPS"))
    return ObservedPeer(
        public_key=public_key,
        endpoint=parse_endpoint(peer.get_attr("WGPEER_A_ENDPOINT")),
        allowed_ips=tuple(sorted(set(allowed), key=network_sort_key)),
        keepalive=int(peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0),
        last_handshake=parse_handshake(peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")),
        rx_bytes=int(peer.get_attr("WGPEER_A_RX_BYTES") or 0),
        tx_bytes=int(peer.get_attr("WGPEER_A_TX_BYTES") or 0),
        preshared_key="" if psk == _ZERO_KEY else psk,
    )


def merge_peer(old: ObservedPeer | None, new: ObservedPeer) -> ObservedPeer:
    """A peer split across dump messages: the later part carries more allowed IPs."""
    if old is None:
        return new
    ips = tuple(sorted(set(old.allowed_ips) | set(new.allowed_ips), key=network_sort_key))
    return ObservedPeer(
        public_key=old.public_key,
        endpoint=old.endpoint or new.endpoint,
        allowed_ips=ips,
        keepalive=old.keepalive or new.keepalive,
        last_handshake=old.last_handshake or new.last_handshake,
        rx_bytes=max(old.rx_bytes, new.rx_bytes),
        tx_bytes=max(old.tx_bytes, new.tx_bytes),
        preshared_key=old.preshared_key or new.preshared_key,
    )


def parse_device(messages: Iterable[Any]) -> DeviceInfo:
    info = DeviceInfo()
    for message in messages:
        key = message.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if key is not None:
            text = _text(key)
            info.private_key = None if text == _ZERO_KEY else text
        port = message.get_attr("WGDEVICE_A_LISTEN_PORT")
        if port is not None:
            info.listen_port = int(port)
        mark = message.get_attr("WGDEVICE_A_FWMARK")
        if mark is not None:
            info.fwmark = int(mark)
        for peers in message.get_attrs("WGDEVICE_A_PEERS"):
            for peer in peers if isinstance(peers, list) else [peers]:
                parsed = parse_peer(peer)
                info.peers[parsed.public_key] = merge_peer(
                    info.peers.get(parsed.public_key), parsed
                )
    return info
