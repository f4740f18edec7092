"""Golden transcripts: a sequence of planner inputs and the exact operations each one yields.

Run with KUBESPAN_UPDATE_GOLDEN=1 to rewrite the expected files after an intended change, then
read the diff before committing it.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from kubespan.config import KubeSpanConfig
from kubespan.model import AffiliateInfo, Member, ObservedLink
from kubespan.netaddr import Endpoint
from kubespan.plan.dataplane import ReplaceRuleset
from kubespan.plan.desired import PlanInput, plan
from kubespan.plan.diff import diff
from kubespan.plan.peerstate import Tracking

from fakekernel import FakeKernel

GOLDEN = Path(__file__).parent / "golden"
ENABLED = KubeSpanConfig(enabled=True)
POD_SUBNETS = (ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("2001:db8:244::/48"))


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def member(
    n: int, addresses: list[str], endpoints: list[str], pod_cidrs: tuple[str, ...] = ()
) -> Member:
    info = AffiliateInfo(
        node_id=f"node{n}",
        hostname=f"node{n}",
        public_key=key(n),
        ula=ipaddress.IPv6Address(f"fd00:1:2:3::{n}"),
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        pod_cidrs=tuple(ipaddress.ip_network(c) for c in pod_cidrs),
    )
    return Member(info, tuple(Endpoint.parse(e) for e in endpoints))


def plan_input(
    members: tuple[Member, ...] | None,
    now: float,
    observed: ObservedLink | None = None,
    tracking: Mapping[str, Tracking] | None = None,
    config: KubeSpanConfig = ENABLED,
    **more: Any,
) -> PlanInput:
    """What this node (key 100, 192.0.2.100) plans from; `more` sets other fields."""
    return PlanInput(
        config=config,
        public_key=key(100),
        private_key=key(101),
        preshared_key=key(102),
        ula=ipaddress.IPv6Address("fd00:1:2:3::100"),
        own_addresses=(ipaddress.ip_address("192.0.2.100"),),
        members=members,
        observed=observed,
        tracking=tracking or {},
        now=now,
        wall=now,
        pod_subnets=POD_SUBNETS,
        **more,
    )


class Transcript:
    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.tracking: dict[str, Tracking] = {}
        self.lines: list[str] = []
        self.alive: set[str] = set()  # peers heard from (keepalives, answers) at every step

    def handshake(self, public_key: str, when: float) -> None:
        self.kernel.handshake(public_key, when)
        self.alive.add(public_key)

    def step(
        self,
        title: str,
        members: tuple[Member, ...] | None,
        now: float,
        config: KubeSpanConfig = ENABLED,
        departed: tuple[int, ...] = (),
    ) -> None:
        for public_key in self.alive:
            if self.kernel.link and any(p.public_key == public_key for p in self.kernel.link.peers):
                self.kernel.receive(public_key, 32)
        observed = self.kernel.observe_link("kubespan")
        routing = self.kernel.observe_routing("kubespan")
        result = plan(
            plan_input(
                members,
                now,
                observed,
                self.tracking,
                config,
                departed_keys=frozenset(key(n) for n in departed),
            )
        )
        self.tracking = dict(result.tracking)
        operations = diff(result.desired, observed, routing)
        self.kernel.apply(operations)
        self.lines.append(f"## {title}")
        self.lines.extend(f"warning: {w}" for w in result.warnings)
        for op in operations:
            self.lines.append(op.render())
            if isinstance(op, ReplaceRuleset):
                self.lines.extend(f"    {line}" for line in op.spec.render().splitlines())
        names = {p.public_key: p.name for p in result.desired.peers}
        self.lines.extend(f"nudge {names[k]}" for k in result.nudges)
        self.lines.extend(f"probe {a}" for a in result.probes)
        self.lines.extend(
            f"state {r.name}: {r.state.value} endpoint {r.endpoint} ({r.why})"
            for r in result.reports
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
    t.handshake(key(1), t0 + 5)
    t.step("node1 handshakes; node2 is still in its trial", (a, b), t0 + 10)
    t.step("node2 has not answered for 5 s: next candidate", (a, b), t0 + 18)
    a_moved = member(1, ["192.0.2.11", "2001:db8::1"], ["192.0.2.11:51820"])
    t.handshake(key(2), t0 + 20)
    t.step("node1's address changes: only its allowed IPs are replaced", (a_moved, b), t0 + 21)
    t.step("node2 is missing from discovery: kept (absence proves nothing)", (a_moved,), t0 + 22)
    t.step("node2's sealed leave record: removed", (a_moved,), t0 + 22.5, departed=(2,))
    c = member(3, ["192.0.2.11", "203.0.113.3"], ["203.0.113.3:51820"])
    t.step("node3 claims node1's address: node1 keeps it", (a_moved, c), t0 + 23)
    grinder = member(0, ["192.0.2.11"], ["198.51.100.66:51820"])
    t.step(
        "node0's key sorts first, and it claims node1's address: node1, which holds it, keeps it",
        (a_moved, c, grinder),
        t0 + 24,
    )
    twin_a = member(4, ["203.0.113.44"], ["203.0.113.44:51820"])
    twin_b = member(5, ["203.0.113.44", "203.0.113.55"], ["203.0.113.55:51820"])
    t.step(
        "two new members claim one address nobody holds: held back, routed to neither",
        (a_moved, c, grinder, twin_a, twin_b),
        t0 + 25,
    )
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
        peers=(*link.peers, replace(link.peers[0], public_key=key(9), preshared_key=key(9))),
    )
    t.step("someone changed MTU, port, state, added an address and a peer", (a,), t0 + 1)
    t.step("repaired: nothing more to do", (a,), t0 + 2)
    t.check("foreign_changes")


def test_fail_closed_and_bypass_transcript() -> None:
    t = Transcript()
    a = member(1, ["192.0.2.1"], ["192.0.2.1:51820"])
    b = member(2, ["192.0.2.2"], ["192.0.2.2:51820"])
    bypass = KubeSpanConfig(enabled=True, allow_down_peer_bypass=True)
    t0 = 3_000_000.0
    t.step("fail closed (default): members are in the set whatever their state", (a, b), t0)
    t.handshake(key(1), t0 + 1)
    t.step("with bypass: only node1, which is up, stays in the set", (a, b), t0 + 2, bypass)
    t.handshake(key(2), t0 + 3)
    t.step("node2 comes up: back in the set", (a, b), t0 + 4, bypass)
    t.step("bypass turned off again: the set holds both, unchanged", (a, b), t0 + 5)
    t.step("after 300 s without handshakes both are down; fail closed keeps them", (a, b), t0 + 305)
    t.step("with bypass, down members leave the set", (a, b), t0 + 306, bypass)
    t.check("fail_closed_bypass")


def test_pod_cidrs_overlaps_and_collapsing_transcript() -> None:
    t = Transcript()
    t0 = 4_000_000.0
    a = member(1, ["10.0.0.1"], ["10.0.0.1:51820"], ("10.244.0.0/24", "2001:db8:244::/64"))
    b = member(2, ["10.0.0.2"], ["10.0.0.2:51820"], ("10.244.1.0/24",))
    c = member(3, ["10.0.0.3"], ["10.0.0.3:51820"], ("10.244.0.0/16",))
    d = member(4, ["192.0.2.100", "10.0.0.4"], ["10.0.0.4:51820"], ("10.244.1.0/24",))
    e = member(5, ["10.0.0.5"], ["10.0.0.5:51820"], ("10.244.0.0/22",))
    greedy = member(8, ["10.0.0.8"], ["10.0.0.8:51820"], ("0.0.0.0/1", "128.0.0.0/1"))
    outside = member(9, ["10.0.0.9"], ["10.0.0.9:51820"], ("10.96.0.0/24", "10.244.200.0/24"))
    # node0's key sorts first: its pod CIDR covers node7's node address.
    thief = member(0, ["10.0.0.10"], ["10.0.0.10:51820"], ("10.244.100.0/24",))
    victim = member(7, ["10.244.100.7"], ["10.244.100.7:51820"])
    t.step("pod CIDRs route with their members; adjacent prefixes collapse", (a, b), t0)
    t.step("a whole pod subnet is refused", (a, b, c), t0 + 1)
    t.step("this node's own address and a taken pod CIDR are refused", (a, b, c, d), t0 + 2)
    t.step("a wider pod CIDR keeps only what others do not have", (a, b, c, d, e), t0 + 3)
    everyone = (a, b, c, d, e, greedy, outside)
    t.step(
        "default-route halves and prefixes outside the pod subnets are refused", everyone, t0 + 4
    )
    t.step("a node address inside the pod subnets is refused", (*everyone, thief, victim), t0 + 5)
    t.check("pod_cidrs_overlaps")


def test_mtu_change_and_dataplane_drift_transcript() -> None:
    t = Transcript()
    a = member(1, ["192.0.2.1"], ["192.0.2.1:51820"])
    t0 = 5_000_000.0
    t.step("mesh with one member", (a,), t0)
    t.step(
        "the MTU changes: link, routes and MSS clamp follow",
        (a,),
        t0 + 1,
        KubeSpanConfig(enabled=True, mtu=1380),
    )
    routing = t.kernel.routing
    assert routing.ruleset is not None
    shrunk = replace(routing.ruleset, fingerprint=None)  # no longer what was applied
    t.kernel.routing = replace(
        routing,
        ruleset=shrunk,
        rules=routing.rules[1:],
        routes=tuple(r for r in routing.routes if r.link is not None),
        rp_filter=1,
    )
    t.step(
        "someone flushed rules from our chain, deleted a rule, a route; strict rp_filter",
        (a,),
        t0 + 2,
        KubeSpanConfig(enabled=True, mtu=1380),
    )
    t.step("repaired: nothing more to do", (a,), t0 + 3, KubeSpanConfig(enabled=True, mtu=1380))
    t.check("mtu_and_drift")


def test_restart_keeps_kernel_peers_until_discovery_answers() -> None:
    t = Transcript()
    a = member(1, ["192.0.2.1"], ["192.0.2.1:51820"])
    b = member(2, ["192.0.2.2"], ["192.0.2.2:51820"])
    t0 = 6_000_000.0
    t.step("mesh with two members", (a, b), t0)
    t.handshake(key(1), t0 + 5)
    t.tracking = {}
    t.step("the agent restarts: discovery has not answered, the kernel's peers stay", None, t0 + 10)
    t.step("still no answer: nothing changes", None, t0 + 20)
    t.step("discovery answers without node2: it is kept until it is down", (a,), t0 + 30)
    t.step("275 s on, node2 never answered: removed", (a,), t0 + 300)
    t.check("restart_unknown_members")


def test_a_bound_relay_is_tried_first_never_path_checked_and_shown_in_use() -> None:
    """The endpoint bound at a relay leads the candidates (Kind.RELAYED); path checks go to
    the direct ones only (a relay forwards WireGuard's messages, nothing else); once the
    peer uses it, its report names the relay."""
    from kubespan.plan.candidates import Kind

    peer = member(1, ["10.9.0.1"], ["198.51.100.1:51820"])
    relayed_at = Endpoint.parse("203.0.113.30:29101")
    relayed = {key(1): (relayed_at, "relay1")}
    first = plan(plan_input((peer,), 1000.0, relayed=relayed))
    (report,) = first.reports
    assert report.candidates[0].kind is Kind.RELAYED
    assert report.candidates[0].endpoint == relayed_at
    (spec,) = first.desired.peers
    assert spec.endpoint == relayed_at  # a new peer starts on its best candidate
    ((_, checked),) = first.checks
    assert relayed_at not in checked and Endpoint.parse("198.51.100.1:51820") in checked
    assert report.relay == "relay1"
    direct = plan(plan_input((peer,), 1000.0))
    assert direct.reports[0].relay is None


def test_a_relays_port_in_use_counts_as_relayed_whoever_bound_it() -> None:
    """WireGuard's endpoint on a relay's port (the binding left for a nearer relay, or the
    peer's own binding it roamed to) is never judged as a direct path."""
    from kubespan.plan.desired import relay_port_test, relayed_endpoints

    relay = member(3, ["203.0.113.30"], ["203.0.113.30:51820", "198.51.100.30:40000"])
    relay = Member(replace(relay.info, relay_ports=(29100, 256)), relay.endpoints)
    plain = member(4, ["203.0.113.40"], ["203.0.113.40:51820"])
    on_a_relay = relay_port_test((relay, plain))
    assert on_a_relay(Endpoint.parse("203.0.113.30:29100"))
    assert on_a_relay(Endpoint.parse("198.51.100.30:29355"))  # where others reach it
    assert not on_a_relay(Endpoint.parse("203.0.113.30:29356"))  # past its range
    assert not on_a_relay(Endpoint.parse("203.0.113.30:51820"))  # its WireGuard port
    assert not on_a_relay(Endpoint.parse("203.0.113.40:29100"))  # not a relay
    bound, left = Endpoint.parse("198.51.100.30:29200"), Endpoint.parse("203.0.113.30:29102")
    direct = Endpoint.parse("203.0.113.40:51820")
    assert relayed_endpoints(bound, left, on_a_relay) == {bound, left}
    assert relayed_endpoints(None, left, on_a_relay) == {left}
    assert relayed_endpoints(bound, direct, on_a_relay) == {bound}
    assert relayed_endpoints(None, None, on_a_relay) == frozenset()
