"""A node's identity: node id and WireGuard keypair (persisted), and its ULA overlay address.

The private key is generated once and kept in `identity.json` under the state directory
(mode 0600, written atomically). The node id is derived from the WireGuard public key (a hash
of it, in base62), so that a record naming a node id can be checked against the key that
signed it (discovery/payload.py): no member can speak for another node id. An identity file
whose node id was random (written before) is rewritten with the derived one.

The ULA address is recomputed at every start from the cluster id and the MAC of the first
physical interface, as the reference system does, so operators recognise the addresses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from nacl.public import PrivateKey

from kubespan.errors import StateFileError
from kubespan.fsutil import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
ULA_PURPOSE_KUBESPAN = 0x02
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True)
class Identity:
    node_id: str
    private_key: bytes = field(repr=False)
    stored_node_id: str = field(default="", compare=False)  # as the file had it

    @cached_property  # asked at every pass: a scalar multiplication each time otherwise
    def public_key(self) -> bytes:
        return bytes(PrivateKey(self.private_key).public_key)

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    @property
    def private_key_b64(self) -> str:
        return base64.b64encode(self.private_key).decode()


def base62(raw: bytes) -> str:
    number = int.from_bytes(raw, "big")
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits)) or "0"


def clamp_private_key(raw: bytes) -> bytes:
    """Clamp an X25519 scalar as the kernel stores it, so desired and observed keys compare."""
    key = bytearray(raw)
    key[0] &= 248
    key[31] &= 127
    key[31] |= 64
    return bytes(key)


def node_id_for(public_key: bytes) -> str:
    """The node id that belongs to a WireGuard public key."""
    return base62(hashlib.sha256(b"kubespan node id\0" + public_key).digest())


def identity_from_key(private_key: bytes) -> Identity:
    key = clamp_private_key(private_key)
    return Identity(node_id_for(bytes(PrivateKey(key).public_key)), key)


def generate_identity(random_bytes: RandomBytes) -> Identity:
    return identity_from_key(random_bytes(32))


def _write_identity(path: Path, identity: Identity) -> None:
    document = {"version": 1, "node_id": identity.node_id, "private_key": identity.private_key_b64}
    atomic_write(path, json.dumps(document, indent=2).encode() + b"\n", mode=0o600)


def load_or_create_identity(state_dir: Path, random_bytes: RandomBytes = os.urandom) -> Identity:
    """Load the persisted identity, or create and persist a new one on first start."""
    path = state_dir / IDENTITY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        ensure_private_dir(state_dir)
        identity = generate_identity(random_bytes)
        _write_identity(path, identity)
        log.info("created node identity node_id=%s file=%s", identity.node_id, path)
        return identity
    except OSError as error:
        raise StateFileError(f"{path}: cannot read identity: {error.strerror}") from None
    _tighten_mode(path)
    identity = parse_identity(raw, str(path))
    if identity.stored_node_id != identity.node_id:
        log.info(
            "node id is now derived from the WireGuard key; rewriting file=%s node_id=%s",
            path,
            identity.node_id,
        )
        try:
            _write_identity(path, identity)
        except OSError as error:
            log.warning("cannot rewrite the identity file=%s error=%s", path, error.strerror)
    return identity


def parse_identity(raw: bytes, file: str) -> Identity:
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateFileError(
            f"{file}: corrupt identity file ({error}); it holds this node's WireGuard key, "
            "so it is not replaced automatically: restore it or remove it to make a new identity"
        ) from None
    if not isinstance(document, dict) or document.get("version") != 1:
        raise StateFileError(f"{file}: not a kubespan identity file (version 1 expected)")
    node_id = document.get("node_id")
    if not isinstance(node_id, str) or not node_id or not node_id.isalnum():
        raise StateFileError(f"{file}: field node_id: must be a non-empty base62 string")
    key_text = document.get("private_key")
    try:
        key = base64.b64decode(str(key_text), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise StateFileError(f"{file}: field private_key: must be base64 of 32 bytes")
    identity = identity_from_key(key)
    return replace(identity, stored_node_id=node_id)


def _tighten_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("identity file was readable by others; fixing mode file=%s", path)
        path.chmod(0o600)


def ula_prefix(cluster_id: str) -> ipaddress.IPv6Network:
    """The cluster's kubespan /64: last 16 bytes of SHA-256(cluster id), fd.. and purpose 0x02."""
    data = bytearray(hashlib.sha256(cluster_id.encode()).digest()[-16:])
    data[0] = 0xFD
    data[7] = ULA_PURPOSE_KUBESPAN
    return ipaddress.IPv6Network((bytes(data), 64), strict=False)


def eui64_interface_id(mac: bytes) -> bytes:
    """Modified EUI-64 from a 48-bit MAC: insert ff:fe, flip the universal/local bit."""
    if len(mac) != 6:
        raise ValueError(f"MAC must be 6 bytes, not {len(mac)}")
    out = bytearray(mac[:3] + b"\xff\xfe" + mac[3:])
    out[0] ^= 0x02
    return bytes(out)


def node_ula(cluster_id: str, mac: bytes) -> ipaddress.IPv6Address:
    prefix = ula_prefix(cluster_id).network_address.packed[:8]
    return ipaddress.IPv6Address(prefix + eui64_interface_id(mac))


def parse_mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


@dataclass(frozen=True)
class LinkHardware:
    name: str
    mac: str
    physical: bool


def first_physical_mac(links: tuple[LinkHardware, ...]) -> bytes | None:
    """The MAC of the first physical interface by name, the one the ULA host part comes from."""
    for link in sorted(links, key=lambda link: link.name):
        if link.physical and link.mac and parse_mac(link.mac) != bytes(6):
            return parse_mac(link.mac)
    return None


def fallback_mac(node_id: str) -> bytes:
    """A stable locally administered MAC derived from the node id, for nodes with no NIC MAC."""
    digest = bytearray(hashlib.sha256(node_id.encode()).digest()[:6])
    digest[0] = (digest[0] | 0x02) & 0xFE
    return bytes(digest)
