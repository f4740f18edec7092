"""The real discovery service on loopback, driven by the real client and by raw HTTP."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery import snapshot
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import open_listing
from kubespan.discovery.payload import encode_endpoint
from kubespan.discovery.server import Settings
from kubespan.discovery.signing import sign
from kubespan.discovery.view import ClusterView
from kubespan.errors import DiscoveryError, DiscoveryRejected
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint

from nodes import member_info, seal
from served import signed_headers
from servers import discovery_server


def new_keys() -> ClusterKeys:
    return ClusterKeys.derive("cluster", os.urandom(32))


def info(name: str, address: str) -> AffiliateInfo:
    return member_info(name, (ipaddress.ip_address(address),))


def register(client: DiscoveryClient, node: AffiliateInfo) -> int:
    endpoints = tuple(Endpoint(a, 51820) for a in node.addresses)
    sealed = seal(client.keys, node, endpoints)
    return client.put(sealed.affiliate_id, sealed.data, list(sealed.endpoints), 60)


def raw(
    url: str,
    keys: ClusterKeys,
    method: str,
    target: str,
    body: bytes = b"",
    timestamp: float | None = None,
    nonce: bytes | None = None,
    cluster: str | None = None,
) -> requests.Response:
    """A request signed with `keys`, sent to `cluster` (default: the keys' own)."""
    target = target.replace("{cluster}", cluster or keys.cluster_address)
    stamp = int(time.time() if timestamp is None else timestamp)
    headers = sign(
        keys.signing_key, method, target, body, stamp, nonce or os.urandom(16), service_url=url
    )
    return requests.request(
        method, url + target, data=body or None, headers=headers.as_dict(), timeout=10
    )


def test_hello_returns_the_callers_address() -> None:
    with discovery_server() as server:
        client = DiscoveryClient(server.url, new_keys())
        assert client.hello() == ipaddress.ip_address("127.0.0.1")


def test_members_register_and_see_each_other() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        register(client, info("alpha", "192.0.2.1"))
        register(client, info("beta", "192.0.2.2"))
        listing = client.listing()
        assert listing.reset
        members, problems = open_listing(keys, listing)
        assert problems == []
        assert sorted(m.info.hostname for m in members) == ["alpha", "beta"]
        beta = next(m for m in members if m.info.hostname == "beta")
        assert [str(e) for e in beta.endpoints] == ["192.0.2.2:51820"]


def test_other_clusters_blobs_are_ignored_not_fatal() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        register(client, info("alpha", "192.0.2.1"))
        intruder = ClusterKeys.derive("cluster", os.urandom(32))
        node = info("mallory", "192.0.2.66")
        sealed = seal(intruder, node, ())
        client.put(sealed.affiliate_id, sealed.data, [], 60)
        members, problems = open_listing(keys, client.listing())
        assert [m.info.hostname for m in members] == ["alpha"]
        assert len(problems) == 1
        assert "failed authentication" in problems[0]


def test_a_blob_moved_to_another_affiliate_is_detected() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        node = info("alpha", "192.0.2.1")
        sealed = seal(keys, node, ())
        client.put("someone-else", sealed.data, list(sealed.endpoints), 60)
        members, problems = open_listing(keys, client.listing())
        assert members == ()
        assert "failed authentication" in problems[0]


def test_watch_wakes_on_change_and_resumes_with_exactly_what_changed() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        alpha = info("alpha", "192.0.2.1")
        register(client, alpha)
        view = ClusterView()
        view.apply(client.listing())
        assert len(view.affiliates) == 1
        woke: list[float] = []

        def watch() -> None:
            delta = DiscoveryClient(server.url, keys).listing(since=view.revision, wait=20)
            woke.append(time.monotonic())
            assert not delta.reset
            assert len(delta.affiliates) == 1
            view.apply(delta)

        watcher = threading.Thread(target=watch)
        watcher.start()
        deadline = time.monotonic() + 10
        while not server.app.watching(keys.cluster_address):
            assert time.monotonic() < deadline, "the watcher never reached the server"
            time.sleep(0.01)
        changed_at = time.monotonic()
        register(client, info("beta", "192.0.2.2"))
        watcher.join(timeout=10)
        assert woke and woke[0] - changed_at < 2.0
        assert len(view.affiliates) == 2

        # A disconnected watcher comes back: it gets the removal, and only that.
        client.delete(keys.affiliate_id(alpha.node_id))
        delta = client.listing(since=view.revision, wait=5)
        assert not delta.reset
        assert delta.removed == (keys.affiliate_id(alpha.node_id),)
        assert delta.affiliates == ()
        view.apply(delta)
        assert len(view.affiliates) == 1
        quiet = client.listing(since=view.revision, wait=0.3)
        assert quiet.revision == view.revision
        assert quiet.affiliates == () and quiet.removed == ()


def test_watch_resets_when_the_server_is_behind_the_caller() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        register(client, info("alpha", "192.0.2.1"))
        started = time.monotonic()
        listing = client.listing(since=99_999, wait=20)
        assert listing.reset
        assert len(listing.affiliates) == 1
        assert time.monotonic() - started < 5


def test_harvested_endpoints_are_added_to_another_affiliate() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        alpha = info("alpha", "192.0.2.1")
        register(client, alpha)
        target = keys.affiliate_id(alpha.node_id)
        seen_at = Endpoint(ipaddress.ip_address("203.0.113.40"), 40000)
        blob = keys.seal_endpoint(target, encode_endpoint(seen_at))
        client.add_endpoints(target, [blob, blob], 60)
        (member,), _ = open_listing(keys, client.listing())
        assert [str(e) for e in member.endpoints] == ["192.0.2.1:51820", "203.0.113.40:40000"]
        with pytest.raises(DiscoveryRejected) as caught:
            client.add_endpoints("nobody", [blob], 60)
        assert caught.value.status == 404


SIGNED_BAD = [
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b"not json", 400, "body"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b"[]", 400, "body"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"data": "!!", "ttl": 5}', 400, "data"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"data": "", "ttl": 5}', 400, "data"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"data": "eA==", "ttl": "5"}', 400, "ttl"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"data": "eA==", "ttl": 0}', 400, "ttl"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"data": "eA==", "ttl": 5, "x": 1}', 400, "x"),
    (
        "PUT",
        "/v1/clusters/{cluster}/affiliates/a",
        b'{"data": "eA==", "ttl": 5, "endpoints": 3}',
        400,
        "endpoints",
    ),
    (
        "PUT",
        "/v1/clusters/{cluster}/affiliates/a",
        json.dumps({"data": base64.b64encode(bytes(4097)).decode(), "ttl": 5}).encode(),
        413,
        "data",
    ),
    (
        "PUT",
        "/v1/clusters/{cluster}/affiliates/a",
        json.dumps({"data": "eA==", "ttl": 5, "endpoints": ["eA=="] * 65}).encode(),
        400,
        "endpoints",
    ),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b"x" * 70000, 413, "body"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b"[" * 30000, 400, "body"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b"[" * 50000, 413, "body"),
    ("PUT", "/v1/clusters/{cluster}/affiliates/a", b'{"ttl": ' + b"9" * 5000 + b"}", 400, "body"),
    ("GET", "/v1/clusters/{cluster}/affiliates?since=%C2%B2", b"", 400, "since"),
    ("GET", "/v1/clusters/{cluster}/affiliates?since=1&since=2", b"", 400, "since"),
    ("GET", "/v1/clusters/{cluster}/affiliates?wait=nan", b"", 400, "wait"),
    ("GET", "/v1/clusters/{cluster}/affiliates?wait=%EF%BC%91", b"", 400, "wait"),
    ("GET", "/v1/clusters/{cluster}/hello%0A", b"", 404, "path"),
    ("DELETE", "/v1/clusters/{cluster}/affiliates/a%0A", b"", 400, "affiliate"),
    (
        "PUT",
        "/v1/clusters/{cluster}/affiliates/bad.id",
        b'{"data": "eA==", "ttl": 5}',
        400,
        "affiliate",
    ),
    (
        "POST",
        "/v1/clusters/{cluster}/affiliates/a/endpoints",
        b'{"endpoints": [], "ttl": 5}',
        400,
        "endpoints",
    ),
    ("GET", "/v1/clusters/{cluster}/affiliates?since=-1", b"", 400, "since"),
    ("GET", "/v1/clusters/{cluster}/affiliates?since=1&wait=999", b"", 400, "wait"),
    ("GET", "/v1/clusters/{cluster}/affiliates?bogus=1", b"", 400, "bogus"),
    ("POST", "/v1/clusters/{cluster}/affiliates/a", b"{}", 405, "method"),
    ("GET", "/v1/clusters/{cluster}/nothing", b"", 404, "path"),
    ("GET", "/v1/clusters", b"", 404, "path"),
    ("GET", "/elsewhere", b"", 404, "path"),
]


