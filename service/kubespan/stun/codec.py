"""STUN binding messages (RFC 8489), encoded and decoded. Pure: bytes in, values out.

Every byte handed to `decode` may come from anyone on the internet: each length is checked
against what is left before it is used, the number of attributes is bounded, and anything
malformed raises StunError (never IndexError or struct.error).
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass

from kubespan.netaddr import Endpoint

MAGIC_COOKIE = 0x2112A442
HEADER_BYTES = 20
TRANSACTION_ID_BYTES = 12

BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

ATTR_MAPPED_ADDRESS = 0x0001
ATTR_ERROR_CODE = 0x0009
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
# Attributes below 0x8000 must be understood by the receiver (RFC 8489 section 14); those of a
# binding request a reflector may meet and ignore safely are none: it refuses the others.
COMPREHENSION_OPTIONAL = 0x8000

FINGERPRINT_XOR = 0x5354554E
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02

# A binding answer from any reflector we know fits in a few hundred bytes (coturn's, with
# SOFTWARE, RESPONSE-ORIGIN, OTHER-ADDRESS and FINGERPRINT, is under 150); nothing legitimate
# comes near these.
MAX_MESSAGE_BYTES = 1200
MAX_ATTRIBUTES = 32

# Our requests carry a SOFTWARE attribute that makes them as large as the largest answer our
# responder sends (44 bytes: header and an IPv6 XOR-MAPPED-ADDRESS), so the responder can
# refuse anything smaller and never send more bytes than it received.
SOFTWARE_NAME = b"kubespan-stun-prober"
LARGEST_RESPONSE_BYTES = HEADER_BYTES + 4 + 20


class StunError(ValueError):
    """A message that is not a valid STUN message of the kind expected."""


@dataclass(frozen=True)
class Attribute:
    kind: int
    value: bytes


@dataclass(frozen=True)
class Message:
    message_type: int
    transaction_id: bytes
    attributes: tuple[Attribute, ...]

    def first(self, kind: int) -> Attribute | None:
        return next((a for a in self.attributes if a.kind == kind), None)


@dataclass(frozen=True)
class BindingAnswer:
    """A binding success response: where the reflector saw the request come from."""

    transaction_id: bytes
    mapped: Endpoint


def encode(
    message_type: int,
    transaction_id: bytes,
    attributes: tuple[Attribute, ...] = (),
    fingerprint: bool = False,
) -> bytes:
    if len(transaction_id) != TRANSACTION_ID_BYTES:
        raise ValueError(f"a transaction id has {TRANSACTION_ID_BYTES} bytes")
    body = b"".join(_attribute(a.kind, a.value) for a in attributes)
    if fingerprint:
        length = len(body) + 8
        head = struct.pack("!HHI", message_type, length, MAGIC_COOKIE) + transaction_id
        crc = zlib.crc32(head + body) ^ FINGERPRINT_XOR
        body += _attribute(ATTR_FINGERPRINT, struct.pack("!I", crc))
    return struct.pack("!HHI", message_type, len(body), MAGIC_COOKIE) + transaction_id + body


def _attribute(kind: int, value: bytes) -> bytes:
    padding = -len(value) % 4
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * padding


def decode(data: bytes) -> Message:
    """The header and attributes of one STUN message, every length checked."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise StunError(f"{len(data)} bytes: larger than any STUN message we accept")
    if len(data) < HEADER_BYTES:
        raise StunError(f"{len(data)} bytes: shorter than a STUN header")
    message_type, length, cookie = struct.unpack_from("!HHI", data)
    if message_type & 0xC000:
        raise StunError("the two leading bits are not zero: not STUN")
    if cookie != MAGIC_COOKIE:
        raise StunError(f"magic cookie {cookie:#010x}, not {MAGIC_COOKIE:#010x}")
    if length % 4:
        raise StunError(f"message length {length} is not a multiple of 4")
    if HEADER_BYTES + length != len(data):
        raise StunError(f"message length {length} but {len(data) - HEADER_BYTES} bytes follow")
    transaction_id = bytes(data[8:HEADER_BYTES])
    attributes: list[Attribute] = []
    offset = HEADER_BYTES
    while offset < len(data):
        if len(attributes) >= MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if len(data) - offset < 4:
            raise StunError(f"attribute header truncated at byte {offset}")
        kind, size = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        end = start + size
        if end > len(data):
            raise StunError(f"attribute {kind:#06x} claims {size} bytes, {len(data) - start} left")
        if kind == ATTR_FINGERPRINT:
            _check_fingerprint(data, offset, size, end)
        attributes.append(Attribute(kind, bytes(data[start:end])))
        offset = end + (-size % 4)
    return Message(message_type, transaction_id, tuple(attributes))


