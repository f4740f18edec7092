"""The prober's schedule, matching and classification, with reflectors played by a fake
transport on a fake clock; and the agent's prober thread."""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from kubespan.agent.reflexive import ReflexiveLearned, ReflexiveProber
from kubespan.netaddr import Endpoint
from kubespan.stun import codec, prober
from kubespan.stun.prober import Mapping, ReflectorAnswer, Reflexive, classify

A = Endpoint.parse("192.0.2.10:3478")
A2 = Endpoint.parse("192.0.2.10:3479")  # same address, another port
B = Endpoint.parse("198.51.100.10:3478")
C6 = Endpoint.parse("[2001:db8::10]:3478")
D6 = Endpoint.parse("[2001:db8::11]:3478")
PUBLIC = Endpoint.parse("203.0.113.1:51820")
OTHER = Endpoint.parse("203.0.113.1:40000")
PUBLIC6 = Endpoint.parse("[2001:db8:ff::1]:51820")

# A reflector's behaviour: given itself, the request and how many it has had, the datagrams
# to send back as (from, payload).
Behaviour = Callable[[Endpoint, bytes, int], list[tuple[Endpoint, bytes]]]


def reflects(mapped: Endpoint, from_nth: int = 1) -> Behaviour:
    def answer(reflector: Endpoint, request: bytes, nth: int) -> list[tuple[Endpoint, bytes]]:
        if nth < from_nth:
            return []
        tid = codec.decode(request).transaction_id
        return [(reflector, codec.binding_response(tid, mapped))]

    return answer


def silent(_reflector: Endpoint, _request: bytes, _nth: int) -> list[tuple[Endpoint, bytes]]:
    return []


class FakeNet:
    """A clock and a transport: receive() hands out queued answers, else lets time pass."""

    def __init__(self, behaviours: dict[Endpoint, Behaviour]) -> None:
        self.now = 100.0
        self.behaviours = behaviours
        self.sent: list[tuple[float, Endpoint]] = []
        self.inbox: list[tuple[Endpoint, bytes]] = []
        self.flood: bytes | None = None
        self.reads = 0
        self.closed = False

    def monotonic(self) -> float:
        return self.now

    def send(self, reflector: Endpoint, payload: bytes) -> None:
        behaviour = self.behaviours.get(reflector)
        if behaviour is None:
            raise OSError(101, "Network is unreachable")
        self.sent.append((round(self.now - 100.0, 3), reflector))
        nth = sum(1 for _, r in self.sent if r == reflector)
        self.inbox += behaviour(reflector, payload, nth)

    def receive(
        self, timeout: float, wake: socket.socket | None = None
    ) -> tuple[Endpoint, bytes] | None:
        self.reads += 1
        if self.flood is not None:
            return A, self.flood
        if self.inbox:
            return self.inbox.pop(0)
        self.now += timeout
        return None

    def close(self) -> None:
        self.closed = True


def run(net: FakeNet, reflectors: Sequence[Endpoint], timeout: float = 2.0) -> Reflexive:
    counter = itertools.count(1)
    return prober.probe(
        51820,
        reflectors,
        timeout=timeout,
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
        monotonic=net.monotonic,
        transport=net,
    )


R = ReflectorAnswer
EI, ED, UNKNOWN = Mapping.ENDPOINT_INDEPENDENT, Mapping.ENDPOINT_DEPENDENT, Mapping.UNKNOWN
CLASSIFY_CASES: list[tuple[str, list[ReflectorAnswer], Mapping]] = [
    ("nothing", [], UNKNOWN),
    ("one reflector", [R(A, PUBLIC)], UNKNOWN),
    ("same address twice", [R(A, PUBLIC), R(A2, OTHER)], UNKNOWN),
    ("two addresses agree", [R(A, PUBLIC), R(B, PUBLIC)], EI),
    ("two addresses differ", [R(A, PUBLIC), R(B, OTHER)], ED),
    ("one silent", [R(A, PUBLIC), R(B, None)], UNKNOWN),
    ("families apart", [R(A, PUBLIC), R(C6, PUBLIC6)], UNKNOWN),
    ("v6 agrees, v4 differs", [R(A, PUBLIC), R(B, OTHER), R(C6, PUBLIC6), R(D6, PUBLIC6)], ED),
    ("v6 agrees", [R(C6, PUBLIC6), R(D6, PUBLIC6), R(A, PUBLIC)], EI),
]


