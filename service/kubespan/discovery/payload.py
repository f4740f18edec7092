"""What goes inside the sealed blobs: a node's record as JSON, endpoints as packed bytes.

Record (payload version 2), sealed with the data key:

    {"v": 2, "node_id", "hostname", "public_key", "ula", "addresses", "pod_cidrs",
     "endpoints": ["192.0.2.1:51820", "[2001:db8::1]:51820"],
     "relay_ports": [first, count] (a relay only: the ports it relays pairs on),
     "version": strictly increasing per node, "valid_until": Unix seconds, "leave": bool,
     "sig": XEdDSA signature, base64}

Every member holds the cluster secret, so sealing alone cannot tell members apart: the record
is also signed with the node's WireGuard private key (xeddsa.py), over "kubespan-record-v2",
a zero byte and the record's canonical JSON without "sig"; and its node id must be the one
derived from that key (identity.node_id_for). So a record speaks only for the holder of its
WireGuard key: no member can take over, shadow or remove another.

The node's own endpoints are inside the record, so they carry its version like the rest: an
older record served again cannot bring back old endpoints. The plaintext is padded with
trailing spaces (JSON allows them) so every sealed record is exactly 1, 2 or 4 KiB, and every
endpoint is packed as 18 bytes (IPv4 as IPv4-mapped IPv6): blob sizes tell the service
neither the address family nor the hostname's length.

Forward compatibility: fields this version does not know are ignored, within the record's
bounds (4 KiB, two levels deep), and still covered by the signature. So a later version can
add what older members may ignore (a relay's endpoints, say) without splitting the cluster
during a rolling upgrade; a change that older members must not ignore raises "v", which they
refuse.

Peers' records are untrusted even after they authenticate (every member holds the cluster
secret, and may run other software): every field is checked, and a malformed record raises
ValueError, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import replace
from typing import Any

from kubespan import boundedjson, xeddsa
from kubespan.crypto import SEALED_OVERHEAD
from kubespan.identity import node_id_for
from kubespan.model import AffiliateInfo, MemberRecord
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork

PAYLOAD_VERSION = 2
SEALED_SIZES = (1024, 2048, 4096)
MAX_ADDRESSES = 32
MAX_ENDPOINTS = 24
MAX_POD_CIDRS = 16
MAX_NODE_ID = 64
MAX_HOSTNAME = 253
MAX_RECORD_VERSION = (1 << 63) - 1
MAX_VALID_UNTIL = 1 << 40
ENDPOINT_BYTES = 18

SIGNED_PREFIX = b"kubespan-record-v2\0"
_NODE_ID = re.compile(r"[0-9A-Za-z]{1,64}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9-]{1,63}")


def valid_hostname(name: str) -> bool:
    """DNS characters only: labels of letters, digits and hyphens, at most 253 in all."""
    return len(name) <= MAX_HOSTNAME and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def valid_node_id(node_id: str) -> bool:
    return _NODE_ID.fullmatch(node_id) is not None


_KNOWN_FIELDS = frozenset(
    {
        "v",
        "node_id",
        "hostname",
        "public_key",
        "ula",
        "addresses",
        "pod_cidrs",
        "endpoints",
        "version",
        "valid_until",
        "leave",
        "relay_ports",
        "sig",
    }
)


def _document(record: MemberRecord) -> dict[str, Any]:
    info = record.info
    later: dict[str, Any] = json.loads(record.later_fields) if record.later_fields else {}
    # Only a relay says so: every other record reads as older members wrote it.
    relay = {"relay_ports": list(info.relay_ports)} if info.relay_ports else {}
    return {
        **later,
        **relay,
        "v": PAYLOAD_VERSION,
        "node_id": info.node_id,
        "hostname": info.hostname,
        "public_key": info.public_key,
        "ula": str(info.ula),
        "addresses": [str(a) for a in info.addresses],
        "pod_cidrs": [str(n) for n in info.pod_cidrs],
        "endpoints": [str(e) for e in record.endpoints],
        "version": record.version,
        "valid_until": record.valid_until,
        "leave": record.leave,
    }


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def sign_record(record: MemberRecord, private_key: bytes, random: bytes) -> MemberRecord:
    """The record signed with the node's WireGuard private key (64 fresh random bytes)."""
    message = SIGNED_PREFIX + canonical(_document(record))
    return replace(record, signature=xeddsa.sign(private_key, message, random))


def encode_record(record: MemberRecord) -> bytes:
    """The padded plaintext of a signed record; ValueError when it is not signed or cannot
    fit the largest size."""
    if len(record.signature) != xeddsa.SIGNATURE_BYTES:
        raise ValueError("record is not signed")
    document = _document(record)
    document["sig"] = base64.b64encode(record.signature).decode()
    raw = canonical(document)
    for sealed_size in SEALED_SIZES:
        size = sealed_size - SEALED_OVERHEAD
        if len(raw) <= size:
            return raw + b" " * (size - len(raw))
    raise ValueError(
        f"this node's record is {len(raw)} bytes, more than fits a sealed blob of "
        f"{SEALED_SIZES[-1]} bytes"
    )


