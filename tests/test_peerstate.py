"""Peer state from handshake times, and endpoint rotation, table-driven."""

from __future__ import annotations

import ipaddress

import pytest

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.peerstate import (
    DOWN_AFTER,
    ENDPOINT_TRIAL,
    Tracking,
    decide_endpoint,
    peer_state,
)

T0 = 1_000_000.0
UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN


@pytest.mark.parametrize(
    ("elapsed", "handshake_offset", "expected"),
    [
        (0, None, UNKNOWN),
        (ENDPOINT_TRIAL - 1, None, UNKNOWN),
        (ENDPOINT_TRIAL - 1, -5, UNKNOWN),  # handshake before the change does not count
        (ENDPOINT_TRIAL - 1, 3, UP),
        (ENDPOINT_TRIAL, None, DOWN),
        (ENDPOINT_TRIAL + 10, -5, DOWN),
        (ENDPOINT_TRIAL + 10, 2, UP),
        (DOWN_AFTER - 1, 1, UP),
        (DOWN_AFTER + 1, 2, UP),  # last handshake 274 s old
        (DOWN_AFTER + 1, 1, DOWN),  # last handshake 275 s old
        (DOWN_AFTER + 100, 150, UP),
        (DOWN_AFTER + 100, -1, DOWN),
        (DOWN_AFTER * 3, DOWN_AFTER * 1.5, DOWN),
        (DOWN_AFTER * 3, None, DOWN),
    ],
)
def test_peer_state_table(
    elapsed: float, handshake_offset: float | None, expected: PeerState
) -> None:
    handshake = None if handshake_offset is None else T0 + handshake_offset
    assert peer_state(T0 + elapsed, T0, handshake) is expected


def ep(last: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"192.0.2.{last}"), 51820)


CANDIDATES = (ep(1), ep(2), ep(3))


def test_new_peer_starts_on_the_first_candidate() -> None:
    decision = decide_endpoint(T0, CANDIDATES, None, None, None)
    assert decision.set_endpoint == ep(1)
    assert decision.state is UNKNOWN
    assert decision.tracking == Tracking(ep(1), T0, 0)


def test_down_peer_rotates_round_robin() -> None:
    tracking = Tracking(ep(1), T0, 0)
    seen = []
    now = T0
    for _ in range(4):
        now += ENDPOINT_TRIAL
        decision = decide_endpoint(now, CANDIDATES, tracking, tracking.endpoint, None)
        assert decision.state is DOWN
        seen.append(decision.set_endpoint)
        tracking = decision.tracking
        assert tracking.since == now
    assert seen == [ep(2), ep(3), ep(1), ep(2)]


def test_unknown_peer_waits_for_its_trial() -> None:
    tracking = Tracking(ep(1), T0, 0)
    decision = decide_endpoint(T0 + 5, CANDIDATES, tracking, ep(1), None)
    assert decision.set_endpoint is None
    assert decision.state is UNKNOWN
    assert decision.tracking == tracking


def test_up_peer_keeps_a_roamed_endpoint() -> None:
    tracking = Tracking(ep(1), T0, 0)
    roamed = Endpoint(ipaddress.ip_address("203.0.113.50"), 40000)
    decision = decide_endpoint(T0 + 100, CANDIDATES, tracking, roamed, T0 + 90)
    assert decision.state is UP
    assert decision.set_endpoint is None


def test_restarted_agent_adopts_a_working_endpoint() -> None:
    decision = decide_endpoint(T0, CANDIDATES, None, ep(3), T0 - 30)
    assert decision.state is UP
    assert decision.set_endpoint is None
    assert decision.tracking.candidate == 2


def test_restarted_agent_rotates_away_from_a_dead_endpoint() -> None:
    decision = decide_endpoint(T0, CANDIDATES, None, ep(3), T0 - DOWN_AFTER - 10)
    assert decision.state is DOWN
    later = decide_endpoint(T0 + 1, CANDIDATES, decision.tracking, ep(3), T0 - DOWN_AFTER - 10)
    assert later.set_endpoint == ep(1)


def test_single_candidate_stays_down_without_a_change() -> None:
    tracking = Tracking(ep(1), T0, 0)
    for elapsed in (ENDPOINT_TRIAL, ENDPOINT_TRIAL * 2, ENDPOINT_TRIAL * 3):
        decision = decide_endpoint(T0 + elapsed, (ep(1),), tracking, ep(1), None)
        assert decision.state is DOWN
        assert decision.set_endpoint is None
        assert decision.tracking == tracking
    later = decide_endpoint(T0 + 60, (ep(1),), tracking, ep(1), T0 + 50)
    assert later.state is UP


def test_peer_without_candidates_is_left_alone() -> None:
    decision = decide_endpoint(T0, (), None, None, None)
    assert decision.set_endpoint is None
    assert decision.state is UNKNOWN
