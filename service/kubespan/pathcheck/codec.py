"""Path checks: small authenticated datagrams between the WireGuard ports of two members.

A node sends a *request* from its WireGuard port to every candidate endpoint of a peer at
once; the peer answers from its WireGuard port to wherever the request came from. A valid
answer from a candidate proves that UDP between the two WireGuard ports works along that
path (through both NATs, which the request and the answer open for each other), so the
candidate can be set without waiting for a WireGuard handshake to time out elsewhere.

Layout (86 bytes, answers exactly as long as requests, so a spoofed request reflects no
more than it costs):

    tag "KSpc" (4) | kind (1) | version (1) | zero (2) | sender's WireGuard public key (32)
    | transaction id (12) | observed endpoint (16 address, IPv4 mapped, + 2 port; zero in a
    request) | MAC (16)

The first byte is never a WireGuard message type (1-4), so the kernel drops these as garbage.
The MAC is keyed BLAKE2b under a key only the two members can compute: X25519 of one's
private and the other's public WireGuard key, hashed with both public keys under a key
derived from the cluster secret. A stranger cannot make either; a third member cannot
forge one pair's checks.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import nacl.exceptions
from nacl.bindings import crypto_scalarmult

from kubespan.netaddr import Endpoint, endpoint_bytes, endpoint_from_bytes

TAG = 0x4B537063  # "KSpc"
VERSION = 1
REQUEST, ANSWER = 1, 2
KEY_BYTES = 32
TRANSACTION_ID_BYTES = 12
MAC_BYTES = 16
_HEADER = struct.Struct("!IBBH32s12s16sH")
MESSAGE_BYTES = _HEADER.size + MAC_BYTES
_PERSON = b"kubespan-pathchk"


class PathCheckError(ValueError):
    """A datagram that is not a well-formed path check."""


@dataclass(frozen=True)
class PathMessage:
    kind: int
    sender: bytes  # a WireGuard public key
    transaction_id: bytes
    observed: Endpoint | None  # in an answer: where the request came from


def pair_key(
    own_private: bytes, peer_public: bytes, own_public: bytes, cluster_key: bytes
) -> bytes:
    """The key both members of a pair compute alike; ValueError for a key that gives no
    shared secret (a low-order point)."""
    if len(own_private) != KEY_BYTES or len(peer_public) != KEY_BYTES:
        raise ValueError("X25519 keys are 32 bytes")
    try:
        shared = crypto_scalarmult(own_private, peer_public)
    except (nacl.exceptions.RuntimeError, nacl.exceptions.CryptoError) as error:
        raise ValueError("this public key gives no shared secret") from error
    if not any(shared):
        raise ValueError("this public key gives no shared secret")
    low, high = sorted((own_public, peer_public))
    return hashlib.blake2b(
        shared + low + high, key=cluster_key, digest_size=32, person=_PERSON
    ).digest()


def _mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=key, digest_size=MAC_BYTES).digest()


def encode(
    kind: int, sender: bytes, transaction_id: bytes, key: bytes, observed: Endpoint | None = None
) -> bytes:
    if len(sender) != KEY_BYTES or len(transaction_id) != TRANSACTION_ID_BYTES:
        raise ValueError("a path check needs a 32-byte key and a 12-byte transaction id")
    packed, port = endpoint_bytes(observed)
    body = _HEADER.pack(TAG, kind, VERSION, 0, sender, transaction_id, packed, port)
    return body + _mac(key, body)


def request(sender: bytes, transaction_id: bytes, key: bytes) -> bytes:
    return encode(REQUEST, sender, transaction_id, key)


def answer(sender: bytes, transaction_id: bytes, key: bytes, observed: Endpoint) -> bytes:
    return encode(ANSWER, sender, transaction_id, key, observed)


def parse(payload: bytes) -> PathMessage:
    """The fields of a path check, unauthenticated: check `authentic` before believing any."""
    if len(payload) != MESSAGE_BYTES:
        raise PathCheckError(f"a path check is {MESSAGE_BYTES} bytes, not {len(payload)}")
    tag, kind, version, zero, sender, transaction_id, packed, port = _HEADER.unpack_from(payload)
    if tag != TAG or version != VERSION or zero != 0:
        raise PathCheckError("not a path check of this version")
    if kind == REQUEST:
        if any(packed) or port:
            raise PathCheckError("a request carries no observed endpoint")
        return PathMessage(kind, sender, transaction_id, None)
    if kind != ANSWER:
        raise PathCheckError(f"unknown path check kind {kind}")
    observed = endpoint_from_bytes(packed, port)
    if observed is None:
        raise PathCheckError("an answer without an observed endpoint")
    return PathMessage(kind, sender, transaction_id, observed)


def authentic(payload: bytes, key: bytes) -> bool:
    body, mac = payload[:-MAC_BYTES], payload[-MAC_BYTES:]
    return len(payload) == MESSAGE_BYTES and hmac.compare_digest(_mac(key, body), mac)
