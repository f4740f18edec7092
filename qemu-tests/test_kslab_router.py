"""The lab's NAT routers: the ruleset (pure) and, in network namespaces on the host kernel,
what they do to UDP from port 51820 (no VM needed: seconds)."""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kslab import (
    Image,
    Lab,
    LabError,
    Namespace,
    NatKind,
    RouterSpec,
    drop_rule,
    nat_ruleset,
    wait_until,
)

WAN = ipaddress.IPv4Interface


def test_endpoint_independent_ruleset_masquerades_and_admits_replies_only() -> None:
    rules = nat_ruleset(NatKind.ENDPOINT_INDEPENDENT)
    assert 'oifname "wan" masquerade\n' in rules
    assert "fully-random" not in rules
    forward = rules.split("chain forward {")[1].split("}")[0]
    assert "policy drop;" in forward
    assert forward.index("jump drops") < forward.index("ct state established,related accept")
    assert 'iifname "lan" oifname "wan" accept' in forward
    assert 'iifname "wan"' not in forward  # nothing new enters from the WAN


def test_symmetric_ruleset_randomises_every_mapping() -> None:
    assert 'oifname "wan" masquerade fully-random\n' in nat_ruleset(NatKind.SYMMETRIC)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"destination": "192.0.2.11"}, "ip daddr 192.0.2.11 drop"),
        (
            {"source": "10.1.0.11", "destination": "192.0.2.11", "protocol": "udp"},
            "ip saddr 10.1.0.11 ip daddr 192.0.2.11 meta l4proto udp drop",
        ),
    ],
)
def test_drop_rules(kwargs: dict[str, str], rule: str) -> None:
    assert drop_rule(**kwargs) == rule


@pytest.mark.parametrize(
    "kwargs", [{}, {"destination": "2001:db8::1"}, {"source": "x"}, {"protocol": "sctp"}]
)
def test_drop_rules_refuse_nonsense(kwargs: dict[str, str]) -> None:
    with pytest.raises((LabError, ValueError)):
        drop_rule(**kwargs)


def test_router_names_fit_interface_names() -> None:
    with pytest.raises(ValueError, match="router name"):
        RouterSpec("router-one", "wan", WAN("192.0.2.101/24"), "site", WAN("10.1.0.1/24"))


# --- on the host kernel, in namespaces ---------------------------------------------------

# Sends one datagram from UDP port 51820 to each destination given (HOST:PORT ...).
SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', 51820))\n"
    "for target in sys.argv[1:]:\n"
    "    host, port = target.rsplit(':', 1)\n"
    "    s.sendto(b'hello', (host, int(port)))\n"
)
# Receives datagrams for `timeout` seconds on HOST:PORT; prints each source as IP:PORT.
RECEIVE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "print('ready', flush=True)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    while True:\n"
    "        _, source = s.recvfrom(100)\n"
    "        print(f'{source[0]}:{source[1]}', flush=True)\n"
    "except TimeoutError:\n"
    "    pass\n"
)


@pytest.fixture
def netlab(tmp_path: Path) -> Iterator[tuple[Lab, list[Namespace]]]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    image = Image(tmp_path / "none", tmp_path / "none", tmp_path / "none")  # no VM here
    hosts: list[Namespace] = []
    with Lab(tmp_path / "lab", image) as lab:
        try:
            yield lab, hosts
        finally:
            for host in hosts:
                host.destroy()


def _inside_host(
    lab: Lab, hosts: list[Namespace], segment: str, address: str, via: str
) -> Namespace:
    host = Namespace.create("ksh")
    hosts.append(host)
    lab.ns.add_veth_to(f"h{len(hosts)}", lab.segments[segment].bridge, host, "eth0")
    host.ip("address", "add", address, "dev", "eth0")
    host.ip("link", "set", "eth0", "up")
    host.ip("route", "add", "default", "via", via)
    return host


def _receive(lab: Lab, name: str, host: str, port: int, seconds: float) -> Path:
    process = lab.spawn(name, [sys.executable, "-c", RECEIVE, host, str(port), str(seconds)])
    wait_until(lambda: "ready" in process.log_tail(), 10, f"{name} to listen")
    return process.log_path


@pytest.mark.netns
def test_two_hosts_behind_one_masquerade_get_two_ports_and_nothing_unsolicited_enters(
    netlab: tuple[Lab, list[Namespace]],
) -> None:
    lab, hosts = netlab
    lab.add_segment("wan", "192.0.2.0/24", None, host=(4,))
    lab.add_segment("site", "10.1.0.0/24", None, host=())
    router = lab.add_router(
        RouterSpec("r1", "wan", WAN("192.0.2.101/24"), "site", WAN("10.1.0.1/24"))
    )
    a = _inside_host(lab, hosts, "site", "10.1.0.11/24", "10.1.0.1")
    b = _inside_host(lab, hosts, "site", "10.1.0.12/24", "10.1.0.1")
    log = _receive(lab, "reflector", "192.0.2.1", 3478, 3.0)
    second = _receive(lab, "reflector2", "192.0.2.1", 3479, 3.0)

    a.run([sys.executable, "-c", SEND, "192.0.2.1:3478", "192.0.2.1:3479"])
    b.run([sys.executable, "-c", SEND, "192.0.2.1:3478"])
    lab.processes["reflector"].wait(10)
    lab.processes["reflector2"].wait(10)
    seen = log.read_text().split()[1:]
    assert len(seen) == 2 and len(set(seen)) == 2, seen
    assert all(s.startswith("192.0.2.101:") for s in seen), seen
    assert "192.0.2.101:51820" in seen  # the first one keeps its port
    # Endpoint-independent: the same inside port maps to the same outside port for both.
    assert second.read_text().split()[1:] == [seen[0]]
    assert "udp" in router.conntrack()

    # Nothing enters unasked: a datagram to the public address reaches no inside host.
    inside = lab.spawn(
        "inside", a.command([sys.executable, "-c", RECEIVE, "10.1.0.11", "4000", "2.0"])
    )
    wait_until(lambda: "ready" in inside.log_tail(), 10, "inside listener")
    lab.run([sys.executable, "-c", SEND.replace("51820", "4001"), "192.0.2.101:4000"])
    inside.wait(10)
    assert inside.log_tail().split() == ["ready"]

    router.flush_conntrack()
    assert "udp" not in router.conntrack()


@pytest.mark.netns
def test_symmetric_nat_maps_each_destination_to_its_own_port(
    netlab: tuple[Lab, list[Namespace]],
) -> None:
    lab, hosts = netlab
    lab.add_segment("wan", "192.0.2.0/24", None, host=(4,))
    lab.add_segment("site", "10.2.0.0/24", None, host=())
    lab.add_router(
        RouterSpec(
            "r2", "wan", WAN("192.0.2.102/24"), "site", WAN("10.2.0.1/24"), NatKind.SYMMETRIC
        )
    )
    a = _inside_host(lab, hosts, "site", "10.2.0.11/24", "10.2.0.1")
    first = _receive(lab, "reflector", "192.0.2.1", 3478, 3.0)
    second = _receive(lab, "reflector2", "192.0.2.1", 3479, 3.0)
    a.run([sys.executable, "-c", SEND, "192.0.2.1:3478", "192.0.2.1:3479"])
    lab.processes["reflector"].wait(10)
    lab.processes["reflector2"].wait(10)
    (one,) = first.read_text().split()[1:]
    (two,) = second.read_text().split()[1:]
    assert one.startswith("192.0.2.102:") and two.startswith("192.0.2.102:")
    assert one != two