@pytest.mark.parametrize(("method", "target", "body", "status", "field"), SIGNED_BAD)
def test_bad_requests_get_a_4xx_naming_the_field(
    method: str, target: str, body: bytes, status: int, field: str
) -> None:
    with discovery_server() as server:
        response = raw(server.url, new_keys(), method, target, body)
        assert response.status_code == status
        assert response.json()["error"]["field"] == field
        if status == 405:
            assert response.headers["allow"] == "PUT, DELETE"


def test_outsiders_can_neither_read_write_delete_nor_replay() -> None:
    keys, outsider = new_keys(), new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys)
        alpha = info("alpha", "192.0.2.1")
        register(client, alpha)
        victim = keys.affiliate_id(alpha.node_id)
        put = b'{"data": "eA==", "ttl": 5}'
        for method, target, body in (
            ("GET", "/v1/clusters/{cluster}/affiliates", b""),
            ("PUT", f"/v1/clusters/{{cluster}}/affiliates/{victim}", put),
            ("DELETE", f"/v1/clusters/{{cluster}}/affiliates/{victim}", b""),
            ("GET", "/v1/clusters/{cluster}/hello", b""),
        ):
            response = raw(server.url, outsider, method, target, body, cluster=keys.cluster_address)
            assert response.status_code == 401, (method, response.text)
            assert response.json()["error"]["field"] == "x-kubespan-signature"
        unsigned = requests.get(
            f"{server.url}/v1/clusters/{keys.cluster_address}/affiliates", timeout=10
        )
        assert unsigned.status_code == 401
        assert unsigned.json()["error"]["field"] == "x-kubespan-timestamp"

        # A captured request, sent again, is refused; so is one from the past.
        nonce = os.urandom(16)
        target = "/v1/clusters/{cluster}/affiliates/x"
        assert raw(server.url, keys, "DELETE", target, nonce=nonce).status_code == 200
        again = raw(server.url, keys, "DELETE", target, nonce=nonce)
        assert again.status_code == 401
        assert again.json()["error"]["field"] == "x-kubespan-nonce"
        stale = raw(server.url, keys, "DELETE", target, timestamp=time.time() - 600)
        assert stale.status_code == 401
        assert stale.json()["error"]["field"] == "x-kubespan-timestamp"
        members, _ = open_listing(keys, client.listing())
        assert [m.info.hostname for m in members] == ["alpha"]


