"""The relay's thread (relay.server) with a fake transport and forwarder: who gets answers,
what a stream of junk costs, what an answer that cannot be sent costs, and pairs lapsing.
tests/test_netns_relay.py runs it on raw sockets and the real table."""

from __future__ import annotations

import ipaddress
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kubespan.crypto import ClusterKeys
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck.codec import pair_key
from kubespan.rawudp import Datagram
from kubespan.relay import bind
from kubespan.relay.bindings import BIND_LIFETIME_SECONDS, CLOCK_SKEW_MS, REMEMBER_SECONDS
from kubespan.relay.forward import RelaySpec
from kubespan.relay.ports import PortRange, pair_ports
from kubespan.relay.server import (
    ANSWER_BURST_OVERALL,
    ANSWER_BURST_PER_SIDE,
    ANSWER_BURST_PER_SOURCE,
    ANSWERED_FOR_SECONDS,
    READS_PER_TURN,
    STALE_EVERY_SECONDS,
    RelayServer,
)
from wgkeys import Keys

PORTS = PortRange(51821, 1000)
RELAY_AT = ipaddress.ip_address("203.0.113.30")
RELAY6_AT = ipaddress.ip_address("2001:db8::30")  # the raw socket hears both families
A_AT = Endpoint.parse("198.51.100.1:40000")
B_AT = Endpoint.parse("192.0.2.2:51820")
C_AT = Endpoint.parse("192.0.2.3:51820")
# More copies than the overall budget holds: before the fix they emptied it.
FLOOD = int(ANSWER_BURST_OVERALL) + 200
WAIT = 5.0
CLUSTER = ClusterKeys.derive("relay-server", os.urandom(32))


class FakeTransport:
    def __init__(self) -> None:
        self.incoming: queue.Queue[Datagram] = queue.Queue()
        self.sent: list[tuple[Endpoint, bytes, IPAddress | None, int | None]] = []
        self.sends_to_fail = 0
        self.closed = False
        self.open = threading.Event()  # cleared: the relay reads nothing until it is set
        self.open.set()

    def send(
        self,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None = None,
        source_port: int | None = None,
    ) -> None:
        if self.sends_to_fail:
            self.sends_to_fail -= 1
            raise OSError(22, "Invalid argument")
        self.sent.append((destination, payload, source, source_port))

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None:
        if not self.open.wait(min(timeout, 0.02)):
            return None
        try:
            return self.incoming.get(timeout=min(timeout, 0.02))
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed = True


class FakeForwarder:
    def __init__(self) -> None:
        self.applied: list[RelaySpec] = []
        self.torn_down = False

    def apply(self, spec: RelaySpec) -> bool:
        self.applied.append(spec)
        return True

    def teardown(self) -> None:
        self.torn_down = True

    def close(self) -> None:
        pass


