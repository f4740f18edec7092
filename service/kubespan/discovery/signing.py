"""Request signatures: every request names its cluster by the public half of the cluster's
signing key, and proves knowledge of the private half.

The signed string binds the service it is meant for, the method, the path with its query, a
timestamp, a random nonce and the SHA-256 of the body:

    kubespan-request-v2 \\n AUTHORITY \\n METHOD \\n TARGET \\n TIMESTAMP \\n NONCE
      \\n SHA256(BODY) hex

sent as headers `X-Kubespan-Timestamp` (Unix seconds), `X-Kubespan-Nonce` (16 random bytes,
base64url) and `X-Kubespan-Signature` (Ed25519, base64url). The server refuses a signature
that does not verify against the cluster named in the path (so a request signed for another
cluster fails), a timestamp further than the allowed skew from its clock (stale), and a nonce
it has already seen within that window (replayed).

AUTHORITY is the canonical `host:port` of the service URL the client was configured with
(`canonical_authority`): the scheme's default port written out (http 80, https 443), the host
in lower case without a trailing dot, an IPv6 address in brackets in its compressed form
without a zone. A request captured on its way to one service is therefore refused by every
other service (each knows its own names: `--public-url`, or its listen address).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import nacl.exceptions
from nacl.signing import SigningKey, VerifyKey

from kubespan.crypto import b64url

PREFIX = b"kubespan-request-v2"
HEADER_TIMESTAMP = "x-kubespan-timestamp"
HEADER_NONCE = "x-kubespan-nonce"
HEADER_SIGNATURE = "x-kubespan-signature"
NONCE_BYTES = 16
DEFAULT_PORTS = {"http": 80, "https": 443}
_TIMESTAMP = re.compile(r"[0-9]{1,12}", re.ASCII)
_NONCE = re.compile(r"[A-Za-z0-9_-]{22}", re.ASCII)
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{86}", re.ASCII)
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,62})?(\.[a-z0-9]([a-z0-9_-]{0,62})?)*", re.ASCII)


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


def authority(host: str, port: int) -> str:
    """Canonical `host:port`; ValueError when `host` is neither an IP address nor a DNS name."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        name = bare.lower().removesuffix(".")
        if len(name) > 253 or not _HOSTNAME.fullmatch(name):
            raise ValueError(f"{host!r} is not an IP address or a DNS name") from None
        return f"{name}:{port}"
    if address.version == 6:
        return f"[{address.compressed}]:{port}"
    return f"{address}:{port}"


@lru_cache(maxsize=64)
def canonical_authority(url: str) -> str:
    """The authority a client signs for when it talks to the service at `url`."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r} carries credentials")
    port = parts.port  # ValueError when not a number in range
    return authority(parts.hostname, port if port is not None else DEFAULT_PORTS[scheme])


def canonical(
    service: str, method: str, target: str, timestamp: int, nonce: str, body: bytes
) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return b"\n".join(
        [
            PREFIX,
            service.encode(),
            method.upper().encode(),
            target.encode(),
            str(timestamp).encode(),
            nonce.encode(),
            digest.encode(),
        ]
    )


def sign(
    key: SigningKey,
    method: str,
    target: str,
    body: bytes,
    timestamp: int,
    nonce: bytes,
    *,
    service_url: str,
) -> SignedHeaders:
    """Headers for a request to the service at `service_url` (its base URL)."""
    nonce_text = b64url(nonce)
    service = canonical_authority(service_url)
    message = canonical(service, method, target, timestamp, nonce_text, body)
    return SignedHeaders(timestamp, nonce_text, b64url(key.sign(message).signature))


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@lru_cache(maxsize=4096)
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
    services: tuple[str, ...],
) -> tuple[int, str]:
    """Check a request's signature (made for one of `services`, this service's canonical
    authorities) and freshness; its (timestamp, nonce) for replay checks."""
    key = cluster_verify_key(cluster)
    for name in (HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        if not headers.get(name):
            raise SignatureRejected(name, "is missing: requests must be signed")
    stamp = headers[HEADER_TIMESTAMP]
    if not _TIMESTAMP.fullmatch(stamp):
        raise SignatureRejected(HEADER_TIMESTAMP, "must be Unix seconds (ASCII digits)")
    timestamp = int(stamp)
    if abs(now - timestamp) > max_skew:
        raise SignatureRejected(
            HEADER_TIMESTAMP, f"is more than {max_skew:g}s away from the server's clock (stale)"
        )
    nonce = headers[HEADER_NONCE]
    if not _NONCE.fullmatch(nonce):
        raise SignatureRejected(HEADER_NONCE, f"must be {NONCE_BYTES} bytes, base64url")
    text = headers[HEADER_SIGNATURE]
    if not _SIGNATURE.fullmatch(text):
        raise SignatureRejected(HEADER_SIGNATURE, "must be 64 bytes, base64url")
    signature = _unb64url(text)
    for service in services:
        try:
            key.verify(canonical(service, method, target, timestamp, nonce, body), signature)
        except (ValueError, nacl.exceptions.BadSignatureError):
            continue
        return timestamp, nonce
    raise SignatureRejected(
        HEADER_SIGNATURE,
        f"does not verify for this cluster and request at this service ({', '.join(services)})",
    )
