"""The path checker thread on an in-memory network: members answer members, the answers
are recorded and reported, and nothing hostile (strangers, forgeries, replays, garbage,
floods, failing sockets) gets more out of it than the rate limits allow or stops it.

Most tests run in real time (the checkers are real threads) and wait for conditions with
deadlines. The schedule tests run one checker on a fake clock that its own transport moves
on whenever the checker waits, so the send times are exact."""

from __future__ import annotations

import base64
import errno
import ipaddress
import itertools
import os
import queue
import random
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from nacl.public import PrivateKey

from kubespan import rawthread
from kubespan.agent.backoff import Backoff
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck import checker as checker_module
from kubespan.pathcheck import codec
from kubespan.pathcheck.checker import (
    ANSWER_BURST_OVERALL,
    ANSWER_BURST_PER_SENDER,
    ANSWER_BURST_PER_SOURCE,
    ANSWER_RATE_PER_SOURCE,
    ANSWERS_PER_REQUEST,
    CHECK_AT,
    CHECK_SPAN,
    MAX_ENDPOINTS_PER_PEER,
    ROUND_TRIP_KEEP,
    ROUND_TRIPS_KEPT,
    SEEN_FOR_SECONDS,
    SEND_BUDGET,
    SEND_SLICE,
    PathAnswered,
    PathChecker,
)
from kubespan.rawudp import Datagram

from netlab import wait_until

CLUSTER = bytes(range(32))
PORT = 51820
PATIENCE = 5.0  # seconds a condition that should hold soon is given
POLL = 0.005

A_AT = Endpoint.parse("192.0.2.1:51820")
B_AT = Endpoint.parse("198.51.100.2:51820")
C_AT = Endpoint.parse("203.0.113.3:51820")
NOWHERE = Endpoint.parse("203.0.113.99:51820")  # nobody receives there
UNROUTABLE = Endpoint.parse("[2001:db8::99]:51820")  # sending there fails


@dataclass(frozen=True)
class Key:
    private: bytes
    public: bytes

    @property
    def name(self) -> str:
        return base64.b64encode(self.public).decode()

    @classmethod
    def generate(cls) -> Key:
        private = PrivateKey.generate()
        return cls(bytes(private), bytes(private.public_key))

    def pair(self, other: Key) -> bytes:
        return codec.pair_key(self.private, other.public, self.public, CLUSTER)


class Clock:
    """A monotonic clock that moves only when told to (a FakePort moves it up to `limit`)."""

    def __init__(self) -> None:
        self.now = 1000.0
        # Still until a test lets it run: a checker started before `run_until` bounds it
        # would otherwise wait its way past every deadline first (a race CI lost once).
        self.limit = self.now

    def run_until(self, at: float) -> None:
        """Let the checker's waits move the clock to `at`, and wait for that."""
        self.limit = at
        wait_until(lambda: self.now >= at, PATIENCE)

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Sent:
    at: float
    source: Endpoint
    destination: Endpoint
    payload: bytes
    # The source address the sender asked for (None: whichever routing picks).
    from_address: IPAddress | None = None


