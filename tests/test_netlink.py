"""The netlink codec: every length checked against the buffer."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from kubespan.apply.netlink import (
    HEADER,
    NETLINK_ROUTE,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    Message,
    NetlinkFormatError,
    attribute_map,
    attributes,
    encode_attribute,
    encode_message,
    error_code,
    link_name,
    split_messages,
    string,
    u32,
)
from kubespan.apply.nlsocket import DUMP_TRIES, NetlinkSocket


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


class ScriptedSocket:
    """Stands in for the kernel's end: each request is answered by the next scripted dump."""

    def __init__(self, dumps: list[list[tuple[int, int]]]) -> None:
        self.dumps = dumps  # per request: (type, flags) of each message before NLMSG_DONE
        self.requests = 0
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        seq = HEADER.unpack_from(data)[3]
        messages = self.dumps[min(self.requests, len(self.dumps) - 1)]
        self.requests += 1
        body = b"".join(encode_message(kind, flags, seq, b"") for kind, flags in messages)
        self.pending.append(body + encode_message(NLMSG_DONE, NLM_F_MULTI, seq, bytes(4)))
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[object], int, tuple[int, int]]:
        return self.pending.pop(0), [], 0, (0, 0)

    def close(self) -> None:
        pass


def scripted(dumps: list[list[tuple[int, int]]]) -> tuple[NetlinkSocket, ScriptedSocket]:
    rtnl = NetlinkSocket(NETLINK_ROUTE)
    rtnl.close()
    fake = ScriptedSocket(dumps)
    rtnl._socket = fake  # type: ignore[assignment]
    return rtnl, fake


def test_a_dump_the_kernel_marks_interrupted_is_asked_again() -> None:
    interrupted = [(16, NLM_F_MULTI | NLM_F_DUMP_INTR)]
    rtnl, fake = scripted([interrupted, [(16, NLM_F_MULTI), (16, NLM_F_MULTI)]])
    answer = rtnl.request(18, NLM_F_DUMP, b"")
    assert [m.type for m in answer] == [16, 16]
    assert fake.requests == 2


def test_a_dump_that_stays_interrupted_is_refused_not_taken_as_whole() -> None:
    rtnl, fake = scripted([[(16, NLM_F_MULTI | NLM_F_DUMP_INTR)]])
    with pytest.raises(OSError) as refused:
        rtnl.request(18, NLM_F_DUMP, b"")
    assert refused.value.errno == errno.EINTR
    assert fake.requests == DUMP_TRIES


def test_link_names_are_kept_byte_for_byte() -> None:
    assert link_name("ethé".encode() + b"\0") == "ethé"
    odd = link_name(b"eth\xff\0")  # not UTF-8: kept as os.fsdecode would, for /sys paths
    assert os.fsencode(odd) == b"eth\xff"
    with pytest.raises(NetlinkFormatError):
        link_name(b"eth0")
