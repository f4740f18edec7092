"""The deployment kit, each piece exercised: the systemd unit's hardening (offline analysis;
the unit itself runs in qemu-tests/test_discovery_service.py), the nginx example in front of
the real service, and backup and restore of the state directory."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.discovery import snapshot
from kubespan.discovery.client import DiscoveryClient

from served import free_port, served, tls_pair

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "discovery"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    text = (DEPLOY / "kubespan-discovery.service").read_text()
    for setting in (
        "DynamicUser=yes",
        "StateDirectory=kubespan-discovery",
        "ProtectSystem=strict",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "Type=notify",
    ):
        assert setting in text
    # The descriptor limit leaves the default connection limit its room.
    nofile = int(re.search(r"LimitNOFILE=(\d+)", text).group(1))  # type: ignore[union-attr]
    assert nofile > 4096 + 64 + 32
    # Offline analysis wants the binary to exist: point it at one that does.
    unit = tmp_path / "kubespan-discovery.service"
    unit.write_text(text.replace("/usr/bin/kubespan", "/bin/true"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-2000:]
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert level and float(level.group(1)) <= 2.0, security.stdout[-500:]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (nginx-light)")
def test_behind_the_example_nginx_config(tmp_path: Path) -> None:
    cert, key = tls_pair(tmp_path, "proxy")
    proxy_port, service_port = free_port(), free_port()
    site = (DEPLOY / "nginx-discovery.conf").read_text()
    site = site.replace("server 127.0.0.1:3000;", f"server 127.0.0.1:{service_port};")
    site = site.replace("    listen [::]:443 ssl;\n", "")
    site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{proxy_port} ssl;")
    site = site.replace("/etc/ssl/discovery.example.net/fullchain.pem", str(cert))
    site = site.replace("/etc/ssl/discovery.example.net/privkey.pem", str(key))
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"""
daemon off;
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {tmp_path}/site.conf;
}}
"""
    )
    public = f"https://127.0.0.1:{proxy_port}"
    with served(
        tmp_path,
        "--trusted-proxy",
        "127.0.0.1/32",
        "--public-url",
        public,
        listen=f"127.0.0.1:{service_port}",
    ):
        nginx = subprocess.Popen(
            ["nginx", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", proxy_port), 1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and nginx.poll() is None
                    time.sleep(0.05)
            keys = ClusterKeys.derive("proxied", os.urandom(32))
            client = DiscoveryClient(public, keys, verify=str(cert), source_address="127.0.0.7")
            # The address nginx saw, passed on and believed: not the proxy's own.
            assert str(client.hello()) == "127.0.0.7"
            revision = client.put("a", b"sealed", [], 600)
            listing = client.listing(since=revision, wait=1)
            assert [a.id for a in listing.affiliates] == [] and listing.revision == revision
            assert [a.id for a in client.listing().affiliates] == ["a"]
            # Signed for the service's own address instead of the public URL: refused.
            direct = DiscoveryClient(f"http://127.0.0.1:{service_port}", keys)
            with pytest.raises(Exception, match="signature"):
                direct.hello()
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


def test_backup_while_running_and_restore(tmp_path: Path) -> None:
    state, backup, restored = tmp_path / "state", tmp_path / "backup", tmp_path / "restored"
    keys = ClusterKeys.derive("backed-up", os.urandom(32))
    args = ("--rate-limit", "0", "--snapshot-interval", "0.2")
    with served(tmp_path, "--state-dir", str(state), *args) as service:
        client = DiscoveryClient(service.url, keys)
        client.put("a", b"sealed-a", [], 3600)
        client.put("b", b"sealed-b", [], 3600)
        deadline = time.monotonic() + 10
        while b"sealed" not in (state / snapshot.SNAPSHOT_FILE).read_bytes().replace(
            b"c2VhbGVk", b"sealed"
        ):
            assert time.monotonic() < deadline, "no snapshot with the members"
            time.sleep(0.1)
        backup.mkdir()
        for name in (snapshot.SNAPSHOT_FILE, snapshot.EPOCH_FILE):
            shutil.copy2(state / name, backup / name)  # while running: the documented way
    shutil.copytree(backup, restored)
    with served(tmp_path, "--state-dir", str(restored), *args) as service:
        listing = DiscoveryClient(service.url, keys).listing()
        assert sorted(a.id for a in listing.affiliates) == ["a", "b"]
        assert all(3000 < a.ttl <= 3600 for a in listing.affiliates)
    assert "unclean start" in service.log.read_text()