class Network:
    """Datagrams between fake transports by endpoint. `aliases` deliver what is sent to one
    endpoint to another's inbox (a NAT that maps differently inbound). Every datagram sent
    is recorded, with the time of `clock`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.inboxes: dict[Endpoint, queue.Queue[tuple[Endpoint, bytes]]] = {}
        self.aliases: dict[Endpoint, Endpoint] = {}
        # Parties the test plays: given who sent a datagram to them and what, their replies.
        self.responders: dict[Endpoint, Callable[[Endpoint, bytes], list[bytes]]] = {}
        self._sent: list[Sent] = []
        self.unroutable_tries = 0

    def deliver(
        self,
        source: Endpoint,
        destination: Endpoint,
        payload: bytes,
        from_address: IPAddress | None = None,
    ) -> None:
        with self._lock:
            self._sent.append(Sent(self.clock(), source, destination, payload, from_address))
            inbox = self.inboxes.get(self.aliases.get(destination, destination))
            responder = self.responders.get(destination)
        if inbox is not None:
            inbox.put((source, payload))
        if responder is not None:
            for reply in responder(source, payload):
                self.inboxes[source].put((destination, reply))

    def inject(self, source: Endpoint, destination: Endpoint, payload: bytes) -> None:
        """A datagram from anywhere (spoofed, or from a party the test plays itself)."""
        self.inboxes[destination].put((source, payload))

    def sent(
        self, source: Endpoint | None = None, destination: Endpoint | None = None
    ) -> list[Sent]:
        with self._lock:
            return [
                s
                for s in self._sent
                if source in (None, s.source) and destination in (None, s.destination)
            ]


class FakePort:
    """A DatagramTransport on the network. In real time, `receive` waits on its inbox and
    looks at `wake` between short waits; on a fake clock it moves the clock by `timeout`
    when the inbox is empty (the checker's wait passes at once)."""

    def __init__(self, network: Network, endpoint: Endpoint, clock: Clock | None) -> None:
        self.network = network
        self.endpoint = endpoint
        self.clock = clock
        self.inbox: queue.Queue[tuple[Endpoint, bytes]] = queue.Queue()
        network.inboxes[endpoint] = self.inbox
        self.closed = False
        self.fail_next_receive = False

    def send(
        self,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None = None,
        source_port: int | None = None,
    ) -> None:
        assert not self.closed, "sent on a closed transport"
        assert len(payload) == codec.MESSAGE_BYTES
        # Answers go out from the address their request came to: this port's.
        assert source in (None, self.endpoint.address), source
        if destination == UNROUTABLE:
            self.network.unroutable_tries += 1
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        self.network.deliver(self.endpoint, destination, payload, source)

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None:
        received = self.receive(timeout, wake)
        if received is None:
            return None
        return Datagram(received[0], received[1], self.endpoint.address)

    def receive(
        self, timeout: float, wake: socket.socket | None = None
    ) -> tuple[Endpoint, bytes] | None:
        assert not self.closed, "read from a closed transport"
        assert timeout >= 0
        if self.fail_next_receive:
            self.fail_next_receive = False
            raise OSError(errno.ENETDOWN, "Network is down")
        if self.clock is not None:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                step = min(timeout, self.clock.limit - self.clock.now)
                if step > 0:
                    self.clock.now += step
                time.sleep(0.0002 if step > 0 else POLL)  # let the test's thread run
                return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.inbox.get(timeout=max(0.0, min(POLL, deadline - time.monotonic())))
            except queue.Empty:
                pass
            if wake is not None and select.select([wake], [], [], 0)[0]:
                return None
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        self.closed = True


class Node:
    """A PathChecker at an endpoint of the network, with its own key and event queue."""

    def __init__(
        self,
        network: Network,
        endpoint: Endpoint,
        *,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        opener: Callable[[], FakePort] | None = None,
    ) -> None:
        self.network = network
        self.endpoint = endpoint
        self.clock = clock
        self.key = Key.generate()
        self.events: queue.Queue[Any] = queue.Queue()
        self.ports: list[FakePort] = []
        self.opens = 0
        self._opener = opener
        self.checker = PathChecker(
            self.events,
            PORT,
            self.key.private,
            self.key.public,
            CLUSTER,
            monotonic=clock if clock is not None else monotonic,
            random_bytes=random_bytes,
            transport=self.open,
        )
        # Where peers see its requests come from: this port (no NAT between them here).
        self.checker.set_own_addresses([endpoint.address])

    def open(self) -> FakePort:
        self.opens += 1
        port = (
            self._opener()
            if self._opener is not None
            else FakePort(self.network, self.endpoint, self.clock)
        )
        self.ports.append(port)
        return port

    @property
    def name(self) -> str:
        return self.key.name

    def request_from(self, sender: Key, tid: bytes | None = None) -> bytes:
        """A valid request from `sender` to this node."""
        return codec.request(sender.public, tid or os.urandom(12), sender.pair(self.key))

    def answered_to(self) -> list[Endpoint]:
        return [s.destination for s in self.network.sent(source=self.endpoint) if is_answer(s)]


def is_answer(sent: Sent) -> bool:
    return codec.parse(sent.payload).kind == codec.ANSWER


def counting_bytes(prefix: int) -> Callable[[int], bytes]:
    """Transaction ids that are known in advance: prefix, then a counter."""
    counter = itertools.count(1)
    return lambda n: bytes([prefix]) + next(counter).to_bytes(n - 1, "big")


class Lab:
    def __init__(self) -> None:
        self.network = Network()
        self.nodes: list[Node] = []

    def node(self, endpoint: Endpoint, **options: Any) -> Node:
        node = Node(options.pop("network", self.network), endpoint, **options)
        self.nodes.append(node)
        return node

    def members(self, *nodes: Node) -> None:
        """Every one of `nodes` a member of every other."""
        for node in nodes:
            node.checker.set_members(other.name for other in nodes if other is not node)

    def start(self, *nodes: Node) -> None:
        """Start the checkers and wait until each has tried its transport (a datagram sent
        before its port is open would have nowhere to go)."""
        for node in nodes:
            node.checker.start()
        for node in nodes:
            wait_until(
                lambda node=node: (
                    node.opens >= 1  # type: ignore[misc]
                    and (node._opener is not None or node.endpoint in node.network.inboxes)
                ),
                PATIENCE,
            )

    def close(self) -> None:
        for node in self.nodes:
            node.checker.stop()
        for node in self.nodes:
            if node.checker._thread.ident is None:
                continue  # never started
            node.checker.join(PATIENCE)
            assert not node.checker._thread.is_alive(), "a checker did not stop"


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.close()


def answered_at(node: Node, peer: Node, endpoint: Endpoint) -> bool:
    return endpoint in node.checker.answers().get(peer.name, {})


def drain(events: queue.Queue[Any]) -> list[Any]:
    found = []
    while True:
        try:
            found.append(events.get_nowait())
        except queue.Empty:
            return found


# --- members answer members ------------------------------------------------------------


def test_a_member_answers_and_the_answer_is_recorded_and_reported(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(a, b)
    before = time.monotonic()
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    after = time.monotonic()

    assert a.events.get(timeout=PATIENCE) == PathAnswered(b.name, B_AT)
    answers = a.checker.answers()
    assert list(answers) == [b.name] and list(answers[b.name]) == [B_AT]
    assert before <= answers[b.name][B_AT] <= after
    # B answered from its port to where the request came from, with what it saw.
    (answer,) = [s for s in lab.network.sent(source=B_AT) if is_answer(s)]
    assert answer.destination == A_AT
    message = codec.parse(answer.payload)
    assert message.sender == b.key.public and message.observed == A_AT
    assert codec.authentic(answer.payload, a.key.pair(b.key))
    # The request was A's own, sent from its port.
    request = codec.parse(lab.network.sent(source=A_AT, destination=B_AT)[0].payload)
    assert request.kind == codec.REQUEST and request.sender == a.key.public
    assert request.transaction_id == message.transaction_id
    assert b.checker.answered >= 1 and a.checker.sent >= 1
    # B was never asked to check A: it sent nothing but the answer, learned nothing.
    assert [s for s in lab.network.sent(source=B_AT) if not is_answer(s)] == []
    assert b.checker.answers() == {} and b.events.empty()


def test_a_request_makes_the_receiver_check_that_candidate_back_at_once(lab: Lab) -> None:
    """B's own check of A ran its course unanswered (A's NAT was closed to it); A's request
    opens it, and B checks back at once instead of never (or at its next trial)."""
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(b)
    b.checker.check(a.name, [A_AT])
    wait_until(lambda: len(lab.network.sent(source=B_AT)) == len(CHECK_AT), PATIENCE)
    wait_until(lambda: not b.checker._checks, CHECK_SPAN + PATIENCE)  # the burst is over
    assert b.checker.answers() == {}
    lab.start(a)
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: answered_at(b, a, A_AT), PATIENCE)
    assert b.events.get(timeout=PATIENCE) == PathAnswered(a.name, A_AT)
    # A, answered lately by B, did not check back in turn (no ping-pong).
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    requests_from_a = [s for s in lab.network.sent(source=A_AT) if not is_answer(s)]
    assert len(requests_from_a) == 1
    # B answered from the address A asked, but checked back from the address routing
    # picks: the one a recreated WireGuard peer sends from (no source cached), so the proof
    # is of the path WireGuard takes.
    from_b = lab.network.sent(source=B_AT, destination=A_AT)
    answers, checks = [s for s in from_b if is_answer(s)], [s for s in from_b if not is_answer(s)]
    assert answers and all(s.from_address == B_AT.address for s in answers)
    assert checks and all(s.from_address is None for s in checks)


def test_a_request_from_a_non_candidate_source_is_answered_but_not_checked_back(
    lab: Lab,
) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(b)
    b.checker.check(a.name, [C_AT])  # A's candidate is elsewhere
    wait_until(lambda: bool(lab.network.sent(source=B_AT, destination=C_AT)), PATIENCE)
    lab.network.inject(A_AT, B_AT, b.request_from(a.key))
    lab.network.inject(A_AT, B_AT, b.request_from(a.key))
    # After the second answer, anything the first made B send has been sent.
    wait_until(lambda: b.checker.answered >= 2, PATIENCE)
    requests = [s for s in lab.network.sent(source=B_AT) if not is_answer(s)]
    assert {s.destination for s in requests} == {C_AT}


def test_strangers_and_forgeries_use_up_no_limit_members_are_owed(lab: Lab) -> None:
    """Junk with the right tag, spoofed from a member's own source, on a clock that stands
    still: the member is answered all the same."""
    clock = Clock()
    a, b = lab.node(A_AT), lab.node(B_AT, monotonic=clock)
    lab.members(a, b)
    lab.start(b)
    stranger = Key.generate()
    pair = a.key.pair(b.key)
    for _ in range(int(ANSWER_BURST_OVERALL) + 100):
        lab.network.inject(A_AT, B_AT, codec.request(stranger.public, os.urandom(12), pair))
        forged = codec.request(a.key.public, os.urandom(12), pair)
        lab.network.inject(A_AT, B_AT, forged[:-1] + bytes([forged[-1] ^ 1]))
    lab.network.inject(A_AT, B_AT, b.request_from(a.key))
    wait_until(lambda: b.checker.answered == 1, PATIENCE)
    assert b.answered_to() == [A_AT]


def test_an_answer_that_saw_our_request_come_from_elsewhere_proves_nothing(lab: Lab) -> None:
    """A relay posing as B's candidate forwards our request from its own address: B's
    answer, however authentic, names an address that is not ours."""
    a, b = lab.node(A_AT), lab.node(B_AT, random_bytes=counting_bytes(0xA0))
    lab.members(a, b)
    a.checker.check(b.name, [NOWHERE])
    lab.start(a)
    wait_until(lambda: bool(lab.network.sent(source=A_AT, destination=NOWHERE)), PATIENCE)
    sent = codec.parse(lab.network.sent(source=A_AT, destination=NOWHERE)[0].payload)
    pair = b.key.pair(a.key)
    relayed = codec.answer(b.key.public, sent.transaction_id, pair, C_AT)  # C: the relay
    lab.network.inject(NOWHERE, A_AT, relayed)
    lab.network.inject(B_AT, A_AT, a.request_from(b.key))  # answered once the above was read
    wait_until(lambda: a.checker.answered >= 1, PATIENCE)
    assert a.checker.answers() == {} and a.events.empty()
    # The same transaction answered honestly (its id is still outstanding) counts.
    honest = codec.answer(b.key.public, sent.transaction_id, pair, A_AT)
    lab.network.inject(NOWHERE, A_AT, honest)
    wait_until(lambda: answered_at(a, b, NOWHERE), PATIENCE)
    assert a.events.get(timeout=PATIENCE) == PathAnswered(b.name, NOWHERE)


def test_two_members_check_each_other_at_once(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(a, b)
    a.checker.check(b.name, [B_AT])
    b.checker.check(a.name, [A_AT])
    wait_until(lambda: answered_at(a, b, B_AT) and answered_at(b, a, A_AT), PATIENCE)
    assert a.events.get(timeout=PATIENCE) == PathAnswered(b.name, B_AT)
    assert b.events.get(timeout=PATIENCE) == PathAnswered(a.name, A_AT)


def test_answers_of_a_member_that_left_are_forgotten(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(a, b)
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    a.checker.set_members([])
    assert a.checker.answers() == {}


def test_a_non_member_gets_no_answer(lab: Lab) -> None:
    a, b, c = lab.node(A_AT), lab.node(B_AT), lab.node(C_AT)
    a.checker.set_members([b.name])
    b.checker.set_members([c.name])  # not A
    lab.start(a, b)
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: len(lab.network.sent(source=A_AT, destination=B_AT)) >= 2, PATIENCE)
    # A member's request after A's (B reads in order): once that is answered, A's were read.
    lab.network.inject(C_AT, B_AT, b.request_from(c.key))
    wait_until(lambda: b.checker.answered >= 1, PATIENCE)
    assert b.answered_to() == [C_AT]
    assert b.checker.answered == 1
    assert a.checker.answers() == {} and a.events.empty()


def test_a_check_of_a_non_member_is_not_sent(lab: Lab) -> None:
    a, b, c = lab.node(A_AT), lab.node(B_AT), lab.node(C_AT)
    lab.members(a, b)  # C is not A's member
    lab.start(a, b)
    a.checker.check(c.name, [C_AT])
    a.checker.check(b.name, [B_AT])  # sent in the same turn, after C's would have been
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    assert lab.network.sent(destination=C_AT) == []


# --- forgeries, replays, answers from elsewhere -------------------------------------------


def test_an_answer_from_another_endpoint_than_asked_is_ignored(lab: Lab) -> None:
    """A asks at X; the request reaches B, whose answer comes from B_AT: not X's answer."""
    x = Endpoint.parse("198.51.100.200:4000")
    lab.network.aliases[x] = B_AT
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(a, b)
    a.checker.check(b.name, [x])
    wait_until(lambda: b.checker.answered >= 1, PATIENCE)  # it did answer (from B_AT)
    # Checked at B_AT afterwards: that answer comes after the one above in A's inbox.
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    assert list(a.checker.answers()[b.name]) == [B_AT]
    assert drain(a.events) == [PathAnswered(b.name, B_AT)]
    # X went on being asked: nothing counted as its answer.
    wait_until(lambda: len(lab.network.sent(source=A_AT, destination=x)) >= 2, PATIENCE)
    assert x not in a.checker.answers()[b.name]


def test_forged_answers_are_ignored(lab: Lab) -> None:
    a, b, c = lab.node(A_AT, random_bytes=counting_bytes(0xA0)), lab.node(B_AT), lab.node(C_AT)
    lab.members(a, b, c)
    lab.start(a)  # B does not run: the test answers for it
    a.checker.check(b.name, [NOWHERE])
    wait_until(lambda: len(lab.network.sent(source=A_AT, destination=NOWHERE)) >= 1, PATIENCE)
    tid = codec.parse(lab.network.sent(source=A_AT, destination=NOWHERE)[0].payload)
    tid_bytes = tid.transaction_id
    assert tid_bytes == bytes([0xA0]) + (1).to_bytes(11, "big")
    ab, ac = a.key.pair(b.key), a.key.pair(c.key)
    forgeries = [
        codec.answer(c.key.public, tid_bytes, ac, A_AT),  # another member's, valid for it
        codec.answer(b.key.public, tid_bytes, ac, A_AT),  # B's name, another pair's key
        codec.answer(b.key.public, tid_bytes, os.urandom(32), A_AT),  # a stranger's key
        codec.answer(b.key.public, os.urandom(12), ab, A_AT),  # a transaction not asked
        codec.request(b.key.public, tid_bytes, ab)[:-1] + b"\0",  # broken MAC
    ]
    for forged in forgeries:
        lab.network.inject(NOWHERE, A_AT, forged)
    # B's request after them: once A answered it, A had read the forgeries.
    lab.network.inject(NOWHERE, A_AT, a.request_from(b.key))
    wait_until(lambda: a.checker.answered >= 1, PATIENCE)
    assert a.checker.answers() == {} and a.events.empty()

    lab.network.inject(NOWHERE, A_AT, codec.answer(b.key.public, tid_bytes, ab, A_AT))
    wait_until(lambda: answered_at(a, b, NOWHERE), PATIENCE)
    assert a.events.get(timeout=PATIENCE) == PathAnswered(b.name, NOWHERE)


def test_a_replayed_request_is_answered_once_per_source_and_twice_in_all(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(b)
    first, second = b.request_from(a.key), b.request_from(a.key)
    lab.network.inject(A_AT, B_AT, first)
    lab.network.inject(A_AT, B_AT, first)  # the same bytes again
    lab.network.inject(C_AT, B_AT, first)  # and from elsewhere (a spoofed copy)
    lab.network.inject(C_AT, B_AT, first)
    lab.network.inject(NOWHERE, B_AT, first)  # a third source: the request had its answers
    lab.network.inject(A_AT, B_AT, second)
    wait_until(lambda: b.checker.answered >= 3, PATIENCE)
    answers = [s for s in lab.network.sent(source=B_AT) if is_answer(s)]
    # The copy from elsewhere is answered there (as large as it was): one replay raced
    # ahead of the real request from a spoofed source must not make us ignore the real one.
    assert ANSWERS_PER_REQUEST == 2
    assert [s.destination for s in answers] == [A_AT, C_AT, A_AT]
    assert [codec.parse(s.payload).transaction_id for s in answers] == [
        codec.parse(first).transaction_id,
        codec.parse(first).transaction_id,
        codec.parse(second).transaction_id,
    ]
    assert b.checker.answered == 3


# --- garbage, floods and rate limits -----------------------------------------------------


def test_garbage_and_floods_do_not_stop_the_thread(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    stranger = Key.generate()
    low_order = base64.b64encode(bytes(32)).decode()
    b.checker.set_members([a.name, low_order, b.name])  # its own name and a bad key too
    lab.start(b)
    attacker = Endpoint.parse("192.0.2.66:1234")
    tag = codec.TAG.to_bytes(4, "big")
    request = b.request_from(a.key)
    garbage = [
        b"",
        b"\x01" + os.urandom(147),  # a WireGuard handshake initiation's size
        os.urandom(codec.MESSAGE_BYTES),
        tag + os.urandom(codec.MESSAGE_BYTES - 4),
        tag + bytes([codec.REQUEST, codec.VERSION]) + bytes(codec.MESSAGE_BYTES - 6),
        request[:-1],
        request + b"\0",
        codec.request(stranger.public, os.urandom(12), stranger.pair(b.key)),
        codec.request(bytes(32), os.urandom(12), os.urandom(32)),  # the low-order "member"
        codec.request(b.key.public, os.urandom(12), os.urandom(32)),  # claims to be B
        codec.answer(a.key.public, os.urandom(12), a.key.pair(b.key), B_AT),  # not asked
        request[:-16] + bytes(16),  # A's name, no MAC
    ]
    for payload in garbage:
        lab.network.inject(attacker, B_AT, payload)
    rng = random.Random(7)
    for index in range(10000):
        size = codec.MESSAGE_BYTES if index % 2 else rng.randrange(0, 200)
        head = tag if index % 3 == 0 else b""
        payload = (head + rng.randbytes(size))[:size]
        source = Endpoint(ipaddress.ip_address(rng.getrandbits(32)), rng.randrange(1, 65536))
        lab.network.inject(source, B_AT, payload)
    lab.network.inject(A_AT, B_AT, request)
    wait_until(lambda: b.checker.answered >= 1, 3 * PATIENCE)
    assert b.answered_to() == [A_AT]
    assert b.checker._thread.is_alive()
    assert b.opens == 1  # nothing made it fail and start over


def test_an_answer_that_cannot_be_sent_harms_nothing_else(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(b)
    lab.network.inject(UNROUTABLE, B_AT, b.request_from(a.key))  # sending there fails
    lab.network.inject(A_AT, B_AT, b.request_from(a.key))
    wait_until(lambda: b.checker.answered >= 1, PATIENCE)
    assert lab.network.unroutable_tries == 1
    assert b.answered_to() == [A_AT]
    assert b.opens == 1  # the transport was not given up for it


@pytest.mark.parametrize(
    ("flooder", "other"),
    [
        # One IPv4 address, many ports: the limit is per address.
        (lambda i: Endpoint(A_AT.address, 1000 + i % 50), Endpoint.parse("192.0.2.200:51820")),
        # Many IPv6 addresses of one /64: the limit is per /64.
        (
            lambda i: Endpoint(ipaddress.ip_address(f"2001:db8:1:2::{i + 1:x}"), 51820),
            Endpoint.parse("[2001:db8:1:3::1]:51820"),
        ),
    ],
    ids=["ipv4-address", "ipv6-64"],
)
def test_answers_per_source_are_rate_limited(
    lab: Lab, flooder: Callable[[int], Endpoint], other: Endpoint
) -> None:
    """On a clock that stands still, one source gets the burst and no more; a second later,
    the burst's refill for a second. Other sources are not hurt."""
    clock = Clock()
    a, b = lab.node(A_AT), lab.node(B_AT, monotonic=clock)
    lab.members(a, b)
    lab.start(b)
    pair = a.key.pair(b.key)

    def flood(count: int, expected_answers: int) -> None:
        before = b.checker.answered
        for index in range(count):
            request = codec.request(a.key.public, os.urandom(12), pair)
            lab.network.inject(flooder(index), B_AT, request)
        lab.network.inject(other, B_AT, b.request_from(a.key))  # read after all of them
        wait_until(lambda: other in b.answered_to()[before:], PATIENCE)
        assert b.checker.answered - before == expected_answers + 1

    flood(200, int(ANSWER_BURST_PER_SOURCE))
    clock.now += 1.0
    flood(200, int(ANSWER_RATE_PER_SOURCE))


def test_answers_overall_are_rate_limited(lab: Lab) -> None:
    """Requests of many members from many sources at once: no more answers than the overall
    burst. An answer to B's own check (which the limits leave alone) shows when all were
    read."""
    clock = Clock()
    a, b = lab.node(A_AT), lab.node(B_AT, monotonic=clock, random_bytes=counting_bytes(0xB0))
    senders = [
        Key.generate() for _ in range(int(ANSWER_BURST_OVERALL / ANSWER_BURST_PER_SENDER) + 2)
    ]
    b.checker.set_members([a.name, *(s.name for s in senders)])
    b.checker.check(a.name, [NOWHERE])
    lab.start(b)
    wait_until(lambda: len(lab.network.sent(source=B_AT, destination=NOWHERE)) >= 1, PATIENCE)
    tid = codec.parse(lab.network.sent(source=B_AT, destination=NOWHERE)[0].payload)
    sources = int(ANSWER_BURST_OVERALL) + 200
    for index in range(sources):
        source = Endpoint(ipaddress.ip_address(0x0A000000 + index), 51820)
        lab.network.inject(source, B_AT, b.request_from(senders[index % len(senders)]))
    answer = codec.answer(a.key.public, tid.transaction_id, a.key.pair(b.key), B_AT)
    lab.network.inject(NOWHERE, B_AT, answer)
    wait_until(lambda: answered_at(b, a, NOWHERE), 3 * PATIENCE)
    assert b.checker.answered == ANSWER_BURST_OVERALL


# --- replays of a captured request, floods of one member ---------------------------------


def count_answers(lab: Lab, node: Node, tid: bytes) -> int:
    return sum(
        1
        for s in lab.network.sent(source=node.endpoint)
        if is_answer(s) and codec.parse(s.payload).transaction_id == tid
    )


def spoofed_ipv4(index: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(0x0A000000 + index), 51820)


def one_64(index: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"2001:db8:1:2::{index + 1:x}"), 51820)


@pytest.mark.parametrize("copy_from", [spoofed_ipv4, one_64], ids=["spoofed-ipv4", "ipv6-64"])
def test_a_captured_request_replayed_from_many_sources_gets_bounded_answers(
    lab: Lab, copy_from: Callable[[int], Endpoint]
) -> None:
    """A's request, captured once (by whoever holds one of B's candidate addresses in
    another network, or anyone on the path), replayed from 1,000 sources on a clock that
    stands still, and again a minute later: answered ANSWERS_PER_REQUEST times in all, and
    the copies cost nobody an answer, neither another member nor A itself."""
    clock = Clock()
    a, b, c = lab.node(A_AT), lab.node(B_AT, monotonic=clock), lab.node(C_AT)
    lab.members(a, b, c)
    lab.start(b)
    captured = b.request_from(a.key)
    lab.network.inject(A_AT, B_AT, captured)  # the real one, answered
    wait_until(lambda: b.checker.answered == 1, PATIENCE)

    def replay(first: int) -> None:
        for index in range(first, first + 1000):
            lab.network.inject(copy_from(index), B_AT, captured)
        # Members' fresh requests after the copies (read in order): once both are answered,
        # every copy was read.
        before = len(b.answered_to())
        lab.network.inject(C_AT, B_AT, b.request_from(c.key))
        lab.network.inject(A_AT, B_AT, b.request_from(a.key))
        wait_until(lambda: b.answered_to()[before:][-2:] == [C_AT, A_AT], PATIENCE)

    replay(0)
    clock.now += 60.0
    replay(1000)
    replayed = codec.parse(captured).transaction_id
    answers = [
        s.destination
        for s in lab.network.sent(source=B_AT)
        if is_answer(s) and codec.parse(s.payload).transaction_id == replayed
    ]
    assert answers == [A_AT, copy_from(0)][:ANSWERS_PER_REQUEST]
    assert b.checker.answered == ANSWERS_PER_REQUEST + 4
    assert len(b.checker._seen) == 5


def test_one_senders_flood_leaves_other_members_their_answers(lab: Lab) -> None:
    """A member (or whoever holds many of its requests) sends fresh requests from 1,200
    sources, the first hundred spoofed from C's own address, on a clock that stands still:
    it gets its own burst, and C, at that address, and D elsewhere are still answered."""
    clock = Clock()
    a, b = lab.node(A_AT), lab.node(B_AT, monotonic=clock)
    c, d = lab.node(C_AT), lab.node(Endpoint.parse("[2001:db8:4::4]:51820"))
    lab.members(a, b, c, d)
    lab.start(b)
    for index in range(1200):
        source = C_AT if index < 100 else spoofed_ipv4(index)
        lab.network.inject(source, B_AT, b.request_from(a.key))
    lab.network.inject(C_AT, B_AT, b.request_from(c.key))
    lab.network.inject(d.endpoint, B_AT, b.request_from(d.key))
    wait_until(lambda: d.endpoint in b.answered_to(), PATIENCE)
    assert b.answered_to()[-2:] == [C_AT, d.endpoint]
    # A got a sender's burst, C's address as one of A's sources a source's: C's own
    # bucket there was left whole.
    assert b.checker.answered == ANSWER_BURST_PER_SENDER + 2
    assert b.answered_to().count(C_AT) == ANSWER_BURST_PER_SOURCE + 1


def test_the_requesters_own_retries_are_all_answered(lab: Lab) -> None:
    """A asks B at an endpoint that reaches B, whose answers A does not take (they come
    from B's own endpoint, not the one asked): A sends every request of its schedule, and
    B answers each, to the same source, though B already answered A there."""
    network, clock = fake_clock_lab()
    x = Endpoint.parse("198.51.100.200:4000")
    network.aliases[x] = B_AT
    a = lab.node(A_AT, network=network, clock=clock)
    b = lab.node(B_AT, network=network)  # on real time: the limits refill as they would
    lab.members(a, b)
    lab.start(b)
    start = clock.now
    a.checker.check(b.name, [x])
    clock.limit = start + CHECK_SPAN + 1
    lab.start(a)
    clock.run_until(start + CHECK_SPAN + 1)
    asked = [codec.parse(s.payload).transaction_id for s in network.sent(destination=x)]
    assert relative(network.sent(destination=x), start) == list(CHECK_AT)
    wait_until(lambda: b.checker.answered == len(CHECK_AT), PATIENCE)
    answers = [s for s in network.sent(source=B_AT) if is_answer(s)]
    assert [s.destination for s in answers] == [A_AT] * len(CHECK_AT)
    assert [codec.parse(s.payload).transaction_id for s in answers] == asked
    assert a.checker.answers() == {}


def test_answered_requests_are_forgotten_after_a_while_or_past_a_number(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory of answered requests is bounded in time and size; a request forgotten is
    answered again when replayed (no timestamp on the wire: the limit left), within its
    sender's budget."""
    monkeypatch.setattr(checker_module, "SEEN_TRANSACTIONS", 8)
    clock = Clock()
    a, b = lab.node(A_AT), lab.node(B_AT, monotonic=clock)
    lab.members(a, b)
    lab.start(b)

    def answers_to(payload: bytes, source: Endpoint) -> int:
        """How many answers this datagram got."""
        tid = codec.parse(payload).transaction_id
        before = count_answers(lab, b, tid)
        lab.network.inject(source, B_AT, payload)
        marker = b.request_from(a.key)  # read after it
        lab.network.inject(A_AT, B_AT, marker)
        wait_until(lambda: count_answers(lab, b, codec.parse(marker).transaction_id) == 1, PATIENCE)
        return count_answers(lab, b, tid) - before

    old = b.request_from(a.key)
    assert answers_to(old, A_AT) == 1
    clock.now += SEEN_FOR_SECONDS - 1
    assert answers_to(old, A_AT) == 0  # still remembered
    clock.now += 2
    assert answers_to(old, A_AT) == 1  # forgotten: answered again
    assert len(b.checker._seen) <= 8
    for _ in range(8):
        answers_to(b.request_from(a.key), NOWHERE)
    assert len(b.checker._seen) == 8
    assert answers_to(old, A_AT) == 1  # pushed out by newer ones


# --- the schedule, on a fake clock -------------------------------------------------------


def fake_clock_lab() -> tuple[Network, Clock]:
    clock = Clock()
    return Network(clock), clock


def relative(sent: list[Sent], start: float) -> list[float]:
    return [round(s.at - start, 3) for s in sent]


def test_an_unreachable_endpoint_is_asked_on_the_schedule_then_left(lab: Lab) -> None:
    network, clock = fake_clock_lab()
    a, b = lab.node(A_AT, network=network, clock=clock), lab.node(B_AT, network=network)
    lab.members(a, b)
    start = clock.now
    a.checker.check(b.name, [NOWHERE, UNROUTABLE])
    lab.start(a)
    clock.run_until(start + CHECK_SPAN + 10)
    assert relative(network.sent(destination=NOWHERE), start) == list(CHECK_AT)
    assert len(CHECK_AT) == 5
    # Sending failed (no route): not tried again.
    assert network.unroutable_tries == 1
    assert a.checker.answers() == {} and a.events.empty()

    # Asked again later: a new round of requests.
    again = clock.now
    a.checker.check(b.name, [NOWHERE])
    clock.run_until(again + CHECK_SPAN + 10)
    assert len(network.sent(destination=NOWHERE)) == 2 * len(CHECK_AT)
    assert a.checker.sent == 2 * len(CHECK_AT)


def answers_from(peer: Key, asker: Key, from_nth: int) -> Callable[[Endpoint, bytes], list[bytes]]:
    """`peer` answering `asker`'s requests from the `from_nth` on (earlier ones are lost)."""
    counter = itertools.count(1)

    def respond(source: Endpoint, payload: bytes) -> list[bytes]:
        if next(counter) < from_nth:
            return []
        tid = codec.parse(payload).transaction_id
        return [codec.answer(peer.public, tid, peer.pair(asker), source)]

    return respond


@pytest.mark.parametrize("from_nth", [1, 3, len(CHECK_AT)])
def test_requests_stop_once_answered(lab: Lab, from_nth: int) -> None:
    network, clock = fake_clock_lab()
    a, b = lab.node(A_AT, network=network, clock=clock), lab.node(B_AT, network=network)
    lab.members(a, b)
    network.responders[NOWHERE] = answers_from(b.key, a.key, from_nth)
    start = clock.now
    a.checker.check(b.name, [NOWHERE, C_AT])  # C_AT never answers
    # Bounded before the thread starts: once its checks are done, its next wait is long,
    # and an unbounded fake clock would leap past the answer's keeping.
    clock.limit = start + CHECK_SPAN + 10
    lab.start(a)
    clock.run_until(start + CHECK_SPAN + 10)
    assert relative(network.sent(destination=NOWHERE), start) == list(CHECK_AT[:from_nth])
    assert relative(network.sent(destination=C_AT), start) == list(CHECK_AT)
    assert a.events.get_nowait() == PathAnswered(b.name, NOWHERE)
    assert a.events.empty()
    # Recorded when it came (at once, on the fake clock), and still fresh at the end.
    assert a.checker.answers() == {b.name: {NOWHERE: start + CHECK_AT[from_nth - 1]}}


def test_requests_are_paced_and_endpoints_per_peer_capped(lab: Lab) -> None:
    network, clock = fake_clock_lab()
    a = lab.node(A_AT, network=network, clock=clock)
    peers = [Key.generate() for _ in range(8)]
    a.checker.set_members(p.name for p in peers)
    per_peer = MAX_ENDPOINTS_PER_PEER + 8
    endpoints = {
        p.name: [Endpoint(ipaddress.ip_address(f"10.{i}.0.{j + 1}"), PORT) for j in range(per_peer)]
        for i, p in enumerate(peers)
    }
    start = clock.now
    for name, candidates in endpoints.items():
        a.checker.check(name, candidates)
    lab.start(a)
    clock.run_until(start + CHECK_SPAN + 10)

    checks = len(peers) * MAX_ENDPOINTS_PER_PEER
    assert checks > SEND_BUDGET  # the first requests do not all fit in one slice
    sent = network.sent(source=A_AT)
    first_round = relative(sent[:checks], start)
    assert first_round == [0.0] * SEND_BUDGET + [SEND_SLICE] * (checks - SEND_BUDGET)
    # Every check ran its course; the endpoints past the cap were never asked.
    asked = Counter(s.destination for s in sent)
    expected = {e for candidates in endpoints.values() for e in candidates[:MAX_ENDPOINTS_PER_PEER]}
    assert set(asked) == expected
    assert set(asked.values()) == {len(CHECK_AT)}
    # No slice ever carried more than the budget.
    per_slice = Counter(round((s.at - start) / SEND_SLICE, 6) for s in sent)
    assert max(per_slice.values()) <= SEND_BUDGET


# --- stopping and failing sockets --------------------------------------------------------


def test_stop_ends_the_thread_and_closes_the_transport(lab: Lab) -> None:
    a = lab.node(A_AT)
    lab.start(a)
    wait_until(lambda: a.opens == 1, PATIENCE)
    started = time.monotonic()
    a.checker.stop()
    a.checker.join(PATIENCE)
    assert not a.checker._thread.is_alive()
    assert time.monotonic() - started < 1.0  # woken, not at the end of its 1 s wait
    assert a.ports[0].closed


def raising_then(failures: int, node_box: list[Node]) -> Callable[[], FakePort]:
    """An opener that fails `failures` times (no CAP_NET_RAW, say), then works."""
    calls = itertools.count()

    def opener() -> FakePort:
        if next(calls) < failures:
            raise OSError(errno.EPERM, "Operation not permitted")
        node = node_box[0]
        return FakePort(node.network, node.endpoint, None)

    return opener


@pytest.fixture
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    def quick(base: float, cap: float, rng: random.Random) -> Backoff:
        return Backoff(base=0.02, cap=0.1, rng=rng)

    monkeypatch.setattr(rawthread, "Backoff", quick)


@pytest.mark.usefixtures("quick_backoff")
def test_a_transport_that_fails_to_open_is_retried(lab: Lab) -> None:
    box: list[Node] = []
    a, b = lab.node(A_AT, opener=raising_then(2, box)), lab.node(B_AT)
    box.append(a)
    lab.members(a, b)
    lab.start(a, b)
    a.checker.check(b.name, [B_AT])
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)
    assert a.opens == 3 and len(a.ports) == 1


@pytest.mark.usefixtures("quick_backoff")
def test_a_transport_that_fails_is_closed_and_opened_again(lab: Lab) -> None:
    a, b = lab.node(A_AT), lab.node(B_AT)
    lab.members(a, b)
    lab.start(a, b)
    wait_until(lambda: a.opens == 1, PATIENCE)
    a.ports[0].fail_next_receive = True
    a.checker.check(b.name, [B_AT])  # wakes it: the failing receive comes soon
    wait_until(lambda: a.opens == 2, PATIENCE)
    assert a.ports[0].closed and not a.ports[1].closed
    a.checker.check(b.name, [B_AT])  # asked again on the new transport, if need be
    wait_until(lambda: answered_at(a, b, B_AT), PATIENCE)


def test_a_failing_transport_is_retried_with_backoff_even_when_checks_are_asked(
    lab: Lab,
) -> None:
    """While the sockets cannot be opened, asking for checks does not make the thread try
    again and again without waiting (the backoff's first wait is at least a second)."""
    box: list[Node] = []
    a, b = lab.node(A_AT, opener=raising_then(10**9, box)), lab.node(B_AT)
    box.append(a)
    lab.members(a, b)
    lab.start(a)
    wait_until(lambda: a.opens >= 1, PATIENCE)
    a.checker.check(b.name, [B_AT])
    window = 0.5
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:  # a bounded look at how often it tries
        time.sleep(POLL)
    assert a.opens <= 3  # the first try and at most a couple woken by the checks
    started = time.monotonic()
    a.checker.stop()
    a.checker.join(PATIENCE)
    assert not a.checker._thread.is_alive()
    assert time.monotonic() - started < 0.5  # stop wakes it from the backoff


# --- timing a path in use ----------------------------------------------------------------


def test_a_path_in_use_is_timed_and_its_latest_round_trips_kept(lab: Lab) -> None:
    network, clock = fake_clock_lab()
    a, b = lab.node(A_AT, network=network, clock=clock), lab.node(B_AT, network=network)
    lab.members(a, b)
    network.responders[NOWHERE] = lambda source, payload: []  # answered by hand, late
    lab.start(a)
    clock.limit = clock.now  # from here the clock moves only when told

    def timed(endpoint: Endpoint, rtt: float) -> None:
        begin, before = clock.now, len(network.sent(destination=endpoint))
        timings = a.checker.timed
        a.checker.measure(b.name, endpoint)
        wait_until(lambda: len(network.sent(destination=endpoint)) > before, PATIENCE)
        request = network.sent(destination=endpoint)[before]
        assert request.at == begin
        clock.run_until(begin + rtt)
        tid = codec.parse(request.payload).transaction_id
        network.inject(endpoint, A_AT, codec.answer(b.key.public, tid, b.key.pair(a.key), A_AT))
        wait_until(lambda: a.checker.timed > timings, PATIENCE)
        clock.run_until(begin + CHECK_SPAN + 1)  # the check is over: the next is a new one

    assert a.checker.round_trips(b.name, NOWHERE) == ()
    timed(NOWHERE, 0.05)
    timed(NOWHERE, 0.5)  # answered late: requests went at 0.2 too, the first one's is timed
    rtts = [0.05, 0.5, *(0.01 * (i + 1) for i in range(ROUND_TRIPS_KEPT - 2))]
    for rtt in rtts[2:]:
        timed(NOWHERE, rtt)
    assert a.checker.round_trips(b.name, NOWHERE) == pytest.approx(tuple(rtts))
    timed(NOWHERE, 0.2)  # the oldest drops out
    assert a.checker.round_trips(b.name, NOWHERE) == pytest.approx((*rtts[1:], 0.2))
    # Timing is not news: no event for the agent, no answer the path logic reads (a path
    # in use that answers timings must not pass for a candidate that answers checks).
    assert a.events.empty() and a.checker.answers() == {}
    # A candidate's check of that endpoint while a timing runs starts anew, and counts.
    sent = len(network.sent(destination=NOWHERE))
    a.checker.measure(b.name, NOWHERE)
    wait_until(lambda: len(network.sent(destination=NOWHERE)) == sent + 1, PATIENCE)
    a.checker.check(b.name, [NOWHERE])
    wait_until(lambda: len(network.sent(destination=NOWHERE)) == sent + 2, PATIENCE)
    request = network.sent(destination=NOWHERE)[-1]
    tid = codec.parse(request.payload).transaction_id
    network.inject(NOWHERE, A_AT, codec.answer(b.key.public, tid, b.key.pair(a.key), A_AT))
    wait_until(lambda: NOWHERE in a.checker.answers().get(b.name, {}), PATIENCE)
    assert a.events.get(timeout=PATIENCE) == PathAnswered(b.name, NOWHERE)
    clock.run_until(clock.now + CHECK_SPAN + 1)
    # Round trips age out: none is older than ROUND_TRIP_KEEP.
    clock.run_until(clock.now + ROUND_TRIP_KEEP + 1)
    assert a.checker.round_trips(b.name, NOWHERE) == ()
    # Answers at another endpoint (a check of another candidate) keep their own: they do
    # not wipe this endpoint's.
    timed(NOWHERE, 0.07)
    timed(C_AT, 0.2)
    assert a.checker.round_trips(b.name, NOWHERE) == pytest.approx((0.07,))
    assert a.checker.round_trips(b.name, C_AT) == pytest.approx((0.2,))
    # A member that left is not timed, and its round trips are forgotten.
    lab.members(a)
    assert a.checker.round_trips(b.name, C_AT) == ()
    before = len(network.sent(source=A_AT))
    a.checker.measure(b.name, C_AT)
    clock.run_until(clock.now + CHECK_SPAN + 1)
    assert len(network.sent(source=A_AT)) == before


def test_a_check_asked_again_after_its_answer_is_asked_anew(lab: Lab) -> None:
    """An answer from before may no longer count for the agent (a peer that came up
    through a relay meanwhile counts only answers from its first check on): asked again,
    even within CHECK_SPAN, the endpoint is asked again."""
    network, clock = fake_clock_lab()
    a, b = lab.node(A_AT, network=network, clock=clock), lab.node(B_AT, network=network)
    lab.members(a, b)
    network.responders[NOWHERE] = answers_from(b.key, a.key, 1)
    start = clock.now
    a.checker.check(b.name, [NOWHERE])
    lab.start(a)
    clock.run_until(start + 1.0)
    assert a.checker.answers() == {b.name: {NOWHERE: start}}
    a.checker.check(b.name, [NOWHERE])
    clock.run_until(start + 1.0 + CHECK_SPAN + 1)
    assert relative(network.sent(destination=NOWHERE), start) == [0.0, 1.0]
    assert a.checker.answers() == {b.name: {NOWHERE: start + 1.0}}


def test_a_timings_answer_does_not_end_the_candidate_check_that_replaced_it(lab: Lab) -> None:
    network, clock = fake_clock_lab()
    a, b = lab.node(A_AT, network=network, clock=clock), lab.node(B_AT, network=network)
    lab.members(a, b)
    network.responders[NOWHERE] = lambda source, payload: []  # answered by hand
    lab.start(a)
    clock.limit = clock.now  # from here the clock moves only when told
    start = clock.now
    a.checker.measure(b.name, NOWHERE)
    wait_until(lambda: len(network.sent(destination=NOWHERE)) == 1, PATIENCE)
    a.checker.check(b.name, [NOWHERE])
    wait_until(lambda: len(network.sent(destination=NOWHERE)) == 2, PATIENCE)
    timing = codec.parse(network.sent(destination=NOWHERE)[0].payload).transaction_id
    answer = codec.answer(b.key.public, timing, b.key.pair(a.key), A_AT)
    network.inject(NOWHERE, A_AT, answer)
    wait_until(lambda: a.checker.timed == 1, PATIENCE)
    # The candidate's check goes on asking (its own answer is what the agent reads).
    clock.run_until(start + CHECK_SPAN + 1)
    assert relative(network.sent(destination=NOWHERE), start) == [0.0, *CHECK_AT]
    assert a.checker.answers() == {} and a.events.empty()
