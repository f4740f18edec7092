"""A side's binds (relay.client) against the real relay thread (relay.server), both on fake
transports joined by a tiny network: both sides of a pair end bound on the ports relay.ports
gives them and the relay forwards the pair; a relay that stays silent, refuses, or answers
with a foreign key is left for the next; bindings are renewed; a peer no longer wanted is
let go. tests/test_netns_relay.py runs the relay on raw sockets and the real table; the VM
suite (qemu-tests/test_nat.py) runs both in the agent."""

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
from kubespan.identity import node_id_for
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck.codec import pair_key
from kubespan.rawudp import Datagram
from kubespan.relay import bind
from kubespan.relay.choice import RelayOffer
from kubespan.relay.client import (
    ANSWER_WAIT,
    FAILED_FOR,
    KEEP_BOUND,
    MOVE_EVERY,
    NEARER_HOLD,
    REFRESH_SECONDS,
    UNPAIRED_REFRESH,
    UNPAIRED_WAIT,
    Bound,
    RelayChanged,
    RelayClient,
)
from kubespan.relay.forward import RelaySpec
from kubespan.relay.ports import PortRange, pair_ports
from kubespan.relay.server import RelayServer
from wgkeys import Keys

PORTS = PortRange(29100, 256)
RELAY_AT = ipaddress.ip_address("203.0.113.30")
SILENT_AT = ipaddress.ip_address("203.0.113.31")
NEAR_AT = ipaddress.ip_address("203.0.113.33")  # a second relay that answers
A_AT = Endpoint.parse("198.51.100.1:40000")  # side A's NAT mapping
B_AT = Endpoint.parse("192.0.2.2:51820")
WAIT = 5.0
CLUSTER = ClusterKeys.derive("relay-client", os.urandom(32))


class Wire:
    """One end of the network: what is sent is delivered by the Net."""

    def __init__(self, net: Net, at: Endpoint | IPAddress) -> None:
        self.net, self.at = net, at
        self.incoming: queue.Queue[Datagram] = queue.Queue()
        self.sent = 0
        self.payloads: list[bytes] = []
        self.destinations: list[Endpoint] = []

    def send(
        self,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None = None,
        source_port: int | None = None,
    ) -> None:
        self.sent += 1
        self.payloads.append(payload)
        self.destinations.append(destination)
        self.net.deliver(self, destination, payload, source, source_port)

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None:
        try:
            return self.incoming.get(timeout=min(timeout, 0.02))
        except queue.Empty:
            return None

    def close(self) -> None:
        pass


class Net:
    def __init__(self) -> None:
        self.sides: dict[Endpoint, Wire] = {}
        self.relay: Wire | None = None
        self.other_relays: dict[IPAddress, Wire] = {}
        self.lose_leaves = False  # the network loses every BIND marked leaving
        self.lock = threading.Lock()

    def deliver(
        self,
        sender: Wire,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None,
        source_port: int | None,
    ) -> None:
        with self.lock:
            relays = dict(self.other_relays)
            if self.relay is not None:
                relays[RELAY_AT] = self.relay
            if sender in relays.values():
                wire = self.sides.get(destination)
                if wire is not None and source is not None:
                    wire.incoming.put(Datagram(Endpoint(source, source_port or 0), payload, None))
            elif destination.address in relays:
                assert isinstance(sender.at, Endpoint)
                if self.lose_leaves and bind.parse(payload).leaving:
                    return
                relays[destination.address].incoming.put(
                    Datagram(sender.at, payload, destination.address, destination.port)
                )


class Forwarder:
    def __init__(self) -> None:
        self.applied: list[RelaySpec] = []

    def apply(self, spec: RelaySpec) -> bool:
        self.applied.append(spec)
        return True

    def teardown(self) -> None:
        pass

    def close(self) -> None:
        pass


