"""Binding a pair's sides at a relay (relay.bind, relay.ports, relay.bindings): the message
format and its authentication, the ports a pair gets, and the relay's answers to each kind
of bind, table by table."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace

import pytest
from nacl.public import PrivateKey

from kubespan.crypto import ClusterKeys
from kubespan.netaddr import Endpoint
from kubespan.pathcheck.codec import pair_key
from kubespan.relay.bind import (
    MESSAGE_BYTES,
    BindError,
    BindMessage,
    Kind,
    Refusal,
    authentic,
    encode,
    parse,
)
from kubespan.relay.bindings import (
    ALONE_RENEWED_WITHIN_SECONDS,
    BIND_LIFETIME_SECONDS,
    CLOCK_SKEW_MS,
    ONE_SIDED_PER_MEMBER,
    REMEMBER_SECONDS,
    RelayPolicy,
    SideBinding,
    forwarded,
    lapsed_at,
    take_bind,
)
from kubespan.relay.forward import RelaySpec
from kubespan.relay.ports import MAX_ATTEMPTS, PortRange, pair_ports

RELAY_KEY, A, B, C, D = (bytes([n]) * 32 for n in (9, 1, 2, 3, 4))
PORTS = PortRange(51821, 1000)
RELAY_AT = ipaddress.ip_address("203.0.113.30")
A_MAPPING = Endpoint.parse("198.51.100.1:40000")
B_MAPPING = Endpoint.parse("192.0.2.2:51820")
NOW, WALL = 1000.0, 1_800_000_000_000
POLICY = RelayPolicy(RELAY_KEY, PORTS, frozenset({A, B, C, D}), max_pairs=10)


def bind(side: bytes, peer: bytes, attempt: int = 0, time_ms: int = WALL) -> BindMessage:
    return BindMessage(Kind.BIND, side, peer, attempt, time_ms, os.urandom(12))


def port_of(side: bytes, peer: bytes, attempt: int = 0) -> Endpoint:
    return Endpoint(RELAY_AT, pair_ports(PORTS, RELAY_KEY, side, peer, attempt)[0])


def bound(
    bindings: tuple[SideBinding, ...] = (),
    message: BindMessage | None = None,
    source: Endpoint = A_MAPPING,
    to: Endpoint | None = None,
    policy: RelayPolicy = POLICY,
    now: float = NOW,
) -> tuple[tuple[SideBinding, ...], BindMessage]:
    message = message or bind(A, B)
    outcome = take_bind(
        bindings,
        message,
        source,
        to or port_of(message.sender, message.peer, message.attempt),
        policy,
        now,
        WALL,
    )
    assert outcome is not None
    assert outcome.answer is not None
    return outcome.bindings, outcome.answer


# --- the message ---------------------------------------------------------------------


def test_messages_round_trip_and_are_all_one_size() -> None:
    key = os.urandom(32)
    messages = [
        bind(A, B, attempt=3),
        replace(bind(A, B), leaving=True),
        replace(bind(A, B), kind=Kind.BOUND, sender=RELAY_KEY, observed=A_MAPPING),
        replace(bind(A, B), kind=Kind.REFUSED, sender=RELAY_KEY, reason=Refusal.PORT_TAKEN),
        replace(
            bind(A, B),
            kind=Kind.BOUND,
            sender=RELAY_KEY,
            observed=Endpoint.parse("[2001:db8::1]:7"),
        ),
    ]
    for message in messages:
        wire = encode(message, key)
        assert len(wire) == MESSAGE_BYTES
        assert wire[0] not in (1, 2, 3, 4)  # never WireGuard-shaped: never forwarded
        assert authentic(wire, key)
        assert parse(wire) == message


def test_a_changed_byte_or_another_key_is_not_authentic() -> None:
    key = os.urandom(32)
    wire = encode(bind(A, B), key)
    assert not authentic(wire, os.urandom(32))
    for index in (0, 10, 50, len(wire) - 1):
        changed = bytearray(wire)
        changed[index] ^= 1
        assert not authentic(bytes(changed), key)


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"", "a bind message is 126 bytes, not 0"),
        (b"\x00" * 126, "not a bind message of this version"),
        (b"KSrb\x07\x01" + bytes(120), "unknown bind message kind 7"),
        (b"KSrb\x03\x01\x09" + bytes(119), "unknown refusal reason 9"),
        (b"KSrb\x01\x01\x05" + bytes(119), "unknown BIND flags 5"),
        (b"KSrb\x02\x01\x02" + bytes(119), "unknown BOUND flags 2"),
        (b"KSrb\x02\x01" + bytes(120), "BOUND without the observed mapping"),
        (b"KSrb\x01\x01" + bytes(89) + b"\x01" + bytes(30), "only BOUND carries"),
    ],
)
def test_malformed_messages_say_what_is_wrong(wire: bytes, error: str) -> None:
    with pytest.raises(BindError, match=error):
        parse(wire)


def test_side_and_relay_compute_the_same_key_and_no_one_else_does() -> None:
    cluster = ClusterKeys.derive("cluster", os.urandom(32))
    relay, side, other = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()

    def key(own: PrivateKey, peer: PrivateKey, cluster_key: bytes) -> bytes:
        return pair_key(bytes(own), bytes(peer.public_key), bytes(own.public_key), cluster_key)

    at_side = key(side, relay, cluster.relay_bind_key)
    assert at_side == key(relay, side, cluster.relay_bind_key)
    assert at_side != key(other, relay, cluster.relay_bind_key)  # another member's side
    assert at_side != key(side, relay, cluster.path_check_key)  # path checks' keys differ
    stranger = ClusterKeys.derive("cluster", os.urandom(32))
    assert at_side != key(side, relay, stranger.relay_bind_key)


# --- the ports -----------------------------------------------------------------------


def test_both_sides_and_the_relay_agree_on_the_pairs_ports() -> None:
    for attempt in range(MAX_ATTEMPTS):
        a_port, b_port = pair_ports(PORTS, RELAY_KEY, A, B, attempt)
        assert pair_ports(PORTS, RELAY_KEY, B, A, attempt) == (b_port, a_port)
        assert a_port in PORTS and b_port in PORTS and abs(a_port - b_port) == 1
        assert min(a_port, b_port) % 2 == PORTS.first % 2  # a slot's two ports
    spread = {pair_ports(PORTS, RELAY_KEY, A, B, n) for n in range(MAX_ATTEMPTS)}
    assert len(spread) > 1
    assert pair_ports(PORTS, bytes(32), A, B, 0) != pair_ports(PORTS, RELAY_KEY, A, B, 0)


@pytest.mark.parametrize(("first", "count"), [(51821, 1), (51821, 3), (0, 10), (65530, 10)])
def test_impossible_port_ranges_are_refused(first: int, count: int) -> None:
    with pytest.raises(ValueError, match="an even count"):
        PortRange(first, count)


def test_a_pair_needs_two_sides() -> None:
    with pytest.raises(ValueError, match="two different sides"):
        pair_ports(PORTS, RELAY_KEY, A, A, 0)


# --- the relay's answers -------------------------------------------------------------


def test_a_bind_is_answered_with_the_mapping_it_came_from() -> None:
    bindings, answer = bound()
    assert (answer.kind, answer.sender, answer.peer, answer.observed) == (
        Kind.BOUND,
        RELAY_KEY,
        B,
        A_MAPPING,
    )
    (binding,) = bindings
    assert (binding.port, binding.mapping, binding.address) == (
        port_of(A, B).port,
        A_MAPPING,
        RELAY_AT,
    )


def test_nothing_is_forwarded_until_both_sides_are_bound() -> None:
    bindings, _ = bound()
    assert forwarded(bindings, NOW).pairs == ()
    bindings, _ = bound(bindings, bind(B, A), source=B_MAPPING)
    (pair,) = forwarded(bindings, NOW).pairs
    a_port, b_port = pair_ports(PORTS, RELAY_KEY, A, B, 0)
    assert {pair.relay_address(pair.first), pair.relay_address(pair.second)} == {RELAY_AT}
    assert {(s.port, s.mapping) for s in (pair.first, pair.second)} == {
        (a_port, A_MAPPING),
        (b_port, B_MAPPING),
    }


def test_bound_says_whether_the_other_side_is_bound_too() -> None:
    bindings, first = bound()
    assert first.kind == Kind.BOUND and not first.paired
    _, second = bound(bindings, bind(B, A), source=B_MAPPING)
    assert second.kind == Kind.BOUND and second.paired
    key = os.urandom(32)
    assert parse(encode(second, key)).paired and parse(encode(first, key)).paired is False


def test_a_binding_its_side_left_waiting_alone_pairs_no_one() -> None:
    """A side told it is alone renews every 2 s; one that stopped gave up waiting and moved
    on, leaving its binding to lapse. The other side, binding later, must hear that it is
    alone, or it takes the leftover for its peer and finds out only when it lapses."""
    bindings, answer = bound()
    assert not answer.paired
    late = NOW + ALONE_RENEWED_WITHIN_SECONDS + 1
    bindings, answer = bound(bindings, bind(B, A), source=B_MAPPING, now=late)
    assert answer.kind == Kind.BOUND and not answer.paired
    assert forwarded(bindings, late).pairs  # forwarded while the binding lives, all the same
    # The side comes back: both are told.
    bindings, answer = bound(bindings, bind(A, B, time_ms=WALL + 1), now=late + 1)
    assert answer.paired
    _, answer = bound(bindings, bind(B, A, time_ms=WALL + 2), source=B_MAPPING, now=late + 2)
    assert answer.paired


def leave(
    bindings: tuple[SideBinding, ...],
    side: bytes,
    peer: bytes,
    time_ms: int,
    attempt: int = 0,
    now: float = NOW,
) -> tuple[SideBinding, ...]:
    message = replace(bind(side, peer, attempt, time_ms), leaving=True)
    source = A_MAPPING if side == A else B_MAPPING
    outcome = take_bind(bindings, message, source, port_of(side, peer), POLICY, now, WALL)
    assert outcome is not None and outcome.answer is None  # nothing to answer
    return outcome.bindings


def test_a_side_that_leaves_stops_the_pair_at_once_and_its_peer_hears_it_is_alone() -> None:
    bindings, _ = bound()
    bindings, answer = bound(bindings, bind(B, A), source=B_MAPPING, now=NOW + 1)
    assert answer.paired and forwarded(bindings, NOW + 1).pairs
    bindings = leave(bindings, A, B, WALL + 1, now=NOW + 2)
    assert forwarded(bindings, NOW + 2).pairs == ()
    _, answer = bound(bindings, bind(B, A, time_ms=WALL + 2), source=B_MAPPING, now=NOW + 3)
    assert not answer.paired
    # Its binds from before the leave are replays now (unanswered), and it can bind again.
    assert take_bind(bindings, bind(A, B), A_MAPPING, port_of(A, B), POLICY, NOW + 3, WALL) is None
    bindings, answer = bound(bindings, bind(A, B, time_ms=WALL + 3), now=NOW + 4)
    assert answer.kind == Kind.BOUND and answer.paired


def test_a_leave_moves_only_its_own_binding_and_only_when_fresh() -> None:
    bindings, _ = bound()
    bindings, _ = bound(bindings, bind(B, A), source=B_MAPPING, now=NOW + 1)
    # A replayed leave (not newer than the side's last bind), one for another attempt, and
    # one from a side with no binding: nothing changes.
    assert leave(bindings, A, B, WALL) == bindings
    assert leave(bindings, A, B, WALL + 1, attempt=1) == bindings
    assert leave(bindings, A, C, WALL + 1) == bindings
    assert forwarded(leave(bindings, B, A, WALL + 1, now=NOW + 2), NOW + 2).pairs == ()


def test_a_binding_told_it_was_paired_counts_while_it_lives() -> None:
    """A side told it is paired renews every 20 s, and one moving to a nearer relay leaves
    its binding here to carry the pair meanwhile: the side that stays is still paired."""
    bindings, _ = bound()
    bindings, answer = bound(bindings, bind(B, A), source=B_MAPPING, now=NOW + 1)
    assert answer.paired
    later = NOW + BIND_LIFETIME_SECONDS - 1  # B bound last at NOW + 1: still live
    _, answer = bound(bindings, bind(A, B, time_ms=WALL + 1), now=later)
    assert answer.paired


def test_sides_reaching_the_relay_at_two_of_its_addresses_are_paired() -> None:
    other_address = ipaddress.ip_address("203.0.113.31")
    bindings, _ = bound()
    b_port = pair_ports(PORTS, RELAY_KEY, B, A, 0)[0]
    bindings, answer = bound(
        bindings, bind(B, A), source=B_MAPPING, to=Endpoint(other_address, b_port)
    )
    assert answer.paired
    (pair,) = forwarded(bindings, NOW).pairs
    assert {pair.relay_address(pair.first), pair.relay_address(pair.second)} == {
        RELAY_AT,
        other_address,
    }
    text = RelaySpec.of([pair]).render()
    # Each side's packets reach the other from the address that side sends to.
    b_to_a = f"ip saddr {B_MAPPING.address} udp sport {B_MAPPING.port} ip daddr {A_MAPPING.address}"
    assert f"{b_to_a} udp dport {A_MAPPING.port} ip saddr set {RELAY_AT}" in text


def test_bindings_at_an_address_the_relay_lost_lapse_and_pair_no_one() -> None:
    """A relay renumbered (RELAY_AT gone, NEW_AT its address now): A's binding at the old
    address must not pair with B binding at the new one, nor be forwarded, from an address
    the relay no longer has; A's old binds stay replays; A bound at the new one pairs."""
    new_at = ipaddress.ip_address("203.0.113.31")
    bindings, _ = bound()
    bindings, answer = bound(bindings, bind(B, A), source=B_MAPPING, now=NOW + 1)
    assert answer.paired and forwarded(bindings, NOW + 1).pairs
    assert lapsed_at(bindings, frozenset({new_at}), NOW + 2) == bindings  # not theirs
    bindings = lapsed_at(bindings, frozenset({RELAY_AT}), NOW + 2)
    assert forwarded(bindings, NOW + 2).pairs == ()
    b_port = pair_ports(PORTS, RELAY_KEY, B, A, 0)[0]
    bindings, answer = bound(
        bindings,
        bind(B, A, time_ms=WALL + 1),
        source=B_MAPPING,
        to=Endpoint(new_at, b_port),
        now=NOW + 3,
    )
    assert answer.kind == Kind.BOUND and not answer.paired
    assert forwarded(bindings, NOW + 3).pairs == ()
    a_port = pair_ports(PORTS, RELAY_KEY, A, B, 0)[0]
    replayed = take_bind(
        bindings, bind(A, B), A_MAPPING, Endpoint(new_at, a_port), POLICY, NOW + 3, WALL
    )
    assert replayed is None  # remembered: its last bind is a replay still
    bindings, answer = bound(
        bindings, bind(A, B, time_ms=WALL + 2), to=Endpoint(new_at, a_port), now=NOW + 4
    )
    assert answer.paired
    (pair,) = forwarded(bindings, NOW + 4).pairs
    assert {pair.relay_address(pair.first), pair.relay_address(pair.second)} == {new_at}


