"""The planner's per-peer memo (plan.desired.PeerMemo) changes nothing: two simulated nodes,
one planning with the memo and one without, see the same world (peers that live, die, come
back, change endpoints, answer path checks, are relayed; passes at any time, not only when a
decision asked to wake) and must make the same plan at every pass, field by field. The memo
must also be used: an idle node with dead peers plans only the live ones."""

from __future__ import annotations

import base64
import ipaddress
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from kubespan.model import AffiliateInfo, Member, ObservedLink, ObservedPeer, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan import desired, peerstate
from kubespan.plan.desired import PeerMemo, Plan, plan
from kubespan.plan.diff import SetPeer, diff
from kubespan.plan.peerstate import Sighting, Timing, Tracking, observe, observed_again
from test_plan_golden import key, plan_input

from fakekernel import FakeKernel

PEERS = 12


def member(n: int, generation: int = 0) -> Member:
    """Peer n's record; a new generation moves its first endpoint."""
    addresses = (ipaddress.ip_address(f"192.0.2.{n}"), ipaddress.ip_address(f"198.51.100.{n}"))
    endpoints = (
        Endpoint.parse(f"192.0.2.{n}:{51820 + generation}"),
        Endpoint.parse(f"198.51.100.{n}:51820"),
        Endpoint.parse(f"203.0.113.{n}:51820"),
    )
    info = AffiliateInfo(
        node_id=f"node{n}",
        hostname=f"node{n}",
        public_key=key(n),
        ula=ipaddress.IPv6Address(f"fd00:1:2:3::{n}"),
        addresses=addresses,
    )
    return Member(info, endpoints)


def relay_member(n: int, relaying: bool) -> Member:
    plain = member(n)
    # The address in its endpoints only (a shared NAT's public address), not claimed.
    info = replace(plain.info, relay_ports=(51800, 100) if relaying else None)
    return Member(info, (*plain.endpoints, Endpoint.parse("198.51.100.1:51820")))


@dataclass
class Node:
    """One simulated node: its kernel, what its planner remembers, and its memo (or none)."""

    memo: PeerMemo | None
    kernel: FakeKernel = field(default_factory=FakeKernel)
    tracking: dict[str, Tracking] = field(default_factory=dict)

    def step(
        self,
        members: tuple[Member, ...],
        now: float,
        answers: Mapping[str, Mapping[Endpoint, float]],
        relayed: Mapping[str, tuple[Endpoint, str]],
        nudge_all: bool,
        probing: bool,
        timing: Timing,
    ) -> Plan:
        observed = self.kernel.observe_link("kubespan")
        routing = self.kernel.observe_routing("kubespan")
        result = plan(
            plan_input(
                members,
                now,
                observed,
                self.tracking,
                answers=answers,
                relayed=relayed,
                nudge_all=nudge_all,
                probing=probing,
                timing=timing,
                memo=self.memo,
            )
        )
        self.tracking = dict(result.tracking)
        self.kernel.apply(diff(result.desired, observed, routing))
        return result


@dataclass
class World:
    """What the peers do, the same for both nodes: drawn from one seeded generator."""

    rng: random.Random
    members: dict[int, Member] = field(default_factory=dict)
    generation: dict[int, int] = field(default_factory=dict)
    alive: set[int] = field(default_factory=set)
    works_at: dict[int, int] = field(default_factory=dict)  # the endpoint index that works

    def change(self) -> None:
        roll = self.rng.random()
        n = self.rng.randrange(1, PEERS + 1)
        if roll < 0.05:
            self.generation[n] = self.generation.get(n, 0) + 1
            self.members[n] = member(n, self.generation[n])  # an endpoint moved
        elif roll < 0.08:
            self.members[n] = member(n, self.generation.get(n, 0))  # equal, another object
        elif roll < 0.15:
            self.alive ^= {n}
        elif roll < 0.18:
            self.works_at[n] = self.rng.randrange(3)
        elif roll < 0.21:
            # Peer 12 starts or stops relaying on ports that peer 1 is reached at, at peer
            # 1's address: peer 1's path is then a relay's port, whatever its own record says.
            relaying = self.members[PEERS].info.relay_ports is None
            self.members[PEERS] = relay_member(PEERS, relaying)

    def hear(self, node: Node, now: float, draws: list[float]) -> None:
        """Alive peers reached at their working endpoint send (keepalives, answers)."""
        link = node.kernel.link
        if link is None:
            return
        for peer, draw in zip(sorted(link.peers, key=lambda p: p.public_key), draws, strict=False):
            n = base64.b64decode(peer.public_key)[0]
            if draw > 0.6:
                # WireGuard sends to dead peers too (initiations, keepalives): counted out.
                node.kernel.transmit(peer.public_key, 148)
            if n not in self.alive or peer.endpoint is None:
                continue
            working = self.members[n].endpoints[self.works_at.get(n, 1)]
            if peer.endpoint != working:
                continue
            if draw < 0.2:
                node.kernel.handshake(peer.public_key, now)
            elif draw < 0.7:
                node.kernel.receive(peer.public_key, 32)


