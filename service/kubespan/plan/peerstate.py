"""Peer health from what the kernel counts, and trials of a peer's ranked endpoint candidates.

Evidence is anything authenticated from the peer: its receive counter grew, or its last
handshake changed. The kernel gives no time for either, so a change first seen at one pass
is dated to the pass before (the packet came after it): an estimate that errs early, which
can only make a probe come sooner, never keep a dead path alive longer.

A **trial** sets an endpoint at T0 and makes WireGuard send at once (`nudge`: persistent
keepalive off and on again, which starts a handshake when there is no session) and sends a
liveness probe through the tunnel (data: answered by the peer, and a handshake is started if
needed). The peer is up once evidence dated T0 or later arrives; a trial without any after
`trial` seconds has failed and the next candidate is tried. The first trial of a peer is
`unknown` until then; later ones are `down` at once (it failed before). After a full cycle
has failed, trials back off and are no longer nudged: WireGuard's own retries reach them.

A peer that is up stays up while it is heard from. After `quiet` seconds of silence it is
probed (ICMPv6 echo to its ULA, every `probe_interval`: data, which WireGuard answers within
10 s even where the peer's kernel ignores echo requests); a probe unanswered for
`probe_timeout` means the path is dead: rotation resumes at once, best candidate first. A
round of probes starts on a grid of the monotonic clock (`probe_grain`), so the rounds of
many quiet peers share passes: an idle node's passes come every probe_grain, not whenever
one of a hundred peers went quiet. So a path is found dead at most quiet + probe_grain +
probe_timeout after the last packet (15 s by default; 19 s in a mesh of more than WIDE_MESH
peers, whose grid is twice as wide: Timing.widened), not after WireGuard's 275 s. Where
probes cannot be sent or routed, the planner is given a timing without them and only
WireGuard's bound applies. While the peer is up its endpoint is never written: WireGuard
moves it to wherever the peer's authenticated packets come from (roaming), and we must not
undo that.

**Path checks** (pathcheck/) shorten all of this where they work: every trial start, and
every new candidate, sends small authenticated requests from the WireGuard port to all of a
peer's candidates at once. A candidate that answered within `proven_for` is *proven*: while
the peer is not up, the best proven candidate is set at once, whatever is under trial (the
unreachable private address of a peer behind another NAT costs nothing then). An up peer
whose probe has gone unanswered for `probe_interval` is checked too; if another candidate
answered since the peer was last heard from, the path is taken as dead and that candidate
set (a peer that roamed behind a NAT that filters its new source is found again in seconds).

Rotation remembers endpoints, not positions: it tries the candidates not yet tried in this
cycle, in rank order, so a candidate list that changes mid-rotation loses nothing and repeats
nothing, and an agent restarted mid-trial carries on from the endpoint the kernel has. A
candidate never seen before, while the peer is not up, is tried at once: both sides of a pair
behind NATs learn each other's mapping from discovery at about the same moment and start
sending to it together, which is what opens endpoint-independent NATs for each other (hole
punching). A peer that stays dead backs off: each full cycle multiplies the time spent on each
candidate (5 s, then 1 min, 4 min, 16 min, up to 20 min), so a hundred dead peers cost a few kernel
changes an hour; they stay in the member set all the while (fail closed).

Durations are measured on the monotonic clock; the wall clock only dates a handshake found at
start (bounded both ways, so a clock step makes it neither younger than now nor ancient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from kubespan.frozen import evolve, require_plain
from kubespan.model import PeerState
from kubespan.netaddr import Endpoint

# WireGuard retransmits a handshake initiation 5 s (plus up to 1/3 s) after the last one and
# sends none sooner, however often it is nudged. A trial ends this much before that moment,
# so the retransmission goes to the next candidate rather than once more to the failed one
# (which would leave the next candidate without an initiation for another 5 s).
RETRANSMIT_LEAD = 0.5
CONFIGURED_TRIAL = 5.0  # endpointTrialSeconds' default


def trial_seconds(configured: float) -> float:
    """The time a trial really gets for `endpointTrialSeconds`."""
    return max(1.5, configured - RETRANSMIT_LEAD)


ENDPOINT_TRIAL = trial_seconds(CONFIGURED_TRIAL)
# Heard from within this long: up, whatever else (WireGuard reject-after 180 s + rekey-timeout
# 5 s + rekey-attempt 90 s); also the bound when probes cannot be sent or answered.
DOWN_AFTER = 275.0
DWELL_GROWTH = 4.0
BACKOFF_FIRST = 60.0
DWELL_CAP = 1200.0
# Passes asked for by time alone (rounds of probes, ends of backed-off trials) come on this
# grid of the monotonic clock, so an idle node's passes come once per grain whatever its
# peers do.
GRAIN = 4.0
BACKOFF_GRAIN = GRAIN  # backed-off trials start on this grid of the monotonic clock
# A mesh of more than WIDE_MESH peers has its rounds of probes (and backed-off trials) on a
# grid twice as wide: an idle pass costs in proportion to the peers that answer (their
# counters read, each decided again and probed), and halving the passes halves that. A dead
# path is then found within quiet + WIDE_GRAIN + probe_timeout = 19 s of its last packet
# (issue 10 asks 20), not 15.
WIDE_MESH = 16
WIDE_GRAIN = 8.0


@dataclass(frozen=True)
class Timing:
    trial: float = ENDPOINT_TRIAL  # how long one candidate gets to show evidence
    # Silence after which an up peer is probed, at the next grain. Evidence is dated to the
    # pass before the one that saw it, and an idle node's passes are on the grid, so an idle
    # peer that answers is probed once per grain, whatever this is (up to a grain).
    quiet: float = 0.5
    probe_grain: float = GRAIN  # rounds of probes start on this grid of the monotonic clock
    # A probe is data: WireGuard answers any data within 10 s (a passive keepalive) even
    # when the peer's kernel ignores echo requests, so silence this long is a dead path.
    probe_timeout: float = 10.5
    # Probes repeat this often while unanswered. One grain: a pass between two rounds would
    # only see the answer to the first, which the next round's pass sees as well.
    probe_interval: float = GRAIN
    poll: float = 0.5  # passes this often while a trial is undecided
    proven_for: float = 10.0  # a path check answer counts this long
    # An up peer's path in use gets this long to answer its check (the checker's retries
    # at 0, 0.2, 0.6 and 1.4 s) before an answer elsewhere moves the peer.
    check_patience: float = 1.5
    direct_retry: float = 60.0  # a peer up through a relay has its direct paths checked
    backoff_grain: float = BACKOFF_GRAIN  # backed-off trials start on this grid

    def dead_path_within(self) -> float:
        """How long after the last packet heard a dead path is found, at most: the quiet
        time, a grain to the next round, then the probe's timeout (test_peerstate shows it)."""
        return self.quiet + self.probe_grain + self.probe_timeout

    def widened(self) -> Timing:
        """This timing for a mesh of more than WIDE_MESH peers: probe rounds, their repeats
        and backed-off trials on WIDE_GRAIN."""
        return evolve(
            self, probe_grain=WIDE_GRAIN, probe_interval=WIDE_GRAIN, backoff_grain=WIDE_GRAIN
        )


