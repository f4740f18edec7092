"""Selective encryption on the wire. Three members and a non-member (the lab's host side,
192.0.2.1) share one segment; tcpdump on the segment sees what an outsider would. The tunnel
between node1 and node3 is broken from the start (their WireGuard packets are dropped on the
bridge), so node1 sees node3 down."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from kslab import Lab, Vm, wait_until
from mesh import node_status, start_cluster

pytestmark = pytest.mark.vm

SINK = (
    "import socket\n"
    "s = socket.create_server(('0.0.0.0', 5201))\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    while c.recv(65536):\n"
    "        pass\n"
    "    c.close()\n"
)
SEND = (
    "import json, socket, sys\n"
    "s = socket.create_connection((sys.argv[1], 5201), timeout=30)\n"
    "mss = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)\n"
    "data = bytes(1 << 16)\n"
    "for _ in range(64):\n"
    "    s.sendall(data)\n"
    "s.close()\n"
    "print(json.dumps({'mss': mss, 'sent': 64 << 16}))\n"
)


def peer_state(vm: Vm, name: str) -> str | None:
    status = node_status(vm)
    if status is None:
        return None
    states = {p["name"]: p["state"] for p in status["peers"]}
    return states.get(name)


def in_members(vm: Vm, address: str) -> bool:
    """Whether `address` is in the node's member set (elements may be collapsed prefixes)."""
    listing = json.loads(vm.check(["nft", "-j", "list", "set", "inet", "kubespan", "members_v4"]))
    elements = next(item["set"] for item in listing["nftables"] if "set" in item).get("elem", [])
    networks = [
        ipaddress.ip_network(f"{e['prefix']['addr']}/{e['prefix']['len']}")
        if isinstance(e, dict)
        else ipaddress.ip_network(e)
        for e in elements
    ]
    return any(ipaddress.ip_address(address) in network for network in networks)


def between(a: str, b: str) -> str:
    return f"((src {a} and dst {b}) or (src {b} and dst {a}))"


def test_members_only_speak_wireguard_on_the_wire(
    lab: Lab, kubespan_bin: Path, tmp_path: Path
) -> None:
    cluster = start_cluster(lab, kubespan_bin, tmp_path / "discovery")
    # node1 (MAC ..:00:00) and node3 (MAC ..:02:00) cannot exchange WireGuard packets.
    node1_mac, node3_mac = "52:54:00:6b:00:00", "52:54:00:6b:02:00"
    lab.run(["nft", "add table bridge cut"])
    lab.run(["nft", "add chain bridge cut forward { type filter hook forward priority 0; }"])
    for src, dst in ((node1_mac, node3_mac), (node3_mac, node1_mac)):
        rule = f"ether saddr {src} ether daddr {dst} udp dport 51820 drop"
        lab.run(["nft", f"add rule bridge cut forward {rule}"])
    node1, node2, node3 = cluster.boot(3)
    ip = {
        vm.name: str(cluster.lan.address(10 + int(vm.name[-1])).ip) for vm in (node1, node2, node3)
    }
    outsider = str(cluster.lan.gateway.ip)

    wait_until(lambda: peer_state(node1, "node2") == "up", 240, "node1 to see node2 up", 2.0)
    wait_until(
        lambda: peer_state(node1, "node3") in ("down", "unknown"), 240, "node1 to try node3", 2.0
    )
    node2.check(["systemd-run", "--unit=sink", "python3", "-c", SINK])

    capture = lab.capture("lan")
    node1.check(["ping", "-c", "3", "-W", "3", ip["node2"]])
    sent = json.loads(node1.check(["python3", "-c", SEND, ip["node2"]]))
    node1.check(["ping", "-c", "3", "-W", "3", outsider])
    assert node1.exec(["ping", "-c", "3", "-W", "2", ip["node3"]]).exit_code != 0
    capture.stop()

    # Between members, only WireGuard on the wire: no plaintext ICMP or TCP.
    for other in ("node2", "node3"):
        plain = capture.packets(f"ip and {between(ip['node1'], ip[other])} and not udp port 51820")
        assert plain == [], plain[:5]
    assert capture.packets(f"udp port 51820 and {between(ip['node1'], ip['node2'])}")
    # Full MSS through the tunnel, and nothing fragmented on the underlay.
    assert 1300 <= sent["mss"] <= 1420 - 52, sent
    assert capture.packets("ip[6:2] & 0x3fff != 0") == []
    assert capture.packets("icmp[icmptype] == icmp-unreach") == []
    # The non-member is reached in the clear.
    assert capture.packets(f"icmp and {between(ip['node1'], outsider)}")
    # Fail closed: node3's tunnel is down, and still nothing went to it in the clear.
    assert in_members(node1, ip["node3"])

    # With bypass allowed, traffic to the down member goes direct, in the clear.
    node1.check(
        ["kubespan", "config", "apply", "-"],
        stdin=cluster.config(allowDownPeerBypass=True).encode(),
    )
    wait_until(lambda: not in_members(node1, ip["node3"]), 120, "node3 to leave node1's set", 2.0)
    assert in_members(node1, ip["node2"])
    capture = lab.capture("lan", "capture-bypass")
    node1.exec(["ping", "-c", "3", "-W", "2", ip["node3"]])
    capture.stop()
    assert capture.packets(f"icmp and src {ip['node1']} and dst {ip['node3']}")
