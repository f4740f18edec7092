"""What a node advertises: addresses, endpoint order, filters, extra endpoints."""

from __future__ import annotations

import ipaddress

import pytest

from kubespan.config import EndpointFilter, KubeSpanConfig
from kubespan.model import LocalAddress
from kubespan.netaddr import Endpoint
from kubespan.plan.local import advertised_addresses, advertised_endpoints

from fakekernel import local_address

PREFIX = ipaddress.IPv6Network("fd11:2233:4455:6602::/64")


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def test_only_routable_addresses_of_up_links_are_advertised() -> None:
    local = (
        local_address("lo", "127.0.0.1/8", scope=254),
        local_address("lo", "::1/128", scope=254),
        local_address("ens3", "192.0.2.11/24"),
        local_address("ens3", "fe80::1/64", scope=253),
        local_address("ens3", "2001:db8::11/64"),
        local_address("ens4", "198.51.100.4/24", up=False),
        local_address("kubespan", "fd11:2233:4455:6602::1/64"),
        LocalAddress("wg0", ipaddress.ip_interface("10.8.0.1/24"), 0, True, "wireguard"),
        local_address("ens5", "fd11:2233:4455:6602::9/64"),
        local_address("ens3", "10.0.0.5/8"),
    )
    assert advertised_addresses(local, PREFIX) == (
        ip("10.0.0.5"),
        ip("192.0.2.11"),
        ip("2001:db8::11"),
    )


def test_endpoints_are_addresses_then_public_address_then_extras() -> None:
    config = KubeSpanConfig(
        enabled=True,
        listen_port=51821,
        extra_announced_endpoints=(Endpoint.parse("203.0.113.9:4000"),),
    )
    endpoints = advertised_endpoints(
        (ip("10.0.0.5"), ip("2001:db8::11")), ip("198.51.100.7"), config
    )
    assert [str(e) for e in endpoints] == [
        "10.0.0.5:51821",
        "[2001:db8::11]:51821",
        "198.51.100.7:51821",
        "203.0.113.9:4000",
    ]


def test_public_address_already_local_is_not_repeated() -> None:
    config = KubeSpanConfig(enabled=True)
    endpoints = advertised_endpoints((ip("192.0.2.11"),), ip("192.0.2.11"), config)
    assert [str(e) for e in endpoints] == ["192.0.2.11:51820"]


def rule(text: str) -> EndpointFilter:
    negate = text.startswith("!")
    return EndpointFilter(ipaddress.ip_network(text.lstrip("!")), negate)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], ["10.0.0.5", "192.168.1.5", "2001:db8::11", "198.51.100.7"]),
        (["0.0.0.0/0"], ["10.0.0.5", "192.168.1.5", "198.51.100.7"]),
        (["!192.168.0.0/16", "0.0.0.0/0", "::/0"], ["10.0.0.5", "198.51.100.7", "2001:db8::11"]),
        (["198.51.100.0/24", "0.0.0.0/0"], ["198.51.100.7", "10.0.0.5", "192.168.1.5"]),
        (["::/0"], ["2001:db8::11"]),
    ],
)
def test_endpoint_filters_keep_order_and_negation(filters: list[str], expected: list[str]) -> None:
    config = KubeSpanConfig(
        enabled=True,
        endpoint_filters=tuple(rule(f) for f in filters),
        extra_announced_endpoints=(Endpoint.parse("203.0.113.9:4000"),),
    )
    addresses = (ip("10.0.0.5"), ip("192.168.1.5"), ip("2001:db8::11"))
    endpoints = advertised_endpoints(addresses, ip("198.51.100.7"), config)
    assert [str(e.address) for e in endpoints[:-1]] == expected
    assert str(endpoints[-1]) == "203.0.113.9:4000"


def test_extra_endpoints_are_kept_within_the_limit() -> None:
    config = KubeSpanConfig(
        enabled=True, extra_announced_endpoints=(Endpoint.parse("203.0.113.9:443"),)
    )
    addresses = tuple(ip(f"192.0.2.{n}") for n in range(1, 40))
    endpoints = advertised_endpoints(addresses, None, config, limit=24)
    assert len(endpoints) == 24
    assert endpoints[-1] == Endpoint.parse("203.0.113.9:443")