def test_rate_limit_answers_429_naming_the_source() -> None:
    with discovery_server(settings=Settings(rate=5, burst=5)) as server:
        keys = new_keys()
        codes = [raw(server.url, keys, "GET", "/v1/clusters/{cluster}/hello") for _ in range(8)]
        assert [c.status_code for c in codes[:5]] == [200] * 5
        limited = codes[-1]
        assert limited.status_code == 429
        assert limited.json()["error"]["field"] == "source"
        assert int(limited.headers["retry-after"]) >= 1


def test_trusted_proxy_forwarded_address() -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    with discovery_server(settings=Settings(rate=0, trusted_proxies=trusted)) as server:
        keys = new_keys()
        target = f"/v1/clusters/{keys.cluster_address}/hello"
        headers = signed_headers(keys, "GET", target, server.url)
        response = requests.get(
            server.url + target,
            headers={**headers, "x-forwarded-for": "203.0.113.200"},
            timeout=10,
        )
        assert response.json() == {"client_address": "203.0.113.200", "stun": []}


def test_health_ready_metrics_and_openapi() -> None:
    keys = new_keys()
    with discovery_server() as server:
        register(DiscoveryClient(server.url, keys), info("alpha", "192.0.2.1"))
        ops = server.metrics_url
        assert requests.get(f"{ops}/healthz", timeout=5).json() == {"status": "ok"}
        assert requests.get(f"{ops}/readyz", timeout=5).json() == {"ready": True}
        metrics = requests.get(f"{ops}/metrics", timeout=5).text
        assert "kubespan_discovery_affiliates 1" in metrics
        assert 'kubespan_discovery_requests_total{method="PUT",route="put",code="200"} 1' in metrics
        document = requests.get(f"{server.url}/openapi.json", timeout=5).json()
        assert document["openapi"].startswith("3.1")
        assert "/v1/clusters/{cluster}/affiliates" in document["paths"]


