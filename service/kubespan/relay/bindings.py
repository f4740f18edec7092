"""The relay's side of binding, as data: which sides are bound, at which port and mapping,
until when; the answer to each bind; and the pairs that follow (both sides bound with the
same attempt, at relay addresses of the same IP version: each side may reach the relay at
another of its addresses). Relays carry IPv4 pairs only, for now.

Time and the clock are passed in: `now` is monotonic seconds (when bindings lapse), `wall_ms`
the relay's clock (how fresh a bind is)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kubespan.netaddr import Endpoint, IPAddress
from kubespan.relay.bind import BindMessage, Kind, Refusal
from kubespan.relay.forward import RelayedPair, RelaySide, RelaySpec
from kubespan.relay.ports import MAX_ATTEMPTS, PortRange, pair_ports

BIND_LIFETIME_SECONDS = 60.0  # a side binds again every 20 s: three lost binds and it lapses
CLOCK_SKEW_MS = 90_000  # how far a side's clock may be from the relay's
# A lapsed binding is remembered this much longer (not forwarded, holding no port), so its
# last bind cannot be replayed once it has lapsed: any bind older is outside the clock window.
REMEMBER_SECONDS = BIND_LIFETIME_SECONDS + 2 * CLOCK_SKEW_MS / 1000
# A side told it is alone renews its binding every 2 s (relay.client). One not renewed for
# this long was left by its side (it gave up waiting and moved on): a side binding later is
# told it is alone too, instead of taking the leftover for its peer and finding out when it
# lapses. (A side told it is paired renews every 20 s, and a side moving to another relay
# leaves that binding to carry the pair meanwhile: it counts while it lives.)
ALONE_RENEWED_WITHIN_SECONDS = 10.0
# One-sided bindings a member may hold at once: each holds two ports until its peer binds.
ONE_SIDED_PER_MEMBER = 16


@dataclass(frozen=True)
class SideBinding:
    side: bytes
    peer: bytes
    attempt: int
    port: int
    address: IPAddress  # the relay's own address the side sends to
    mapping: Endpoint  # where the side's datagrams come from, as the relay sees them
    time_ms: int  # the side's clock in its latest bind: an older one is a replay
    expires_at: float
    paired: bool = False  # what its latest bind was told: the other side was bound too


@dataclass(frozen=True)
class RelayPolicy:
    relay_key: bytes
    ports: PortRange
    members: frozenset[bytes]  # WireGuard public keys of the cluster's members
    max_pairs: int


@dataclass(frozen=True)
class BindOutcome:
    bindings: tuple[SideBinding, ...]
    answer: BindMessage | None  # None: nothing to answer (a side leaving)


def live(bindings: tuple[SideBinding, ...], now: float) -> tuple[SideBinding, ...]:
    return tuple(b for b in bindings if b.expires_at > now)


def remembered(bindings: tuple[SideBinding, ...], now: float) -> tuple[SideBinding, ...]:
    """Live bindings and those lapsed recently enough that their binds could be replayed."""
    return tuple(
        b for b in bindings if b.expires_at - BIND_LIFETIME_SECONDS + REMEMBER_SECONDS > now
    )


def lapsed_at(
    bindings: tuple[SideBinding, ...], gone: frozenset[IPAddress], now: float
) -> tuple[SideBinding, ...]:
    """The bindings after the relay lost the addresses `gone` (renumbered): those made at
    one of them lapse now, remembered still (their binds cannot be replayed). The relay can
    no longer send from there, and the side's release, sent there, never arrives: kept, such
    a binding would pair with the other side binding at the new address, and forward to it
    from an address its NAT may still admit replies from, where its WireGuard would follow
    (a path that then forwards nothing until found dead)."""
    return tuple(
        replace(b, expires_at=now) if b.address in gone and b.expires_at > now else b
        for b in bindings
    )


def next_change(bindings: tuple[SideBinding, ...], now: float) -> float | None:
    """When the earliest live binding lapses (the forwarded pairs may change then)."""
    return min((b.expires_at for b in live(bindings, now)), default=None)


def take_bind(
    bindings: tuple[SideBinding, ...],
    message: BindMessage,
    source: Endpoint,
    destination: Endpoint,
    policy: RelayPolicy,
    now: float,
    wall_ms: int,
) -> BindOutcome | None:
    """The bindings after an authentic BIND from `source` to the relay's `destination`, and
    the answer; None for what deserves no answer and changes nothing (not a BIND, not from a
    member, sent to an address the relay does not relay on, or a replay).

    What is a replay or out of the clock window is decided before any other refusal: every
    answer goes back to wherever the bind claims to come from, so a refusal decided first
    would reflect a bind copied once, however old, as often as it is sent again."""
    if message.kind != Kind.BIND or message.sender not in policy.members:
        return None
    if destination.address.version != 4:
        # Relays carry IPv4 pairs only and are offered at their IPv4 addresses only
        # (relay.choice), so no side binds here: a refusal would serve only those who
        # replay binds to it. A side that did would leave the relay after its answer wait.
        return None
    kept = remembered(bindings, now)
    current = live(kept, now)
    if message.leaving:
        side = (message.sender, message.peer)
        previous = next((b for b in kept if (b.side, b.peer) == side), None)
        return BindOutcome(_left(kept, previous, message, now, wall_ms), None)

    def refuse(reason: Refusal, attempt: int | None = None) -> BindOutcome:
        answer = _answer(message, policy, Kind.REFUSED, reason=reason)
        if attempt is not None:
            answer = replace(answer, attempt=attempt)
        return BindOutcome(kept, answer)

    side = (message.sender, message.peer)
    previous = next((b for b in kept if (b.side, b.peer) == side), None)
    if previous is not None and message.time_ms <= previous.time_ms:
        return None  # a replay (Refusal.REPLAYED is never sent: it would reflect it)
    if abs(wall_ms - message.time_ms) > CLOCK_SKEW_MS:
        # A side with a skewed clock needs to hear this, but a bind replayed once its
        # binding is forgotten gets it too: relay.server tells a side once a minute at most.
        return refuse(Refusal.STALE)
    if message.peer == message.sender or message.peer not in policy.members:
        return refuse(Refusal.UNKNOWN_PEER)
    if message.attempt >= MAX_ATTEMPTS or destination.port not in policy.ports:
        return refuse(Refusal.WRONG_PORT)
    own, theirs = pair_ports(
        policy.ports, policy.relay_key, message.sender, message.peer, message.attempt
    )
    if destination.port != own:
        return refuse(Refusal.WRONG_PORT)
    peer_side = next((b for b in current if (b.side, b.peer) == side[::-1]), None)
    if peer_side is not None and peer_side.attempt != message.attempt:
        # Both bound, at different attempts (one was sent on by PORT_TAKEN meanwhile): say
        # where the other is, or they would wait for each other forever.
        return refuse(Refusal.PEER_AT_ATTEMPT, peer_side.attempt)
    pair = frozenset(side)
    others = [b for b in current if frozenset((b.side, b.peer)) != pair]
    if any(b.port in (own, theirs) for b in others):
        return refuse(Refusal.PORT_TAKEN)
    complete = _complete_pairs(others)
    one_sided = sum(
        1
        for b in others
        if b.side == message.sender and frozenset((b.side, b.peer)) not in complete
    )
    if len(complete) >= policy.max_pairs or (
        peer_side is None and one_sided >= ONE_SIDED_PER_MEMBER
    ):
        return refuse(Refusal.FULL)
    binding = SideBinding(
        side=message.sender,
        peer=message.peer,
        attempt=message.attempt,
        port=own,
        address=destination.address,
        mapping=source,
        time_ms=message.time_ms,
        expires_at=now + BIND_LIFETIME_SECONDS,
    )
    # Paired: the other side is bound too (same attempt, checked above) and has not left, so
    # the pair is forwarded; a side bound alone for long moves to another relay
    # (relay.client).
    paired = (
        peer_side is not None
        and _same_version(binding, peer_side)
        and (
            peer_side.paired
            or now - (peer_side.expires_at - BIND_LIFETIME_SECONDS) <= ALONE_RENEWED_WITHIN_SECONDS
        )
    )
    binding = replace(binding, paired=paired)
    rest = tuple(b for b in kept if b is not previous)
    answer = _answer(message, policy, Kind.BOUND, observed=source, paired=paired)
    return BindOutcome((*rest, binding), answer)


def _left(
    kept: tuple[SideBinding, ...],
    previous: SideBinding | None,
    message: BindMessage,
    now: float,
    wall_ms: int,
) -> tuple[SideBinding, ...]:
    """The bindings after a side's leave (a BIND saying it gives its binding up): that
    binding lapsed now, and remembered with the leave's clock, so no bind from before it can
    be replayed; the pair stops, and a side binding later is told it is alone. A leave that
    is not newer than the side's last bind, too far from the relay's clock, or for another
    attempt changes nothing; none is answered."""
    if (
        previous is None
        or message.time_ms <= previous.time_ms
        or abs(wall_ms - message.time_ms) > CLOCK_SKEW_MS
        or previous.attempt != message.attempt
    ):
        return kept
    gone = replace(previous, time_ms=message.time_ms, expires_at=min(previous.expires_at, now))
    return tuple(gone if b is previous else b for b in kept)


def _complete_pairs(bindings: list[SideBinding]) -> set[frozenset[bytes]]:
    sides = {(b.side, b.peer) for b in bindings}
    return {frozenset(s) for s in sides if s[::-1] in sides}


def forwarded(
    bindings: tuple[SideBinding, ...], now: float, ports: PortRange | None = None
) -> RelaySpec:
    """The pairs to forward: both sides bound, with the same attempt and relay address."""
    current = {(b.side, b.peer): b for b in live(bindings, now)}
    pairs = []
    for (side, peer), binding in current.items():
        other = current.get((peer, side))
        if side > peer or other is None:
            continue  # each pair once, from its lower key; or not both bound yet
        if other.attempt != binding.attempt or not _same_version(binding, other):
            continue
        pairs.append(
            RelayedPair(
                binding.address,
                RelaySide(binding.port, binding.mapping),
                RelaySide(other.port, other.mapping, other.address),
            )
        )
    return RelaySpec.of(pairs, ports)


def _same_version(one: SideBinding, other: SideBinding) -> bool:
    return (
        one.address.version
        == other.address.version
        == one.mapping.address.version
        == (other.mapping.address.version)
    )


def _answer(
    message: BindMessage,
    policy: RelayPolicy,
    kind: Kind,
    reason: Refusal | None = None,
    observed: Endpoint | None = None,
    paired: bool = False,
) -> BindMessage:
    # The bind's clock and transaction echoed: the side matches the answer to its bind.
    return replace(
        message,
        kind=kind,
        sender=policy.relay_key,
        reason=reason,
        observed=observed,
        paired=paired,
    )
