"""The relay on the host kernel: two nodes behind NATs that could never reach each other
directly (one symmetric, one filtering by address and port) exchange WireGuard-shaped
datagrams through a relay's nftables rules alone (relay.forward, relay.kernel); the relay
forwards nothing else and nothing from anyone else, and the checksums it rewrites are right.
Then the whole relay (relay.server): the sides bind with authenticated messages from their
WireGuard ports, and the relay forwards once both are bound; a stranger cannot bind.

    a 10.0.1.2 -- ra [masquerade random,fully-random] 203.0.113.1 --+
    b 10.0.2.2 -- rb [masquerade]                     203.0.113.2 --+-- pub (bridge)
                                     relay 203.0.113.30 (forwards) --+
                                            stranger 203.0.113.40 --+

Both routers admit replies only (conntrack). a and b each hold UDP port 51820 (as the
kernel's WireGuard socket would) and send from it; the relay holds its two relay ports with
plain sockets, which is how it sees each side's mapping, as its bind messages will.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.rawudp import udp_checksum
from kubespan.relay import bind
from kubespan.relay.ports import PortRange, pair_ports
from wgkeys import Keys

from netlab import REPO, Netns, namespaces, veth

pytestmark = pytest.mark.netns

PORT = 51820
RELAY, STRANGER = "203.0.113.30", "203.0.113.40"
PORT_A, PORT_B = 41000, 41001  # the relay's ports for a's side and b's side
HELPER = REPO / "tests" / "netns_udp_node.py"
RELAY_NODE = REPO / "tests" / "netns_relay_node.py"
RELAY_SIDE = REPO / "tests" / "netns_relay_side.py"
RELAY_PORTS = PortRange(51821, 1000)
BIND_TAG = struct.pack("!I", bind.TAG).hex()
WAIT = 10.0
QUIET = 1.0  # how long "nothing arrives" is watched for, after the control datagram did

ROUTER_RULES = """
table ip rlab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade MODE
    }
}
table inet rlab_filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
    }
}
"""


# One ICMP echo request (iputils' ping is not on every host this runs on).
SEND_ECHO = """
import socket, struct, sys
body = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"kubespan"
total = sum(struct.unpack("!%dH" % (len(body) // 2), body))
total = (total & 0xFFFF) + (total >> 16)
checksum = ~(total + (total >> 16)) & 0xFFFF
packet = body[:2] + struct.pack("!H", checksum) + body[4:]
socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).sendto(packet, (sys.argv[1], 0))
"""


def wireguard_shaped(kind: int, body: bytes) -> bytes:
    return struct.pack("!B3x", kind) + body


class UdpNode:
    """tests/netns_udp_node.py in a namespace."""

    def __init__(self, namespace: Netns, ports: list[int], source: str) -> None:
        self.stderr: IO[str] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed)
        env = f"PYTHONPATH={REPO / 'tests'}"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace.name, "env", env, sys.executable, str(HELPER),
             ",".join(map(str, ports)), source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )  # fmt: skip
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        ready = threading.Event()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        if not ready.wait(WAIT):
            raise AssertionError(f"udp node not ready: {self.log()}")

    def _read(self, ready: threading.Event) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            document = json.loads(line)
            if document.get("ready"):
                ready.set()
            else:
                self.received.put(document)

    def send(self, to: str, data: bytes, from_port: int = PORT) -> None:
        assert self.process.stdin is not None
        request = {"to": to, "from_port": from_port, "data": data.hex()}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def next(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next datagram but the relay's answers to binds (which reach the WireGuard
        port too, and WireGuard drops as garbage)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                got = self.received.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"nothing arrived within {timeout} s: {self.log()}") from None
            if not got["data"].startswith(BIND_TAG):
                return got

    def drain(self, quiet: float) -> list[dict[str, Any]]:
        """Everything that arrives until `quiet` seconds pass with nothing."""
        got = []
        while True:
            try:
                got.append(self.received.get(timeout=quiet))
            except queue.Empty:
                return got

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


class Capture:
    """tcpdump in a namespace, writing a pcap; ready once tcpdump says it listens."""

    def __init__(self, namespace: Netns, path: Path, capture_filter: str) -> None:
        self.path = path
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace.name, "tcpdump", "-i", "eth0", "-U", "-w",
             str(path), capture_filter],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        said = self.process.stderr.readline()
        assert "listening on" in said, said

    def udp(self) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, bytes]]:
        return list(ipv4_from_pcap(self.path.read_bytes(), 17))

    def icmp(self) -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, bytes]]:
        return list(ipv4_from_pcap(self.path.read_bytes(), 1))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(WAIT)


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def nft(namespace: Netns, rules: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace.name, "nft", "-f", "-"],
        input=rules,
        text=True,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def lab() -> Iterator[dict[str, Netns]]:
    with namespaces("pub", "ra", "rb", "a", "b", "relay", "stranger") as ns:
        public = ns["pub"]
        public.ip("link", "add", "br0", "type", "bridge")
        public.ip("link", "set", "br0", "addrgenmode", "none")
        public.ip("link", "set", "br0", "up")
        for index, (router, node, mode) in enumerate(
            (("ra", "a", "random,fully-random"), ("rb", "b", "")), start=1
        ):
            r, n = ns[router], ns[node]
            veth(r, "wan", public, router)
            public.ip("link", "set", router, "master", "br0")
            r.ip("addr", "add", f"203.0.113.{index}/24", "dev", "wan")
            veth(n, "eth0", r, "lan")
            r.ip("addr", "add", f"10.0.{index}.1/24", "dev", "lan")
            n.ip("addr", "add", f"10.0.{index}.2/24", "dev", "eth0")
            n.ip("route", "add", "default", "via", f"10.0.{index}.1")
            r.sh("sysctl -qw net.ipv4.ip_forward=1")
            nft(r, ROUTER_RULES.replace("MODE", mode))
        for name, address in (("relay", RELAY), ("stranger", STRANGER)):
            veth(ns[name], "eth0", public, name)
            public.ip("link", "set", name, "master", "br0")
            ns[name].ip("addr", "add", f"{address}/24", "dev", "eth0")
        ns["relay"].sh("sysctl -qw net.ipv4.ip_forward=1")
        yield ns


def apply_relay(relay: Netns, pairs: list[dict[str, Any]]) -> str:
    """RelayForwarder.apply in the relay's namespace; the table it left, as nft lists it."""
    script = (
        "import ipaddress, json, sys\n"
        "from kubespan.netaddr import Endpoint\n"
        "from kubespan.relay.forward import RelayedPair, RelaySide, RelaySpec\n"
        "from kubespan.relay.kernel import RelayForwarder\n"
        "def side(p, i):\n"
        "    return RelaySide(p['ports'][i], Endpoint.parse(p['sides'][i]))\n"
        "pairs = [RelayedPair(ipaddress.ip_address(p['address']), side(p, 0), side(p, 1))\n"
        "         for p in json.load(sys.stdin)]\n"
        "forwarder = RelayForwarder()\n"
        "forwarder.apply(RelaySpec.of(pairs))\n"
    )
    relay.python("-c", script, stdin=json.dumps(pairs))
    return relay.sh("nft list table inet kubespan_relay", check=False)


IPV4_UDP_HEADERS = 28


def relay_sent_bytes(relay: Netns) -> dict[int, int]:
    """RelayForwarder.sent_bytes in the relay's namespace: bytes by relay port."""
    script = (
        "import json\n"
        "from kubespan.relay.kernel import RelayForwarder\n"
        "print(json.dumps(RelayForwarder().sent_bytes()))\n"
    )
    found = json.loads(relay.python("-c", script))
    return {int(port): count for port, count in found.items()}


def test_two_nodes_no_path_could_join_reach_each_other_through_the_relay_alone(
    lab: dict[str, Netns], tmp_path: Path
) -> None:
    a = UdpNode(lab["a"], [PORT], "10.0.1.2")
    b = UdpNode(lab["b"], [PORT], "10.0.2.2")
    relay = UdpNode(lab["relay"], [PORT_A, PORT_B], RELAY)
    stranger = UdpNode(lab["stranger"], [PORT], STRANGER)
    capture = Capture(lab["b"], tmp_path / "b.pcap", "udp")
    try:
        # Each side opens its NAT towards its relay port; the relay learns the mappings.
        a.send(f"{RELAY}:{PORT_A}", b"bind a")
        b.send(f"{RELAY}:{PORT_B}", b"bind b")
        seen = {d["port"]: d for d in (relay.next(), relay.next())}
        mapping_a, mapping_b = seen[PORT_A]["from"], seen[PORT_B]["from"]
        assert mapping_a.startswith("203.0.113.1:") and mapping_b.startswith("203.0.113.2:")

        # Without the relay, a cannot reach b: b's router admits replies only.
        b_direct = mapping_b
        a.send(b_direct, wireguard_shaped(1, b"direct"))
        # A WireGuard-shaped datagram before the pair is bound is the relay's own.
        a.send(f"{RELAY}:{PORT_A}", wireguard_shaped(1, b"too early"))
        assert relay.next()["data"] == wireguard_shaped(1, b"too early").hex()
        assert b.drain(QUIET) == []

        table = apply_relay(lab["relay"], [relayed(RELAY, PORT_A, mapping_a, mapping_b)])
        assert "kubespan_relay" in table, table

        # Every WireGuard message type crosses, both ways, each side seeing the relay's
        # port for the other as the source.
        sent = {PORT_A: 0, PORT_B: 0}
        for kind in (1, 2, 3, 4):
            message = wireguard_shaped(kind, f"a to b {kind}".encode())
            a.send(f"{RELAY}:{PORT_A}", message)
            got = b.next()
            assert (got["from"], got["data"]) == (f"{RELAY}:{PORT_B}", message.hex()), got
            reply = wireguard_shaped(kind, f"b to a {kind}!".encode())
            b.send(f"{RELAY}:{PORT_B}", reply)
            got = a.next()
            assert (got["from"], got["data"]) == (f"{RELAY}:{PORT_A}", reply.hex()), got
            sent[PORT_A] += IPV4_UDP_HEADERS + len(message)
            sent[PORT_B] += IPV4_UDP_HEADERS + len(reply)
        # What each side sent through the relay, counted per side (status and metrics).
        assert relay_sent_bytes(lab["relay"]) == sent

        # Not WireGuard-shaped (a bind, a type 5, a non-zero reserved byte): the relay's own.
        for odd in (b"bind a", struct.pack("!B3x", 5) + b"x", b"\x01\x00\x01\x00x"):
            a.send(f"{RELAY}:{PORT_A}", odd)
            got = relay.next()
            assert (got["port"], got["data"]) == (PORT_A, odd.hex()), got
        # A stranger's WireGuard-shaped datagrams go nowhere but the relay's socket.
        stranger.send(f"{RELAY}:{PORT_A}", wireguard_shaped(1, b"stranger"))
        got = relay.next()
        assert got["from"] == f"{STRANGER}:{PORT}", got
        assert b.drain(QUIET) == [] and a.drain(0.1) == []

        # On b's wire, every datagram from the relay has a right UDP checksum.
        def from_relay() -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, bytes]]:
            return [p for p in capture.udp() if str(p[0]) == RELAY]

        wait_for(lambda: len(from_relay()) == 4, "the four relayed datagrams in b's capture")
        for source, destination, segment in from_relay():
            header = segment[:6] + b"\0\0" + segment[8:]
            assert struct.unpack("!H", segment[6:8])[0] == udp_checksum(
                source, destination, header
            ), segment.hex()
    finally:
        capture.stop()
        for node in (a, b, relay, stranger):
            node.close()


