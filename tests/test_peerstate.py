"""Peer state from handshakes and endpoint rotation: tables, clock steps, changing candidate
lists, restarts mid-trial, and the backoff of dead peers."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, replace

import pytest

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.peerstate import (
    DOWN_AFTER,
    DWELL_CAP,
    ENDPOINT_TRIAL,
    Tracking,
    decide_endpoint,
    dwell,
    peer_state,
)

T0 = 1_000.0  # monotonic
WALL = 1_700_000_000.0
UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN


def ep(last: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"192.0.2.{last}"), 51820)


CANDIDATES = (ep(1), ep(2), ep(3))


def tracking(
    handshake_at_change: float | None = None,
    handshake: float | None = None,
    seen: float | None = None,
    trials: int = 1,
) -> Tracking:
    return Tracking(ep(1), T0, handshake_at_change, handshake, seen, (ep(1),), 0, trials=trials)


@pytest.mark.parametrize(
    ("elapsed", "track", "expected"),
    [
        (0, tracking(), UNKNOWN),
        (ENDPOINT_TRIAL - 1, tracking(), UNKNOWN),
        # the kernel's value is the one from before the change: not a new handshake
        (ENDPOINT_TRIAL - 1, tracking(50.0, 50.0, T0 - 5), UNKNOWN),
        (ENDPOINT_TRIAL - 1, tracking(50.0, 51.0, T0 + 3), UP),
        (ENDPOINT_TRIAL - 1, tracking(trials=2), DOWN),  # it failed before: down, not unknown
        (ENDPOINT_TRIAL, tracking(), DOWN),
        (ENDPOINT_TRIAL + 10, tracking(None, 60.0, T0 + 2), UP),
        (DOWN_AFTER - 1, tracking(None, 60.0, T0 + 1), UP),
        (DOWN_AFTER + 1, tracking(None, 60.0, T0 + 2), UP),  # seen 274 s ago
        (DOWN_AFTER + 1, tracking(None, 60.0, T0 + 1), DOWN),  # seen 275 s ago
        (DOWN_AFTER * 3, tracking(None, 60.0, T0 + DOWN_AFTER * 1.5), DOWN),
        (DOWN_AFTER * 3, tracking(), DOWN),
    ],
)
def test_peer_state_table(elapsed: float, track: Tracking, expected: PeerState) -> None:
    assert peer_state(T0 + elapsed, track) is expected


@dataclass
class Peer:
    """One peer driven pass by pass, as the planner drives it, with a kernel endpoint."""

    candidates: tuple[Endpoint, ...]
    kernel_endpoint: Endpoint | None = None
    handshake: float | None = None
    tracking: Tracking | None = None
    changes: int = 0

    def run(self, now: float, wall: float = WALL) -> PeerState:
        decision = decide_endpoint(
            now, wall + now, self.candidates, self.tracking, self.kernel_endpoint, self.handshake
        )
        self.tracking = decision.tracking
        if decision.set_endpoint is not None:
            self.kernel_endpoint = decision.set_endpoint
            self.changes += 1
        return decision.state


def test_new_peer_starts_on_the_first_candidate_and_rotates_in_order() -> None:
    peer = Peer(CANDIDATES)
    assert peer.run(T0) is UNKNOWN
    assert peer.kernel_endpoint == ep(1)
    assert peer.run(T0 + ENDPOINT_TRIAL - 1) is UNKNOWN
    assert peer.kernel_endpoint == ep(1)
    assert peer.run(T0 + ENDPOINT_TRIAL) is DOWN
    assert peer.kernel_endpoint == ep(2)
    assert peer.run(T0 + ENDPOINT_TRIAL + 1) is DOWN  # failed before: no longer unknown
    peer.run(T0 + 2 * ENDPOINT_TRIAL)
    assert peer.kernel_endpoint == ep(3)


def test_a_handshake_makes_the_peer_up_and_keeps_a_roamed_endpoint() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)
    peer.handshake = WALL + T0 + 3
    peer.kernel_endpoint = Endpoint(ipaddress.ip_address("203.0.113.9"), 40000)  # roamed
    assert peer.run(T0 + 5) is UP
    for step in range(1, 60):
        assert peer.run(T0 + 5 + step * 5) is UP or step * 5 >= DOWN_AFTER
        peer.handshake = WALL + T0 + 5 + step * 5  # keepalives keep it fresh
    assert peer.kernel_endpoint == Endpoint(ipaddress.ip_address("203.0.113.9"), 40000)
    assert peer.changes == 1


@pytest.mark.parametrize("step", [-3600.0, 3600.0])
def test_wall_clock_steps_change_nothing(step: float) -> None:
    """A step of the wall clock neither freezes a dead endpoint as unknown nor rotates off a
    working one: durations run on the monotonic clock."""
    dead = Peer(CANDIDATES)
    dead.run(T0)
    assert dead.run(T0 + 5, wall=WALL + step) is UNKNOWN
    assert dead.run(T0 + ENDPOINT_TRIAL, wall=WALL + step) is DOWN
    assert dead.kernel_endpoint == ep(2)

    working = Peer(CANDIDATES)
    working.run(T0)
    for second in range(0, 1200, 5):
        working.handshake = WALL + T0 + second  # as the kernel reports it (its own clock)
        assert working.run(T0 + second + 1, wall=WALL + (step if second > 600 else 0)) is UP or (
            second == 0
        )
    assert working.kernel_endpoint == ep(1)
    assert working.changes == 1


def test_a_handshake_found_at_start_is_judged_by_its_age_bounded_both_ways() -> None:
    # The wall clock stepped back: the handshake looks like it is from the future.
    future = decide_endpoint(T0, WALL, CANDIDATES, None, ep(2), WALL + 3600)
    assert future.state is UP and future.set_endpoint is None
    recent = decide_endpoint(T0, WALL, CANDIDATES, None, ep(2), WALL - 30)
    assert recent.state is UP
    ancient = decide_endpoint(T0, WALL, CANDIDATES, None, ep(2), WALL - 86_400)
    assert ancient.state is DOWN
    # ...and the ancient one moves on at the next pass, without waiting for a trial.
    moved = decide_endpoint(T0 + 5, WALL + 5, CANDIDATES, ancient.tracking, ep(2), WALL - 86_400)
    assert moved.set_endpoint == ep(3)


def test_rotation_remembers_endpoints_when_the_candidate_list_changes() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)  # ep1
    peer.run(T0 + ENDPOINT_TRIAL)  # ep2
    assert peer.kernel_endpoint == ep(2)
    # ep1 disappears and ep4 appears in front: nothing tried is tried again, nothing new is
    # skipped, whatever the positions.
    peer.candidates = (ep(4), ep(2), ep(3))
    peer.run(T0 + 2 * ENDPOINT_TRIAL)
    assert peer.kernel_endpoint == ep(4)
    peer.run(T0 + 3 * ENDPOINT_TRIAL)
    assert peer.kernel_endpoint == ep(3)
    tried = [ep(1), ep(2), ep(4), ep(3)]
    assert peer.changes == len(tried)


def test_the_current_endpoint_leaving_the_list_moves_on_after_its_trial() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)
    peer.candidates = (ep(2), ep(3))
    peer.run(T0 + 1)
    assert peer.kernel_endpoint == ep(2)


def test_restart_mid_trial_carries_on_from_the_kernel_endpoint() -> None:
    peer = Peer(CANDIDATES, kernel_endpoint=ep(2))
    assert peer.run(T0) is UNKNOWN
    assert peer.changes == 0  # the running trial is not cut short
    peer.run(T0 + ENDPOINT_TRIAL)
    assert peer.kernel_endpoint == ep(3)  # the next one, not back to the first


def test_dead_peers_back_off_and_cost_a_few_changes_an_hour() -> None:
    peer = Peer((ep(1), ep(2)))
    times: list[float] = []
    for second in range(0, 3600, 5):
        before = peer.changes
        peer.run(T0 + second)
        if peer.changes != before:
            times.append(second)
        assert peer.tracking is not None and peer.tracking.endpoint in peer.candidates
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == sorted(gaps), gaps  # never faster again
    assert max(gaps) <= DWELL_CAP
    assert len(times) <= 10, times
    assert gaps[:2] == [ENDPOINT_TRIAL, ENDPOINT_TRIAL]  # the first cycle is quick


def test_a_handshake_or_a_new_candidate_ends_the_backoff() -> None:
    peer = Peer((ep(1), ep(2)))
    for second in range(0, 1800, 5):
        peer.run(T0 + second)
    assert peer.tracking is not None and peer.tracking.cycles >= 3
    peer.candidates = (ep(1), ep(2), ep(5))
    peer.run(T0 + 1800)
    assert peer.tracking.cycles == 0
    changes = peer.changes
    for second in range(1800, 1800 + int(dwell(0)) + 10, 5):
        peer.run(T0 + second)
    assert peer.changes > changes  # trials are quick again
    peer.handshake = WALL + T0 + 1900
    assert peer.run(T0 + 1901) is UP
    assert peer.tracking.cycles == 0 and peer.tracking.trials == 1


def test_single_candidate_stays_down_without_a_change() -> None:
    peer = Peer((ep(1),))
    for second in range(0, 3600, 5):
        peer.run(T0 + second)
    assert peer.changes == 1
    assert peer.run(T0 + 3600) is DOWN


def test_peer_without_candidates_is_left_alone() -> None:
    peer = Peer(())
    assert peer.run(T0) is UNKNOWN
    assert peer.run(T0 + 400) is DOWN
    assert peer.changes == 0


def test_a_lost_kernel_endpoint_is_put_back() -> None:
    peer = Peer(CANDIDATES)
    peer.run(T0)
    peer.kernel_endpoint = None  # someone recreated the peer
    peer.run(T0 + 5)
    assert peer.kernel_endpoint == ep(1)
    assert peer.tracking is not None and peer.tracking.since == T0  # same trial


def test_tracking_is_a_value() -> None:
    first = tracking()
    assert replace(first, cycles=0) == first