def test_binds_to_an_ipv6_address_get_nothing_relays_carry_ipv4_only() -> None:
    # Relays are offered at IPv4 addresses only (relay.choice): a bind to the relay's IPv6
    # address, fresh, replayed or stale, is someone else's copy, and no refusal is owed.
    six = Endpoint(ipaddress.ip_address("2001:db8::30"), pair_ports(PORTS, RELAY_KEY, A, B, 0)[0])
    from_six = Endpoint.parse("[2001:db8:1::1]:51820")
    bindings, _ = bound()
    for message in (bind(A, B, time_ms=WALL + 1), bind(A, B), bind(A, B, time_ms=0)):
        assert take_bind(bindings, message, from_six, six, POLICY, NOW, WALL) is None
    assert take_bind((), bind(A, B), from_six, six, POLICY, NOW, WALL) is None


def test_a_pair_lapses_when_one_side_stops_binding() -> None:
    bindings, _ = bound()
    bindings, _ = bound(bindings, bind(B, A), source=B_MAPPING, now=NOW + 30)
    assert forwarded(bindings, NOW + BIND_LIFETIME_SECONDS - 1).pairs
    assert forwarded(bindings, NOW + BIND_LIFETIME_SECONDS).pairs == ()


def test_a_new_mapping_replaces_the_old_one() -> None:
    bindings, _ = bound()
    moved = Endpoint.parse("198.51.100.1:40999")
    bindings, answer = bound(bindings, bind(A, B, time_ms=WALL + 1), source=moved)
    assert answer.observed == moved
    assert [b.mapping for b in bindings] == [moved]


