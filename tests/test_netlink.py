"""The netlink codec: every length checked against the buffer."""

from __future__ import annotations

import struct

import pytest

from kubespan.apply.netlink import (
    NLMSG_ERROR,
    Message,
    NetlinkFormatError,
    attribute_map,
    attributes,
    encode_attribute,
    encode_message,
    error_code,
    split_messages,
    string,
    u32,
)


def test_messages_and_attributes_round_trip() -> None:
    payload = b"\1\2\3\4" + encode_attribute(3, b"eth0\0") + encode_attribute(6, b"\7\0\0\0")
    data = encode_message(16, 0x2, 9, payload) + encode_message(17, 0, 10, b"abc")
    first, second = split_messages(data)
    assert (first.type, first.flags, first.seq, first.payload) == (16, 0x2, 9, payload)
    assert (second.type, second.payload) == (17, b"abc")
    assert attributes(payload[4:]) == [(3, b"eth0\0"), (6, b"\7\0\0\0")]
    assert string(attribute_map(payload[4:])[3]) == "eth0"
    assert u32(attribute_map(payload[4:])[6]) == 7


def test_the_nested_and_byte_order_flags_are_not_part_of_the_type() -> None:
    assert attributes(struct.pack("=HH", 4, 0x8000 | 0x4000 | 5)) == [(5, b"")]


@pytest.mark.parametrize(
    "data",
    [
        b"\1\2\3",  # shorter than a header
        struct.pack("=IHHII", 100, 16, 0, 0, 0),  # claims more than there is
        struct.pack("=IHHII", 8, 16, 0, 0, 0) + bytes(8),  # shorter than its own header
    ],
)
def test_messages_that_do_not_add_up(data: bytes) -> None:
    with pytest.raises(NetlinkFormatError):
        split_messages(data)


@pytest.mark.parametrize("data", [struct.pack("=HH", 2, 1), struct.pack("=HH", 9, 1) + b"ab"])
def test_attributes_that_do_not_add_up(data: bytes) -> None:
    with pytest.raises(NetlinkFormatError):
        attributes(data)


def test_values_of_the_wrong_size_or_shape() -> None:
    with pytest.raises(NetlinkFormatError):
        u32(b"\1\2")
    with pytest.raises(NetlinkFormatError):
        string(b"eth0")  # no NUL
    with pytest.raises(NetlinkFormatError):
        string(b"\xffeth\0")


def test_error_codes() -> None:
    assert error_code(Message(NLMSG_ERROR, 0, 1, 0, struct.pack("=i", -2) + bytes(16))) == 2
    assert error_code(Message(NLMSG_ERROR, 0, 1, 0, struct.pack("=i", 0))) == 0
    with pytest.raises(NetlinkFormatError):
        error_code(Message(NLMSG_ERROR, 0, 1, 0, b"\0"))
