"""Parsing WireGuard netlink dumps: real pyroute2 messages encoded to bytes and decoded back."""

from __future__ import annotations

import base64
import socket
from typing import Any

from pyroute2.netlink.generic.wireguard import wgmsg

from kubespan.apply.wgparse import parse_device

PRIVATE = base64.b64encode(bytes([1]) * 32)
PEER = base64.b64encode(bytes([2]) * 32)
PSK = base64.b64encode(bytes([3]) * 32)
ZERO = base64.b64encode(bytes(32))


def allowed(family: int, address: str, mask: int) -> dict[str, Any]:
    return {
        "attrs": [
            ["WGALLOWEDIP_A_FAMILY", family],
            ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, address)],
            ["WGALLOWEDIP_A_CIDR_MASK", mask],
        ]
    }


def dump(device_attrs: list[Any], peers: list[list[Any]]) -> wgmsg:
    """Encode a device message as the kernel would send it, then decode it from bytes."""
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["header"]["type"] = 20
    msg["attrs"] = [["WGDEVICE_A_IFNAME", "kubespan"], *device_attrs]
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": p} for p in peers]])
    msg.encode()
    decoded = wgmsg(bytes(msg.data))
    decoded.decode()
    return decoded


def peer_attrs(extra_ips: list[dict[str, Any]], psk: bytes = PSK) -> list[Any]:
    return [
        ["WGPEER_A_PUBLIC_KEY", PEER],
        ["WGPEER_A_PRESHARED_KEY", psk],
        ["WGPEER_A_ENDPOINT", {"addr": "2001:db8::5", "port": 51820}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 1_700_000_000, "tv_nsec": 500_000_000}],
        ["WGPEER_A_RX_BYTES", 100],
        ["WGPEER_A_TX_BYTES", 200],
        ["WGPEER_A_ALLOWEDIPS", extra_ips],
    ]


def test_device_and_peer_fields() -> None:
    message = dump(
        [
            ["WGDEVICE_A_PRIVATE_KEY", PRIVATE],
            ["WGDEVICE_A_LISTEN_PORT", 51820],
            ["WGDEVICE_A_FWMARK", 0x20],
        ],
        [
            peer_attrs(
                [allowed(socket.AF_INET, "192.0.2.5", 32), allowed(socket.AF_INET6, "fd00::5", 128)]
            )
        ],
    )
    device = parse_device([message])
    assert device.private_key == PRIVATE.decode()
    assert device.listen_port == 51820
    assert device.fwmark == 0x20
    (peer,) = device.peers.values()
    assert peer.public_key == PEER.decode()
    assert peer.preshared_key == PSK.decode()
    assert str(peer.endpoint) == "[2001:db8::5]:51820"
    assert peer.keepalive == 25
    assert peer.last_handshake == 1_700_000_000.5
    assert (peer.rx_bytes, peer.tx_bytes) == (100, 200)
    assert [str(n) for n in peer.allowed_ips] == ["192.0.2.5/32", "fd00::5/128"]


def test_zero_keys_and_missing_handshake_mean_unset() -> None:
    attrs = [a for a in peer_attrs([], psk=ZERO) if a[0] != "WGPEER_A_LAST_HANDSHAKE_TIME"]
    attrs.append(["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": 0, "tv_nsec": 0}])
    device = parse_device([dump([["WGDEVICE_A_PRIVATE_KEY", ZERO]], [attrs])])
    assert device.private_key is None
    (peer,) = device.peers.values()
    assert peer.preshared_key == ""
    assert peer.last_handshake is None


def test_peer_split_across_messages_is_merged() -> None:
    first = dump(
        [["WGDEVICE_A_LISTEN_PORT", 51820]], [peer_attrs([allowed(socket.AF_INET, "10.0.0.0", 8)])]
    )
    second = dump(
        [],
        [
            [
                ["WGPEER_A_PUBLIC_KEY", PEER],
                ["WGPEER_A_ALLOWEDIPS", [allowed(socket.AF_INET, "192.0.2.0", 24)]],
            ]
        ],
    )
    device = parse_device([first, second])
    (peer,) = device.peers.values()
    assert [str(n) for n in peer.allowed_ips] == ["10.0.0.0/8", "192.0.2.0/24"]
    assert peer.keepalive == 25