@dataclass(frozen=True)
class Sighting:
    """What the kernel says about the peer at this pass."""

    endpoint: Endpoint | None
    last_handshake: float | None  # wall clock, as the kernel reports it
    rx_bytes: int


@dataclass(frozen=True)
class Tracking:
    """What the planner remembers about one peer between passes (monotonic times)."""

    endpoint: Endpoint | None  # under trial: set by us, or found in the kernel
    since: float  # T0: when that trial started
    handshake: float | None = None  # the kernel's last-handshake value last observed
    rx_bytes: int = 0  # the kernel's receive counter last observed
    heard: float | None = None  # estimated time of the last evidence from the peer
    observed_at: float = 0.0  # the pass that recorded the values above
    tried: tuple[Endpoint, ...] = ()  # candidates tried in this cycle, in order
    cycles: int = 0  # full cycles of candidates without evidence
    seen_candidates: frozenset[Endpoint] = frozenset()
    trials: int = 1  # endpoints tried since the peer was last up (or first known)
    known_since: float = 0.0  # when this peer was first tracked
    probe_since: float | None = None  # first probe sent after `heard`
    probed_at: float | None = None  # last probe sent
    checked_at: float | None = None  # last path check asked for while up
    # Candidates whose trial ran out without evidence in this cycle (not those a better one
    # displaced): a path check answer does not set them again until the next cycle.
    failed: tuple[Endpoint, ...] = ()
    why: str = ""  # why this endpoint: shown in status
    direct_checked_at: float | None = None  # last check of direct paths while relayed

    @property
    def first_trial(self) -> bool:
        return self.trials <= 1

    def alive_since_trial(self) -> bool:
        return self.heard is not None and self.heard >= self.since


@dataclass(frozen=True)
class EndpointDecision:
    tracking: Tracking
    state: PeerState
    set_endpoint: Endpoint | None  # None: leave the kernel's endpoint as it is
    nudge: bool = False  # make WireGuard send to the endpoint at once
    probe: bool = False  # send a liveness probe through the tunnel now
    check: bool = False  # send path checks to every candidate now
    # Remove the peer and create it again with this endpoint: WireGuard sends no handshake
    # initiation within 5 s of the last one, however it is nudged, but a new peer sends at
    # once. For a switch to a path proven by a check, while the peer is not up (or its path
    # went silent): nothing of value is lost, and the handshake goes out now, not in 5 s.
    restart: bool = False
    wake_at: float | None = None  # the next time this decision may change by itself
    # Until then the same inputs (this decision's tracking, the same sighting, candidates
    # and timing, no path-check answers, no relay) give this very decision again, but for
    # the pass's time in the tracking; None: not known (plan the peer at every pass). Set
    # only where every time-dependent turn of _decide is accounted for; never later than
    # the first of them (wake_at may be later: backoffs wake on a grid).
    steady_until: float | None = None


