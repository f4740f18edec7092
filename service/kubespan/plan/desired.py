"""Plan one reconcile pass: members + observed kernel state + time -> desired state."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kubespan.config import KubeSpanConfig
from kubespan.model import (
    FWMARK_WIREGUARD,
    LINK_NAME,
    DesiredState,
    LinkSpec,
    Member,
    ObservedLink,
    ObservedPeer,
    PeerSpec,
    PeerState,
)
from kubespan.netaddr import Endpoint, IPAddress, IPNetwork, host_network, network_sort_key
from kubespan.plan.peerstate import Tracking, decide_endpoint


@dataclass(frozen=True)
class PlanInput:
    config: KubeSpanConfig
    public_key: str
    private_key: str
    preshared_key: str
    ula: ipaddress.IPv6Address
    own_addresses: tuple[IPAddress, ...]
    members: tuple[Member, ...]
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
        fwmark=FWMARK_WIREGUARD,
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
    """Each member's ULA and node addresses; an address claimed twice stays with the first."""
    claimed: dict[IPNetwork, str] = {host_network(a): "this node" for a in (*own, own_ula)}
    out: dict[str, tuple[IPNetwork, ...]] = {}
    warnings: list[str] = []
    for member in members:
        mine: list[IPNetwork] = []
        for address in (member.info.ula, *member.info.addresses):
            network = host_network(address)
            owner = claimed.get(network)
            if owner is not None:
                if owner != member.info.public_key:
                    warnings.append(
                        f"address {address} of member {member.info.hostname} is already routed "
                        f"to {claimed_name(owner, members)}; not routing it to this member"
                    )
                continue
            claimed[network] = member.info.public_key
            mine.append(network)
        out[member.info.public_key] = tuple(sorted(mine, key=network_sort_key))
    return out, warnings


def claimed_name(owner: str, members: tuple[Member, ...]) -> str:
    for member in members:
        if member.info.public_key == owner:
            return f"member {member.info.hostname}"
    return owner


def plan(plan_input: PlanInput) -> Plan:
    members, warnings = unique_members(plan_input.members, plan_input.public_key)
    routes, overlap_warnings = allowed_ips(members, plan_input.own_addresses, plan_input.ula)
    warnings.extend(overlap_warnings)
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
    desired = DesiredState(link=link_spec(plan_input), peers=tuple(peers))
    return Plan(desired, tracking, tuple(reports), tuple(warnings))