def run(seed: int, passes: int) -> tuple[int, int]:
    """Both nodes through `passes` passes; returns (peer plans made, peer plans reused)."""
    rng = random.Random(seed)
    world = World(rng)
    for n in range(1, PEERS + 1):
        world.members[n] = member(n)
    world.alive = {n for n in world.members if rng.random() < 0.3}
    with_memo, without = Node(PeerMemo()), Node(None)
    timing = Timing()
    now = 10_000.0 + rng.random() * 4
    reused = 0
    for index in range(passes):
        world.change()
        draws = [rng.random() for _ in range(PEERS)]
        for node in (with_memo, without):
            world.hear(node, now, draws)
        members = tuple(world.members[n] for n in sorted(world.members))
        answers: dict[str, dict[Endpoint, float]] = {}
        if rng.random() < 0.05:
            n = rng.randrange(1, PEERS + 1)
            answers[key(n)] = {world.members[n].endpoints[rng.randrange(3)]: now - rng.random()}
        relayed: dict[str, tuple[Endpoint, str]] = {}
        if rng.random() < 0.05:
            relayed[key(rng.randrange(1, PEERS + 1))] = (Endpoint.parse("192.0.2.250:29100"), "r")
        nudge_all = rng.random() < 0.01
        probing = rng.random() > 0.02
        if rng.random() < 0.01:
            timing = Timing()  # equal settings, another object: the memo starts over
        planned_before = len(with_memo.memo.planned) if with_memo.memo else 0
        ours = with_memo.step(members, now, answers, relayed, nudge_all, probing, timing)
        theirs = without.step(members, now, answers, relayed, nudge_all, probing, timing)
        assert ours == theirs, f"seed {seed}, pass {index} at {now}: the memo changed the plan"
        assert with_memo.kernel.link == without.kernel.link
        reused += planned_before
        # Passes at any time: many soon after the last, some after long silences (backoffs).
        gap = rng.choice((0.05, 0.3, 0.5, 1.0, 2.5, 4.0, 4.0, 7.0, 30.0, 130.0, 700.0))
        now += gap * (0.5 + rng.random())
    return passes, reused


@pytest.mark.parametrize("seed", range(40))
def test_the_memo_changes_no_plan(seed: int) -> None:
    run(seed, 400)


def count_full_decisions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that grows by one at each call of the planner's full per-peer decision."""
    decided: list[str] = []
    real = peerstate.decide_endpoint

    def counting(*args: object, **kwargs: object) -> object:
        decided.append("x")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(desired, "decide_endpoint", counting)
    return decided


def test_an_idle_node_plans_only_its_live_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dead peers waiting out a backoff are not planned again, though WireGuard goes on
    sending them initiations (their counters of bytes sent grow): counted by the calls of
    the planner's per-peer decision."""
    decided = count_full_decisions(monkeypatch)
    node = Node(PeerMemo())
    members = tuple(member(n) for n in range(1, PEERS + 1))
    now = 50_000.0
    for _ in range(400):  # long enough for every dead peer to be backed off
        node.step(members, now, {}, {}, False, True, Timing())
        now += 4.0
    timing = Timing()
    node.step(members, now, {}, {}, False, True, timing)
    node.step(members, now + 0.5, {}, {}, False, True, timing)
    decided.clear()
    assert node.kernel.link is not None
    for peer in node.kernel.link.peers:
        node.kernel.transmit(peer.public_key, 148)
    result = node.step(members, now + 1.0, {}, {}, False, True, timing)
    assert not decided, f"{len(decided)} dead peers planned again"
    assert len(result.reports) == PEERS
    sent = {p.public_key: p.tx_bytes for p in node.kernel.link.peers}
    assert all(r.tx_bytes == sent[r.public_key] > 0 for r in result.reports)
    assert not [op for op in diff(result.desired, node.kernel.link) if isinstance(op, SetPeer)]
    # Without a memo (or with another timing), every peer is planned.
    replaced = replace(timing, quiet=timing.quiet)
    node.step(members, now + 1.5, {}, {}, False, True, replaced)
    assert len(decided) == PEERS


