"""Links and addresses over raw rtnetlink, as bytes out and values in (pure).

The agent reads every link and address (its underlay, its own link) and changes only its
own link: create it (kind wireguard), set its MTU, bring it up, add and remove its ULA,
delete it. With our small codec (apply/netlink.py) the agent no longer loads pyroute2,
whose import alone was a third of an idle agent's memory. Malformed answers raise
NetlinkFormatError.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from kubespan.apply.changes import IFINFOMSG, IFLA_IFNAME
from kubespan.apply.netlink import (
    NLA_F_NESTED,
    Message,
    NetlinkFormatError,
    attribute_map,
    encode_attribute,
    link_name,
    string,
    u32,
)

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
IFLA_ADDRESS = 1
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFF_UP = 0x1
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, link index
IFA_ADDRESS = 1
IFA_LOCAL = 2
ADDRESS_SIZES = {socket.AF_INET: 4, socket.AF_INET6: 16}

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    mtu: int
    mac: str  # "" when the link has no hardware address (WireGuard's)
    kind: str  # "" for a link without one (a physical NIC)

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True)
class Address:
    index: int
    interface: Interface
    scope: int


def parse_link(message: Message) -> Link:
    """The link in an RTM_NEWLINK message."""
    if len(message.payload) < IFINFOMSG.size:
        raise NetlinkFormatError("truncated link message")
    _, _, index, flags, _ = IFINFOMSG.unpack_from(message.payload)
    attrs = attribute_map(message.payload[IFINFOMSG.size :])
    if IFLA_IFNAME not in attrs:
        raise NetlinkFormatError(f"link {index} without a name")
    info = attribute_map(attrs.get(IFLA_LINKINFO, b""))
    mac = attrs.get(IFLA_ADDRESS)
    return Link(
        index=index,
        name=link_name(attrs[IFLA_IFNAME]),
        flags=flags,
        mtu=u32(attrs[IFLA_MTU]) if IFLA_MTU in attrs else 0,
        mac=":".join(f"{b:02x}" for b in mac) if mac is not None else "",
        kind=string(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else "",
    )


def parse_address(message: Message) -> Address | None:
    """The address in an RTM_NEWADDR message; None for one of another family, or without
    IFA_ADDRESS."""
    if len(message.payload) < IFADDRMSG.size:
        raise NetlinkFormatError("truncated address message")
    family, prefixlen, _, scope, index = IFADDRMSG.unpack_from(message.payload)
    size = ADDRESS_SIZES.get(family)
    attrs = attribute_map(message.payload[IFADDRMSG.size :])
    raw = attrs.get(IFA_ADDRESS)
    if size is None or raw is None:
        return None
    if len(raw) != size or prefixlen > size * 8:
        raise NetlinkFormatError(f"address of {len(raw)} bytes, /{prefixlen}, family {family}")
    interface = ipaddress.ip_interface((ipaddress.ip_address(raw), prefixlen))
    return Address(index, interface, scope)


def _link_header(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def _name(name: str) -> bytes:
    return encode_attribute(IFLA_IFNAME, name.encode() + b"\0")


def link_by_name(name: str) -> bytes:
    """RTM_GETLINK (not a dump) of the link named `name`."""
    return _link_header() + _name(name)


def link_by_index(index: int) -> bytes:
    return _link_header(index)


def every_link() -> bytes:
    """RTM_GETLINK dump."""
    return _link_header()


def create_wireguard(name: str) -> bytes:
    """RTM_NEWLINK with NLM_F_CREATE | NLM_F_EXCL: a WireGuard link named `name`."""
    kind = encode_attribute(IFLA_INFO_KIND, b"wireguard")
    return _link_header() + _name(name) + encode_attribute(IFLA_LINKINFO | NLA_F_NESTED, kind)


def set_mtu(index: int, mtu: int) -> bytes:
    """RTM_NEWLINK on an existing link: its MTU."""
    return _link_header(index) + encode_attribute(IFLA_MTU, struct.pack("=I", mtu))


def set_up(index: int) -> bytes:
    """RTM_NEWLINK on an existing link: IFF_UP set, no other flag changed."""
    return _link_header(index, IFF_UP, IFF_UP)


def every_address() -> bytes:
    """RTM_GETADDR dump, every family."""
    return IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def address_change(index: int, interface: Interface) -> bytes:
    """RTM_NEWADDR or RTM_DELADDR of `interface` on link `index` (scope global)."""
    family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    packed = interface.ip.packed
    header = IFADDRMSG.pack(family, interface.network.prefixlen, 0, 0, index)
    return header + encode_attribute(IFA_LOCAL, packed) + encode_attribute(IFA_ADDRESS, packed)