def test_sides_of_different_attempts_are_not_a_pair() -> None:
    bindings, _ = bound()
    bindings, _ = bound(bindings, bind(B, A, attempt=1), source=B_MAPPING)
    assert forwarded(bindings, NOW).pairs == ()


@pytest.mark.parametrize(
    ("message", "to", "reason"),
    [
        (bind(A, A), None, Refusal.UNKNOWN_PEER),
        (bind(A, bytes(32)), None, Refusal.UNKNOWN_PEER),
        (bind(A, B, time_ms=WALL - CLOCK_SKEW_MS - 1), None, Refusal.STALE),
        (bind(A, B, time_ms=WALL + CLOCK_SKEW_MS + 1), None, Refusal.STALE),
        (bind(A, B, attempt=MAX_ATTEMPTS), Endpoint(RELAY_AT, 51821), Refusal.WRONG_PORT),
        (bind(A, B), Endpoint(RELAY_AT, 51820), Refusal.WRONG_PORT),
        (bind(A, B), Endpoint(RELAY_AT, port_of(B, A).port), Refusal.WRONG_PORT),
        (replace(bind(A, B), time_ms=0), None, Refusal.STALE),
    ],
)
def test_refusals(message: BindMessage, to: Endpoint | None, reason: Refusal) -> None:
    outcome = take_bind((), message, A_MAPPING, to or port_of(A, B), POLICY, NOW, WALL)
    assert outcome is not None and outcome.answer is not None
    assert (outcome.answer.kind, outcome.answer.reason) == (Kind.REFUSED, reason)
    assert outcome.bindings == ()


