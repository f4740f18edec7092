"""What nodes that left were routed, held in the tunnel for a while after they leave.

A node that leaves (its sealed leave, or its record expired with its tunnel down) stops being
a peer at once. Its node addresses and pod CIDRs would then be routed like any other
destination, in the clear, while pods elsewhere still send to it (Kubernetes notices a node
is gone tens of seconds later, and a dead node's address may soon belong to someone else).
So its ranges stay in the tunnel's set with no peer to take them (the kernel drops such
packets) for HOLD_SECONDS, unless a member claims them. Pure: the agent keeps the holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kubespan.model import ObservedLink
from kubespan.netaddr import IPNetwork, network_sort_key

# Long enough for Kubernetes to take a gone node's endpoints out of service (its default
# pod eviction timeout is 5 minutes); short enough that an address reused by a machine that
# is no member is not cut off for long.
HOLD_SECONDS = 300.0


@dataclass(frozen=True)
class Hold:
    ranges: tuple[IPNetwork, ...]
    until: float  # monotonic


def held_departed(
    holds: Mapping[str, Hold],
    observed: ObservedLink | None,
    departed_keys: frozenset[str],
    now: float,
    hold_for: float = HOLD_SECONDS,
) -> dict[str, Hold]:
    """The holds after this look: a departed node the kernel still has as a peer starts
    one with what the kernel routes to it; holds end when their time is up or the node is
    a member again."""
    kept = {key: hold for key, hold in holds.items() if hold.until > now and key in departed_keys}
    for peer in observed.peers if observed is not None else ():
        key = peer.public_key
        if key in departed_keys and key not in kept and peer.allowed_ips:
            kept[key] = Hold(tuple(sorted(peer.allowed_ips, key=network_sort_key)), now + hold_for)
    return kept


def held_ranges(holds: Mapping[str, Hold]) -> tuple[IPNetwork, ...]:
    """Every held range once, in order."""
    ranges = {network for hold in holds.values() for network in hold.ranges}
    return tuple(sorted(ranges, key=network_sort_key))
