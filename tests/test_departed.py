"""What a node that left was routed stays in the tunnel for a while (dropped, never sent in
the clear), unless a member claims it: the holds, and the planner's use of them."""

from __future__ import annotations

import ipaddress

from kubespan.model import ObservedLink, ObservedPeer
from kubespan.netaddr import IPNetwork
from kubespan.plan.departed import HOLD_SECONDS, Hold, held_departed, held_ranges
from kubespan.plan.desired import plan
from test_plan_golden import key, member, plan_input


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


def link(*peers: tuple[str, tuple[IPNetwork, ...]]) -> ObservedLink:
    return ObservedLink(
        mtu=1420,
        up=True,
        addresses=(),
        private_key=None,
        listen_port=51820,
        fwmark=0x20,
        peers=tuple(
            ObservedPeer(k, None, allowed, 0, None, 0, 0, key(102)) for k, allowed in peers
        ),
    )


GONE = nets("10.244.1.0/24", "192.0.2.1/32", "fd00:1:2:3::1/128")


def test_a_departed_peer_still_in_the_kernel_starts_a_hold_that_ends_in_time() -> None:
    observed = link((key(1), GONE), (key(2), nets("192.0.2.2/32")))
    holds = held_departed({}, observed, frozenset({key(1)}), now=100.0)
    assert holds == {key(1): Hold(GONE, 100.0 + HOLD_SECONDS)}
    # The next look: the kernel no longer has the peer; the hold stays, then ends.
    later = held_departed(holds, link(), frozenset({key(1)}), now=100.0 + HOLD_SECONDS - 1)
    assert later == holds
    assert held_departed(holds, link(), frozenset({key(1)}), now=100.0 + HOLD_SECONDS) == {}


def test_a_hold_ends_when_the_node_is_a_member_again_and_none_starts_for_members() -> None:
    holds = {key(1): Hold(GONE, 500.0)}
    assert held_departed(holds, link((key(1), GONE)), frozenset(), now=100.0) == {}
    assert held_departed({}, link((key(2), GONE)), frozenset({key(1)}), now=100.0) == {}
    assert held_departed({}, None, frozenset({key(1)}), now=100.0) == {}


def test_held_ranges_are_each_listed_once_in_order() -> None:
    holds = {key(1): Hold(GONE, 1.0), key(3): Hold(nets("10.244.1.0/24", "10.0.0.0/8"), 1.0)}
    assert held_ranges(holds) == nets(
        "10.0.0.0/8", "10.244.1.0/24", "192.0.2.1/32", "fd00:1:2:3::1/128"
    )


def test_the_plan_keeps_held_ranges_in_the_tunnel_but_a_members_claim_wins() -> None:
    claimant = member(2, ["192.0.2.2"], ["192.0.2.2:51820"], ("10.244.1.128/25",))
    result = plan(
        plan_input((claimant,), 10.0, departed_keys=frozenset({key(1)}), departed_ranges=GONE)
    )
    (peer,) = result.desired.peers
    assert peer.public_key == key(2)
    assert set(nets("10.244.1.128/25", "192.0.2.2/32")) <= set(peer.allowed_ips)
    assert not set(peer.allowed_ips) & set(nets("10.244.1.0/25", "192.0.2.1/32"))
    # In the set the tunnel takes, with no peer for the held part: dropped, not in the clear.
    tunnel = result.desired.ruleset.members_v4
    for held in nets("10.244.1.0/25", "192.0.2.1/32"):
        assert any(held.subnet_of(n) for n in tunnel), (held, tunnel)  # type: ignore[arg-type]


def test_without_holds_the_departed_ranges_leave_the_tunnel() -> None:
    """The failure the hold is for: once the node is gone, its ranges are no one's."""
    result = plan(plan_input((), 10.0, departed_keys=frozenset({key(1)})))
    assert result.desired.ruleset.members_v4 == ()


def test_a_discovery_services_address_is_never_held() -> None:
    """A departed node that had a discovery service's address in its ranges must not take
    this node's way to discovery with it: that address stays out of the tunnel set."""
    discovery = ipaddress.ip_address("192.0.2.1")
    held = plan_input(
        (), 10.0, departed_keys=frozenset({key(1)}), departed_ranges=GONE, protected=(discovery,)
    )
    tunnel = plan(held).desired.ruleset.members_v4
    assert not any(discovery in n for n in tunnel), tunnel
    # The rest of what the node had stays held.
    assert any(ipaddress.ip_network("10.244.1.0/24").subnet_of(n) for n in tunnel), tunnel  # type: ignore[arg-type]
    unprotected = plan(
        plan_input((), 10.0, departed_keys=frozenset({key(1)}), departed_ranges=GONE)
    )
    assert any(discovery in n for n in unprotected.desired.ruleset.members_v4)
