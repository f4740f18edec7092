"""Keys derived from the cluster secret, and the sealing of everything sent to discovery.

Every key comes from HKDF-SHA256 over the cluster secret (salted with the cluster id) with its
own context string, so no key serves two purposes:

- data:       XChaCha20-Poly1305 key for affiliate data (random nonce)
- endpoint:   XChaCha20-Poly1305 key for endpoints, with a synthetic nonce (keyed BLAKE2b of
              the plaintext and associated data) so equal endpoints seal to equal blobs and the
              server can de-duplicate them without reading them
- endpoint-siv: the key of that synthetic nonce
- signing:    Ed25519 seed; its public half is the cluster's only name on the server
- affiliate-id: HMAC key turning a node id into the opaque affiliate id the server sees
- wireguard-psk: the preshared key of every WireGuard peer
- path-check: mixed into the pairwise keys of path checks (pathcheck/codec.py)

The cluster address and affiliate id are bound into every blob as associated data, so the
server cannot move a blob to another member or cluster without detection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from functools import cached_property

import nacl.exceptions
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.signing import SigningKey

from kubespan.errors import CryptoError

BLOB_VERSION = 1
NONCE_BYTES = 24
TAG_BYTES = 16
# A sealed blob is its version byte, the nonce, the ciphertext and the tag.
SEALED_OVERHEAD = 1 + NONCE_BYTES + TAG_BYTES
_SALT_PREFIX = b"kubespan/v1 cluster "


def hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True)
class ClusterKeys:
    """All keys of one cluster. Build with `ClusterKeys.derive`."""

    data_key: bytes = field(repr=False)
    endpoint_key: bytes = field(repr=False)
    endpoint_siv_key: bytes = field(repr=False)
    signing_seed: bytes = field(repr=False)
    affiliate_id_key: bytes = field(repr=False)
    wireguard_psk: bytes = field(repr=False)
    path_check_key: bytes = field(repr=False)
    relay_bind_key: bytes = field(repr=False)

    @classmethod
    def derive(cls, cluster_id: str, secret: bytes) -> ClusterKeys:
        salt = _SALT_PREFIX + cluster_id.encode()

        def key(context: str) -> bytes:
            return hkdf_sha256(secret, salt, b"kubespan/v1 " + context.encode())

        return cls(
            data_key=key("data"),
            endpoint_key=key("endpoint"),
            endpoint_siv_key=key("endpoint-siv"),
            signing_seed=key("signing"),
            affiliate_id_key=key("affiliate-id"),
            wireguard_psk=key("wireguard-psk"),
            path_check_key=key("path-check"),
            relay_bind_key=key("relay-bind"),
        )

    @cached_property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.signing_seed)

    @cached_property
    def cluster_address(self) -> str:
        """The cluster's name on the discovery server: the public half of the signing key."""
        return b64url(bytes(self.signing_key.verify_key))

    def affiliate_id(self, node_id: str) -> str:
        digest = hmac.new(self.affiliate_id_key, node_id.encode(), hashlib.sha256).digest()
        return b64url(digest[:24])

    @property
    def wireguard_psk_b64(self) -> str:
        return base64.b64encode(self.wireguard_psk).decode()

    def _associated(self, kind: bytes, affiliate_id: str) -> bytes:
        return (
            b"kubespan/v1 "
            + kind
            + b"\0"
            + self.cluster_address.encode()
            + b"\0"
            + (affiliate_id.encode())
        )

    def seal_data(self, affiliate_id: str, plaintext: bytes, nonce: bytes) -> bytes:
        """Seal affiliate data; `nonce` must be 24 fresh random bytes."""
        if len(nonce) != NONCE_BYTES:
            raise ValueError("nonce must be 24 bytes")
        associated = self._associated(b"data", affiliate_id)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, associated, nonce, self.data_key
        )
        return bytes([BLOB_VERSION]) + nonce + sealed

    def open_data(self, affiliate_id: str, blob: bytes) -> bytes:
        return self._open(blob, self._associated(b"data", affiliate_id), self.data_key)

    def seal_endpoint(self, affiliate_id: str, plaintext: bytes) -> bytes:
        """Seal deterministically: the same endpoint for the same affiliate gives the same blob."""
        associated = self._associated(b"endpoint", affiliate_id)
        nonce = self._synthetic_nonce(associated, plaintext)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, associated, nonce, self.endpoint_key
        )
        return bytes([BLOB_VERSION]) + nonce + sealed

    def open_endpoint(self, affiliate_id: str, blob: bytes) -> bytes:
        associated = self._associated(b"endpoint", affiliate_id)
        plaintext = self._open(blob, associated, self.endpoint_key)
        if not hmac.compare_digest(
            blob[1 : 1 + NONCE_BYTES], self._synthetic_nonce(associated, plaintext)
        ):
            raise CryptoError("endpoint blob has a wrong synthetic nonce")
        return plaintext

    def _synthetic_nonce(self, associated: bytes, plaintext: bytes) -> bytes:
        mac = hashlib.blake2b(key=self.endpoint_siv_key, digest_size=NONCE_BYTES)
        mac.update(len(associated).to_bytes(4, "big") + associated + plaintext)
        return mac.digest()

    @staticmethod
    def _open(blob: bytes, associated: bytes, key: bytes) -> bytes:
        if len(blob) < SEALED_OVERHEAD or blob[0] != BLOB_VERSION:
            raise CryptoError("blob is too short or of an unknown version")
        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            plaintext: bytes = crypto_aead_xchacha20poly1305_ietf_decrypt(
                blob[1 + NONCE_BYTES :], associated, nonce, key
            )
        except nacl.exceptions.CryptoError:
            raise CryptoError("blob failed authentication") from None
        return plaintext