@pytest.mark.parametrize(
    ("answers", "expected"), [c[1:] for c in CLASSIFY_CASES], ids=[c[0] for c in CLASSIFY_CASES]
)
def test_classify(answers: list[ReflectorAnswer], expected: Mapping) -> None:
    assert classify(answers) == expected


def test_two_reflectors_agree() -> None:
    net = FakeNet({A: reflects(PUBLIC), B: reflects(PUBLIC)})
    result = run(net, [A, B])
    assert result.answers == (ReflectorAnswer(A, PUBLIC), ReflectorAnswer(B, PUBLIC))
    assert result.ipv4 == (PUBLIC,) and result.ipv6 == ()
    assert result.mapping is Mapping.ENDPOINT_INDEPENDENT
    assert net.sent == [(0.0, A), (0.0, B)]  # answered at once: no retransmission
    assert net.closed is False  # the caller's transport is the caller's to close


def test_two_reflectors_disagree_and_families_sort() -> None:
    net = FakeNet({A: reflects(OTHER), B: reflects(PUBLIC), C6: reflects(PUBLIC6)})
    result = run(net, [C6, A, B])
    assert result.ipv4 == (OTHER, PUBLIC)
    assert result.ipv6 == (PUBLIC6,)
    assert result.endpoints == (OTHER, PUBLIC, PUBLIC6)
    assert result.mapping is Mapping.ENDPOINT_DEPENDENT


def test_silent_reflector_is_asked_again_until_the_timeout() -> None:
    net = FakeNet({A: reflects(PUBLIC), B: silent})
    result = run(net, [A, B])
    assert result.answers == (ReflectorAnswer(A, PUBLIC), ReflectorAnswer(B, None))
    assert [at for at, r in net.sent if r == B] == [0.0, 0.25, 0.75, 1.5]
    assert net.now - 100.0 == pytest.approx(2.0)
    assert result.mapping is Mapping.UNKNOWN


def test_lost_request_is_answered_on_retransmission() -> None:
    net = FakeNet({A: reflects(PUBLIC, from_nth=3)})
    assert run(net, [A]).answers == (ReflectorAnswer(A, PUBLIC),)
    assert [at for at, _ in net.sent] == [0.0, 0.25, 0.75]


def test_short_timeout_shortens_the_schedule() -> None:
    net = FakeNet({A: silent})
    run(net, [A], timeout=0.5)
    assert [at for at, _ in net.sent] == [0.0, 0.25]
    assert net.now - 100.0 == pytest.approx(0.5)


def test_answers_not_ours_are_ignored() -> None:
    tid_of_a = (1).to_bytes(12, "big")
    net = FakeNet({A: reflects(PUBLIC, from_nth=2), B: silent})
    net.inbox = [
        (A, b"garbage"),
        (A, codec.binding_response(b"\xff" * 12, OTHER)),  # unknown transaction
        (B, codec.binding_response(tid_of_a, OTHER)),  # A's transaction, from B
        (A, codec.binding_request(tid_of_a)),  # a request, not an answer
    ]
    result = run(net, [A, B], timeout=0.5)
    assert result.answers == (ReflectorAnswer(A, PUBLIC), ReflectorAnswer(B, None))


def test_first_answer_wins() -> None:
    def twice(_reflector: Endpoint, request: bytes, _nth: int) -> list[tuple[Endpoint, bytes]]:
        tid = codec.decode(request).transaction_id
        return [(A, codec.binding_response(tid, PUBLIC)), (A, codec.binding_response(tid, OTHER))]

    net = FakeNet({A: twice, B: silent})
    assert run(net, [A, B], timeout=0.3).answers[0] == ReflectorAnswer(A, PUBLIC)


def test_a_flood_cannot_keep_the_probe_reading() -> None:
    """Junk that takes no time at all to come (the clock stands still): the probe ends
    after MAX_READS all the same, not at its deadline, which would never come."""
    net = FakeNet({A: silent})
    net.flood = COOKIE_JUNK
    result = run(net, [A])
    assert result.answers == (ReflectorAnswer(A, None),)
    assert net.reads == prober.MAX_READS


