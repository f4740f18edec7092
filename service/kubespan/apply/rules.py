"""ip rules that look up table 180, over raw rtnetlink.

A rule is deleted by echoing the kernel's own message back, so the request sets every
selector the rule has; and ours is added with NLM_F_APPEND instead of NLM_F_EXCL, because the
kernel's "exists" check ignores some flags (an inverted `not fwmark 0x40/0x60 lookup 180`
"exists" as ours) and because repairing adds ours before deleting the rest (plan.dataplane).
"""

from __future__ import annotations

import ipaddress
import struct

from kubespan.apply.netlink import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    Message,
    NetlinkFormatError,
    attribute_map,
    attributes,
    encode_attribute,
    string,
    u8,
    u32,
)
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.apply.rtnl import FAMILIES, VERSIONS, dump, header_table
from kubespan.names import ROUTE_TABLE
from kubespan.plan.routing import RuleSpec

RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_GETRULE = 34

# struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")
FRA_DST = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_SUPPRESS_IFGROUP = 13
FRA_SUPPRESS_PREFIXLEN = 14
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_OIFNAME = 17
FRA_PAD = 18
FRA_PROTOCOL = 21
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
UNSET = 0xFFFFFFFF  # suppress_prefixlength / suppress_ifgroup: not set

# Attributes described by name in `other`; the rest appear as attr<N>=<hex>.
NAMED = {3: "iif", 4: "goto", 11: "realms", 12: "tun_id", 17: "oif", 19: "l3mdev"}
NAMED.update({20: "uidrange", 22: "ipproto", 23: "sport", 24: "dport"})
# Read into RuleSpec fields, or a value that means "not set".
HANDLED = {FRA_DST, FRA_SRC, FRA_PRIORITY, FRA_FWMARK, FRA_TABLE, FRA_FWMASK, FRA_PAD}


def parse_rule(message: Message) -> RuleSpec | None:
    """The rule in an RTM_NEWRULE message if it looks up table 180, else None."""
    if len(message.payload) < FIB_RULE_HDR.size:
        raise NetlinkFormatError("truncated rule message")
    family, dst_len, src_len, tos, table, _, _, action, flags = FIB_RULE_HDR.unpack_from(
        message.payload
    )
    attrs = attribute_map(message.payload[FIB_RULE_HDR.size :])
    if FRA_TABLE in attrs:
        table = u32(attrs[FRA_TABLE])
    version = VERSIONS.get(family)
    if action != FR_ACT_TO_TBL or table != ROUTE_TABLE or version is None:
        return None
    other = _prefixes(attrs, dst_len, src_len)
    if tos:
        other.append(f"tos {tos:#x}")
    if flags & FIB_RULE_INVERT:
        other.append("not")
    if flags & ~FIB_RULE_INVERT:
        other.append(f"flags {flags & ~FIB_RULE_INVERT:#x}")
    for kind, value in attributes(message.payload[FIB_RULE_HDR.size :]):
        if kind not in HANDLED and not _unset(kind, value):
            other.append(_describe(kind, value))
    return RuleSpec(
        family=version,
        fwmark=u32(attrs[FRA_FWMARK]) if FRA_FWMARK in attrs else 0,
        mask=u32(attrs[FRA_FWMASK]) if FRA_FWMASK in attrs else 0,
        priority=u32(attrs[FRA_PRIORITY]) if FRA_PRIORITY in attrs else 0,
        table=table,
        other=tuple(other),
        raw=message.payload,
    )


def _prefixes(attrs: dict[int, bytes], dst_len: int, src_len: int) -> list[str]:
    out = []
    for word, kind, length in (("from", FRA_SRC, src_len), ("to", FRA_DST, dst_len)):
        if length or kind in attrs:
            try:
                address = ipaddress.ip_address(attrs.get(kind, b""))
            except ValueError as error:
                raise NetlinkFormatError(f"rule {word} address: {error}") from error
            out.append(f"{word} {address}/{length}")
    return out


def _unset(kind: int, value: bytes) -> bool:
    if kind in (FRA_SUPPRESS_PREFIXLEN, FRA_SUPPRESS_IFGROUP):
        return u32(value) == UNSET
    if kind == FRA_PROTOCOL:
        return u8(value) == 0
    return False


def _describe(kind: int, value: bytes) -> str:
    if kind in (FRA_IIFNAME, FRA_OIFNAME):
        return f"{NAMED[kind]} {string(value)}"
    return f"{NAMED.get(kind, f'attr{kind}')}={value.hex()}"


def encode_rule(rule: RuleSpec) -> bytes:
    """The payload of a request for one of our rules (fwmark, mask, priority, table only)."""
    if rule.other:
        raise ValueError(f"cannot encode a rule with other selectors: {rule.render()}")
    header = FIB_RULE_HDR.pack(
        FAMILIES[rule.family],
        0,
        0,
        0,
        header_table(rule.table),
        0,
        0,
        FR_ACT_TO_TBL,
        0,
    )
    attrs = [(FRA_PRIORITY, rule.priority), (FRA_TABLE, rule.table)]
    if rule.fwmark or rule.mask:
        attrs += [(FRA_FWMARK, rule.fwmark), (FRA_FWMASK, rule.mask)]
    return header + b"".join(encode_attribute(k, struct.pack("=I", v)) for k, v in attrs)


class Rules:
    """Dump, add and delete rules through one rtnetlink socket."""

    def __init__(self, rtnl: NetlinkSocket) -> None:
        self._rtnl = rtnl

    def observe(self) -> tuple[RuleSpec, ...]:
        """Every rule that looks up table 180, IPv4 then IPv6, each in the kernel's order."""
        request = FIB_RULE_HDR.pack  # family, then zeros: every rule of the family
        messages = dump(self._rtnl, RTM_GETRULE, lambda f: request(f, *[0] * 8), RTM_NEWRULE)
        return tuple(r for m in messages if (r := parse_rule(m)) is not None)

    def add(self, rule: RuleSpec) -> None:
        flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
        self._rtnl.request(RTM_NEWRULE, flags, encode_rule(rule))

    def delete(self, rule: RuleSpec) -> None:
        self._rtnl.request(RTM_DELRULE, NLM_F_ACK, rule.raw or encode_rule(rule))
