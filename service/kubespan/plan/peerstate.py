"""Peer health from handshakes, and rotation through a peer's endpoint candidates.

Durations are measured on the monotonic clock: a wall-clock step (NTP, a VM restored from a
snapshot) neither freezes a dead endpoint as `unknown` nor rotates off a working one. The
kernel reports the last handshake as a wall-clock time, so it is used only as a value: a
handshake is *new* when that value changed, and the monotonic time at which a change was
first observed stands for its age.

State, measured from the last endpoint change T0 (WireGuard's timers give the bounds): within
TRIAL of T0 a peer is up once a new handshake came after T0, else unknown (on the very first
trial) or down (on later ones: it already failed once); until DOWN_AFTER it is up once a new
handshake came after T0, else down; later it is up while its last new handshake was observed
less than DOWN_AFTER ago.

Rotation remembers endpoints, not positions: it tries the candidates not yet tried in this
cycle, in the order given, so a candidate list that changes mid-rotation loses nothing and
repeats nothing, and an agent restarted mid-trial carries on from the endpoint the kernel has.
A peer that stays dead backs off: each full cycle of candidates multiplies the time spent on
each one (15 s, 1 min, 4 min, ... up to 20 min), so a hundred dead peers cost a few kernel
changes an hour, not thousands; they stay in the member set all the while (fail closed). A
handshake, or a candidate never seen before, ends the backoff. An endpoint WireGuard learned
from the peer's own packets (roaming) is kept while the peer is up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint

ENDPOINT_TRIAL = 15.0
# WireGuard reject-after (180 s) + rekey-timeout (5 s) + rekey-attempt (90 s).
DOWN_AFTER = 275.0
DWELL_GROWTH = 4.0
DWELL_CAP = 1200.0


@dataclass(frozen=True)
class Tracking:
    """What the planner remembers about one peer between passes (monotonic times)."""

    endpoint: Endpoint | None  # under trial: set by us, or found in the kernel
    since: float  # T0: when it was set
    handshake_at_change: float | None  # the kernel's last-handshake value at T0
    handshake: float | None  # the kernel's last-handshake value last observed
    handshake_seen: float | None  # when that value was first observed (or estimated)
    tried: tuple[Endpoint, ...] = ()  # candidates tried in this cycle, in order
    cycles: int = 0  # full cycles of candidates without a handshake
    seen_candidates: frozenset[Endpoint] = frozenset()
    trials: int = 1  # endpoints tried since the peer was last up (or first known)
    known_since: float = 0.0  # when this peer was first tracked (monotonic)

    @property
    def first_trial(self) -> bool:
        return self.trials <= 1


def given_up(now: float, tracking: Tracking, state: PeerState) -> bool:
    """Down after a fair chance: tracked for DOWN_AFTER at least (a first 15 s trial that
    fails proves nothing about a node whose second endpoint works)."""
    return state is PeerState.DOWN and now - tracking.known_since >= DOWN_AFTER


def dwell(cycles: int) -> float:
    """How long each candidate is tried after `cycles` failed full cycles."""
    return float(min(DWELL_CAP, ENDPOINT_TRIAL * DWELL_GROWTH ** min(cycles, 16)))


def peer_state(now: float, tracking: Tracking) -> PeerState:
    elapsed = now - tracking.since
    new_since_change = (
        tracking.handshake is not None and tracking.handshake != tracking.handshake_at_change
    )
    if elapsed < ENDPOINT_TRIAL:
        if new_since_change:
            return PeerState.UP
        return PeerState.UNKNOWN if tracking.first_trial else PeerState.DOWN
    if elapsed < DOWN_AFTER:
        return PeerState.UP if new_since_change else PeerState.DOWN
    seen = tracking.handshake_seen
    if seen is not None and now - seen < DOWN_AFTER:
        return PeerState.UP
    return PeerState.DOWN


@dataclass(frozen=True)
class EndpointDecision:
    tracking: Tracking
    state: PeerState
    set_endpoint: Endpoint | None  # None: leave the kernel's endpoint as it is


def observe_handshake(
    previous: Tracking | None, last_handshake: float | None, now: float, wall_now: float
) -> tuple[float | None, float | None]:
    """(value, monotonic time first seen) of the kernel's last handshake."""
    if previous is not None and last_handshake == previous.handshake:
        return previous.handshake, previous.handshake_seen
    if last_handshake is None:
        return None, None
    if previous is None:
        # Found at start: its age is all the wall clock can tell. Bounded both ways, so a
        # clock step makes it neither younger than now nor older than "long gone".
        age = min(max(wall_now - last_handshake, 0.0), 2 * DOWN_AFTER)
        return last_handshake, now - age
    return last_handshake, now


