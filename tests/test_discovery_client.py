"""The discovery client against a service that answers slowly, strangely or with tricks: every
exchange ends by its deadline, nothing is followed, kept or decoded that should not be, and
every failure is a DiscoveryError (never anything else)."""

from __future__ import annotations

import os

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient, parse_retry_after
from kubespan.errors import DiscoveryError, DiscoveryRejected

from hostile import Answer, Hostile, hostile_service

KEYS = ClusterKeys.derive("cluster", os.urandom(32))


def answering(hostile: Hostile, answer: Answer) -> None:
    """Answer every listing with `answer` (puts, hellos still go the honest way)."""
    hostile.serve(lambda _h: answer)


def client(hostile: Hostile) -> DiscoveryClient:
    return DiscoveryClient(hostile.url, KEYS, sleep=lambda _seconds: None)


def test_a_trickled_answer_ends_at_the_deadline() -> None:
    with hostile_service() as hostile:
        answering(hostile, Answer(body=b'{"revision": 1, "affiliates": []}', trickle=0.5))
        with pytest.raises(DiscoveryError, match="no complete answer within 1s"):
            client(hostile)._request("GET", "/v1/clusters/x/affiliates", deadline=1.0)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Answer(302, b"", {"location": "http://[::1"}), "redirect"),
        (Answer(301, b"", {"location": "http://198.51.100.1/steal"}), "redirect"),
        (Answer(200, b"\x1f\x8b\x08", {"content-encoding": "gzip"}), "encoded body"),
        (Answer(200, b"[]"), "HTTP 200"),
        (Answer(503, b"<html>"), "HTTP 503"),
    ],
)
def test_strange_answers_are_discovery_errors(answer: Answer, message: str) -> None:
    with hostile_service() as hostile:
        answering(hostile, answer)
        with pytest.raises(DiscoveryError, match=message):
            client(hostile).listing()


def test_no_cookie_is_kept() -> None:
    with hostile_service() as hostile:
        answering(
            hostile,
            Answer(body=b'{"revision": 1, "affiliates": []}', headers={"set-cookie": "a=b"}),
        )
        discovery = client(hostile)
        for _ in range(5):
            discovery.listing()
        assert all("cookie" not in headers for headers in hostile.request_headers)


def test_a_refusal_carries_a_believable_retry_after_only() -> None:
    with hostile_service() as hostile:
        answering(hostile, Answer(429, b'{"error": {"field": "source"}}', {"retry-after": "7"}))
        with pytest.raises(DiscoveryRejected) as caught:
            client(hostile).listing()
        assert caught.value.status == 429 and caught.value.retry_after == 7.0
    assert parse_retry_after("99999999") == 0.0  # more than 6 digits: not believed
    assert parse_retry_after("999999") == 60.0  # capped
    assert parse_retry_after("\u00b2") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT") == 0.0