class Lab:
    def __init__(self) -> None:
        self.relay, self.a, self.b, self.c, self.d = Keys(), Keys(), Keys(), Keys(), Keys()
        self.clock = [1000.0]
        self.transports: list[FakeTransport] = []
        self.forwarder = FakeForwarder()
        self.server = RelayServer(
            self.relay.private,
            self.relay.public,
            CLUSTER.relay_bind_key,
            PORTS,
            max_pairs=8,
            forwarder=self.forwarder,  # type: ignore[arg-type]
            transport=self.open,
            monotonic=lambda: self.clock[0],
            wall_ms=lambda: int(self.clock[0] * 1000),
        )
        self.members = [self.a, self.b, self.c, self.d]
        self.markers = 0
        self.server.set_members([k.public for k in self.members])

    def open(self) -> FakeTransport:
        transport = FakeTransport()
        self.transports.append(transport)
        return transport

    @property
    def transport(self) -> FakeTransport:
        return self.transports[-1]

    def bind(
        self,
        side: Keys,
        peer: Keys,
        source: Endpoint,
        bind_key: bytes = CLUSTER.relay_bind_key,
        time_ms: int | None = None,
        to: IPAddress = RELAY_AT,
        key: bytes | None = None,  # the pair key, when the caller has it already
    ) -> bytes:
        message = bind.BindMessage(
            bind.Kind.BIND,
            side.public,
            peer.public,
            0,
            int(self.clock[0] * 1000) if time_ms is None else time_ms,
            os.urandom(12),
        )
        key = key or pair_key(side.private, self.relay.public, side.public, bind_key)
        payload = bind.encode(message, key)
        self.replay(payload, source, to)
        return payload

    def replay(self, payload: bytes, source: Endpoint, to: IPAddress = RELAY_AT) -> None:
        """A bind, whoever sent it, to the port it names (a copy keeps the original's)."""
        message = bind.parse(payload)
        port = pair_ports(PORTS, self.relay.public, message.sender, message.peer, 0)[0]
        self.transport.incoming.put(Datagram(source, payload, to, port))

    def marker(self) -> None:
        """A real member's fresh bind, put last: once it is answered, all before it were
        taken (the relay reads in order). Unanswered, the test fails at the deadline."""
        self.markers += 1  # each newer than C's last, at the same clock: nothing refills
        before = len(answers(self, C_AT))
        self.bind(self.c, self.d, C_AT, time_ms=int(self.clock[0] * 1000) + self.markers)
        wait_for(lambda: len(answers(self, C_AT)) > before, "a real member's fresh bind answered")


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    made.server.start()
    assert made.server.ready.wait(WAIT)
    yield made
    made.server.stop()
    made.server.join(WAIT)


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def answers(lab: Lab, to: Endpoint) -> list[bind.BindMessage]:
    return [bind.parse(payload) for (where, payload, _, _) in lab.transport.sent if where == to]


def test_two_bound_sides_are_forwarded_and_each_answered_from_its_port(lab: Lab) -> None:
    lab.bind(lab.a, lab.b, A_AT)
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair to be forwarded")
    (pair,) = lab.forwarder.applied[-1].pairs
    assert {pair.first.mapping, pair.second.mapping} == {A_AT, B_AT}
    a_port = pair_ports(PORTS, lab.relay.public, lab.a.public, lab.b.public, 0)[0]
    (to_a,) = [s for s in lab.transport.sent if s[0] == A_AT]
    assert (to_a[2], to_a[3]) == (RELAY_AT, a_port)
    assert bind.parse(to_a[1]).kind == bind.Kind.BOUND


def test_strangers_junk_and_forgeries_get_nothing_and_cost_no_table(lab: Lab) -> None:
    applied = len(lab.forwarder.applied)
    stranger = Keys()
    lab.bind(stranger, lab.b, A_AT)  # not a member
    lab.bind(lab.a, lab.b, A_AT, bind_key=os.urandom(32))  # a member's key, not the cluster's
    for _ in range(200):
        junk = bind.TAG.to_bytes(4, "big") + os.urandom(122)
        lab.transport.incoming.put(Datagram(A_AT, junk, RELAY_AT, 51900))
    marker = lab.bind(lab.a, lab.b, Endpoint.parse("198.51.100.9:9"))  # one real bind last
    wait_for(lambda: len(lab.transport.sent) == 1, "the real bind's answer")
    assert lab.transport.sent[0][0] == Endpoint.parse("198.51.100.9:9"), marker
    # Only the real bind changed a binding, and a one-sided one forwards nothing: no table.
    assert len(lab.forwarder.applied) == applied


