"""Liveness probes on the real kernel: an ICMPv6 echo through the link named `kubespan` (here
a veth standing in for the WireGuard link), answered by the far side's kernel, and never sent
out of any other interface, whatever the routes say."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from netlab import Netns, namespaces, veth, wait_until

pytestmark = pytest.mark.netns

PROBE = """
import ipaddress, sys
from kubespan.apply.probe import TunnelProber
prober = TunnelProber()
print(prober.send([ipaddress.IPv6Address(a) for a in sys.argv[1:]]))
"""


def echoes_out(ns: Netns, link: str) -> int:
    """Echo requests the node sent out of `link` (an nftables counter)."""
    listing = json.loads(ns.sh("nft -j list counter inet probecount " + link))
    return int(listing["nftables"][1]["counter"]["packets"])


def count_echoes(ns: Netns, *links: str) -> None:
    rules = "".join(
        f"counter {link} {{}}\n"
        f"chain out_{link} {{ type filter hook output priority 0; "
        f'oifname "{link}" icmpv6 type echo-request counter name {link}; }}\n'
        for link in links
    )
    ns.sh(f"nft -f - <<'EOF'\ntable inet probecount {{\n{rules}}}\nEOF")


def counters(ns: Netns, link: str) -> tuple[int, int]:
    (entry,) = json.loads(ns.ip("-s", "-j", "link", "show", "dev", link))
    stats = entry["stats64"]
    return int(stats["tx"]["packets"]), int(stats["rx"]["packets"])


@pytest.fixture
def wired() -> Iterator[tuple[Netns, Netns, Netns]]:
    with namespaces("node", "peer", "underlay") as made:
        node, peer, underlay = made["node"], made["peer"], made["underlay"]
        veth(node, "kubespan", peer, "tun0")
        veth(node, "eth0", underlay, "eth0")
        node.ip("address", "add", "fd00:5::1/64", "dev", "kubespan", "nodad")
        peer.ip("address", "add", "fd00:5::2/64", "dev", "tun0", "nodad")
        node.ip("address", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
        underlay.ip("address", "add", "2001:db8:7::2/64", "dev", "eth0", "nodad")
        node.ip("-6", "route", "add", "default", "via", "2001:db8:7::2", "dev", "eth0")
        count_echoes(node, "kubespan", "eth0")
        yield node, peer, underlay


def test_a_probe_goes_through_the_link_and_is_answered(
    wired: tuple[Netns, Netns, Netns],
) -> None:
    node, _peer, _underlay = wired
    _, rx_before = counters(node, "kubespan")
    assert node.python("-c", PROBE, "fd00:5::2").strip() == "1"
    # The far side's kernel answers the echo: the node's link receives the reply.
    wait_until(lambda: counters(node, "kubespan")[1] > rx_before, 5.0)
    assert echoes_out(node, "kubespan") == 1
    assert echoes_out(node, "eth0") == 0


def test_a_probe_never_leaves_on_another_interface(wired: tuple[Netns, Netns, Netns]) -> None:
    """A destination the main table routes out of eth0 (the underlay) is not probed there."""
    node, _peer, _underlay = wired
    node.python("-c", PROBE, "2001:db8:99::5", "2001:db8:7::2")
    assert echoes_out(node, "eth0") == 0
