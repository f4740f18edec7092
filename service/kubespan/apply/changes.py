"""Which kernel notifications concern kubespan: bytes in, a reason (or None) out. Pure.

Ours are: our nftables table (`inet kubespan`), routes in table 180, rules that look up
table 180 or sit at priority 32500, the link named `kubespan` (and rp_filter on it or on
`all`), any address (the agent advertises the node's addresses), another link going up or
down or renamed (its addresses are advertised only while it is up), and default routes in
the main table (the way out, hence the NAT mapping, may have changed). Everything else, above
all other programs' frequent nftables changes (kube-proxy rewrites its tables often), is
read as far as its table name and dropped.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubespan.apply.netlink import (
    Message,
    NetlinkFormatError,
    attribute_map,
    link_name,
    s32,
    split_messages,
    string,
    u32,
)
from kubespan.names import LINK_NAME, NFT_TABLE, ROUTE_TABLE, RULE_PRIORITY

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_NEWNETCONF = 80
RTM_DELNETCONF = 81

IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFLA_IFNAME = 3
# rtmsg and fib_rule_hdr are both 12 bytes with the (8-bit) table at offset 4.
TABLE_HEADER = struct.Struct("=BBBBBBBBI")
RTA_TABLE = 15
RT_TABLE_MAIN = 254
IFF_UP = 0x1
AF_UNSPEC = 0
# Another link went up or down, or was renamed: the addresses advertised may have changed.
OTHER_LINK = "another link's state"
# The node's way out changed: its public address and NAT mapping may have too (roaming).
DEFAULT_ROUTE = "default route"
FRA_PRIORITY = 6
FRA_TABLE = 15
NETCONFMSG_SIZE = 4  # struct netconfmsg (one byte), aligned
NETCONFA_IFINDEX = 1
NETCONFA_RP_FILTER = 3
NETCONFA_IFINDEX_ALL = -1

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15  # follows every transaction; says nothing about which table
NFGENMSG_SIZE = 4
NFTA_TABLE = 1  # the table's name in every nftables object message (NFTA_*_TABLE)
NFPROTO_INET = 1

# RTNLGRP_* numbers: links, IPv4 and IPv6 addresses, routes, rules, IPv4 netconf.
RTNL_GROUPS = (1, 5, 7, 8, 9, 11, 19, 24)
NFNLGRP_NFTABLES = 7


def group_mask(groups: tuple[int, ...]) -> int:
    """The bind() mask of multicast groups (each below 32)."""
    mask = 0
    for group in groups:
        mask |= 1 << (group - 1)
    return mask


LinkSeen = tuple[bool, str | None]  # (up, name) of a link as last seen


@dataclass(frozen=True)
class WatchState:
    """What classifying needs to remember: the index of the link named `kubespan`, so that
    the link is recognised when renamed away, and rp_filter notifications name it by index;
    the other links as last seen (index -> (up, name)), so that a notification that changes
    neither (statistics, a new link without addresses yet) wakes nobody. `links` None: not
    known (the dump at subscription failed), every other link's notification counts."""

    link_index: int | None = None
    links: Mapping[int, LinkSeen] | None = field(default_factory=dict)


def classify_route(message: Message, state: WatchState) -> tuple[str | None, WatchState]:
    """A message from an NETLINK_ROUTE socket."""
    kind = message.type
    if kind in (RTM_NEWADDR, RTM_DELADDR):
        return "address", state
    if kind in (RTM_NEWLINK, RTM_DELLINK):
        return _link(message, state)
    if kind in (RTM_NEWROUTE, RTM_DELROUTE):
        table = _table(message, RTA_TABLE)
        if table == ROUTE_TABLE:
            return f"route in table {ROUTE_TABLE}", state
        if table == RT_TABLE_MAIN and message.payload[1] == 0:  # destination length 0
            return DEFAULT_ROUTE, state
        return None, state
    if kind in (RTM_NEWRULE, RTM_DELRULE):
        if _table(message, FRA_TABLE) == ROUTE_TABLE:
            return f"rule for table {ROUTE_TABLE}", state
        attrs = attribute_map(_body(message, TABLE_HEADER.size))
        if FRA_PRIORITY in attrs and u32(attrs[FRA_PRIORITY]) == RULE_PRIORITY:
            return f"rule at priority {RULE_PRIORITY}", state
        return None, state
    if kind in (RTM_NEWNETCONF, RTM_DELNETCONF):
        attrs = attribute_map(_body(message, NETCONFMSG_SIZE))
        if NETCONFA_RP_FILTER not in attrs or NETCONFA_IFINDEX not in attrs:
            return None, state
        index = s32(attrs[NETCONFA_IFINDEX])
        ours = index in (NETCONFA_IFINDEX_ALL, state.link_index)
        return ("rp_filter" if ours else None), state
    return None, state


