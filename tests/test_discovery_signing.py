"""Request signing, replay protection, rate limits, forwarded addresses: the pure pieces."""

from __future__ import annotations

import ipaddress
import os

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.forwarded import client_address
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.discovery.replay import ReplayGuard
from kubespan.discovery.signing import SignatureRejected, sign, verify

KEYS = ClusterKeys.derive("cluster", bytes(range(32)))
OTHER = ClusterKeys.derive("cluster", bytes(32))
NOW = 1_800_000_000


def signed(method: str = "PUT", target: str = "/v1/x", body: bytes = b"{}") -> dict[str, str]:
    return sign(KEYS.signing_key, method, target, body, NOW, os.urandom(16)).as_dict()


def check(headers: dict[str, str], **changes: object) -> tuple[int, str]:
    request: dict[str, object] = {
        "cluster": KEYS.cluster_address,
        "method": "PUT",
        "target": "/v1/x",
        "body": b"{}",
        "now": float(NOW),
    }
    request.update(changes)
    return verify(
        str(request["cluster"]),
        str(request["method"]),
        str(request["target"]),
        request["body"],  # type: ignore[arg-type]
        headers,
        float(request["now"]),  # type: ignore[arg-type]
        max_skew=120,
    )


def test_a_good_signature_verifies() -> None:
    headers = signed()
    assert check(headers) == (NOW, headers["x-kubespan-nonce"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"method": "DELETE"}, "x-kubespan-signature"),
        ({"target": "/v1/y"}, "x-kubespan-signature"),
        ({"target": "/v1/x?since=1"}, "x-kubespan-signature"),
        ({"body": b'{"ttl": 1}'}, "x-kubespan-signature"),
        ({"cluster": OTHER.cluster_address}, "x-kubespan-signature"),
        ({"now": NOW + 121.0}, "x-kubespan-timestamp"),
        ({"now": NOW - 121.0}, "x-kubespan-timestamp"),
        ({"cluster": "not-a-key"}, "cluster"),
    ],
)
def test_anything_changed_after_signing_is_refused(change: dict[str, object], field: str) -> None:
    with pytest.raises(SignatureRejected) as caught:
        check(signed(), **change)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-kubespan-timestamp", ""),
        ("x-kubespan-timestamp", "soon"),
        ("x-kubespan-nonce", "short"),
        ("x-kubespan-nonce", "!" * 22),
        ("x-kubespan-signature", "A" * 86),
        ("x-kubespan-signature", "%%%"),
    ],
)
def test_malformed_headers_are_refused(header: str, value: str) -> None:
    headers = signed()
    headers[header] = value
    with pytest.raises(SignatureRejected) as caught:
        check(headers)
    assert caught.value.field == header


def test_a_flipped_signature_bit_is_refused() -> None:
    headers = signed()
    signature = headers["x-kubespan-signature"]
    headers["x-kubespan-signature"] = ("B" if signature[0] == "A" else "A") + signature[1:]
    with pytest.raises(SignatureRejected):
        check(headers)


def test_replays_are_caught_within_the_window_and_forgotten_after() -> None:
    guard = ReplayGuard(window=120)
    assert guard.check_and_remember("c", "n1", NOW, NOW)
    assert not guard.check_and_remember("c", "n1", NOW, NOW + 10)
    assert guard.check_and_remember("other", "n1", NOW, NOW + 10)
    assert guard.check_and_remember("c", "n2", NOW, NOW + 10)
    assert guard.check_and_remember("c", "n3", NOW + 300, NOW + 300)
    assert len(guard) == 1  # the old ones expired: their timestamps are stale anyway


def test_rate_limit_token_bucket() -> None:
    limiter = RateLimiter(rate=10, burst=20)
    allowed = sum(limiter.allow("a", 0.0) for _ in range(30))
    assert allowed == 20
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)
    assert sum(limiter.allow("a", 1.0) for _ in range(30)) == 10
    assert limiter.retry_after("a") == pytest.approx(0.1)
    assert all(RateLimiter(0, 0).allow("a", 0.0) for _ in range(1000))


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("198.51.100.1", "203.0.113.9", "198.51.100.1"),  # untrusted peer: header ignored
        ("10.0.0.5", "203.0.113.9", "203.0.113.9"),
        ("10.0.0.5", "203.0.113.9, 10.0.0.7", "203.0.113.9"),  # two proxies
        ("10.0.0.5", "192.0.2.66, 203.0.113.9", "203.0.113.9"),  # a spoofed first hop
        ("10.0.0.5", "not-an-ip", "10.0.0.5"),
        ("10.0.0.5", None, "10.0.0.5"),
    ],
)
def test_forwarded_for_only_from_trusted_proxies(
    peer: str, header: str | None, expected: str
) -> None:
    assert client_address(peer, header, TRUSTED) == expected
