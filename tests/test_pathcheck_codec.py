"""Path check datagrams: round trips, the pairwise key, and hostile bytes refused cleanly."""

from __future__ import annotations

import os
import struct

import pytest
from nacl.public import PrivateKey

from kubespan.netaddr import Endpoint
from kubespan.pathcheck import codec
from kubespan.pathcheck.codec import PathCheckError

TID = bytes(range(1, 13))
KEY = bytes(range(32, 64))  # a pair key (any 32 bytes to the codec)
SENDER = bytes(range(100, 132))
V4 = Endpoint.parse("203.0.113.7:40001")
V6 = Endpoint.parse("[2001:db8:1234:5678:11:2233:4455:6677]:51820")
CLUSTER = bytes(range(7, 39))

# Offsets in the layout: tag 0, kind 4, version 5, zero 6, sender 8, transaction id 40,
# observed address 52, observed port 68, MAC 70.
KIND_AT, VERSION_AT, ZERO_AT, SENDER_AT, TID_AT, OBSERVED_AT, PORT_AT, MAC_AT = (
    4, 5, 6, 8, 40, 52, 68, 70,
)  # fmt: skip


def keypair() -> tuple[bytes, bytes]:
    private = PrivateKey.generate()
    return bytes(private), bytes(private.public_key)


def with_byte(payload: bytes, at: int, value: int) -> bytes:
    return payload[:at] + bytes([value]) + payload[at + 1 :]


def test_layout_is_86_bytes_and_answers_are_as_long_as_requests() -> None:
    assert codec.MESSAGE_BYTES == 86
    request = codec.request(SENDER, TID, KEY)
    answer = codec.answer(SENDER, TID, KEY, V4)
    assert len(request) == len(answer) == 86
    assert struct.unpack_from("!I", request)[0] == codec.TAG == int.from_bytes(b"KSpc", "big")
    # The first byte is no WireGuard message type: the kernel's socket drops these.
    assert request[0] not in (1, 2, 3, 4)
    assert request[SENDER_AT:TID_AT] == SENDER and request[TID_AT:OBSERVED_AT] == TID


def test_request_round_trip() -> None:
    request = codec.request(SENDER, TID, KEY)
    assert codec.parse(request) == codec.PathMessage(codec.REQUEST, SENDER, TID, None)
    assert request[OBSERVED_AT:MAC_AT] == bytes(18)  # no observed endpoint, port zero
    assert codec.authentic(request, KEY)


@pytest.mark.parametrize("observed", [V4, V6], ids=["ipv4", "ipv6"])
def test_answer_round_trip(observed: Endpoint) -> None:
    answer = codec.answer(SENDER, TID, KEY, observed)
    message = codec.parse(answer)
    assert message == codec.PathMessage(codec.ANSWER, SENDER, TID, observed)
    assert message.observed is not None
    assert message.observed.address.version == observed.address.version
    assert codec.authentic(answer, KEY)


def test_ipv4_observed_is_carried_as_mapped_ipv6() -> None:
    answer = codec.answer(SENDER, TID, KEY, V4)
    packed = answer[OBSERVED_AT:PORT_AT]
    assert packed == bytes(10) + b"\xff\xff" + bytes([203, 0, 113, 7])
    assert struct.unpack_from("!H", answer, PORT_AT)[0] == 40001


def test_pair_key_is_the_same_from_both_sides() -> None:
    a_private, a_public = keypair()
    b_private, b_public = keypair()
    from_a = codec.pair_key(a_private, b_public, a_public, CLUSTER)
    from_b = codec.pair_key(b_private, a_public, b_public, CLUSTER)
    assert from_a == from_b
    assert len(from_a) == 32


def test_pair_key_differs_per_pair_and_per_cluster() -> None:
    a_private, a_public = keypair()
    _, b_public = keypair()
    _, c_public = keypair()
    ab = codec.pair_key(a_private, b_public, a_public, CLUSTER)
    assert codec.pair_key(a_private, c_public, a_public, CLUSTER) != ab
    assert codec.pair_key(a_private, b_public, a_public, os.urandom(32)) != ab


@pytest.mark.parametrize(
    "peer_public",
    [
        bytes(32),  # zero
        (1).to_bytes(32, "little"),  # order 1
        # A point of order 8 (libsodium's blacklist).
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    ],
    ids=["zero", "one", "order-8"],
)
def test_low_order_public_key_raises(peer_public: bytes) -> None:
    a_private, a_public = keypair()
    with pytest.raises(ValueError, match="no shared secret"):
        codec.pair_key(a_private, peer_public, a_public, CLUSTER)


