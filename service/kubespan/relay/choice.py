"""Which pairs need a relay and which relay they use: decided alike by both sides, so no
message has to say it.

A side asks for a relay for a peer that is not up once it has had a fair chance to come up
directly (RELAY_AFTER since the peer was first tracked, or a full cycle of its candidates
failed), and keeps its binding while the peer is up through the relay. Relays are the
members that offer to relay (their sealed record says on which ports) and that this node has
a working tunnel to: their WireGuard endpoint here is where their ports are reached. Both
sides rank the relays by a hash of the pair and the relay, so they pick the same one wherever
they both reach it; a relay that does not answer a side is skipped by that side for a while
(relay.client), and the other side, which sees the same relay die, moves on alike.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.plan.peerstate import Tracking, given_up
from kubespan.relay.ports import PortRange

RELAY_AFTER = 8.0  # seconds a new peer gets to come up directly before a relay is bound
MAX_RELAYS_PER_PAIR = 4  # the relays one pair may move through, best first
_PERSON = b"kubespan-relayor"


@dataclass(frozen=True)
class RelayOffer:
    """A member that relays, as this node reaches it."""

    public_key: bytes  # its WireGuard key
    name: str
    address: IPAddress  # its address in this node's WireGuard endpoint for it
    ports: PortRange


def wants_relay(
    now: float,
    tracking: Tracking | None,
    state: PeerState,
    relayed_at: Endpoint | None,
    direct_answered: bool = False,
) -> bool:
    """Whether this side should hold a relay binding for the peer now. `relayed_at`: the
    relay endpoint bound for it, if any; `direct_answered`: a direct candidate answered a
    path check lately (its trial is under way, and will most likely work)."""
    if tracking is None:
        return False
    if state is PeerState.UP:
        return relayed_at is not None and tracking.endpoint == relayed_at
    if direct_answered or given_up(now, tracking, state):
        return False  # a dead peer holds no relay's ports
    return tracking.cycles >= 1 or now - tracking.known_since >= RELAY_AFTER


def relay_order(side: bytes, peer: bytes, offers: Iterable[RelayOffer]) -> tuple[RelayOffer, ...]:
    """The relays for the pair (side, peer), in the order both sides rank them: never one of
    the pair itself."""
    return _ranked(side, peer, tuple(offers))


@functools.lru_cache(maxsize=4096)  # the same pairs and relays every pass
def _ranked(side: bytes, peer: bytes, offers: tuple[RelayOffer, ...]) -> tuple[RelayOffer, ...]:
    low, high = sorted((side, peer))

    def rank(offer: RelayOffer) -> bytes:
        return hashlib.blake2b(
            low + high + offer.public_key, digest_size=16, person=_PERSON
        ).digest()

    usable = {o.public_key: o for o in offers if o.public_key not in (side, peer)}
    return tuple(sorted(usable.values(), key=rank))[:MAX_RELAYS_PER_PAIR]


def offers_of(
    relay_ports: dict[bytes, tuple[str, tuple[int, int]]],
    endpoints: dict[bytes, Endpoint],
    up: Iterable[bytes],
) -> tuple[RelayOffer, ...]:
    """Relays this node can use: members whose record offers relaying (key -> (name,
    (first, count))), that are up here, at the IPv4 address of their WireGuard endpoint
    (relays carry IPv4 pairs only)."""
    offers = []
    for key in up:
        offered, endpoint = relay_ports.get(key), endpoints.get(key)
        if offered is None or endpoint is None or endpoint.address.version != 4:
            continue
        name, (first, count) = offered
        try:
            offers.append(RelayOffer(key, name, endpoint.address, PortRange(first, count)))
        except ValueError:
            continue  # checked when the record was read; a range that cannot be is no relay
    return tuple(offers)
