"""The discovery service as a process: it learns nothing but blobs (its memory is searched for
a test cluster's names, addresses and keys), serves TLS, and keeps members across restarts."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import subprocess
from pathlib import Path

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import open_listing, seal_registration
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint

from served import served


def node(index: int) -> AffiliateInfo:
    return AffiliateInfo(
        node_id=f"NodeIdSecret{index:04d}xyz",
        hostname=f"hostname-secret-{index:04d}",
        public_key=base64.b64encode(os.urandom(32)).decode(),
        ula=ipaddress.IPv6Address(f"fd42:4242:4242:4202::{index + 1:x}"),
        # 198.51.100.150-169: addresses that appear nowhere in the service's own code.
        addresses=(ipaddress.ip_address(f"198.51.100.{150 + index}"),),
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
            sealed = seal_registration(keys, item, endpoints, os.urandom(24))
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
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    keys = ClusterKeys.derive("cluster", os.urandom(32))
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--tls-cert", str(cert), "--tls-key", str(key))
    with served(tmp_path, *args) as service:
        assert service.url.startswith("https://")
        client = DiscoveryClient(service.url, keys, verify=str(cert))
        item = node(1)
        sealed = seal_registration(keys, item, (), os.urandom(24))
        client.put(sealed.affiliate_id, sealed.data, [], 600)
    with served(tmp_path, *args) as service:
        client = DiscoveryClient(service.url, keys, verify=str(cert))
        members, _ = open_listing(keys, client.listing())
        assert [m.info.hostname for m in members] == [item.hostname]
        remaining = client.listing().affiliates[0].ttl
        assert 500 < remaining <= 600
    assert re.search(r"restored snapshot .* affiliates=1", service.log.read_text())


def tls_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


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
    for argv, message, code in cases:
        if "--listen" not in argv:
            argv = ["--listen", "127.0.0.1:0", *argv]
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
