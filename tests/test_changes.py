"""Which kernel notifications wake the agent: real notifications captured from the kernel
(tests/netlink_samples.json, made by tests/netlink_capture.py), and hostile bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from kubespan.apply.changes import (
    MALFORMED,
    OTHER_LINK,
    RTM_DELLINK,
    RTM_NEWLINK,
    WatchState,
    classify_datagram,
    classify_route,
    group_mask,
)
from kubespan.apply.netlink import Message, align
from netlink_capture import replay

SAMPLES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "netlink_samples.json").read_text()
)


@pytest.mark.parametrize(
    ("change", "expected", "given"), replay(SAMPLES), ids=[c["change"] for c in SAMPLES]
)
def test_captured_notifications(change: str, expected: set[str], given: set[str]) -> None:
    assert given == expected


def test_the_samples_cover_both_sockets_and_every_reason() -> None:
    kinds = {nftables for change in SAMPLES for nftables, _ in change["datagrams"]}
    assert kinds == {True, False}
    expected = {change["expected"] for change in SAMPLES}
    assert expected >= {
        None,
        "link kubespan",
        "nftables table inet kubespan",
        "route in table 180",
        "rule for table 180",
        "rule at priority 32500",
        "address",
        "default route",
        "rp_filter",
        OTHER_LINK,
    }


def all_datagrams() -> list[tuple[bool, bytes]]:
    return [(n, bytes.fromhex(d)) for change in SAMPLES for n, d in change["datagrams"]]


def boundaries(data: bytes) -> set[int]:
    """Offsets at which a datagram can end between whole messages."""
    out = {0}
    offset = 0
    while offset < len(data):
        offset += align(struct.unpack_from("=I", data, offset)[0])
        out.add(offset)
    return out


def test_every_truncation_is_survived() -> None:
    """Cut between messages, a datagram gives a subset of its reasons; cut inside one, it is
    malformed, which counts as a change. Never an exception."""
    for nftables, data in all_datagrams():
        whole, _ = classify_datagram(data, nftables, WatchState(7))
        ends = boundaries(data)
        for length in range(len(data)):
            reasons, _ = classify_datagram(data[:length], nftables, WatchState(7))
            if length in ends:
                assert reasons <= whole
            else:
                assert reasons == {MALFORMED}


def test_corrupted_lengths_are_malformed_not_crashes() -> None:
    for nftables, data in all_datagrams():
        for offset in range(0, min(len(data), 64), 2):
            corrupted = bytearray(data)
            corrupted[offset : offset + 2] = b"\xff\xff"
            classify_datagram(bytes(corrupted), nftables, WatchState())


def test_a_message_longer_than_its_datagram_is_malformed() -> None:
    header = struct.pack("=IHHII", 400, RTM_NEWLINK, 0, 0, 0)
    assert classify_datagram(header + bytes(16), False, WatchState()) == ({MALFORMED}, WatchState())


def test_a_link_message_without_a_name_for_our_index_is_ours() -> None:
    """Renamed or deleted, the link that was `kubespan` is recognised by its index."""
    payload = struct.pack("=BxHiII", 0, 1, 7, 0, 0)
    reason, state = classify_route(Message(RTM_NEWLINK, 0, 0, 0, payload), WatchState(7))
    assert (reason, state) == ("link kubespan", WatchState(None))
    reason, state = classify_route(Message(RTM_NEWLINK, 0, 0, 0, payload), WatchState(8))
    assert (reason, state.link_index) == (None, 8)


def link_message(kind: int, index: int, up: bool, name: str, family: int = 0) -> Message:
    header = struct.pack("=BxHiII", family, 1, index, 1 if up else 0, 0)
    attribute = name.encode() + b"\0"
    length = 4 + len(attribute)
    body = struct.pack("=HH", length, 3) + attribute + bytes(align(length) - length)
    return Message(kind, 0, 0, 0, header + body)


def test_another_link_counts_when_it_goes_up_or_down_or_is_renamed() -> None:
    state = WatchState(7, {3: (True, "eth0")})
    same = link_message(RTM_NEWLINK, 3, True, "eth0")  # e.g. its statistics: nothing changed
    assert classify_route(same, state) == (None, state)
    reason, state = classify_route(link_message(RTM_NEWLINK, 3, False, "eth0"), state)
    assert (reason, state.links) == (OTHER_LINK, {3: (False, "eth0")})
    reason, state = classify_route(link_message(RTM_NEWLINK, 3, False, "wan0"), state)
    assert (reason, state.links) == (OTHER_LINK, {3: (False, "wan0")})
    # A link new since the dump has no addresses yet (they come as their own news); gone,
    # its addresses go with theirs.
    reason, state = classify_route(link_message(RTM_NEWLINK, 9, True, "veth1"), state)
    assert (reason, state.links) == (None, {3: (False, "wan0"), 9: (True, "veth1")})
    af_bridge = 7  # a bridge port leaving its bridge: the link itself stays
    assert classify_route(link_message(RTM_DELLINK, 9, True, "veth1", af_bridge), state) == (
        None,
        state,
    )
    reason, state = classify_route(link_message(RTM_DELLINK, 9, True, "veth1"), state)
    assert (reason, state.links) == (None, {3: (False, "wan0")})
    assert state.link_index == 7


def test_a_link_name_that_is_not_ascii_is_read_not_malformed() -> None:
    state = WatchState(7, {3: (True, "eth0")})
    reason, state = classify_route(link_message(RTM_NEWLINK, 3, True, "wän0"), state)
    assert (reason, state.links) == (OTHER_LINK, {3: (True, "wän0")})


def test_with_the_links_unknown_every_other_link_notification_counts() -> None:
    state = WatchState(7, None)
    message = link_message(RTM_NEWLINK, 9, True, "veth1")
    assert classify_route(message, state) == (OTHER_LINK, state)


def test_an_nftables_message_without_a_table_name_counts_as_ours() -> None:
    nftables_newtable = (10 << 8) | 0
    data = struct.pack("=IHHII", 20, nftables_newtable, 0, 0, 0) + bytes(4)
    reasons, _ = classify_datagram(data, True, WatchState())
    assert reasons == {"nftables message 0 without a table"}


def test_group_mask() -> None:
    assert group_mask((1, 5, 32)) == 0b1 | 0b10000 | (1 << 31)
