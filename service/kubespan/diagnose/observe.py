"""`kubespan check`'s shell: the facts, from the kernel of the network namespace it runs in
and from the live agent's status. A part that cannot be read is named in Facts.unobserved
and the rest still runs; nothing here decides what is wrong (findings.py does)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kubespan import boundedjson
from kubespan.agent.statusserver import NoLiveStatus, read_live
from kubespan.apply.dataplane import read_rp_filter
from kubespan.apply.kernel import Kernel
from kubespan.apply.libnft import NFT_CTX_OUTPUT_STATELESS, Nft
from kubespan.apply.netlink import NETLINK_ROUTE, NLM_F_ACK
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.apply.routes import RTM_GETROUTE, Routes
from kubespan.apply.rtnl import dump
from kubespan.apply.rules import FIB_RULE_HDR, RTM_GETRULE, RTM_NEWRULE
from kubespan.diagnose.facts import RP_SPECIAL, Facts, MarkUse, PathMtu, endpoint_order
from kubespan.diagnose.netlinkread import (
    RTM_GETLINK,
    link_request,
    parse_any_rule,
    parse_link_answer,
    parse_route_answer,
    route_request,
    valid_link_name,
)
from kubespan.diagnose.nftmarks import MAX_USES, mark_uses
from kubespan.diagnose.statusread import AgentReport, read_report
from kubespan.errors import KubespanError
from kubespan.model import ObservedLink
from kubespan.names import LINK_NAME, MARK_MASK, MARK_WIREGUARD, NFT_FAMILY, NFT_TABLE
from kubespan.netaddr import Endpoint
from kubespan.plan.routing import RouteSpec, RuleSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

NFT_CTX_OUTPUT_JSON = 1 << 4
NFT_CTX_OUTPUT_TERSE = 1 << 11  # named sets without their elements: kube-proxy's are large
MAX_NFT_BYTES = 64 * 1024 * 1024
MAX_NFT_DEPTH = 64
MAX_PATHS = 1024
RP_VALUES = range(3)  # off, strict, loose: the kernel takes nothing else
# Whatever reading the kernel or the status can raise (NetlinkFormatError is a ValueError):
# each makes its part "not checked".
READ_ERRORS = (OSError, ValueError, KubespanError)


class JsonNft(Nft):
    """libnftables printing JSON listings: stateless, and terse (no set elements)."""

    def __init__(self) -> None:
        super().__init__()
        flags = NFT_CTX_OUTPUT_STATELESS | NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_TERSE
        self._lib.nft_ctx_output_set_flags(self._ctx, flags)


def observe(
    runtime_dir: Path,
    link: str = LINK_NAME,
    tunnel_mtu: int | None = None,
    report: AgentReport | None = None,
) -> Facts:
    """Everything `kubespan check` judges. `tunnel_mtu` stands in for the link's MTU (the
    MTU the config asks for, or a test's without WireGuard); `report`, the agent's report
    when the caller has read it already."""
    unobserved: list[tuple[str, str]] = []

    def attempt(what: str, read: Callable[[], T], default: T) -> T:
        try:
            return read()
        except READ_ERRORS as error:
            log.debug("could not read %s: %s", what, error)
            unobserved.append((what, str(error) or type(error).__name__))
            return default

    report = report if report is not None else agent_report(runtime_dir)
    wireguard = attempt(f"the link {link}", lambda: observe_link(link), None)
    endpoints = {*report.endpoints}
    if wireguard is not None:
        endpoints.update(p.endpoint for p in wireguard.peers if p.endpoint is not None)
    mark = (wireguard.fwmark if wireguard is not None else 0) or MARK_WIREGUARD
    port = wireguard.listen_port if wireguard is not None else None

    rtnl = attempt("rtnetlink", lambda: NetlinkSocket(NETLINK_ROUTE, strict=True), None)
    rules: tuple[RuleSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    paths: tuple[PathMtu, ...] = ()
    if rtnl is not None:
        try:
            rules = attempt("ip rules", lambda: observe_rules(rtnl), ())
            routes = attempt("routes in table 180", Routes(rtnl).observe, ())
            chosen = sorted(endpoints, key=endpoint_order)[:MAX_PATHS]
            paths = tuple(path_mtu(rtnl, endpoint, mark, port) for endpoint in chosen)
        finally:
            rtnl.close()
    nothing: tuple[tuple[MarkUse, ...], bool] = ((), False)
    uses = attempt("nftables rules of other programs", observe_mark_uses, nothing)
    if uses[1]:
        more = f"more than {MAX_USES} use kubespan's mark bits; the first {MAX_USES} are shown"
        unobserved.append(("every nftables rule of other programs", more))
    devices = sorted({p.device for p in paths if p.device is not None})
    names = [*RP_SPECIAL, *([link] if wireguard is not None else []), *devices]
    return Facts(
        agent=report.state,
        agent_detail=report.detail,
        link=link,
        link_kind=wireguard.kind if wireguard is not None else None,
        tunnel_mtu=tunnel_mtu or (wireguard.mtu if wireguard is not None else None),
        rules=rules,
        routes=routes,
        mark_uses=uses[0],
        rp_filter=tuple((name, rp_filter(name)) for name in dict.fromkeys(names)),
        paths=paths,
        discovery=report.discovery,
        unobserved=tuple(unobserved),
    )


def agent_report(runtime_dir: Path) -> AgentReport:
    try:
        raw = read_live(runtime_dir)
    except NoLiveStatus as why:
        return AgentReport("not running", str(why))
    return read_report(raw)


def observe_link(name: str) -> ObservedLink | None:
    with Kernel() as kernel:
        return kernel.observe_link(name)


def observe_rules(rtnl: NetlinkSocket) -> tuple[RuleSpec, ...]:
    """Every ip rule, IPv4 then IPv6, each in the kernel's order."""
    request = FIB_RULE_HDR.pack  # family, then zeros: every rule of the family
    messages = dump(rtnl, RTM_GETRULE, lambda f: request(f, *[0] * 8), RTM_NEWRULE)
    return tuple(r for m in messages if (r := parse_any_rule(m)) is not None)


def path_mtu(rtnl: NetlinkSocket, endpoint: Endpoint, mark: int, port: int | None) -> PathMtu:
    """The MTU the kernel would use for WireGuard's packets to `endpoint`."""
    try:
        answer = rtnl.request(RTM_GETROUTE, NLM_F_ACK, route_request(endpoint, mark, port))
        route_mtu, oif = parse_route_answer(answer)
        if oif is None:
            return PathMtu(endpoint, route_mtu, None, route_mtu is not None)
        device, device_mtu = parse_link_answer(
            rtnl.request(RTM_GETLINK, NLM_F_ACK, link_request(oif))
        )
    except (OSError, ValueError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return PathMtu(endpoint, None, None, error=why)
    if route_mtu is not None:
        return PathMtu(endpoint, min(route_mtu, device_mtu), device, route_mtu <= device_mtu)
    return PathMtu(endpoint, device_mtu, device)


def observe_mark_uses() -> tuple[tuple[MarkUse, ...], bool]:
    nft = JsonNft()
    try:
        listing = nft.run("list ruleset")
    finally:
        nft.close()
    document = boundedjson.loads(listing.encode(), MAX_NFT_BYTES, MAX_NFT_DEPTH)
    return mark_uses(document, (NFT_FAMILY, NFT_TABLE), MARK_MASK)


def rp_filter(name: str) -> int | None:
    if name not in RP_SPECIAL and not valid_link_name(name):
        return None
    value = read_rp_filter(name)
    return value if value in RP_VALUES else None
