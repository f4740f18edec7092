"""`kubespan check` on the real host kernel, in network namespaces made by the test
(dataplanelab's node, with kubespan's own table, rules and routes applied by kubespan's code):
quiet about what is kubespan's, and each crafted conflict found, named and explained."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dataplanelab import SPEC, wired
from kubespan.agent.statusserver import LatestStatus, StatusServer

from netlab import Netns

pytestmark = pytest.mark.netns

PEER_V4 = "198.51.100.9:51820"  # behind a route with MTU 1400
PEER_V6 = "[2001:db8:77::9]:51820"  # behind a route with MTU 1480
PEER_WIDE = "203.0.113.50:51820"  # the underlay's own MTU, 1500: the tunnel fits
SERVICE = "https://discovery.example"

MEDDLER = """
table ip meddler {
  chain out {
    type route hook output priority 10; policy accept;
    meta mark set meta mark & 0xffffff9f
  }
}
"""


def status(clock_skew: float) -> bytes:
    """What a live agent serves, as far as `kubespan check` reads it."""
    peers = [{"name": f"p{i}", "endpoint": e} for i, e in enumerate((PEER_V4, PEER_V6, PEER_WIDE))]
    discovery = [{"url": SERVICE, "revision": 3, "public_address": "203.0.113.77",
                  "last_error": None, "last_answer": 1.0, "clock_skew_s": clock_skew}]  # fmt: skip
    document = {"version": 1, "node": {"name": "node"}, "ready": True, "peers": peers,
                "discovery": discovery}  # fmt: skip
    return json.dumps(document).encode()


@contextmanager
def agent(runtime_dir: Path, document: bytes) -> Iterator[None]:
    latest = LatestStatus()
    latest.set(document)
    server = StatusServer(runtime_dir, latest)
    server.start()
    try:
        yield
    finally:
        server.stop()


def check(node: Netns, runtime_dir: Path, *flags: str) -> tuple[int, str]:
    """`kubespan check` run in the node's namespace: its exit status and output."""
    argv = ["ip", "netns", "exec", node.name, sys.executable, "-m", "kubespan.cli", "check"]
    result = subprocess.run(
        [*argv, "--runtime-dir", str(runtime_dir), *flags],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, result.stdout


def findings(node: Netns, runtime_dir: Path) -> tuple[int, list[dict[str, Any]]]:
    code, out = check(node, runtime_dir, "--json")
    return code, json.loads(out)


def codes(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in found]


def only(found: list[dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [f for f in found if f["code"] == code]


# What the lab itself brings: its stand-in for WireGuard is a veth (the host kernel has no
# WireGuard), and its observer table counts packets by kubespan's mark bits.
LAB = [
    ("link-not-wireguard", "error"),
    ("nft-compares-mark-bits", "warning"),
]


@pytest.fixture
def node() -> Iterator[Netns]:
    with wired() as (node, _tunnel, _pod):
        node.dataplane("apply", SPEC)  # kubespan's own table, rules, routes and rp_filter
        node.ip("link", "set", "kubespan", "mtu", "1420")
        node.ip("route", "add", "198.51.100.0/24", "via", "192.0.2.1", "mtu", "1400")
        node.ip("-6", "route", "add", "2001:db8:77::/48", "via", "2001:db8::1", "mtu", "1480")
        yield node


def test_what_is_kubespans_is_no_conflict(node: Netns, tmp_path: Path) -> None:
    """Only a path with room for the tunnel: nothing but what the lab itself brings."""
    node.ip("route", "replace", "198.51.100.0/24", "via", "192.0.2.1", "mtu", "1480")
    node.ip("-6", "route", "replace", "2001:db8:77::/48", "via", "2001:db8::1", "mtu", "1500")
    with agent(tmp_path, status(clock_skew=2.0)):
        code, found = findings(node, tmp_path)
    assert codes(found) == [*LAB, ("discovery-sees-address", "info")]
    (observer,) = only(found, "nft-compares-mark-bits")
    assert "table inet observer, chain postrouting" in observer["what"]
    assert code == 1  # the stand-in link is an error of its own


def test_each_conflict_is_found_and_explained(node: Netns, tmp_path: Path) -> None:
    node.ip("rule", "add", "priority", "32500", "lookup", "100")
    node.ip("rule", "add", "priority", "1000", "fwmark", "0x40/0x40", "lookup", "main")
    node.ip("rule", "add", "priority", "200", "from", "10.0.0.0/8", "lookup", "180")
    node.ip("route", "add", "10.99.0.0/16", "via", "192.0.2.1", "table", "180")
    node.sh("sysctl -qw net.ipv4.conf.kubespan.rp_filter=1")
    node.sh(f"nft -f - <<'EOF'\n{MEDDLER}\nEOF")
    with agent(tmp_path, status(clock_skew=-300.0)):
        code, found = findings(node, tmp_path)
        human_code, human = check(node, tmp_path)
    assert code == human_code == 1
    assert set(codes(found)) == {
        *LAB,
        ("rule-uses-table-180", "error"),
        ("rule-steals-tunnel-traffic", "error"),
        ("rule-priority-taken", "error"),
        ("route-in-table-180", "error"),
        ("nft-changes-mark-bits", "error"),
        ("rp-filter-strict", "error"),
        ("mtu-too-large", "error"),
        ("clock-skew", "error"),
        ("discovery-sees-address", "info"),
    }
    (taken,) = only(found, "rule-priority-taken")
    assert "priority 32500 lookup 100 (IPv4)" in taken["what"]
    (steals,) = only(found, "rule-steals-tunnel-traffic")
    assert "priority 1000 fwmark 0x40/0x40 lookup main" in steals["what"]
    (route,) = only(found, "route-in-table-180")
    assert "10.99.0.0/16 via 192.0.2.1 dev eth0 table 180" in route["what"]
    (meddler,) = only(found, "nft-changes-mark-bits")
    assert "table ip meddler, chain out (hook output, priority 10)" in meddler["what"]
    (rp_filter,) = only(found, "rp-filter-strict")
    assert "net.ipv4.conf.kubespan.rp_filter=1" in rp_filter["what"]
    v4, v6 = only(found, "mtu-too-large")  # and none for the path with room
    assert f"{PEER_V4}: the route's MTU is 1400" in v4["what"] and "1340" in v4["todo"]
    assert f"{PEER_V6}: the route's MTU is 1480" in v6["what"] and "1400" in v6["todo"]
    (clock,) = only(found, "clock-skew")
    assert "300 s ahead of" in clock["what"]
    assert "ERROR rule-priority-taken" in human and human.rstrip().endswith("found")


def test_without_an_agent_the_kernel_is_still_checked(node: Netns, tmp_path: Path) -> None:
    node.ip("rule", "add", "priority", "32500", "lookup", "100")
    code, found = findings(node, tmp_path)
    assert code == 1
    assert codes(found) == [
        ("agent-not-running", "error"),
        ("link-not-wireguard", "error"),
        ("rule-priority-taken", "error"),
        ("nft-compares-mark-bits", "warning"),
    ]
    assert str(tmp_path / "status.sock") in found[0]["what"]