STRANGER = Endpoint.parse("198.51.100.66:9999")
COOKIE_JUNK = b"\x01\x01\x00\x00!\x12\xa4B" + b"\0" * 12  # an empty answer to no request
TID_A, TID_B = (1).to_bytes(12, "big"), (2).to_bytes(12, "big")  # as run() numbers [A, B]
# What anyone can send to the WireGuard port, with any source address: the reflectors' own
# (the one a port-restricted NAT lets in), with every transaction id but the one asked.
JUNK = [
    (STRANGER, COOKIE_JUNK),
    (STRANGER, codec.binding_response(TID_A, OTHER)),  # A's transaction, from elsewhere
    (A, COOKIE_JUNK),
    (A, codec.binding_response(b"\xee" * 12, OTHER)),  # from A itself, no transaction of ours
    (A, codec.binding_response(TID_B, OTHER)),  # from A, B's transaction
    (A2, codec.binding_response(TID_A, OTHER)),  # A's address and transaction, another port
    (B, codec.binding_response(TID_A, OTHER)),  # from B, A's transaction
]


class FloodedNet(FakeNet):
    """Answers come `latency` after their request; meanwhile JUNK comes every `gap` seconds,
    without end."""

    def __init__(self, behaviours: dict[Endpoint, Behaviour], gap: float) -> None:
        super().__init__(behaviours)
        self.gap = gap
        self.latency = 0.05
        self.junk = itertools.cycle(JUNK)
        self.next_junk = self.now + gap
        self.junk_read = 0
        self.due: list[tuple[float, Endpoint, bytes]] = []

    def send(self, reflector: Endpoint, payload: bytes) -> None:
        super().send(reflector, payload)
        self.due += [(self.now + self.latency, *answer) for answer in self.inbox]
        self.inbox.clear()

    def receive(
        self, timeout: float, wake: socket.socket | None = None
    ) -> tuple[Endpoint, bytes] | None:
        self.reads += 1
        until = self.now + timeout
        if self.due and self.due[0][0] <= min(self.next_junk, until):
            at, source, payload = self.due.pop(0)
            self.now = max(self.now, at)
            return source, payload
        if self.next_junk <= until:
            self.now = self.next_junk
            self.next_junk += self.gap
            self.junk_read += 1
            return next(self.junk)
        self.now = until
        return None


def test_junk_before_the_answers_does_not_hide_them() -> None:
    """A thousand junk datagrams within the round trip (20 000 a second): each reflector's
    answer is still read, and the probe ends with it."""
    net = FloodedNet({A: reflects(PUBLIC), B: reflects(PUBLIC)}, gap=0.00005)
    result = run(net, [A, B])
    assert result.answers == (ReflectorAnswer(A, PUBLIC), ReflectorAnswer(B, PUBLIC))
    assert net.now - 100.0 == pytest.approx(0.05)
    assert 900 < net.junk_read < prober.MAX_READS


def test_junk_for_the_whole_probe_neither_ends_it_nor_stops_retransmissions() -> None:
    """A flood from the start to past the deadline, 1000 a second: a reflector that
    answers only its third request is heard, a silent one asked on schedule until the
    deadline, and then the probe ends."""
    net = FloodedNet({A: reflects(PUBLIC, from_nth=3), B: silent}, gap=0.001)
    result = run(net, [A, B])
    assert result.answers == (ReflectorAnswer(A, PUBLIC), ReflectorAnswer(B, None))
    assert [at for at, r in net.sent if r == B] == [0.0, 0.25, 0.75, 1.5]
    assert [at for at, r in net.sent if r == A] == [0.0, 0.25, 0.75]
    assert net.now - 100.0 == pytest.approx(2.0)
    assert 1900 < net.junk_read < prober.MAX_READS


def test_unreachable_reflector_is_not_asked_again() -> None:
    net = FakeNet({A: silent})
    result = run(net, [A, B], timeout=1.0)
    assert result.answers == (ReflectorAnswer(A, None), ReflectorAnswer(B, None))
    assert B not in {r for _, r in net.sent}


def test_reflectors_deduplicated_and_capped() -> None:
    many = [Endpoint.parse(f"192.0.2.{n}:3478") for n in range(1, 20)]
    net = FakeNet({r: reflects(PUBLIC) for r in many})
    result = run(net, [many[0], *many])
    assert [a.reflector for a in result.answers] == many[: prober.MAX_REFLECTORS]


def test_no_reflectors_no_probe() -> None:
    assert run(FakeNet({}), []) == Reflexive((), (), (), Mapping.UNKNOWN)


# --- the agent's thread ----------------------------------------------------------------------

