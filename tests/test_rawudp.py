"""The raw socket's pure parts: UDP checksums, packet parsing, the BPF program."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest

from kubespan import rawudp as rawsock
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.stun.prober import STUN_MATCH

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


@pytest.mark.parametrize("count", [1, 1000])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_filter_jumps_stay_inside_the_program(family: socket.AddressFamily, count: int) -> None:
    program = rawsock.payload_filter(family, 51820, STUN_MATCH, count)
    for index, (code, jump_true, jump_false, _k) in enumerate(program):
        if code in (rawsock._JEQ_K, rawsock._JSET_K, rawsock._JGE_K, rawsock._JGT_K):
            assert index + 1 + max(jump_true, jump_false) < len(program)
    assert program[-1] == (rawsock._RET_K, 0, 0, 0)  # what matches nothing is dropped


def run_filter(program: list[tuple[int, int, int, int]], packet: bytes) -> int:
    """Classic BPF as the kernel runs it, for the opcodes the filters use: bytes kept."""
    accumulator = index = pc = 0
    while True:
        code, jump_true, jump_false, k = program[pc]
        if code == rawsock._LD_H_ABS:
            accumulator = struct.unpack_from("!H", packet, k)[0]
        elif code == rawsock._LD_W_ABS:
            accumulator = struct.unpack_from("!I", packet, k)[0]
        elif code == rawsock._LDX_B_MSH:
            index = (packet[k] & 0x0F) * 4
        elif code == rawsock._LD_H_IND:
            accumulator = struct.unpack_from("!H", packet, index + k)[0]
        elif code == rawsock._LD_W_IND:
            accumulator = struct.unpack_from("!I", packet, index + k)[0]
        elif code == rawsock._RET_K:
            return k
        elif code in (rawsock._JEQ_K, rawsock._JSET_K, rawsock._JGE_K, rawsock._JGT_K):
            hit = {
                rawsock._JEQ_K: accumulator == k,
                rawsock._JSET_K: bool(accumulator & k),
                rawsock._JGE_K: accumulator >= k,
                rawsock._JGT_K: accumulator > k,
            }[code]
            pc += jump_true if hit else jump_false
        else:
            raise AssertionError(f"opcode {code:#x} not modelled")
        pc += 1


def ipv4_packet(payload: bytes, port: int = 51820, fragment: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, fragment, 64, 17,
                         0, bytes([192, 0, 2, 1]), bytes([10, 0, 0, 2]))  # fmt: skip
    return header + struct.pack("!HHHH", 3478, port, 8 + len(payload), 0) + payload


STUN_PAYLOAD = bytes(4) + struct.pack("!I", 0x2112A442) + bytes(12)


@pytest.mark.parametrize(
    ("packet", "kept"),
    [
        (ipv4_packet(STUN_PAYLOAD), True),
        (ipv4_packet(STUN_PAYLOAD, fragment=0x2000), True),  # a first fragment (more follow)
        (ipv4_packet(STUN_PAYLOAD, fragment=0x0001), False),  # a later fragment
        (ipv4_packet(STUN_PAYLOAD, fragment=0x2010), False),
        (ipv4_packet(STUN_PAYLOAD, port=51821), False),
        (ipv4_packet(bytes(20)), False),  # no cookie
    ],
)
def test_the_ipv4_filter_keeps_only_first_fragments_to_the_port_with_the_word(
    packet: bytes, kept: bool
) -> None:
    program = rawsock.payload_filter(socket.AF_INET, 51820, STUN_MATCH)
    assert (run_filter(program, packet) > 0) is kept


@pytest.mark.parametrize(("port", "kept"), [(51820, True), (51821, False)])
def test_the_ipv6_filter_keeps_only_the_port_with_the_word(port: int, kept: bool) -> None:
    program = rawsock.payload_filter(socket.AF_INET6, 51820, STUN_MATCH)
    segment = struct.pack("!HHHH", 3478, port, 8 + len(STUN_PAYLOAD), 0) + STUN_PAYLOAD
    assert (run_filter(program, segment) > 0) is kept


@pytest.mark.parametrize(
    ("port", "kept"), [(51820, False), (51821, True), (52000, True), (52820, True), (52821, False)]
)
def test_a_port_range_filter_keeps_exactly_its_ports(port: int, kept: bool) -> None:
    ipv4 = rawsock.payload_filter(socket.AF_INET, 51821, STUN_MATCH, 1000)
    assert (run_filter(ipv4, ipv4_packet(STUN_PAYLOAD, port=port)) > 0) is kept
    ipv6 = rawsock.payload_filter(socket.AF_INET6, 51821, STUN_MATCH, 1000)
    segment = struct.pack("!HHHH", 3478, port, 8 + len(STUN_PAYLOAD), 0) + STUN_PAYLOAD
    assert (run_filter(ipv6, segment) > 0) is kept
    parsed = rawsock.parse_ipv4_udp_to(ipv4_packet(b"x", port=port), 51821, 1000)
    assert (parsed is not None and parsed[3] == port) is kept
