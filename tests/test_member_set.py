"""The member set follows every change of its inputs, and is not made again while they stay
(the planner's inputs are the same objects pass after pass)."""

from __future__ import annotations

import ipaddress

from kubespan.model import PeerSpec, PeerState
from kubespan.netaddr import IPNetwork
from kubespan.plan.desired import LastResult, PeerReport, member_set

PREFIX = ipaddress.IPv6Network("fd00:1234::/64")


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def peer(key: str, *texts: str) -> PeerSpec:
    return PeerSpec(key, key, nets(*texts), None)


def report(key: str, state: PeerState) -> PeerReport:
    return PeerReport(key, key, key, state, None, None, 0, 0)


def test_each_change_of_the_inputs_is_followed() -> None:
    a = peer("a", "10.0.0.1/32", "fd00:1234::1/128", "10.244.0.0/24")
    b = peer("b", "10.0.0.2/32", "2001:db8::/64")
    up = (report("a", PeerState.UP), report("b", PeerState.UP))
    assert member_set((a, b), up, PREFIX, False) == (
        nets("10.0.0.1/32", "10.0.0.2/32", "10.244.0.0/24"),
        nets("2001:db8::/64"),
    )
    moved = peer("b", "10.0.0.3/32")
    assert member_set((a, moved), up, PREFIX, False) == (
        nets("10.0.0.1/32", "10.0.0.3/32", "10.244.0.0/24"),
        (),
    )
    held = nets("10.9.0.0/16")
    assert member_set((a, moved), up, PREFIX, False, held)[0] == nets(
        "10.0.0.1/32", "10.0.0.3/32", "10.9.0.0/16", "10.244.0.0/24"
    )
    # Fail closed unless bypass is allowed: a down peer leaves the set only with it.
    down = (report("a", PeerState.DOWN), report("b", PeerState.UP))
    assert member_set((a, moved), down, PREFIX, False)[0] == nets(
        "10.0.0.1/32", "10.0.0.3/32", "10.244.0.0/24"
    )
    assert member_set((a, moved), down, PREFIX, True) == (nets("10.0.0.3/32"), ())
    # Another cluster prefix: the ULA is no longer within it.
    other = ipaddress.IPv6Network("fd00:5678::/64")
    assert member_set((a,), up, other, False)[1] == nets("fd00:1234::1/128")


def test_the_same_inputs_are_not_computed_again() -> None:
    last: LastResult[int] = LastResult()
    computed: list[int] = []

    def compute(value: int) -> int:
        computed.append(value)
        return value

    first = nets("10.0.0.1/32")
    assert last.get((first,), lambda: compute(1)) == 1
    assert last.get((first,), lambda: compute(2)) == 1  # the same object: kept
    equal = nets("10.0.0.1/32")
    assert equal is not first
    assert last.get((equal,), lambda: compute(3)) == 1  # equal: kept
    assert last.get((nets("10.0.0.2/32"),), lambda: compute(4)) == 4
    assert last.get((first, first), lambda: compute(5)) == 5  # more inputs
    assert computed == [1, 4, 5]
