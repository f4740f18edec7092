"""Member admission: which of the prefixes a member claims may route to it.

Members are admitted, not trusted (every member holds the cluster secret and may run other
software, or be misconfigured): a claim is refused when routing it to the member would pull
traffic that is not the member's into its tunnel.

- A ULA must lie in the cluster's /64, and not be this node's.
- A node address must be a unicast address that is neither this node's own, nor a discovery
  service's, nor loopback, link-local, multicast or unspecified, nor inside the cluster's
  ULA /64 or its pod subnets; and inside `cluster.network.nodeSubnets` when that is set
  (without it, a member could name any outside address, a public resolver say, as its own).
- A pod CIDR must lie inside one of the cluster's pod subnets (`cluster.network.podSubnets`;
  none configured: none accepted), be strictly smaller than that subnet and no shorter than
  /16 (IPv4) or /48 (IPv6), and hold neither an address of this node nor of a discovery
  service (the way back to discovery must never depend on a member's tunnel).

What is admitted is then divided among members by claims.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

from kubespan.model import Member
from kubespan.netaddr import IPAddress, IPNetwork, host_network, reachable_unicast

MIN_POD_PREFIX = {4: 16, 6: 48}


@dataclass(frozen=True)
class AdmissionRules:
    cluster_prefix: ipaddress.IPv6Network
    pod_subnets: tuple[IPNetwork, ...]
    own: tuple[IPAddress, ...]  # this node's addresses and ULA
    protected: tuple[IPAddress, ...]  # the discovery services' addresses
    node_subnets: tuple[IPNetwork, ...] = ()  # where node addresses may lie (empty: anywhere)


@dataclass(frozen=True)
class Refusal:
    member: str
    claim: IPNetwork
    reason: str

    def __str__(self) -> str:
        return f"{self.claim} claimed by member {self.member} is not routed to it: {self.reason}"


@dataclass(frozen=True)
class Claims:
    """What a member may have, by phase: its ULA and node addresses, then its pod CIDRs."""

    addresses: tuple[IPNetwork, ...]
    pod_cidrs: tuple[IPNetwork, ...]


@lru_cache(maxsize=1 << 14)
def admit(member: Member, rules: AdmissionRules) -> tuple[Claims, tuple[Refusal, ...]]:
    """Cached: a member's claims are judged again only when its record or the rules change
    (a pass for 1,000 members would otherwise spend most of its time here)."""
    return _admit(member, rules)


def _admit(member: Member, rules: AdmissionRules) -> tuple[Claims, tuple[Refusal, ...]]:
    info = member.info
    refusals: list[Refusal] = []
    addresses: list[IPNetwork] = []

    def refuse(claim: IPNetwork, reason: str) -> None:
        refusals.append(Refusal(info.hostname, claim, reason))

    if info.ula not in rules.cluster_prefix:
        refuse(host_network(info.ula), f"a ULA must lie in the cluster's {rules.cluster_prefix}")
    elif info.ula in rules.own:
        refuse(host_network(info.ula), "it is this node's ULA")
    else:
        addresses.append(host_network(info.ula))
    for address in info.addresses:
        reason = _address_problem(address, rules)
        if reason:
            refuse(host_network(address), reason)
        else:
            addresses.append(host_network(address))
    pod_cidrs: list[IPNetwork] = []
    for network in info.pod_cidrs:
        reason = _pod_cidr_problem(network, rules)
        if reason:
            refuse(network, reason)
        else:
            pod_cidrs.append(network)
    return Claims(tuple(addresses), tuple(pod_cidrs)), tuple(refusals)


def _address_problem(address: IPAddress, rules: AdmissionRules) -> str | None:
    if address in rules.own:
        return "it is this node's own address"
    if address in rules.protected:
        return "it is a discovery service's address (run discovery on its own address)"
    if not reachable_unicast(address):
        return "not a unicast address another node can have"
    if address.version == 6 and address in rules.cluster_prefix:
        return f"node addresses must lie outside the cluster's {rules.cluster_prefix}"
    if any(address.version == n.version and address in n for n in rules.pod_subnets):
        return "it lies in the cluster's pod subnets: pods' addresses are not node addresses"
    if rules.node_subnets and not any(
        address.version == n.version and address in n for n in rules.node_subnets
    ):
        return "not inside the cluster's node subnets (cluster.network.nodeSubnets)"
    return None


def _pod_cidr_problem(network: IPNetwork, rules: AdmissionRules) -> str | None:
    if network.prefixlen < MIN_POD_PREFIX[network.version]:
        return f"a pod CIDR must be no shorter than /{MIN_POD_PREFIX[network.version]}"
    if not rules.pod_subnets:
        return "no pod subnets are configured (cluster.network.podSubnets)"
    inside = [
        subnet
        for subnet in rules.pod_subnets
        if subnet.version == network.version and network.subnet_of(subnet)  # type: ignore[arg-type]
    ]
    if not inside:
        return "not inside the cluster's pod subnets (cluster.network.podSubnets)"
    if all(network == subnet for subnet in inside):
        return "a pod CIDR must be a part of a pod subnet, not all of it"
    if any(address in network for address in rules.own):
        return "it holds an address of this node"
    if any(address in network for address in rules.protected):
        return "it holds a discovery service's address"
    if network.version == 6 and network.overlaps(rules.cluster_prefix):
        return f"it overlaps the cluster's {rules.cluster_prefix}"
    return None
