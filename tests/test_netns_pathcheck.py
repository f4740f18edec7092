"""Path checks on the host kernel: two nodes, each behind its own masquerading router whose
filter admits replies by conntrack only, check each other's public endpoints at once (the
requests punch the holes) and a public node; a node that is not a member gets no answer.
Every node holds UDP port 51820 with a plain socket (as the kernel's WireGuard socket would)
and runs a PathChecker on real raw sockets (tests/netns_pathcheck_node.py).

    node1 10.0.1.2 -- r1 [masquerade] 203.0.113.1 --+
                                                    pub (bridge) -- node3 203.0.113.30
    node2 10.0.2.2 -- r2 [masquerade] 203.0.113.2 --+

Members: node1 knows node2 and node3; node2 knows node1 and node3; node3 knows node1 only.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from nacl.public import PrivateKey

from kubespan.pathcheck.checker import CHECK_AT, CHECK_SPAN

from netlab import REPO, Netns, namespaces, veth

pytestmark = pytest.mark.netns

HELPER = REPO / "tests" / "netns_pathcheck_node.py"
PORT = 51820
R1_PUBLIC, R2_PUBLIC, NODE3 = "203.0.113.1", "203.0.113.2", "203.0.113.30"
# node3's second address: an answer to a request sent there must come from there (routing
# alone would pick the first), or node1's router and node1 itself refuse it.
NODE3_SECOND = "203.0.113.31"
NODE2_DELAY = 0.3  # node2 starts checking node1 this much later (see the hole punch test)
RUN_SECONDS = NODE2_DELAY + CHECK_SPAN  # every check has run its course
READY_TIMEOUT = 15.0

# A home router: masquerade, forward out but only replies in, and nothing unsolicited to
# the router itself. Dropping those (rather than answering "port unreachable") leaves no
# conntrack entry behind that would take the port the other node's mapping wants.
ROUTER_RULES = """
table ip pclab_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
table inet pclab_filter {
    counter unsolicited {}
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname "lo" accept
        udp dport 51820 counter name unsolicited drop
    }
}
"""

# On the nodes: what leaves from the WireGuard port, by mark; on node3 also by destination,
# and what came in from node2's router.
NODE_RULES = f"""
table inet pclab_count {{
    counter marked {{}}
    counter unmarked {{}}
    counter to_r1 {{}}
    counter to_r2 {{}}
    counter from_r2 {{}}
    chain output {{
        type filter hook output priority filter; policy accept;
        udp sport {PORT} meta mark 0x20 counter name marked
        udp sport {PORT} meta mark != 0x20 counter name unmarked
        ip daddr {R1_PUBLIC} udp sport {PORT} counter name to_r1
        ip daddr {R2_PUBLIC} udp sport {PORT} counter name to_r2
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {R2_PUBLIC} udp dport {PORT} counter name from_r2
    }}
}}
"""


def nft(namespace: Netns, rules: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", namespace.name, "nft", "-f", "-"],
        input=rules,
        text=True,
        check=True,
        capture_output=True,
    )


def packets(namespace: Netns, table: str, counter: str) -> int:
    listed = namespace.sh(f"nft -j list counter inet {table} {counter}")
    return int(json.loads(listed)["nftables"][1]["counter"]["packets"])


@pytest.fixture
def lab() -> Iterator[dict[str, Netns]]:
    with namespaces("pub", "r1", "r2", "node1", "node2", "node3") as ns:
        public = ns["pub"]
        public.ip("link", "add", "br0", "type", "bridge")
        public.ip("link", "set", "br0", "addrgenmode", "none")
        public.ip("link", "set", "br0", "up")
        for index, (router, node) in enumerate((("r1", "node1"), ("r2", "node2")), start=1):
            r, n = ns[router], ns[node]
            veth(r, "wan", public, router)
            public.ip("link", "set", router, "master", "br0")
            r.ip("addr", "add", f"203.0.113.{index}/24", "dev", "wan")
            veth(n, "eth0", r, "lan")
            r.ip("addr", "add", f"10.0.{index}.1/24", "dev", "lan")
            n.ip("addr", "add", f"10.0.{index}.2/24", "dev", "eth0")
            n.ip("route", "add", "default", "via", f"10.0.{index}.1")
            r.sh("sysctl -qw net.ipv4.ip_forward=1")
            nft(r, ROUTER_RULES)
        veth(ns["node3"], "eth0", public, "n3")
        public.ip("link", "set", "n3", "master", "br0")
        ns["node3"].ip("addr", "add", f"{NODE3}/24", "dev", "eth0")
        ns["node3"].ip("addr", "add", f"{NODE3_SECOND}/24", "dev", "eth0")
        for name in ("node1", "node2", "node3"):
            nft(ns[name], NODE_RULES)
        yield ns


class Helper:
    """netns_pathcheck_node.py in a namespace: ready, go, then its summary."""

    def __init__(self, namespace: Netns, spec: dict[str, Any], directory: Path) -> None:
        path = directory / f"{namespace.name}.json"
        path.write_text(json.dumps(spec))
        self.stderr: IO[str] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed)
        env = f"PYTHONPATH={REPO / 'tests'}"
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace.name, "env", env, sys.executable, str(HELPER),
             str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )  # fmt: skip

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        if not text:
            self.process.wait(READY_TIMEOUT)
            raise AssertionError(f"the helper ended ({self.process.returncode}): {self.log()}")
        document: dict[str, Any] = json.loads(text)
        return document

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.stderr.close()


def keypair() -> tuple[str, str]:
    private = PrivateKey.generate()
    return (
        base64.b64encode(bytes(private)).decode(),
        base64.b64encode(bytes(private.public_key)).decode(),
    )


def test_members_check_through_two_nats_and_strangers_get_no_answer(
    lab: dict[str, Netns], tmp_path: Path
) -> None:
    cluster = base64.b64encode(os.urandom(32)).decode()
    (p1, k1), (p2, k2), (p3, k3) = keypair(), keypair(), keypair()
    at_node1, at_node2, at_node3 = f"{R1_PUBLIC}:{PORT}", f"{R2_PUBLIC}:{PORT}", f"{NODE3}:{PORT}"
    at_node3_second = f"{NODE3_SECOND}:{PORT}"
    specs: dict[str, dict[str, Any]] = {
        "node1": {
            "private": p1,
            "own": ["10.0.1.2", R1_PUBLIC],  # its address, and its router's (STUN's answer)
            "members": [k2, k3],
            "checks": [
                {"peer": k3, "endpoints": [at_node3, at_node3_second]},
                {"peer": k2, "endpoints": [at_node2]},
            ],
        },
        "node2": {
            "private": p2,
            "own": ["10.0.2.2", R2_PUBLIC],
            "members": [k1, k3],
            "checks": [
                # Later than node1's: node1's first request finds r2 closed (dropped there),
                # node2's opens it, node1's next one gets through.
                {"peer": k1, "endpoints": [at_node1], "delay": NODE2_DELAY},
                {"peer": k3, "endpoints": [at_node3]},  # node3 does not know node2
            ],
        },
        "node3": {
            "private": p3,
            "own": [NODE3, NODE3_SECOND],
            "members": [k1],
            # node1's mapping is a candidate of node3's: r1 drops these until node1's own
            # requests open it, and node1's requests make node3 check it back at once.
            "checks": [{"peer": k1, "endpoints": [at_node1]}],
        },
    }
    helpers: dict[str, Helper] = {}
    try:
        for name, spec in specs.items():
            spec |= {"cluster": cluster, "seconds": RUN_SECONDS}
            helpers[name] = Helper(lab[name], spec, tmp_path)
        for helper in helpers.values():
            assert helper.line() == {"ready": True}
        for helper in helpers.values():
            helper.go()
        results = {name: helper.line() for name, helper in helpers.items()}
        logs = {name: helper.log() for name, helper in helpers.items()}
    finally:
        for helper in helpers.values():
            helper.close()
    print(json.dumps(results, indent=1))
    node1, node2, node3 = results["node1"], results["node2"], results["node3"]

    def answered(result: dict[str, Any]) -> set[tuple[str, str]]:
        return {(e["peer"], e["endpoint"]) for e in result["events"]}

    # node1 -> the public node3.
    assert (k3, at_node3) in answered(node1), logs["node1"]
    assert (k3, at_node3_second) in answered(node1), logs["node1"]
    assert sorted(node1["answers"][k3]) == sorted([at_node3, at_node3_second])
    # node1 <-> node2 through both NATs, each at the other's router's port 51820.
    assert (k2, at_node2) in answered(node1), logs["node1"]
    assert (k1, at_node1) in answered(node2), logs["node2"]
    assert node1["answers"][k2] == [at_node2] and node2["answers"][k1] == [at_node1]
    assert node1["answered"] >= 1 and node2["answered"] >= 1
    # The holes were punched: r2 dropped node1's first request, before node2's opened it.
    assert packets(lab["r2"], "pclab_filter", "unsolicited") >= 1
    # node2 is no member of node3's: its requests came, all of them, and went unanswered.
    assert answered(node2) == {(k1, at_node1)}
    assert k3 not in node2["answers"]
    assert packets(lab["node3"], "pclab_count", "from_r2") == len(CHECK_AT)
    assert packets(lab["node3"], "pclab_count", "to_r2") == 0
    # node3 answered node1 only, and checked back the path node1's requests came by
    # (learning it); everything from port 51820 with WireGuard's mark.
    assert answered(node3) == {(k1, at_node1)}, logs["node3"]
    assert node3["answered"] >= 2 and node3["sent"] >= 1
    sent_by_node3 = node3["answered"] + node3["sent"]
    assert packets(lab["node3"], "pclab_count", "marked") == sent_by_node3
    assert packets(lab["node3"], "pclab_count", "to_r1") == sent_by_node3
    for name in ("node1", "node2", "node3"):
        assert packets(lab[name], "pclab_count", "unmarked") == 0
    for name, result in (("node1", node1), ("node2", node2)):
        assert packets(lab[name], "pclab_count", "marked") == result["sent"] + result["answered"]