class Lab:
    def __init__(self) -> None:
        self.net = Net()
        self.clock = [1000.0]
        self.relay, self.a, self.b = Keys(), Keys(), Keys()
        self.forwarder = Forwarder()
        self.server = self._server(self.relay, self._relay_wire)
        self.other_servers: list[RelayServer] = []
        self.events: dict[bytes, queue.Queue[object]] = {}
        self.clients = {
            keys.public: self._client(keys, at) for keys, at in ((self.a, A_AT), (self.b, B_AT))
        }

    def now(self) -> float:
        return self.clock[0]

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock on in steps, letting the threads take each (as real time would)."""
        end = self.clock[0] + seconds
        while self.clock[0] < end:
            self.clock[0] = min(end, self.clock[0] + step)
            time.sleep(0.03)

    def _relay_wire(self) -> Wire:
        self.net.relay = Wire(self.net, RELAY_AT)
        return self.net.relay

    def _server(self, keys: Keys, wire: Callable[[], Wire]) -> RelayServer:
        server = RelayServer(
            keys.private,
            keys.public,
            CLUSTER.relay_bind_key,
            PORTS,
            max_pairs=8,
            forwarder=self.forwarder,  # type: ignore[arg-type]
            transport=wire,
            monotonic=self.now,
            wall_ms=lambda: int(self.clock[0] * 1000),
        )
        server.set_members([self.a.public, self.b.public])
        return server

    def add_relay(self, at: IPAddress) -> RelayOffer:
        """Another relay that answers, at `at`, running: its offer."""
        keys = Keys()
        self.net.other_relays[at] = Wire(self.net, at)
        server = self._server(keys, lambda: self.net.other_relays[at])
        self.other_servers.append(server)
        server.start()
        assert server.ready.wait(WAIT)
        return self.offer(keys, at)

    def _client(self, keys: Keys, at: Endpoint) -> RelayClient:
        wire = Wire(self.net, at)
        self.net.sides[at] = wire
        events: queue.Queue[object] = queue.Queue()
        self.events[keys.public] = events
        return RelayClient(
            events,
            51820,
            keys.private,
            keys.public,
            CLUSTER.relay_bind_key,
            transport=lambda: wire,
            monotonic=self.now,
            wall_ms=lambda: int(self.clock[0] * 1000),
        )

    def offer(self, keys: Keys | None = None, at: IPAddress = RELAY_AT) -> RelayOffer:
        relay = keys or self.relay
        return RelayOffer(relay.public, node_id_for(relay.public), "relay", at, PORTS)

    def want_pair(self, *offers: RelayOffer) -> None:
        self.clients[self.a.public].want({self.b.public: offers})
        self.clients[self.b.public].want({self.a.public: offers})

    def bound(self, side: Keys) -> Endpoint | None:
        other = self.b if side is self.a else self.a
        found = self.clients[side.public].bound().get(other.public)
        return found.endpoint if found else None


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    made.server.start()
    assert made.server.ready.wait(WAIT)
    for client in made.clients.values():
        client.start()
    yield made
    for client in made.clients.values():
        client.stop()
    for server in (made.server, *made.other_servers):
        server.stop()
    for client in made.clients.values():
        client.join(WAIT)
    for server in (made.server, *made.other_servers):
        server.join(WAIT)


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def ports_of(lab: Lab, side: Keys, peer: Keys) -> int:
    return pair_ports(PORTS, lab.relay.public, side.public, peer.public, 0)[0]


def test_both_sides_bind_their_ports_and_the_relay_forwards_the_pair(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a) and lab.bound(lab.b), "both sides bound")
    assert lab.bound(lab.a) == Endpoint(RELAY_AT, ports_of(lab, lab.a, lab.b))
    assert lab.bound(lab.b) == Endpoint(RELAY_AT, ports_of(lab, lab.b, lab.a))
    wait_for(lambda: lab.server.forwarding().pairs, "the pair forwarded")
    (pair,) = lab.server.forwarding().pairs
    assert {pair.first.mapping, pair.second.mapping} == {A_AT, B_AT}
    assert isinstance(lab.events[lab.a.public].get(timeout=WAIT), RelayChanged)


def test_a_binding_is_renewed_before_the_relay_forgets_it(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a) and lab.bound(lab.b), "both sides bound")
    wait_paired(lab)
    sent = lab.net.sides[A_AT].sent
    lab.advance(REFRESH_SECONDS + 0.1)
    wait_for(lambda: lab.net.sides[A_AT].sent > sent, "a renewal")
    time.sleep(0.1)  # the renewal's answer: the binding stays, never dropped meanwhile
    assert lab.bound(lab.a) == Endpoint(RELAY_AT, ports_of(lab, lab.a, lab.b))


def test_a_silent_relay_is_left_for_the_next_and_not_asked_again_for_a_while(lab: Lab) -> None:
    silent = Keys()
    lab.want_pair(lab.offer(silent, SILENT_AT), lab.offer())
    # Both sides' first binds are out before the clock moves: a side that sent later would
    # wait for the silent relay past the end of the advance.
    wait_for(
        lambda: lab.net.sides[A_AT].sent >= 1 and lab.net.sides[B_AT].sent >= 1,
        "both sides' binds to the silent relay",
    )
    assert lab.bound(lab.a) is None
    lab.advance(ANSWER_WAIT + 0.1)
    wait_for(lambda: lab.bound(lab.a) and lab.bound(lab.b), "both bound at the next relay")
    assert lab.clients[lab.a.public].bound()[lab.b.public].relay.public_key == lab.relay.public
    wait_paired(lab)
    lab.advance(FAILED_FOR / 2)  # the silent one failed lately: still not asked
    time.sleep(0.1)
    assert lab.clients[lab.a.public].bound()[lab.b.public].relay.public_key == lab.relay.public


def test_only_an_answer_with_the_relays_key_and_the_rounds_id_is_believed(lab: Lab) -> None:
    lab.net.relay = None  # the relay hears nothing: only forged answers reach A
    lab.clients[lab.a.public].want({lab.b.public: (lab.offer(),)})
    wait_for(lambda: lab.net.sides[A_AT].payloads, "a bind")
    sent = bind.parse(lab.net.sides[A_AT].payloads[0])
    port = ports_of(lab, lab.a, lab.b)

    def answer(key: bytes, transaction: bytes) -> None:
        bound = bind.BindMessage(
            bind.Kind.BOUND,
            lab.relay.public,
            lab.b.public,
            0,
            int(lab.clock[0] * 1000),
            transaction,
            observed=A_AT,
        )
        lab.net.sides[A_AT].incoming.put(
            Datagram(Endpoint(RELAY_AT, port), bind.encode(bound, key), None)
        )

    right = pair_key(lab.relay.private, lab.a.public, lab.relay.public, CLUSTER.relay_bind_key)
    answer(os.urandom(32), sent.transaction_id)  # not the relay's key
    answer(right, os.urandom(12))  # not this round's transaction
    time.sleep(0.2)
    assert lab.bound(lab.a) is None
    answer(right, sent.transaction_id)
    wait_for(lambda: lab.bound(lab.a) == Endpoint(RELAY_AT, port), "the true answer believed")


def test_a_refusing_relay_is_left(lab: Lab) -> None:
    lab.server.set_members([lab.a.public])  # B unknown to the relay: UNKNOWN_PEER for A
    lab.clients[lab.a.public].want({lab.b.public: (lab.offer(),)})
    wait_for(lambda: lab.net.sides[A_AT].sent >= 1, "a bind")
    wait_for(lambda: lab.net.relay is not None and lab.net.relay.sent >= 1, "the refusal")
    time.sleep(0.1)
    assert lab.bound(lab.a) is None
    sent = lab.net.sides[A_AT].sent
    lab.advance(ANSWER_WAIT)
    time.sleep(0.1)
    assert lab.net.sides[A_AT].sent == sent  # failed for FAILED_FOR: not asked again


def test_a_peer_no_longer_wanted_is_let_go(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a), "A bound")
    lab.clients[lab.a.public].want({})
    wait_for(lambda: lab.bound(lab.a) is None, "A's binding let go")


def test_a_binding_given_up_is_released_and_the_relay_stops_at_once(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_paired(lab)
    wait_for(lambda: lab.server.forwarding().pairs, "the pair forwarded")
    lab.advance(1.0)  # a leave must be newer than the side's last bind
    lab.clients[lab.a.public].want({})
    # The binding's 60 s are far from over: the leave alone stops the pair.
    wait_for(lambda: not lab.server.forwarding().pairs, "the forwarding stopped")


def test_a_move_whose_relay_dies_goes_back_to_the_relay_it_left(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_paired(lab)
    near = lab.add_relay(NEAR_AT)
    order = (near, lab.offer())
    for side, peer in ((lab.a, lab.b), (lab.b, lab.a)):
        lab.clients[side.public].want({peer.public: order}, nearer=frozenset({peer.public}))
    wire = lab.net.sides[A_AT]
    lab.advance(NEARER_HOLD + 1.0)
    wait_for(lambda: wire.destinations[-1].address == NEAR_AT, "the move")
    lab.advance(1.0)
    del lab.net.other_relays[NEAR_AT]  # it dies while the move is confirmed
    # Past the time the binding left would lapse unrenewed: the pair must be bound there
    # again, not showing the dead relay.
    until = lab.now() + KEEP_BOUND + 10.0
    while lab.now() < until:
        shown = [
            lab.clients[s.public].bound().get(p.public) for s, p in ((lab.a, lab.b), (lab.b, lab.a))
        ]
        assert all(b is not None and b.relay != near for b in shown), f"{shown} at {lab.now()}"
        lab.advance(0.5)
    wait_paired(lab)
    assert lab.bound(lab.a) == Endpoint(RELAY_AT, ports_of(lab, lab.a, lab.b))


def wait_paired(lab: Lab) -> None:
    """Both sides told the pair is forwarded (the first to bind hears it at a renewal)."""

    def paired(side: Keys, peer: Keys) -> bool:
        found = lab.clients[side.public].bound().get(peer.public)
        return found is not None and found.paired

    deadline = time.monotonic() + WAIT
    while not (paired(lab.a, lab.b) and paired(lab.b, lab.a)):
        assert time.monotonic() < deadline, "timed out waiting for both sides paired"
        lab.advance(0.5)


def test_both_sides_learn_that_the_pair_is_forwarded(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a) and lab.bound(lab.b), "both sides bound")
    wait_paired(lab)


def test_a_side_bound_alone_moves_on_the_higher_key_first(lab: Lab) -> None:
    other = Keys()
    lab.server.set_members([lab.a.public, lab.b.public])
    higher, lower = sorted((lab.a, lab.b), key=lambda k: k.public, reverse=True)
    # Only the higher side wants the pair: it is bound alone, and leaves after UNPAIRED_WAIT.
    lab.clients[higher.public].want({lower.public: (lab.offer(), lab.offer(other, SILENT_AT))})
    wait_for(lambda: lab.bound(higher), "the higher side bound")
    lab.advance(UNPAIRED_WAIT + 1.0)
    wait_for(lambda: lab.bound(higher) is None, "the higher side to leave the relay")


@pytest.mark.parametrize("side", ["higher", "lower"])
def test_a_side_alone_at_its_only_relay_stays_until_the_other_side_comes(
    lab: Lab, side: str
) -> None:
    """After a relay died, each side moves to the one left when it finds the pair dead,
    seconds apart: the first there must not give it up (and shun it for FAILED_FOR) for
    want of the other side, with nowhere else to go."""
    lab.server.set_members([lab.a.public, lab.b.public])
    higher, lower = sorted((lab.a, lab.b), key=lambda k: k.public, reverse=True)
    first, late = (higher, lower) if side == "higher" else (lower, higher)
    died = lab.offer(Keys(), SILENT_AT)
    relay = lab.offer()
    first_client = lab.clients[first.public]
    first_client.want({late.public: (died, relay)}, failing=frozenset({late.public}))
    first_client.want({late.public: (relay,)})  # the dead relay's member found dead too
    wait_for(lambda: lab.bound(first), "the first side bound alone")
    lab.advance(3 * UNPAIRED_WAIT + 5.0)
    assert lab.bound(first) is not None, "the only relay left was given up"
    lab.clients[late.public].want({first.public: (relay,)})
    wait_for(lambda: lab.bound(late), "the late side bound")

    def paired(one: Keys, other: Keys) -> bool:
        found = lab.clients[one.public].bound().get(other.public)
        return found is not None and found.paired

    deadline = time.monotonic() + WAIT
    while not (paired(first, late) and paired(late, first)):
        assert time.monotonic() < deadline, "the sides never met at the relay left"
        lab.advance(0.5)


def test_a_side_not_yet_paired_follows_its_order_at_once(lab: Lab) -> None:
    """Records that reach the sides at different moments can rank the relays differently
    for a while: a side bound alone goes where its order now points, without waiting out
    UNPAIRED_WAIT; the pair meets there."""
    near = lab.add_relay(NEAR_AT)
    far = lab.offer()
    lab.clients[lab.a.public].want({lab.b.public: (far, near)})  # A's records are behind
    wait_for(lambda: lab.bound(lab.a), "A bound alone")
    assert lab.clients[lab.a.public].bound()[lab.b.public].relay == far
    started = lab.now()
    lab.clients[lab.b.public].want({lab.a.public: (near, far)})
    lab.clients[lab.a.public].want({lab.b.public: (near, far)})  # now A sees them too

    def paired_at(side: Keys, peer: Keys) -> bool:
        found = lab.clients[side.public].bound().get(peer.public)
        return found is not None and found.paired and found.relay == near

    deadline = time.monotonic() + WAIT
    while not (paired_at(lab.a, lab.b) and paired_at(lab.b, lab.a)):
        assert time.monotonic() < deadline, "the sides did not meet at the first relay"
        lab.advance(0.5)
    assert lab.now() - started < UNPAIRED_WAIT, "A waited out its patience where it was"


def test_a_relay_the_agent_says_forwards_nothing_is_left(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a), "A bound")
    lab.clients[lab.a.public].want(
        {lab.b.public: (lab.offer(),)}, failing=frozenset({lab.b.public})
    )
    wait_for(lambda: lab.bound(lab.a) is None, "the relay left")


def test_unanswered_renewals_keep_the_binding_while_the_relay_holds_it(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_for(lambda: lab.bound(lab.a) and lab.bound(lab.b), "both sides bound")
    wait_paired(lab)
    kept = lab.bound(lab.a)
    lab.net.relay = None  # the relay goes quiet
    lab.advance(KEEP_BOUND - 10.0)
    assert lab.bound(lab.a) == kept
    lab.advance(20.0)
    wait_for(lambda: lab.bound(lab.a) is None, "the binding given up")


def test_a_pair_told_of_a_much_nearer_relay_moves_there_without_a_gap_or_back(lab: Lab) -> None:
    lab.want_pair(lab.offer())
    wait_paired(lab)
    side_a, at_relay = lab.clients[lab.a.public], lab.bound(lab.a)
    wire = lab.net.sides[A_AT]
    near = lab.offer(Keys(), SILENT_AT)
    # First in the order, but not said to be much nearer: the pair stays where it works.
    side_a.want({lab.b.public: (near, lab.offer())})
    sent = wire.sent
    lab.advance(REFRESH_SECONDS + 0.1)
    wait_for(lambda: wire.sent > sent, "a renewal")
    assert lab.bound(lab.a) == at_relay
    assert all(d.address == RELAY_AT for d in wire.destinations)
    # Much nearer, once the agent has said so for NEARER_HOLD: A binds there (it stays
    # silent), and meanwhile the relay it left, which still forwards the pair, is what the
    # agent sets: no gap.
    side_a.want({lab.b.public: (near, lab.offer())}, nearer=frozenset({lab.b.public}))
    lab.advance(NEARER_HOLD - 1.0)
    assert all(d.address == RELAY_AT for d in wire.destinations)
    lab.advance(2.0)
    wait_for(lambda: wire.destinations[-1].address == SILENT_AT, "a bind to the nearer relay")
    assert lab.bound(lab.a) == at_relay
    # It never answers: failed, A binds at the relay it left again, and stays (the nearer
    # one failed a move: not tried again for long).
    sent = wire.sent
    lab.advance(ANSWER_WAIT + 0.1)
    wait_for(lambda: wire.destinations[-1].address == RELAY_AT and wire.sent > sent, "rebind")
    assert lab.bound(lab.a) == at_relay
    lab.advance(MOVE_EVERY, step=5.0)  # no move is held back by the rate any more
    # Nor to the next of the order, which nobody found nearer (the other side would not
    # go there).
    third = lab.offer(Keys(), ipaddress.ip_address("203.0.113.32"))
    side_a.want({lab.b.public: (near, third, lab.offer())}, nearer=frozenset({lab.b.public}))
    sent = wire.sent
    lab.advance(2 * REFRESH_SECONDS + 1.0, step=5.0)
    wait_for(lambda: wire.sent > sent + 1, "renewals")
    assert {d.address for d in wire.destinations[sent:]} == {RELAY_AT}
    assert lab.bound(lab.a) == at_relay


def test_a_pair_that_leaves_and_comes_back_remembers_the_relay_that_failed_it(lab: Lab) -> None:
    """Pairs come and go from what the agent wants (up directly for a while, a state that
    flapped): what a pair learned must survive that, or a relay that failed a move is tried
    again at once, and a pair moves on every return."""
    lab.want_pair(lab.offer())
    wait_paired(lab)
    side_a = lab.clients[lab.a.public]
    wire = lab.net.sides[A_AT]
    near = lab.offer(Keys(), SILENT_AT)
    side_a.want({lab.b.public: (near, lab.offer())}, nearer=frozenset({lab.b.public}))
    lab.advance(NEARER_HOLD + 1.0)
    wait_for(lambda: wire.destinations[-1].address == SILENT_AT, "a bind to the nearer relay")
    sent = wire.sent
    lab.advance(ANSWER_WAIT + 0.1)
    wait_for(lambda: wire.destinations[-1].address == RELAY_AT and wire.sent > sent, "rebind")
    # No longer wanted, then wanted again, the nearer relay first in the order.
    side_a.want({})
    wait_for(lambda: lab.bound(lab.a) is None, "the pair let go")
    sent = wire.sent
    side_a.want({lab.b.public: (near, lab.offer())}, nearer=frozenset({lab.b.public}))
    wait_for(lambda: wire.sent > sent, "a bind on its return")
    lab.advance(REFRESH_SECONDS, step=5.0)
    assert {d.address for d in wire.destinations[sent:]} == {RELAY_AT}


@pytest.mark.parametrize(
    ("told_later", "leaves_lost"), [(0.0, False), (13.0, False), (45.0, False), (13.0, True)]
)
def test_a_move_the_other_side_does_not_follow_is_tried_again_until_it_does(
    lab: Lab, told_later: float, leaves_lost: bool
) -> None:
    """The higher key finds a relay much nearer first and moves there; the lower one finds
    it `told_later` (at once, or as the higher goes back: its leave may not reach the relay,
    which then says "paired" to the lower for a while). Nothing is wrong with the relay: the
    pair must not shun it for MOVE_FAILED_FOR (each side's failed move would block the
    other's), the sides' tries must meet, and meanwhile both sides always show a binding
    (no gap), never two different relays for longer than a renewal takes."""
    lab.net.lose_leaves = leaves_lost
    lab.want_pair(lab.offer())
    wait_paired(lab)
    near = lab.add_relay(NEAR_AT)
    order = (near, lab.offer())
    higher, lower = sorted((lab.a, lab.b), key=lambda k: k.public, reverse=True)
    lab.clients[lower.public].want({higher.public: order})
    lab.clients[higher.public].want({lower.public: order}, nearer=frozenset({lower.public}))
    clock_at_start = lab.now()
    told = False

    def shown(side: Keys, peer: Keys) -> Bound | None:
        return lab.clients[side.public].bound().get(peer.public)

    apart_since: float | None = None
    deadline = lab.now() + 5 * (60.0 + 3 * UNPAIRED_WAIT)
    while True:
        ours, theirs = shown(higher, lower), shown(lower, higher)
        assert ours is not None and theirs is not None, f"a gap at {lab.now()}"
        if ours.relay == theirs.relay:
            apart_since = None
            if ours.relay == near and ours.paired and theirs.paired:
                break  # moved, both sides
        elif apart_since is None:
            apart_since = lab.now()
        else:
            assert lab.now() - apart_since <= 2 * UNPAIRED_REFRESH + 2.0, "the sides split"
        assert lab.now() < deadline, "the sides' moves never met"
        if not told and lab.now() - clock_at_start >= told_later:
            lab.clients[lower.public].want(
                {higher.public: order}, nearer=frozenset({higher.public})
            )
            told = True
        lab.advance(0.5)
    # Only the relay moved to: nothing was failed on the way.
    for side in (lab.clients[higher.public], lab.clients[lower.public]):
        assert all(not pair.failed for pair in side._pairs.values())


def test_a_relay_passed_over_for_want_of_the_other_side_takes_the_pair_when_the_next_dies(
    lab: Lab,
) -> None:
    """The higher side, bound alone, walks on from the first relay (the lower side came
    later, to the second); the pair is forwarded there; then that relay dies. The first one
    is where both sides go now: at once, not after FAILED_FOR, though it was left lately."""
    near = lab.add_relay(NEAR_AT)
    far = lab.offer()
    higher, lower = sorted((lab.a, lab.b), key=lambda k: k.public, reverse=True)
    lab.clients[higher.public].want({lower.public: (far, near)})
    wait_for(lambda: lab.bound(higher) == Endpoint(RELAY_AT, ports_of(lab, higher, lower)), "far")
    lab.advance(UNPAIRED_WAIT + 1.0)
    wait_for(lambda: (b := lab.bound(higher)) is not None and b.address == NEAR_AT, "walked on")
    lab.clients[lower.public].want({higher.public: (near, far)})

    def paired_at(relay: RelayOffer) -> bool:
        found = [
            lab.clients[s.public].bound().get(p.public)
            for s, p in ((higher, lower), (lower, higher))
        ]
        return all(f is not None and f.paired and f.relay == relay for f in found)

    deadline = time.monotonic() + WAIT
    while not paired_at(near):
        assert time.monotonic() < deadline, "the pair never met at the second relay"
        lab.advance(0.5)
    died = lab.now()
    # The agents find the pair dead through it (its member is dead too): each side leaves.
    lab.clients[higher.public].want({lower.public: (near, far)}, failing=frozenset({lower.public}))
    lab.clients[lower.public].want({higher.public: (near, far)}, failing=frozenset({higher.public}))
    deadline = time.monotonic() + WAIT
    while not paired_at(far):
        assert time.monotonic() < deadline, "the pair never met at the relay passed over"
        lab.advance(0.5)
    assert lab.now() - died < FAILED_FOR / 2, "the relay passed over was shunned as failed"
