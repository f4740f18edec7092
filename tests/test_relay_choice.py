"""Which pairs ask for a relay and which relay they use (relay.choice), the record field
that offers relaying, the config that turns it on, and the rules that keep a relay's own
packets out of its tunnel."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from dataclasses import replace

import pytest
from nacl.public import PrivateKey

from kubespan import xeddsa
from kubespan.config import parse_config
from kubespan.discovery.payload import (
    SIGNED_PREFIX,
    canonical,
    decode_record,
    encode_record,
    sign_record,
)
from kubespan.errors import ConfigError
from kubespan.identity import generate_identity, node_id_for
from kubespan.model import AffiliateInfo, MemberRecord, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.peerstate import Tracking
from kubespan.plan.ruleset import RulesetSpec
from kubespan.relay.choice import (
    MAX_PUBLISHED,
    MAX_RELAYS_PER_PAIR,
    RELAY_AFTER,
    RelayOffer,
    RoundTrips,
    nearer,
    offers_of,
    published_round_trips,
    relay_order,
    wants_relay,
)
from kubespan.relay.forward import RelayedPair, RelaySide, RelaySpec
from kubespan.relay.ports import PortRange

UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN
T0 = 1000.0
RELAYED_AT = Endpoint.parse("203.0.113.30:29101")
DIRECT = Endpoint.parse("192.0.2.2:51820")


def key() -> bytes:
    return bytes(PrivateKey.generate().public_key)


def tracked(endpoint: Endpoint = DIRECT, cycles: int = 0, known_since: float = T0) -> Tracking:
    return Tracking(endpoint, T0, cycles=cycles, known_since=known_since)


def test_a_direct_path_that_answers_needs_no_relay() -> None:
    assert not wants_relay(T0 + 60, tracked(cycles=2), DOWN, None, direct_answered=True)


def test_a_pair_up_through_the_relay_while_a_direct_candidate_was_on_trial_keeps_it() -> None:
    """The other side's packets came through the relay: WireGuard follows them, so the
    pair is up through the relay although this side's trial endpoint was a direct one."""
    assert wants_relay(T0 + 60, tracked(DIRECT), UP, RELAYED_AT, current=RELAYED_AT)
    assert not wants_relay(T0 + 60, tracked(DIRECT), UP, RELAYED_AT, current=DIRECT)


def test_a_pair_up_through_a_relay_that_died_keeps_its_binding_at_the_next() -> None:
    """The relay carrying the pair died; the pair is still "up" on its port until found
    dead, and this side has bound it at the next relay (waiting for the other side). Letting
    that binding go would leave the pair with no way on: the other side binds there, its
    packets come through, and this side's binding lapses a minute later (CI showed the pair
    down again and neither side saying it was relayed)."""
    dead_relays_port = Endpoint.parse("203.0.113.40:29300")
    up_there = tracked(dead_relays_port)
    assert wants_relay(T0 + 100, up_there, UP, RELAYED_AT, current=dead_relays_port, via_relay=True)
    # Up directly, bound somewhere: let it go, as before.
    assert not wants_relay(T0 + 100, tracked(), UP, RELAYED_AT, current=DIRECT, via_relay=False)


def test_a_pair_up_through_a_relay_wants_one_while_its_binding_is_made_again() -> None:
    """The relay is reached at another address now (a relay with two), or the pair is
    moving to a nearer one: for a pass or two this side holds no binding. Let go then, the
    pair stayed up on the binding it left until that lapsed a minute later, and went down
    with neither side relayed (CI: c1 and a1, the relay with two addresses)."""
    relays_port = Endpoint.parse("203.0.113.40:29300")
    up_there = tracked(relays_port)
    assert wants_relay(T0 + 100, up_there, UP, None, current=relays_port, via_relay=True)
    assert not wants_relay(T0 + 100, tracked(), UP, None, current=DIRECT, via_relay=False)