def test_client_reports_rejections_and_unreachable_servers() -> None:
    keys = new_keys()
    with discovery_server() as server:
        client = DiscoveryClient(server.url, keys, sleep=lambda _: None)
        with pytest.raises(DiscoveryRejected) as caught:
            client.put("a", b"x", [], 0)
        assert caught.value.field == "ttl"
        url = server.url
    with pytest.raises(DiscoveryError):
        DiscoveryClient(url, keys, sleep=lambda _: None).hello()


def test_restart_keeps_members_and_server_learns_no_plaintext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = new_keys()
    node = info("very-secret-hostname", "203.0.113.77")
    with discovery_server(tmp_path) as server:
        register(DiscoveryClient(server.url, keys), node)
    state = (tmp_path / snapshot.SNAPSHOT_FILE).read_bytes()
    for secret in (node.hostname, "203.0.113.77", node.public_key, node.node_id):
        assert secret.encode() not in state
        assert secret.encode().hex().encode() not in state
        assert secret not in caplog.text
    with discovery_server(tmp_path) as server:
        members, _ = open_listing(keys, DiscoveryClient(server.url, keys).listing())
        assert [m.info.hostname for m in members] == [node.hostname]


def test_snapshots_are_taken_while_running_and_expiry_reaches_watchers(tmp_path: Path) -> None:
    keys = new_keys()
    settings = Settings(state_dir=tmp_path, rate=0, snapshot_interval=0.2, gc_interval=0.2)
    with discovery_server(tmp_path, settings) as server:
        client = DiscoveryClient(server.url, keys)
        node = info("short-lived", "192.0.2.5")
        sealed = seal(keys, node, ())
        client.put(sealed.affiliate_id, sealed.data, [], 1)
        view = ClusterView()
        view.apply(client.listing())
        assert len(view.affiliates) == 1
        deadline = time.monotonic() + 10
        while not (tmp_path / snapshot.SNAPSHOT_FILE).exists():
            assert time.monotonic() < deadline, "no snapshot while running"
            time.sleep(0.05)
        # Expired and collected: the watcher learns it (as a removal, or as a reset to an empty
        # cluster once the last member is gone).
        view.apply(client.listing(since=view.revision, wait=10))
        assert view.affiliates == {}


def request_bytes(url: str, keys: ClusterKeys, method: str, target: str) -> bytes:
    headers = signed_headers(keys, method, target, url)
    lines = [
        f"{method} {target} HTTP/1.1",
        "host: test",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_long_poll_whose_client_left_stops_waiting() -> None:
    keys = new_keys()
    with discovery_server() as server:
        revision = register(DiscoveryClient(server.url, keys), info("alpha", "192.0.2.1"))
        target = f"/v1/clusters/{keys.cluster_address}/affiliates?since={revision}&wait=50"
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request_bytes(server.url, keys, "GET", target))
            deadline = time.monotonic() + 10
            while not server.app.watching(keys.cluster_address):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while server.app.watching(keys.cluster_address):
            assert time.monotonic() < deadline, "the long poll outlived its connection"
            time.sleep(0.01)


def test_pipelined_requests_are_answered_in_order() -> None:
    keys = new_keys()
    with discovery_server() as server:
        port = int(server.url.rsplit(":", 1)[1])
        hello = f"/v1/clusters/{keys.cluster_address}/hello"
        both = request_bytes(server.url, keys, "GET", hello) + request_bytes(
            server.url, keys, "GET", "/nowhere"
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(both)
            data = b""
            while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        first, second = data.split(b"HTTP/1.1 ")[1:]
        assert first.startswith(b"200") and b"127.0.0.1" in first
        assert second.startswith(b"404")


def test_an_unexpected_error_is_one_json_500_one_log_line_and_counted(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = new_keys()
    with discovery_server() as server:

        def broken(*_args: object) -> int:
            raise KeyError("a bug")

        monkeypatch.setattr(server.app.registry, "delete", broken)
        with caplog.at_level(logging.ERROR):
            response = raw(server.url, keys, "DELETE", "/v1/clusters/{cluster}/affiliates/a")
        assert response.status_code == 500
        assert response.json() == {"error": {"field": "server", "message": "internal error"}}
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0].getMessage()
        assert "KeyError" in errors[0].getMessage() and errors[0].exc_info is None
        metrics = requests.get(f"{server.metrics_url}/metrics", timeout=5).text
        assert "kubespan_discovery_internal_errors_total 1" in metrics
        # The service goes on: the next request on a new connection is answered.
        assert DiscoveryClient(server.url, keys).hello() is not None
