"""Selective encryption on the real host kernel, in network namespaces made by the test.

The node namespace gets an underlay (`eth0` to a "world" namespace) and a stand-in for the
WireGuard link (a veth named `kubespan` without ARP: the host kernel has no WireGuard). A
foreign table in the style of Flannel marks traffic with 0x4000 and routes it by its own rule;
it must keep working, and survive our teardown."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from netlab import Netns, namespaces, veth

pytestmark = pytest.mark.netns

MEMBER_V4 = "203.0.113.5"
MEMBER_V6 = "2001:db8:ffff::5"
NON_MEMBER = "198.51.100.7"
SPEC = {"members": [f"{MEMBER_V4}/32", "203.0.113.6/32", f"{MEMBER_V6}/128"], "mtu": 1420}

FOREIGN = """
table inet foreign {
  chain output {
    type route hook output priority mangle; policy accept;
    ip daddr 198.51.100.0/24 meta mark set meta mark | 0x4000
  }
}
table inet observer {
  chain postrouting {
    type filter hook postrouting priority 100; policy accept;
    meta mark & 0x60 == 0x40 oifname "kubespan" udp dport 9 counter name to_tunnel
    meta mark & 0x4000 == 0x4000 oifname "eth0" counter name foreign_marked
    oifname "eth0" ip daddr 203.0.113.0/24 udp dport 9 counter name member_clear
    oifname "eth0" ip6 daddr 2001:db8:ffff::/48 udp dport 9 counter name member_clear
    oifname "eth0" ip daddr 198.51.100.7 udp dport 9 counter name non_member_clear
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "kubespan" udp dport 9 counter name from_tunnel
  }
  counter to_tunnel { }
  counter foreign_marked { }
  counter member_clear { }
  counter non_member_clear { }
  counter from_tunnel { }
}
"""


@pytest.fixture
def node() -> Iterator[Netns]:
    with wired() as (node, _tunnel):
        yield node


@contextmanager
def wired() -> Iterator[tuple[Netns, Netns]]:
    with namespaces("node", "world", "tunnel") as ns:
        node, world, tunnel = ns["node"], ns["world"], ns["tunnel"]
        veth(node, "eth0", world, "w0")
        veth(node, "kubespan", tunnel, "t0")
        node.ip("link", "set", "kubespan", "arp", "off")
        node.sh("sysctl -qw net.ipv4.conf.kubespan.rp_filter=1")  # strict, as some distros
        node.ip("address", "add", "192.0.2.10/24", "dev", "eth0")
        node.ip("address", "add", "2001:db8::10/64", "dev", "eth0", "nodad")
        world.ip("address", "add", "192.0.2.1/24", "dev", "w0")
        world.ip("address", "add", "2001:db8::1/64", "dev", "w0", "nodad")
        node.ip("route", "add", "default", "via", "192.0.2.1")
        node.ip("-6", "route", "add", "default", "via", "2001:db8::1")
        # The foreign program's own policy route: marked traffic via table 200.
        node.ip("route", "add", "default", "via", "192.0.2.1", "table", "200")
        node.ip("rule", "add", "priority", "31000", "fwmark", "0x4000/0x4000", "lookup", "200")
        node.sh(f"nft -f - <<'EOF'\n{FOREIGN}\nEOF")
        yield node, tunnel


def send_udp(node: Netns, address: str, count: int = 3, mark: int | None = None) -> None:
    family = "socket.AF_INET6" if ":" in address else "socket.AF_INET"
    set_mark = f"s.setsockopt(socket.SOL_SOCKET, 36, {mark})\n" if mark is not None else ""
    script = (
        "import socket\n"
        f"s = socket.socket({family}, socket.SOCK_DGRAM)\n"
        f"{set_mark}"
        f"for _ in range({count}):\n"
        f"    s.sendto(b'kubespan-test', ('{address}', 9))\n"
    )
    node.sh(f'python3 -c "{script}"')


def counter(node: Netns, name: str) -> int:
    out = node.sh(f"nft list counter inet observer {name}")
    return int(out.split("packets")[1].split()[0])


def test_members_go_to_the_tunnel_and_the_rest_is_untouched(node: Netns) -> None:
    applied = node.dataplane("apply", SPEC)["operations"]
    assert applied[0] == "sysctl -w net.ipv4.conf.kubespan.rp_filter=0"
    assert applied[-1].startswith("nft -f -  # replace table inet kubespan")
    assert node.sh("cat /proc/sys/net/ipv4/conf/kubespan/rp_filter").strip() == "0"

    # Routing decisions: marked traffic to table 180, unmarked to main.
    assert "dev kubespan" in node.ip("route", "get", MEMBER_V4, "mark", "0x40")
    assert "dev eth0" in node.ip("route", "get", MEMBER_V4)

    send_udp(node, MEMBER_V4)
    send_udp(node, MEMBER_V6)
    assert counter(node, "to_tunnel") == 6
    assert counter(node, "member_clear") == 0

    # A non-member is left alone: out of the underlay, with the foreign mark and route intact.
    send_udp(node, NON_MEMBER)
    assert counter(node, "non_member_clear") == 3
    assert counter(node, "foreign_marked") == 3
    assert counter(node, "to_tunnel") == 6

    # WireGuard's own packets (mark 0x20) to a member's address are never re-marked.
    send_udp(node, MEMBER_V4, mark=0x20)
    assert counter(node, "to_tunnel") == 6
    assert counter(node, "member_clear") == 3


def test_reapplying_changes_nothing(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    table = node.sh("nft -j list table inet kubespan")
    rules = node.ip("rule", "show")
    assert node.dataplane("apply", SPEC)["operations"] == []
    assert node.sh("nft -j list table inet kubespan") == table
    assert node.ip("rule", "show") == rules


def test_teardown_removes_only_ours(node: Netns) -> None:
    foreign_before = node.sh("nft list table inet foreign")
    node.dataplane("apply", SPEC)
    removed = node.dataplane("teardown")["removed"]
    assert "nftables table inet kubespan" in removed
    assert node.sh("nft list tables").split() == [
        "table",
        "inet",
        "foreign",
        "table",
        "inet",
        "observer",
    ]
    assert "lookup 180" not in node.ip("rule", "show")
    assert "lookup 180" not in node.ip("-6", "rule", "show")
    assert node.ip("route", "show", "table", "180") == ""
    assert node.ip("-6", "route", "show", "table", "180") == ""
    # Without kubespan, member traffic goes the normal way again.
    send_udp(node, MEMBER_V4)
    assert counter(node, "member_clear") == 3
    assert node.sh("nft list table inet foreign") == foreign_before
    assert "31000:\tfrom all fwmark 0x4000/0x4000 lookup 200" in node.ip("rule", "show")
    assert node.dataplane("teardown")["removed"] == []


def test_a_refused_batch_leaves_the_previous_ruleset(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    table = node.sh("nft -j list table inet kubespan")
    result = node.dataplane("apply-broken", SPEC)
    assert "nftables refused the change" in result["error"]
    assert node.sh("nft -j list table inet kubespan") == table


def test_drift_is_repaired(node: Netns) -> None:
    node.dataplane("apply", SPEC)
    node.sh("nft flush chain inet kubespan output")
    node.ip("rule", "del", "priority", "32500")
    node.ip("route", "del", "default", "table", "180", "dev", "kubespan")
    repaired = node.dataplane("apply", SPEC)["operations"]
    assert repaired == [
        "ip -4 route replace default dev kubespan table 180 mtu 1420",
        "ip -4 rule add priority 32500 fwmark 0x40/0x60 lookup 180",
        repaired[-1],
    ]
    assert repaired[-1].startswith("nft -f -")
    assert node.dataplane("apply", SPEC)["operations"] == []


def test_decrypted_traffic_from_members_is_not_dropped() -> None:
    """Packets arriving on the link (as WireGuard delivers them, from a member's address, on
    an interface without an IPv4 address) reach the node: rp_filter must not drop them."""
    with wired() as (node, tunnel):
        node.dataplane("apply", SPEC)
        mac = node.sh("cat /sys/class/net/kubespan/address").strip()
        tunnel.ip("address", "add", f"{MEMBER_V4}/32", "dev", "t0")
        tunnel.ip("route", "add", "192.0.2.10/32", "dev", "t0")
        tunnel.ip("neigh", "add", "192.0.2.10", "lladdr", mac, "dev", "t0")
        send_udp(tunnel, "192.0.2.10")
        assert counter(node, "from_tunnel") == 3
