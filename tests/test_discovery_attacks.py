"""The service attacked on loopback as a stranger would, with nothing but its address (and,
for minting, cluster keys, which are free): after each attack it still answers /healthz and
signed updates, and what the attacker could hold is bounded."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import pytest
import requests

from kubespan.crypto import ClusterKeys
from kubespan.discovery import limits
from kubespan.discovery.client import DiscoveryClient
from kubespan.errors import DiscoveryError, DiscoveryRejected

from served import ServedProcess, served, signed_headers


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) * 1024


def healthy(service: ServedProcess) -> bool:
    return requests.get(f"{service.metrics_url}/healthz", timeout=5).status_code == 200


def metric(service: ServedProcess, name: str) -> float:
    text = requests.get(f"{service.metrics_url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def signed_updates(service: ServedProcess, count: int) -> None:
    """`count` signed registrations, each answered 200."""
    client = DiscoveryClient(service.url, ClusterKeys.derive("victim", os.urandom(32)))
    for index in range(count):
        client.put(f"member{index}", os.urandom(1024), [os.urandom(58)], 600)


@contextmanager
def slow_connections(
    service: ServedProcess, count: int, distinct_sources: bool
) -> Iterator[list[socket.socket]]:
    """`count` connections that each sent half a request head, from `count` loopback
    addresses (127.1.x.y) or all from 127.0.0.1."""
    host, port = service.url.removeprefix("http://").rsplit(":", 1)
    with ExitStack() as stack:
        sockets = []
        for index in range(count):
            sock = stack.enter_context(socket.socket())
            if distinct_sources:
                sock.bind((f"127.1.{index // 250}.{index % 250 + 1}", 0))
            sock.setblocking(False)
            with suppress(BlockingIOError):  # connecting in the background
                sock.connect((host, int(port)))
            sockets.append(sock)
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(5)
            with suppress(OSError):  # refused (per-source limit): that is the point
                sock.sendall(b"GET /v1/clusters/x/hello HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        yield sockets


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


def test_a_thousand_slow_heads_neither_stop_it_nor_stay(tmp_path: Path) -> None:
    with served(tmp_path, "--rate-limit", "0") as service:
        with slow_connections(service, 1000, distinct_sources=True) as sockets:
            assert healthy(service)
            signed_updates(service, 50)
            open_now = metric(service, "kubespan_discovery_connections_waiting")
            assert open_now >= 900, "the slow connections did reach the service"
            # The head deadline closes every one of them (408), without any help.
            deadline = time.monotonic() + limits.HEAD_TIMEOUT_SECONDS + 15
            while not all(closed_by_server(s) for s in sockets):
                assert time.monotonic() < deadline, "slow connections were kept"
                time.sleep(0.5)
        assert metric(service, "kubespan_discovery_connections_refused_total") >= 1000
        assert healthy(service)


def test_one_source_cannot_take_more_than_its_share_of_connections(tmp_path: Path) -> None:
    flags = ("--rate-limit", "0", "--max-connections-per-source", "100")
    with served(tmp_path, *flags) as service, slow_connections(service, 300, False):
        deadline = time.monotonic() + 10
        while metric(service, "kubespan_discovery_connections_refused_total") < 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # Another source is served as if nothing happened.
        keys = ClusterKeys.derive("other", os.urandom(32))
        client = DiscoveryClient(service.url, keys, source_address="127.2.0.1")
        assert str(client.hello()) == "127.2.0.1"
        assert healthy(service)


def test_a_full_table_evicts_the_slowest_not_the_working(tmp_path: Path) -> None:
    with served(tmp_path, "--rate-limit", "0", "--max-connections", "200") as service:
        with slow_connections(service, 1000, distinct_sources=True):
            signed_updates(service, 50)
            assert healthy(service)
        assert metric(service, "kubespan_discovery_connections_refused_total") >= 800


def test_huge_heads_and_bodies_are_refused_early_and_cost_nothing(tmp_path: Path) -> None:
    with served(tmp_path, "--rate-limit", "0") as service:
        host, port = service.url.removeprefix("http://").rsplit(":", 1)
        before = rss(service.pid)
        for head in (
            b"GET /v1/clusters/x/hello HTTP/1.1\r\nX-Big: " + b"a" * (64 << 20),
            b"GET /v1/clusters/x/hello HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 1000,
            b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n",
        ):
            with socket.create_connection((host, int(port))) as sock:
                sent = 0
                try:
                    while sent < len(head):
                        sent += sock.send(head[sent : sent + (1 << 20)])
                except OSError:
                    pass  # the service stopped reading: refused
                answer = sock.recv(4096)
                assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        keys = ClusterKeys.derive("c", os.urandom(32))
        target = f"/v1/clusters/{keys.cluster_address}/affiliates/a"
        for body, status in (
            (b"x" * (10 << 20), 413),
            (b"[" * 30_000, 400),
            (b'{"ttl": ' + b"9" * 5000 + b"}", 400),
            (b'{"data": "eA==", "ttl": 1e400}', 400),
        ):
            headers = signed_headers(keys, "PUT", target, service.url, body)
            response = requests.put(service.url + target, data=body, headers=headers, timeout=30)
            assert response.status_code == status, response.text
            assert "field" in response.json()["error"]
        chunked = requests.put(
            service.url + target, data=iter([b"x" * 65536] * 200), timeout=30
        )  # chunked: no length announced; cut at the limit all the same
        assert chunked.status_code == 413
        assert rss(service.pid) - before < 16 << 20
        assert healthy(service)
        signed_updates(service, 5)
    assert "Traceback" not in service.log.read_text()


def test_forwarded_for_is_not_believed_without_trusted_proxy(tmp_path: Path) -> None:
    with served(tmp_path, "--rate-limit", "5", "--burst", "10") as service:
        keys = ClusterKeys.derive("c", os.urandom(32))
        target = f"/v1/clusters/{keys.cluster_address}/hello"
        codes = []
        for index in range(40):
            headers = signed_headers(keys, "GET", target, service.url)
            headers["x-forwarded-for"] = f"203.0.113.{index}"
            response = requests.get(service.url + target, headers=headers, timeout=10)
            codes.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["client_address"] == "127.0.0.1"
        assert codes.count(200) <= 12
        assert 429 in codes


def test_a_flood_from_one_ipv6_64_is_limited_as_one_source(tmp_path: Path) -> None:
    """Many addresses of one /64 (as reported by a trusted proxy, the way an IPv6 client
    reaches a service behind one) count as a single source."""
    with served(
        tmp_path, "--rate-limit", "5", "--burst", "10", "--trusted-proxy", "127.0.0.1/32"
    ) as service:
        keys = ClusterKeys.derive("c", os.urandom(32))
        target = f"/v1/clusters/{keys.cluster_address}/hello"

        def hello(source: str) -> int:
            headers = signed_headers(keys, "GET", target, service.url)
            headers["x-forwarded-for"] = source
            return requests.get(service.url + target, headers=headers, timeout=10).status_code

        network = ipaddress.IPv6Network("2001:db8:1:2::/64")
        started = time.monotonic()
        codes = [hello(str(network[index * 7919 + 1])) for index in range(200)]
        # One source's budget: the burst, and what refilled meanwhile (a loaded machine
        # takes longer); 200 sources would have had every request answered.
        budget = 10 + int(5 * (time.monotonic() - started)) + 1
        assert budget < 100
        assert codes.count(200) <= budget
        assert codes.count(429) >= 200 - budget
        assert hello("2001:db8:1:3::1") == 200  # the next /64 is someone else
        assert hello("::ffff:192.0.2.1") == 200
        assert healthy(service)


def test_minting_cluster_keys_stops_at_the_quotas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quota = 400
    with served(
        tmp_path,
        "--rate-limit",
        "0",
        "--max-affiliates",
        str(quota),
        "--new-clusters-per-hour",
        "10",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--state-dir",
        str(tmp_path / "state"),
    ) as service:
        before = rss(service.pid)
        # One source minting alone stops at its hourly allowance (429).
        solo = {"x-forwarded-for": "203.0.113.250"}
        solo_codes = []
        for index in range(15):
            keys = ClusterKeys.derive(f"solo-{index}", os.urandom(32))
            client = DiscoveryClient(service.url, keys, sleep=lambda _: None, headers=solo)
            try:
                client.put("a", b"x", [], 60)
                solo_codes.append(200)
            except DiscoveryRejected as error:
                solo_codes.append(error.status)
        assert solo_codes == [200] * 10 + [429] * 5
        # Many sources: the total stops at the quota (507, the service is full).
        maximal = os.urandom(limits.MAX_DATA_BYTES)
        endpoints = [os.urandom(limits.MAX_ENDPOINT_BYTES) for _ in range(64)]
        statuses: dict[int, int] = {}
        for index in range(quota + 40):
            keys = ClusterKeys.derive(f"minted-{index}", os.urandom(32))
            source = {"x-forwarded-for": f"198.18.{index // 10 // 250}.{index // 10 % 250}"}
            client = DiscoveryClient(service.url, keys, sleep=lambda _: None, headers=source)
            try:
                client.put("a", maximal, endpoints, 86400)
                statuses[200] = statuses.get(200, 0) + 1
            except DiscoveryError as error:  # 507 is not a 4xx: the client retries later
                status = getattr(error, "status", 507 if "HTTP 507" in str(error) else 0)
                statuses[status] = statuses.get(status, 0) + 1
            client.close()
        assert statuses == {200: quota - 10, 507: 50}
        grown = rss(service.pid) - before
        stored = metric(service, "kubespan_discovery_stored_bytes")
        assert healthy(service)
        signed_before = metric(service, "kubespan_discovery_requests_total")
        assert signed_before > 0
    with capsys.disabled():
        print(
            f"\nminting: {quota - 10} maximal affiliates stored={stored / 2**20:.1f} MiB "
            f"rss_growth={grown / 2**20:.1f} MiB "
            f"per_affiliate={grown / (quota - 10) / 1024:.1f} KiB"
        )