def test_a_burst_of_binds_longer_than_a_turn_is_answered_whole(lab: Lab) -> None:
    # Every bind waits in the socket before the relay reads one: the relay takes them over
    # several turns (READS_PER_TURN each) and must answer all of them.
    # One bind each of many sides (one side's would be held to its own budget).
    count = 3 * READS_PER_TURN + 5
    sides = [Keys() for _ in range(count)]
    lab.server.set_members([k.public for k in (*lab.members, *sides)])
    lab.transport.open.clear()
    sources = [Endpoint.parse(f"198.51.100.{1 + i}:{40000 + i}") for i in range(count)]
    for side, source in zip(sides, sources, strict=True):
        lab.bind(side, lab.b, source)
    lab.transport.open.set()
    wait_for(lambda: len(lab.transport.sent) == count, f"{count} answers")
    assert [where for (where, _, _, _) in lab.transport.sent] == sources


def test_an_answer_that_cannot_be_sent_costs_only_itself(lab: Lab) -> None:
    lab.transport.sends_to_fail = 1
    lab.bind(lab.a, lab.b, A_AT, to=ipaddress.ip_address("192.0.2.255"))
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: answers(lab, B_AT), "the next bind's answer")
    assert lab.transport.sends_to_fail == 0 and answers(lab, A_AT) == []
    assert len(lab.transports) == 1 and not lab.transport.closed  # never reopened


def test_broadcast_and_multicast_destinations_are_ignored(lab: Lab) -> None:
    lab.bind(lab.a, lab.b, A_AT, to=ipaddress.ip_address("255.255.255.255"))
    lab.bind(lab.a, lab.b, A_AT, to=ipaddress.ip_address("ff02::1"))
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: answers(lab, B_AT), "B's answer")
    assert answers(lab, A_AT) == []


def test_a_replay_is_not_answered(lab: Lab) -> None:
    payload = lab.bind(lab.a, lab.b, A_AT)
    wait_for(lambda: answers(lab, A_AT), "the first answer")
    elsewhere = Endpoint.parse("203.0.113.66:1234")
    port = pair_ports(PORTS, lab.relay.public, lab.a.public, lab.b.public, 0)[0]
    lab.transport.incoming.put(Datagram(elsewhere, payload, RELAY_AT, port))
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: answers(lab, B_AT), "B's answer")
    assert answers(lab, elsewhere) == []


def test_replays_of_an_old_bind_get_nothing_and_leave_members_their_answers(lab: Lab) -> None:
    """A bind copied once, replayed from endless sources to both of the relay's addresses,
    while its binding lives, after it lapsed, and after it is forgotten: no copy is answered
    (but STALE, once a minute, as a side with a skewed clock would be), and a real member's
    fresh bind still is."""
    captured = lab.bind(lab.a, lab.b, A_AT)
    wait_for(lambda: answers(lab, A_AT), "A's own bind answered")
    key = pair_key(lab.a.private, lab.relay.public, lab.a.public, CLUSTER.relay_bind_key)
    six_net = int(ipaddress.ip_address("2001:db8:1:2::"))

    def flood(to: IPAddress) -> list[Endpoint]:
        if to.version == 6:  # one /64 is endless sources, and no spoofing needed
            sources = [Endpoint(ipaddress.ip_address(six_net + i), 4444) for i in range(FLOOD)]
        else:
            sources = [Endpoint(ipaddress.ip_address(0x0A000000 + i), 4444) for i in range(FLOOD)]
        for source in sources:
            lab.replay(captured, source, to)
        return sources

    def answered(sources: list[Endpoint]) -> list[bind.BindMessage]:
        wanted = set(sources)
        return [bind.parse(p) for (where, p, _, _) in lab.transport.sent if where in wanted]

    bound_at = lab.clock[0]
    # Live, lapsed, and lapsed long (out of the clock window too, but still known a replay).
    for later in (1, BIND_LIFETIME_SECONDS + 1, REMEMBER_SECONDS - 1):
        lab.clock[0] = bound_at + later  # moved only once the relay took all sent before
        sources = flood(RELAY6_AT) + flood(RELAY_AT)
        lab.marker()
        assert answered(sources) == []
    # Forgotten: the copy looks like a bind from a side whose clock is off. Told STALE, to
    # whichever copy comes first (not at the IPv6 address, which relays nothing); told no
    # more while that answer is remembered, and then once a minute at most.
    stale = (bind.Kind.REFUSED, bind.Refusal.STALE)
    for later, told in (
        (0, 1),
        (STALE_EVERY_SECONDS + 1, 1),
        (ANSWERED_FOR_SECONDS + 1, 2),
        (ANSWERED_FOR_SECONDS + STALE_EVERY_SECONDS / 2, 2),
    ):
        lab.clock[0] = bound_at + REMEMBER_SECONDS + later
        sources = flood(RELAY6_AT) + flood(RELAY_AT)
        lab.marker()
        assert [(m.kind, m.reason) for m in answered(sources)] == [stale] * told
    # A's next bind, fresh, is answered: its copies spent nothing of its own.
    lab.bind(lab.a, lab.b, A_AT, key=key)
    wait_for(lambda: len(answers(lab, A_AT)) == 2, "A's fresh bind answered")
    assert answers(lab, A_AT)[-1].kind == bind.Kind.BOUND


