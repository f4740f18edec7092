"""Plan one reconcile pass: members + observed kernel state + time -> desired state."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kubespan.config import KubeSpanConfig
from kubespan.model import (
    DesiredState,
    LinkSpec,
    Member,
    ObservedLink,
    ObservedPeer,
    PeerSpec,
    PeerState,
)
from kubespan.names import LINK_NAME, MARK_WIREGUARD
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork, host_network
from kubespan.plan.ipset import IntervalSet, collapse, network_range, range_networks
from kubespan.plan.peerstate import Tracking, decide_endpoint
from kubespan.plan.ruleset import RulesetSpec, routing_spec


@dataclass(frozen=True)
class PlanInput:
    config: KubeSpanConfig
    public_key: str
    private_key: str
    preshared_key: str
    ula: ipaddress.IPv6Address
    own_addresses: tuple[IPAddress, ...]
    # None: discovery has not answered yet (a restart, a reload, discovery down). The peers
    # the kernel has are kept as they are, not removed: unknown is not the same as empty.
    members: tuple[Member, ...] | None
    observed: ObservedLink | None
    tracking: Mapping[str, Tracking]
    now: float


@dataclass(frozen=True)
class PeerReport:
    """One peer as `kubespan status` shows it."""

    public_key: str
    name: str
    node_id: str
    state: PeerState
    endpoint: Endpoint | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class Plan:
    desired: DesiredState
    tracking: Mapping[str, Tracking]
    reports: tuple[PeerReport, ...]
    warnings: tuple[str, ...]


def link_spec(plan_input: PlanInput) -> LinkSpec:
    return LinkSpec(
        name=LINK_NAME,
        mtu=plan_input.config.mtu,
        listen_port=plan_input.config.listen_port,
        fwmark=MARK_WIREGUARD,
        private_key=plan_input.private_key,
        preshared_key=plan_input.preshared_key,
        address=ipaddress.IPv6Interface(f"{plan_input.ula}/64"),
    )


def unique_members(
    members: tuple[Member, ...], own_public_key: str
) -> tuple[tuple[Member, ...], list[str]]:
    """Drop ourselves and duplicate keys; stable order by public key, then node id."""
    warnings: list[str] = []
    by_key: dict[str, Member] = {}
    for member in sorted(members, key=lambda m: (m.info.public_key, m.info.node_id)):
        key = member.info.public_key
        if key == own_public_key:
            continue
        if key in by_key:
            warnings.append(
                f"members {by_key[key].info.node_id} and {member.info.node_id} share public key "
                f"{key}; using {by_key[key].info.node_id}"
            )
            continue
        by_key[key] = member
    return tuple(by_key.values()), warnings


def allowed_ips(
    members: tuple[Member, ...], own: tuple[IPAddress, ...], own_ula: ipaddress.IPv6Address
) -> tuple[dict[str, tuple[IPNetwork, ...]], list[str]]:
    """Each member's ULA, node addresses and pod CIDRs. Ranges are claimed in member order (by
    public key): a later member loses what an earlier one (or this node) already has."""
    claimed = {4: IntervalSet(), 6: IntervalSet()}
    owners: dict[tuple[int, int, int], str] = {}  # (version, start, end): who has it
    for address in (*own, own_ula):
        claimed[address.version].add(int(address), int(address))
        owners[(address.version, int(address), int(address))] = "this node"
    out: dict[str, tuple[IPNetwork, ...]] = {}
    warnings: list[str] = []
    for member in members:
        info = member.info
        mine: list[tuple[int, int, int, IPNetwork]] = []
        wanted = [host_network(a) for a in (info.ula, *info.addresses)]
        wanted.extend(info.pod_cidrs)
        for network in wanted:
            version = network.version
            start, end = network_range(network)
            free = claimed[version].uncovered(start, end)
            if free == [(start, end)]:
                mine.append((version, start, network.prefixlen, network))
                owners[(version, start, end)] = info.hostname
            elif not free:
                owner = owners.get((version, start, end))
                where = (
                    "this node"
                    if owner == "this node"
                    else f"member {owner}"
                    if owner
                    else "earlier members"
                )
                warnings.append(
                    f"{network} of member {info.hostname} is already routed to {where}; "
                    "not routing it to this member"
                )
            else:
                pieces = [n for a, b in free for n in range_networks(version, a, b)]
                mine.extend((version, int(n.network_address), n.prefixlen, n) for n in pieces)
                warnings.append(
                    f"{network} of member {info.hostname} overlaps ranges routed to earlier "
                    f"members; routing only {', '.join(str(n) for n in pieces)} to it"
                )
            claimed[version].add(start, end)
        mine.sort(key=lambda entry: entry[:3])
        out[info.public_key] = tuple(entry[3] for entry in mine)
    return out, warnings


def member_set(
    peers: tuple[PeerSpec, ...],
    reports: tuple[PeerReport, ...],
    cluster_prefix: ipaddress.IPv6Network,
    bypass_down_peers: bool,
) -> tuple[tuple[IPNetwork, ...], tuple[IPNetwork, ...]]:
    """Destinations whose traffic goes into the tunnel: every peer's allowed IPs but the ULAs
    (those route over the link by its /64). Fail closed: a peer that is down stays in the set
    unless bypass is allowed."""
    up = {r.public_key for r in reports if r.state is PeerState.UP}
    v4: list[IPNetwork] = []
    v6: list[IPNetwork] = []
    for peer in peers:
        if bypass_down_peers and peer.public_key not in up:
            continue
        for network in peer.allowed_ips:
            if network.version == 4:
                v4.append(network)
            elif not network.subnet_of(cluster_prefix):
                v6.append(network)
    return collapse(v4, 4), collapse(v6, 6)


Peers = tuple[list[PeerSpec], list[PeerReport], dict[str, Tracking]]


def kept_peers(plan_input: PlanInput) -> Peers:
    """The kernel's peers, unchanged, while the members are not known yet."""
    peers: list[PeerSpec] = []
    reports: list[PeerReport] = []
    tracking: dict[str, Tracking] = {}
    for seen in plan_input.observed.peers if plan_input.observed else ():
        decision = decide_endpoint(
            plan_input.now,
            (),
            plan_input.tracking.get(seen.public_key),
            seen.endpoint,
            seen.last_handshake,
        )
        tracking[seen.public_key] = decision.tracking
        name = f"({seen.public_key[:8]}…)"
        peers.append(PeerSpec(seen.public_key, name, seen.allowed_ips, None, seen.keepalive))
        reports.append(
            PeerReport(
                seen.public_key,
                name,
                "",
                decision.state,
                seen.endpoint,
                seen.last_handshake,
                seen.rx_bytes,
                seen.tx_bytes,
            )
        )
    return peers, reports, tracking


