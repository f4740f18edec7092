"""What goes inside the sealed blobs: affiliate data as JSON, endpoints as packed bytes.

Peers' data is untrusted even after it authenticates (a member may run other software): every
field is checked and a malformed blob raises ValueError, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from typing import Any

from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint

PAYLOAD_VERSION = 1
MAX_ADDRESSES = 64


def encode_info(info: AffiliateInfo) -> bytes:
    document = {
        "v": PAYLOAD_VERSION,
        "node_id": info.node_id,
        "hostname": info.hostname,
        "public_key": info.public_key,
        "ula": str(info.ula),
        "addresses": [str(a) for a in info.addresses],
        "pod_cidrs": [str(n) for n in info.pod_cidrs],
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def decode_info(raw: bytes) -> AffiliateInfo:
    try:
        document: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("affiliate data is not JSON") from None
    if not isinstance(document, dict) or document.get("v") != PAYLOAD_VERSION:
        raise ValueError("affiliate data has an unknown version")
    node_id = _string(document, "node_id", 64)
    hostname = _string(document, "hostname", 253)
    public_key = _string(document, "public_key", 44)
    try:
        if len(base64.b64decode(public_key, validate=True)) != 32:
            raise ValueError
    except (binascii.Error, ValueError):
        raise ValueError("public_key is not a base64 WireGuard key") from None
    try:
        ula = ipaddress.IPv6Address(_string(document, "ula", 64))
    except ValueError:
        raise ValueError("ula is not an IPv6 address") from None
    raw_addresses = document.get("addresses")
    if not isinstance(raw_addresses, list) or len(raw_addresses) > MAX_ADDRESSES:
        raise ValueError("addresses is not a list of at most 64 addresses")
    try:
        addresses = tuple(ipaddress.ip_address(str(a)) for a in raw_addresses)
    except ValueError:
        raise ValueError("addresses holds something that is not an IP address") from None
    raw_cidrs = document.get("pod_cidrs", [])
    if not isinstance(raw_cidrs, list) or len(raw_cidrs) > MAX_ADDRESSES:
        raise ValueError("pod_cidrs is not a list of at most 64 prefixes")
    try:
        pod_cidrs = tuple(ipaddress.ip_network(str(n)) for n in raw_cidrs)
    except ValueError:
        raise ValueError("pod_cidrs holds something that is not a CIDR prefix") from None
    return AffiliateInfo(node_id, hostname, public_key, ula, addresses, pod_cidrs)


def _string(document: dict[str, Any], name: str, max_length: int) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise ValueError(f"{name} is not a string of 1 to {max_length} characters")
    return value


def encode_endpoint(endpoint: Endpoint) -> bytes:
    return endpoint.address.packed + endpoint.port.to_bytes(2, "big")


def decode_endpoint(raw: bytes) -> Endpoint:
    if len(raw) not in (6, 18):
        raise ValueError("endpoint is neither 6 nor 18 bytes")
    port = int.from_bytes(raw[-2:], "big")
    if port == 0:
        raise ValueError("endpoint port is 0")
    return Endpoint(ipaddress.ip_address(raw[:-2]), port)
