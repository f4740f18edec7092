"""`kubespan check`: what is wrong on this node for kubespan, why it matters, what to do.
Pure: a function of the observed Facts.

No findings means healthy; `info` findings only tell (the address discovery sees). Each
check below says what it judges and where it draws the line. Findings come errors first,
then warnings, then information; within a severity, in the order of the checks and, within
a check, in the kernel's or the status document's order (deterministic for the same facts).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kubespan.diagnose.conflicts import mark_findings, route_findings, rule_findings
from kubespan.diagnose.facts import RP_SPECIAL, DiscoverySeen, Facts
from kubespan.diagnose.finding import SEVERITIES, Finding
from kubespan.discovery.limits import MAX_CLOCK_SKEW_SECONDS

# What WireGuard adds to each packet: outer IP header (20 or 40), UDP (8), its own (32).
OVERHEAD = {4: 60, 6: 80}
MIN_TUNNEL_MTU = 1280  # the machine config's minimum: IPv6 inside the tunnel needs it
RP_STRICT = 1


def diagnose(facts: Facts, max_skew: float = MAX_CLOCK_SKEW_SECONDS) -> tuple[Finding, ...]:
    """Every finding for these facts; `max_skew`: the discovery service's bound on a
    signed request's timestamp."""
    found = [
        *agent_findings(facts),
        *link_findings(facts),
        *rule_findings(facts.rules),
        *route_findings(facts.routes, facts.link),
        *mark_findings(facts.mark_uses),
        *rp_filter_findings(facts),
        *mtu_findings(facts),
        *clock_findings(facts.discovery, max_skew),
        *discovery_findings(facts.discovery),
        *unobserved_findings(facts.unobserved),
    ]
    return tuple(sorted(found, key=lambda f: SEVERITIES.index(f.severity)))


# --- the agent and its link --------------------------------------------------------------


def agent_findings(facts: Facts) -> Iterator[Finding]:
    if facts.agent == "not running":
        yield Finding(
            "agent-not-running",
            "error",
            f"no kubespan agent is running: {facts.agent_detail}",
            "without the agent nothing keeps the mesh: member changes are not applied, drift "
            "is not repaired, and discovery cannot be checked (the kernel checks still ran)",
            "start it (`systemctl start kubespan`) and see why it stopped "
            "(`journalctl -u kubespan`)",
        )
    elif facts.agent == "unreadable":
        yield Finding(
            "agent-status-unreadable",
            "warning",
            f"the kubespan agent answered, but {facts.agent_detail}",
            "discovery and the clock cannot be checked without the agent's report",
            "see the agent's log (`journalctl -u kubespan`); `kubespan status` shows the "
            "same report",
        )
    elif facts.agent == "starting":
        yield Finding(
            "agent-starting",
            "info",
            "the kubespan agent is starting: its first pass has not finished",
            "discovery and the clock are checked from the agent's report, which comes with "
            "its first pass",
            "run `kubespan check` again in a few seconds",
        )
    elif facts.agent == "disabled":
        yield Finding(
            "agent-disabled",
            "info",
            "kubespan is disabled in the machine config: the agent is idle",
            "nothing is encrypted; the kernel checks still ran, for when it is turned on",
            "set machine.network.kubespan.enabled: true to turn it on",
        )


def link_findings(facts: Facts) -> Iterator[Finding]:
    if facts.link_kind is not None and facts.link_kind != "wireguard":
        kind = f"a {facts.link_kind} link" if facts.link_kind else "a link of no known kind"
        yield Finding(
            "link-not-wireguard",
            "error",
            f"the link named {facts.link} is {kind}, not WireGuard",
            "kubespan never configures another program's link: while that one has the name "
            "there is no tunnel, and traffic to members goes wherever that link takes it",
            f"delete or rename that link (`ip link del {facts.link}`) and stop whatever "
            "creates it; the agent then makes its own",
        )


# --- reverse path filtering ---------------------------------------------------------------


def rp_filter_findings(facts: Facts) -> Iterator[Finding]:
    """IPv4 reverse path filtering on the tunnel link: the kernel applies the larger of
    `all` and the link's own value. The link has no IPv4 address, and for such a device the
    kernel (__fib_validate_source) drops a packet whose source is not routed back through
    it in loose mode (2) as in strict (1): every decrypted packet from a member's or pod's
    address, since our routes to them are reached by mark only. With no link yet, its value
    is what the agent will set (0), so `all` alone decides. The underlay's own values are
    shown to say what setting `all` to 0 would change; they do not affect decrypted
    packets."""
    all_value = facts.rp("all") or 0
    present = facts.link_kind is not None
    link_value = (facts.rp(facts.link) or 0) if present else 0
    effective = max(all_value, link_value)
    if effective == 0:
        return
    mode = "strict" if effective == RP_STRICT else "loose"
    link = facts.link
    what = (
        f"reverse path filtering is {mode} on {link}: net.ipv4.conf.{link}.rp_filter="
        f"{link_value}, net.ipv4.conf.all.rp_filter={all_value}, and the larger applies"
        if present
        else f"reverse path filtering will be {mode} on {link} once it exists: "
        f"net.ipv4.conf.all.rp_filter={all_value} outweighs the 0 the agent sets on it"
    )
    why = (
        f"decrypted packets come out of {link} with a member's or a pod's address as source; "
        f"{link} has no IPv4 address, and on such a link the kernel drops, loose or strict, "
        f"each packet whose source is not routed back through {link}, so traffic from "
        "members is lost"
    )
    if all_value != 0:
        devices = [(n, v) for n, v in facts.rp_filter if n not in (*RP_SPECIAL, link)]
        kept = ", ".join(f"{name}={value}" for name, value in devices if value is not None)
        todo = (
            "set net.ipv4.conf.all.rp_filter=0, in /etc/sysctl.d so it lasts; devices "
            "meant to keep filtering then need their own value set (1 strict, 2 loose)"
            + (f" (now: {kept})" if kept else "")
        )
    else:
        todo = (
            f"set net.ipv4.conf.{link}.rp_filter=0: the agent does so at each pass, so "
            "something sets it back; look for rp_filter lines in /etc/sysctl.d, "
            f"/usr/lib/sysctl.d and /run/sysctl.d, and add `net.ipv4.conf.{link}.rp_filter = 0`"
        )
    yield Finding(f"rp-filter-{mode}", "error", what, why, todo)


