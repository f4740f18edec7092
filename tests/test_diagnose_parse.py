"""What `kubespan check` reads, parsed (pure): ip rules of any table, route lookups and links
from rtnetlink bytes, mark uses from nftables' JSON, the agent's status document. Odd or
hostile input is refused or left out, never a traceback."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from typing import Any

import pytest

from kubespan.agent.status import status_document
from kubespan.agent.statusserver import placeholder
from kubespan.apply.changes import IFINFOMSG
from kubespan.apply.netlink import (
    Message,
    NetlinkFormatError,
    attribute_map,
    encode_attribute,
)
from kubespan.apply.routes import RTMSG
from kubespan.apply.rules import FIB_RULE_HDR, RTM_NEWRULE, encode_rule, parse_rule
from kubespan.diagnose.facts import CT_MARK, META_MARK, DiscoverySeen
from kubespan.diagnose.netlinkread import (
    IFLA_MTU,
    RTA_DPORT,
    RTA_MARK,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    parse_any_rule,
    parse_link_answer,
    parse_route_answer,
    route_request,
    valid_link_name,
)
from kubespan.diagnose.nftmarks import ALL_BITS, MAX_USES, mark_uses
from kubespan.diagnose.statusread import read_report
from kubespan.model import AffiliateInfo, PeerState
from kubespan.netaddr import Endpoint
from kubespan.plan.desired import PeerReport
from kubespan.plan.routing import RuleSpec
from test_rules_routes import only

# --- ip rules ------------------------------------------------------------------------------


def test_rules_of_every_table_as_the_kernel_reports_them() -> None:
    """Messages the kernel sent (tests/netlink_samples.json)."""
    taken = only("a rule at our priority", RTM_NEWRULE)
    assert parse_any_rule(taken) == RuleSpec(4, 0, 0, 32500, 100)
    assert parse_any_rule(only("another rule", RTM_NEWRULE)) == RuleSpec(4, 0, 0, 200, 100)
    for change in ("a rule that looks up table 180", "an IPv6 rule that looks up table 180"):
        message = only(change, RTM_NEWRULE)
        assert parse_any_rule(message) == parse_rule(message)  # as the agent sees them


@pytest.mark.parametrize("family", [4, 6])
def test_our_rule_reads_as_ours(family: int) -> None:
    payload = encode_rule(RuleSpec(family))
    assert parse_any_rule(Message(RTM_NEWRULE, 0, 0, 0, payload)) == RuleSpec(family)


def rule_message(action: int, flags: int = 0, family: int = socket.AF_INET) -> Message:
    header = FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, action, flags)
    attrs = [(6, 100), (10, 0x40), (16, 0x60)]  # priority, fwmark, mask
    payload = header + b"".join(encode_attribute(k, struct.pack("=I", v)) for k, v in attrs)
    return Message(RTM_NEWRULE, 0, 0, 0, payload)


def test_a_rule_that_looks_up_no_table_says_its_action() -> None:
    assert parse_any_rule(rule_message(6)) == RuleSpec(4, 0x40, 0x60, 100, 0, ("blackhole",))
    assert parse_any_rule(rule_message(3, flags=2)) == RuleSpec(4, 0x40, 0x60, 100, 0,
                                                                ("nop", "not"))  # fmt: skip
    assert parse_any_rule(rule_message(99)) == RuleSpec(4, 0x40, 0x60, 100, 0, ("action99",))


def test_odd_rule_messages() -> None:
    assert parse_any_rule(rule_message(1, family=socket.AF_UNSPEC)) is None
    with pytest.raises(NetlinkFormatError):
        parse_any_rule(Message(RTM_NEWRULE, 0, 0, 0, b"\x02\x00"))
    broken = rule_message(1).payload + struct.pack("=HH", 40, 6)  # an attribute past the end
    with pytest.raises(NetlinkFormatError):
        parse_any_rule(Message(RTM_NEWRULE, 0, 0, 0, broken))


# --- route lookups and links -----------------------------------------------------------------


def test_a_route_lookup_asks_as_wireguard_sends() -> None:
    payload = route_request(Endpoint.parse("[2001:db8::9]:51820"), 0x20, 51821)
    header = RTMSG.unpack_from(payload)
    assert header[:2] == (socket.AF_INET6, 128)
    attrs = attribute_map(payload[RTMSG.size :])
    assert attrs[1] == ipaddress.ip_address("2001:db8::9").packed
    assert struct.unpack("=I", attrs[RTA_MARK]) == (0x20,)
    assert struct.unpack("!H", attrs[RTA_DPORT]) == (51820,)
    assert attrs[27] == bytes([socket.IPPROTO_UDP]) and struct.unpack("!H", attrs[28]) == (51821,)


def route_answer(mtu: int | None, oif: int | None = 3) -> list[Message]:
    attrs = b""
    if oif is not None:
        attrs += encode_attribute(4, struct.pack("=I", oif))
    if mtu is not None:
        metrics = encode_attribute(3, struct.pack("=I", 1)) + encode_attribute(
            2, struct.pack("=I", mtu)
        )
        attrs += encode_attribute(8, metrics)
    payload = RTMSG.pack(socket.AF_INET, 32, 0, 0, 254, 0, 0, 1, 0) + attrs
    return [Message(RTM_NEWROUTE, 0, 1, 0, payload)]


def test_route_answers() -> None:
    assert parse_route_answer(route_answer(1400)) == (1400, 3)
    assert parse_route_answer(route_answer(None)) == (None, 3)
    assert parse_route_answer(route_answer(1400, oif=None)) == (1400, None)
    assert parse_route_answer(route_answer(10)) == (None, 3)  # not an MTU: the device's counts
    assert parse_route_answer(route_answer(1 << 31)) == (None, 3)
    assert parse_route_answer(route_answer(65536)) == (65536, 3)  # loopback's
    for broken in ([], [Message(RTM_NEWROUTE, 0, 1, 0, b"\x02")]):
        with pytest.raises(NetlinkFormatError):
            parse_route_answer(broken)


def link_answer(name: bytes | None, mtu: int | None) -> list[Message]:
    attrs = b""
    if name is not None:
        attrs += encode_attribute(3, name)
    if mtu is not None:
        attrs += encode_attribute(IFLA_MTU, struct.pack("=I", mtu))
    return [Message(RTM_NEWLINK, 0, 1, 0, IFINFOMSG.pack(0, 1, 3, 0, 0) + attrs)]


def test_link_answers() -> None:
    assert parse_link_answer(link_answer(b"eth0\0", 1400)) == ("eth0", 1400)
    for name, mtu in [
        (b"eth0\0", None),
        (None, 1500),
        (b"eth0", 1500),  # no NUL
        (b"../x\0", 1500),
        (b"\x1b[2J\0", 1500),
        (b"e" * 16 + b"\0", 1500),
        (b"eth0\0", 0),
        (b"\xff\0", 1500),
    ]:
        with pytest.raises(NetlinkFormatError):
            parse_link_answer(link_answer(name, mtu))


@pytest.mark.parametrize(
    ("name", "valid"),
    [("eth0", True), ("kubespan", True), ("", False), (".", False), ("..", False),
     ("a/b", False), ("a b", False), ("a:1", False), ("x" * 16, False), ("\x07", False)],
)  # fmt: skip
def test_link_names(name: str, valid: bool) -> None:
    assert valid_link_name(name) is valid


# --- nftables --------------------------------------------------------------------------------

META = {"meta": {"key": "mark"}}
CT = {"ct": {"key": "mark"}}


def setting(key: dict[str, Any], value: Any) -> dict[str, Any]:
    return {"mangle": {"key": key, "value": value}}


def comparing(left: Any, right: Any = 64) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def listing(*rules: list[Any], table: str = "meddler", family: str = "ip") -> dict[str, Any]:
    chain = {"family": family, "table": table, "name": "out", "handle": 1, "type": "route",
             "hook": "output", "prio": 10, "policy": "accept"}  # fmt: skip
    items: list[Any] = [{"metainfo": {"version": "1.0.6"}}, {"chain": chain}]
    for handle, expr in enumerate(rules, 2):
        rule = {"family": family, "table": table, "chain": "out", "handle": handle, "expr": expr}
        items.append({"rule": rule})
    return {"nftables": items}


def uses(*rules: list[Any]) -> list[tuple[str, bool, int]]:
    found, more = mark_uses(listing(*rules), ("inet", "kubespan"), 0x60)
    assert not more
    return [(use.key, use.sets, use.bits) for use in found]


# Each statement, as `nft -j` prints it, with what it does to the mark bits 0x60.
STATEMENTS: list[tuple[str, Any, list[tuple[str, bool, int]]]] = [
    ("meta mark set meta mark & 0xffffff9f", setting(META, {"&": [META, 0xFFFFFF9F]}),
     [(META_MARK, True, 0x60)]),
    ("meta mark set 0x539", setting(META, 1337), [(META_MARK, True, ALL_BITS)]),
    ("meta mark set ct mark", setting(META, CT),
     [(META_MARK, True, ALL_BITS), (CT_MARK, False, ALL_BITS)]),
    ("ct mark set meta mark", setting(CT, META),
     [(CT_MARK, True, ALL_BITS), (META_MARK, False, ALL_BITS)]),
    ("meta mark 0x4000", comparing(META, 16384), [(META_MARK, False, ALL_BITS)]),
    ("meta mark & 0x60 == 0x40", comparing({"&": [META, 96]}), [(META_MARK, False, 0x60)]),
    ("meta mark set meta mark | 0x4000", setting(META, {"|": [META, 16384]}), []),
    ("meta mark set meta mark & 0xffff00ff | 0x4000",
     setting(META, {"|": [{"&": [META, 0xFFFF00FF]}, 16384]}), []),
    ("meta mark set meta mark xor 0x20", setting(META, {"^": [META, 32]}),
     [(META_MARK, True, 0x20)]),
    ("meta mark set ip daddr map {...}",
     setting(META, {"map": {"key": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "data": {"set": [["10.0.0.1", 64]]}}}),
     [(META_MARK, True, ALL_BITS)]),
    ("meta mark vmap {...}", {"vmap": {"key": META, "data": {"set": [[32, {"accept": None}]]}}},
     [(META_MARK, False, ALL_BITS)]),
    ("ct mark & 0x60 == 0x20", comparing({"&": [CT, 96]}, 32), [(CT_MARK, False, 0x60)]),
    ("meta mark & 0x4000 == 0x4000", comparing({"&": [META, 16384]}, 16384), []),
    ("an older spelling: meta mark set 0x40", setting({"meta": "mark"}, 64),
     [(META_MARK, True, ALL_BITS)]),
    ("meta mark set meta mark & True", setting(META, {"&": [META, True]}),
     [(META_MARK, True, ALL_BITS)]),
    ("counter", {"counter": None}, []),
]  # fmt: skip


@pytest.mark.parametrize(("statement", "expected"), [(s[1], s[2]) for s in STATEMENTS],
                         ids=[s[0] for s in STATEMENTS])  # fmt: skip
def test_what_a_statement_does_to_the_mark(statement: Any, expected: list[Any]) -> None:
    assert uses([statement]) == expected


def test_a_rule_is_reported_once_per_kind_of_use_where_it_is() -> None:
    rule = [comparing({"&": [META, 0x20]}), setting(META, {"&": [META, 0xFFFFFFBF]})]
    (read, written), _ = mark_uses(listing(rule), ("inet", "kubespan"), 0x60)
    assert (read.sets, read.bits, written.sets, written.bits) == (False, 0x20, True, 0x40)
    where = "table ip meddler, chain out (hook output, priority 10), rule (handle 2)"
    assert written.where == where


def test_our_own_table_is_left_out() -> None:
    ours = listing([setting(META, 64)], table="kubespan", family="inet")
    assert mark_uses(ours, ("inet", "kubespan"), 0x60) == ((), False)


def test_odd_listings_are_refused_or_skipped() -> None:
    broken: Any
    for broken in ([], {"nftables": {}}, "x", None):
        with pytest.raises(ValueError, match="not an nftables JSON listing"):
            mark_uses(broken, ("inet", "kubespan"), 0x60)
    odd: list[Any] = [
        1, None, [], {"rule": []}, {"rule": {"expr": "x"}},
        {"rule": {"family": 1, "table": "t", "chain": "c", "expr": [setting(META, 64)]}},
        {"rule": {"family": "ip", "table": "", "chain": "c", "expr": [setting(META, 64)]}},
        {"chain": {"family": "ip", "table": "t", "name": "c", "hook": ["x"]}},
        {"rule": {"family": "ip", "table": "t" * 300, "chain": "c", "handle": True,
                  "expr": [1, "x", None, {"mangle": "x"}, setting(META, 64)]}},
    ]  # fmt: skip
    (use,), _ = mark_uses({"nftables": odd}, ("inet", "kubespan"), 0x60)
    assert len(use.table) == 64 and use.handle is None and use.hook is None


def test_at_most_so_many_uses_are_kept() -> None:
    rules = [[setting(META, 64)] for _ in range(MAX_USES + 5)]
    found, more = mark_uses(listing(*rules), ("inet", "kubespan"), 0x60)
    assert len(found) == MAX_USES and more


# --- the agent's status ----------------------------------------------------------------------


def report_document(**discovery: Any) -> dict[str, Any]:
    info = AffiliateInfo("alpha", "node-a", "A" * 43 + "=", ipaddress.IPv6Address("fd00::1"), ())

    def peer(key: str, endpoint: str | None) -> PeerReport:
        found = Endpoint.parse(endpoint) if endpoint else None
        return PeerReport(key * 43 + "=", key, key, PeerState.UP, found, None, 0, 0)

    reports = (
        peer("B", "[2001:db8::9]:51820"),
        peer("C", "198.51.100.9:51820"),
        peer("D", None),
        peer("E", "198.51.100.9:51820"),
    )
    entry = {
        "url": "https://d.example",
        "revision": 3,
        "public_address": "203.0.113.7",
        "last_error": None,
        "last_answer": 1.0,
        "clock_skew_s": -130.5,
        **discovery,
    }
    return status_document(info, (), reports, [entry], True, 1_800_000_000.0)


def test_the_agents_report() -> None:
    report = read_report(json.dumps(report_document()).encode())
    assert report.state == "running" and report.detail == ""
    assert report.discovery == (
        DiscoverySeen("https://d.example", None, "203.0.113.7", -130.5, True),
    )
    assert [str(e) for e in report.endpoints] == ["198.51.100.9:51820", "[2001:db8::9]:51820"]


def test_placeholders() -> None:
    assert read_report(placeholder("starting")).state == "starting"
    assert read_report(placeholder("disabled")).state == "disabled"


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"version": 1}', b"[" * 100 + b"]" * 100, b'{"a": NaN}',
     b'{"node": {}, "x": ' + b"1" * 30 + b"}", b"\xff"],
)  # fmt: skip
def test_status_that_cannot_be_read(raw: bytes) -> None:
    report = read_report(raw)
    assert report.state == "unreadable" and report.detail and report.discovery == ()


@pytest.mark.parametrize(
    ("field", "value", "seen"),
    [
        ("last_error", "x" * 10_000, ("last_error", "x" * 400)),
        ("last_error", 5, ("last_error", None)),
        ("last_error", "", ("last_error", None)),
        ("public_address", "not an address", ("public_address", None)),
        ("public_address", ["203.0.113.7"], ("public_address", None)),
        ("clock_skew_s", 1e300, ("clock_skew", None)),
        ("clock_skew_s", True, ("clock_skew", None)),
        ("clock_skew_s", "130", ("clock_skew", None)),
        ("last_answer", None, ("answered", False)),
        ("url", "u" * 1000, ("url", "u" * 256)),
    ],
)
def test_hostile_fields_are_cut_short_or_left_out(
    field: str, value: Any, seen: tuple[str, Any]
) -> None:
    (service,) = read_report(json.dumps(report_document(**{field: value})).encode()).discovery
    assert getattr(service, seen[0]) == seen[1]


def test_hostile_entries_are_left_out() -> None:
    document = report_document()
    document["discovery"] += [None, {"url": 5}, {"url": ""}, "x"]
    document["peers"] += [{"endpoint": "0.0.0.0:1"}, {"endpoint": "[ff02::1]:1"},
                          {"endpoint": "\x1b[2J"}, {"endpoint": 5}, None]  # fmt: skip
    report = read_report(json.dumps(document).encode())
    assert len(report.discovery) == 1 and len(report.endpoints) == 2
    document["peers"] = "x"
    assert read_report(json.dumps(document).encode()).endpoints == ()