def test_peers_that_answer_are_decided_again_without_their_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mesh whose peers all answer: every peer's counters move at every round of probes,
    so none is steady; each is decided by decide_up (no ranking, no full decision), probed
    at every round, and planned as a node without the memo plans it."""
    decided = count_full_decisions(monkeypatch)
    in_place: list[str] = []
    probed_in_place = desired._probed_in_place

    def counted(kept: Any, *args: Any) -> None:
        in_place.append(kept.spec.public_key)
        probed_in_place(kept, *args)

    monkeypatch.setattr(desired, "_probed_in_place", counted)
    members = tuple(member(n) for n in range(1, PEERS + 1))
    with_memo, without = Node(PeerMemo()), Node(None)
    timing = Timing()
    now = 50_000.0
    for index in range(60):
        in_place.clear()
        for node in (with_memo, without):
            link = node.kernel.link
            for peer in link.peers if link is not None and index > 0 else ():
                if peer.endpoint == members[base64.b64decode(peer.public_key)[0] - 1].endpoints[0]:
                    node.kernel.receive(peer.public_key, 96)  # the answer to the last probe
        decided.clear()
        ours = with_memo.step(members, now, {}, {}, False, True, timing)
        planned_in_full = len(decided)
        assert ours == without.step(members, now, {}, {}, False, True, timing)
        now += 4.0
    assert planned_in_full == 0, f"{planned_in_full} answering peers planned in full"
    assert all(report.state is PeerState.UP for report in ours.reports)
    assert len(ours.probes) == PEERS
    # A round of probes: each peer's memo entry brought to it in place (_probed_in_place).
    assert sorted(in_place) == sorted(m.info.public_key for m in members)


def test_a_peer_observed_again_is_what_observe_makes_of_the_values_it_holds() -> None:
    tracking = Tracking(
        Endpoint.parse("192.0.2.1:51820"), 1.0, handshake=5.0, rx_bytes=10, heard=3.0
    )
    tracking = replace(tracking, observed_at=4.0, why="works")
    held = Sighting(tracking.endpoint, tracking.handshake, tracking.rx_bytes)
    assert observed_again(tracking, 9.0) == observe(tracking, held, 9.0, 9.0)


def test_the_diff_tells_a_peer_that_only_answered_from_one_changed_beyond_its_counters() -> None:
    """diff's memo of peers that need nothing takes a kernel peer whose counters alone moved
    (its other fields the very objects: what the dump's parser hands out) as needing nothing
    still, and one changed otherwise for what it is."""
    node = Node(PeerMemo())
    members = tuple(member(n) for n in range(1, PEERS + 1))
    now = 50_000.0
    for _ in range(5):
        result = node.step(members, now, {}, {}, False, True, Timing())
        now += 4.0
    observed = node.kernel.observe_link("kubespan")
    assert observed is not None
    assert not [op for op in diff(result.desired, observed) if isinstance(op, SetPeer)]

    def kernel_with(change: Callable[[ObservedPeer], ObservedPeer]) -> ObservedLink:
        assert observed is not None
        return replace(observed, peers=tuple(change(p) for p in observed.peers))

    answered = kernel_with(lambda p: replace(p, rx_bytes=p.rx_bytes + 92, tx_bytes=p.tx_bytes + 1))
    assert not [op for op in diff(result.desired, answered) if isinstance(op, SetPeer)]
    first = observed.peers[0].public_key

    def only_first(**changes: Any) -> Callable[[ObservedPeer], ObservedPeer]:
        return lambda p: (
            replace(p, rx_bytes=p.rx_bytes + 1, **changes) if p.public_key == first else p
        )

    for changes in (
        {"keepalive": 0},
        {"allowed_ips": ()},
        {"preshared_key": ""},
    ):
        changed = diff(result.desired, kernel_with(only_first(**changes)))
        assert [op.public_key for op in changed if isinstance(op, SetPeer)] == [first], changes
    # Equal fields in other objects: judged in full, and still nothing to do.
    copied = kernel_with(
        lambda p: replace(p, allowed_ips=tuple(p.allowed_ips), rx_bytes=p.rx_bytes + 1)
    )
    assert not [op for op in diff(result.desired, copied) if isinstance(op, SetPeer)]
