"""Member admission, table-driven: which claims route to a member, and why the others not."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from kubespan.model import AffiliateInfo, Member
from kubespan.plan.admission import AdmissionRules, admit

CLUSTER = ipaddress.IPv6Network("fd00:aa::/64")
RULES = AdmissionRules(
    cluster_prefix=CLUSTER,
    pod_subnets=(ipaddress.ip_network("10.244.0.0/16"), ipaddress.ip_network("fd10::/56")),
    own=(ipaddress.ip_address("192.0.2.100"), ipaddress.ip_address("fd00:aa::100")),
    protected=(ipaddress.ip_address("10.244.9.9"),),
)


def member(
    ula: str = "fd00:aa::1", addresses: tuple[str, ...] = (), pod_cidrs: tuple[str, ...] = ()
) -> Member:
    info = AffiliateInfo(
        node_id="n1",
        hostname="node1",
        public_key=base64.b64encode(bytes(32)).decode(),
        ula=ipaddress.IPv6Address(ula),
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
        pod_cidrs=tuple(ipaddress.ip_network(n) for n in pod_cidrs),
    )
    return Member(info, ())


@pytest.mark.parametrize(
    ("claim", "reason"),
    [
        (member(ula="fd00:bb::1"), "a ULA must lie in the cluster's fd00:aa::/64"),
        (member(ula="fd00:aa::100"), "it is this node's ULA"),
        (member(addresses=("192.0.2.100",)), "it is this node's own address"),
        (member(addresses=("127.0.0.1",)), "not a unicast address"),
        (member(addresses=("0.0.0.0",)), "not a unicast address"),  # noqa: S104
        (member(addresses=("fe80::1",)), "not a unicast address"),
        (member(addresses=("224.0.0.1",)), "not a unicast address"),
        (member(addresses=("255.255.255.255",)), "not a unicast address"),
        (member(addresses=("fd00:aa::7",)), "node addresses must lie outside"),
        (member(addresses=("10.244.9.9",)), "a discovery service's address"),
        (member(addresses=("10.244.3.3",)), "lies in the cluster's pod subnets"),
        (member(pod_cidrs=("0.0.0.0/0",)), "no shorter than /16"),
        (member(pod_cidrs=("0.0.0.0/1",)), "no shorter than /16"),
        (member(pod_cidrs=("::/0",)), "no shorter than /48"),
        (member(pod_cidrs=("10.96.0.0/24",)), "not inside the cluster's pod subnets"),
        (member(pod_cidrs=("10.244.0.0/16",)), "a part of a pod subnet, not all of it"),
        (member(pod_cidrs=("10.244.9.0/24",)), "a discovery service's address"),
        (member(pod_cidrs=("fd00:aa::/64",)), "not inside the cluster's pod subnets"),
    ],
)
def test_refused_claims(claim: Member, reason: str) -> None:
    claims, refusals = admit(claim, RULES)
    assert len(refusals) == 1, refusals
    assert reason in refusals[0].reason
    assert str(refusals[0]).startswith(f"{refusals[0].claim} claimed by member node1")
    assert refusals[0].claim not in (*claims.addresses, *claims.pod_cidrs)


def test_admitted_claims_by_phase() -> None:
    claims, refusals = admit(
        member(
            addresses=("192.0.2.1", "2001:db8::1", "10.0.0.1"),
            pod_cidrs=("10.244.1.0/24", "fd10:0:0:1::/64"),
        ),
        RULES,
    )
    assert refusals == ()
    assert [str(n) for n in claims.addresses] == [
        "fd00:aa::1/128",
        "192.0.2.1/32",
        "2001:db8::1/128",
        "10.0.0.1/32",
    ]
    assert [str(n) for n in claims.pod_cidrs] == ["10.244.1.0/24", "fd10:0:0:1::/64"]


def test_without_pod_subnets_no_pod_cidr_is_routed() -> None:
    rules = AdmissionRules(CLUSTER, (), RULES.own, ())
    _, refusals = admit(member(pod_cidrs=("10.244.1.0/24",)), rules)
    assert "no pod subnets are configured" in refusals[0].reason


def test_with_node_subnets_outside_addresses_are_refused() -> None:
    rules = AdmissionRules(
        CLUSTER, RULES.pod_subnets, RULES.own, (), (ipaddress.ip_network("192.0.2.0/24"),)
    )
    claims, refusals = admit(member(addresses=("192.0.2.7", "8.8.8.8")), rules)
    assert [str(n) for n in claims.addresses] == ["fd00:aa::1/128", "192.0.2.7/32"]
    assert "node subnets" in refusals[0].reason and str(refusals[0].claim) == "8.8.8.8/32"
