"""The routing half of the dataplane diff, against a model of how the kernel carries out the
operations: a rule delete removes the first rule that matches every selector the request
sets (unset ones match anything, and the kernel does not compare the `not` flag); an
appended rule goes after every rule of its priority; a route replace overwrites the first
route under its key; a route delete (an echo of the route) removes the first route with the
same key, type and next hop. Whatever foreign rules and routes are found, in whatever order,
one pass leaves exactly ours."""

from __future__ import annotations

import ipaddress
import itertools
import random

from kubespan.plan.dataplane import (
    AddRule,
    DataplaneOperation,
    DeleteRoute,
    DeleteRule,
    ObservedRouting,
    ReplaceRoute,
    diff_dataplane,
    diff_routes,
    diff_rules,
    expected_ruleset,
)
from kubespan.plan.routing import (
    ROUTE_METRIC,
    UNREACHABLE,
    RouteSpec,
    RuleSpec,
    default_network,
    routing_spec,
)
from kubespan.plan.ruleset import RulesetSpec

OURS = routing_spec(1420)
RULESET = RulesetSpec((ipaddress.ip_network("192.0.2.1/32"),), (), 1420, 51820)
NOT_COMPARED = {"not"}


def selectors(rule: RuleSpec) -> set[tuple[str, object]]:
    """What a delete request for `rule` sets, as the kernel compares it."""
    out: set[tuple[str, object]] = {(o, True) for o in rule.other if o not in NOT_COMPARED}
    if rule.fwmark:
        out.add(("fwmark", rule.fwmark))
    if rule.mask:
        out.add(("mask", rule.mask))
    return out


def kernel_rules(rules: list[RuleSpec], ops: list[DataplaneOperation]) -> list[RuleSpec]:
    rules = list(rules)
    for op in ops:
        if isinstance(op, AddRule):
            same = [
                i
                for i, r in enumerate(rules)
                if r.family == op.rule.family and r.priority <= op.rule.priority
            ]
            rules.insert(same[-1] + 1 if same else 0, op.rule)
        elif isinstance(op, DeleteRule):
            request = selectors(op.rule)
            for i, r in enumerate(rules):
                if (r.family, r.priority, r.table) == (
                    op.rule.family,
                    op.rule.priority,
                    op.rule.table,
                ) and request <= selectors(r):
                    del rules[i]
                    break
    return rules


FOREIGN_RULES = [
    RuleSpec(4, fwmark=0, mask=0),  # priority 32500 lookup 180: matches ours on delete
    RuleSpec(4, other=("not",)),  # inverted ours: the kernel cannot tell them apart
    RuleSpec(4, other=("from 10.0.0.0/8",)),  # ours and more
    RuleSpec(4, fwmark=0x40, mask=0xFFFFFFFF),
    RuleSpec(4, priority=100, fwmark=0, mask=0),
    RuleSpec(4, other=("iif eth0", "not")),
    RuleSpec(4),  # a duplicate of ours
]


def rule_cases() -> list[list[RuleSpec]]:
    cases: list[list[RuleSpec]] = [[], [RuleSpec(4)]]
    for size in (1, 2, 3):
        for chosen in itertools.combinations(FOREIGN_RULES, size):
            for ours in (False, True):
                found = [*chosen, RuleSpec(4)] if ours else list(chosen)
                cases += [list(p) for p in itertools.permutations(found)]
    return cases


def by_priority(rules: list[RuleSpec]) -> list[RuleSpec]:
    """Kernel order: by priority, insertion order within one."""
    return sorted(rules, key=lambda r: r.priority)


def test_one_pass_leaves_exactly_our_rule() -> None:
    """Every mixture of up to three foreign rules, with and without ours, in every order."""
    for case in rule_cases():
        found = by_priority(case)
        have = (*found, RuleSpec(6))
        ops = diff_rules(OURS.rules, have)
        left = kernel_rules(list(have), ops)
        for family in (4, 6):  # the kernel keeps one list per family
            mine = [r.render() for r in left if r.family == family]
            assert mine == [RuleSpec(family).render()], [r.render() for r in found]
        assert (ops == []) == (found == [RuleSpec(4)])


def test_a_missing_rule_is_only_added() -> None:
    assert diff_rules(OURS.rules, (RuleSpec(4),)) == [AddRule(RuleSpec(6))]