WAIT = 10.0


class ScriptedProbe:
    """Results (or exceptions) in turn, the last one repeated."""

    def __init__(self, *outcomes: Reflexive | Exception) -> None:
        self.outcomes = list(outcomes)
        self.asked: list[tuple[int, tuple[Endpoint, ...]]] = []
        self.done = threading.Condition()

    def __call__(self, port: int, reflectors: Sequence[Endpoint]) -> Reflexive:
        with self.done:
            self.asked.append((port, tuple(reflectors)))
            outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
            self.done.notify_all()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def wait_for(self, count: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.asked) >= count, WAIT), self.asked


def result_of(*mapped: Endpoint) -> Reflexive:
    return Reflexive.of([ReflectorAnswer(A, m) for m in mapped])


def started(
    probe: ScriptedProbe, events: queue.Queue[Any], interval: float = 3600.0, min_gap: float = 0.0
) -> ReflexiveProber:
    thread = ReflexiveProber(
        events, 51820, lambda: [A, B], interval=interval, probe=probe, min_gap=min_gap
    )
    thread.start()
    return thread


def test_triggers_in_a_burst_make_probes_no_closer_than_the_gap() -> None:
    probe = ScriptedProbe(result_of(PUBLIC))
    events: queue.Queue[Any] = queue.Queue()
    times: list[float] = []
    thread = started(probe, events, min_gap=0.3)
    original = probe.__call__

    def timed(port: int, reflectors: Sequence[Endpoint]) -> Reflexive:
        times.append(time.monotonic())
        return original(port, reflectors)

    thread._probe = timed
    try:
        probe.wait_for(1)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            thread.trigger()  # as fast as a hostile service could make hello answers come
            time.sleep(0.01)
        probe.wait_for(3)
    finally:
        thread.stop()
        thread.join(WAIT)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= 0.3
    assert len(times) <= 1 + 1.0 / 0.3 + 1


def test_thread_reports_only_changes_and_probes_on_trigger() -> None:
    first, second = result_of(PUBLIC), result_of(OTHER)
    probe = ScriptedProbe(first, first, second, second)
    events: queue.Queue[Any] = queue.Queue()
    thread = started(probe, events)
    try:
        assert events.get(timeout=WAIT) == ReflexiveLearned(first)
        for count in (2, 3, 4):
            thread.trigger()
            probe.wait_for(count)
        assert events.get(timeout=WAIT) == ReflexiveLearned(second)
        assert probe.asked[0] == (51820, (A, B))
    finally:
        thread.stop()
        thread.join(WAIT)
    assert not thread._thread.is_alive()
    assert events.empty()  # the repeats were not reported


def test_thread_survives_failures() -> None:
    good = result_of(PUBLIC)
    probe = ScriptedProbe(PermissionError("no CAP_NET_RAW"), RuntimeError("bug"), good)
    events: queue.Queue[Any] = queue.Queue()
    thread = started(probe, events)
    try:
        probe.wait_for(1)
        thread.trigger()  # a trigger cuts the back-off short
        probe.wait_for(2)
        thread.trigger()
        assert events.get(timeout=WAIT) == ReflexiveLearned(good)
    finally:
        thread.stop()
        thread.join(WAIT)
    assert not thread._thread.is_alive()


def test_thread_probes_every_interval() -> None:
    probe = ScriptedProbe(result_of(PUBLIC))
    events: queue.Queue[Any] = queue.Queue()
    thread = started(probe, events, interval=0.05)
    try:
        probe.wait_for(4)
    finally:
        thread.stop()
        thread.join(WAIT)


def test_the_first_reflectors_named_are_asked_at_once() -> None:
    """At start no service has named reflectors yet: that empty probe sends nothing, so it
    does not hold back the probe triggered when the first hello names some."""
    named: list[Endpoint] = []
    probe = ScriptedProbe(result_of(PUBLIC))
    events: queue.Queue[Any] = queue.Queue()
    thread = ReflexiveProber(
        events, 51820, lambda: list(named), interval=3600.0, probe=probe, min_gap=3600.0
    )
    thread.start()
    try:
        probe.wait_for(1)
        named.append(A)
        thread.trigger()
        probe.wait_for(2)  # within WAIT, not after the hour-long gap
        assert probe.asked[1] == (51820, (A,))
    finally:
        thread.stop()
        thread.join(WAIT)
