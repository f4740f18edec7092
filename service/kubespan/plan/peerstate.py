"""Peer health from handshake times, and round-robin rotation through endpoint candidates.

State is measured from the last endpoint change T0 (WireGuard's timers give the bounds):
within TRIAL of T0 a peer is up once it handshook after T0, else unknown; until DOWN_AFTER it
is up once it handshook after T0, else down; later it is up while its last handshake is
younger than DOWN_AFTER. A down peer moves on to its next advertised endpoint. An endpoint
WireGuard learned from the peer's own packets (roaming) is kept while the peer is up.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubespan.model import PeerState
from kubespan.netaddr import Endpoint

ENDPOINT_TRIAL = 15.0
# WireGuard reject-after (180 s) + rekey-timeout (5 s) + rekey-attempt (90 s).
DOWN_AFTER = 275.0


@dataclass(frozen=True)
class Tracking:
    """What the planner remembers about one peer between passes."""

    endpoint: Endpoint | None
    since: float
    candidate: int


def peer_state(now: float, since: float, last_handshake: float | None) -> PeerState:
    elapsed = now - since
    handshook_since_change = last_handshake is not None and last_handshake >= since
    if elapsed < ENDPOINT_TRIAL:
        return PeerState.UP if handshook_since_change else PeerState.UNKNOWN
    if elapsed < DOWN_AFTER:
        return PeerState.UP if handshook_since_change else PeerState.DOWN
    if last_handshake is not None and now - last_handshake < DOWN_AFTER:
        return PeerState.UP
    return PeerState.DOWN


@dataclass(frozen=True)
class EndpointDecision:
    tracking: Tracking
    state: PeerState
    set_endpoint: Endpoint | None


def decide_endpoint(
    now: float,
    candidates: tuple[Endpoint, ...],
    previous: Tracking | None,
    observed_endpoint: Endpoint | None,
    last_handshake: float | None,
) -> EndpointDecision:
    """Keep a working endpoint; try the next candidate when the peer is down."""
    if previous is None:
        if observed_endpoint is not None and last_handshake is not None:
            # Adopted from an earlier run: judge it by its handshake age alone.
            adopted = Tracking(
                observed_endpoint, now - DOWN_AFTER, _index(candidates, observed_endpoint)
            )
            return EndpointDecision(adopted, peer_state(now, adopted.since, last_handshake), None)
        if not candidates:
            fresh = Tracking(observed_endpoint, now, -1)
            return EndpointDecision(fresh, PeerState.UNKNOWN, None)
        first = Tracking(candidates[0], now, 0)
        return EndpointDecision(first, PeerState.UNKNOWN, candidates[0])

    state = peer_state(now, previous.since, last_handshake)
    needs_endpoint = observed_endpoint is None and candidates
    if (state is PeerState.DOWN or needs_endpoint) and candidates:
        index = (previous.candidate + 1) % len(candidates) if state is PeerState.DOWN else 0
        if not needs_endpoint and len(candidates) == 1 and observed_endpoint == candidates[0]:
            # Nothing else to try: stay, and stay down until a handshake comes.
            return EndpointDecision(previous, state, None)
        nxt = candidates[index]
        return EndpointDecision(Tracking(nxt, now, index), state, nxt)
    return EndpointDecision(previous, state, None)


def _index(candidates: tuple[Endpoint, ...], endpoint: Endpoint) -> int:
    try:
        return candidates.index(endpoint)
    except ValueError:
        return -1
