"""A flood from many real IPv6 source addresses of one /64 (in a network namespace made by the
test, where the /64 is routed to loopback) meets one rate limit: limits count /64s."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from netlab import namespaces
from served import KUBESPAN, wait_listening

pytestmark = pytest.mark.netns

FLOOD = str(Path(__file__).resolve().parent / "netns_flood.py")


def test_many_addresses_of_one_64_are_one_source(tmp_path: Path) -> None:
    with namespaces("flood") as made:
        ns = made["flood"]
        for prefix in ("2001:db8:1:2::/64", "2001:db8:1:3::/64"):
            ns.ip("-6", "route", "add", "local", prefix, "dev", "lo")
        # Clients may bind any address of those prefixes (only inside this namespace).
        ns.sh("sysctl -qw net.ipv6.ip_nonlocal_bind=1")
        log = tmp_path / "service.log"
        with log.open("wb") as out:
            service = subprocess.Popen(
                [
                    "ip", "netns", "exec", ns.name, str(KUBESPAN), "discovery", "serve",
                    "--listen", "[::1]:3000", "--rate-limit", "5", "--burst", "10",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_listening(log, service)
            url = "http://[::1]:3000"
            flood = json.loads(ns.python(FLOOD, url, "2001:db8:1:2::/64", "60"))
            assert len(set(flood["addresses"]) - {""}) >= 10  # really many sources
            assert flood["codes"].count(200) <= 12
            assert flood["codes"].count(429) >= 48
            other = json.loads(ns.python(FLOOD, url, "2001:db8:1:3::/64", "3"))
            assert other["codes"] == [200, 200, 200]  # the next /64 is someone else
            assert other["addresses"][0].startswith("2001:db8:1:3:")
        finally:
            service.terminate()
            service.wait(timeout=20)
        assert "Traceback" not in log.read_text()
