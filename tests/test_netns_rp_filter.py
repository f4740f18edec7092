"""What `kubespan check`'s rp_filter finding rests on, shown on the host kernel: a packet
that arrives on a link with no IPv4 address (as decrypted packets come out of `kubespan`),
from a source the main table routes elsewhere, is dropped by reverse path filtering in loose
mode (2) as in strict (1); only 0 lets it in. With an IPv4 address on the link, loose lets
it in. Counted by the kernel's own IPReversePathFilter counter, in namespaces the test made."""

from __future__ import annotations

import pytest

from netlab import Netns, namespaces, wait_until

pytestmark = pytest.mark.netns

SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    s.sendto(b'x', ('198.51.100.2', 9))\n"
)


def counters(node: Netns) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in node.sh("nstat -az IpInReceives TcpExtIPReversePathFilter").splitlines():
        name, _, rest = line.partition(" ")
        if rest.split() and rest.split()[0].isdigit():
            found[name] = int(rest.split()[0])
    return found


def delivered_and_filtered(sender: Netns, node: Netns, rp_filter: int) -> tuple[int, int]:
    """Of 5 packets sent over the address-less link: how many passed, how many were
    dropped by reverse path filtering."""
    node.sh(f"sysctl -qw net.ipv4.conf.all.rp_filter={rp_filter} net.ipv4.conf.tun.rp_filter=0")
    before = counters(node)
    sender.python("-c", SEND, "5")

    def arrived() -> bool:
        return counters(node)["IpInReceives"] - before["IpInReceives"] >= 5

    wait_until(arrived, 5.0)
    after = counters(node)
    filtered = after["TcpExtIPReversePathFilter"] - before["TcpExtIPReversePathFilter"]
    return 5 - filtered, filtered


def test_loose_rp_filter_drops_on_a_link_without_an_ipv4_address() -> None:
    with namespaces("rpsend", "rpnode") as ns:
        sender, node = ns["rpsend"], ns["rpnode"]
        # `tun` stands for the kubespan link: no IPv4 address; the node's address and
        # default route are on `eth0`, so the sender's source is not routed back via `tun`.
        sender.ip("link", "add", "out", "type", "veth", "peer", "name", "tun", "netns", node.name)
        sender.ip("link", "add", "side", "type", "veth", "peer", "name", "eth0", "netns", node.name)
        for name in ("out", "side"):
            sender.ip("link", "set", name, "up")
        for name in ("tun", "eth0"):
            node.ip("link", "set", name, "up")
        node.ip("address", "add", "198.51.100.2/24", "dev", "eth0")
        node.ip("route", "add", "default", "via", "198.51.100.1", "dev", "eth0", "onlink")
        sender.ip("address", "add", "192.0.2.9/24", "dev", "out")
        sender.ip("route", "add", "198.51.100.2/32", "dev", "out")
        mac = node.sh("cat /sys/class/net/tun/address").strip()
        sender.ip(
            "neigh", "replace", "198.51.100.2", "lladdr", mac, "dev", "out", "nud", "permanent"
        )

        assert delivered_and_filtered(sender, node, 0) == (5, 0)
        assert delivered_and_filtered(sender, node, 1) == (0, 5)
        assert delivered_and_filtered(sender, node, 2) == (0, 5)  # loose drops too
        node.ip("address", "add", "10.9.9.9/32", "dev", "tun")
        assert delivered_and_filtered(sender, node, 2) == (5, 0)