def kernel_routes(routes: list[RouteSpec], ops: list[DataplaneOperation]) -> list[RouteSpec]:
    routes = list(routes)
    for op in ops:
        if isinstance(op, ReplaceRoute):
            keys = [r.key for r in routes]
            if op.route.key in keys:
                routes[keys.index(op.route.key)] = op.route
            else:
                routes.append(op.route)
        elif isinstance(op, DeleteRoute):
            for i, r in enumerate(routes):
                if (r.key, r.kind, r.link, r.gateway, r.other) == (
                    op.route.key,
                    op.route.kind,
                    op.route.link,
                    op.route.gateway,
                    op.route.other,
                ):
                    del routes[i]
                    break
    return routes


V4 = default_network(4)
FOREIGN_ROUTES = [
    RouteSpec(4, V4, ROUTE_METRIC, link="kubespan", mtu=1500),  # ours, another MTU
    RouteSpec(4, V4, ROUTE_METRIC, link="eth0", gateway=ipaddress.ip_address("192.0.2.1")),
    RouteSpec(4, ipaddress.ip_network("203.0.113.0/24"), 0, link="eth0"),
    RouteSpec(4, ipaddress.ip_network("203.0.113.0/24"), 0, kind="throw"),
    RouteSpec(4, V4, ROUTE_METRIC, tos=0x10, link="eth0"),
    RouteSpec(4, V4, 0, link="kubespan", mtu=1420),  # ours, the old metric
    RouteSpec(4, V4, ROUTE_METRIC, link="kubespan", other=("nexthops",)),
]


def route_cases() -> list[list[RouteSpec]]:
    cases: list[list[RouteSpec]] = []
    for size in (0, 1, 2):
        for chosen in itertools.combinations(FOREIGN_ROUTES, size):
            for ours in OURS.routes[:2], OURS.routes[1:2], ():
                cases += [list(p) for p in itertools.permutations([*chosen, *ours])]
    return cases


def test_one_pass_leaves_exactly_our_routes() -> None:
    """Every mixture of up to two foreign routes, with all, some or none of ours."""
    for found in route_cases():
        have = (*found, *OURS.routes[2:])
        ops = diff_routes(OURS.routes, have)
        left = sorted(r.render() for r in kernel_routes(list(have), ops))
        assert left == sorted(r.render() for r in OURS.routes), [r.render() for r in found]
        assert (ops == []) == (sorted(have, key=repr) == sorted(OURS.routes, key=repr))


def test_our_changed_route_is_replaced_in_place_never_deleted() -> None:
    """An MTU change: no gap in which marked traffic has no route."""
    have = (RouteSpec(4, V4, ROUTE_METRIC, link="kubespan", mtu=1500), *OURS.routes[1:])
    assert diff_routes(OURS.routes, have) == [ReplaceRoute(OURS.routes[0])]


def test_our_routes_come_before_deletes() -> None:
    stray = RouteSpec(4, ipaddress.ip_network("203.0.113.0/24"), 0, link="eth0")
    ops = diff_routes(OURS.routes, (stray,))
    assert ops == [*(ReplaceRoute(r) for r in OURS.routes), DeleteRoute(stray)]


def test_random_mixtures() -> None:
    """Larger mixtures than the exhaustive cases, in random kernel orders."""
    rng = random.Random(180)
    for _ in range(500):
        rules = by_priority(rng.sample([*FOREIGN_RULES, *FOREIGN_RULES, RuleSpec(4)], 5))
        assert kernel_rules(rules, diff_rules(OURS.rules[:1], tuple(rules))) == [RuleSpec(4)]
        routes = rng.sample([*FOREIGN_ROUTES, *OURS.routes], 6)
        result = kernel_routes(routes, diff_routes(OURS.routes, tuple(routes)))
        assert sorted(result, key=repr) == sorted(OURS.routes, key=repr)


def test_a_table_not_proven_ours_is_replaced() -> None:
    observed = ObservedRouting(None, OURS.rules, OURS.routes, 0)
    proven = ObservedRouting(expected_ruleset(RULESET), OURS.rules, OURS.routes, 0)
    unproven = ObservedRouting(
        expected_ruleset(RULESET).__class__(None), OURS.rules, OURS.routes, 0
    )
    assert diff_dataplane(RULESET, OURS, "kubespan", proven) == ([], [])
    for have in (observed, unproven):
        assert [op.render()[:6] for op in diff_dataplane(RULESET, OURS, "kubespan", have)[1]] == [
            "nft -f"
        ]


def test_unreachable_floor_renders_as_an_operator_types_it() -> None:
    floor = RouteSpec(6, default_network(6), 0xFFFFFFFF, UNREACHABLE)
    assert floor.render() == "ip -6 route replace unreachable default table 180 metric 4294967295"
