"""Diff the selective-encryption state (nftables table, ip rules, table 180, rp_filter)
against what the kernel has. Operations render as the commands an operator would type."""

from __future__ import annotations

from dataclasses import dataclass

from kubespan.names import NFT_FAMILY, NFT_TABLE
from kubespan.plan.ruleset import RouteSpec, RoutingSpec, RulesetSpec, RuleSpec

# Reverse-path filtering off on the link: the kernel's check (strict or loose) fails every
# packet arriving on an interface that has no IPv4 address unless the reverse route points
# back through it, and ours has no IPv4 address by design; decrypted traffic would be
# dropped. WireGuard itself already checks each inner source against the peer's allowed IPs.
RP_FILTER_OFF = 0


@dataclass(frozen=True)
class ObservedRuleset:
    """What identifies our table's content: the fingerprint we wrote, and its shape, so that a
    rule or element removed behind our back is noticed without comparing every expression."""

    fingerprint: str | None
    rule_counts: tuple[tuple[str, int], ...]
    set_sizes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ObservedRouting:
    ruleset: ObservedRuleset | None
    rules: tuple[RuleSpec, ...]
    routes: tuple[RouteSpec, ...]
    rp_filter: int | None
    rp_filter_all: int | None = None


@dataclass(frozen=True)
class ReplaceRuleset:
    spec: RulesetSpec

    def render(self) -> str:
        return (
            f"nft -f -  # replace table {NFT_FAMILY} {NFT_TABLE}: "
            f"{len(self.spec.members_v4)} IPv4 and {len(self.spec.members_v6)} IPv6 "
            f"member prefixes, fingerprint {self.spec.fingerprint[:12]}"
        )


@dataclass(frozen=True)
class DeleteRuleset:
    def render(self) -> str:
        return f"nft delete table {NFT_FAMILY} {NFT_TABLE}"


@dataclass(frozen=True)
class AddRule:
    rule: RuleSpec

    def render(self) -> str:
        return self.rule.render("add")


@dataclass(frozen=True)
class DeleteRule:
    rule: RuleSpec

    def render(self) -> str:
        return self.rule.render("del")


@dataclass(frozen=True)
class ReplaceRoute:
    route: RouteSpec

    def render(self) -> str:
        return self.route.render("replace")


@dataclass(frozen=True)
class DeleteRoute:
    route: RouteSpec

    def render(self) -> str:
        return self.route.render("del")


@dataclass(frozen=True)
class SetRpFilter:
    link: str
    value: int

    def render(self) -> str:
        return f"sysctl -w net.ipv4.conf.{self.link}.rp_filter={self.value}"


DataplaneOperation = (
    ReplaceRuleset | DeleteRuleset | AddRule | DeleteRule | ReplaceRoute | DeleteRoute | SetRpFilter
)


def expected_ruleset(spec: RulesetSpec) -> ObservedRuleset:
    return ObservedRuleset(
        fingerprint=spec.fingerprint,
        rule_counts=tuple(sorted(spec.rule_counts.items())),
        set_sizes=tuple(sorted(spec.set_sizes.items())),
    )


def diff_dataplane(
    ruleset: RulesetSpec, routing: RoutingSpec, link: str, observed: ObservedRouting | None
) -> tuple[list[DataplaneOperation], list[DataplaneOperation]]:
    """Operations before WireGuard peers change (routing), and after them (marking): marking
    starts only once the routes it relies on exist, so nothing leaves in the clear."""
    have = observed or ObservedRouting(None, (), (), None)
    routing_ops: list[DataplaneOperation] = []
    if have.rp_filter != RP_FILTER_OFF:
        routing_ops.append(SetRpFilter(link, RP_FILTER_OFF))
    # Routes are keyed by family and kind (via the link, or the unreachable floor): a changed
    # route is replaced in place, never deleted first, so there is no gap.
    wanted = {route.key: route for route in routing.routes}
    for route in have.routes:
        if route.key not in wanted:
            routing_ops.append(DeleteRoute(route))
    for route in routing.routes:
        if route not in have.routes:
            routing_ops.append(ReplaceRoute(route))
    for rule in have.rules:
        if rule not in routing.rules:
            routing_ops.append(DeleteRule(rule))
    for rule in routing.rules:
        if rule not in have.rules:
            routing_ops.append(AddRule(rule))
    marking_ops: list[DataplaneOperation] = []
    if have.ruleset != expected_ruleset(ruleset):
        marking_ops.append(ReplaceRuleset(ruleset))
    return routing_ops, marking_ops


def dataplane_warnings(link: str, observed: ObservedRouting) -> list[str]:
    """Conflicts kubespan cannot fix without changing what is not its own."""
    if observed.rp_filter_all:
        return [
            f"net.ipv4.conf.all.rp_filter={observed.rp_filter_all} overrides "
            f"net.ipv4.conf.{link}.rp_filter=0 (the kernel uses the larger of the two), so "
            "decrypted IPv4 traffic from members is dropped; set net.ipv4.conf.all.rp_filter=0 "
            "(each interface's own setting still applies to it)"
        ]
    return []