def dwell(cycles: int, trial: float = ENDPOINT_TRIAL) -> float:
    """How long each candidate is tried after `cycles` failed full cycles: one trial in the
    first cycle, then a minute, growing to DWELL_CAP."""
    if cycles == 0:
        return trial
    return float(min(DWELL_CAP, max(trial, BACKOFF_FIRST * DWELL_GROWTH ** min(cycles - 1, 16))))


def backoff_wake(end: float, grain: float = BACKOFF_GRAIN) -> float:
    """When to look at a backed-off peer whose dwell ends at `end`: at the next multiple of
    `grain` (Timing.backoff_grain). Dead peers' dwells end at scattered times, and each end
    would cost a pass of its own (a hundred dead peers on one-minute dwells: a pass every
    0.6 s); on a common grid, the ends of a grain share one pass. A trial a minute or more
    apart starts at most a grain later."""
    return on_grid(end, grain)


def on_grid(at: float, grain: float) -> float:
    """`at`, or the next multiple of `grain` after it."""
    return math.ceil(at / grain) * grain if grain > 0 else at


def given_up(now: float, tracking: Tracking, state: PeerState) -> bool:
    """Down after a fair chance: tracked for DOWN_AFTER at least (a first trial that fails
    proves nothing about a node whose second endpoint works), and not heard from for as long
    (a path that died a moment ago is not a node gone: only WireGuard's own bound is)."""
    heard = tracking.heard
    return (
        state is PeerState.DOWN
        and now - tracking.known_since >= DOWN_AFTER
        and (heard is None or now - heard >= DOWN_AFTER)
    )


def dead_path(now: float, tracking: Tracking, timing: Timing) -> bool:
    """Heard from since its trial, but silent since: probed in vain, or for DOWN_AFTER."""
    heard = tracking.heard
    if heard is None:
        return False
    if now - heard >= DOWN_AFTER:
        return True
    if timing.quiet >= DOWN_AFTER:
        return False  # judged without probes: earlier ones may never have been sent
    since = tracking.probe_since
    return since is not None and since > heard and now - since >= timing.probe_timeout


def peer_state(now: float, tracking: Tracking, timing: Timing = Timing()) -> PeerState:
    if not tracking.alive_since_trial():
        if now - tracking.since < timing.trial and tracking.first_trial:
            return PeerState.UNKNOWN
        return PeerState.DOWN
    return PeerState.DOWN if dead_path(now, tracking, timing) else PeerState.UP


def observe(
    previous: Tracking | None, sighting: Sighting, now: float, wall_now: float
) -> Tracking | None:
    """The tracking with this pass's kernel values; None for a peer not tracked yet."""
    if previous is None:
        return None
    grew = sighting.rx_bytes > previous.rx_bytes
    handshook = (
        sighting.last_handshake is not None and sighting.last_handshake != previous.handshake
    )
    heard = previous.observed_at if grew or handshook else previous.heard
    return evolve(
        previous,
        handshake=sighting.last_handshake,
        rx_bytes=sighting.rx_bytes,  # a counter that went back: the peer was recreated
        heard=heard,
        observed_at=now,
    )


def observed_again(tracking: Tracking, now: float) -> Tracking:
    """`tracking` as observe() leaves it when the kernel's values are those it holds: only
    the pass's time changes. (What the planner's memo gives a peer it does not plan again;
    a plain copy, for it is made for every such peer at every pass: see _in_rhythm.)"""
    copy: Tracking = object.__new__(Tracking)
    state = copy.__dict__
    state.update(tracking.__dict__)
    state["observed_at"] = now
    return copy


class Sighted(Protocol):
    """What decide_up reads of the kernel's peer: a Sighting, or the kernel's ObservedPeer
    itself (the same names), which spares a copy per peer and pass."""

    @property
    def endpoint(self) -> Endpoint | None: ...
    @property
    def last_handshake(self) -> float | None: ...
    @property
    def rx_bytes(self) -> int: ...


def decide_up(
    now: float, previous: Tracking, sighted: Sighted, timing: Timing
) -> EndpointDecision | None:
    """decide_endpoint's decision for a peer that is up, made without its candidates: what
    a mesh of peers that answer asks for every peer at every round of probes. The caller
    vouches for what that leaves out: the candidates are those of the pass that made
    `previous` (so none is new), there are no path-check answers, and neither the tracked
    endpoint nor the kernel's is a relay's. None when the peer is not up (decide in full)."""
    rhythm = probed_again(now, previous, sighted, timing)
    if rhythm is not None:
        return rhythm
    return decide_up_in_full(now, previous, sighted, timing)