def plan(plan_input: PlanInput) -> Plan:
    if plan_input.members is None:
        return _desired(plan_input, *kept_peers(plan_input), [])
    warnings: list[str] = []
    peers, reports, tracking = member_peers(plan_input, plan_input.members, warnings)
    return _desired(plan_input, peers, reports, tracking, warnings)


def member_peers(
    plan_input: PlanInput, discovered: tuple[Member, ...], warnings: list[str]
) -> Peers:
    """One peer per member: allowed IPs, and the endpoint to try next if it must change."""
    members, duplicates = unique_members(discovered, plan_input.public_key)
    warnings.extend(duplicates)
    routes, overlaps = allowed_ips(members, plan_input.own_addresses, plan_input.ula)
    warnings.extend(overlaps)
    observed_peers: dict[str, ObservedPeer] = {}
    if plan_input.observed is not None:
        observed_peers = {p.public_key: p for p in plan_input.observed.peers}

    peers: list[PeerSpec] = []
    reports: list[PeerReport] = []
    tracking: dict[str, Tracking] = {}
    for member in members:
        key = member.info.public_key
        seen = observed_peers.get(key)
        decision = decide_endpoint(
            plan_input.now,
            member.endpoints,
            plan_input.tracking.get(key),
            seen.endpoint if seen else None,
            seen.last_handshake if seen else None,
        )
        tracking[key] = decision.tracking
        peers.append(
            PeerSpec(
                public_key=key,
                name=member.info.hostname,
                allowed_ips=routes[key],
                endpoint=decision.set_endpoint,
            )
        )
        reports.append(
            PeerReport(
                public_key=key,
                name=member.info.hostname,
                node_id=member.info.node_id,
                state=decision.state,
                endpoint=decision.set_endpoint or (seen.endpoint if seen else None),
                last_handshake=seen.last_handshake if seen else None,
                rx_bytes=seen.rx_bytes if seen else 0,
                tx_bytes=seen.tx_bytes if seen else 0,
            )
        )
    return peers, reports, tracking


def _desired(
    plan_input: PlanInput,
    peers: list[PeerSpec],
    reports: list[PeerReport],
    tracking: dict[str, Tracking],
    warnings: list[str],
) -> Plan:
    link = link_spec(plan_input)
    v4, v6 = member_set(
        tuple(peers),
        tuple(reports),
        link.address.network,
        plan_input.config.allow_down_peer_bypass,
    )
    desired = DesiredState(
        link=link,
        peers=tuple(peers),
        ruleset=RulesetSpec(v4, v6, link.mtu, link.listen_port),
        routing=routing_spec(link.mtu, link.name),
    )
    return Plan(desired, tracking, tuple(reports), tuple(warnings))
