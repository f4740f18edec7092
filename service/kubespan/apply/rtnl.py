"""What the rule and route requests share: address families, the table number in an 8-bit
header field, and a dump of both families."""

from __future__ import annotations

import socket
from collections.abc import Callable

from kubespan.apply.netlink import NLM_F_DUMP, Message
from kubespan.apply.nlsocket import NetlinkSocket

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
VERSIONS = {number: version for version, number in FAMILIES.items()}
RT_TABLE_COMPAT = 252  # the header's table when the real one only fits the attribute


def header_table(table: int) -> int:
    return table if table < 256 else RT_TABLE_COMPAT


def dump(
    rtnl: NetlinkSocket, kind: int, request: Callable[[int], bytes], answer: int
) -> list[Message]:
    """Messages of type `answer` from a dump of IPv4, then IPv6 (`request(family)` is the
    payload asking for one family)."""
    return [
        message
        for family in FAMILIES.values()
        for message in rtnl.request(kind, NLM_F_DUMP, request(family))
        if message.type == answer
    ]
