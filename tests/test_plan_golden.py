"""Golden transcripts: a sequence of planner inputs and the exact operations each one yields.

Run with KUBESPAN_UPDATE_GOLDEN=1 to rewrite the expected files after an intended change, then
read the diff before committing it.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from dataclasses import replace
from pathlib import Path

from kubespan.config import KubeSpanConfig
from kubespan.model import AffiliateInfo, Member
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PlanInput, plan
from kubespan.plan.diff import diff
from kubespan.plan.peerstate import Tracking

from fakekernel import FakeKernel

GOLDEN = Path(__file__).parent / "golden"


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def member(n: int, addresses: list[str], endpoints: list[str]) -> Member:
    info = AffiliateInfo(
        node_id=f"node{n}",
        hostname=f"node{n}",
        public_key=key(n),
        ula=ipaddress.IPv6Address(f"fd00:1:2:3::{n}"),
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
    )
    return Member(info, tuple(Endpoint.parse(e) for e in endpoints))


class Transcript:
    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.tracking: dict[str, Tracking] = {}
        self.lines: list[str] = []

    def step(self, title: str, members: tuple[Member, ...], now: float) -> None:
        observed = self.kernel.observe_link("kubespan")
        result = plan(
            PlanInput(
                config=KubeSpanConfig(enabled=True),
                public_key=key(100),
                private_key=key(101),
                preshared_key=key(102),
                ula=ipaddress.IPv6Address("fd00:1:2:3::100"),
                own_addresses=(ipaddress.ip_address("192.0.2.100"),),
                members=members,
                observed=observed,
                tracking=self.tracking,
                now=now,
            )
        )
        self.tracking = dict(result.tracking)
        operations = diff(result.desired, observed)
        self.kernel.apply(operations)
        self.lines.append(f"## {title}")
        self.lines.extend(f"warning: {w}" for w in result.warnings)
        self.lines.extend(op.render() for op in operations)
        self.lines.extend(
            f"state {r.name}: {r.state.value} endpoint {r.endpoint}" for r in result.reports
        )
        self.lines.append("")

    def check(self, name: str) -> None:
        text = "\n".join(self.lines)
        path = GOLDEN / f"{name}.txt"
        if os.environ.get("KUBESPAN_UPDATE_GOLDEN"):
            path.write_text(text)
        assert text == path.read_text()


def test_mesh_lifecycle_transcript() -> None:
    t = Transcript()
    a = member(1, ["192.0.2.1", "2001:db8::1"], ["192.0.2.1:51820", "[2001:db8::1]:51820"])
    b = member(2, ["198.51.100.2"], ["10.9.9.9:51820", "198.51.100.2:51820"])
    t0 = 1_000_000.0
    t.step("first pass: the link is created, no members yet", (), t0)
    t.step("same inputs again: nothing changes", (), t0 + 1)
    t.step("two members appear", (a, b), t0 + 2)
    t.step("same inputs again: nothing changes", (a, b), t0 + 3)
    t.kernel.handshake(key(1), t0 + 5)
    t.step("node1 handshakes; node2 is still in its trial", (a, b), t0 + 10)
    t.step("node2 has not answered for 15 s: next candidate", (a, b), t0 + 18)
    a_moved = member(1, ["192.0.2.11", "2001:db8::1"], ["192.0.2.11:51820"])
    t.kernel.handshake(key(2), t0 + 20)
    t.step("node1's address changes: only its allowed IPs are replaced", (a_moved, b), t0 + 21)
    t.step("node2 leaves", (a_moved,), t0 + 22)
    c = member(3, ["192.0.2.11", "203.0.113.3"], ["203.0.113.3:51820"])
    t.step("node3 claims node1's address: node1 keeps it", (a_moved, c), t0 + 23)
    t.check("mesh_lifecycle")


def test_foreign_changes_to_our_link_are_repaired() -> None:
    t = Transcript()
    a = member(1, ["192.0.2.1"], ["192.0.2.1:51820"])
    t0 = 2_000_000.0
    t.step("mesh with one member", (a,), t0)
    link = t.kernel.link
    assert link is not None
    stray = ipaddress.ip_interface("10.0.0.1/24")
    t.kernel.link = replace(
        link,
        mtu=1500,
        up=False,
        listen_port=9999,
        addresses=(*link.addresses, stray),
        peers=(*link.peers, replace(link.peers[0], public_key=key(9))),
    )
    t.step("someone changed MTU, port, state, added an address and a peer", (a,), t0 + 1)
    t.step("repaired: nothing more to do", (a,), t0 + 2)
    t.check("foreign_changes")