def test_a_replayed_bind_moves_nothing_and_gets_nothing_even_after_its_binding_lapsed() -> None:
    first = bind(A, B)
    bindings, _ = bound((), first)
    elsewhere = Endpoint.parse("203.0.113.66:1234")
    for later in (NOW + 1, NOW + BIND_LIFETIME_SECONDS + 1, NOW + REMEMBER_SECONDS - 1):
        wall = WALL + int((later - NOW) * 1000)  # stale by the end: a replay all the same
        assert take_bind(bindings, first, elsewhere, port_of(A, B), POLICY, later, wall) is None
    # Forgotten only once no bind that old passes the clock check any more (the relay's
    # clock has moved on as much as its monotonic one): STALE, which relay.server answers
    # once a minute per side at most (a side with a skewed clock looks the same).
    later = NOW + REMEMBER_SECONDS
    wall = WALL + int(REMEMBER_SECONDS * 1000)
    outcome = take_bind(bindings, first, elsewhere, port_of(A, B), POLICY, later, wall)
    assert outcome is not None and outcome.answer is not None
    assert (outcome.answer.reason, outcome.bindings) == (Refusal.STALE, ())


@pytest.mark.parametrize(
    "to",
    [
        port_of(A, B),
        Endpoint(RELAY_AT, 51820),  # not a relay port: WRONG_PORT, were it fresh
        Endpoint(RELAY_AT, port_of(B, A).port),
    ],
)
def test_replays_and_stale_binds_are_known_before_any_other_refusal(to: Endpoint) -> None:
    # Every other refusal would be answered to wherever the bind claims to come from: a
    # copied bind must be found out first, or it is a refusal reflected at every copy.
    bindings, _ = bound()
    gone = replace(POLICY, members=frozenset({A, C, D}))  # B left: UNKNOWN_PEER, were it fresh
    for policy in (POLICY, gone):
        assert take_bind(bindings, bind(A, B), A_MAPPING, to, policy, NOW + 1, WALL) is None
        stale = bind(A, B, time_ms=WALL - CLOCK_SKEW_MS - 1)
        outcome = take_bind((), stale, A_MAPPING, to, policy, NOW, WALL)
        assert outcome is not None and outcome.answer is not None
        assert (outcome.answer.reason, outcome.bindings) == (Refusal.STALE, ())