def relayed(address: str, port: int, side_a: str, side_b: str) -> dict[str, Any]:
    return {"address": address, "ports": [port, port + 1], "sides": [side_a, side_b]}


def test_the_table_holds_exactly_the_pairs_and_goes_with_teardown(
    lab: dict[str, Netns],
) -> None:
    relay = lab["relay"]
    pairs = [
        relayed(RELAY, 41000, "203.0.113.1:1000", "203.0.113.2:2000"),
        relayed(RELAY, 41002, "203.0.113.1:1001", "203.0.113.40:51820"),
        relayed("2001:db8::30", 41000, "[2001:db8:1::1]:1000", "[2001:db8:2::2]:2000"),
    ]
    table = apply_relay(relay, pairs)
    assert table.count("notrack") == 6 and table.count("saddr set") == 6, table
    assert "ip6 daddr set 2001:db8:2::2 udp dport set 2000" in table, table
    table = apply_relay(relay, pairs[1:2])
    assert "41000" not in table and "41002" in table and "ip6" not in table, table
    teardown = "from kubespan.relay.kernel import RelayForwarder\nRelayForwarder().teardown()\n"
    relay.python("-c", teardown)
    assert "kubespan_relay" not in relay.sh("nft list tables")


def ipv4_from_pcap(
    data: bytes, protocol: int
) -> Iterator[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address, bytes]]:
    """(source, destination, IP payload) of the IPv4 packets of `protocol` in an Ethernet
    pcap file."""
    offset = 24
    while offset + 16 <= len(data):
        captured = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != protocol:
            continue
        header_bytes = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        yield (
            ipaddress.IPv4Address(frame[26:30]),
            ipaddress.IPv4Address(frame[30:34]),
            frame[14 + header_bytes : 14 + total],
        )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def side(
    namespace: Netns, tmp_path: Path, own: Keys, peer: Keys, relay: Keys, bind_key: bytes
) -> list[dict[str, Any]]:
    """netns_relay_side.py: the answers to its binds, until the first BOUND."""
    spec = {
        "private": b64(own.private),
        "public": b64(own.public),
        "peer": b64(peer.public),
        "relay": b64(relay.public),
        "bind_key": b64(bind_key),
        "relay_at": RELAY,
        "first": RELAY_PORTS.first,
        "count": RELAY_PORTS.count,
        "from_port": PORT,
        "binds": 1,
    }
    path = tmp_path / f"side-{namespace.name}.json"
    path.write_text(json.dumps(spec))
    out = namespace.python(str(RELAY_SIDE), str(path))
    return [json.loads(line) for line in out.splitlines()]


