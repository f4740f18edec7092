"""Netlink messages as bytes: split a datagram into messages, read and write attributes.

Pure and defensive: every length is checked against the buffer before it is used, and a
buffer that does not add up raises NetlinkFormatError instead of being read past its end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
ATTRIBUTE = struct.Struct("=HH")  # length, type
ERROR = struct.Struct("=i")

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_DUMP_INTR = 0x10  # the dump's data changed while it was read: not coherent
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800

NLA_TYPE_MASK = 0x3FFF  # without the nested and byte-order flags
NLA_F_NESTED = 0x8000

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12


class NetlinkFormatError(ValueError):
    """Bytes that are not a well-formed netlink message."""


@dataclass(frozen=True)
class Message:
    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


def align(length: int) -> int:
    return (length + 3) & ~3


def split_messages(buffer: bytes) -> list[Message]:
    """Every message in one datagram."""
    out = []
    offset = 0
    while offset < len(buffer):
        if len(buffer) - offset < HEADER.size:
            raise NetlinkFormatError(f"{len(buffer) - offset} trailing bytes, not a header")
        length, kind, flags, seq, pid = HEADER.unpack_from(buffer, offset)
        if length < HEADER.size or offset + length > len(buffer):
            raise NetlinkFormatError(f"message length {length} at offset {offset} is invalid")
        out.append(Message(kind, flags, seq, pid, buffer[offset + HEADER.size : offset + length]))
        offset += align(length)
    return out


def attribute_spans(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of every attribute's payload in `data`, in order; type without the
    nested/order flags."""
    out = []
    offset = 0
    while offset + ATTRIBUTE.size <= len(data):
        length, kind = ATTRIBUTE.unpack_from(data, offset)
        if length < ATTRIBUTE.size or offset + length > len(data):
            raise NetlinkFormatError(f"attribute length {length} at offset {offset} is invalid")
        out.append((kind & NLA_TYPE_MASK, offset + ATTRIBUTE.size, offset + length))
        offset += (length + 3) & ~3  # align(), inline: for every attribute of every dump
    return out


def attributes(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of every attribute, in order; type without the nested/order flags."""
    return [(kind, data[start:end]) for kind, start, end in attribute_spans(data)]


def attribute_map(data: bytes) -> dict[int, bytes]:
    """Attributes by type; a repeated type keeps its first value (as the kernel's parser)."""
    out: dict[int, bytes] = {}
    for kind, value in attributes(data):
        out.setdefault(kind, value)
    return out


def u8(value: bytes) -> int:
    return _unpack("=B", value)


def u32(value: bytes) -> int:
    return _unpack("=I", value)


def be32(value: bytes) -> int:
    return _unpack("!I", value)


def s32(value: bytes) -> int:
    return _unpack("=i", value)


def _unpack(fmt: str, value: bytes) -> int:
    if len(value) != struct.calcsize(fmt):
        raise NetlinkFormatError(f"{len(value)} bytes where {struct.calcsize(fmt)} belong")
    result: int = struct.unpack(fmt, value)[0]
    return result


def string(value: bytes) -> str:
    """A NUL-terminated string attribute (names of links and tables)."""
    text, nul, _ = value.partition(b"\0")
    if not nul:
        raise NetlinkFormatError("string attribute without its NUL")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError as error:
        raise NetlinkFormatError("string attribute that is not ASCII") from error


def error_code(message: Message) -> int:
    """The errno (positive, 0 for an acknowledgement) an NLMSG_ERROR message carries."""
    if len(message.payload) < ERROR.size:
        raise NetlinkFormatError("truncated error message")
    return -int(ERROR.unpack_from(message.payload)[0])


MAX_ATTRIBUTE = 0xFFFF  # an attribute's length is 16 bits, its header included


def encode_attribute(kind: int, value: bytes) -> bytes:
    length = ATTRIBUTE.size + len(value)
    if length > MAX_ATTRIBUTE:
        raise NetlinkFormatError(f"an attribute of {length} bytes: at most {MAX_ATTRIBUTE} fit")
    return ATTRIBUTE.pack(length, kind) + value + b"\0" * (align(length) - length)


def encode_message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return HEADER.pack(HEADER.size + len(payload), kind, flags, seq, 0) + payload


def link_name(value: bytes) -> str:
    """A link's name: any bytes but NUL, '/', ':' and white space, so not always ASCII or
    even UTF-8; kept byte for byte (undecodable bytes as surrogates, as os.fsdecode does), so
    /sys/class/net/<name> still finds it."""
    raw, nul, _ = value.partition(b"\0")
    if not nul:
        raise NetlinkFormatError("link name without its NUL")
    return raw.decode("utf-8", errors="surrogateescape")
