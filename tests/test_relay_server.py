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
from kubespan.relay.bindings import BIND_LIFETIME_SECONDS
from kubespan.relay.forward import RelaySpec
from kubespan.relay.ports import PortRange, pair_ports
from kubespan.relay.server import READS_PER_TURN, RelayServer
from wgkeys import Keys

PORTS = PortRange(51821, 1000)
RELAY_AT = ipaddress.ip_address("203.0.113.30")
A_AT = Endpoint.parse("198.51.100.1:40000")
B_AT = Endpoint.parse("192.0.2.2:51820")
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
        self.relay, self.a, self.b = Keys(), Keys(), Keys()
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
        self.server.set_members([self.a.public, self.b.public])

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
    ) -> bytes:
        port = pair_ports(PORTS, self.relay.public, side.public, peer.public, 0)[0]
        message = bind.BindMessage(
            bind.Kind.BIND,
            side.public,
            peer.public,
            0,
            int(self.clock[0] * 1000) if time_ms is None else time_ms,
            os.urandom(12),
        )
        key = pair_key(side.private, self.relay.public, side.public, bind_key)
        payload = bind.encode(message, key)
        self.transport.incoming.put(Datagram(source, payload, to, port))
        return payload


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
    count = 3 * READS_PER_TURN + 5
    lab.transport.open.clear()
    sources = [Endpoint.parse(f"198.51.100.{1 + i}:{40000 + i}") for i in range(count)]
    for i, source in enumerate(sources):
        lab.bind(lab.a, lab.b, source, time_ms=int(lab.clock[0] * 1000) + i)
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