@dataclass
class RelayNode:
    lines: Iterator[str]
    log: str = ""

    def next(self) -> dict[str, Any]:
        line = next(self.lines, "")
        assert line, "the relay ended"
        document: dict[str, Any] = json.loads(line)
        return document


@contextmanager
def relay_node(namespace: Netns, spec_path: Path) -> Iterator[RelayNode]:
    """netns_relay_node.py running in `namespace`; its log once it has stopped."""
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed below)
    env = f"PYTHONPATH={REPO / 'tests'}"
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace.name, "env", env, sys.executable,
         str(RELAY_NODE), str(spec_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stdin is not None
    node = RelayNode(iter(process.stdout.readline, ""))
    try:
        yield node
    finally:
        process.stdin.close()
        process.wait(WAIT)
        log.seek(0)
        node.log = log.read()
        log.close()


def test_sides_that_bind_are_relayed_and_a_stranger_cannot_bind(
    lab: dict[str, Netns], tmp_path: Path
) -> None:
    cluster = ClusterKeys.derive("relay-lab", os.urandom(32))
    relay_keys, a_keys, b_keys = Keys(), Keys(), Keys()
    spec = {
        "private": b64(relay_keys.private),
        "public": b64(relay_keys.public),
        "bind_key": b64(cluster.relay_bind_key),
        "members": [b64(a_keys.public), b64(b_keys.public)],
        "first": RELAY_PORTS.first,
        "count": RELAY_PORTS.count,
    }
    (tmp_path / "relay.json").write_text(json.dumps(spec))
    icmp = Capture(lab["relay"], tmp_path / "relay-icmp.pcap", f"icmp and src host {RELAY}")
    # Each side's WireGuard port is held, as the kernel's WireGuard socket holds it.
    a = UdpNode(lab["a"], [PORT], "10.0.1.2")
    b = UdpNode(lab["b"], [PORT], "10.0.2.2")
    try:
        with relay_node(lab["relay"], tmp_path / "relay.json") as relay:
            assert relay.next() == {"ready": True}
            assert relay.next() == {"pairs": 0}

            # A stranger to the cluster gets no answer at all; nor does a member's key with
            # another cluster's bind key (its MAC does not verify).
            (unanswered,) = side(lab["a"], tmp_path, Keys(), b_keys, relay_keys, os.urandom(32))
            assert unanswered["kind"] == "NONE", unanswered
            (forged,) = side(lab["a"], tmp_path, a_keys, b_keys, relay_keys, os.urandom(32))
            assert forged["kind"] == "NONE", forged

            key = cluster.relay_bind_key
            (a_bound,) = side(lab["a"], tmp_path, a_keys, b_keys, relay_keys, key)
            assert a_bound["kind"] == "BOUND" and a_bound["observed"].startswith("203.0.113.1:")
            # The answer comes from the very relay port the bind went to.
            assert a_bound["from"] == f"{RELAY}:{a_bound['port']}", a_bound
            (b_bound,) = side(lab["b"], tmp_path, b_keys, a_keys, relay_keys, key)
            assert b_bound["kind"] == "BOUND" and b_bound["observed"].startswith("203.0.113.2:")
            assert relay.next() == {"pairs": 1}
            ports = pair_ports(RELAY_PORTS, relay_keys.public, a_keys.public, b_keys.public, 0)
            assert (a_bound["port"], b_bound["port"]) == ports

            message = wireguard_shaped(1, b"handshake initiation")
            a.send(f"{RELAY}:{ports[0]}", message)
            got = b.next()
            assert (got["from"], got["data"]) == (f"{RELAY}:{ports[1]}", message.hex()), got
            reply = wireguard_shaped(2, b"handshake response")
            b.send(f"{RELAY}:{ports[1]}", reply)
            got = a.next()
            assert (got["from"], got["data"]) == (f"{RELAY}:{ports[0]}", reply.hex()), got
        # Whatever ICMP the binds and the forwarding drew went out before the relay could
        # answer or b could receive: a ping from the relay, captured, comes after all of it.
        lab["relay"].python("-c", SEND_ECHO, "203.0.113.2")
        wait_for(icmp.icmp, "the relay's own ping in its capture")
        (only,) = icmp.icmp()
        assert only[2][0] == 8, only  # an echo request: no error, no redirect
    finally:
        icmp.stop()
        a.close()
        b.close()
    assert "relay forwards pairs=1" in relay.log, relay.log
    # Stopping the relay removed its table.
    assert "kubespan_relay" not in lab["relay"].sh("nft list tables")