def _check_fingerprint(data: bytes, offset: int, size: int, end: int) -> None:
    if size != 4 or end != len(data):
        raise StunError("FINGERPRINT must be the last attribute and hold 4 bytes")
    (claimed,) = struct.unpack_from("!I", data, offset + 4)
    if zlib.crc32(data[:offset]) ^ FINGERPRINT_XOR != claimed:
        raise StunError("FINGERPRINT does not match the message")


def binding_request(transaction_id: bytes) -> bytes:
    """A binding request, padded (see SOFTWARE_NAME) to at least the largest answer."""
    message = encode(BINDING_REQUEST, transaction_id, (Attribute(ATTR_SOFTWARE, SOFTWARE_NAME),))
    assert len(message) >= LARGEST_RESPONSE_BYTES
    return message


def parse_binding_request(data: bytes) -> bytes:
    """The transaction id of a well-formed binding request with nothing we must understand
    and do not (e.g. RFC 5780 CHANGE-REQUEST: a reflector that ignored it would mislead)."""
    message = decode(data)
    if message.message_type != BINDING_REQUEST:
        raise StunError(f"message type {message.message_type:#06x} is not a binding request")
    for attribute in message.attributes:
        if attribute.kind < COMPREHENSION_OPTIONAL:
            raise StunError(f"attribute {attribute.kind:#06x} is not understood")
    return message.transaction_id


def binding_response(transaction_id: bytes, mapped: Endpoint) -> bytes:
    """A binding success response holding XOR-MAPPED-ADDRESS alone: as small as it can be."""
    return encode(BINDING_SUCCESS, transaction_id, (_xor_address(transaction_id, mapped),))


def parse_binding_response(data: bytes) -> BindingAnswer:
    """The mapped endpoint of a binding success response: XOR-MAPPED-ADDRESS, or
    MAPPED-ADDRESS from a reflector that predates it (RFC 3489)."""
    message = decode(data)
    if message.message_type == BINDING_ERROR:
        raise StunError(f"binding error response{_error_code(message)}")
    if message.message_type != BINDING_SUCCESS:
        raise StunError(f"message type {message.message_type:#06x} is not a binding response")
    xored = message.first(ATTR_XOR_MAPPED_ADDRESS)
    if xored is not None:
        mapped = _parse_address(xored.value, "XOR-MAPPED-ADDRESS", message.transaction_id)
    else:
        plain = message.first(ATTR_MAPPED_ADDRESS)
        if plain is None:
            raise StunError("the response names no mapped address")
        mapped = _parse_address(plain.value, "MAPPED-ADDRESS", None)
    return BindingAnswer(message.transaction_id, mapped)


def _error_code(message: Message) -> str:
    attribute = message.first(ATTR_ERROR_CODE)
    if attribute is None or len(attribute.value) < 4:
        return ""
    return f" {(attribute.value[2] & 0x7) * 100 + attribute.value[3] % 100}"


def _xor_address(transaction_id: bytes, mapped: Endpoint) -> Attribute:
    port = mapped.port ^ (MAGIC_COOKIE >> 16)
    mask = struct.pack("!I", MAGIC_COOKIE) + transaction_id
    packed = mapped.address.packed
    xored = bytes(b ^ m for b, m in zip(packed, mask, strict=False))
    family = FAMILY_IPV4 if mapped.address.version == 4 else FAMILY_IPV6
    return Attribute(ATTR_XOR_MAPPED_ADDRESS, struct.pack("!BBH", 0, family, port) + xored)


def _parse_address(value: bytes, name: str, transaction_id: bytes | None) -> Endpoint:
    if len(value) < 4:
        raise StunError(f"{name} truncated: {len(value)} bytes")
    _, family, port = struct.unpack_from("!BBH", value)
    expected = {FAMILY_IPV4: 8, FAMILY_IPV6: 20}.get(family)
    if expected is None:
        raise StunError(f"{name}: unknown address family {family}")
    if len(value) != expected:
        raise StunError(f"{name}: {len(value)} bytes, {expected} for family {family}")
    raw = value[4:]
    if transaction_id is not None:
        mask = struct.pack("!I", MAGIC_COOKIE) + transaction_id
        raw = bytes(b ^ m for b, m in zip(raw, mask, strict=False))
        port ^= MAGIC_COOKIE >> 16
    if port == 0:
        raise StunError(f"{name}: port 0")
    address = ipaddress.IPv4Address(raw) if family == FAMILY_IPV4 else ipaddress.IPv6Address(raw)
    return Endpoint(address, port)
