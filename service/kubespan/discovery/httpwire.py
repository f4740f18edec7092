"""What the HTTP transport and its handler exchange: requests, answers, limits, counters."""

from __future__ import annotations

import http
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kubespan.discovery import limits

JSON = b"application/json"


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # the request target exactly as sent (origin form, ASCII)
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    peer: str | None  # the socket's peer address, IPv4-mapped addresses unmapped


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def error_body(field_name: str, message: str) -> bytes:
    document = {"error": {"field": field_name, "message": message}}
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = limits.MAX_CONNECTIONS
    max_per_source: int = limits.MAX_CONNECTIONS_PER_SOURCE
    max_head_bytes: int = limits.MAX_HEAD_BYTES
    max_headers: int = limits.MAX_HEADERS
    max_body_bytes: int = limits.MAX_BODY_BYTES
    max_pipelined: int = limits.MAX_PIPELINED
    head_timeout: float = limits.HEAD_TIMEOUT_SECONDS
    body_timeout: float = limits.BODY_TIMEOUT_SECONDS
    idle_timeout: float = limits.IDLE_TIMEOUT_SECONDS
    write_timeout: float = limits.WRITE_TIMEOUT_SECONDS
    tls_timeout: float = limits.TLS_HANDSHAKE_TIMEOUT_SECONDS


@dataclass
class TransportCounters:
    """What the transport refused or cut short, for metrics."""

    refused: Counter[str] = field(default_factory=Counter)  # reason -> connections
    errors: int = 0  # handler exceptions answered with 500


class Refusal(Exception):
    """Answer `status` with an error naming `field`, then close the connection."""

    def __init__(self, status: int, field_name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field_name
        self.message = message


_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


def encode_response(response: Response, close: bool) -> bytes:
    reason = _REASONS.get(response.status, b"Unknown")
    head = [
        b"HTTP/1.1 %d %s" % (response.status, reason),
        b"content-type: " + response.content_type,
        b"content-length: %d" % len(response.body),
    ]
    head += [name + b": " + value for name, value in response.headers]
    if close:
        head.append(b"connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + response.body