def decide_up_in_full(
    now: float, previous: Tracking, sighted: Sighted, timing: Timing
) -> EndpointDecision | None:
    """decide_up for a peer probed_again has no answer for."""
    sighting = Sighting(sighted.endpoint, sighted.last_handshake, sighted.rx_bytes)
    tracking = observe(previous, sighting, now, now)
    assert tracking is not None  # previous is a tracking
    if peer_state(now, tracking, timing) is not PeerState.UP:
        return None
    # With no answers, _up's search for another answered candidate finds none: it needs
    # no candidates.
    return _up(now, tracking, (), sighting, timing, _NO_ANSWERS)


_NO_ANSWERS: Mapping[Endpoint, float] = {}


def probed_again(
    now: float, previous: Tracking, sighting: Sighted, timing: Timing
) -> EndpointDecision | None:
    """The rhythm of a settled peer that answers: heard from since its trial, nothing under
    trial, not roamed, and due for a round of probes and not to be checked (probed again),
    or answered and not due yet (kept until its round). What observe, peer_state, _up and
    _keep_alive decide for it, in one copy of its tracking (a live mesh asks this for every
    peer at every grain, and at every pass an event brings between two); None for anything
    else, which the caller decides in full."""
    rx, handshake, endpoint = sighting.rx_bytes, sighting.last_handshake, sighting.endpoint
    heard = (
        previous.observed_at
        if rx > previous.rx_bytes or (handshake is not None and handshake != previous.handshake)
        else previous.heard
    )
    if endpoint is None or endpoint is previous.endpoint:
        endpoint = previous.endpoint
    elif endpoint != previous.endpoint:
        return None  # roamed
    if (
        heard is None
        or heard < previous.since  # not alive since its trial
        or now - heard >= DOWN_AFTER
        or previous.cycles
        or len(previous.tried) > 1
        or previous.trials > 1
        or previous.failed
        or previous.why.startswith("trial")
    ):
        return None
    since, last = previous.probe_since, previous.probed_at
    grain = timing.probe_grain
    # on_grid, inline: for every peer at every pass.
    due = heard + timing.quiet
    round_at = math.ceil(due / grain) * grain if grain > 0 else due
    if now < round_at:
        # Not due: a pass between two rounds (an event's). Its answer came, or it was heard
        # from otherwise; nothing to send until its round.
        if since is not None and since > heard:
            return None
        settled = _in_rhythm(
            previous, endpoint, handshake, rx, heard, now, None, previous.probed_at
        )
        return _up_in_rhythm(settled, False, round_at, min(round_at, heard + DOWN_AFTER))
    if since is not None and since > heard:  # a round unanswered so far
        if timing.quiet < DOWN_AFTER and now - since >= timing.probe_timeout:
            return None  # a dead path
        if last is not None and now - last < timing.probe_interval:
            return None  # not due again yet
    else:
        since = now  # answered since: a new round
    checked = previous.checked_at
    if now - since >= timing.probe_interval and (checked is None or checked < since):
        return None  # a check of its candidates is due
    tracking = _in_rhythm(previous, endpoint, handshake, rx, heard, now, since, now)
    wake = min(since + timing.probe_timeout, now + timing.probe_interval)
    return _up_in_rhythm(tracking, True, max(wake, now), None)


# probed_again's copies are made by hand, as evolve and the dataclass's own __init__ would
# make them (both refuse a class that is not a plain frozen dataclass): at a third of the
# time, for every peer that answers, at every pass.
require_plain(Tracking)
require_plain(EndpointDecision)


def _in_rhythm(
    previous: Tracking,
    endpoint: Endpoint | None,
    handshake: float | None,
    rx_bytes: int,
    heard: float,
    now: float,
    probe_since: float | None,
    probed_at: float | None,
) -> Tracking:
    """evolve(previous, ...) of these fields, the pass's time as observed_at. `endpoint`
    equals previous.endpoint: the kernel's object, kept so that the next pass tells them
    the same by identity."""
    copy: Tracking = object.__new__(Tracking)
    state = copy.__dict__
    state.update(previous.__dict__)
    state["endpoint"] = endpoint
    state["handshake"] = handshake
    state["rx_bytes"] = rx_bytes
    state["heard"] = heard
    state["observed_at"] = now
    state["probe_since"] = probe_since
    state["probed_at"] = probed_at
    return copy


def _up_in_rhythm(
    tracking: Tracking, probe: bool, wake_at: float, steady_until: float | None
) -> EndpointDecision:
    """EndpointDecision(tracking, PeerState.UP, None, probe=probe, wake_at=wake_at,
    steady_until=steady_until)."""
    decision: EndpointDecision = object.__new__(EndpointDecision)
    decision.__dict__.update(
        tracking=tracking,
        state=PeerState.UP,
        set_endpoint=None,
        nudge=False,
        probe=probe,
        check=False,
        restart=False,
        wake_at=wake_at,
        steady_until=steady_until,
    )
    return decision


