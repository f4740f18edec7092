"""Two nodes behind one masquerading router learn their public endpoints by STUN, from the
WireGuard port, while a plain UDP socket holds that port (as the kernel's WireGuard socket
would). The reflector is the discovery service's, on a "public" network with two addresses.

    node1 10.0.0.2 --+
                     br0 10.0.0.1 [router: masquerade, replies by conntrack only] 203.0.113.1
    node2 10.0.0.3 --+                                                               |
                                     public: discovery + STUN at 203.0.113.10 and .11
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netlab import Netns, namespaces, veth

pytestmark = pytest.mark.netns

KUBESPAN = Path(sys.executable).parent / "kubespan"
ROUTER_PUBLIC = "203.0.113.1"
REFLECTOR_A = "203.0.113.10"
REFLECTOR_B = "203.0.113.11"
STUN_PORT = 3478
URL = f"http://{REFLECTOR_A}:3000"
START_TIMEOUT = 20.0

ROUTER_RULES = """
table ip stunlab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "pub" masquerade
    }
}
table inet stunlab_filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "br0" oifname "pub" accept
    }
}
"""

# On the nodes: count what leaves from the WireGuard port, by mark.
NODE_RULES = """
table inet stunlab_count {
    counter wireguard_marked {}
    counter unmarked {}
    chain output {
        type filter hook output priority filter; policy accept;
        udp sport 51820 meta mark 0x20 counter name wireguard_marked
        udp sport 51820 meta mark != 0x20 counter name unmarked
    }
}
"""


def nft(namespace: Netns, rules: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace.name, "nft", "-f", "-"],
        input=rules,
        text=True,
        check=True,
        capture_output=True,
    )


def packets(namespace: Netns, counter: str) -> int:
    listed = namespace.sh(f"nft -j list counter inet stunlab_count {counter}")
    return int(json.loads(listed)["nftables"][1]["counter"]["packets"])


@pytest.fixture
def lab() -> Iterator[dict[str, Netns]]:
    with namespaces("pub", "router", "node1", "node2") as ns:
        router, public = ns["router"], ns["pub"]
        veth(router, "pub", public, "eth0")
        router.ip("addr", "add", f"{ROUTER_PUBLIC}/24", "dev", "pub")
        public.ip("addr", "add", f"{REFLECTOR_A}/24", "dev", "eth0")
        public.ip("addr", "add", f"{REFLECTOR_B}/24", "dev", "eth0")
        router.ip("link", "add", "br0", "type", "bridge")
        router.ip("link", "set", "br0", "addrgenmode", "none")
        router.ip("link", "set", "br0", "up")
        router.ip("addr", "add", "10.0.0.1/24", "dev", "br0")
        for index, name in enumerate(("node1", "node2"), start=2):
            node = ns[name]
            veth(node, "eth0", router, f"lan{index}")
            router.ip("link", "set", f"lan{index}", "master", "br0")
            node.ip("addr", "add", f"10.0.0.{index}/24", "dev", "eth0")
            node.ip("route", "add", "default", "via", "10.0.0.1")
        router.sh("sysctl -qw net.ipv4.ip_forward=1")
        nft(router, ROUTER_RULES)
        for name in ("node1", "node2"):
            nft(ns[name], NODE_RULES)
        with DiscoveryIn(public):
            yield ns


class DiscoveryIn:
    """`kubespan discovery serve` in `namespace`, its reflector on every address."""

    def __init__(self, namespace: Netns) -> None:
        self.namespace = namespace
        self.log = tempfile.NamedTemporaryFile(mode="w+b", suffix=".log")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DiscoveryIn:
        argv = [
            "ip", "netns", "exec", self.namespace.name, str(KUBESPAN), "-v", "discovery",
            "serve", "--listen", "0.0.0.0:3000", "--public-url", URL,
            "--stun-listen", f"0.0.0.0:{STUN_PORT}",
            "--stun-advertise", f":{STUN_PORT}",
            "--stun-advertise", f"{REFLECTOR_B}:{STUN_PORT}",
        ]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while b"discovery service listening" not in Path(self.log.name).read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"discovery did not start: {self.output()}")
            time.sleep(0.05)  # polling the log for the line, within the deadline
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def __exit__(self, *_exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def probe_from(node: Netns, count: int) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        node.python(str(Path(__file__).parent / "netns_stun_probe.py"), URL, str(count))
    )
    return result


def test_two_nodes_behind_one_nat_learn_distinct_public_ports(lab: dict[str, Netns]) -> None:
    reflectors = [f"{REFLECTOR_A}:{STUN_PORT}", f"{REFLECTOR_B}:{STUN_PORT}"]
    first = probe_from(lab["node1"], 2)
    second = probe_from(lab["node2"], 2)

    for result in (first, second):
        # The service named both reflectors: itself (":3478") and the advertised other one.
        assert result["reflectors"] == reflectors
        # The answers reached the port as the kernel's socket would also see them.
        assert result["stand_in_received"] >= 2
        for probe in result["probes"]:
            assert set(probe["mapped"]) == set(reflectors)
            assert all(m and m.startswith(f"{ROUTER_PUBLIC}:") for m in probe["mapped"].values())
        # A second probe finds the same mapping: the NAT keeps it.
        assert result["probes"][0]["mapped"] == result["probes"][1]["mapped"]

    # Every request left with WireGuard's own mark (so kubespan's rules leave it alone).
    for name in ("node1", "node2"):
        assert packets(lab[name], "wireguard_marked") >= 4
        assert packets(lab[name], "unmarked") == 0

    # node1 came first: masquerade kept its port for both reflectors (endpoint-independent).
    node1 = first["probes"][0]
    assert set(node1["mapped"].values()) == {f"{ROUTER_PUBLIC}:51820"}
    assert node1["mapping"] == "endpoint-independent"
    # node2's port 51820 was taken on the public side: it got another, per reflector; the
    # classification says what the ports say.
    node2 = second["probes"][0]
    node2_ports = set(node2["mapped"].values())
    assert f"{ROUTER_PUBLIC}:51820" not in node2_ports
    expected = "endpoint-independent" if len(node2_ports) == 1 else "endpoint-dependent"
    assert node2["mapping"] == expected
    print(
        f"node1={node1['mapped']} node2={node2['mapped']} node2_mapping={node2['mapping']} "
        f"probe_s={max(p['seconds'] for r in (first, second) for p in r['probes']):.4f}"
    )