def test_a_refused_bind_is_answered_once_not_at_every_copy(lab: Lab) -> None:
    stranger = Keys()  # not a member: every bind for it is refused UNKNOWN_PEER
    captured = lab.bind(lab.a, stranger, A_AT)
    wait_for(lambda: answers(lab, A_AT), "the refusal")
    (refusal,) = answers(lab, A_AT)
    assert refusal.reason == bind.Refusal.UNKNOWN_PEER
    copies = [Endpoint.parse(f"192.0.2.{n}:4444") for n in range(10, 60)]
    for source in copies:
        lab.replay(captured, source)
    lab.marker()
    assert [where for (where, _, _, _) in lab.transport.sent if where in copies] == []


def test_one_sides_flood_of_fresh_refused_binds_leaves_others_their_answers(lab: Lab) -> None:
    """A side (or whoever sends what it signed) binding for a peer the relay does not know,
    each bind fresh, from endless sources: it spends its own answers, not the others'."""
    stranger = Keys()
    key = pair_key(lab.a.private, lab.relay.public, lab.a.public, CLUSTER.relay_bind_key)
    now_ms = int(lab.clock[0] * 1000)
    sources = [Endpoint(ipaddress.ip_address(0x0A000000 + i), 4444) for i in range(FLOOD)]
    for i, source in enumerate(sources):
        lab.bind(lab.a, stranger, source, time_ms=now_ms - i, key=key)
    lab.marker()
    flooded = [where for (where, _, _, _) in lab.transport.sent if where in set(sources)]
    assert len(flooded) == int(ANSWER_BURST_PER_SIDE)
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: answers(lab, B_AT), "B's bind answered")


def test_ipv6_sources_in_one_64_share_a_bucket(lab: Lab) -> None:
    # The relay answers at IPv4 addresses only, but its limits go by the source alone: a
    # host is given a whole /64, and would otherwise be as many sources as it likes.
    net = int(ipaddress.ip_address("2001:db8:7:7::"))
    key = pair_key(lab.a.private, lab.relay.public, lab.a.public, CLUSTER.relay_bind_key)
    now_ms = int(lab.clock[0] * 1000)
    one_64 = [Endpoint(ipaddress.ip_address(net + (i << 40) + i), 4444) for i in range(30)]
    for i, source in enumerate(one_64):
        lab.bind(lab.a, lab.b, source, time_ms=now_ms + i, key=key)
    next_64 = Endpoint(ipaddress.ip_address(net + (1 << 64)), 4444)
    lab.bind(lab.a, lab.b, next_64, time_ms=now_ms + 100, key=key)
    wait_for(lambda: answers(lab, next_64), "the next /64's answer")
    answered = [where for (where, _, _, _) in lab.transport.sent if where in set(one_64)]
    assert answered == one_64[: int(ANSWER_BURST_PER_SOURCE)]