@pytest.mark.parametrize(("private", "public"), [(bytes(31), bytes(32)), (bytes(32), bytes(33))])
def test_pair_key_refuses_wrong_key_sizes(private: bytes, public: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        codec.pair_key(private, public, bytes(32), CLUSTER)


def test_encode_refuses_wrong_field_sizes() -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        codec.request(SENDER[:31], TID, KEY)
    with pytest.raises(ValueError, match="12-byte transaction id"):
        codec.request(SENDER, TID + b"x", KEY)


REQUEST = codec.request(SENDER, TID, KEY)
ANSWER = codec.answer(SENDER, TID, KEY, V4)
MALFORMED = {
    "empty": b"",
    "short": REQUEST[:-1],
    "long": REQUEST + b"\0",
    "tag": b"KSpd" + REQUEST[4:],
    "wireguard initiation": b"\x01\0\0\0" + REQUEST[4:],
    "version 0": with_byte(REQUEST, VERSION_AT, 0),
    "version 2": with_byte(REQUEST, VERSION_AT, 2),
    "kind 0": with_byte(REQUEST, KIND_AT, 0),
    "kind 3": with_byte(ANSWER, KIND_AT, 3),
    "reserved high": with_byte(REQUEST, ZERO_AT, 1),
    "reserved low": with_byte(ANSWER, ZERO_AT + 1, 0x80),
    "request with an observed address": with_byte(REQUEST, OBSERVED_AT + 15, 1),
    "request with an observed port": with_byte(REQUEST, PORT_AT + 1, 1),
    "answer without an observed endpoint": with_byte(REQUEST, KIND_AT, codec.ANSWER),
    "answer with port 0": ANSWER[:PORT_AT] + b"\0\0" + ANSWER[MAC_AT:],
    "answer to ::ffff:0.0.0.0": ANSWER[:OBSERVED_AT] + bytes(10) + b"\xff\xff" + bytes(4)
    + ANSWER[PORT_AT:],
    "answer to ::": ANSWER[:OBSERVED_AT] + bytes(16) + ANSWER[PORT_AT:],
}  # fmt: skip


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_datagrams_are_refused(payload: bytes) -> None:
    with pytest.raises(PathCheckError):
        codec.parse(payload)


def test_parse_does_not_check_the_mac() -> None:
    """parse only reads fields; `authentic` is the caller's separate check."""
    forged = REQUEST[:MAC_AT] + bytes(16)
    assert codec.parse(forged).kind == codec.REQUEST
    assert not codec.authentic(forged, KEY)


@pytest.mark.parametrize(
    "bit",
    [0, 8 * KIND_AT + 1, 8 * VERSION_AT, 8 * ZERO_AT + 7, 8 * SENDER_AT + 3, 8 * TID_AT + 95,
     8 * OBSERVED_AT + 127, 8 * PORT_AT + 15, 8 * MAC_AT, 8 * codec.MESSAGE_BYTES - 1],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["request", "answer"])
def test_any_flipped_bit_is_not_authentic(bit: int, kind: str) -> None:
    payload = REQUEST if kind == "request" else ANSWER
    flipped = bytearray(payload)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert codec.authentic(payload, KEY)
    assert not codec.authentic(bytes(flipped), KEY)


def test_the_wrong_key_is_not_authentic() -> None:
    a_private, a_public = keypair()
    _, b_public = keypair()
    _, c_public = keypair()
    ab = codec.pair_key(a_private, b_public, a_public, CLUSTER)
    ac = codec.pair_key(a_private, c_public, a_public, CLUSTER)
    request = codec.request(a_public, TID, ab)
    assert codec.authentic(request, ab)
    assert not codec.authentic(request, ac)
    assert not codec.authentic(request, KEY)


@pytest.mark.parametrize("size", [0, 16, 85, 87])
def test_authentic_refuses_other_lengths(size: int) -> None:
    # A body of any length with a MAC that would match it is still not a path check.
    body = os.urandom(max(0, size - codec.MAC_BYTES))
    payload = body + codec._mac(KEY, body) if size >= codec.MAC_BYTES else body
    assert not codec.authentic(payload, KEY)
