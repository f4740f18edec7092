"""Dividing admitted address ranges among members, so that no member can pull another's.

A member's claims are self-asserted: any member could name another's address. So a range is
routed to a member only when that is beyond dispute on this node:

- this node's own addresses are never routed to a member;
- a claim the kernel already routes to that very member is kept (incumbents keep what they
  have: a new claim, whatever its key, cannot pull an address away from a member);
- a range claimed by one member alone is routed to it;
- a range two or more members claim, and none of them holds, is routed to none of them but
  kept in the member set: traffic to it is held back (fail closed), never sent to a member
  that may not own it, and never in the clear, until all but one withdraw the claim.

No order of public keys decides anything, so grinding a key that sorts first buys nothing.
(Admission already keeps the kinds apart: ULAs lie in the cluster /64, node addresses outside
it and outside the pod subnets, pod CIDRs inside them; so only claims of one kind can meet.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kubespan.netaddr import IPAddress, IPNetwork, host_network, network_sort_key
from kubespan.plan.ipset import IntervalSet, network_range, range_networks

THIS_NODE = "this node"


@dataclass(frozen=True)
class Claim:
    key: str  # the member's public key
    name: str  # its hostname, for warnings
    network: IPNetwork
    held: bool  # the kernel routes exactly this to this member now


@dataclass
class Division:
    """The outcome: ranges per member key, ranges held back, and what to warn about."""

    routed: dict[str, list[IPNetwork]] = field(default_factory=dict)
    held_back: list[IPNetwork] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def disputed(claims: Iterable[Claim]) -> dict[int, IntervalSet]:
    """Ranges claimed by two or more different members, per address family. One sweep by
    start: every interval seen so far starts at or before the current one, so the current
    one overlaps another member's exactly up to the furthest end among those (kept as the
    two furthest ends of distinct keys): linear after sorting, whatever the claims are."""
    out = {4: IntervalSet(), 6: IntervalSet()}
    by_family: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
    for claim in claims:
        start, end = network_range(claim.network)
        by_family[claim.network.version].append((start, end, claim.key))
    for version, intervals in by_family.items():
        intervals.sort()
        furthest: dict[str, int] = {}  # the two furthest ends, of distinct keys
        for start, end, key in intervals:
            other = max((e for k, e in furthest.items() if k != key), default=-1)
            if other >= start:
                out[version].add(start, min(end, other))
            furthest[key] = max(furthest.get(key, -1), end)
            furthest = dict(sorted(furthest.items(), key=lambda item: item[1])[-2:])
    return out


class _Taken:
    def __init__(self) -> None:
        self.sets = {4: IntervalSet(), 6: IntervalSet()}
        self.owners: dict[tuple[int, int, int], str] = {}

    def free(self, network: IPNetwork) -> list[tuple[int, int]]:
        return self.sets[network.version].uncovered(*network_range(network))

    def take(self, network: IPNetwork, start: int, end: int, owner: str) -> None:
        self.sets[network.version].add(start, end)
        self.owners[(network.version, start, end)] = owner

    def holder(self, network: IPNetwork) -> str | None:
        start, end = network_range(network)
        return self.owners.get((network.version, start, end))


def divide(claims: list[Claim], own: Iterable[IPAddress]) -> Division:
    division = Division()
    taken = _Taken()
    for address in own:
        network = host_network(address)
        taken.take(network, *network_range(network), THIS_NODE)
    contested = disputed(c for c in claims if not c.held)
    # Incumbents first; sorting is stable, so otherwise the members' order stands.
    for claim in sorted(claims, key=lambda c: not c.held):
        version, network = claim.network.version, claim.network
        routed = division.routed.setdefault(claim.key, [])
        free = taken.free(network)
        if not free:
            holder = taken.holder(network)
            where = THIS_NODE if holder == THIS_NODE else f"member {holder or 'others'}"
            division.warnings.append(
                f"{network} of member {claim.name} is already routed to {where}; not routing it"
            )
            continue
        mine: list[tuple[int, int]] = []
        back: list[tuple[int, int]] = []
        for start, end in free:
            if claim.held:
                mine.append((start, end))
                continue
            clear = contested[version].uncovered(start, end)
            mine.extend(clear)
            back.extend(_minus((start, end), clear))
        for start, end in mine:
            taken.take(network, start, end, claim.name)
            routed.extend(range_networks(version, start, end))
        for start, end in back:
            division.held_back.extend(range_networks(version, start, end))
        whole = network_range(network)
        if back:
            pieces = ", ".join(str(n) for a, b in back for n in range_networks(version, a, b))
            what = str(network) if back == [whole] else f"{pieces} of {network}"
            division.warnings.append(
                f"{what} of member {claim.name} is also claimed by another member "
                "and held by none here: routed to no member, traffic to it held back (a shared "
                "address belongs in filters.excludeAdvertisedNetworks)"
            )
        elif mine != [whole]:
            pieces = ", ".join(str(n) for a, b in mine for n in range_networks(version, a, b))
            division.warnings.append(
                f"{network} of member {claim.name} overlaps ranges routed to other members; "
                f"routing only {pieces} to it"
            )
    division.routed = {
        key: sorted(networks, key=network_sort_key) for key, networks in division.routed.items()
    }
    return division


def _minus(whole: tuple[int, int], parts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `whole` not in `parts` (sorted, disjoint, inside `whole`)."""
    out: list[tuple[int, int]] = []
    cursor = whole[0]
    for start, end in parts:
        if start > cursor:
            out.append((cursor, start - 1))
        cursor = end + 1
    if cursor <= whole[1]:
        out.append((cursor, whole[1]))
    return out
