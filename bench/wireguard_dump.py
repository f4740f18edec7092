"""What reading the kernel's WireGuard dump costs on this host, per dump of 100 peers, in the
shapes an idle pass meets: every peer with new counters (a live mesh: each answers its probe
between two passes), and every peer byte for byte as before (dead peers). The dump is encoded
as the kernel's get_peer lays a peer out (key, preshared key, handshake, keepalive, counters,
protocol version, endpoint, allowed IPs).

Prints wireguard_dump_ms for each shape read by one parser across dumps (as the agent reads
them), and for the first shape read by a fresh parser each time (the baseline: every peer
parsed in full), with the ratios to that baseline; each the best of three runs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time

from kubespan.apply.netlink import NLA_F_NESTED, encode_attribute
from kubespan.apply.wireguard import (
    WGALLOWEDIP_A_CIDR_MASK,
    WGALLOWEDIP_A_FAMILY,
    WGALLOWEDIP_A_IPADDR,
    WGDEVICE_A_LISTEN_PORT,
    WGDEVICE_A_PEERS,
    WGPEER_A_ALLOWEDIPS,
    WGPEER_A_ENDPOINT,
    WGPEER_A_LAST_HANDSHAKE_TIME,
    WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
    WGPEER_A_PRESHARED_KEY,
    WGPEER_A_PUBLIC_KEY,
    WGPEER_A_RX_BYTES,
    WGPEER_A_TX_BYTES,
    DeviceParser,
    genl_payload,
)

PEERS = 100
DUMPS = 200
RUNS = 3
WGPEER_A_PROTOCOL_VERSION = 10


def nest(kind: int, parts: list[bytes]) -> bytes:
    return encode_attribute(kind | NLA_F_NESTED, b"".join(parts))


def allowed_ip(network: ipaddress.IPv6Network) -> bytes:
    return nest(
        0,
        [
            encode_attribute(WGALLOWEDIP_A_FAMILY, struct.pack("=H", socket.AF_INET6)),
            encode_attribute(WGALLOWEDIP_A_IPADDR, network.network_address.packed),
            encode_attribute(WGALLOWEDIP_A_CIDR_MASK, bytes([network.prefixlen])),
        ],
    )


def peer(index: int, counter: int) -> bytes:
    endpoint = (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", 51821 + index)
        + ipaddress.IPv4Address("192.0.2.20").packed
        + bytes(8)
    )
    ula = ipaddress.IPv6Network(f"fd00:1::{index + 1:x}/128")
    pods = ipaddress.IPv6Network(f"fd00:2:{index + 1:x}::/64")
    return nest(
        0,
        [
            encode_attribute(WGPEER_A_PUBLIC_KEY, struct.pack("=I", index) + bytes(28)),
            encode_attribute(WGPEER_A_PRESHARED_KEY, b"\x05" * 32),
            encode_attribute(
                WGPEER_A_LAST_HANDSHAKE_TIME, struct.pack("=qq", 1_700_000_000 + counter, 5)
            ),
            encode_attribute(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, struct.pack("=H", 25)),
            encode_attribute(WGPEER_A_TX_BYTES, struct.pack("=Q", 148 * counter)),
            encode_attribute(WGPEER_A_RX_BYTES, struct.pack("=Q", 92 * counter)),
            encode_attribute(WGPEER_A_PROTOCOL_VERSION, struct.pack("=I", 1)),
            encode_attribute(WGPEER_A_ENDPOINT, endpoint),
            nest(WGPEER_A_ALLOWEDIPS, [allowed_ip(ula), allowed_ip(pods)]),
        ],
    )


def dump(counter: int) -> list[bytes]:
    peers = [peer(index, counter) for index in range(PEERS)]
    head = genl_payload(0, 1, [(WGDEVICE_A_LISTEN_PORT, struct.pack("=H", 51820))])
    return [head + nest(WGDEVICE_A_PEERS, peers)]


def per_dump_ms(dumps: list[list[bytes]], fresh: bool) -> float:
    """Each dump after the first read by one parser, or (`fresh`) by a new one each."""
    best = float("inf")
    for _ in range(RUNS):
        parser = DeviceParser()
        parser.device(dumps[0])
        began = time.process_time()
        for payloads in dumps[1:]:
            (DeviceParser() if fresh else parser).device(payloads)
        best = min(best, (time.process_time() - began) / (len(dumps) - 1) * 1000)
    return best


def main() -> None:
    moving = [dump(counter) for counter in range(1, DUMPS + 1)]
    still = [dump(1)] * DUMPS
    baseline = per_dump_ms(moving, fresh=True)
    figures = {
        "100_answering": per_dump_ms(moving, fresh=False),
        "100_quiet": per_dump_ms(still, fresh=False),
    }
    print(f"wireguard_dump_ms_100_answering_parsed_in_full={baseline:.3f}")
    for name, ms in figures.items():
        print(f"wireguard_dump_ms_{name}={ms:.3f}")
        print(f"wireguard_dump_ratio_{name}_to_parsed_in_full={ms / baseline:.2f}")


if __name__ == "__main__":
    main()
