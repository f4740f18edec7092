"""The discovery service as a process: it learns nothing but blobs (its memory is searched for
a test cluster's names, addresses and keys), serves TLS, and keeps members across restarts."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import open_listing
from kubespan.discovery.view import ClusterView
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint

from nodes import member_info, seal
from served import ServedProcess, free_port, served, signed_headers, tls_pair


def node(index: int) -> AffiliateInfo:
    return member_info(
        f"hostname-secret-{index:04d}",
        # 198.51.100.150-169: addresses that appear nowhere in the service's own code.
        (ipaddress.ip_address(f"198.51.100.{150 + index}"),),
        ula=f"fd42:4242:4242:4202::{index + 1:x}",
    )


def process_memory(pid: int) -> bytes:
    """Every readable, writable mapping of a process (heap, stacks, anonymous memory)."""
    chunks = []
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with Path(f"/proc/{pid}/mem").open("rb", buffering=0) as memory:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                memory.seek(start)
                chunks.append(memory.read(end - start))
            except (OSError, OverflowError, ValueError):
                continue
    return b"".join(chunks)


@pytest.mark.skipif(os.geteuid() != 0, reason="reading another process's memory needs root")
def test_the_service_holds_no_plaintext_anywhere(tmp_path: Path) -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    nodes = [node(i) for i in range(20)]
    state = tmp_path / "state"
    with served(tmp_path, "--state-dir", str(state), "--rate-limit", "0") as service:
        client = DiscoveryClient(service.url, keys)
        for item in nodes:
            endpoints = tuple(Endpoint(a, 51820) for a in item.addresses)
            sealed = seal(keys, item, endpoints)
            client.put(sealed.affiliate_id, sealed.data, list(sealed.endpoints), 600)
        members, _ = open_listing(keys, client.listing())
        assert len(members) == 20
        memory = process_memory(service.pid)
        assert len(memory) > 1_000_000
        # The blobs themselves are there: the search does look where the data lives.
        assert sealed.data in memory
    snapshot = b"".join(p.read_bytes() for p in state.iterdir())
    log = service.log.read_bytes()
    for item in nodes:
        needles = [
            item.hostname.encode(),
            item.node_id.encode(),
            item.public_key.encode(),
            base64.b64decode(item.public_key),
            str(item.ula).encode(),
            str(item.addresses[0]).encode(),
        ]
        for needle in needles:
            for where, haystack in (("memory", memory), ("snapshot", snapshot), ("log", log)):
                assert needle not in haystack, f"{needle!r} found in the service's {where}"
    for secret in (keys.data_key, keys.endpoint_key, keys.signing_seed, keys.wireguard_psk):
        assert secret not in memory


def test_tls_and_restart_keeps_members(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path, "tls")
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--tls-cert", str(cert), "--tls-key", str(key))
    with served(tmp_path, *args) as service:
        assert service.url.startswith("https://")
        client = DiscoveryClient(service.url, keys, verify=str(cert))
        item = node(1)
        sealed = seal(keys, item, ())
        client.put(sealed.affiliate_id, sealed.data, [], 600)
    with served(tmp_path, *args) as service:
        client = DiscoveryClient(service.url, keys, verify=str(cert))
        members, _ = open_listing(keys, client.listing())
        assert [m.info.hostname for m in members] == [item.hostname]
        remaining = client.listing().affiliates[0].ttl
        assert 500 < remaining <= 600
    assert re.search(r"restored snapshot .* affiliates=1", service.log.read_text())


def test_bad_command_line_is_refused_clearly(tmp_path: Path) -> None:
    from served import KUBESPAN

    cert, _ = tls_pair(tmp_path, "one")
    _, other_key = tls_pair(tmp_path, "two")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    cases: list[tuple[list[str], str, int]] = [
        (["--listen", "nowhere"], "expected ADDRESS:PORT", 2),
        (["--listen", "127.0.0.1:99999"], "port from 0 to 65535", 2),
        (["--listen", "127.0.0.1:\u00b2"], "expected ADDRESS:PORT", 2),
        (["--listen", "localhost:3000"], "is not an IP address", 2),
        (["--listen", "::1:3000"], "in brackets", 2),
        (["--listen", "0.0.0.0:0"], "--public-url", 2),
        (["--trusted-proxy", "10.0.0.0/99"], "--trusted-proxy", 2),
        (["--tls-cert", str(tmp_path / "x")], "go together", 2),
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], "cannot be used together", 2),
        (["--tls-cert", str(tmp_path / "x"), "--tls-key", str(other_key)], "no such file", 2),
        (["--public-url", "ftp://x"], "--public-url", 2),
        (["--metrics-listen", "1.2.3.4"], "--metrics-listen", 2),
        (["--rate-limit", "nan"], "not a plain decimal", 2),
        (["--max-connections", "1e9"], "not a plain decimal", 2),
        (["--state-dir", str(a_file)], "not a directory", 1),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["--state-dir", str(locked / "sub")], "cannot create", 1))
    for flags, message, code in cases:
        argv = flags if "--listen" in flags else ["--listen", "127.0.0.1:0", *flags]
        result = subprocess.run(
            [str(KUBESPAN), "discovery", "serve", *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == code, (argv, result.stderr)
        assert message in result.stderr, (argv, result.stderr)
        assert "Traceback" not in result.stderr
        assert "listening" not in result.stderr
        # One line says what is wrong (argparse's own errors follow its usage text).
        assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_an_unwritable_state_directory_is_refused_at_start(tmp_path: Path) -> None:
    from served import KUBESPAN

    state = tmp_path / "state"
    state.mkdir()
    # A directory in the way of the snapshot's name makes every write fail, even for root.
    (state / "discovery-state.json").mkdir()
    result = subprocess.run(
        [str(KUBESPAN), "discovery", "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "--state-dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening" not in result.stderr


def signed_request(url: str, keys: ClusterKeys, method: str, target: str, body: bytes = b"") -> Any:
    """A signed request, prepared but not sent (so it can be sent again: a replay)."""
    import requests

    headers = signed_headers(keys, method, target, url, body)
    return requests.Request(method, url + target, data=body or None, headers=headers).prepare()


def send(prepared: Any, url: str | None = None) -> Any:
    import requests

    if url is not None:
        prepared = prepared.copy()
        prepared.url = url + prepared.path_url
    with requests.Session() as session:
        return session.send(prepared, timeout=30)


def test_sigterm_answers_long_polls_writes_the_snapshot_and_exits_0(tmp_path: Path) -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    state = tmp_path / "state"
    with served(tmp_path, "--state-dir", str(state), "--rate-limit", "0") as service:
        client = DiscoveryClient(service.url, keys)
        sealed = seal(keys, node(1), ())
        client.put(sealed.affiliate_id, sealed.data, [], 600)
        revision = client.listing().revision
        answers: list[int] = []

        def poll() -> None:
            answers.append(DiscoveryClient(service.url, keys).listing(revision, 55).revision)

        watchers = [threading.Thread(target=poll) for _ in range(20)]
        for watcher in watchers:
            watcher.start()
        deadline = time.monotonic() + 20
        while "kubespan_discovery_watchers 20" not in metrics_text(service):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        assert service.stop() == 0
        assert time.monotonic() - started < 10
        for watcher in watchers:
            watcher.join(timeout=10)
        assert answers == [revision] * 20
    log = service.log.read_text()
    assert "Traceback" not in log and "Exception" not in log
    stopped = [line for line in log.splitlines() if "stopped" in line]
    assert len(stopped) == 1
    assert "long_polls_answered=20 snapshot=written" in stopped[0]
    assert json.loads((state / "discovery-state.json").read_text())["clean"] is True


def metrics_text(service: ServedProcess) -> str:
    import requests

    return requests.get(f"{service.metrics_url}/metrics", timeout=5).text


@pytest.mark.parametrize("how", ["clean", "kill"])
def test_a_captured_request_is_refused_after_a_restart(tmp_path: Path, how: str) -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--rate-limit", "0")
    sealed_old = seal(keys, node(1), ())
    sealed_new = seal(keys, node(1), ())
    target = f"/v1/clusters/{keys.cluster_address}/affiliates/{sealed_old.affiliate_id}"
    listen = f"127.0.0.1:{free_port()}"
    with served(tmp_path, *args, listen=listen) as service:
        old = json.dumps({"data": base64.b64encode(sealed_old.data).decode(), "ttl": 600})
        captured = signed_request(service.url, keys, "PUT", target, old.encode())
        assert send(captured).status_code == 200
        DiscoveryClient(service.url, keys).put(sealed_new.affiliate_id, sealed_new.data, [], 600)
        assert send(captured).status_code == 401  # a replay while running
        if how == "kill":
            service.stop(signal.SIGKILL)
    with served(tmp_path, *args, listen=listen) as service:
        replay = send(captured)
        assert replay.status_code == 401
        field = "x-kubespan-nonce" if how == "clean" else "x-kubespan-timestamp"
        assert replay.json()["error"]["field"] == field
        # Not rolled back (after a kill the member may be lost with the last seconds, as the
        # snapshot interval allows, but never replaced by the captured registration).
        members = DiscoveryClient(service.url, keys).listing().affiliates
        assert sealed_old.data not in [m.data for m in members]
        if how == "clean":
            assert [m.data for m in members] == [sealed_new.data]


def test_a_request_for_one_service_is_refused_by_another(tmp_path: Path) -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with served(tmp_path / "a") as first, served(tmp_path / "b") as second:
        target = f"/v1/clusters/{keys.cluster_address}/affiliates/x"
        body = json.dumps({"data": "eA==", "ttl": 60}).encode()
        captured = signed_request(first.url, keys, "PUT", target, body)
        assert send(captured).status_code == 200
        replay = send(captured, second.url)
        assert replay.status_code == 401
        assert replay.json()["error"]["field"] == "x-kubespan-signature"
        assert DiscoveryClient(second.url, keys).listing().affiliates == ()


def test_a_watcher_never_misses_a_change_across_a_crash(tmp_path: Path) -> None:
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    state = tmp_path / "state"
    listen = f"127.0.0.1:{free_port()}"
    args = ("--state-dir", str(state), "--rate-limit", "0", "--snapshot-interval", "3600")
    with served(tmp_path, *args, listen=listen) as service:
        client = DiscoveryClient(service.url, keys)
        client.put("first", b"1", [], 600)
        view = ClusterView()
        view.apply(client.listing())
        client.put("second", b"2", [], 600)  # after the last snapshot: lost in the crash
        view.apply(client.listing(since=view.revision))
        seen = view.revision
        assert seen is not None
        service.stop(signal.SIGKILL)
    with served(tmp_path, *args, listen=listen) as service:
        client = DiscoveryClient(service.url, keys)
        client.put("third", b"3", [], 600)
        listing = client.listing(since=seen, wait=5)
        assert listing.revision > seen
        view.apply(listing)
        assert "third" in view.affiliates
        assert "second" not in view.affiliates  # the service lost it: the view says so
    assert "unclean start" in service.log.read_text()


def test_snapshots_survive_stale_temp_files_and_bad_snapshots_are_set_aside(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # What a crashed writer leaves: the old PID-named file (PID 1 in a container) and ours.
    (state / ".discovery-state.json.tmp-1").write_bytes(b"{")
    (state / ".discovery-state.json.abcd1234.tmp").write_bytes(b"{")
    (state / "discovery-state.json").write_bytes(b'{"format": 2, "clusters": ' + b"[" * 100_000)
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    with served(tmp_path, "--state-dir", str(state)) as service:
        DiscoveryClient(service.url, keys).put("a", b"x", [], 600)
    with served(tmp_path, "--state-dir", str(state)) as service:
        assert [a.id for a in DiscoveryClient(service.url, keys).listing().affiliates] == ["a"]
    log = service.log.read_text()
    assert "SNAPSHOT IS CORRUPT" in log and "nested deeper" in log
    assert "Traceback" not in log
    assert len(list(state.glob("discovery-state.json.corrupt-*"))) == 1


def test_dual_stack_listener_unmaps_and_metrics_stay_off_the_api(tmp_path: Path) -> None:
    import requests

    port = free_port()
    with served(
        tmp_path, "--public-url", f"http://127.0.0.1:{port}", listen=f"[::]:{port}"
    ) as service:
        url = f"http://127.0.0.1:{port}"
        keys = ClusterKeys.derive("cluster", os.urandom(32))
        assert str(DiscoveryClient(url, keys).hello()) == "127.0.0.1"
        for path in ("/metrics", "/healthz", "/readyz"):
            assert requests.get(url + path, timeout=5).status_code == 404
        assert requests.get(f"{service.metrics_url}/metrics", timeout=5).status_code == 200
