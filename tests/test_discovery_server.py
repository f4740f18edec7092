"""The real discovery service on loopback, driven by the real client and by raw HTTP."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery import snapshot
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import open_listing, seal_registration
from kubespan.errors import DiscoveryError, DiscoveryRejected
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint

from servers import discovery_server


def info(name: str, address: str) -> AffiliateInfo:
    return AffiliateInfo(
        node_id=f"id{name}",
        hostname=name,
        public_key=base64.b64encode(os.urandom(32)).decode(),
        ula=ipaddress.IPv6Address("fd00::1"),
        addresses=(ipaddress.ip_address(address),),
    )


def register(client: DiscoveryClient, keys: ClusterKeys, node: AffiliateInfo) -> int:
    endpoints = tuple(Endpoint(a, 51820) for a in node.addresses)
    sealed = seal_registration(keys, node, endpoints, os.urandom(24))
    return client.put(
        keys.cluster_address, sealed.affiliate_id, sealed.data, list(sealed.endpoints), 60
    )


def test_hello_returns_the_callers_address() -> None:
    with discovery_server() as server:
        assert DiscoveryClient(server.url).hello() == ipaddress.ip_address("127.0.0.1")


def test_members_register_and_see_each_other() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with discovery_server() as server:
        client = DiscoveryClient(server.url)
        register(client, keys, info("alpha", "192.0.2.1"))
        register(client, keys, info("beta", "192.0.2.2"))
        members, problems = open_listing(keys, client.listing(keys.cluster_address))
        assert problems == []
        assert sorted(m.info.hostname for m in members) == ["alpha", "beta"]
        beta = next(m for m in members if m.info.hostname == "beta")
        assert [str(e) for e in beta.endpoints] == ["192.0.2.2:51820"]


def test_other_clusters_blobs_are_ignored_not_fatal() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    intruder = ClusterKeys.derive("cluster", os.urandom(32))
    with discovery_server() as server:
        client = DiscoveryClient(server.url)
        register(client, keys, info("alpha", "192.0.2.1"))
        node = info("mallory", "192.0.2.66")
        sealed = seal_registration(intruder, node, (), os.urandom(24))
        client.put(keys.cluster_address, sealed.affiliate_id, sealed.data, [], 60)
        members, problems = open_listing(keys, client.listing(keys.cluster_address))
        assert [m.info.hostname for m in members] == ["alpha"]
        assert len(problems) == 1
        assert "failed authentication" in problems[0]


def test_watch_wakes_on_change_and_resumes_by_revision() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with discovery_server() as server:
        client = DiscoveryClient(server.url)
        first = client.listing(keys.cluster_address)
        assert first.revision == 0
        woke: list[float] = []

        def watch() -> None:
            listing = DiscoveryClient(server.url).listing(
                keys.cluster_address, since=first.revision, wait=20
            )
            woke.append(time.monotonic())
            assert len(listing.affiliates) == 1

        watcher = threading.Thread(target=watch)
        watcher.start()
        deadline = time.monotonic() + 10
        while not server.app.watching(keys.cluster_address):
            assert time.monotonic() < deadline, "the watcher never reached the server"
            time.sleep(0.01)
        changed_at = time.monotonic()
        revision = register(client, keys, info("alpha", "192.0.2.1"))
        watcher.join(timeout=10)
        assert woke and woke[0] - changed_at < 2.0
        quiet = client.listing(keys.cluster_address, since=revision, wait=0.3)
        assert quiet.revision == revision


def test_watch_returns_at_once_when_the_server_is_behind_the_caller() -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with discovery_server() as server:
        started = time.monotonic()
        listing = DiscoveryClient(server.url).listing(keys.cluster_address, since=99, wait=20)
        assert listing.revision == 0
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("PUT", "/v1/clusters/c/affiliates/a", "not json", 400, "body"),
        ("PUT", "/v1/clusters/c/affiliates/a", "[]", 400, "body"),
        ("PUT", "/v1/clusters/c/affiliates/a", '{"data": "!!", "ttl": 5}', 400, "data"),
        ("PUT", "/v1/clusters/c/affiliates/a", '{"data": "", "ttl": 5}', 400, "data"),
        ("PUT", "/v1/clusters/c/affiliates/a", '{"data": "eA==", "ttl": "5"}', 400, "ttl"),
        ("PUT", "/v1/clusters/c/affiliates/a", '{"data": "eA==", "ttl": 0}', 400, "ttl"),
        ("PUT", "/v1/clusters/c/affiliates/a", '{"data": "eA==", "ttl": 5, "x": 1}', 400, "x"),
        (
            "PUT",
            "/v1/clusters/c/affiliates/a",
            '{"data": "eA==", "ttl": 5, "endpoints": 3}',
            400,
            "endpoints",
        ),
        (
            "PUT",
            "/v1/clusters/c/affiliates/a",
            json.dumps({"data": base64.b64encode(bytes(3000)).decode(), "ttl": 5}),
            413,
            "data",
        ),
        (
            "PUT",
            "/v1/clusters/c/affiliates/a",
            json.dumps({"data": "eA==", "ttl": 5, "endpoints": ["eA=="] * 65}),
            400,
            "endpoints",
        ),
        ("PUT", "/v1/clusters/c/affiliates/a", "x" * 70000, 413, "body"),
        ("PUT", "/v1/clusters/c/affiliates/bad.id", '{"data": "eA==", "ttl": 5}', 400, "affiliate"),
        ("PUT", "/v1/clusters/" + "c" * 300 + "/affiliates/a", "{}", 400, "cluster"),
        ("GET", "/v1/clusters/c/affiliates?since=-1", None, 400, "since"),
        ("GET", "/v1/clusters/c/affiliates?since=1&wait=999", None, 400, "wait"),
        ("GET", "/v1/clusters/c/affiliates?bogus=1", None, 400, "bogus"),
        ("POST", "/v1/clusters/c/affiliates/a", "{}", 405, "method"),
        ("GET", "/v1/nothing", None, 404, "path"),
        ("GET", "/elsewhere", None, 404, "path"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(
    method: str, path: str, body: str | None, status: int, field: str
) -> None:
    with discovery_server() as server:
        response = requests.request(method, server.url + path, data=body, timeout=10)
        assert response.status_code == status
        assert response.json()["error"]["field"] == field


def test_client_reports_rejections_and_unreachable_servers() -> None:
    with discovery_server() as server:
        with pytest.raises(DiscoveryRejected) as caught:
            DiscoveryClient(server.url).put("c", "a", b"x", [], 0)
        assert caught.value.field == "ttl"
        url = server.url
    with pytest.raises(DiscoveryError):
        DiscoveryClient(url).hello()


def test_restart_keeps_members_and_server_learns_no_plaintext(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    node = info("very-secret-hostname", "203.0.113.77")
    with discovery_server(tmp_path) as server:
        register(DiscoveryClient(server.url), keys, node)
    state = (tmp_path / snapshot.SNAPSHOT_FILE).read_bytes()
    for secret in (node.hostname, "203.0.113.77", node.public_key, node.node_id):
        assert secret.encode() not in state
        assert secret.encode().hex().encode() not in state
        assert secret not in caplog.text
    with discovery_server(tmp_path) as server:
        members, _ = open_listing(keys, DiscoveryClient(server.url).listing(keys.cluster_address))
        assert [m.info.hostname for m in members] == [node.hostname]