def test_sides_at_different_attempts_are_told_where_the_other_is() -> None:
    bindings, _ = bound((), bind(A, B, attempt=1))
    _, answer = bound(bindings, bind(B, A, attempt=0), source=B_MAPPING)
    assert (answer.kind, answer.reason, answer.attempt) == (
        Kind.REFUSED,
        Refusal.PEER_AT_ATTEMPT,
        1,
    )
    bindings, answer = bound(bindings, bind(B, A, attempt=1), source=B_MAPPING)
    assert answer.kind == Kind.BOUND and len(forwarded(bindings, NOW).pairs) == 1


def test_one_member_cannot_hold_every_slot_with_one_sided_bindings() -> None:
    members = [bytes([0x40 + n]) * 32 for n in range(ONE_SIDED_PER_MEMBER + 2)]
    policy = replace(POLICY, members=frozenset({A, *members}))
    bindings: tuple[SideBinding, ...] = ()
    answers = []
    for peer in members:
        outcome = take_bind(bindings, bind(A, peer), A_MAPPING, port_of(A, peer), policy, NOW, WALL)
        assert outcome is not None and outcome.answer is not None
        bindings = outcome.bindings
        answers.append((outcome.answer.kind, outcome.answer.reason))
    bound_ones = [a for a in answers if a[0] == Kind.BOUND]
    assert len(bound_ones) <= ONE_SIDED_PER_MEMBER
    assert (Kind.REFUSED, Refusal.FULL) in answers


