"""Capture the kernel's netlink notifications for a list of changes, in the network namespace
this runs in (the caller uses `ip netns exec`), subscribed exactly as KernelWatcher is.

Prints JSON: a list of {"change", "command", "expected", "datagrams": [[nftables, hex]]}.
`expected` is the reason KernelWatcher must give (null: it must stay asleep). The netns test
checks the live capture; tests/netlink_samples.json is one such capture, kept for the unit
tests (regenerate: `ip netns add x; ip netns exec x python3 tests/netlink_capture.py >
tests/netlink_samples.json; ip netns del x`, with PYTHONPATH holding service/).

A change's notifications are queued on our sockets before the command that made it returns
(netlink multicast delivery is synchronous), so reading until the sockets are empty after
each command collects exactly that change's messages.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from kubespan.apply.changes import WatchState, classify_datagram
from kubespan.apply.watch import subscribe

# (change, shell command, expected reason). Run in order: later ones rely on earlier ones.
CHANGES = [
    ("our link appears", "ip link add kubespan type veth peer name ks-peer", "link kubespan"),
    ("another link appears", "ip link add other type veth peer name other-peer", None),
    ("our table is added", "nft 'add table inet kubespan'", "nftables table inet kubespan"),
    (
        "a set and an element in our table",
        "nft 'add set inet kubespan s { type ipv4_addr; }; add element inet kubespan s "
        "{ 192.0.2.1 }'",
        "nftables table inet kubespan",
    ),
    (
        "a chain with a policy in our table",
        "nft 'add chain inet kubespan c { type filter hook prerouting priority 0; policy drop; }'",
        "nftables table inet kubespan",
    ),
    (
        "another program's table, chain and rule",
        "nft 'add table ip kubeproxy; add chain ip kubeproxy c; add rule ip kubeproxy c accept'",
        None,
    ),
    ("a table named like ours in another family", "nft 'add table ip kubespan'", None),
    ("a table whose name starts like ours", "nft 'add table inet kubespan2'", None),
    ("another program's table is deleted", "nft 'delete table ip kubeproxy'", None),
    ("our table is deleted", "nft 'delete table inet kubespan'", "nftables table inet kubespan"),
    (
        "an IPv4 route in table 180",
        "ip route add unreachable 198.51.100.0/24 table 180",
        "route in table 180",
    ),
    (
        "an IPv6 route in table 180",
        "ip -6 route add unreachable 2001:db8:1::/64 table 180",
        "route in table 180",
    ),
    ("a route in another table", "ip route add unreachable 198.51.100.0/24 table 100", None),
    ("a rule that looks up table 180", "ip rule add priority 100 lookup 180", "rule for table 180"),
    (
        "an IPv6 rule that looks up table 180",
        "ip -6 rule add priority 100 lookup 180",
        "rule for table 180",
    ),
    (
        "a rule at our priority",
        "ip rule add priority 32500 lookup 100",
        "rule at priority 32500",
    ),
    ("another rule", "ip rule add priority 200 lookup 100", None),
    ("an address", "ip address add 192.0.2.7/32 dev lo", "address"),
    ("an IPv6 address", "ip address add 2001:db8::7/128 dev lo", "address"),
    ("a route in the main table", "ip route add 203.0.113.0/24 dev lo", None),
    ("a default route", "ip route add default dev lo", "default route"),
    ("an IPv6 default route", "ip -6 route add default dev lo", "default route"),
    ("a default route is deleted", "ip route del default dev lo", "default route"),
    ("rp_filter on our link", "sysctl -qw net.ipv4.conf.kubespan.rp_filter=2", "rp_filter"),
    ("rp_filter on all", "sysctl -qw net.ipv4.conf.all.rp_filter=2", "rp_filter"),
    ("rp_filter on another link", "sysctl -qw net.ipv4.conf.other.rp_filter=2", None),
    ("our link goes up", "ip link set kubespan up", "link kubespan"),
    ("our link is renamed away", "ip link set kubespan down name gone", "link kubespan"),
    # Renamed away, it is another link: its going up or down counts as such (its addresses
    # would be advertised while it is up).
    ("our link, renamed, goes up", "ip link set gone up", "another link's state"),
    ("our link is deleted", "ip link del gone", "another link's state"),
    ("another link goes up", "ip link set other up", "another link's state"),
    ("another link goes down", "ip link set other down", "another link's state"),
    ("another link is renamed", "ip link set other name other2", "another link's state"),
    ("another link is deleted", "ip link del other2", None),
]


def replay(captured: list[dict[str, Any]]) -> list[tuple[str, set[str], set[str]]]:
    """(change, reasons expected, reasons given) for each change, classifying every datagram
    in order as KernelWatcher does (the state carries the link's index along)."""
    state = WatchState()
    out = []
    for change in captured:
        given: set[str] = set()
        for nftables, data in change["datagrams"]:
            reasons, state = classify_datagram(bytes.fromhex(data), nftables, state)
            given |= reasons
        expected = {change["expected"]} if change["expected"] else set()
        out.append((change["change"], expected, given))
    return out


def drain(sockets: list[tuple[socket.socket, bool]]) -> list[tuple[bool, str]]:
    out = []
    for sock, nftables in sockets:
        while True:
            try:
                data, address = sock.recvfrom(1 << 16)
            except BlockingIOError:
                break
            if address[0] == 0:
                out.append((nftables, data.hex()))
    return out


def main() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    sockets = subscribe()
    drain(sockets)  # whatever came before
    captured = []
    for change, command, expected in CHANGES:
        subprocess.run(["sh", "-ec", command], check=True)
        captured.append(
            {
                "change": change,
                "command": command,
                "expected": expected,
                "datagrams": drain(sockets),
            }
        )
    print(json.dumps(captured, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