# --- MTU -----------------------------------------------------------------------------------


def mtu_findings(facts: Facts) -> Iterator[Finding]:
    """The tunnel MTU plus WireGuard's overhead must fit the path MTU the kernel has for
    each peer endpoint; a path that could not be looked up is said too."""
    for path in facts.paths:
        if path.mtu is None:
            yield Finding(
                "no-route-to-peer",
                "warning",
                f"no route to peer endpoint {path.endpoint}: {path.error or 'unknown'}",
                "WireGuard's packets to that peer cannot leave: the tunnel to it stays down",
                "add a route towards it, or check the endpoint the peer advertises "
                "(`kubespan status`)",
            )
            continue
        if facts.tunnel_mtu is None:
            continue
        overhead = OVERHEAD[path.endpoint.address.version]
        outer = facts.tunnel_mtu + overhead
        if outer <= path.mtu:
            continue
        fits = path.mtu - overhead
        measured = "the route's MTU" if path.from_route else f"the MTU of {path.device}"
        todo = f"set machine.network.kubespan.mtu to {fits} or less, or raise the path's MTU"
        if fits < MIN_TUNNEL_MTU:
            todo = (
                f"raise the MTU of the path (to {MIN_TUNNEL_MTU + overhead} or more): the "
                f"tunnel needs at least {MIN_TUNNEL_MTU}, and only {fits} fits"
            )
        yield Finding(
            "mtu-too-large",
            "error",
            f"the tunnel MTU {facts.tunnel_mtu} does not fit the path to peer endpoint "
            f"{path.endpoint}: {measured} is {path.mtu}, and WireGuard adds {overhead} bytes "
            f"over IPv{path.endpoint.address.version} ({outer} > {path.mtu})",
            "full-size packets in the tunnel become outer packets too large for the path: "
            "they are fragmented, and fragments are often dropped by NATs and firewalls, so "
            "small requests work while large transfers stall",
            f"{todo}; the largest tunnel MTU this path takes is {fits}",
        )


# --- discovery -----------------------------------------------------------------------------


def clock_findings(services: Iterable[DiscoverySeen], max_skew: float) -> Iterator[Finding]:
    """Skew beyond `max_skew` is an error (signed requests are refused as stale); beyond
    half of it a warning (a little more drift and they are)."""
    for service in services:
        skew = service.clock_skew
        if skew is None or abs(skew) <= max_skew / 2:
            continue
        refused = abs(skew) > max_skew
        direction = "behind" if skew > 0 else "ahead of"
        yield Finding(
            "clock-skew",
            "error" if refused else "warning",
            f"this node's clock is {abs(skew):.0f} s {direction} the clock of discovery "
            f"service {service.url}",
            f"the service refuses signed requests more than {max_skew:g} s from its own "
            "clock: "
            + (
                "this node can neither register nor learn members through it"
                if refused
                else "a little more drift and this node can neither register nor learn members"
            ),
            "synchronise the clock (`timedatectl set-ntp true`; `timedatectl "
            "timesync-status` or `chronyc tracking` shows how it does); if this node's "
            "clock is right, the service's is not: tell its operator",
        )


def discovery_findings(services: tuple[DiscoverySeen, ...]) -> Iterator[Finding]:
    """A failing service is an error when every service fails (no members can be learned),
    a warning when another still answers; what each sees of this node is information."""
    all_failing = all(s.last_error for s in services)
    for service in services:
        if service.last_error:
            never = "" if service.answered else " (it has never answered)"
            yield Finding(
                "discovery-failing",
                "error" if all_failing else "warning",
                f"discovery service {service.url} is failing{never}: {service.last_error}",
                "members are learned and this node announced through discovery: "
                + (
                    "while every service fails, new and moved members are not seen (the mesh "
                    "runs on what is known)"
                    if all_failing
                    else "the other services still do it, with one fewer to fall back on"
                ),
                "check that the URL is right and reachable from this node (`curl -sS "
                f"{service.url}/openapi.json`), and that cluster.id and cluster.secret are "
                "the other nodes'; the error says more",
            )
        if service.public_address:
            yield Finding(
                "discovery-sees-address",
                "info",
                f"discovery service {service.url} sees this node at {service.public_address}",
                "members outside this node's network reach it at that address (behind NAT, "
                "the NAT's)",
                "nothing, if that is this node's public address or its NAT's; otherwise the "
                "service may stand behind a proxy it does not trust (--trusted-proxy)",
            )


# --- what could not be checked -------------------------------------------------------------


def unobserved_findings(unobserved: Iterable[tuple[str, str]]) -> Iterator[Finding]:
    for what, why in unobserved:
        yield Finding(
            "not-checked",
            "warning",
            f"{what} could not be checked: {why}",
            "a check that could not run cannot say this node is fine",
            "run `kubespan check` as root on the node itself; if it keeps failing, the error "
            "says what is missing",
        )
