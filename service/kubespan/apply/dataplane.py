"""Read and change the selective-encryption state: our nftables table (libnftables, one
atomic transaction per change), our ip rules and table 180 (pyroute2), and rp_filter."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kubespan.apply.libnft import Nft
from kubespan.errors import ApplyError
from kubespan.names import NFT_FAMILY, NFT_TABLE, ROUTE_TABLE, RULE_PRIORITY
from kubespan.plan.dataplane import (
    AddRule,
    DataplaneOperation,
    DeleteRoute,
    DeleteRule,
    DeleteRuleset,
    ObservedRouting,
    ObservedRuleset,
    ReplaceRoute,
    ReplaceRuleset,
    SetRpFilter,
)
from kubespan.plan.ruleset import (
    FINGERPRINT_PREFIX,
    UNREACHABLE_METRIC,
    RouteSpec,
    RuleSpec,
    teardown_json,
)

RTN_UNICAST = 1
RTN_UNREACHABLE = 7
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


class Dataplane:
    """Our table, rules and routes in the network namespace this process runs in."""

    def __init__(self, ipr: IPRoute, nft: Nft | None = None) -> None:
        self._ipr = ipr
        self._nft = nft or Nft()

    def close(self) -> None:
        self._nft.close()

    # --- observe -------------------------------------------------------------------------

    def observe(self, link: str) -> ObservedRouting:
        return ObservedRouting(
            ruleset=self.observe_ruleset(),
            rules=self.observe_rules(),
            routes=self.observe_routes(),
            rp_filter=read_rp_filter(link),
            rp_filter_all=read_rp_filter("all"),
        )

    def observe_ruleset(self) -> ObservedRuleset | None:
        try:
            listing = self._nft.run(f"list table {NFT_FAMILY} {NFT_TABLE}")
        except ApplyError:
            return None  # no such table
        return summarise_listing(listing or {})

    def observe_rules(self) -> tuple[RuleSpec, ...]:
        found = []
        for version, family in FAMILIES.items():
            for rule in self._ipr.get_rules(family=family):
                table = rule.get("FRA_TABLE") or rule["table"]
                if rule.get("FRA_PRIORITY") != RULE_PRIORITY or table != ROUTE_TABLE:
                    continue
                found.append(
                    RuleSpec(
                        family=version,
                        fwmark=int(rule.get("FRA_FWMARK") or 0),
                        mask=int(rule.get("FRA_FWMASK") or 0),
                    )
                )
        return tuple(found)

    def observe_routes(self) -> tuple[RouteSpec, ...]:
        names = {int(link["index"]): str(link.get("ifname")) for link in self._ipr.get_links()}
        found = []
        for version, family in FAMILIES.items():
            for route in self._ipr.get_routes(family=family, table=ROUTE_TABLE):
                if (route.get("RTA_TABLE") or route["table"]) != ROUTE_TABLE:
                    continue
                if route["type"] == RTN_UNREACHABLE:
                    found.append(RouteSpec(version, None, None))
                    continue
                oif = route.get("RTA_OIF")
                mtu = route.get(("RTA_METRICS", "RTAX_MTU"))
                found.append(
                    RouteSpec(version, names.get(int(oif)) if oif else None, mtu and int(mtu))
                )
        return tuple(found)

    # --- apply ---------------------------------------------------------------------------

    def apply(self, operations: Sequence[DataplaneOperation]) -> None:
        for operation in operations:
            try:
                self._apply_one(operation)
            except (NetlinkError, OSError, ValueError) as error:
                raise ApplyError(f"{operation.render()}: {error}") from error

    def _apply_one(self, op: DataplaneOperation) -> None:
        match op:
            case ReplaceRuleset(spec=spec):
                self._nft.run(spec.to_json())
            case DeleteRuleset():
                self._nft.run(teardown_json())
            case AddRule(rule=rule) | DeleteRule(rule=rule):
                self._ipr.rule(
                    "add" if isinstance(op, AddRule) else "del",
                    family=FAMILIES[rule.family],
                    priority=rule.priority,
                    fwmark=rule.fwmark,
                    fwmask=rule.mask,
                    table=rule.table,
                )
            case ReplaceRoute(route=route) | DeleteRoute(route=route):
                self._route("replace" if isinstance(op, ReplaceRoute) else "del", route)
            case SetRpFilter(link=link, value=value):
                rp_filter_path(link).write_text(f"{value}\n")

    def _route(self, action: str, route: RouteSpec) -> None:
        family = FAMILIES[route.family]
        request: dict[str, Any] = {
            "family": family,
            "dst": "0.0.0.0/0" if route.family == 4 else "::/0",
            "table": ROUTE_TABLE,
        }
        if route.link is None:
            request.update(type="unreachable", priority=UNREACHABLE_METRIC)
        else:
            found = self._ipr.link_lookup(ifname=route.link)
            if not found:
                raise ApplyError(f"{route.render(action)}: link {route.link} does not exist")
            request.update(oif=found[0])
            if route.mtu:
                request["metrics"] = {"mtu": route.mtu}
        self._ipr.route(action, **request)

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove our table, rules and routes; what was removed, as the commands that did it."""
        removed = []
        if self.observe_ruleset() is not None:
            self._nft.run(teardown_json())
            removed.append(f"nftables table {NFT_FAMILY} {NFT_TABLE}")
        for rule in self.observe_rules():
            self._apply_one(DeleteRule(rule))
            removed.append(rule.render("del"))
        for route in self.observe_routes():
            with contextlib.suppress(NetlinkError):
                self._route("del", route)
                removed.append(route.render("del"))
        return removed


def summarise_listing(listing: dict[str, Any]) -> ObservedRuleset:
    fingerprint = None
    rules: dict[str, int] = {}
    sets: dict[str, int] = {}
    for item in listing.get("nftables", []):
        if "rule" in item:
            rule = item["rule"]
            rules[rule["chain"]] = rules.get(rule["chain"], 0) + 1
            comment = rule.get("comment", "")
            if comment.startswith(FINGERPRINT_PREFIX):
                fingerprint = comment.removeprefix(FINGERPRINT_PREFIX)
        elif "set" in item:
            sets[item["set"]["name"]] = len(item["set"].get("elem", []))
        elif "chain" in item:
            rules.setdefault(item["chain"]["name"], 0)
    return ObservedRuleset(fingerprint, tuple(sorted(rules.items())), tuple(sorted(sets.items())))


def rp_filter_path(link: str) -> Path:
    return Path("/proc/sys/net/ipv4/conf") / link / "rp_filter"


def read_rp_filter(link: str) -> int | None:
    try:
        return int(rp_filter_path(link).read_text())
    except (OSError, ValueError):
        return None
