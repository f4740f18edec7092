"""STUN binding messages: round trips, known answers, and hostile bytes refused cleanly."""

from __future__ import annotations

import contextlib
import os
import struct
import zlib

import pytest

from kubespan.netaddr import Endpoint
from kubespan.stun import codec
from kubespan.stun.codec import StunError

TID = bytes(range(1, 13))
V4 = Endpoint.parse("192.0.2.1:32853")
V6 = Endpoint.parse("[2001:db8:1234:5678:11:2233:4455:6677]:32853")


def header(message_type: int, length: int, cookie: int = codec.MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI", message_type, length, cookie) + TID


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def message(message_type: int, *attributes: bytes) -> bytes:
    body = b"".join(attributes)
    return header(message_type, len(body)) + body


def test_rfc5769_ipv4_response_decodes() -> None:
    """RFC 5769 section 2.2 (its XOR-MAPPED-ADDRESS, without the integrity attributes)."""
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    xored = bytes.fromhex("0001a147e112a643")
    data = struct.pack("!HHI", 0x0101, 12, codec.MAGIC_COOKIE) + tid + attribute(0x0020, xored)
    answer = codec.parse_binding_response(data)
    assert answer == codec.BindingAnswer(tid, Endpoint.parse("192.0.2.1:32853"))


def test_rfc5769_ipv6_response_decodes() -> None:
    tid = bytes.fromhex("b7e7a701bc34d686fa87dfae")
    xored = bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")
    data = struct.pack("!HHI", 0x0101, 24, codec.MAGIC_COOKIE) + tid + attribute(0x0020, xored)
    assert codec.parse_binding_response(data).mapped == V6


@pytest.mark.parametrize("mapped", [V4, V6, Endpoint.parse("203.0.113.1:1")])
def test_response_round_trip(mapped: Endpoint) -> None:
    transaction_id = os.urandom(12)
    data = codec.binding_response(transaction_id, mapped)
    assert len(data) == (32 if mapped.address.version == 4 else 44)
    assert codec.parse_binding_response(data) == codec.BindingAnswer(transaction_id, mapped)


def test_request_round_trip_and_size() -> None:
    data = codec.binding_request(TID)
    assert len(data) >= codec.LARGEST_RESPONSE_BYTES
    assert codec.parse_binding_request(data) == TID


def test_mapped_address_fallback_and_xor_preferred() -> None:
    plain = attribute(0x0001, struct.pack("!BBH", 0, 1, 4000) + bytes([198, 51, 100, 7]))
    assert codec.parse_binding_response(message(0x0101, plain)).mapped == Endpoint.parse(
        "198.51.100.7:4000"
    )
    xored = codec.binding_response(TID, V4)[20:]
    assert codec.parse_binding_response(message(0x0101, plain, xored)).mapped == V4


def test_fingerprint_checked_when_present() -> None:
    data = codec.encode(
        0x0101,
        TID,
        (codec.Attribute(0x0020, codec.binding_response(TID, V4)[24:]),),
        fingerprint=True,
    )
    assert codec.parse_binding_response(data).mapped == V4
    broken = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(StunError, match="FINGERPRINT does not match"):
        codec.parse_binding_response(broken)
    crc = struct.pack("!I", zlib.crc32(b"") ^ codec.FINGERPRINT_XOR)
    early = message(0x0101, attribute(0x8028, crc), codec.binding_response(TID, V4)[20:])
    with pytest.raises(StunError, match="last attribute"):
        codec.parse_binding_response(early)


GOOD = codec.binding_response(TID, V4)

BAD_RESPONSES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "shorter than a STUN header"),
    ("truncated header", GOOD[:19], "shorter than a STUN header"),
    ("huge", GOOD + b"\0" * 2000, "larger than any"),
    ("wrong cookie", header(0x0101, 0, 0x12345678), "magic cookie"),
    ("leading bits", header(0xC101, 0), "leading bits"),
    ("length not aligned", header(0x0101, 2) + b"\0\0", "multiple of 4"),
    ("length lies long", header(0x0101, 64) + GOOD[20:], "but 12 bytes follow"),
    ("length lies short", header(0x0101, 4) + GOOD[20:], "but 12 bytes follow"),
    ("truncated attribute header", header(0x0101, 4) + b"\0\x20\0", "but 3 bytes follow"),
    (
        "attribute longer than message",
        header(0x0101, 8) + struct.pack("!HH", 0x0020, 200) + b"\0" * 4,
        "claims 200 bytes",
    ),
    (
        "attribute length at the limit",
        header(0x0101, 4) + struct.pack("!HH", 0x0020, 0xFFFF),
        "claims 65535 bytes",
    ),
    ("too many attributes", message(0x0101, *[attribute(0x8022, b"")] * 40), "more than 32"),
    ("no address", message(0x0101, attribute(0x8022, b"x")), "names no mapped address"),
    ("request, not response", codec.binding_request(TID), "not a binding response"),
    (
        "error response",
        message(0x0111, attribute(0x0009, b"\0\0\x04\x14" + b"Unknown")),
        "error response 420",
    ),
    ("address too short", message(0x0101, attribute(0x0020, b"\0\x01")), "truncated"),
    ("unknown family", message(0x0101, attribute(0x0020, b"\0\x03\0\1" + b"\0" * 4)), "family 3"),
    (
        "v4 with v6 length",
        message(0x0101, attribute(0x0020, b"\0\x01\0\1" + b"\0" * 16)),
        "20 bytes",
    ),
    ("v6 with v4 length", message(0x0101, attribute(0x0020, b"\0\x02\0\1" + b"\0" * 4)), "8 bytes"),
    (
        "port zero",
        message(0x0101, attribute(0x0020, struct.pack("!BBH", 0, 1, 0x2112) + b"\0" * 4)),
        "port 0",
    ),
]


@pytest.mark.parametrize(
    ("data", "why"), [c[1:] for c in BAD_RESPONSES], ids=[c[0] for c in BAD_RESPONSES]
)
def test_bad_responses_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        codec.parse_binding_response(data)


BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("a response", GOOD, "not a binding request"),
    ("change-request", message(0x0001, attribute(0x0003, b"\0\0\0\x06")), "not understood"),
    ("truncated", codec.binding_request(TID)[:30], "but 10 bytes follow"),
]


@pytest.mark.parametrize(
    ("data", "why"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(StunError, match=why):
        codec.parse_binding_request(data)


def test_optional_attributes_in_requests_are_ignored() -> None:
    data = codec.encode(0x0001, TID, (codec.Attribute(0x8022, b"someone else"),), fingerprint=True)
    assert codec.parse_binding_request(data) == TID


def test_random_bytes_raise_only_stun_errors() -> None:
    """Mutations of valid messages: every outcome is a value or a StunError."""
    seeds = [GOOD, codec.binding_response(TID, V6), codec.binding_request(TID)]
    for seed in seeds:
        for position in range(len(seed)):
            for flip in (0x01, 0x80, 0xFF):
                mutated = bytearray(seed)
                mutated[position] ^= flip
                for parse in (codec.parse_binding_response, codec.parse_binding_request):
                    with contextlib.suppress(StunError):
                        parse(bytes(mutated))
    for _ in range(2000):
        data = codec.binding_response(TID, V4)[:20] + os.urandom(int.from_bytes(os.urandom(1)) % 64)
        data = data[:2] + struct.pack("!H", len(data) - 20) + data[4:]
        with contextlib.suppress(StunError):
            codec.decode(data)