def _check_up_in_rhythm() -> None:
    """At import: _up_in_rhythm makes what __init__ makes (a field it does not set would
    fail the comparison)."""
    tracking = Tracking(None, 0.0)
    if _up_in_rhythm(tracking, True, 1.0, 2.0) != EndpointDecision(
        tracking, PeerState.UP, None, probe=True, wake_at=1.0, steady_until=2.0
    ):
        raise TypeError("_up_in_rhythm does not make EndpointDecision's __init__'s record")


_check_up_in_rhythm()


def _found_heard(sighting: Sighting, now: float, wall_now: float) -> float | None:
    """When a peer found at start was last heard from: all the wall clock can tell."""
    if sighting.last_handshake is None:
        return None
    age = min(max(wall_now - sighting.last_handshake, 0.0), 2 * DOWN_AFTER)
    return now - age


def decide_endpoint(
    now: float,
    wall_now: float,
    candidates: tuple[Endpoint, ...],
    previous: Tracking | None,
    sighting: Sighting,
    timing: Timing = Timing(),
    answered: Mapping[Endpoint, float] | None = None,
    relayed: frozenset[Endpoint] = frozenset(),
) -> EndpointDecision:
    """Keep a working endpoint; probe a quiet one; when a trial fails or a path dies, try
    the next candidate (best first), or at once the best one that answered a path check.
    `answered`: when each endpoint last answered a path check (monotonic). `relayed`: the
    candidates that go through a relay (never proven by a path check: a relay forwards
    WireGuard's packets only); a direct path that answers replaces them."""
    decision = _decide(
        now, wall_now, candidates, previous, sighting, timing, answered or {}, relayed
    )
    if previous is None or any(c not in previous.seen_candidates for c in candidates):
        decision = evolve(decision, check=True)  # a new way to reach it: check it now
    return decision


def _decide(
    now: float,
    wall_now: float,
    candidates: tuple[Endpoint, ...],
    previous: Tracking | None,
    sighting: Sighting,
    timing: Timing,
    answered: Mapping[Endpoint, float],
    relayed: frozenset[Endpoint],
) -> EndpointDecision:
    everything = frozenset(candidates)
    tracking = observe(previous, sighting, now, wall_now)
    if tracking is None:
        return _first(now, wall_now, candidates, sighting, everything, timing)
    state = peer_state(now, tracking, timing)
    fresh = [c for c in candidates if c not in tracking.seen_candidates]
    # Only the current candidates are remembered: a member that keeps changing its
    # endpoints grows nothing here (a candidate that comes back counts as new again).
    if tracking.seen_candidates != everything:
        tracking = evolve(tracking, seen_candidates=everything)
    if state is PeerState.UP:
        if tracking.endpoint in relayed or sighting.endpoint in relayed:
            return _relayed_up(now, tracking, candidates, sighting, timing, answered, relayed)
        return _up(now, tracking, candidates, sighting, timing, answered)
    if tracking.alive_since_trial():
        # Was up, the path died: start over from the best candidate, now.
        failed = sighting.endpoint or tracking.endpoint
        restart = evolve(tracking, tried=(failed,) if failed else (), cycles=0, trials=1)
        return _next(now, restart, candidates, sighting, state, timing, "the path died")
    if not candidates:
        return _undecided(now, tracking, state, timing)
    proven = _best_proven(now, tracking, candidates, answered, timing)
    if proven is not None and proven != tracking.endpoint:
        # Proven to reach the peer's WireGuard port: no need to wait out the trial of an
        # unproven one (nor a backoff: a dead peer that answers is dead no more).
        return _start(
            now,
            tracking,
            proven,
            tracking.tried,
            tracking.cycles,  # the backoff stays until the peer is heard from
            state,
            "answered a path check",
            timing,
            sighting.endpoint,
            restart=True,
        )
    if fresh and proven is None:
        rank = candidates.index(tracking.endpoint) if tracking.endpoint in everything else None
        in_trial = now - tracking.since < timing.trial
        retrial = tracking.cycles > 0
        if retrial or not in_trial or rank is None or candidates.index(fresh[0]) < rank:
            # A new way to reach it: try it now (the peer does the same with ours: hole
            # punching), unless a better candidate is on its first trial. The backoff
            # stays: a mapping that keeps changing must not make a dead peer expensive.
            return _start(
                now,
                tracking,
                fresh[0],
                tracking.tried,
                tracking.cycles,
                state,
                "new candidate",
                timing,
                nudge=True,
            )
    current_usable = tracking.endpoint in everything
    if sighting.endpoint is None and current_usable:
        # The kernel lost the endpoint (its peer was recreated): put it back, same trial.
        return EndpointDecision(
            tracking, state, tracking.endpoint, nudge=True, wake_at=now + timing.poll
        )
    if current_usable and now - tracking.since < dwell(tracking.cycles, timing.trial):
        return _undecided(now, tracking, state, timing)
    if tracking.endpoint is not None and tracking.endpoint not in tracking.failed:
        tracking = evolve(tracking, failed=(*tracking.failed, tracking.endpoint))
    return _next(now, tracking, candidates, sighting, state, timing, "the last trial failed")