def classify_nftables(message: Message) -> str | None:
    """A message from an NETLINK_NETFILTER socket (group NFNLGRP_NFTABLES)."""
    if message.type >> 8 != NFNL_SUBSYS_NFTABLES or message.type & 0xFF == NFT_MSG_NEWGEN:
        return None
    body = _body(message, NFGENMSG_SIZE)
    attrs = attribute_map(body)
    if NFTA_TABLE not in attrs:
        return f"nftables message {message.type & 0xFF} without a table"  # cannot tell: ours
    if message.payload[0] != NFPROTO_INET or string(attrs[NFTA_TABLE]) != NFT_TABLE:
        return None
    return f"nftables table inet {NFT_TABLE}"


def link_seen(message: Message) -> tuple[int, LinkSeen]:
    """The link in an RTM_NEWLINK or RTM_DELLINK message: its index, whether it is up, its
    name (None when the message has none)."""
    if len(message.payload) < IFINFOMSG.size:
        raise NetlinkFormatError("truncated link message")
    _, _, index, flags, _ = IFINFOMSG.unpack_from(message.payload)
    attrs = attribute_map(message.payload[IFINFOMSG.size :])
    name = link_name(attrs[IFLA_IFNAME]) if IFLA_IFNAME in attrs else None
    return index, (bool(flags & IFF_UP), name)


def _link(message: Message, state: WatchState) -> tuple[str | None, WatchState]:
    index, seen = link_seen(message)
    name = seen[1]
    if message.type == RTM_NEWLINK and name == LINK_NAME:
        return f"link {LINK_NAME}", WatchState(index, state.links)
    if index == state.link_index:  # deleted, or renamed away
        return f"link {LINK_NAME}", WatchState(None, state.links)
    if state.links is None:
        return OTHER_LINK, state
    links = dict(state.links)
    if message.type == RTM_DELLINK:
        if message.payload[0] != AF_UNSPEC:
            return None, state  # a bridge port leaving its bridge: the link itself stays
        links.pop(index, None)  # its addresses go with their own notifications
        return None, WatchState(state.link_index, links)
    before = links.get(index)
    links[index] = seen
    # A link not seen before is new since the dump: its addresses come as their own news.
    changed = before is not None and before != seen
    return (OTHER_LINK if changed else None), WatchState(state.link_index, links)


def _table(message: Message, attribute: int) -> int:
    if len(message.payload) < TABLE_HEADER.size:
        raise NetlinkFormatError("truncated route or rule message")
    attrs = attribute_map(message.payload[TABLE_HEADER.size :])
    if attribute in attrs:
        return u32(attrs[attribute])
    return int(TABLE_HEADER.unpack_from(message.payload)[4])


def _body(message: Message, header: int) -> bytes:
    if len(message.payload) < header:
        raise NetlinkFormatError(f"message type {message.type} shorter than its header")
    return message.payload[header:]


MALFORMED = "malformed netlink message"
REASONS_JOINED_BY = "; "  # a burst's reasons, as the watcher hands them on in one string


def joined(reasons: set[str]) -> str:
    return REASONS_JOINED_BY.join(sorted(reasons))


def reasons_in(reason: str) -> set[str]:
    return set(reason.split(REASONS_JOINED_BY))


def classify_datagram(
    data: bytes, nftables: bool, state: WatchState
) -> tuple[set[str], WatchState]:
    """The reasons in one datagram from the rtnetlink socket, or (`nftables`) from the
    netfilter socket. A message that cannot be read might have been ours: it counts as a
    change (one reconcile pass too many costs little; a change missed costs encryption)."""
    try:
        messages = split_messages(data)
    except NetlinkFormatError:
        return {MALFORMED}, state
    reasons = set()
    for message in messages:
        try:
            if nftables:
                reason = classify_nftables(message)
            else:
                reason, state = classify_route(message, state)
        except NetlinkFormatError:
            reason = MALFORMED
        if reason is not None:
            reasons.add(reason)
    return reasons, state
