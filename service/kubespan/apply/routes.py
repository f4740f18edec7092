"""Routes in table 180 over raw rtnetlink: read every one (whatever put it there), replace
ours, and delete any route by echoing the kernel's own message, so the request matches that
route on everything it has (type, scope, next hops, TOS, ...) and never another."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping

from kubespan.apply.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    Message,
    NetlinkFormatError,
    attribute_map,
    attributes,
    encode_attribute,
    u32,
)
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.apply.rtnl import FAMILIES, VERSIONS, dump, header_table
from kubespan.names import ROUTE_TABLE
from kubespan.netaddr import IPAddress, IPNetwork
from kubespan.plan.routing import UNICAST, RouteSpec, route_type_name, route_type_number

RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
NLM_F_REPLACE = 0x100

# struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
RTA_DST = 1
RTA_SRC = 2
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_METRICS = 8
RTA_CACHEINFO = 12
RTA_TABLE = 15
RTA_PREF = 20
RTA_PAD = 24
RTAX_MTU = 2
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
ADDRESS_SIZE = {4: 4, 6: 16}
# Read into RouteSpec fields, or bookkeeping that does not change where a packet goes.
HANDLED = {RTA_DST, RTA_SRC, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_TABLE}
IGNORED = {RTA_CACHEINFO, RTA_PREF, RTA_PAD}
NAMED = {3: "iif", 7: "prefsrc", 9: "nexthops", 11: "realms", 16: "mark", 18: "via"}
NAMED.update({21: "encap_type", 22: "encap", 23: "expires", 30: "nhid"})


def parse_route(message: Message, link_names: Mapping[int, str]) -> RouteSpec | None:
    """The route in an RTM_NEWROUTE message if it is in table 180, else None."""
    if len(message.payload) < RTMSG.size:
        raise NetlinkFormatError("truncated route message")
    family, dst_len, src_len, tos, table, _, _, kind, _ = RTMSG.unpack_from(message.payload)
    body = message.payload[RTMSG.size :]
    attrs = attribute_map(body)
    if RTA_TABLE in attrs:
        table = u32(attrs[RTA_TABLE])
    version = VERSIONS.get(family)
    if table != ROUTE_TABLE or version is None:
        return None
    link = None
    if route_type_name(kind) == UNICAST and RTA_OIF in attrs:
        index = u32(attrs[RTA_OIF])
        link = link_names.get(index, f"if{index}")
    mtu, other = _metrics(attrs.get(RTA_METRICS, b""))
    other += [NAMED.get(k, f"attr{k}") for k, _ in attributes(body) if k not in HANDLED | IGNORED]
    return RouteSpec(
        family=version,
        destination=_network(version, attrs.get(RTA_DST), dst_len),
        metric=u32(attrs[RTA_PRIORITY]) if RTA_PRIORITY in attrs else 0,
        kind=route_type_name(kind),
        link=link,
        mtu=mtu,
        gateway=_address(version, attrs[RTA_GATEWAY]) if RTA_GATEWAY in attrs else None,
        tos=tos,
        source=_network(version, attrs.get(RTA_SRC), src_len)
        if src_len or RTA_SRC in attrs
        else None,
        other=tuple(other),
        raw=message.payload,
    )


def _metrics(data: bytes) -> tuple[int | None, list[str]]:
    mtu = None
    other = []
    for kind, value in attributes(data):
        if kind == RTAX_MTU:
            mtu = u32(value)
        else:
            other.append(f"metric{kind}={value.hex()}")
    return mtu, other


def _address(version: int, value: bytes) -> IPAddress:
    if len(value) != ADDRESS_SIZE[version]:
        raise NetlinkFormatError(f"{len(value)}-byte address in an IPv{version} route")
    return ipaddress.ip_address(value)


def _network(version: int, value: bytes | None, length: int) -> IPNetwork:
    address = _address(version, value or bytes(ADDRESS_SIZE[version]))
    try:
        return ipaddress.ip_network((address, length), strict=False)
    except ValueError as error:
        raise NetlinkFormatError(f"route prefix /{length}: {error}") from error


def encode_route(route: RouteSpec, oif: int | None) -> bytes:
    """The payload of a request for one of our routes: destination, metric, type, link,
    MTU; anything else is not ours and cannot be encoded."""
    if route.other or route.gateway or route.source or route.tos:
        raise ValueError(f"cannot encode a route that is not ours: {route.render()}")
    family = FAMILIES[route.family]
    header = RTMSG.pack(
        family,
        route.destination.prefixlen,
        0,
        0,
        header_table(ROUTE_TABLE),
        RTPROT_STATIC,
        RT_SCOPE_UNIVERSE,
        route_type_number(route.kind),
        0,
    )
    attrs = [
        encode_attribute(RTA_TABLE, struct.pack("=I", ROUTE_TABLE)),
        encode_attribute(RTA_PRIORITY, struct.pack("=I", route.metric)),
    ]
    if route.destination.prefixlen:
        attrs.append(encode_attribute(RTA_DST, route.destination.network_address.packed))
    if oif is not None:
        attrs.append(encode_attribute(RTA_OIF, struct.pack("=I", oif)))
    if route.mtu is not None:
        mtu = encode_attribute(RTAX_MTU, struct.pack("=I", route.mtu))
        attrs.append(encode_attribute(RTA_METRICS, mtu))
    return header + b"".join(attrs)


class Routes:
    """Dump, replace and delete routes in table 180 through one rtnetlink socket."""

    def __init__(self, rtnl: NetlinkSocket) -> None:
        self._rtnl = rtnl

    def observe(self) -> tuple[RouteSpec, ...]:
        """Every route in table 180, IPv4 then IPv6, each in the kernel's order."""
        names = dict(socket.if_nameindex())
        table = encode_attribute(RTA_TABLE, struct.pack("=I", ROUTE_TABLE))  # a dump filter
        messages = dump(
            self._rtnl, RTM_GETROUTE, lambda f: RTMSG.pack(f, *[0] * 8) + table, RTM_NEWROUTE
        )
        return tuple(r for m in messages if (r := parse_route(m, names)) is not None)

    def replace(self, route: RouteSpec) -> None:
        oif = None
        if route.link is not None:
            try:
                oif = socket.if_nametoindex(route.link)
            except OSError as error:
                raise OSError(f"link {route.link} does not exist") from error
        flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        self._rtnl.request(RTM_NEWROUTE, flags, encode_route(route, oif))

    def delete(self, route: RouteSpec) -> None:
        self._rtnl.request(RTM_DELROUTE, NLM_F_ACK, route.raw or encode_route(route, None))