@pytest.mark.parametrize(
    ("now", "tracking", "state", "relayed_at", "wanted"),
    [
        (T0 + 1, None, UNKNOWN, None, False),  # not tracked yet
        (T0 + 1, tracked(), UNKNOWN, None, False),  # a fair chance to come up directly
        (T0 + RELAY_AFTER - 0.1, tracked(), DOWN, None, False),
        (T0 + RELAY_AFTER, tracked(), DOWN, None, True),
        (T0 + 1, tracked(cycles=1), DOWN, None, True),  # every candidate failed already
        (T0 + 100, tracked(), UP, None, False),  # up directly: no relay
        (T0 + 100, tracked(), UP, RELAYED_AT, False),  # bound, but up directly: let go
        (T0 + 100, tracked(RELAYED_AT), UP, RELAYED_AT, True),  # up through it: kept
        (T0 + 100, tracked(RELAYED_AT), DOWN, RELAYED_AT, True),  # the relay path died
    ],
)
def test_wants_relay_table(
    now: float,
    tracking: Tracking | None,
    state: PeerState,
    relayed_at: Endpoint | None,
    wanted: bool,
) -> None:
    assert wants_relay(now, tracking, state, relayed_at) is wanted


def offer(public_key: bytes, address: str = "203.0.113.30") -> RelayOffer:
    return RelayOffer(
        public_key,
        node_id_for(public_key),
        "r",
        ipaddress.ip_address(address),
        PortRange(29100, 256),
    )


def test_both_sides_rank_the_relays_alike_and_never_use_one_of_the_pair() -> None:
    a, b = key(), key()
    relays = [offer(key()) for _ in range(3)]
    from_a = relay_order(a, b, [*relays, offer(a), offer(b)])
    from_b = relay_order(b, a, list(reversed(relays)))
    assert [o.public_key for o in from_a] == [o.public_key for o in from_b]
    assert {o.public_key for o in from_a} == {o.public_key for o in relays}
    # Pairs spread over relays: not every pair picks the same first one.
    firsts = {relay_order(key(), key(), relays)[0].public_key for _ in range(40)}
    assert len(firsts) > 1


def test_a_pair_moves_through_a_few_relays_at_most() -> None:
    relays = [offer(key()) for _ in range(MAX_RELAYS_PER_PAIR + 3)]
    assert len(relay_order(key(), key(), relays)) == MAX_RELAYS_PER_PAIR


def test_offers_are_relays_that_are_up_here_at_their_endpoints_address() -> None:
    up_relay, down_relay, no_endpoint, not_relay = key(), key(), key(), key()
    offered = {
        k: (node_id_for(k), name, (29100, 256))
        for k, name in ((up_relay, "r1"), (down_relay, "r2"), (no_endpoint, "r3"))
    }
    endpoints = {
        up_relay: Endpoint.parse("203.0.113.30:51820"),
        down_relay: Endpoint.parse("203.0.113.31:51820"),
        not_relay: Endpoint.parse("203.0.113.32:51820"),
    }
    (found,) = offers_of(offered, endpoints, [up_relay, no_endpoint, not_relay])
    assert found == replace(offer(up_relay), name="r1")


def rtts(*figures: tuple[RelayOffer, int]) -> RoundTrips:
    return tuple(sorted((o.node_id, ms) for o, ms in figures))


def test_both_sides_rank_relays_by_the_round_trip_through_them() -> None:
    a, b = key(), key()
    near, far, hashed = offer(key()), offer(key()), offer(key())
    relays = [far, hashed, near]
    # a is far from `near`, b very near it: the sum decides, not either side alone; a relay
    # only one side timed comes after those both timed.
    a_rtts = rtts((near, 40), (far, 30), (hashed, 1))
    b_rtts = rtts((near, 2), (far, 30))
    from_a = relay_order(a, b, relays, a_rtts, b_rtts)
    from_b = relay_order(b, a, list(reversed(relays)), b_rtts, a_rtts)
    assert from_a == from_b == (near, far, hashed)


def test_equal_round_trips_fall_back_to_the_hash_order_both_sides_share() -> None:
    a, b = key(), key()
    relays = [offer(key()) for _ in range(3)]
    same = rtts(*((r, 5) for r in relays))
    assert relay_order(a, b, relays, same, same) == relay_order(a, b, relays)
    assert relay_order(b, a, relays, same, same) == relay_order(a, b, relays)


