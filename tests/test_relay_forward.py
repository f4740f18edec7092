"""The relay's forwarding as data (relay.forward): what the table says for each pair, and
the pairs it refuses. tests/test_netns_relay.py runs the same tables on the kernel."""

from __future__ import annotations

import ipaddress

import pytest

from kubespan.netaddr import Endpoint
from kubespan.relay.forward import RelayedPair, RelaySide, RelaySpec, teardown_batch
from kubespan.relay.ports import PortRange

RELAY = ipaddress.ip_address("203.0.113.30")


def pair(port_a: int = 41000, port_b: int = 41001, address: str = "203.0.113.30") -> RelayedPair:
    return RelayedPair(
        ipaddress.ip_address(address),
        RelaySide(port_a, Endpoint.parse("198.51.100.1:40000")),
        RelaySide(port_b, Endpoint.parse("192.0.2.2:51820")),
    )


def test_each_direction_is_one_rule_before_routing_and_one_after() -> None:
    text = RelaySpec.of([pair()]).render()
    a_to_b = (
        "ip daddr 203.0.113.30 udp dport 41000 ip saddr 198.51.100.1 udp sport 40000 "
        "@th,64,32 { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } notrack "
        'counter name "side_41000" ip daddr set 192.0.2.2 udp dport set 51820'
    )
    b_to_a = (
        "ip daddr 203.0.113.30 udp dport 41001 ip saddr 192.0.2.2 udp sport 51820 "
        "@th,64,32 { 0x01000000, 0x02000000, 0x03000000, 0x04000000 } notrack "
        'counter name "side_41001" ip daddr set 198.51.100.1 udp dport set 40000'
    )
    assert a_to_b in text and b_to_a in text
    # Each side's bytes are counted under its relay port (status and metrics).
    assert "  counter side_41000 { }\n  counter side_41001 { }" in text
    # After routing, each packet leaves from the relay's port the receiver sends to.
    assert (
        "ip saddr 198.51.100.1 udp sport 40000 ip daddr 192.0.2.2 udp dport 51820 "
        "ip saddr set 203.0.113.30 udp sport set 41001"
    ) in text
    assert (
        "ip saddr 192.0.2.2 udp sport 51820 ip daddr 198.51.100.1 udp dport 40000 "
        "ip saddr set 203.0.113.30 udp sport set 41000"
    ) in text
    # Before conntrack (raw), so nothing is tracked that could outlive the pair.
    assert "type filter hook prerouting priority raw;" in text


def test_ipv6_pairs_use_ip6_and_bracketed_endpoints() -> None:
    six = RelayedPair(
        ipaddress.ip_address("2001:db8::30"),
        RelaySide(41000, Endpoint.parse("[2001:db8:1::1]:1000")),
        RelaySide(41001, Endpoint.parse("[2001:db8:2::2]:2000")),
    )
    text = RelaySpec.of([six]).render()
    assert "ip6 daddr 2001:db8::30 udp dport 41000 ip6 saddr 2001:db8:1::1 udp sport 1000" in text
    assert "ip6 saddr set 2001:db8::30 udp sport set 41001" in text
    assert " ip " not in text


def test_no_pairs_is_an_empty_table() -> None:
    text = RelaySpec(()).render()
    assert "daddr" not in text and "chain prerouting" in text


def test_the_same_pairs_in_any_order_render_the_same() -> None:
    one, two = pair(41000, 41001), pair(41002, 41003)
    assert RelaySpec.of([one, two]).fingerprint == RelaySpec.of([two, one]).fingerprint
    assert RelaySpec.of([one]).fingerprint != RelaySpec.of([one, two]).fingerprint


def test_the_batch_replaces_the_table_whole() -> None:
    batch = RelaySpec.of([pair()]).batch()
    assert batch.startswith(teardown_batch())
    assert teardown_batch() == ("add table inet kubespan_relay\ndelete table inet kubespan_relay\n")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pair(41000, 41000), "both sides of a relayed pair use port 41000"),
        (lambda: pair(0, 41001), "relay port 0 is not a UDP port"),
        (lambda: pair(41000, 70000), "relay port 70000 is not a UDP port"),
        (lambda: pair(address="2001:db8::30"), "of different IP versions"),
        (
            lambda: RelaySpec.of([pair(41000, 41001), pair(41001, 41002)]),
            "relay port 41001 on 203.0.113.30 is in two pairs",
        ),
    ],
)
def test_impossible_pairs_are_refused(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_the_icmp_the_relay_would_send_about_its_work_is_dropped() -> None:
    text = RelaySpec.of([pair()], PortRange(51821, 1000)).render()
    # Redirects quoting a side's datagrams (source 198.51.100.1:40000 = 0xc6336401).
    assert "icmp type redirect @th,160,32 0xc6336401 @th,224,16 40000 drop" in text
    assert "icmp type redirect @th,160,32 0xc0000202 @th,224,16 51820 drop" in text
    # "Port unreachable" for binds to the relay's ports.
    assert "icmp code port-unreachable @th,240,16 51821-52820 drop" in text
    assert "icmpv6 code port-unreachable @th,400,16 51821-52820 drop" in text
    assert "chain output" not in RelaySpec(()).render()


def test_counters_are_read_by_relay_port_and_nothing_else_is_believed() -> None:
    from kubespan.relay.kernel import parse_counters

    listing = (
        '{"nftables": [{"metainfo": {}}, '
        '{"counter": {"family": "inet", "name": "side_41000", "table": "kubespan_relay", '
        '"packets": 2, "bytes": 300}}, '
        '{"counter": {"name": "side_41001", "table": "other", "bytes": 5}}, '
        '{"counter": {"name": "side_x", "table": "kubespan_relay", "bytes": 5}}, '
        '{"counter": {"name": "side_41002", "table": "kubespan_relay", "bytes": -1}}, '
        '{"counter": {"name": "side_041003", "table": "kubespan_relay", "bytes": 7}}, '
        '"junk"]}'
    )
    assert parse_counters(listing) == {41000: 300}
    assert parse_counters("not json") == {} and parse_counters("[1]") == {}
