"""What `kubespan check` asks rtnetlink beyond what apply/ reads, as bytes out and values in
(pure): every ip rule, whatever table it looks up; a route lookup made as for one of
WireGuard's own packets; a link's name and MTU. Malformed answers raise NetlinkFormatError.
"""

from __future__ import annotations

import socket
import struct

from kubespan.apply.changes import IFINFOMSG, IFLA_IFNAME
from kubespan.apply.netlink import (
    Message,
    NetlinkFormatError,
    attribute_map,
    attributes,
    encode_attribute,
    string,
    u32,
)
from kubespan.apply.routes import RTA_METRICS, RTA_OIF, RTAX_MTU, RTMSG
from kubespan.apply.rtnl import FAMILIES, VERSIONS
from kubespan.apply.rules import (
    FIB_RULE_HDR,
    FIB_RULE_INVERT,
    FR_ACT_TO_TBL,
    FRA_FWMARK,
    FRA_FWMASK,
    FRA_PRIORITY,
    FRA_TABLE,
    HANDLED,
    _describe,
    _prefixes,
    _unset,
)
from kubespan.netaddr import Endpoint
from kubespan.plan.routing import RuleSpec

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWROUTE = 24
IFLA_MTU = 4
RTA_DST = 1
RTA_MARK = 16
RTA_IP_PROTO = 27
RTA_SPORT = 28
RTA_DPORT = 29
# The actions of rules that do not look up a table (FR_ACT_*), as `ip rule` prints them.
RULE_ACTIONS = {2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
NOP = "nop"
# A believable MTU: IPv4's minimum up to far beyond any link's (loopback has 65536).
MTU_RANGE = range(68, 1 << 24)
MAX_LINK_NAME = 15  # IFNAMSIZ - 1


def parse_any_rule(message: Message) -> RuleSpec | None:
    """The ip rule in an RTM_NEWRULE message (None for a family other than IPv4 and IPv6).
    A rule that looks up no table has table 0 and its action first in `other`; otherwise
    `other` is what apply.rules would say of it: every selector besides the mark."""
    if len(message.payload) < FIB_RULE_HDR.size:
        raise NetlinkFormatError("truncated rule message")
    header = FIB_RULE_HDR.unpack_from(message.payload)
    version = VERSIONS.get(header[0])
    if version is None:
        return None
    _, dst_len, src_len, tos, table, _, _, action, flags = header
    body = message.payload[FIB_RULE_HDR.size :]
    attrs = attribute_map(body)
    words = [] if action == FR_ACT_TO_TBL else [RULE_ACTIONS.get(action, f"action{action}")]
    words += _prefixes(attrs, dst_len, src_len)
    words += [f"tos {tos:#x}"] * bool(tos) + ["not"] * bool(flags & FIB_RULE_INVERT)
    if flags & ~FIB_RULE_INVERT:
        words.append(f"flags {flags & ~FIB_RULE_INVERT:#x}")
    words += [_describe(k, v) for k, v in attributes(body) if k not in HANDLED and not _unset(k, v)]

    def number(kind: int) -> int:
        return u32(attrs[kind]) if kind in attrs else 0

    looked_up = (number(FRA_TABLE) or table) if action == FR_ACT_TO_TBL else 0
    return RuleSpec(
        version, number(FRA_FWMARK), number(FRA_FWMASK), number(FRA_PRIORITY), looked_up,
        tuple(words), message.payload,
    )  # fmt: skip


def route_request(endpoint: Endpoint, mark: int, source_port: int | None) -> bytes:
    """RTM_GETROUTE for a UDP packet to `endpoint` carrying firewall mark `mark`, as the
    kernel routes WireGuard's own (policy rules on marks and ports then apply as to them)."""
    address = endpoint.address
    header = RTMSG.pack(FAMILIES[address.version], address.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    attrs = [
        encode_attribute(RTA_DST, address.packed),
        encode_attribute(RTA_MARK, struct.pack("=I", mark)),
        encode_attribute(RTA_IP_PROTO, bytes([socket.IPPROTO_UDP])),
        encode_attribute(RTA_DPORT, struct.pack("!H", endpoint.port)),
    ]
    if source_port:
        attrs.append(encode_attribute(RTA_SPORT, struct.pack("!H", source_port)))
    return header + b"".join(attrs)


def parse_route_answer(answer: list[Message]) -> tuple[int | None, int | None]:
    """(the route's own MTU, the index of the device it leaves by) from the answer to
    route_request; the MTU is None when the route has none (configured or learned), and
    an implausible one counts as none."""
    attrs = _answered(answer, RTM_NEWROUTE, RTMSG.size, "route")
    oif = u32(attrs[RTA_OIF]) if RTA_OIF in attrs else None
    metrics = attribute_map(attrs.get(RTA_METRICS, b""))
    mtu = u32(metrics[RTAX_MTU]) if RTAX_MTU in metrics else None
    return (mtu if mtu in MTU_RANGE else None), oif


def link_request(index: int) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0)


def parse_link_answer(answer: list[Message]) -> tuple[str, int]:
    """(name, MTU) of the link in the answer to link_request."""
    attrs = _answered(answer, RTM_NEWLINK, IFINFOMSG.size, "link")
    if IFLA_IFNAME not in attrs or IFLA_MTU not in attrs:
        raise NetlinkFormatError("link without its name or MTU")
    name, mtu = string(attrs[IFLA_IFNAME]), u32(attrs[IFLA_MTU])
    if not valid_link_name(name) or mtu not in MTU_RANGE:
        raise NetlinkFormatError(f"implausible link {name[:MAX_LINK_NAME]!r} mtu {mtu}")
    return name, mtu


def _answered(answer: list[Message], kind: int, header: int, what: str) -> dict[int, bytes]:
    """The attributes of the first message of type `kind` (after its `header` bytes)."""
    for message in answer:
        if message.type == kind:
            if len(message.payload) < header:
                raise NetlinkFormatError(f"truncated {what} message")
            return attribute_map(message.payload[header:])
    raise NetlinkFormatError(f"no {what} in the answer")


def valid_link_name(name: str) -> bool:
    """What the kernel allows as a link name (it may also name a file under /proc/sys)."""
    return (
        0 < len(name) <= MAX_LINK_NAME
        and name not in (".", "..")
        and all(c.isprintable() and not c.isspace() and c not in "/:" for c in name)
    )
