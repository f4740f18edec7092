"""Which pairs need a relay and which relay they use: decided alike by both sides, so no
message has to say it.

A side asks for a relay for a peer that is not up once it has had a fair chance to come up
directly (RELAY_AFTER since the peer was first tracked, or a full cycle of its candidates
failed), and keeps its binding while the peer is up through the relay. Relays are the
members that offer to relay (their sealed record says on which ports) and that this node has
a working tunnel to, directly: their WireGuard endpoint here is where their ports are reached.

Both sides rank the relays alike, from what both have published: each node times round trips
to the relays it reaches (path checks to their WireGuard port, every RTT_SAMPLE_EVERY while
a peer is not up directly, every RTT_IDLE_SAMPLE_EVERY otherwise) and says
them in its sealed record (`relay_rtt_ms`, republished only when a figure moved by more than
PUBLISH_MARGIN_MS and a fifth, so jitter costs no records). A pair ranks first the relays
both sides timed, by the sum of the two round trips (the round trip through the relay), then
the others; ties go by a hash of the pair and the relay. A relay that does not answer a side
is skipped by that side for a while (relay.client), and the other side, which sees the same
relay die, moves on alike. A pair bound at a relay stays there while it carries the pair,
unless the first of its order is nearer by MOVE_MARGIN_MS and half (`nearer`): both sides
see that from the same records, and move.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kubespan.discovery.payload import MAX_RELAY_RTTS, MAX_RTT_MS
from kubespan.model import PeerState
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.plan.peerstate import Tracking, given_up
from kubespan.relay.ports import PortRange

RELAY_AFTER = 8.0  # seconds a new peer gets to come up directly before a relay is bound
MAX_RELAYS_PER_PAIR = 4  # the relays one pair may move through, best first
RTT_SAMPLE_EVERY = 10.0  # seconds between round trips timed to each relay, while needed
RTT_IDLE_SAMPLE_EVERY = 60.0  # ... while every peer is up directly (no relay in sight)
PUBLISH_MARGIN_MS = 5  # a published round trip changes by more than this and a fifth
MOVE_MARGIN_MS = 40  # a bound pair moves to a relay nearer by this and half at least
MAX_PUBLISHED = MAX_RELAY_RTTS  # relays whose round trips a record carries
_PERSON = b"kubespan-relayor"

RoundTrips = tuple[tuple[str, int], ...]  # ((relay node id, ms), ...), sorted by node id


@dataclass(frozen=True)
class RelayOffer:
    """A member that relays, as this node reaches it."""

    public_key: bytes  # its WireGuard key
    node_id: str
    name: str
    address: IPAddress  # its address in this node's WireGuard endpoint for it
    ports: PortRange


def wants_relay(
    now: float,
    tracking: Tracking | None,
    state: PeerState,
    relayed_at: Endpoint | None,
    direct_answered: bool = False,
    current: Endpoint | None = None,
    via_relay: bool = False,
) -> bool:
    """Whether this side should hold a relay binding for the peer now. `relayed_at`: the
    relay endpoint bound for it, if any; `direct_answered`: a direct candidate answered a
    path check lately (its trial is under way, and will most likely work); `current`:
    WireGuard's endpoint for the peer (it follows the peer's packets: a pair whose trial of
    a direct candidate came up through the relay, the other side's, is up through it);
    `via_relay`: that endpoint, or the one under trial, is a relay's port. A pair up through
    a relay keeps a binding even when it is at another relay than the one it is up through:
    the relay it was up through died, and the pair is not yet found dead (it is "up" on the
    dead relay's port for up to 15 s), so the binding at the next relay is its way on. And
    it wants one while it has none: its binding is being made again (the relay is reached
    at another address now, or the pair is moving to a nearer one), and a pair let go then
    would lose its relay when the binding it is up through lapses, a minute later."""
    if tracking is None:
        return False
    if state is PeerState.UP:
        return via_relay or (relayed_at is not None and relayed_at in (tracking.endpoint, current))
    if direct_answered or given_up(now, tracking, state):
        return False  # a dead peer holds no relay's ports
    return tracking.cycles >= 1 or now - tracking.known_since >= RELAY_AFTER


def relay_order(
    side: bytes,
    peer: bytes,
    offers: Iterable[RelayOffer],
    side_rtts: RoundTrips = (),
    peer_rtts: RoundTrips = (),
) -> tuple[RelayOffer, ...]:
    """The relays for the pair (side, peer), in the order both sides rank them (each side's
    published round trips: this node's own as its record says them, not fresher): never one
    of the pair itself."""
    low, high = sorted(((side, side_rtts), (peer, peer_rtts)))
    return _ranked(low[0], high[0], tuple(offers), low[1], high[1])


@functools.lru_cache(maxsize=4096)  # the same pairs, relays and figures every pass
def _ranked(
    low: bytes,
    high: bytes,
    offers: tuple[RelayOffer, ...],
    low_rtts: RoundTrips,
    high_rtts: RoundTrips,
) -> tuple[RelayOffer, ...]:
    def rank(offer: RelayOffer) -> tuple[bool, int, bytes]:
        through = round_trip_through(offer, low_rtts, high_rtts)
        tie = hashlib.blake2b(low + high + offer.public_key, digest_size=16, person=_PERSON)
        return through is None, through or 0, tie.digest()

    usable = {o.public_key: o for o in offers if o.public_key not in (low, high)}
    return tuple(sorted(usable.values(), key=rank))[:MAX_RELAYS_PER_PAIR]


def round_trip_through(offer: RelayOffer, one: RoundTrips, other: RoundTrips) -> int | None:
    """The round trip between a pair's sides through this relay, in ms, when both timed it."""
    a, b = dict(one).get(offer.node_id), dict(other).get(offer.node_id)
    return None if a is None or b is None else a + b


def nearer(
    order: tuple[RelayOffer, ...],
    bound: RelayOffer,
    side_rtts: RoundTrips,
    peer_rtts: RoundTrips,
) -> bool:
    """Whether the first relay of the pair's order is so much nearer than the one it is
    bound at that both sides should move: by MOVE_MARGIN_MS and half of the round trip
    through the bound one at least (timing noise moves no pair, and no pair flaps)."""
    if not order or order[0].public_key == bound.public_key:
        return False
    best = round_trip_through(order[0], side_rtts, peer_rtts)
    now = round_trip_through(bound, side_rtts, peer_rtts)
    if best is None or now is None:
        return False
    return best + max(MOVE_MARGIN_MS, now // 2) <= now


def published_round_trips(published: RoundTrips, measured: Mapping[str, float]) -> RoundTrips:
    """What this node's record says of its round trips to relays (`measured`: node id ->
    seconds, the current estimates): a published figure is kept while the estimate stays
    within PUBLISH_MARGIN_MS and a fifth of it, so records change with the network, not with
    jitter; relays no longer measured are dropped; the MAX_PUBLISHED nearest are kept."""
    before = dict(published)
    figures: dict[str, int] = {}
    for relay, seconds in measured.items():
        ms = min(MAX_RTT_MS, max(0, round(seconds * 1000)))
        kept = before.get(relay)
        if kept is not None and abs(ms - kept) <= max(PUBLISH_MARGIN_MS, kept // 5):
            ms = kept
        figures[relay] = ms
    nearest = sorted(figures.items(), key=lambda item: (item[1], item[0]))[:MAX_PUBLISHED]
    return tuple(sorted(nearest))


def offers_of(
    relay_ports: dict[bytes, tuple[str, str, tuple[int, int]]],
    endpoints: dict[bytes, Endpoint],
    up: Iterable[bytes],
) -> tuple[RelayOffer, ...]:
    """Relays this node can use: members whose record offers relaying (key -> (node id,
    name, (first, count))), that are up here (directly: `up` holds no relayed peer), at the
    IPv4 address of their WireGuard endpoint (relays carry IPv4 pairs only)."""
    offers = []
    for key in up:
        offered, endpoint = relay_ports.get(key), endpoints.get(key)
        if offered is None or endpoint is None or endpoint.address.version != 4:
            continue
        node_id, name, (first, count) = offered
        try:
            ports = PortRange(first, count)
            offers.append(RelayOffer(key, node_id, name, endpoint.address, ports))
        except ValueError:
            continue  # checked when the record was read; a range that cannot be is no relay
    return tuple(offers)
