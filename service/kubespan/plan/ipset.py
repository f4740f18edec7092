"""Sets of addresses as sorted, disjoint integer intervals: fast overlap checks and collapsing
for thousands of prefixes, where comparing ipaddress objects pairwise would be quadratic."""

from __future__ import annotations

import ipaddress
from bisect import bisect_right
from functools import lru_cache

from kubespan.netaddr import IPNetwork


@lru_cache(maxsize=1 << 16)
def network_range(network: IPNetwork) -> tuple[int, int]:
    start = int(network.network_address)
    return start, start + network.num_addresses - 1


def range_networks(version: int, start: int, end: int) -> list[IPNetwork]:
    """The fewest prefixes covering exactly [start, end]."""
    if start == end:
        if version == 4:
            return [ipaddress.IPv4Network((start, 32))]
        return [ipaddress.IPv6Network((start, 128))]
    first: ipaddress.IPv4Address | ipaddress.IPv6Address
    last: ipaddress.IPv4Address | ipaddress.IPv6Address
    if version == 4:
        first, last = ipaddress.IPv4Address(start), ipaddress.IPv4Address(end)
    else:
        first, last = ipaddress.IPv6Address(start), ipaddress.IPv6Address(end)
    return list(ipaddress.summarize_address_range(first, last))


class IntervalSet:
    """Disjoint closed intervals [start, end] of one address family, kept sorted and merged
    (adjacent intervals are joined)."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __len__(self) -> int:
        return len(self._starts)

    def uncovered(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end] that are not in the set."""
        out = []
        index = max(0, bisect_right(self._starts, start) - 1)
        cursor = start
        while index < len(self._starts) and self._starts[index] <= end:
            if self._ends[index] >= cursor:
                if self._starts[index] > cursor:
                    out.append((cursor, self._starts[index] - 1))
                cursor = self._ends[index] + 1
                if cursor > end:
                    return out
            index += 1
        out.append((cursor, end))
        return out

    def add(self, start: int, end: int) -> None:
        low = bisect_right(self._ends, start - 2)  # first interval that touches or follows
        high = bisect_right(self._starts, end + 1)  # past the last that touches
        if low < high:
            start = min(start, self._starts[low])
            end = max(end, self._ends[high - 1])
        self._starts[low:high] = [start]
        self._ends[low:high] = [end]

    def intervals(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))


def collapse(networks: list[IPNetwork], version: int) -> tuple[IPNetwork, ...]:
    """Merge overlapping and adjacent prefixes into the fewest prefixes covering them."""
    merged = IntervalSet()
    for network in networks:
        merged.add(*network_range(network))
    out: list[IPNetwork] = []
    for start, end in merged.intervals():
        out.extend(range_networks(version, start, end))
    return tuple(out)
