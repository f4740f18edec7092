"""Rules and routes read from the kernel's own messages (captured in netlink_samples.json),
and our requests, read back as the kernel would report them."""

from __future__ import annotations

import ipaddress
import json
import struct
from pathlib import Path

import pytest

from kubespan.apply.netlink import Message, NetlinkFormatError, split_messages
from kubespan.apply.routes import RTM_NEWROUTE, encode_route, parse_route
from kubespan.apply.rules import RTM_NEWRULE, encode_rule, parse_rule
from kubespan.plan.routing import UNREACHABLE, RouteSpec, RuleSpec, routing_spec

SAMPLES = {
    change["change"]: [
        message
        for nftables, data in change["datagrams"]
        if not nftables
        for message in split_messages(bytes.fromhex(data))
    ]
    for change in json.loads((Path(__file__).parent / "netlink_samples.json").read_text())
}


def only(change: str, kind: int) -> Message:
    (message,) = [m for m in SAMPLES[change] if m.type == kind]
    return message


def test_a_foreign_rule_as_the_kernel_reports_it() -> None:
    rule = parse_rule(only("a rule that looks up table 180", RTM_NEWRULE))
    assert rule == RuleSpec(4, fwmark=0, mask=0, priority=100)
    assert rule is not None and rule.raw  # kept, to delete it by echo
    assert rule.render("del") == "ip -4 rule del priority 100 lookup 180"
    v6 = parse_rule(only("an IPv6 rule that looks up table 180", RTM_NEWRULE))
    assert v6 == RuleSpec(6, fwmark=0, mask=0, priority=100)


def test_rules_for_other_tables_are_not_ours() -> None:
    assert parse_rule(only("a rule at our priority", RTM_NEWRULE)) is None
    assert parse_rule(only("another rule", RTM_NEWRULE)) is None


@pytest.mark.parametrize("family", [4, 6])
def test_our_rule_reads_back_as_ours(family: int) -> None:
    payload = encode_rule(RuleSpec(family))
    assert parse_rule(Message(RTM_NEWRULE, 0, 0, 0, payload)) == RuleSpec(family)


def test_every_selector_and_flag_makes_a_rule_foreign() -> None:
    ours = encode_rule(RuleSpec(4))
    inverted = ours[:8] + struct.pack("=I", 0x2) + ours[12:]
    rule = parse_rule(Message(RTM_NEWRULE, 0, 0, 0, inverted))
    assert rule is not None and rule.other == ("not",) and rule != RuleSpec(4)
    iif = struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0" * 3
    rule = parse_rule(Message(RTM_NEWRULE, 0, 0, 0, ours + iif))
    assert rule is not None and rule.other == ("iif eth0",)
    assert rule.render() == "ip -4 rule add priority 32500 fwmark 0x40/0x60 iif eth0 lookup 180"


def test_a_rule_with_a_cut_attribute_is_refused() -> None:
    ours = encode_rule(RuleSpec(4))
    with pytest.raises(NetlinkFormatError):
        parse_rule(Message(RTM_NEWRULE, 0, 0, 0, ours[:-2]))


def test_a_foreign_route_as_the_kernel_reports_it() -> None:
    route = parse_route(only("an IPv4 route in table 180", RTM_NEWROUTE), {})
    assert route == RouteSpec(4, ipaddress.ip_network("198.51.100.0/24"), 0, UNREACHABLE)
    v6 = parse_route(only("an IPv6 route in table 180", RTM_NEWROUTE), {1: "lo"})
    assert v6 == RouteSpec(6, ipaddress.ip_network("2001:db8:1::/64"), 1024, UNREACHABLE)
    assert parse_route(only("a route in another table", RTM_NEWROUTE), {}) is None


@pytest.mark.parametrize("route", routing_spec(1420).routes, ids=lambda r: r.render())
def test_our_routes_read_back_as_ours(route: RouteSpec) -> None:
    oif = 7 if route.link else None
    payload = encode_route(route, oif)
    assert parse_route(Message(RTM_NEWROUTE, 0, 0, 0, payload), {7: "kubespan"}) == route


def test_a_gateway_or_a_wrong_sized_address_in_a_route() -> None:
    ours = encode_route(routing_spec(1420).routes[0], 7)
    gateway = struct.pack("=HH", 8, 5) + bytes([192, 0, 2, 1])
    route = parse_route(Message(RTM_NEWROUTE, 0, 0, 0, ours + gateway), {7: "eth0"})
    assert route is not None and str(route.gateway) == "192.0.2.1"
    assert route != routing_spec(1420).routes[0]
    bad = struct.pack("=HH", 7, 5) + bytes([192, 0, 2]) + b"\0"
    with pytest.raises(NetlinkFormatError):
        parse_route(Message(RTM_NEWROUTE, 0, 0, 0, ours + bad), {})


def test_only_our_own_routes_and_rules_can_be_encoded() -> None:
    with pytest.raises(ValueError, match="not ours"):
        encode_route(RouteSpec(4, ipaddress.ip_network("0.0.0.0/0"), 0, other=("nexthops",)), 1)
    with pytest.raises(ValueError, match="other selectors"):
        encode_rule(RuleSpec(4, other=("not",)))
