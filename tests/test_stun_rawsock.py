"""The raw socket's pure parts: UDP checksums, packet parsing, the BPF program."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest

from kubespan.netaddr import Endpoint, IPAddress
from kubespan.stun import rawsock

V4_SOURCE = ipaddress.ip_address("10.0.0.2")
V6_SOURCE = ipaddress.ip_address("2001:db8::2")


def _sum(source: IPAddress, destination: IPAddress, segment: bytes) -> int:
    if source.version == 4:
        pseudo = source.packed + destination.packed + struct.pack("!BBH", 0, 17, len(segment))
    else:
        pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(segment), 17)
    data = pseudo + segment + b"\0" * (len(segment) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize(
    ("source", "reflector"),
    [
        (V4_SOURCE, Endpoint.parse("203.0.113.10:3478")),
        (V6_SOURCE, Endpoint.parse("[2001:db8::10]:3478")),
    ],
)
@pytest.mark.parametrize("size", [0, 1, 20, 47, 48])
def test_checksum_verifies(source: IPAddress, reflector: Endpoint, size: int) -> None:
    payload = os.urandom(size)
    segment = rawsock.udp_segment(source, reflector, 51820, payload)
    assert struct.unpack("!HHH", segment[:6]) == (51820, reflector.port, 8 + size)
    assert segment[8:] == payload
    assert _sum(source, reflector.address, segment) == 0xFFFF


def ipv4_udp(payload: bytes, port: int = 51820, header_words: int = 5) -> bytes:
    udp = struct.pack("!HHHH", 3478, port, 8 + len(payload), 0) + payload
    header = bytes([0x40 | header_words, 0]) + struct.pack("!H", 4 * header_words + len(udp))
    header += b"\0\0\0\0" + bytes([64, 17, 0, 0]) + bytes([203, 0, 113, 10, 10, 0, 0, 2])
    return header + b"\0" * (4 * (header_words - 5)) + udp


def test_ipv4_packets_parse() -> None:
    source = ipaddress.ip_address("203.0.113.10")
    assert rawsock.parse_ipv4_udp(ipv4_udp(b"stun"), 51820) == (source, 3478, b"stun")
    assert rawsock.parse_ipv4_udp(ipv4_udp(b"opt", header_words=7), 51820) == (source, 3478, b"opt")


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        ipv4_udp(b"x")[:19],
        ipv4_udp(b"x")[:27],  # UDP header cut
        ipv4_udp(b"x", port=51821),
        bytes([0x60]) + ipv4_udp(b"x")[1:],  # not IPv4
        ipv4_udp(b"x")[:9] + bytes([6]) + ipv4_udp(b"x")[10:],  # TCP
        bytes([0x44]) + ipv4_udp(b"x")[1:],  # header length 16
        bytes([0x4F]) + ipv4_udp(b"x")[1:],  # header length past the packet
        ipv4_udp(b"xyz")[:-1],  # UDP length longer than what came
    ],
)
def test_hostile_ipv4_packets_are_ignored(packet: bytes) -> None:
    assert rawsock.parse_ipv4_udp(packet, 51820) is None


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_filter_jumps_stay_inside_the_program(family: socket.AddressFamily) -> None:
    program = rawsock.stun_filter(family, 51820)
    for index, (code, jump_true, jump_false, _k) in enumerate(program):
        if code in (rawsock._JEQ_K, rawsock._JSET_K):
            assert index + 1 + max(jump_true, jump_false) < len(program)
    assert program[-1] == (rawsock._RET_K, 0, 0, 0)  # what matches nothing is dropped