def test_a_skewed_clock_hears_stale_once_a_minute(lab: Lab) -> None:
    key = pair_key(lab.a.private, lab.relay.public, lab.a.public, CLUSTER.relay_bind_key)
    behind = int(lab.clock[0] * 1000) - CLOCK_SKEW_MS - 1

    def binds(count: int) -> None:
        for i in range(count):
            lab.bind(lab.a, lab.b, A_AT, time_ms=behind - i, key=key)
        lab.marker()

    binds(5)
    assert [m.reason for m in answers(lab, A_AT)] == [bind.Refusal.STALE]
    lab.clock[0] += STALE_EVERY_SECONDS - 1
    binds(5)
    assert len(answers(lab, A_AT)) == 1
    lab.clock[0] += 1
    binds(5)
    assert [m.reason for m in answers(lab, A_AT)] == [bind.Refusal.STALE] * 2
    # Another side's STALE is its own.
    lab.bind(lab.b, lab.a, B_AT, time_ms=behind)
    wait_for(lambda: answers(lab, B_AT), "B's STALE")


def test_a_pair_lapses_without_binds_and_the_table_follows(lab: Lab) -> None:
    lab.bind(lab.a, lab.b, A_AT)
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair")
    lab.clock[0] += BIND_LIFETIME_SECONDS + 1
    lab.server.set_members([lab.a.public, lab.b.public])  # a poke: the thread looks now
    wait_for(lambda: not lab.server.forwarding().pairs, "the pair to lapse")
    assert lab.forwarder.applied[-1].pairs == ()


def test_a_member_that_leaves_is_unbound(lab: Lab) -> None:
    lab.bind(lab.a, lab.b, A_AT)
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair")
    lab.server.set_members([lab.a.public])
    wait_for(lambda: not lab.server.forwarding().pairs, "the pair to go")


def test_a_renumbered_relay_stops_the_pairs_bound_at_its_old_address(lab: Lab) -> None:
    """The agent says the node's addresses; a pair bound at one the node no longer has is
    not forwarded, and its side's binding there pairs no one: its peer, binding at the new
    address, hears it is alone until the side binds there too. An address the relay was
    never told of (a bind faster than the agent's pass) loses nothing."""
    new_at = ipaddress.ip_address("203.0.113.31")
    lab.server.set_own_addresses([RELAY_AT])
    lab.bind(lab.a, lab.b, A_AT)
    lab.bind(lab.b, lab.a, B_AT)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair")
    lab.server.set_own_addresses([RELAY_AT, new_at])  # one more: nothing lapses
    lab.marker()
    assert lab.server.forwarding().pairs
    lab.server.set_own_addresses([new_at])
    wait_for(lambda: not lab.server.forwarding().pairs, "the pair at the old address to go")
    lab.clock[0] += 1
    lab.bind(lab.b, lab.a, B_AT, to=new_at)
    lab.marker()
    assert not answers(lab, B_AT)[-1].paired
    lab.bind(lab.a, lab.b, A_AT, to=new_at)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair at the new address")
    (pair,) = lab.server.forwarding().pairs
    assert {pair.relay_address(pair.first), pair.relay_address(pair.second)} == {new_at}
    assert answers(lab, A_AT)[-1].paired


def test_stopping_removes_the_table() -> None:
    made = Lab()
    made.server.start()
    assert made.server.ready.wait(WAIT)
    made.server.stop()
    made.server.join(WAIT)
    assert made.forwarder.torn_down and made.transport.closed


def test_join_before_start_returns() -> None:
    Lab().server.join(0.1)


def test_the_thread_lives_through_a_failing_table(lab: Lab) -> None:
    calls = threading.Event()

    def failing(spec: RelaySpec) -> bool:
        calls.set()
        raise RuntimeError("nft refused")

    lab.forwarder.apply = failing  # type: ignore[method-assign]
    lab.bind(lab.a, lab.b, A_AT)
    lab.bind(lab.b, lab.a, B_AT)
    assert calls.wait(WAIT)
    assert lab.server._thread.is_alive()