def _up(
    now: float,
    tracking: Tracking,
    candidates: tuple[Endpoint, ...],
    sighting: Sighting,
    timing: Timing,
    answered: Mapping[Endpoint, float],
) -> EndpointDecision:
    """Keep an up peer's endpoint (WireGuard's, which follows the peer), unless the path
    went silent and another candidate answered a path check since."""
    if tracking.cycles or len(tracking.tried) > 1 or tracking.trials > 1 or tracking.failed:
        tracking = evolve(tracking, cycles=0, tried=tuple(tracking.tried[-1:]), trials=1, failed=())
    if sighting.endpoint is not None and sighting.endpoint != tracking.endpoint:
        tracking = evolve(
            tracking,
            endpoint=sighting.endpoint,
            why="roamed: WireGuard follows the peer's authenticated packets",
        )
    elif tracking.why.startswith("trial"):
        tracking = evolve(tracking, why="works: the peer answered here")
    other = _answered_elsewhere(now, tracking, candidates, answered, timing)
    if other is None:
        return _keep_alive(now, tracking, PeerState.UP, timing)
    # Set, and nudged: the session still holds, so the keepalive that goes out at once is
    # data the peer answers (and follows to our side of the new path); no new handshake.
    return _start(
        now,
        tracking,
        other,
        tracking.tried,
        0,
        PeerState.UP,
        "the path went silent; this one answered a path check",
        timing,
        sighting.endpoint,
        nudge=True,
    )


def _relayed_up(
    now: float,
    tracking: Tracking,
    candidates: tuple[Endpoint, ...],
    sighting: Sighting,
    timing: Timing,
    answered: Mapping[Endpoint, float],
    relayed: frozenset[Endpoint],
) -> EndpointDecision:
    """An up peer reached through a relay: its direct candidates are checked every
    `direct_retry`, and the best that answered (a round trip between the two WireGuard
    ports: it works both ways) is set at once. Until then the relay carries the pair."""
    bound = candidates[0] if candidates and candidates[0] in relayed else None
    on = sighting.endpoint or tracking.endpoint
    if bound is not None and on in relayed and on != bound:
        return _move_to_relay(now, tracking, bound, timing)
    direct = tuple(c for c in candidates if c not in relayed)
    checked = tracking.direct_checked_at
    if checked is None:
        # Before the first check while relayed, an answer still proven counts (a new address
        # checked while its trial ran, just before the relay carried the pair, works now),
        # unless its trial failed in this cycle (it answers checks, yet no handshake).
        failed = set(tracking.failed)
        answered_direct = _answered_since(
            now, -math.inf, tuple(c for c in direct if c not in failed), answered, timing
        )
    else:
        answered_direct = _answered_since(now, checked, direct, answered, timing)
    if answered_direct is not None:
        return _start(
            now,
            tracking,  # the check time kept: back on the relay, the next is a retry away
            answered_direct,
            tracking.tried,
            0,
            PeerState.UP,
            "a direct path answered a path check; leaving the relay",
            timing,
            sighting.endpoint,
            nudge=True,
        )
    # Its direct paths' retries turn on the clock too: not steady.
    decision = evolve(_up(now, tracking, candidates, sighting, timing, answered), steady_until=None)
    if decision.set_endpoint is not None or not direct:
        return decision
    kept = decision.tracking
    # The first check as soon as the relay carries the pair: a hole punch that completes
    # just after the relay took over moves the pair back within seconds.
    due = checked + timing.direct_retry if checked is not None else now
    if now >= due:
        kept = evolve(kept, direct_checked_at=now)
        due = now + timing.direct_retry
        decision = evolve(decision, check=True)
    wake = due if decision.wake_at is None else min(decision.wake_at, due)
    return evolve(decision, tracking=kept, wake_at=wake)


def _move_to_relay(
    now: float, tracking: Tracking, bound: Endpoint, timing: Timing
) -> EndpointDecision:
    """The pair moved to another relay (a nearer one, paired there): set it now, not as a
    trial (the peer is up, and the relay left forwards until its binding lapses), and probe
    at once: unanswered, the path is found dead as any other and rotation resumes."""
    moved = evolve(
        tracking,
        endpoint=bound,
        probe_since=now,
        probed_at=now,
        why="moved to another relay, paired there",
    )
    return EndpointDecision(
        moved,
        PeerState.UP,
        bound,
        nudge=True,
        probe=True,
        wake_at=now + timing.probe_interval,
    )


