"""Ranking of a member's endpoint candidates: the order a peer tries them, and why."""

from __future__ import annotations

import ipaddress

import pytest

from kubespan.model import AffiliateInfo, Member
from kubespan.netaddr import Endpoint
from kubespan.plan.candidates import Kind, LocalNetwork, rank_candidates

LOCAL: tuple[LocalNetwork, ...] = (
    ipaddress.ip_interface("10.1.0.10/24"),
    ipaddress.ip_interface("2001:db8:1::10/64"),
)


def member(addresses: list[str], endpoints: list[str], hints: list[str]) -> Member:
    info = AffiliateInfo(
        node_id="n",
        hostname="n",
        public_key="k",
        ula=ipaddress.IPv6Address("fd00::1"),
        addresses=tuple(ipaddress.ip_address(a) for a in addresses),
    )
    return Member(
        info,
        tuple(Endpoint.parse(e) for e in endpoints),
        tuple(Endpoint.parse(h) for h in hints),
    )


@pytest.mark.parametrize(
    ("addresses", "endpoints", "hints", "expected"),
    [
        pytest.param(
            ["203.0.113.5", "10.1.0.11", "172.16.0.4", "2001:db8:9::5", "2001:db8:1::11"],
            [
                "203.0.113.5:51820",
                "10.1.0.11:51820",
                "172.16.0.4:51820",
                "[2001:db8:9::5]:51820",
                "[2001:db8:1::11]:51820",
                "198.51.100.9:40001",  # its NAT mapping (STUN), announced first
                "192.0.2.77:443",  # an extra announced endpoint
            ],
            ["198.51.100.9:40002"],
            [
                ("10.1.0.11:51820", Kind.SAME_SUBNET),
                ("[2001:db8:1::11]:51820", Kind.SAME_SUBNET),
                ("172.16.0.4:51820", Kind.PRIVATE),
                ("203.0.113.5:51820", Kind.GLOBAL),
                ("[2001:db8:9::5]:51820", Kind.IPV6),
                ("198.51.100.9:40001", Kind.ANNOUNCED),
                ("192.0.2.77:443", Kind.ANNOUNCED),
                ("198.51.100.9:40002", Kind.HARVESTED),
            ],
            id="every kind in order",
        ),
        pytest.param(
            ["10.2.0.11"],
            ["10.2.0.11:51820", "198.51.100.2:51820"],
            ["198.51.100.2:51820", "198.51.100.2:61000"],
            [
                ("10.2.0.11:51820", Kind.PRIVATE),
                ("198.51.100.2:51820", Kind.ANNOUNCED),
                ("198.51.100.2:61000", Kind.HARVESTED),
            ],
            id="another site behind NAT: a harvested duplicate keeps its better place",
        ),
        pytest.param(
            ["10.1.0.10", "10.1.0.12"],
            ["10.1.0.10:51820", "10.1.0.12:51820"],
            [],
            [("10.1.0.12:51820", Kind.SAME_SUBNET)],
            id="never one of our own addresses (same private range at two sites)",
        ),
        pytest.param(
            [],
            ["203.0.113.8:51820", "198.51.100.8:51820"],
            [],
            [("203.0.113.8:51820", Kind.ANNOUNCED), ("198.51.100.8:51820", Kind.ANNOUNCED)],
            id="announced endpoints keep the member's own order",
        ),
        pytest.param([], [], [], [], id="nothing to try"),
    ],
)
def test_ranking(
    addresses: list[str],
    endpoints: list[str],
    hints: list[str],
    expected: list[tuple[str, Kind]],
) -> None:
    ranked = rank_candidates(member(addresses, endpoints, hints), LOCAL)
    assert [(str(c.endpoint), c.kind) for c in ranked] == expected
    assert all(c.reason for c in ranked)