@pytest.mark.parametrize(
    ("bound_ms", "first_ms", "moves"),
    [
        (130, 65, True),  # 65 ms nearer: half
        (130, 66, False),  # 64 ms nearer: not half
        (50, 10, True),  # 40 ms nearer, more than half
        (50, 11, False),  # 39 ms: under the 40 ms floor
        (None, 5, False),  # the bound one's round trip unknown: stay
        (100, None, False),
    ],
)
def test_a_bound_pair_moves_only_to_a_much_nearer_relay(
    bound_ms: int | None, first_ms: int | None, moves: bool
) -> None:
    bound, first = offer(key()), offer(key())
    # Split between the two sides: only the sum counts.
    side = rtts(*((o, ms // 2) for o, ms in ((bound, bound_ms), (first, first_ms)) if ms))
    peer = rtts(*((o, ms - ms // 2) for o, ms in ((bound, bound_ms), (first, first_ms)) if ms))
    assert nearer((first, bound), bound, side, peer) is moves
    assert nearer((bound, first), bound, side, peer) is False  # already at the first


def test_published_round_trips_follow_the_network_not_jitter() -> None:
    r1, r2, r3 = (node_id_for(key()) for _ in range(3))
    published = published_round_trips((), {r1: 0.0031, r2: 0.0504})
    assert published == tuple(sorted(((r1, 3), (r2, 50))))
    # Within 5 ms, or a fifth: kept as said (no new record); beyond: the new figure.
    assert published_round_trips(published, {r1: 0.0079, r2: 0.0599}) == published
    moved = published_round_trips(published, {r1: 0.0091, r2: 0.0611, r3: 0.2})
    assert moved == tuple(sorted(((r1, 9), (r2, 61), (r3, 200))))
    # A relay no longer timed is dropped; absurd figures are bounded.
    assert published_round_trips(moved, {r3: 99.0}) == ((r3, 60_000),)
    many = {node_id_for(key()): i / 1000 for i in range(MAX_PUBLISHED + 4)}
    kept = published_round_trips((), many)
    assert sorted(ms for _, ms in kept) == list(range(MAX_PUBLISHED))


# --- the record field -----------------------------------------------------------------------

NODE = generate_identity(os.urandom)


def record(relay_ports: tuple[int, int] | None, relay_rtts: RoundTrips = ()) -> MemberRecord:
    info = AffiliateInfo(
        NODE.node_id,
        "relay1",
        NODE.public_key_b64,
        ipaddress.IPv6Address("fd00::1"),
        (ipaddress.ip_address("203.0.113.30"),),
        relay_ports=relay_ports,
        relay_rtts=relay_rtts,
    )
    unsigned = MemberRecord(info, (Endpoint.parse("203.0.113.30:51820"),), 3, 1_800_000_000)
    return sign_record(unsigned, NODE.private_key, os.urandom(64))


def test_a_relay_says_so_in_its_signed_record_and_others_do_not_mention_it() -> None:
    offered = record((29100, 256))
    assert decode_record(encode_record(offered)) == offered
    assert b'"relay_ports":[29100,256]' in encode_record(offered)
    assert b"relay_ports" not in encode_record(record(None))


def test_round_trips_to_relays_travel_in_the_signed_record_only_when_known() -> None:
    relay_ids = sorted(node_id_for(key()) for _ in range(2))
    timed = record(None, ((relay_ids[0], 3), (relay_ids[1], 250)))
    assert decode_record(encode_record(timed)) == timed
    assert f'"relay_rtt_ms":{{"{relay_ids[0]}":3,'.encode() in encode_record(timed)
    assert b"relay_rtt_ms" not in encode_record(record(None))


def resigned(field: str, value: object) -> bytes:
    """The relay's record with `field` set to `value`, signed again by the node."""
    document = json.loads(encode_record(record((29100, 256))))
    document.pop("sig")
    document[field] = value
    signature = xeddsa.sign(NODE.private_key, SIGNED_PREFIX + canonical(document), os.urandom(64))
    document["sig"] = base64.b64encode(signature).decode()
    return canonical(document)


@pytest.mark.parametrize("bad", [[29100], [29100, 255], [0, 2], [65535, 2], ["29100", 2], True])
def test_a_malformed_relay_offer_refuses_the_record(bad: object) -> None:
    with pytest.raises(ValueError, match="relay_ports"):
        decode_record(resigned("relay_ports", bad))


@pytest.mark.parametrize(
    "bad",
    [
        ["a", 1],
        {"node-1": 3},
        {"a": -1},
        {"a": 60_001},
        {"a": 2.5},
        {"a": True},
        {"a": "3"},
        {f"n{i}": 1 for i in range(9)},
    ],
)
def test_malformed_round_trips_refuse_the_record(bad: object) -> None:
    with pytest.raises(ValueError, match="relay_rtt_ms"):
        decode_record(resigned("relay_rtt_ms", bad))


# --- config ---------------------------------------------------------------------------------

CONFIG = """\
machine:
  network:
    kubespan:
      enabled: true
      relay:
        enabled: true
{ports}cluster:
  id: {cluster_id}
  secret: {secret}
  discovery:
    enabled: true
    registries:
      service:
        endpoint: https://discovery.example
"""


def config(ports: str = "") -> str:
    line = f'        ports: "{ports}"\n' if ports else ""
    return CONFIG.format(ports=line, cluster_id="c" * 43 + "=", secret="A" * 43 + "=")


def test_relay_is_off_unless_enabled_and_has_default_ports() -> None:
    parsed = parse_config(config().encode(), "node.yaml")
    assert parsed.kubespan.relay and parsed.kubespan.relay_ports == (29100, 256)
    assert parse_config(config("40000-40009").encode(), "node.yaml").kubespan.relay_ports == (
        40000,
        10,
    )
    plain = parse_config(
        config().replace("      relay:\n        enabled: true\n", "").encode(), "n.yaml"
    )
    assert not plain.kubespan.relay


@pytest.mark.parametrize(
    "ports", ["40000-40010", "40010-40000", "0-9", "40000-70000", "x-y", "51800-51899"]
)
def test_bad_relay_ports_are_a_config_error_naming_the_field(ports: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(config(ports).encode(), "node.yaml")
    assert any("relay.ports" in str(p) for p in raised.value.problems), raised.value.problems


# --- rules ----------------------------------------------------------------------------------


def test_a_relays_answers_leave_from_its_ports_like_wireguards_own_packets() -> None:
    plain = RulesetSpec((), (), 1420, 51820).render()
    relay = RulesetSpec((), (), 1420, 51820, (29100, 256)).render()
    assert "udp sport 51820 meta mark & 0x60 == 0x20 accept" in plain
    assert (
        "udp sport 29100-29355 udp length 134 @th,64,32 0x4b537262 meta mark & 0x60 == 0x20 accept"
    ) in relay
    assert replace(RulesetSpec((), (), 1420, 51820), relay_ports=None).render() == plain


def test_forwarded_packets_are_kept_out_of_the_relays_own_tunnel() -> None:
    pair = RelayedPair(
        ipaddress.ip_address("203.0.113.30"),
        RelaySide(29100, Endpoint.parse("198.51.100.1:40000")),
        RelaySide(29101, Endpoint.parse("192.0.2.2:51820")),
    )
    text = RelaySpec.of([pair]).render()
    chain = text[text.index("chain exempt") : text.index("chain postrouting")]
    assert "type filter hook prerouting priority 10;" in chain
    assert (
        "ip saddr 198.51.100.1 udp sport 40000 ip daddr 192.0.2.2 udp dport 51820 "
        "@th,64,32 { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } ct state untracked "
        "meta mark set meta mark & 0xffffffbf"
    ) in chain


def test_the_relay_answer_exemption_matches_the_bind_codec() -> None:
    from kubespan.plan import ruleset
    from kubespan.relay import bind

    assert ruleset.RELAY_TAG == bind.TAG
    assert ruleset.RELAY_ANSWER_UDP_BYTES == 8 + bind.MESSAGE_BYTES


def test_a_dead_peer_wants_no_relay() -> None:
    from kubespan.plan.peerstate import DOWN_AFTER

    assert not wants_relay(T0 + DOWN_AFTER + 1, tracked(), DOWN, None)