def _proven(
    now: float, endpoint: Endpoint, answered: Mapping[Endpoint, float], timing: Timing
) -> bool:
    at = answered.get(endpoint)
    return at is not None and now - at <= timing.proven_for


def _best_proven(
    now: float,
    tracking: Tracking,
    candidates: tuple[Endpoint, ...],
    answered: Mapping[Endpoint, float],
    timing: Timing,
) -> Endpoint | None:
    """The best candidate that answered a path check lately, other than those whose trial
    failed in this cycle (a path that answers checks but never completes a handshake must
    not be set again and again). A better one that answers later takes over while the peer
    is not up: the first to answer is not always the best."""
    failed = set(tracking.failed)
    return next(
        (c for c in candidates if c not in failed and _proven(now, c, answered, timing)), None
    )


def _answered_elsewhere(
    now: float,
    tracking: Tracking,
    candidates: tuple[Endpoint, ...],
    answered: Mapping[Endpoint, float],
    timing: Timing,
) -> Endpoint | None:
    """For an up peer whose probes have gone unanswered for `probe_interval`: the best
    other candidate that answered a path check since the peer was last heard from."""
    heard, since, checked = tracking.heard, tracking.probe_since, tracking.checked_at
    if heard is None or since is None or since <= heard or checked is None or checked < since:
        return None
    if now - checked < timing.check_patience:
        return None  # the path in use gets as long as the others to answer its check
    current = tracking.endpoint
    if current is not None and answered.get(current, float("-inf")) > heard:
        return None  # the path itself still answers: only the tunnel is quiet
    others = tuple(c for c in candidates if c != current)
    return _answered_since(now, math.nextafter(heard, math.inf), others, answered, timing)


def _answered_since(
    now: float,
    since: float,
    candidates: tuple[Endpoint, ...],
    answered: Mapping[Endpoint, float],
    timing: Timing,
) -> Endpoint | None:
    """The best of `candidates` that answered a path check at `since` or later, and lately
    enough to be proven."""
    return next(
        (
            c
            for c in candidates
            if answered.get(c, -math.inf) >= since and _proven(now, c, answered, timing)
        ),
        None,
    )


def _next(
    now: float,
    tracking: Tracking,
    candidates: tuple[Endpoint, ...],
    sighting: Sighting,
    state: PeerState,
    timing: Timing,
    cause: str,
) -> EndpointDecision:
    if not candidates:
        return _undecided(now, tracking, state, timing)
    untried = [c for c in candidates if c not in tracking.tried]
    tried, cycles = tracking.tried, tracking.cycles
    if not untried:
        untried, tried, cycles = list(candidates), (), cycles + 1
        tracking = evolve(tracking, failed=())
    return _start(now, tracking, untried[0], tried, cycles, state, cause, timing, sighting.endpoint)


def _start(
    now: float,
    tracking: Tracking,
    endpoint: Endpoint,
    tried: tuple[Endpoint, ...],
    cycles: int,
    state: PeerState,
    cause: str,
    timing: Timing,
    kernel_endpoint: Endpoint | None = None,
    nudge: bool = False,
    restart: bool = False,
) -> EndpointDecision:
    """A new trial of `endpoint` from now: set it (unless the kernel has it), nudge, probe.
    `restart`: recreate the peer instead of nudging it (see EndpointDecision.restart)."""
    known = tracking.seen_candidates
    if restart:
        # Recreated: the kernel's counters and handshake start from nothing.
        tracking = evolve(tracking, rx_bytes=0, handshake=None)
    started = evolve(
        tracking,
        endpoint=endpoint,
        since=now,
        tried=(*(t for t in tried if t in known and t != endpoint), endpoint),
        cycles=cycles,
        trials=tracking.trials + 1,
        probe_since=None,
        probed_at=now,
        why=f"trial: {cause}",
    )
    if state is PeerState.UP:
        state = PeerState.DOWN
    set_endpoint = None if endpoint == kernel_endpoint and not restart else endpoint
    # Backed-off cycles need no nudge: their trials outlast WireGuard's own attempts (every
    # 5 s while retrying, every 25 s from persistent keepalive), so dead peers cost one
    # kernel change per trial.
    return EndpointDecision(
        started,
        state,
        set_endpoint,
        nudge=not restart and (nudge or cycles == 0),
        probe=True,
        check=True,
        # A backed-off trial is not polled (see _undecided): next look at its dwell's end.
        wake_at=now + timing.poll
        if cycles == 0
        else backoff_wake(now + dwell(cycles, timing.trial), timing.backoff_grain),
        restart=restart,
    )


