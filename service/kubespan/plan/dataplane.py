"""Diff the selective-encryption state (nftables table, ip rules, table 180, rp_filter)
against what the kernel has. Operations render as the commands an operator would type.

Pure: the observation is a value. How the table is recognised without guessing nft's output
format is the observer's business (apply.nfttable): it reports which of our rulesets the
kernel provably holds, if any.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kubespan.names import NFT_FAMILY, NFT_TABLE
from kubespan.plan.routing import RouteSpec, RoutingSpec, RuleSpec
from kubespan.plan.ruleset import RulesetSpec

# Reverse-path filtering off on the link: the kernel's check (strict or loose) fails every
# packet arriving on an interface that has no IPv4 address unless the reverse route points
# back through it, and ours has no IPv4 address by design; decrypted traffic would be
# dropped. WireGuard itself already checks each inner source against the peer's allowed IPs.
RP_FILTER_OFF = 0


@dataclass(frozen=True)
class ObservedRuleset:
    """Our table exists. `fingerprint` is that of the ruleset it is proven to hold, exactly
    as we applied it (every chain, rule and element); None when it differs from what we
    applied, or when we cannot tell (nothing applied since the agent started)."""

    fingerprint: str | None


@dataclass(frozen=True)
class ObservedRouting:
    """`ruleset` None: no table. `rules`: every rule that looks up table 180, ours or not, in
    the kernel's order. `routes`: every route in table 180, in the kernel's order."""

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
    """What observing the kernel reports once `spec` has been applied."""
    return ObservedRuleset(fingerprint=spec.fingerprint)


def diff_dataplane(
    ruleset: RulesetSpec, routing: RoutingSpec, link: str, observed: ObservedRouting | None
) -> tuple[list[DataplaneOperation], list[DataplaneOperation]]:
    """Operations before WireGuard peers change (routing), and after them (marking): marking
    starts only once the routes it relies on exist, so nothing leaves in the clear."""
    have = observed or ObservedRouting(None, (), (), None)
    routing_ops: list[DataplaneOperation] = []
    if have.rp_filter != RP_FILTER_OFF:
        routing_ops.append(SetRpFilter(link, RP_FILTER_OFF))
    routing_ops += diff_routes(routing.routes, have.routes)
    routing_ops += diff_rules(routing.rules, have.rules)
    marking_ops: list[DataplaneOperation] = []
    if have.ruleset != expected_ruleset(ruleset):
        marking_ops.append(ReplaceRuleset(ruleset))
    return routing_ops, marking_ops


def diff_routes(
    wanted: tuple[RouteSpec, ...], have: tuple[RouteSpec, ...]
) -> list[DataplaneOperation]:
    """Table 180 holds our routes and nothing else. A route of ours that differs is replaced
    in place, never deleted first, so there is no gap. Where the kernel holds several routes
    under one key (appended aliases, multipath siblings), all but one are deleted first, then
    the survivor is replaced: the kernel deletes the first route a request matches, so the
    deletes may hit another of the group than meant, but exactly one remains either way, and
    the replace turns it into ours. Routes under keys we do not use are deleted."""
    ops: list[DataplaneOperation] = []
    groups: dict[tuple[int, str, str, int, int], list[RouteSpec]] = {}
    for route in have:
        groups.setdefault(route.key, []).append(route)
    keys = set()
    for route in wanted:
        key = route.key
        keys.add(key)
        group = groups.get(key, [])
        if group == [route]:
            continue
        ops += [DeleteRoute(r) for r in group[1:]]
        ops.append(ReplaceRoute(route))
    ops += [DeleteRoute(r) for key, group in groups.items() if key not in keys for r in group]
    return ops


def diff_rules(
    wanted: tuple[RuleSpec, ...], have: tuple[RuleSpec, ...]
) -> list[DataplaneOperation]:
    """Per family, exactly our rule looks up table 180. Otherwise: add ours (appended, even
    if an equal one exists, so a rule of ours is in place throughout), then delete every rule
    observed, most specific first. The kernel deletes the first rule that matches every
    selector a request sets, so a request for a foreign rule with fewer selectors than ours
    (`priority 32500 lookup 180`) may take ours instead. Counting makes it right: one delete
    per rule observed, the most specific first (a request can only take a rule with as many
    selectors or more, and those are gone or go in the same round), and the rule we appended
    last at its priority is the one left. tests/test_dataplane_diff.py checks every mixture
    against a model of the kernel."""
    ops: list[DataplaneOperation] = []
    families = {rule.family for rule in wanted}
    for rule in wanted:
        mine = [r for r in have if r.family == rule.family]
        if mine == [rule]:
            continue
        ops.append(AddRule(rule))
        ops += rule_deletions(mine)
    ops += rule_deletions(r for r in have if r.family not in families)
    return ops


def rule_deletions(rules: Iterable[RuleSpec]) -> list[DataplaneOperation]:
    """Deletes of these rules, most specific first (see diff_rules)."""
    ordered = sorted(rules, key=lambda rule: -rule.specificity)  # stable: kernel order kept
    return [DeleteRule(rule) for rule in ordered]


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