def decide_endpoint(
    now: float,
    wall_now: float,
    candidates: tuple[Endpoint, ...],
    previous: Tracking | None,
    observed_endpoint: Endpoint | None,
    last_handshake: float | None,
) -> EndpointDecision:
    """Keep a working endpoint; when the current one has had its time, try the next."""
    handshake, seen = observe_handshake(previous, last_handshake, now, wall_now)
    everything = frozenset(candidates)
    if previous is None:
        return _first(now, candidates, observed_endpoint, handshake, seen, everything)
    tracking = replace(previous, handshake=handshake, handshake_seen=seen)
    state = peer_state(now, tracking)
    fresh = everything - tracking.seen_candidates
    tracking = replace(tracking, seen_candidates=tracking.seen_candidates | everything)
    if state is PeerState.UP:
        if tracking.cycles or len(tracking.tried) > 1 or tracking.trials > 1:
            tracking = replace(tracking, cycles=0, tried=tuple(tracking.tried[-1:]), trials=1)
        return EndpointDecision(tracking, state, None)
    if not candidates:
        return EndpointDecision(tracking, state, None)
    if fresh:
        tracking = replace(tracking, cycles=0)
    current_usable = tracking.endpoint in everything
    if observed_endpoint is None and current_usable:
        # The kernel lost the endpoint (its peer was recreated): put it back, same trial.
        return EndpointDecision(tracking, state, tracking.endpoint)
    if current_usable and now - tracking.since < dwell(tracking.cycles):
        return EndpointDecision(tracking, state, None)
    untried = [c for c in candidates if c not in tracking.tried]
    tried, cycles = tracking.tried, tracking.cycles
    if not untried:
        untried, tried, cycles = list(candidates), (), cycles + 1
    following = untried[0]
    if following == observed_endpoint and len(candidates) == 1:
        # Nothing else to try: stay, with no kernel change, until a handshake comes.
        stay = replace(tracking, tried=(following,), cycles=cycles)
        return EndpointDecision(stay, state, None)
    moved = Tracking(
        following,
        now,
        handshake,
        handshake,
        seen,
        (*tried, following),
        cycles,
        everything,
        tracking.trials + 1,
        tracking.known_since,
    )
    return EndpointDecision(moved, state, following)


def _first(
    now: float,
    candidates: tuple[Endpoint, ...],
    observed_endpoint: Endpoint | None,
    handshake: float | None,
    seen: float | None,
    everything: frozenset[Endpoint],
) -> EndpointDecision:
    if observed_endpoint is not None:
        # Found in the kernel (an earlier run of the agent): carry on from that endpoint;
        # the candidates before it were tried before (rotation goes on after it).
        done = (
            candidates[: candidates.index(observed_endpoint) + 1]
            if observed_endpoint in everything
            else (observed_endpoint,)
        )
        if handshake is not None:
            # With a handshake: judge it by the handshake's age, not by a new trial.
            adopted = Tracking(
                observed_endpoint, now - DOWN_AFTER, None, handshake, seen, done, 0, everything,
                known_since=now,
            )  # fmt: skip
            return EndpointDecision(adopted, peer_state(now, adopted), None)
        if observed_endpoint in everything or not candidates:
            resumed = Tracking(
                observed_endpoint, now, None, None, None, done, 0, everything, known_since=now
            )
            return EndpointDecision(resumed, PeerState.UNKNOWN, None)
    if not candidates:
        waiting = Tracking(
            None, now, handshake, handshake, seen, (), 0, everything, known_since=now
        )
        return EndpointDecision(waiting, PeerState.UNKNOWN, None)
    first = candidates[0]
    started = Tracking(
        first, now, handshake, handshake, seen, (first,), 0, everything, known_since=now
    )
    return EndpointDecision(started, PeerState.UNKNOWN, first)