def _undecided(
    now: float, tracking: Tracking, state: PeerState, timing: Timing
) -> EndpointDecision:
    """Waiting on a trial (or the dwell of a dead peer): probe now and then while the trial
    is young, and look again soon. A backed-off peer is not polled: WireGuard's own retries
    bring it back if it lives, and the passes that come anyway see it; its dwell ends on
    the backoff grid."""
    in_trial = now - tracking.since < timing.trial
    probe = in_trial and (
        tracking.probed_at is None or now - tracking.probed_at >= timing.probe_interval
    )
    if probe:
        tracking = evolve(tracking, probed_at=now)
    end = tracking.since + (timing.trial if in_trial else dwell(tracking.cycles, timing.trial))
    if in_trial and tracking.cycles == 0:
        wake = min(end, now + timing.poll)
    else:
        wake = backoff_wake(
            tracking.since + dwell(tracking.cycles, timing.trial), timing.backoff_grain
        )
    # Past its end, nothing changes by time alone (no candidates to move to): no wake-up.
    # Out of its trial, the decision holds until the dwell ends (then _decide moves on).
    # Within a backed-off trial, until the trial ends or the next probe is due; a first
    # cycle's trial is polled (its wake-up moves with the clock): never steady.
    steady: float | None = None
    if not in_trial:
        steady = tracking.since + dwell(tracking.cycles, timing.trial)
    elif tracking.cycles > 0 and not probe and tracking.probed_at is not None:
        steady = min(tracking.since + timing.trial, tracking.probed_at + timing.probe_interval)
    return EndpointDecision(
        tracking,
        state,
        None,
        probe=probe,
        wake_at=wake if wake > now else None,
        steady_until=steady,
    )


def _keep_alive(
    now: float, tracking: Tracking, state: PeerState, timing: Timing
) -> EndpointDecision:
    """An up peer: probe it once it has been quiet, until it answers."""
    heard = tracking.heard if tracking.heard is not None else now
    round_at = on_grid(heard + timing.quiet, timing.probe_grain)
    if now < round_at:
        settled = tracking if tracking.probe_since is None else evolve(tracking, probe_since=None)
        # Unchanged until the round of probes, or until silence alone makes the path dead.
        steady = min(round_at, heard + DOWN_AFTER) if tracking.heard is not None else None
        return EndpointDecision(settled, state, None, wake_at=round_at, steady_until=steady)
    since = tracking.probe_since
    if since is not None and since <= heard:
        since = None  # answered since: a new round of probes
    last = tracking.probed_at
    probe = since is None or last is None or now - last >= timing.probe_interval
    if probe:
        tracking = evolve(tracking, probe_since=now if since is None else since, probed_at=now)
    assert tracking.probe_since is not None and tracking.probed_at is not None
    # Unanswered for a probe interval: check the candidates once in this round of probes
    # (a live path answers a probe within a round trip; idle peers are never checked).
    round_start, last_probe = tracking.probe_since, tracking.probed_at
    checked = tracking.checked_at
    check = now - round_start >= timing.probe_interval and (
        checked is None or checked < round_start
    )
    if check:
        tracking = evolve(tracking, checked_at=now)
    wake = min(round_start + timing.probe_timeout, last_probe + timing.probe_interval)
    return EndpointDecision(tracking, state, None, probe=probe, check=check, wake_at=max(wake, now))


def _first(
    now: float,
    wall_now: float,
    candidates: tuple[Endpoint, ...],
    sighting: Sighting,
    everything: frozenset[Endpoint],
    timing: Timing,
) -> EndpointDecision:
    found = sighting.endpoint
    base = Tracking(
        None,
        now,
        handshake=sighting.last_handshake,
        rx_bytes=sighting.rx_bytes,
        observed_at=now,
        seen_candidates=everything,
        known_since=now,
    )
    if found is not None:
        # Found in the kernel (an earlier run of the agent): carry on from that endpoint;
        # the candidates before it were tried before (rotation goes on after it).
        done = candidates[: candidates.index(found) + 1] if found in everything else (found,)
        heard = _found_heard(sighting, now, wall_now)
        if heard is not None:
            # With a handshake: judge it by its age (probed at once if it is quiet).
            adopted = evolve(
                base, endpoint=found, since=heard, heard=heard, tried=done, why="found in kernel"
            )
            state = peer_state(now, adopted, timing)
            if state is PeerState.UP:
                return _keep_alive(now, adopted, state, timing)
            return _next(now, adopted, candidates, sighting, state, timing, "found dead")
        if found in everything or not candidates:
            resumed = evolve(base, endpoint=found, tried=done, why="found in kernel")
            return _undecided(now, resumed, PeerState.UNKNOWN, timing)
    if not candidates:
        return EndpointDecision(base, PeerState.UNKNOWN, None)
    first = evolve(base, trials=0)
    return _start(now, first, candidates[0], (), 0, PeerState.UNKNOWN, "best candidate", timing)
