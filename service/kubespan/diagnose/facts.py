"""What `kubespan check` observed, as plain values: read by the shell (observe.py), judged by
the pure core (findings.py). Whatever came from the kernel or the agent's status is already
bounded and validated here: names are short strings, numbers are in range."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubespan.netaddr import Endpoint, address_sort_key
from kubespan.plan.routing import RouteSpec, RuleSpec

# running: the agent answered on its socket with a report; starting, disabled: it answered
# with a placeholder; not running: nothing answers; unreadable: it answered with garbage.
AgentState = Literal["running", "starting", "disabled", "not running", "unreadable"]

# How the mark is reached in nftables: the packet's own, or its connection's.
META_MARK = "meta mark"
CT_MARK = "ct mark"
# net.ipv4.conf entries that are not devices: the value for every device, and for new ones.
RP_SPECIAL = ("all", "default")


@dataclass(frozen=True)
class MarkUse:
    """One rule in another program's nftables table that changes (`sets`) or reads mark
    bits. `bits`: those it may change, or those it compares (all 32 when it cannot be told,
    e.g. a value from a map or another expression)."""

    family: str
    table: str
    chain: str
    handle: int | None
    hook: str | None  # "output, priority -150" for a base chain; None for a regular chain
    key: str  # META_MARK or CT_MARK
    sets: bool
    bits: int

    @property
    def where(self) -> str:
        handle = f" (handle {self.handle})" if self.handle is not None else ""
        hook = f" (hook {self.hook})" if self.hook else ""
        return f"table {self.family} {self.table}, chain {self.chain}{hook}, rule{handle}"


def endpoint_order(endpoint: Endpoint) -> tuple[int, int, int]:
    """IPv4 before IPv6, then by address and port (Endpoint's own order fails across
    versions)."""
    return (*address_sort_key(endpoint.address), endpoint.port)


@dataclass(frozen=True)
class PathMtu:
    """The kernel's route lookup towards one peer endpoint, made as for WireGuard's own
    packets (UDP, with the link's firewall mark). `mtu`: the route's MTU when it has one
    (configured, or learned from ICMP as a path MTU exception: `from_route`), else the MTU
    of the device it leaves by; None when the lookup failed (`error` says why)."""

    endpoint: Endpoint
    mtu: int | None
    device: str | None
    from_route: bool = False
    error: str | None = None


@dataclass(frozen=True)
class DiscoverySeen:
    """One discovery service as the live agent last saw it."""

    url: str
    last_error: str | None
    public_address: str | None
    clock_skew: float | None  # seconds the service's clock is ahead of ours
    answered: bool  # it has answered at least once


@dataclass(frozen=True)
class Facts:
    agent: AgentState
    agent_detail: str  # why the agent's status could not be had; "" when it could
    link: str  # the tunnel link's name
    link_kind: str | None  # None: there is no link of that name
    tunnel_mtu: int | None
    rules: tuple[RuleSpec, ...]  # every ip rule, IPv4 then IPv6, each in the kernel's order
    routes: tuple[RouteSpec, ...]  # every route in table 180
    mark_uses: tuple[MarkUse, ...]  # outside our own nftables table
    # net.ipv4.conf.<name>.rp_filter, for `all`, `default`, the link and the underlay
    # devices (those the paths to peers leave by); None where it could not be read.
    rp_filter: tuple[tuple[str, int | None], ...]
    paths: tuple[PathMtu, ...]
    discovery: tuple[DiscoverySeen, ...]
    # What could not be looked at, and why: a check that could not run is said, not skipped.
    unobserved: tuple[tuple[str, str], ...] = ()

    def rp(self, name: str) -> int | None:
        return dict(self.rp_filter).get(name)
