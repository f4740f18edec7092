"""The node of the netns dataplane tests: an underlay `eth0` to a "world" namespace, a
stand-in for the WireGuard link (a veth named `kubespan` without ARP: the host kernel has no
WireGuard), a "pod" namespace routed through the node, kube-proxy-style Service DNAT, a
foreign program in the style of Flannel that marks traffic with 0x4000 and routes it by its
own rule (it must keep working and survive our teardown), and counters that say where
packets went."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from netlab import Netns, namespaces, veth

MEMBER_V4 = "203.0.113.5"
MEMBER_V6 = "2001:db8:ffff::5"
NON_MEMBER = "198.51.100.7"
SERVICE = "10.96.0.10"
LISTEN_PORT = 51820
SPEC: dict[str, Any] = {
    "members": [f"{MEMBER_V4}/32", "203.0.113.6/32", f"{MEMBER_V6}/128"],
    "mtu": 1420,
    "listen_port": LISTEN_PORT,
}

FOREIGN = """
table inet foreign {
  chain output {
    type route hook output priority mangle; policy accept;
    ip daddr 198.51.100.0/24 meta mark set meta mark | 0x4000
  }
}
table ip service {
  chain output {
    type nat hook output priority -100; policy accept;
    ip daddr 10.96.0.10 udp dport 53 dnat to 203.0.113.5:9
  }
  chain prerouting {
    type nat hook prerouting priority -100; policy accept;
    ip daddr 10.96.0.10 udp dport 53 dnat to 203.0.113.5:9
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
    oifname "eth0" udp sport 51820 counter name wireguard_underlay
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "kubespan" udp dport 9 counter name from_tunnel
  }
  counter to_tunnel { }
  counter foreign_marked { }
  counter member_clear { }
  counter non_member_clear { }
  counter wireguard_underlay { }
  counter from_tunnel { }
}
"""


@contextmanager
def wired() -> Iterator[tuple[Netns, Netns, Netns]]:
    """(node, tunnel, pod)."""
    with namespaces("node", "world", "tunnel", "pod") as ns:
        node, world, tunnel, pod = ns["node"], ns["world"], ns["tunnel"], ns["pod"]
        veth(node, "eth0", world, "w0")
        veth(node, "kubespan", tunnel, "t0")
        veth(node, "pod0", pod, "eth0")
        node.ip("link", "set", "kubespan", "arp", "off")
        node.sh("sysctl -qw net.ipv4.conf.kubespan.rp_filter=1")  # strict, as some distros
        node.sh("sysctl -qw net.ipv4.ip_forward=1")
        node.ip("address", "add", "192.0.2.10/25", "dev", "eth0")
        node.ip("address", "add", "2001:db8::10/64", "dev", "eth0", "nodad")
        node.ip("address", "add", "192.0.2.129/25", "dev", "pod0")
        world.ip("address", "add", "192.0.2.1/25", "dev", "w0")
        world.ip("address", "add", "2001:db8::1/64", "dev", "w0", "nodad")
        pod.ip("address", "add", "192.0.2.130/25", "dev", "eth0")
        pod.ip("route", "add", "default", "via", "192.0.2.129")
        node.ip("route", "add", "default", "via", "192.0.2.1")
        node.ip("-6", "route", "add", "default", "via", "2001:db8::1")
        # The foreign program's own policy route: marked traffic via table 200.
        node.ip("route", "add", "default", "via", "192.0.2.1", "table", "200")
        node.ip("rule", "add", "priority", "31000", "fwmark", "0x4000/0x4000", "lookup", "200")
        node.sh(f"nft -f - <<'EOF'\n{FOREIGN}\nEOF")
        yield node, tunnel, pod


def send_udp(
    ns: Netns,
    address: str,
    count: int = 3,
    mark: int | None = None,
    port: int = 9,
    source_port: int | None = None,
    payload: bytes = b"kubespan-test",
) -> None:
    family = "socket.AF_INET6" if ":" in address else "socket.AF_INET"
    lines = ["import socket", f"s = socket.socket({family}, socket.SOCK_DGRAM)"]
    if mark is not None:
        lines.append(f"s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark})")
    if source_port is not None:
        lines.append(f"s.bind(('', {source_port}))")
    lines.append(f"for _ in range({count}): s.sendto({payload!r}, ('{address}', {port}))")
    script = "\n".join(lines)
    ns.sh(f'python3 -c "{script}"')


def counter(node: Netns, name: str) -> int:
    out = node.sh(f"nft list counter inet observer {name}")
    return int(out.split("packets")[1].split()[0])


def snapshot(node: Netns) -> str:
    """Everything of ours, as an operator would list it (no handles)."""
    return node.sh(
        "nft list table inet kubespan 2>/dev/null || echo 'no table inet kubespan'; "
        "ip -4 rule; ip -6 rule; "
        "ip -4 route show table 180; ip -6 route show table 180"
    )


def rule_handle(node: Netns, chain: str, text: str) -> str:
    """The handle of the first rule of our `chain` whose listing contains `text`."""
    for line in node.sh(f"nft -a list chain inet kubespan {chain}").splitlines():
        if text in line and "# handle" in line:
            return line.rsplit("# handle", 1)[1].strip()
    raise AssertionError(f"no rule with {text!r} in chain {chain}")


# Changes someone else makes to what is ours: each must be noticed and repaired.
DRIFTS = {
    "element swapped": (  # one transaction
        "nft 'delete element inet kubespan members_v4 { 203.0.113.6 }; "
        "add element inet kubespan members_v4 { 203.0.113.7 }'"
    ),
    "rule replaced by accept": (
        "nft replace rule inet kubespan output handle {output_v4_mark} accept"
    ),
    "chain policy drop": (
        "nft 'add chain inet kubespan prerouting "
        "{ type filter hook prerouting priority 0; policy drop; }'"
    ),
    "foreign route in table 180": "ip route add 203.0.113.0/24 via 192.0.2.1 table 180",
    "foreign rule for table 180": "ip rule add priority 32500 lookup 180",
    "table deleted": "nft 'delete table inet kubespan'",
}


def drift_command(node: Netns, name: str) -> str:
    handle = rule_handle(node, "output", "ip daddr @members_v4 meta mark set")
    return DRIFTS[name].replace("{output_v4_mark}", handle)
