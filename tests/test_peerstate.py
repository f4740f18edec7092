"""Peer state and endpoint trials, driven pass by pass against a simulated peer: which
endpoints reach it, what it answers, when. Tables for the state rules; scenarios for
trials, dead paths, roaming, clock steps, restarts, new candidates and backoff."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.peerstate import (
    BACKOFF_GRAIN,
    DOWN_AFTER,
    DWELL_CAP,
    Sighting,
    Timing,
    Tracking,
    decide_endpoint,
    decide_up,
    dwell,
    given_up,
    on_grid,
    peer_state,
    probed_again,
    trial_seconds,
)

T0 = 1_000.0  # monotonic
WALL = 1_700_000_000.0
UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN
TIMING = Timing()
WIDE = TIMING.widened()  # a mesh of more than WIDE_MESH peers
BOTH = pytest.mark.parametrize("timing", [TIMING, WIDE], ids=["narrow", "wide"])
TRIAL = TIMING.trial
# A path is found dead at most this long after the peer was last heard from, plus one poll.


def dead_within(timing: Timing) -> float:
    return timing.quiet + timing.probe_grain + timing.probe_timeout + timing.poll


DEAD_WITHIN = dead_within(TIMING)


def ep(last: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"192.0.2.{last}"), 51820)


CANDIDATES = (ep(1), ep(2), ep(3))
ROAMED = Endpoint(ipaddress.ip_address("203.0.113.9"), 40000)


def tracking(
    heard: float | None = None, trials: int = 1, probe_since: float | None = None
) -> Tracking:
    return Tracking(ep(1), T0, heard=heard, trials=trials, observed_at=T0, probe_since=probe_since)


@pytest.mark.parametrize(
    ("elapsed", "track", "expected"),
    [
        (0, tracking(), UNKNOWN),
        (TRIAL - 0.1, tracking(), UNKNOWN),
        (TRIAL - 0.1, tracking(heard=T0 - 1), UNKNOWN),  # heard before the trial: proves nothing
        (TRIAL - 0.1, tracking(heard=T0), UP),
        (TRIAL - 0.1, tracking(trials=2), DOWN),  # it failed before: down, not unknown
        (TRIAL, tracking(), DOWN),
        (60, tracking(heard=T0 + 50), UP),
        # quiet and probed: dead once a probe went unanswered for probe_timeout
        (60, tracking(heard=T0 + 40, probe_since=T0 + 50), UP),
        (60, tracking(heard=T0 + 40, probe_since=T0 + 49), DOWN),
        (60, tracking(heard=T0 + 55, probe_since=T0 + 55), UP),  # answered the probe
        # quiet but never probed (probes cannot be sent): WireGuard's own bound
        (DOWN_AFTER - 1, tracking(heard=T0), UP),
        (DOWN_AFTER, tracking(heard=T0), DOWN),
    ],
)
def test_peer_state_table(elapsed: float, track: Tracking, expected: PeerState) -> None:
    assert peer_state(T0 + elapsed, track) is expected


@dataclass
class Peer:
    """One peer as the planner drives it, against a simulated remote end: `reachable` are the
    endpoints at which the remote answers. What we send it at one pass (a nudge, a probe) is
    answered before the next pass, when the endpoint reaches it; `chatty` makes it send on
    its own (keepalives, traffic) at every pass."""

    candidates: tuple[Endpoint, ...]
    reachable: set[Endpoint] = field(default_factory=set)
    kernel_endpoint: Endpoint | None = None
    rx_bytes: int = 0
    handshake: float | None = None
    tracking: Tracking | None = None
    chatty: bool = False
    changes: int = 0
    nudges: int = 0
    probes: int = 0
    answer_due: bool = False
    last_wake: float | None = None
    # Path checks: None, not sent at all; otherwise the endpoints at which the remote's
    # WireGuard port answers them (`reachable` by default: a path that answers checks
    # carries handshakes too, unless the test says otherwise).
    checkable: set[Endpoint] | None = None
    answers: dict[Endpoint, float] = field(default_factory=dict)
    checks: int = 0
    restarts: int = 0
    relayed: frozenset[Endpoint] = frozenset()  # candidates that go through a relay
    timing: Timing = TIMING

    def run(self, now: float, wall: float = WALL) -> PeerState:
        if self.kernel_endpoint in self.reachable and (self.answer_due or self.chatty):
            self.rx_bytes += 92
            self.handshake = wall + now - 0.01
        sighting = Sighting(self.kernel_endpoint, self.handshake, self.rx_bytes)
        decision = decide_endpoint(
            now,
            wall + now,
            self.candidates,
            self.tracking,
            sighting,
            self.timing,
            self.answers if self.checkable is not None else None,
            self.relayed,
        )
        if decision.check and self.checkable is not None:
            self.checks += 1
            current = (self.kernel_endpoint,) if self.kernel_endpoint else ()
            for endpoint in (*self.candidates, *current):
                if endpoint in self.checkable:
                    self.answers[endpoint] = now + 0.05  # answered before the next pass
        self.tracking = decision.tracking
        self.last_wake = decision.wake_at
        if decision.set_endpoint is not None:
            self.kernel_endpoint = decision.set_endpoint
            self.changes += 1
        self.nudges += decision.nudge
        self.restarts += decision.restart
        assert not (decision.restart and decision.set_endpoint is None)
        self.probes += decision.probe
        self.answer_due = decision.nudge or decision.probe or decision.set_endpoint is not None
        return decision.state

    def run_until(self, start: float, end: float, step: float = 0.5) -> list[PeerState]:
        states = []
        now = start
        while now < end:
            states.append(self.run(now))
            now += step
        return states


def first_up(peer: Peer, start: float, end: float, step: float = 0.5) -> float | None:
    now = start
    while now < end:
        if peer.run(now) is UP:
            return now - start
        now += step
    return None


def test_a_new_peer_starts_on_the_best_candidate_and_nudges_it() -> None:
    peer = Peer(CANDIDATES, reachable={ep(1)})
    assert peer.run(T0) is UNKNOWN
    assert peer.kernel_endpoint == ep(1)
    assert peer.probes == 1  # the trial probes at once
    assert peer.last_wake is not None and peer.last_wake <= T0 + TIMING.poll
    assert peer.run(T0 + 0.5) is UP
    assert peer.tracking is not None and peer.tracking.why.startswith("works")


@pytest.mark.parametrize("working", [1, 2, 3])
def test_trials_move_on_after_the_trial_time_to_the_first_that_answers(working: int) -> None:
    peer = Peer(CANDIDATES, reachable={ep(working)})
    up_after = first_up(peer, T0, T0 + 60)
    assert up_after is not None
    # Each failed candidate costs one trial; the working one answers before the next poll.
    assert up_after <= (working - 1) * TRIAL + TIMING.poll
    assert peer.kernel_endpoint == ep(working)
    assert peer.changes == working


def test_a_trial_that_fails_is_down_not_unknown_afterwards() -> None:
    peer = Peer(CANDIDATES)
    assert peer.run(T0) is UNKNOWN
    assert peer.run(T0 + TRIAL - 0.5) is UNKNOWN
    assert peer.run(T0 + TRIAL) is DOWN
    assert peer.kernel_endpoint == ep(2)
    assert peer.run(T0 + TRIAL + 1) is DOWN
    assert peer.nudges == peer.changes == 2  # every trial makes WireGuard send at once


def test_a_quiet_peer_that_answers_probes_stays_up_and_keeps_its_endpoint() -> None:
    peer = Peer(CANDIDATES, reachable={ep(1), ROAMED})
    peer.run(T0)
    states = peer.run_until(T0 + 0.5, T0 + 3600, step=1.0)
    assert set(states) == {UP}
    assert peer.changes == 1
    # Probed about once per quiet period, not at every pass.
    assert peer.probes <= 3600 / TIMING.quiet + 2


@BOTH
def test_a_path_that_dies_is_found_within_quiet_grain_and_probe_timeout_rotation_resumes(
    timing: Timing,
) -> None:
    peer = Peer(CANDIDATES, reachable={ep(1), ep(2)}, chatty=True, timing=timing)
    peer.run(T0)
    assert peer.run_until(T0 + 0.5, T0 + 60) == [UP] * 119
    peer.reachable = {ep(2)}  # the path through ep1 breaks (a NAT mapping flushed)
    broke = T0 + 60
    last_heard = peer.tracking.heard if peer.tracking else None
    assert last_heard is not None
    found = None
    now = broke
    while now < broke + 60:
        state = peer.run(now)
        if state is not UP and found is None:
            found = now
        if found is not None and state is UP:
            break
        now += 0.5
    assert found is not None and found - last_heard <= dead_within(timing)
    assert peer.tracking is not None and peer.tracking.why == "works: the peer answered here"
    assert peer.kernel_endpoint == ep(2)  # the best candidate but the dead one
    assert now - broke <= dead_within(timing) + TRIAL


def test_an_endpoint_learned_by_roaming_is_never_overwritten_while_up() -> None:
    peer = Peer(CANDIDATES, reachable={ep(1), ROAMED}, chatty=True)
    peer.run(T0)
    peer.run(T0 + 1)
    peer.kernel_endpoint = ROAMED  # the peer's packets now come from here
    assert set(peer.run_until(T0 + 2, T0 + 1800, step=2.0)) == {UP}
    assert peer.kernel_endpoint == ROAMED
    assert peer.changes == 1
    assert peer.tracking is not None and peer.tracking.why.startswith("roamed")


def test_a_new_candidate_is_tried_at_once_when_the_peer_is_not_up() -> None:
    """Both sides learn each other's NAT mapping from discovery together and start sending
    to it at once: that is what opens two endpoint-independent NATs (hole punching)."""
    mapped = Endpoint(ipaddress.ip_address("198.51.100.7"), 41000)
    peer = Peer((ep(1),), reachable={mapped})
    peer.run(T0)
    peer.run(T0 + 10)  # dwelling on ep1, which does not answer
    peer.candidates = (ep(1), mapped)
    assert peer.run(T0 + 10.5) is DOWN
    assert peer.kernel_endpoint == mapped
    assert peer.tracking is not None and peer.tracking.why == "trial: new candidate"
    assert peer.run(T0 + 11) is UP


def test_a_new_worse_candidate_waits_for_the_young_trial_a_better_one_does_not() -> None:
    worse = Endpoint(ipaddress.ip_address("198.51.100.7"), 41000)
    peer = Peer((ep(2), ep(3)))
    peer.run(T0)
    peer.candidates = (ep(2), ep(3), worse)
    peer.run(T0 + 1)
    assert peer.kernel_endpoint == ep(2)  # its trial goes on
    peer.candidates = (ep(1), ep(2), ep(3), worse)
    peer.run(T0 + 1.5)
    assert peer.kernel_endpoint == ep(1)  # ranked before the one on trial


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_wall_clock_steps_change_nothing(step: float) -> None:
    dead = Peer(CANDIDATES)
    dead.run(T0)
    assert dead.run(T0 + 1, wall=WALL + step) is UNKNOWN
    assert dead.run(T0 + TRIAL, wall=WALL + step) is DOWN
    assert dead.kernel_endpoint == ep(2)

    working = Peer(CANDIDATES, reachable={ep(1)}, chatty=True)
    working.run(T0)
    for second in range(1, 1200, 3):
        assert working.run(T0 + second, wall=WALL + (step if second > 600 else 0)) is UP
    assert working.changes == 1


@pytest.mark.parametrize(
    ("handshake_age", "expected", "moved"),
    [
        (-3600, UP, False),  # from the future (the wall clock stepped back): bounded to now
        (3, UP, False),
        (60, UP, False),  # quiet: probed at once, up until the probe is unanswered
        (86_400, DOWN, True),  # ancient: moves on at once, no trial wasted on it
    ],
)
def test_a_peer_found_at_start_is_judged_by_its_handshake_age(
    handshake_age: float, expected: PeerState, moved: bool
) -> None:
    sighting = Sighting(ep(2), WALL - handshake_age, 1000)
    decision = decide_endpoint(T0, WALL, CANDIDATES, None, sighting, TIMING)
    assert decision.state is expected
    assert (decision.set_endpoint is not None) is moved
    if handshake_age == 60:
        assert decision.probe


def test_restart_mid_trial_carries_on_from_the_kernel_endpoint() -> None:
    peer = Peer(CANDIDATES, kernel_endpoint=ep(2))
    assert peer.run(T0) is UNKNOWN
    assert peer.changes == 0  # the running trial is not cut short
    peer.run(T0 + TRIAL)
    assert peer.kernel_endpoint == ep(3)  # the next one, not back to the first


def test_rotation_remembers_endpoints_when_the_candidate_list_changes() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)  # ep1
    peer.run(T0 + TRIAL)  # ep2
    peer.candidates = (ep(2), ep(3))  # ep1 goes; nothing new
    peer.run(T0 + 2 * TRIAL)
    assert peer.kernel_endpoint == ep(3)
    assert peer.changes == 3


def test_dead_peers_back_off_and_cost_a_few_changes_an_hour() -> None:
    peer = Peer((ep(1), ep(2)))
    times: list[float] = []
    for tick in range(0, 7200):
        second = tick / 2
        before = peer.changes
        peer.run(T0 + second)
        if peer.changes != before:
            times.append(second)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps), gaps  # never faster again
    assert max(gaps) <= DWELL_CAP
    assert len(times) <= 12, times
    assert gaps[:2] == [TRIAL, TRIAL]  # the first cycle is quick
    assert peer.nudges <= len(times)


def test_a_new_candidate_is_tried_at_once_and_an_answer_ends_the_backoff() -> None:
    peer = Peer((ep(1), ep(2)))
    for second in range(0, 1800, 5):
        peer.run(T0 + second)
    assert peer.tracking is not None and peer.tracking.cycles >= 3
    cycles = peer.tracking.cycles
    nudges = peer.nudges
    peer.candidates = (ep(1), ep(2), ep(5))
    peer.run(T0 + 1800)
    assert peer.kernel_endpoint == ep(5) and peer.nudges == nudges + 1
    assert peer.tracking.cycles == cycles  # a new candidate alone does not end the backoff
    peer.reachable = {ep(5)}
    assert peer.run(T0 + 1800.5) is UP  # it answered the trial's nudge and probe
    assert peer.tracking.cycles == 0 and peer.tracking.trials == 1


def test_single_candidate_is_nudged_again_only_as_the_backoff_allows() -> None:
    peer = Peer((ep(1),))
    for second in range(0, 3600, 5):
        peer.run(T0 + second)
    assert peer.changes == 1
    assert peer.run(T0 + 3600) is DOWN
    assert peer.nudges <= 10


def test_peer_without_candidates_is_left_alone() -> None:
    peer = Peer(())
    assert peer.run(T0) is UNKNOWN
    assert peer.run(T0 + 400) is DOWN
    assert peer.changes == 0


def test_a_lost_kernel_endpoint_is_put_back_in_the_same_trial() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)
    peer.kernel_endpoint = None  # someone recreated the peer
    peer.run(T0 + 1)
    assert peer.kernel_endpoint == ep(1)
    assert peer.tracking is not None and peer.tracking.since == T0


def test_dwell_grows_to_its_cap() -> None:
    assert [dwell(c) for c in range(6)] == [TRIAL, 60.0, 240.0, 960.0, 1200.0, 1200.0]
    assert dwell(0, trial=2.0) == 2.0


def test_a_trial_ends_before_wireguards_retransmission() -> None:
    """WireGuard retransmits an initiation 5 s after the last one and not sooner: a 5 s
    trial that ended at the same moment would often lose that retransmission to the failed
    candidate, and the next one would wait 5 s more for an initiation."""
    assert trial_seconds(5) < 5.0
    assert trial_seconds(5) + TIMING.poll <= 5.0
    assert trial_seconds(20) == 19.5
    assert trial_seconds(2) >= 1.5


def test_tracking_is_a_value() -> None:
    first = tracking()
    assert replace(first, cycles=0) == first


def test_a_mapping_that_keeps_changing_does_not_make_a_dead_peer_expensive() -> None:
    """A peer behind a NAT that maps each flow anew announces a new endpoint every minute:
    each is tried once, the backoff stays, and nothing grows."""
    peer = Peer((ep(1),))
    for minute in range(120):
        peer.candidates = (ep(1), Endpoint(ipaddress.ip_address("198.51.100.7"), 40000 + minute))
        for second in range(0, 60, 5):
            peer.run(T0 + minute * 60 + second)
    assert peer.changes <= 2 * 120 + 12
    assert peer.tracking is not None
    assert len(peer.tracking.seen_candidates) <= 2 and len(peer.tracking.tried) <= 2


def test_a_peer_heard_from_a_moment_ago_is_never_given_up() -> None:
    track = tracking(heard=T0 + 300, probe_since=T0 + 305)
    track = replace(track, known_since=T0 - 1000)
    now = T0 + 320
    assert peer_state(now, track) is DOWN  # the path died...
    assert not given_up(now, track, DOWN)  # ...the node did not
    assert given_up(T0 + 300 + DOWN_AFTER, track, DOWN)


def test_without_candidates_nothing_wakes_the_loop_after_the_trial() -> None:
    decision = decide_endpoint(T0, WALL, (), None, Sighting(None, None, 0), TIMING)
    later = decide_endpoint(
        T0 + 60, WALL + 60, (), decision.tracking, Sighting(None, None, 0), TIMING
    )
    assert later.state is DOWN and later.wake_at is None


def checked(
    candidates: tuple[Endpoint, ...], reachable: set[Endpoint], chatty: bool = False
) -> Peer:
    """A peer whose candidates are path-checked; those `reachable` answer."""
    return Peer(candidates, reachable=reachable, checkable=set(reachable), chatty=chatty)


@pytest.mark.parametrize("working", [2, 3])
def test_with_path_checks_an_unreachable_better_candidate_costs_no_trial(working: int) -> None:
    peer = checked(CANDIDATES, {ep(working)})
    assert peer.run(T0) is UNKNOWN
    assert peer.kernel_endpoint == ep(1) and peer.checks == 1  # checks go to all at once
    up_after = first_up(peer, T0 + TIMING.poll, T0 + 60)
    assert up_after is not None and up_after <= TIMING.poll  # not (working - 1) trials
    assert peer.kernel_endpoint == ep(working)
    assert peer.tracking is not None and peer.tracking.why == "works: the peer answered here"
    assert peer.changes == 2
    # The switch recreates the peer (a nudge would wait out WireGuard's 5 s since the
    # initiation to the first candidate); the first trial only nudged.
    assert (peer.restarts, peer.nudges) == (1, 1)


def test_the_best_candidate_that_answered_is_set() -> None:
    peer = checked(CANDIDATES, {ep(2), ep(3)})
    peer.run(T0)
    assert first_up(peer, T0 + TIMING.poll, T0 + 60) is not None
    assert peer.kernel_endpoint == ep(2)


def test_a_path_that_answers_checks_but_never_handshakes_is_set_once_per_cycle() -> None:
    peer = Peer(CANDIDATES, reachable={ep(3)}, checkable={ep(2), ep(3)})
    peer.run(T0)
    assert peer.run(T0 + 0.5) is not UP
    assert peer.kernel_endpoint == ep(2)  # it answered: set at once
    up_after = first_up(peer, T0 + 1.0, T0 + 60)
    assert up_after is not None and up_after <= TRIAL + TIMING.poll
    assert peer.kernel_endpoint == ep(3)
    assert peer.changes == 3  # ep1, ep2 (answered, failed its trial), ep3


def test_an_up_peer_whose_path_went_silent_moves_to_a_candidate_that_answered() -> None:
    """A peer that roamed behind a NAT filtering its new source: our packets to its old
    endpoint go nowhere, its new one answers a check. Found in quiet + probe_grain +
    probe_interval, not after a probe timeout."""
    peer = checked((ep(1), ep(2)), {ep(1), ep(2)}, chatty=True)
    peer.run(T0)
    assert peer.run_until(T0 + 0.5, T0 + 30) == [UP] * 59
    peer.reachable = peer.checkable = {ep(2)}
    broke = T0 + 30
    last_heard = peer.tracking.heard if peer.tracking else None
    assert last_heard is not None
    now = broke
    while not (peer.run(now) is UP and peer.kernel_endpoint == ep(2)) and now < broke + 60:
        now += 0.5
    # Quiet, a round of probes at the next grain, probed in vain for a probe interval,
    # checked: the path in use is given its check's patience, then the peer moves.
    patience = TIMING.quiet + TIMING.probe_grain + TIMING.probe_interval + TIMING.check_patience
    assert now - last_heard <= patience + 2 * TIMING.poll
    assert peer.restarts == 0  # its session holds: set and nudged, not recreated
    assert peer.tracking is not None and peer.tracking.why == "works: the peer answered here"


def test_a_quiet_tunnel_on_a_path_that_still_answers_checks_is_not_moved() -> None:
    peer = checked((ep(1), ep(2)), {ep(1), ep(2)}, chatty=True)
    peer.run(T0)
    peer.run_until(T0 + 0.5, T0 + 30)
    peer.reachable = set()  # the tunnel is silent, yet both paths answer checks
    last_heard = peer.tracking.heard if peer.tracking else None
    assert last_heard is not None
    # Until the probe timeout (the old rule: then the path is dead whatever checks say).
    peer.run_until(T0 + 30, last_heard + TIMING.quiet + TIMING.probe_timeout - TIMING.poll)
    assert peer.checks >= 2  # checked while quiet
    assert peer.kernel_endpoint == ep(1)
    assert peer.changes == 1


def test_an_idle_peer_that_answers_probes_is_never_checked() -> None:
    peer = checked(CANDIDATES, {ep(1)})
    peer.run(T0)
    assert set(peer.run_until(T0 + 0.5, T0 + 3600, step=1.0)) == {UP}
    assert peer.checks == 1  # the first trial's only


def test_a_dead_peer_in_backoff_is_set_at_once_when_a_candidate_answers() -> None:
    peer = checked(CANDIDATES, set())
    peer.run_until(T0, T0 + 1800, step=1.0)
    assert peer.tracking is not None and peer.tracking.cycles >= 2
    changes, checks = peer.changes, peer.checks
    assert checks <= changes + 1  # one round of checks per trial: cheap while dead
    peer.reachable = peer.checkable = {ep(3)}
    peer.candidates = (*CANDIDATES, ep(4))  # a new candidate is checked at once
    recovered = first_up(peer, T0 + 1800, T0 + 1900)
    assert recovered is not None and recovered <= 2 * TIMING.poll
    assert peer.kernel_endpoint == ep(3)


def test_a_path_that_answers_checks_but_never_handshakes_keeps_the_backoff() -> None:
    """A filter that lets UDP through but not WireGuard (or a peer whose agent runs while
    its link is broken): the answering candidate is set once per cycle, and the cycles
    still grow, so it costs what any dead peer costs."""
    peer = Peer((ep(1), ep(2), ep(3)), reachable=set(), checkable={ep(2)})
    for tick in range(0, 7200):
        peer.run(T0 + tick / 2)
    assert peer.tracking is not None and peer.tracking.cycles >= 3
    assert peer.changes <= 20, peer.changes
    assert peer.restarts <= 8, peer.restarts


def test_a_better_candidate_that_answers_later_takes_over_while_the_peer_is_not_up() -> None:
    peer = Peer(CANDIDATES, reachable=set(), checkable={ep(2)})
    peer.run(T0)  # ep1 on trial; of the checks, only ep2's answers (yet)
    peer.checkable = {ep(1), ep(2)}  # ep1's side opens: its checks answer from now on
    peer.run(T0 + 0.5)
    assert peer.kernel_endpoint == ep(2)  # the first that answered (its handshake is lost)
    peer.reachable = {ep(1)}
    peer.run(T0 + 1.0)
    assert peer.kernel_endpoint == ep(1)  # the better one, once it answered
    assert peer.tracking is not None and peer.tracking.why == "trial: answered a path check"
    assert peer.run(T0 + 1.5) is UP


def passes_of_dead_peers(
    count: int, start: float, end: float, alive: bool = False, timing: Timing = TIMING
) -> int:
    """Passes an agent runs between `start` and `end` for `count` peers that never answer
    (with `alive`: up on their first candidate, answering probes, otherwise silent), known
    from scattered moments (one every 0.6 s), when it wakes only as they ask."""
    peers = [
        Peer((ep(1), ep(2)), reachable={ep(1)} if alive else set(), timing=timing)
        for _ in range(count)
    ]
    known = [T0 + i * 0.6 for i in range(count)]
    wakes: dict[int, float | None] = {}
    now, passes = T0, 0
    while now < end:
        for index, peer in enumerate(peers):
            if known[index] <= now:
                peer.run(now)
                wakes[index] = peer.last_wake
        passes += now >= start
        due = [w for w in wakes.values() if w is not None]
        due += [k for k in known if k > now]
        now = max(now + 0.2, min(due, default=end))
    return passes


@BOTH
def test_backed_off_dead_peers_share_passes(timing: Timing) -> None:
    """A hundred dead peers on one-minute dwells would each wake the loop once a minute at a
    time of its own; on the backoff grid they share a pass per grain."""
    window = 180.0
    start = T0 + 2 * 60 + 10  # all in their first one-minute dwell by now
    passes = passes_of_dead_peers(100, start, start + window, timing=timing)
    assert passes <= window / timing.backoff_grain + 1, passes
    assert TIMING.backoff_grain == BACKOFF_GRAIN < WIDE.backoff_grain


@BOTH
def test_quiet_peers_answering_probes_share_passes(timing: Timing) -> None:
    """A hundred idle peers that went quiet at scattered moments would each wake the loop
    for their probes at a time of their own (a pass every 0.2 s); on the probe grid their
    rounds share a pass per grain, and no pass comes between two rounds (the next round's
    pass sees the answer to the last)."""
    window = 120.0
    start = T0 + 100 * 0.6 + 10  # all known and up by now
    passes = passes_of_dead_peers(100, start, start + window, alive=True, timing=timing)
    assert passes <= window / timing.probe_grain + 1, passes


def test_a_dead_path_is_found_within_15_s_by_default_and_19_s_in_a_wide_mesh() -> None:
    """From the last packet: quiet, then the wait for the grid, then the probe's timeout
    (the pass that judges it wakes exactly then). Issue 10 asks 20 s of dead_path_s."""
    assert TIMING.quiet + TIMING.probe_grain + TIMING.probe_timeout <= 15.0
    assert WIDE.quiet + WIDE.probe_grain + WIDE.probe_timeout <= 19.0
    assert (TIMING.dead_path_within(), WIDE.dead_path_within()) == (15.0, 19.0)
    assert WIDE.probe_grain == WIDE.probe_interval == 2 * TIMING.probe_grain


# --- relayed pairs --------------------------------------------------------------------------

RELAY = Endpoint(ipaddress.ip_address("203.0.113.30"), 29101)


def relayed_peer(reachable: set[Endpoint], checkable: set[Endpoint]) -> Peer:
    """A peer whose relay endpoint, bound, is its first candidate (plan.desired puts it
    there); the relay never answers path checks (it forwards WireGuard's packets only)."""
    return Peer(
        candidates=(RELAY, ep(1), ep(2)),
        reachable=reachable,
        checkable=checkable - {RELAY},
        relayed=frozenset({RELAY}),
    )


def test_a_relayed_peer_stays_on_its_relay_and_checks_direct_paths_every_minute() -> None:
    peer = relayed_peer({RELAY}, set())
    assert first_up(peer, T0, T0 + 10) is not None
    assert peer.kernel_endpoint == RELAY
    checks, changes = peer.checks, peer.changes
    states = peer.run_until(T0 + 10, T0 + 10 + 5 * TIMING.direct_retry)
    assert set(states) == {UP} and peer.kernel_endpoint == RELAY
    assert peer.changes == changes
    assert 4 <= peer.checks - checks <= 6  # one check of the direct paths a minute


def test_a_direct_path_that_answers_replaces_the_relay_within_a_retry() -> None:
    peer = relayed_peer({RELAY}, set())
    assert first_up(peer, T0, T0 + 10) is not None
    # The firewalls open: ep2 now carries handshakes and answers checks.
    peer.reachable = {RELAY, ep(2)}
    assert peer.checkable is not None
    peer.checkable.add(ep(2))
    opened = T0 + 20
    states = peer.run_until(opened, opened + TIMING.direct_retry + 10)
    assert peer.kernel_endpoint == ep(2)
    assert states[-1] is UP


def test_one_way_reachability_does_not_move_a_relayed_peer() -> None:
    # ep1 takes our packets (reachable) but its answers to checks never come back.
    peer = relayed_peer({RELAY, ep(1)}, set())
    peer.kernel_endpoint = None
    assert first_up(peer, T0, T0 + 10) is not None
    changes = peer.changes
    assert set(peer.run_until(T0 + 10, T0 + 400)) == {UP}
    assert peer.kernel_endpoint == RELAY and peer.changes == changes


def test_a_new_direct_candidate_of_a_relayed_peer_is_checked_and_taken_at_once() -> None:
    # A peer renumbered: up through the relay before its new address was known. Once the
    # new address is advertised it must not wait for the minute's retry.
    peer = relayed_peer({RELAY}, set())
    assert first_up(peer, T0, T0 + 10) is not None
    peer.run_until(T0 + 10, T0 + 20)
    renumbered = ep(3)
    peer.candidates = (RELAY, renumbered)
    peer.reachable = {RELAY, renumbered}
    assert peer.checkable is not None
    peer.checkable.add(renumbered)
    advertised = T0 + 20
    peer.run_until(advertised, advertised + 2)
    assert peer.kernel_endpoint == renumbered
    assert set(peer.run_until(advertised + 2, advertised + 10)) == {UP}


@pytest.mark.parametrize(
    ("answered_ago", "failed", "leaves"),
    [
        (2.0, (), True),  # checked during its trial, just before the relay carried the pair
        (TIMING.proven_for + 1, (), False),  # too old to prove anything now
        (2.0, (ep(3),), False),  # it answers checks, yet its trial got no handshake
    ],
)
def test_a_direct_answer_from_just_before_the_relay_carried_the_pair_counts_at_once(
    answered_ago: float, failed: tuple[Endpoint, ...], leaves: bool
) -> None:
    # The renumbered peer's new address was on trial and answered its check; the relay's
    # endpoint, bound a moment later, ranked first and the pair came up through it.
    now = T0 + 3
    up_on_relay = Tracking(
        RELAY,
        T0,
        handshake=WALL + T0 + 1,
        rx_bytes=184,
        heard=T0 + 1,
        observed_at=T0 + 2.5,
        seen_candidates=frozenset({RELAY, ep(3)}),
        failed=failed,
    )
    decision = decide_endpoint(
        now,
        WALL + now,
        (RELAY, ep(3)),
        up_on_relay,
        Sighting(RELAY, WALL + T0 + 1, 184),
        TIMING,
        {ep(3): now - answered_ago},
        frozenset({RELAY}),
    )
    if leaves:
        assert decision.set_endpoint == ep(3)
    else:
        assert decision.state is UP and decision.set_endpoint is None
        assert decision.check  # the first check of the direct paths goes out at once


NEARER_RELAY = Endpoint(ipaddress.ip_address("203.0.113.31"), 29140)


def test_a_pair_paired_at_a_nearer_relay_moves_there_and_stays_up() -> None:
    peer = relayed_peer({RELAY, NEARER_RELAY}, set())
    assert first_up(peer, T0, T0 + 10) is not None
    peer.run_until(T0 + 10, T0 + 20)
    assert peer.kernel_endpoint == RELAY
    # Paired at the nearer relay: it is bound (first), the one left is still WireGuard's.
    peer.candidates = (NEARER_RELAY, ep(1), ep(2))
    peer.relayed = frozenset({NEARER_RELAY, RELAY})
    changes = peer.changes
    states = peer.run_until(T0 + 20, T0 + 60)
    assert peer.kernel_endpoint == NEARER_RELAY and peer.changes == changes + 1
    assert set(states) == {UP}  # a move, not a trial: never shown down
    assert peer.tracking is not None and "another relay" in peer.tracking.why


def test_a_nearer_relay_that_carries_nothing_is_found_dead_like_any_path() -> None:
    peer = relayed_peer({RELAY}, set())
    assert first_up(peer, T0, T0 + 10) is not None
    peer.candidates = (NEARER_RELAY, ep(1), ep(2))
    peer.relayed = frozenset({NEARER_RELAY, RELAY})
    moved = T0 + 10
    states = peer.run_until(moved, moved + DEAD_WITHIN + 1)
    assert peer.run(moved + DEAD_WITHIN + 1) is not UP
    assert states[0] is UP


_TIMES = st.one_of(st.none(), st.floats(T0 - 400, T0 + 60, allow_nan=False))
_ENDPOINTS = st.sampled_from((None, *CANDIDATES, ROAMED))


@st.composite
def _up_case(draw: st.DrawFn) -> tuple[float, Tracking, Sighting, Timing]:
    """A peer tracked at the pass before, with every field drawn (most states it can be in),
    its candidates unchanged since; what the kernel shows now; the time now."""
    observed_at = draw(st.floats(T0 - 300, T0 + 30, allow_nan=False))
    previous = Tracking(
        draw(_ENDPOINTS),
        draw(st.floats(T0 - 400, observed_at, allow_nan=False)),
        handshake=draw(st.sampled_from((None, WALL, WALL + 1))),
        rx_bytes=draw(st.sampled_from((0, 100))),
        heard=draw(_TIMES),
        observed_at=observed_at,
        tried=tuple(draw(st.lists(st.sampled_from(CANDIDATES), max_size=3, unique=True))),
        cycles=draw(st.integers(0, 3)),
        seen_candidates=frozenset(CANDIDATES),
        trials=draw(st.integers(1, 3)),
        known_since=T0 - 400,
        probe_since=draw(_TIMES),
        probed_at=draw(_TIMES),
        checked_at=draw(_TIMES),
        failed=tuple(draw(st.lists(st.sampled_from(CANDIDATES), max_size=2, unique=True))),
        why=draw(st.sampled_from(("", "trial: best candidate", "works: the peer answered here"))),
    )
    sighting = Sighting(
        draw(_ENDPOINTS),
        draw(st.sampled_from((None, WALL, WALL + 1, WALL + 2))),
        draw(st.sampled_from((0, 100, 200))),
    )
    now = observed_at + draw(st.floats(0.01, 40, allow_nan=False))
    return now, previous, sighting, draw(st.sampled_from((TIMING, WIDE)))


_GRAIN = TIMING.probe_grain


@st.composite
def _rhythm_case(draw: st.DrawFn) -> tuple[float, Tracking, Sighting, Timing]:
    """A settled up peer in a live mesh's rhythm: probed on the grid, its probes answered or
    not, its path maybe dying, looked at on the grid or between (a pass an event brings);
    what decide_up's shortcut for it (probed_again) sees."""
    timing = draw(st.sampled_from((TIMING, WIDE)))
    grain = timing.probe_grain
    observed_at = T0 + draw(st.integers(0, 10)) * grain + draw(st.sampled_from((0.0, 0.01)))
    at = draw(st.sampled_from(CANDIDATES))
    back = st.sampled_from((0.0, _GRAIN, 2 * _GRAIN, 3 * _GRAIN, 11.0, 300.0))
    previous = Tracking(
        at,
        draw(st.sampled_from((T0 - 100, observed_at - grain, observed_at + 1))),
        handshake=WALL,
        rx_bytes=100,
        heard=draw(st.one_of(st.none(), back.map(lambda b: observed_at - b))),
        observed_at=observed_at,
        tried=(at,),
        seen_candidates=frozenset(CANDIDATES),
        known_since=T0 - 400,
        probe_since=draw(st.one_of(st.none(), back.map(lambda b: observed_at - b))),
        probed_at=draw(st.one_of(st.none(), back.map(lambda b: observed_at - b))),
        checked_at=draw(st.one_of(st.none(), back.map(lambda b: observed_at - b))),
        why="works: the peer answered here",
    )
    sighting = Sighting(
        draw(st.sampled_from((None, at, ROAMED))),
        draw(st.sampled_from((WALL, WALL + 1))),
        draw(st.sampled_from((100, 200))),
    )
    offsets = (0.5, 3.0, _GRAIN, _GRAIN + 0.01, 6.0, 2 * _GRAIN, 2 * _GRAIN + 0.01, 11.0)
    now = observed_at + draw(st.sampled_from(offsets))
    return now, previous, sighting, timing


@settings(max_examples=6000, deadline=None)
@given(st.one_of(_up_case(), _rhythm_case()))
def test_decide_up_is_decide_endpoint_for_an_up_peer(
    case: tuple[float, Tracking, Sighting, Timing],
) -> None:
    """The planner's shortcut for peers that stay up (plan.desired._replan_up) decides as
    decide_endpoint does, given what its caller vouches for (the same candidates, no path
    check answers, no relay); it declines every peer that is not up. Drawn from every
    state (_up_case) and from a live mesh's rhythm (_rhythm_case: probed_again's ground,
    which _up_case seldom draws), in a mesh of either width."""
    now, previous, sighting, timing = case
    full = decide_endpoint(now, WALL + now - T0, CANDIDATES, previous, sighting, timing)
    quick = decide_up(now, previous, sighting, timing)
    if quick is None:
        assert full.state is not UP
    else:
        assert quick == full


def probed_at(probed: float, grain: float) -> Tracking:
    """A settled peer on CANDIDATES[0], heard from a grain before `probed`, when a round of
    probes was sent to it, seen by the kernel with 100 bytes received."""
    at = CANDIDATES[0]
    return Tracking(
        at,
        T0 - 100,
        handshake=WALL,
        rx_bytes=100,
        heard=probed - grain,
        observed_at=probed,
        tried=(at,),
        seen_candidates=frozenset(CANDIDATES),
        known_since=T0 - 400,
        probe_since=probed,
        probed_at=probed,
        why="works: the peer answered here",
    )


def test_a_peer_that_answered_its_probe_isprobed_again_by_the_shortcut() -> None:
    at = CANDIDATES[0]
    probed = T0 + 10 * _GRAIN
    previous = probed_at(probed, _GRAIN)
    now = probed + _GRAIN
    answered = Sighting(at, WALL, 200)
    quick = probed_again(now, previous, answered, TIMING)
    assert quick is not None and quick.probe and quick.tracking.heard == probed
    assert quick == decide_endpoint(now, WALL + now - T0, CANDIDATES, previous, answered, TIMING)
    # Unanswered, its candidates checked in this round: probed again in the same round.
    silent, checked = Sighting(at, WALL, 100), replace(previous, checked_at=probed)
    again = probed_again(now, checked, silent, TIMING)
    assert again is not None and again.tracking.probe_since == probed
    assert again == decide_endpoint(now, WALL + now - T0, CANDIDATES, checked, silent, TIMING)
    # Unanswered for a probe interval and not checked yet: decided in full (a check).
    assert probed_again(now, previous, silent, TIMING) is None
    # Unanswered for the probe timeout, checked and probed again meanwhile: a dead path,
    # decided in full (down, and the next candidate tried).
    late = probed + 3 * _GRAIN
    dying = replace(previous, checked_at=probed + _GRAIN, probed_at=probed + 2 * _GRAIN)
    assert probed_again(late, dying, silent, TIMING) is None
    full = decide_endpoint(late, WALL + late - T0, CANDIDATES, dying, silent, TIMING)
    assert full.state is not UP


@BOTH
def test_a_pass_between_two_rounds_keeps_an_answered_peer_by_the_shortcut(
    timing: Timing,
) -> None:
    """A pass an event brings between two rounds of probes (a discovery listing, every
    30 s): a peer whose probe was answered is kept until its round, without a probe, by
    the shortcut; one whose round is unanswered is left to the full decision."""
    at, grain = CANDIDATES[0], timing.probe_grain
    probed = T0 + 10 * grain
    previous = probed_at(probed, grain)
    between = probed + grain / 2
    answered = Sighting(at, WALL, 200)
    kept = probed_again(between, previous, answered, timing)
    assert kept is not None and not kept.probe and kept.state is UP
    assert kept.tracking.heard == probed and kept.tracking.probe_since is None
    assert kept.wake_at == kept.steady_until == on_grid(probed + timing.quiet, grain)
    full = decide_endpoint(between, WALL + between - T0, CANDIDATES, previous, answered, timing)
    assert kept == full
    # Its next round: probed on the grid, by the shortcut again.
    assert kept.wake_at is not None
    again = probed_again(kept.wake_at, kept.tracking, answered, timing)
    assert again is not None and again.probe
    # Unanswered so far: not for the shortcut between rounds.
    assert probed_again(between, previous, Sighting(at, WALL, 100), timing) is None
