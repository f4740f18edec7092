"""Members for tests: each with its own WireGuard key, so its records can be signed (a record
speaks only for the holder of its key, and its node id is derived from that key)."""

from __future__ import annotations

import base64
import ipaddress
import os
from typing import Any

from kubespan import xeddsa
from kubespan.crypto import ClusterKeys
from kubespan.discovery.members import Registration, seal_registration
from kubespan.discovery.payload import SIGNED_PREFIX, canonical
from kubespan.identity import Identity, generate_identity
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork

_PRIVATE: dict[str, bytes] = {}
_BY_NAME: dict[str, Identity] = {}


def member_info(
    hostname: str,
    addresses: tuple[IPAddress, ...] = (),
    ula: str = "fd00::1",
    pod_cidrs: tuple[IPNetwork, ...] = (),
) -> AffiliateInfo:
    """A member named `hostname`: the same name gives the same key (and node id) within a
    test run, as a node keeps its identity."""
    identity = _BY_NAME.setdefault(hostname, generate_identity(os.urandom))
    _PRIVATE[identity.public_key_b64] = identity.private_key
    return AffiliateInfo(
        identity.node_id,
        hostname,
        identity.public_key_b64,
        ipaddress.IPv6Address(ula),
        addresses,
        pod_cidrs,
    )


def private_key(info: AffiliateInfo) -> bytes:
    return _PRIVATE[info.public_key]


def seal(
    keys: ClusterKeys,
    info: AffiliateInfo,
    endpoints: tuple[Endpoint, ...] = (),
    version: int = 1,
) -> Registration:
    return seal_registration(keys, info, endpoints, private_key(info), version=version)


def resign(document: dict[str, Any], key: bytes) -> bytes:
    """A record's plaintext from `document` (its "sig" replaced) signed with `key`: for tests
    of what a member could sign that is still wrong."""
    unsigned = {k: v for k, v in document.items() if k != "sig"}
    signature = xeddsa.sign(key, SIGNED_PREFIX + canonical(unsigned), os.urandom(64))
    return canonical({**unsigned, "sig": base64.b64encode(signature).decode()})
