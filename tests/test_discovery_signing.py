"""Request signing, replay protection, rate limits, forwarded addresses: the pure pieces."""

from __future__ import annotations

import ipaddress
import os

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.forwarded import client_address, source_key, unmap
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.discovery.replay import ReplayGuard
from kubespan.discovery.signing import SignatureRejected, canonical_authority, sign, verify

KEYS = ClusterKeys.derive("cluster", bytes(range(32)))
OTHER = ClusterKeys.derive("cluster", bytes(32))
NOW = 1_800_000_000


SERVICE = "https://discovery.example.net"


def signed(method: str = "PUT", target: str = "/v1/x", body: bytes = b"{}") -> dict[str, str]:
    return sign(
        KEYS.signing_key, method, target, body, NOW, os.urandom(16), service_url=SERVICE
    ).as_dict()


def check(headers: dict[str, str], **changes: object) -> tuple[int, str]:
    request: dict[str, object] = {
        "cluster": KEYS.cluster_address,
        "method": "PUT",
        "target": "/v1/x",
        "body": b"{}",
        "now": float(NOW),
        "services": ("discovery.example.net:443",),
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
        services=request["services"],  # type: ignore[arg-type]
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
        ({"services": ("discovery.example.net:3000",)}, "x-kubespan-signature"),
        ({"services": ("other.example.net:443",)}, "x-kubespan-signature"),
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
        ("x-kubespan-timestamp", "\u00b2"),
        ("x-kubespan-timestamp", "\u0661\u0662"),
        ("x-kubespan-timestamp", "1800000000\n"),
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
        ("::ffff:10.0.0.5", "203.0.113.9", "203.0.113.9"),  # a mapped proxy still matches
        ("10.0.0.5", "::ffff:203.0.113.9", "203.0.113.9"),
        ("10.0.0.5", "203.0.113.9, ::ffff:10.0.0.7", "203.0.113.9"),
        ("10.0.0.5", ",".join(["203.0.113.9"] * 20), "10.0.0.5"),  # absurdly long chain
        ("10.0.0.5", "\u00b2", "10.0.0.5"),
    ],
)
def test_forwarded_for_only_from_trusted_proxies(
    peer: str, header: str | None, expected: str
) -> None:
    assert client_address(peer, header, TRUSTED) == expected


def test_forwarded_for_is_ignored_without_trusted_proxies() -> None:
    assert client_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://192.0.2.1:3000", "192.0.2.1:3000"),
        ("http://192.0.2.1", "192.0.2.1:80"),
        ("https://Discovery.Example.NET", "discovery.example.net:443"),
        ("https://discovery.example.net.:443/", "discovery.example.net:443"),
        ("https://discovery.example.net:8443/prefix", "discovery.example.net:8443"),
        ("http://[2001:DB8:0::1]:3000", "[2001:db8::1]:3000"),
        ("http://[fe80::1%25eth0]:3000", "[fe80::1]:3000"),
        ("HTTP://127.0.0.1:3000", "127.0.0.1:3000"),
    ],
)
def test_the_signed_authority_is_canonical(url: str, expected: str) -> None:
    assert canonical_authority(url) == expected


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "http://", "http://a:99999", "http://user:pw@host", "http://bad host", "x"],
)
def test_a_service_url_without_a_clear_authority_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        canonical_authority(url)


def test_a_request_for_one_service_does_not_verify_at_another() -> None:
    headers = sign(
        KEYS.signing_key, "PUT", "/v1/x", b"{}", NOW, os.urandom(16), service_url="http://a:1"
    ).as_dict()
    with pytest.raises(SignatureRejected):
        verify(KEYS.cluster_address, "PUT", "/v1/x", b"{}", headers, NOW, 120, ("b:1",))
    assert verify(KEYS.cluster_address, "PUT", "/v1/x", b"{}", headers, NOW, 120, ("b:1", "a:1"))


def test_addresses_are_unmapped_and_ipv6_counts_by_64() -> None:
    assert unmap("::ffff:127.0.0.1") == "127.0.0.1"
    assert unmap("2001:db8::1") == "2001:db8::1"
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::99")
    assert source_key("2001:db8:1:2::1") != source_key("2001:db8:1:3::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_nonces_survive_a_clean_restart_and_an_unclean_one_refuses_the_past() -> None:
    guard = ReplayGuard(window=120)
    assert guard.check_and_remember("c", "n1", NOW, NOW)
    saved = guard.export(NOW + 5)
    restored = ReplayGuard(window=120)
    restored.restore(saved, NOW + 10)
    assert not restored.check_and_remember("c", "n1", NOW, NOW + 10)
    after_crash = ReplayGuard(window=120, not_before=NOW + 10)
    assert after_crash.predates_start(NOW)
    assert after_crash.predates_start(NOW + 10)
    assert not after_crash.predates_start(NOW + 11)
