"""Policy routing as data: the ip rule that sends marked traffic to table 180, and the routes
in table 180 (the link, and an unreachable floor behind it so marked traffic never falls
through to the main table in the clear).

Observed rules and routes are described with everything that changes where a packet goes, so
that anything that is not exactly ours never compares equal to ours: a route via a gateway, a
TOS or source-specific route, a `throw` that sends the lookup on to the main table, a rule
with an extra selector or an inverted match.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from kubespan.names import LINK_NAME, MARK_MASK, MARK_TUNNEL, ROUTE_TABLE, RULE_PRIORITY
from kubespan.netaddr import IPAddress, IPNetwork

# Our routes' metrics: the link route, and the floor behind it (the largest metric, so it is
# used only when nothing else in the table matches).
ROUTE_METRIC = 1024
UNREACHABLE_METRIC = 0xFFFFFFFF

UNICAST = "unicast"
UNREACHABLE = "unreachable"
# rtnetlink route types (RTN_*), by number; another number is shown as `type<N>`.
ROUTE_TYPES = {
    1: UNICAST,
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: UNREACHABLE,
    8: "prohibit",
    9: "throw",
    10: "nat",
    11: "xresolve",
}
ROUTE_TYPE_NUMBERS = {name: number for number, name in ROUTE_TYPES.items()}


def route_type_name(number: int) -> str:
    return ROUTE_TYPES.get(number, f"type{number}")


def route_type_number(name: str) -> int:
    if name in ROUTE_TYPE_NUMBERS:
        return ROUTE_TYPE_NUMBERS[name]
    return int(name.removeprefix("type"))


_DEFAULT_NETWORKS: dict[int, IPNetwork] = {
    4: ipaddress.IPv4Network("0.0.0.0/0"),
    6: ipaddress.IPv6Network("::/0"),
}


def default_network(family: int) -> IPNetwork:
    return _DEFAULT_NETWORKS[family]


@dataclass(frozen=True)
class RuleSpec:
    """An ip rule that looks up table 180. Ours: priority 32500, fwmark 0x40/0x60, nothing
    else. `other` describes every other selector or flag the kernel reported (source or
    destination prefix, interfaces, inversion, port or uid ranges, ...), so a foreign rule is
    never equal to ours. `raw` is the kernel's own message, kept (outside equality) so that a
    foreign rule is deleted by echoing it: the request then sets every selector it has."""

    family: int  # 4 or 6
    fwmark: int = MARK_TUNNEL
    mask: int = MARK_MASK
    priority: int = RULE_PRIORITY
    table: int = ROUTE_TABLE
    other: tuple[str, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)

    @property
    def specificity(self) -> int:
        """How many selectors a delete request for this rule sets: the order in which to
        delete rules (plan.dataplane.diff_rules)."""
        return (self.fwmark != 0) + (self.mask != 0) + len(self.other)

    def render(self, action: str = "add") -> str:
        mark = f" fwmark {self.fwmark:#x}/{self.mask:#x}" if self.fwmark or self.mask else ""
        other = "".join(f" {item}" for item in self.other)
        return (
            f"ip -{self.family} rule {action} priority {self.priority}{mark}{other} "
            f"lookup {self.table}"
        )


@dataclass(frozen=True)
class RouteSpec:
    """A route in table 180. The kernel keys a route by family, destination, source prefix
    (IPv6), TOS (IPv4) and metric: `key`. `other` holds whatever else the kernel reported that
    none of ours has (multipath next hops, a nexthop object, an encapsulation, a preferred
    source, other metrics), so such a route is never equal to ours. `raw`, as for rules, is
    the kernel's own message, echoed to delete exactly this route."""

    family: int
    destination: IPNetwork
    metric: int
    kind: str = UNICAST
    link: str | None = None
    mtu: int | None = None
    gateway: IPAddress | None = None
    tos: int = 0
    source: IPNetwork | None = None
    other: tuple[str, ...] = ()
    raw: bytes = field(default=b"", compare=False, repr=False)

    @functools.cached_property  # compared at every pass, for routes read once
    def key(self) -> tuple[int, str, str, int, int]:
        return (self.family, str(self.destination), str(self.source), self.tos, self.metric)

    def render(self, action: str = "replace") -> str:
        kind = "" if self.kind == UNICAST else f"{self.kind} "
        destination = "default" if self.destination.prefixlen == 0 else str(self.destination)
        words = [f"ip -{self.family} route {action} {kind}{destination}"]
        if self.source is not None:
            words.append(f"from {self.source}")
        if self.tos:
            words.append(f"tos {self.tos:#x}")
        if self.gateway is not None:
            words.append(f"via {self.gateway}")
        if self.link is not None:
            words.append(f"dev {self.link}")
        words.append(f"table {ROUTE_TABLE} metric {self.metric}")
        if self.mtu is not None:
            words.append(f"mtu {self.mtu}")
        words.extend(self.other)
        return " ".join(words)


@dataclass(frozen=True)
class RoutingSpec:
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]


@functools.lru_cache(maxsize=8)  # the same at every pass
def routing_spec(mtu: int, link: str = LINK_NAME) -> RoutingSpec:
    """Per family: the rule, the default route via the link, and the unreachable floor."""
    return RoutingSpec(
        rules=(RuleSpec(4), RuleSpec(6)),
        routes=tuple(
            route
            for family in (4, 6)
            for route in (
                RouteSpec(family, default_network(family), ROUTE_METRIC, UNICAST, link, mtu),
                RouteSpec(family, default_network(family), UNREACHABLE_METRIC, UNREACHABLE),
            )
        ),
    )