def decode_record(raw: bytes) -> MemberRecord:
    """A record from its plaintext; ValueError naming the first field that is wrong."""
    document: Any = boundedjson.loads(raw, SEALED_SIZES[-1], max_depth=2)
    if not isinstance(document, dict) or document.get("v") != PAYLOAD_VERSION:
        raise ValueError("record has an unknown payload version")
    node_id = _string(document, "node_id", MAX_NODE_ID)
    if not valid_node_id(node_id):
        raise ValueError("node_id is not 1 to 64 letters and digits")
    hostname = _string(document, "hostname", MAX_HOSTNAME)
    if not valid_hostname(hostname):
        raise ValueError("hostname holds characters other than letters, digits, '-' and '.'")
    public_key = _string(document, "public_key", 44)
    try:
        key = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32 or base64.b64encode(key).decode() != public_key:
        raise ValueError("public_key is not a WireGuard key in canonical base64")
    signature = _signature(document.pop("sig", None))
    if not xeddsa.verify(key, SIGNED_PREFIX + canonical(document), signature):
        raise ValueError("signature does not verify for the record's public_key")
    if node_id != node_id_for(key):
        raise ValueError("node_id is not the one of the record's public_key")
    ula = parse_address(_string(document, "ula", 45), "ula")
    if not isinstance(ula, ipaddress.IPv6Address):
        raise ValueError("ula is not an IPv6 address")
    addresses = tuple(
        parse_address(a, "addresses") for a in _list(document, "addresses", MAX_ADDRESSES)
    )
    pod_cidrs = tuple(_network(n) for n in _list(document, "pod_cidrs", MAX_POD_CIDRS))
    endpoints = tuple(_endpoint(e) for e in _list(document, "endpoints", MAX_ENDPOINTS))
    version = _integer(document, "version", 1, MAX_RECORD_VERSION)
    valid_until = _integer(document, "valid_until", 0, MAX_VALID_UNTIL)
    leave = document.get("leave")
    if not isinstance(leave, bool):
        raise ValueError("leave is not a boolean")
    relay_ports = _relay_ports(document["relay_ports"]) if "relay_ports" in document else None
    info = AffiliateInfo(node_id, hostname, public_key, ula, addresses, pod_cidrs, relay_ports)
    later = {k: v for k, v in document.items() if k not in _KNOWN_FIELDS}
    record = MemberRecord(
        info,
        endpoints,
        version,
        valid_until,
        leave,
        signature,
        canonical(later) if later else b"",
    )
    # Kept records are encoded again (the peer cache): one that would not come out exactly
    # as signed (an address not in its canonical form, an empty field written out) is
    # refused here, where it harms only itself, not later, where it would spoil the cache.
    if canonical(_document(record)) != canonical(document):
        raise ValueError("record is not in canonical form: it would not encode back as signed")
    return record


def _relay_ports(value: Any) -> tuple[int, int]:
    """A relay's ports, [first, count]: an even count of at least 2 within 1 to 65535."""
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        first, count = value
        if count >= 2 and count % 2 == 0 and 1 <= first <= 65536 - count:
            return first, count
    raise ValueError("relay_ports is not [first, count] with an even count within 1 to 65535")


def _signature(value: Any) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != xeddsa.SIGNATURE_BYTES:
        raise ValueError("record has no signature of 64 bytes, base64")
    return raw


def _integer(document: dict[str, Any], name: str, low: int, high: int) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} is not an integer from {low} to {high}")
    return value


def _string(document: dict[str, Any], name: str, max_length: int) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{name} is not a string of 1 to {max_length} characters")
    return value


def _list(document: dict[str, Any], name: str, max_items: int) -> list[Any]:
    value = document.get(name)
    if not isinstance(value, list) or len(value) > max_items:
        raise ValueError(f"{name} is not a list of at most {max_items} items")
    if not all(isinstance(item, str) and len(item) <= 64 for item in value):
        raise ValueError(f"{name} holds something that is not a short string")
    return value


def parse_address(text: str, name: str) -> IPAddress:
    """An IP address written plainly: no zone index, no integer form."""
    try:
        if "%" in text:
            raise ValueError
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{name} holds {text[:64]!r}, which is not an IP address") from None


def _network(text: str) -> IPNetwork:
    try:
        if "%" in text:
            raise ValueError
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValueError(f"pod_cidrs holds {text[:64]!r}, which is not a CIDR prefix") from None


def _endpoint(text: str) -> Endpoint:
    if "%" in text:
        raise ValueError(f"endpoints holds {text[:64]!r}, which has a zone index")
    try:
        return Endpoint.parse(text)
    except ValueError as error:
        raise ValueError(f"endpoints holds {error}") from None


def encode_endpoint(endpoint: Endpoint) -> bytes:
    """18 bytes whatever the family: IPv4 as IPv4-mapped IPv6, then the port."""
    address = endpoint.address
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)
    return address.packed + endpoint.port.to_bytes(2, "big")


def decode_endpoint(raw: bytes) -> Endpoint:
    if len(raw) != ENDPOINT_BYTES:
        raise ValueError(f"endpoint is not {ENDPOINT_BYTES} bytes")
    port = int.from_bytes(raw[-2:], "big")
    if port == 0:
        raise ValueError("endpoint port is 0")
    address = ipaddress.IPv6Address(raw[:-2])
    mapped = address.ipv4_mapped
    return Endpoint(mapped if mapped is not None else address, port)