def test_strangers_and_answers_get_no_answer() -> None:
    stranger = bind(bytes([7]) * 32, B)
    assert take_bind((), stranger, A_MAPPING, port_of(A, B), POLICY, NOW, WALL) is None
    answer = replace(bind(A, B), kind=Kind.BOUND, observed=A_MAPPING)
    assert take_bind((), answer, A_MAPPING, port_of(A, B), POLICY, NOW, WALL) is None


def test_a_taken_slot_sends_the_pair_to_its_next_attempt() -> None:
    narrow = PortRange(51821, 2)  # one slot: every pair wants it
    policy = replace(POLICY, ports=narrow)

    def at(side: bytes, peer: bytes, attempt: int = 0) -> Endpoint:
        return Endpoint(RELAY_AT, pair_ports(narrow, RELAY_KEY, side, peer, attempt)[0])

    bindings, _ = bound((), bind(A, B), to=at(A, B), policy=policy)
    _, answer = bound(bindings, bind(C, D), to=at(C, D), policy=policy)
    assert (answer.kind, answer.reason) == (Kind.REFUSED, Refusal.PORT_TAKEN)
    # Once A's binding lapses, the slot is free again.
    later = NOW + BIND_LIFETIME_SECONDS
    _, answer = bound(bindings, bind(C, D), to=at(C, D), policy=policy, now=later)
    assert answer.kind == Kind.BOUND


def test_a_full_relay_refuses_new_pairs_but_keeps_its_own() -> None:
    policy = replace(POLICY, max_pairs=1)
    bindings, _ = bound((), bind(A, B), policy=policy)
    bindings, answer = bound(bindings, bind(B, A), source=B_MAPPING, policy=policy)
    assert answer.kind == Kind.BOUND
    _, answer = bound(bindings, bind(C, D), policy=policy)
    assert (answer.kind, answer.reason) == (Kind.REFUSED, Refusal.FULL)
