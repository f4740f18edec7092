"""Read and change the selective-encryption state: our nftables table (apply.nfttable: one
atomic libnftables transaction per change, and proof of what it holds), the rules that look
up table 180 and the routes in it (apply.rules, apply.routes: raw rtnetlink), rp_filter."""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from kubespan.apply.libnft import Nft
from kubespan.apply.netlink import NETLINK_NETFILTER, NETLINK_ROUTE, NetlinkFormatError
from kubespan.apply.nfttable import NftTable
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.apply.routes import Routes
from kubespan.apply.rules import Rules
from kubespan.errors import ApplyError
from kubespan.names import NFT_FAMILY, NFT_TABLE
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
    rule_deletions,
)
from kubespan.plan.routing import RouteSpec, RuleSpec
from kubespan.relay.forward import RELAY_FAMILY, RELAY_TABLE

log = logging.getLogger(__name__)

# A delete that finds nothing leaves what we wanted: the object is gone.
GONE = {errno.ENOENT, errno.ESRCH}

T = TypeVar("T")


class Dataplane:
    """Our table, rules and routes in the network namespace this process runs in. Keep one
    for the life of the agent: it remembers what it applied to recognise drift (nfttable)."""

    def __init__(self, nft: Nft | None = None) -> None:
        self._rtnl = NetlinkSocket(NETLINK_ROUTE, strict=True)
        self._rules = Rules(self._rtnl)
        self._routes = Routes(self._rtnl)
        self._table = NftTable(nft or Nft(), NetlinkSocket(NETLINK_NETFILTER))

    def close(self) -> None:
        self._table.close()
        self._rtnl.close()

    # --- observe -------------------------------------------------------------------------

    def observe(self, link: str) -> ObservedRouting:
        try:
            return ObservedRouting(
                ruleset=self.observe_ruleset(),
                rules=self.observe_rules(),
                routes=self.observe_routes(),
                rp_filter=read_rp_filter(link),
                rp_filter_all=read_rp_filter("all"),
            )
        except (OSError, NetlinkFormatError) as error:
            message = f"observing table 180, its rules and our nftables table: {error}"
            raise ApplyError(message) from error

    def observe_ruleset(self) -> ObservedRuleset | None:
        return self._table.observe()

    def observe_rules(self) -> tuple[RuleSpec, ...]:
        return self._rules.observe()

    def observe_routes(self) -> tuple[RouteSpec, ...]:
        return self._routes.observe()

    # --- apply ---------------------------------------------------------------------------

    def apply(self, operations: Sequence[DataplaneOperation]) -> None:
        for operation in operations:
            try:
                self._apply_one(operation)
            except (OSError, ValueError) as error:
                raise ApplyError(f"{operation.render()}: {error}") from error

    def _apply_one(self, op: DataplaneOperation) -> None:
        match op:
            case ReplaceRuleset(spec=spec):
                self._table.replace(spec)
            case DeleteRuleset():
                self._table.delete()
            case AddRule(rule=rule):
                self._rules.add(rule)
            case DeleteRule(rule=rule):
                _unless_gone(self._rules.delete, rule)
            case ReplaceRoute(route=route):
                self._routes.replace(route)
            case DeleteRoute(route=route):
                _unless_gone(self._routes.delete, route)
            case SetRpFilter(link=link, value=value):
                rp_filter_path(link).write_text(f"{value}\n")

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove our table, the rules that look up table 180 and its routes (table 180 is
        ours, so is a rule pointing into it); what was removed, as the commands that did it."""
        removed = []
        if self.observe_ruleset() is not None:
            self._table.delete()
            removed.append(f"nftables table {NFT_FAMILY} {NFT_TABLE}")
        if self._table.remove_other(RELAY_FAMILY, RELAY_TABLE):
            # Left by a relay that did not stop cleanly (killed): its pairs' sides bind
            # elsewhere, and nothing keeps forwarding for them.
            removed.append(f"nftables table {RELAY_FAMILY} {RELAY_TABLE}")
        operations = [
            *rule_deletions(self.observe_rules()),
            *(DeleteRoute(route) for route in self.observe_routes()),
        ]
        self.apply(operations)
        return removed + [op.render() for op in operations]


def _unless_gone(delete: Callable[[T], None], item: T) -> None:
    try:
        delete(item)
    except OSError as error:
        if error.errno not in GONE:
            raise
        log.debug("already gone: %s", item)


def rp_filter_path(link: str) -> Path:
    return Path("/proc/sys/net/ipv4/conf") / link / "rp_filter"


def read_rp_filter(link: str) -> int | None:
    try:
        return int(rp_filter_path(link).read_text())
    except (OSError, ValueError):
        return None
