"""Dividing claims among members: incumbents keep, disputes are held back, keys decide
nothing; and the one-sweep dispute finder agrees with brute force."""

from __future__ import annotations

import ipaddress
import itertools
import random

from kubespan.netaddr import IPNetwork
from kubespan.plan.claims import Claim, disputed, divide
from kubespan.plan.ipset import network_range


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def claim(key: str, text: str, held: bool = False) -> Claim:
    return Claim(key, f"node-{key}", net(text), held)


def routed(claims: list[Claim]) -> dict[str, list[str]]:
    return {k: [str(n) for n in v] for k, v in divide(claims, ()).routed.items() if v}


def test_an_incumbent_keeps_its_address_whoever_claims_it() -> None:
    for claims in itertools.permutations(
        [claim("b", "192.0.2.5/32", held=True), claim("a", "192.0.2.5/32")]
    ):
        assert routed(list(claims)) == {"b": ["192.0.2.5/32"]}


def test_a_disputed_address_nobody_holds_goes_to_nobody_and_is_held_back() -> None:
    for claims in itertools.permutations([claim("a", "192.0.2.5/32"), claim("b", "192.0.2.5/32")]):
        division = divide(list(claims), ())
        assert not any(division.routed.values())
        assert [str(n) for n in division.held_back] == ["192.0.2.5/32"] * 2
        assert len(division.warnings) == 2


def test_only_the_overlap_of_a_partial_dispute_is_held_back() -> None:
    division = divide([claim("a", "10.244.0.0/23"), claim("b", "10.244.1.0/24")], ())
    assert {k: [str(n) for n in v] for k, v in division.routed.items()} == {
        "a": ["10.244.0.0/24"],
        "b": [],
    }
    assert {str(n) for n in division.held_back} == {"10.244.1.0/24"}


def test_this_nodes_own_addresses_go_to_nobody() -> None:
    division = divide([claim("a", "192.0.2.1/32", held=True)], (ipaddress.ip_address("192.0.2.1"),))
    assert division.routed == {"a": []} and "this node" in division.warnings[0]


def test_undisputed_claims_are_routed_whole() -> None:
    assert routed([claim("a", "192.0.2.1/32"), claim("b", "192.0.2.2/32")]) == {
        "a": ["192.0.2.1/32"],
        "b": ["192.0.2.2/32"],
    }


def brute_force(claims: list[Claim]) -> set[tuple[int, int]]:
    """Every address (of a small space) claimed by two different keys."""
    owners: dict[int, set[str]] = {}
    for c in claims:
        start, end = network_range(c.network)
        for address in range(start, end + 1):
            owners.setdefault(address, set()).add(c.key)
    return {(a, a) for a, keys in owners.items() if len(keys) > 1}


def test_the_sweep_finds_exactly_the_disputed_addresses() -> None:
    rng = random.Random(7)
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    for _ in range(300):
        claims = []
        for _ in range(rng.randint(1, 8)):
            length = rng.randint(26, 32)
            start = base + (rng.randrange(0, 256) >> (32 - length) << (32 - length))
            claims.append(
                Claim(rng.choice("abc"), "n", ipaddress.ip_network((start, length)), False)
            )
        found = {(a, a) for s, e in disputed(claims)[4].intervals() for a in range(s, e + 1)}
        assert found == brute_force(claims), claims
