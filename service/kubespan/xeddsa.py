"""XEdDSA (Signal's specification): Ed25519-compatible signatures made with an X25519 key.

A node signs its records with its WireGuard private key, so that only the holder of a
WireGuard key can speak for it: every member holds the cluster secret and could otherwise
seal records in another member's name. The signature verifies as a plain Ed25519 signature
under the Edwards form of the X25519 public key (the birational map u -> y = (u-1)/(u+1),
sign bit 0), so verification is libsodium's own.

Signing, per the specification (section 2.3, with q the group order and B the base point):

    E = kB;  A = E with its sign bit cleared;  a = -k mod q if E's sign bit was set, else k
    r = SHA-512(0xFE || 0xFF*31 || a || M || Z) mod q        Z: 64 random bytes
    R = rB;  h = SHA-512(R || A || M) mod q;  s = r + h*a mod q;  signature = R || s
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import nacl.exceptions
from nacl.bindings import (
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_negate,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_base_noclamp,
)
from nacl.signing import VerifyKey

FIELD_PRIME = 2**255 - 19
SIGNATURE_BYTES = 64
RANDOM_BYTES = 64
_HASH1_PREFIX = b"\xfe" + b"\xff" * 31


def _reduce(value: bytes) -> bytes:
    """A 32- or 64-byte little-endian integer reduced modulo the group order."""
    return bytes(crypto_core_ed25519_scalar_reduce(value.ljust(64, b"\0")))


@lru_cache(maxsize=8192)
def edwards_public_key(x25519_public: bytes) -> bytes:
    """The Ed25519 public key (sign bit 0) of an X25519 public key; ValueError for the one
    point without an image."""
    if len(x25519_public) != 32:
        raise ValueError("an X25519 public key is 32 bytes")
    u = int.from_bytes(x25519_public, "little")
    # Only the canonical encoding (top bit clear, u < p) counts: otherwise one private key
    # would stand behind several public keys, and so several node ids.
    if u >= FIELD_PRIME:
        raise ValueError("this X25519 public key is not canonical")
    if u + 1 == FIELD_PRIME:
        raise ValueError("this X25519 public key has no Edwards form")
    y = (u - 1) * pow(u + 1, FIELD_PRIME - 2, FIELD_PRIME) % FIELD_PRIME
    return y.to_bytes(32, "little")


def sign(x25519_private: bytes, message: bytes, random: bytes) -> bytes:
    """An XEdDSA signature of `message`; `random` must be 64 fresh random bytes."""
    if len(x25519_private) != 32 or len(random) != RANDOM_BYTES:
        raise ValueError("an X25519 private key is 32 bytes, the randomness 64")
    k = _reduce(x25519_private)
    point = bytearray(crypto_scalarmult_ed25519_base_noclamp(k))
    negative = point[31] & 0x80
    point[31] &= 0x7F
    public = bytes(point)
    a = bytes(crypto_core_ed25519_scalar_negate(k)) if negative else k
    r = _reduce(hashlib.sha512(_HASH1_PREFIX + a + message + random).digest())
    big_r = bytes(crypto_scalarmult_ed25519_base_noclamp(r))
    h = _reduce(hashlib.sha512(big_r + public + message).digest())
    s = bytes(crypto_core_ed25519_scalar_add(r, crypto_core_ed25519_scalar_mul(h, a)))
    return big_r + s


def verify(x25519_public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is the holder of `x25519_public`'s signature of `message`."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(edwards_public_key(x25519_public)).verify(message, signature)
    except (ValueError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return False
    return True
