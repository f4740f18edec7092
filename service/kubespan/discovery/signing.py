"""Request signatures: every request names its cluster by the public half of the cluster's
signing key, and proves knowledge of the private half.

The signed string binds the method, the path with its query, a timestamp, a random nonce and
the SHA-256 of the body:

    kubespan-request-v1 \\n METHOD \\n TARGET \\n TIMESTAMP \\n NONCE \\n SHA256(BODY) hex

sent as headers `X-Kubespan-Timestamp` (Unix seconds), `X-Kubespan-Nonce` (16 random bytes,
base64url) and `X-Kubespan-Signature` (Ed25519, base64url). The server refuses a signature
that does not verify against the cluster named in the path (so a request signed for another
cluster fails), a timestamp further than the allowed skew from its clock (stale), and a nonce
it has already seen within that window (replayed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import nacl.exceptions
from nacl.signing import SigningKey, VerifyKey

from kubespan.crypto import b64url

PREFIX = b"kubespan-request-v1"
HEADER_TIMESTAMP = "x-kubespan-timestamp"
HEADER_NONCE = "x-kubespan-nonce"
HEADER_SIGNATURE = "x-kubespan-signature"
NONCE_BYTES = 16


class SignatureRejected(Exception):
    """A request whose signature headers are missing, malformed, stale, replayed or wrong;
    `field` names the header at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class SignedHeaders:
    timestamp: int
    nonce: str
    signature: str

    def as_dict(self) -> dict[str, str]:
        return {
            HEADER_TIMESTAMP: str(self.timestamp),
            HEADER_NONCE: self.nonce,
            HEADER_SIGNATURE: self.signature,
        }


def canonical(method: str, target: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return b"\n".join(
        [
            PREFIX,
            method.upper().encode(),
            target.encode(),
            str(timestamp).encode(),
            nonce.encode(),
            digest.encode(),
        ]
    )


def sign(
    key: SigningKey, method: str, target: str, body: bytes, timestamp: int, nonce: bytes
) -> SignedHeaders:
    nonce_text = b64url(nonce)
    message = canonical(method, target, timestamp, nonce_text, body)
    return SignedHeaders(timestamp, nonce_text, b64url(key.sign(message).signature))


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cluster_verify_key(cluster: str) -> VerifyKey:
    """The key a cluster is addressed by; SignatureRejected when it is not one."""
    try:
        raw = _unb64url(cluster)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or b64url(raw) != cluster:
        raise SignatureRejected("cluster", "is not a base64url Ed25519 public key")
    return VerifyKey(raw)


def verify(
    cluster: str,
    method: str,
    target: str,
    body: bytes,
    headers: dict[str, str],
    now: float,
    max_skew: float,
) -> tuple[int, str]:
    """Check a request's signature and freshness; its (timestamp, nonce) for replay checks."""
    key = cluster_verify_key(cluster)
    for name in (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        if not headers.get(name):
            raise SignatureRejected(name, "is missing: requests must be signed")
    stamp = headers[HEADER_TIMESTAMP]
    if not stamp.isdigit() or len(stamp) > 12:
        raise SignatureRejected(HEADER_TIMESTAMP, "must be Unix seconds")
    timestamp = int(stamp)
    if abs(now - timestamp) > max_skew:
        raise SignatureRejected(
            HEADER_TIMESTAMP, f"is more than {max_skew:g}s away from the server's clock (stale)"
        )
    nonce = headers[HEADER_NONCE]
    try:
        nonce_ok = len(_unb64url(nonce)) == NONCE_BYTES
    except (binascii.Error, ValueError):
        nonce_ok = False
    if not nonce_ok:
        raise SignatureRejected(HEADER_NONCE, f"must be {NONCE_BYTES} bytes, base64url")
    try:
        signature = _unb64url(headers[HEADER_SIGNATURE])
        key.verify(canonical(method, target, timestamp, nonce, body), signature)
    except (binascii.Error, ValueError, nacl.exceptions.BadSignatureError):
        raise SignatureRejected(
            HEADER_SIGNATURE, "does not verify for this cluster and request"
        ) from None
    return timestamp, nonce
