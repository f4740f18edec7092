"""WireGuard devices over generic netlink, with our own codec: read (WG_CMD_GET_DEVICE) and
set (WG_CMD_SET_DEVICE).

Every pass reads every peer's counters and handshake; decoding a hundred peers through
pyroute2's generic attribute objects was the largest part of an idle pass, and loading
pyroute2 a third of an idle agent's memory. This reads and writes the same messages with the
small netlink codec of apply/netlink.py (tests/test_wireguard.py decodes messages pyroute2
encoded, encodes ones pyroute2 decodes, and hand-made ones).

The kernel splits a dump of many peers across messages: the device's own attributes come in
the first, and a peer whose allowed IPs did not fit is repeated in the next with its public
key and the rest of its allowed IPs (merge_peer joins them).
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kubespan.apply.netlink import (
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_DUMP,
    Message,
    NetlinkFormatError,
    attribute_map,
    attribute_spans,
    attributes,
    encode_attribute,
    u32,
)
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.frozen import require_plain
from kubespan.model import ObservedPeer
from kubespan.netaddr import Endpoint, IPNetwork, network_sort_key

NETLINK_GENERIC = 16
GENL_HEADER = struct.Struct("=BBH")  # command, version, reserved
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

WG_GENL_NAME = "wireguard"
WG_GENL_VERSION = 1
WG_CMD_GET_DEVICE = 0
WG_CMD_SET_DEVICE = 1
WGDEVICE_A_IFNAME = 2
WGDEVICE_A_PRIVATE_KEY = 3
WGDEVICE_A_LISTEN_PORT = 6
WGDEVICE_A_FWMARK = 7
WGDEVICE_A_PEERS = 8
WGPEER_A_PUBLIC_KEY = 1
WGPEER_A_PRESHARED_KEY = 2
WGPEER_A_FLAGS = 3
WGPEER_A_ENDPOINT = 4
WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL = 5
WGPEER_A_LAST_HANDSHAKE_TIME = 6
WGPEER_A_RX_BYTES = 7
WGPEER_A_TX_BYTES = 8
WGPEER_A_ALLOWEDIPS = 9
WGALLOWEDIP_A_FAMILY = 1
WGALLOWEDIP_A_IPADDR = 2
WGALLOWEDIP_A_CIDR_MASK = 3
WGPEER_F_REMOVE_ME = 1
WGPEER_F_REPLACE_ALLOWEDIPS = 2
WGPEER_F_UPDATE_ONLY = 4

KEY_SIZE = 32
FAMILY = struct.Struct("=H")  # sockaddr's family, in host order
PORT = struct.Struct("!H")  # its port, in network order
SOCKADDR_IN_SIZE = 16  # family, port, 4-byte address, padding
SOCKADDR_IN6_SIZE = 28  # family, port, flow info, 16-byte address, scope
UNSIGNED = {2: struct.Struct("=H"), 8: struct.Struct("=Q")}
TIMESPEC = struct.Struct("=qq")
ZERO_KEY = bytes(KEY_SIZE)
# A peer's allowed IPs go in messages of at most this many (an IPv6 one takes 40 bytes, and an
# attribute holds at most 64 KiB): a peer with more is set in several, as wg(8) does.
ALLOWED_IPS_PER_MESSAGE = 1000


@dataclass
class DeviceInfo:
    private_key: str | None = field(default=None, repr=False)
    listen_port: int = 0
    fwmark: int = 0
    peers: dict[str, ObservedPeer] = field(default_factory=dict)


def merge_peer(old: ObservedPeer | None, new: ObservedPeer) -> ObservedPeer:
    """A peer split across dump messages: the later part carries more allowed IPs."""
    if old is None:
        return new
    ips = tuple(sorted(set(old.allowed_ips) | set(new.allowed_ips), key=network_sort_key))
    return ObservedPeer(
        public_key=old.public_key,
        endpoint=old.endpoint or new.endpoint,
        allowed_ips=ips,
        keepalive=old.keepalive or new.keepalive,
        last_handshake=old.last_handshake or new.last_handshake,
        rx_bytes=max(old.rx_bytes, new.rx_bytes),
        tx_bytes=max(old.tx_bytes, new.tx_bytes),
        preshared_key=old.preshared_key or new.preshared_key,
    )


def _key(value: bytes) -> str:
    if len(value) != KEY_SIZE:
        raise NetlinkFormatError(f"a WireGuard key of {len(value)} bytes")
    return base64.b64encode(value).decode()


def _uint(value: bytes, size: int) -> int:
    if len(value) != size:
        raise NetlinkFormatError(f"{len(value)} bytes where {size} belong")
    result: int = UNSIGNED[size].unpack(value)[0]
    return result


def parse_endpoint(value: bytes) -> Endpoint | None:
    """A sockaddr_in or sockaddr_in6; None for no endpoint (unspecified, or port 0)."""
    if len(value) < 2:
        raise NetlinkFormatError("a WireGuard endpoint shorter than its family")
    family = FAMILY.unpack_from(value)[0]
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == socket.AF_INET and len(value) >= SOCKADDR_IN_SIZE:
        address = ipaddress.IPv4Address(value[4:8])
    elif family == socket.AF_INET6 and len(value) >= SOCKADDR_IN6_SIZE:
        address = ipaddress.IPv6Address(value[8:24])
    else:
        return None  # AF_UNSPEC: no endpoint set
    port = PORT.unpack_from(value, 2)[0]
    if not port or address.is_unspecified:
        return None
    return Endpoint(address, int(port))


def parse_handshake(value: bytes) -> float | None:
    if len(value) != TIMESPEC.size:
        raise NetlinkFormatError(f"a handshake time of {len(value)} bytes")
    seconds, nanos = TIMESPEC.unpack(value)
    return None if not seconds else float(seconds) + float(nanos) / 1e9


def parse_allowed_ips(value: bytes) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for _, nested in attributes(value):
        attrs = attribute_map(nested)
        raw = attrs.get(WGALLOWEDIP_A_IPADDR)
        mask = attrs.get(WGALLOWEDIP_A_CIDR_MASK)
        if raw is None or mask is None or len(raw) not in (4, 16) or len(mask) != 1:
            raise NetlinkFormatError("an allowed IP without its address or mask")
        address = ipaddress.ip_address(raw)
        out.append(ipaddress.ip_network((address, mask[0]), strict=False))
    return tuple(sorted(set(out), key=network_sort_key))


require_plain(ObservedPeer)  # DeviceParser._counters_only copies it as evolve would

# What a peer's dump says that changes while nothing else about it does: a live peer's
# counters (and handshake) change at every pass, and nothing else while it stays where it is.
_COUNTERS = (WGPEER_A_LAST_HANDSHAKE_TIME, WGPEER_A_RX_BYTES, WGPEER_A_TX_BYTES)
# A peer's dump begins with its public key (header and key): with the dump's length, what a
# layout is found by. Only a way to find it: a layout is used only when the rest matches.
LAYOUT_PREFIX = 4 + KEY_SIZE


@dataclass(frozen=True)
class _Layout:
    """A peer's dump but for its counters and handshake: the fixed parts of its bytes (every
    attribute header among them) and where the counters' payloads are. A dump of the same
    length whose fixed parts are these bytes is the same peer with other counters: nothing
    else can differ, and the counters are read at these offsets, their sizes checked when
    the layout was made (_parse_peer refuses a counter of another size)."""

    fixed: tuple[tuple[int, int, bytes], ...]  # (start, end, bytes)
    # The counters' payloads, read in one unpack from `start` (the bytes between skipped):
    # the handshake's seconds and nanoseconds, rx, tx, each at its index in what `counters`
    # gives (None: not in the dump).
    counters: struct.Struct
    start: int
    handshake: int | None
    rx: int | None
    tx: int | None
    allowed: bytes | None  # the allowed-IP list's bytes (fixed too)

    @staticmethod
    def of(value: bytes, first: dict[int, tuple[int, int]], allowed: bytes | None) -> _Layout:
        """`first`: each attribute type's first payload span (what the kernel reads)."""
        present = sorted((first[kind], kind) for kind in _COUNTERS if kind in first)
        fixed, start = [], 0
        for (begin, end), _ in present:
            fixed.append((start, begin, value[start:begin]))
            start = end
        fixed.append((start, len(value), value[start:]))
        begin = present[0][0][0] if present else 0
        codes, at, index = ["="], begin, 0
        where: dict[int, int] = {}
        for (payload, end), kind in present:
            codes.append(f"{payload - at}x" if payload > at else "")
            codes.append("qq" if kind == WGPEER_A_LAST_HANDSHAKE_TIME else "Q")
            where[kind] = index
            index += 2 if kind == WGPEER_A_LAST_HANDSHAKE_TIME else 1
            at = end
        return _Layout(
            tuple(fixed),
            struct.Struct("".join(codes)),
            begin,
            where.get(WGPEER_A_LAST_HANDSHAKE_TIME),
            where.get(WGPEER_A_RX_BYTES),
            where.get(WGPEER_A_TX_BYTES),
            allowed,
        )


class DeviceParser:
    """Turns dump messages into a DeviceInfo; keeps parsed peers and allowed-IP lists by
    their bytes: a peer nobody talks to comes back byte for byte (a hundred dead peers were
    most of an idle pass's dump), and allowed IPs change only when we change them. A peer
    that answers comes back with new counters and nothing else changed: its counters alone
    are read (a hundred such peers, parsed in full, were half of an idle pass)."""

    def __init__(self) -> None:
        # What the last dump parsed, and this one: nothing outlives the dump after it.
        self._last: dict[bytes, tuple[IPNetwork, ...]] = {}
        self._allowed: dict[bytes, tuple[IPNetwork, ...]] = {}
        # A peer's bytes -> the peer, and its allowed-IP list's bytes (kept along with it,
        # so that the list parsed stays the same object while the peer comes and goes).
        self._last_peers: dict[bytes, tuple[ObservedPeer, bytes | None]] = {}
        self._peers: dict[bytes, tuple[ObservedPeer, bytes | None]] = {}
        # (prefix, length) -> a peer's layout and the peer last read with it.
        self._last_layouts: dict[tuple[bytes, int], tuple[_Layout, ObservedPeer]] = {}
        self._layouts: dict[tuple[bytes, int], tuple[_Layout, ObservedPeer]] = {}

    def _allowed_ips(self, value: bytes) -> tuple[IPNetwork, ...]:
        found = self._allowed.get(value) or self._last.get(value)
        if found is None:
            found = parse_allowed_ips(value)
        self._allowed[value] = found
        return found

    def peer(self, value: bytes) -> ObservedPeer:
        found = self._peers.get(value) or self._last_peers.get(value)
        if found is None:
            found = self._counters_only(value) or self._parse_peer(value)
        else:
            peer, allowed = found
            if allowed is not None:
                self._allowed[allowed] = peer.allowed_ips
        self._peers[value] = found
        return found[0]

    def _counters_only(self, value: bytes) -> tuple[ObservedPeer, bytes | None] | None:
        """The peer, when a peer of the last dump had these bytes but for its counters (its
        layout's fixed bytes match; the dump's length is in what finds the layout): a copy
        of that peer made as frozen.evolve makes it, with the counters read at the layout's
        offsets. In one function, plain loops and one unpack: for every peer that answers,
        at every pass."""
        where = (value[:LAYOUT_PREFIX], len(value))
        kept = self._layouts.get(where) or self._last_layouts.get(where)
        if kept is None:
            return None
        layout, before = kept
        for start, end, same in layout.fixed:
            if value[start:end] != same:
                return None
        counters = layout.counters.unpack_from(value, layout.start)
        handshake, rx, tx = layout.handshake, layout.rx, layout.tx
        peer: ObservedPeer = object.__new__(ObservedPeer)
        fields = peer.__dict__
        fields.update(before.__dict__)
        if handshake is not None and counters[handshake]:  # seconds, as parse_handshake
            seconds, nanos = counters[handshake], counters[handshake + 1]
            fields["last_handshake"] = float(seconds) + float(nanos) / 1e9
        else:
            fields["last_handshake"] = None
        fields["rx_bytes"] = 0 if rx is None else counters[rx]
        fields["tx_bytes"] = 0 if tx is None else counters[tx]
        self._layouts[where] = (layout, peer)
        if layout.allowed is not None:
            self._allowed[layout.allowed] = peer.allowed_ips
        return peer, layout.allowed

    def _parse_peer(self, value: bytes) -> tuple[ObservedPeer, bytes | None]:
        first: dict[int, tuple[int, int]] = {}
        for kind, start, end in attribute_spans(value):
            first.setdefault(kind, (start, end))  # a repeated type: the kernel reads the first
        attrs = {kind: value[start:end] for kind, (start, end) in first.items()}
        public_key = attrs.get(WGPEER_A_PUBLIC_KEY)
        if public_key is None:
            raise NetlinkFormatError("a WireGuard peer without its public key")
        psk = attrs.get(WGPEER_A_PRESHARED_KEY)
        endpoint = attrs.get(WGPEER_A_ENDPOINT)
        keepalive = attrs.get(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL)
        handshake = attrs.get(WGPEER_A_LAST_HANDSHAKE_TIME)
        rx, tx = attrs.get(WGPEER_A_RX_BYTES), attrs.get(WGPEER_A_TX_BYTES)
        allowed = attrs.get(WGPEER_A_ALLOWEDIPS)
        peer = ObservedPeer(
            public_key=_key(public_key),
            endpoint=parse_endpoint(endpoint) if endpoint is not None else None,
            allowed_ips=self._allowed_ips(allowed) if allowed is not None else (),
            keepalive=_uint(keepalive, 2) if keepalive is not None else 0,
            last_handshake=parse_handshake(handshake) if handshake is not None else None,
            rx_bytes=_uint(rx, 8) if rx is not None else 0,
            tx_bytes=_uint(tx, 8) if tx is not None else 0,
            preshared_key="" if psk is None or psk == ZERO_KEY else _key(psk),
        )
        self._layouts[(value[:LAYOUT_PREFIX], len(value))] = (
            _Layout.of(value, first, allowed),
            peer,
        )
        return peer, allowed

    def device(self, payloads: Iterable[bytes]) -> DeviceInfo:
        """The device in the payloads (generic netlink header first) of one dump."""
        self._last, self._allowed = self._allowed, {}
        self._last_peers, self._peers = self._peers, {}
        self._last_layouts, self._layouts = self._layouts, {}
        info = DeviceInfo()
        for payload in payloads:
            if len(payload) < GENL_HEADER.size:
                raise NetlinkFormatError("a generic netlink message shorter than its header")
            for kind, value in attributes(payload[GENL_HEADER.size :]):
                if kind == WGDEVICE_A_PRIVATE_KEY:
                    info.private_key = None if value == ZERO_KEY else _key(value)
                elif kind == WGDEVICE_A_LISTEN_PORT:
                    info.listen_port = _uint(value, 2)
                elif kind == WGDEVICE_A_FWMARK:
                    info.fwmark = u32(value)
                elif kind == WGDEVICE_A_PEERS:
                    peers = info.peers
                    for _, nested in attributes(value):
                        peer = self.peer(nested)
                        earlier = peers.get(peer.public_key)
                        peers[peer.public_key] = (
                            peer if earlier is None else merge_peer(earlier, peer)
                        )
        return info


def genl_payload(command: int, version: int, attrs: Iterable[tuple[int, bytes]]) -> bytes:
    return GENL_HEADER.pack(command, version, 0) + b"".join(
        encode_attribute(kind, value) for kind, value in attrs
    )


def _raw_key(text: str) -> bytes:
    """A base64 key as the kernel takes it; "" (no preshared key) is 32 zero bytes."""
    if not text:
        return ZERO_KEY
    raw = base64.b64decode(text, validate=True)
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a WireGuard key of {len(raw)} bytes")
    return raw


def _nest(kind: int, parts: Iterable[bytes]) -> bytes:
    return encode_attribute(kind | NLA_F_NESTED, b"".join(parts))


def encode_endpoint(endpoint: Endpoint) -> bytes:
    """A sockaddr_in or sockaddr_in6."""
    address = endpoint.address
    port = PORT.pack(endpoint.port)
    if address.version == 4:
        return FAMILY.pack(socket.AF_INET) + port + address.packed + bytes(8)
    return FAMILY.pack(socket.AF_INET6) + port + bytes(4) + address.packed + bytes(4)


def encode_allowed_ip(network: IPNetwork) -> bytes:
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    return _nest(
        0,
        (
            encode_attribute(WGALLOWEDIP_A_FAMILY, FAMILY.pack(family)),
            encode_attribute(WGALLOWEDIP_A_IPADDR, network.network_address.packed),
            encode_attribute(WGALLOWEDIP_A_CIDR_MASK, bytes([network.prefixlen])),
        ),
    )


def set_device_request(
    name: str, private_key: str | None, listen_port: int | None, fwmark: int | None
) -> bytes:
    """WG_CMD_SET_DEVICE of the device's own settings (those not None)."""
    attrs = [(WGDEVICE_A_IFNAME, name.encode() + b"\0")]
    if private_key is not None:
        attrs.append((WGDEVICE_A_PRIVATE_KEY, _raw_key(private_key)))
    if listen_port is not None:
        attrs.append((WGDEVICE_A_LISTEN_PORT, UNSIGNED[2].pack(listen_port)))
    if fwmark is not None:
        attrs.append((WGDEVICE_A_FWMARK, struct.pack("=I", fwmark)))
    return genl_payload(WG_CMD_SET_DEVICE, WG_GENL_VERSION, attrs)


def set_peer_request(
    name: str,
    public_key: str,
    *,
    remove: bool = False,
    update_only: bool = False,
    preshared_key: str | None = None,
    endpoint: Endpoint | None = None,
    keepalive: int | None = None,
    allowed_ips: Iterable[IPNetwork] | None = None,
) -> bytes:
    """WG_CMD_SET_DEVICE of one peer: `allowed_ips` replace the peer's (not None);
    `update_only`: nothing happens if the peer does not exist."""
    flags = (
        (WGPEER_F_REMOVE_ME if remove else 0)
        | (WGPEER_F_UPDATE_ONLY if update_only else 0)
        | (WGPEER_F_REPLACE_ALLOWEDIPS if allowed_ips is not None else 0)
    )
    parts = [encode_attribute(WGPEER_A_PUBLIC_KEY, _raw_key(public_key))]
    if flags:
        parts.append(encode_attribute(WGPEER_A_FLAGS, struct.pack("=I", flags)))
    if preshared_key is not None:
        parts.append(encode_attribute(WGPEER_A_PRESHARED_KEY, _raw_key(preshared_key)))
    if endpoint is not None:
        parts.append(encode_attribute(WGPEER_A_ENDPOINT, encode_endpoint(endpoint)))
    if keepalive is not None:
        parts.append(
            encode_attribute(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, UNSIGNED[2].pack(keepalive))
        )
    if allowed_ips is not None:
        parts.append(_nest(WGPEER_A_ALLOWEDIPS, (encode_allowed_ip(n) for n in allowed_ips)))
    return _device_peers(name, parts)


def set_peer_requests(
    name: str,
    public_key: str,
    *,
    preshared_key: str | None = None,
    endpoint: Endpoint | None = None,
    keepalive: int | None = None,
    allowed_ips: Sequence[IPNetwork] | None = None,
) -> list[bytes]:
    """set_peer_request, split when the allowed IPs do not fit one message: the first
    replaces the peer's allowed IPs with the first part, the next ones add the rest (to the
    peer only if it exists). Until the last is taken, ranges not yet added are dropped by
    WireGuard, not sent in the clear."""
    ips = None if allowed_ips is None else tuple(allowed_ips)
    first = None if ips is None else ips[:ALLOWED_IPS_PER_MESSAGE]
    requests = [
        set_peer_request(
            name,
            public_key,
            preshared_key=preshared_key,
            endpoint=endpoint,
            keepalive=keepalive,
            allowed_ips=first,
        )
    ]
    rest = () if ips is None else ips[ALLOWED_IPS_PER_MESSAGE:]
    for start in range(0, len(rest), ALLOWED_IPS_PER_MESSAGE):
        more = rest[start : start + ALLOWED_IPS_PER_MESSAGE]
        requests.append(_more_allowed_ips(name, public_key, more))
    return requests


def _more_allowed_ips(name: str, public_key: str, networks: Sequence[IPNetwork]) -> bytes:
    parts = (
        encode_attribute(WGPEER_A_PUBLIC_KEY, _raw_key(public_key)),
        encode_attribute(WGPEER_A_FLAGS, struct.pack("=I", WGPEER_F_UPDATE_ONLY)),
        _nest(WGPEER_A_ALLOWEDIPS, (encode_allowed_ip(n) for n in networks)),
    )
    return _device_peers(name, parts)


def _device_peers(name: str, peer_parts: Iterable[bytes]) -> bytes:
    header = genl_payload(
        WG_CMD_SET_DEVICE, WG_GENL_VERSION, [(WGDEVICE_A_IFNAME, name.encode() + b"\0")]
    )
    return header + _nest(WGDEVICE_A_PEERS, (_nest(0, peer_parts),))


class WireGuardNetlink:
    """Reads and sets WireGuard devices over one generic netlink socket; close it when
    done. OSError with the kernel's errno when it refuses."""

    def __init__(self) -> None:
        self._socket = NetlinkSocket(NETLINK_GENERIC)
        self._family: int | None = None  # resolved on first use: the module may load later
        self._parser = DeviceParser()

    def close(self) -> None:
        self._socket.close()

    def _family_id(self) -> int:
        if self._family is None:
            request = genl_payload(
                CTRL_CMD_GETFAMILY, 1, [(CTRL_ATTR_FAMILY_NAME, WG_GENL_NAME.encode() + b"\0")]
            )
            for message in self._socket.request(GENL_ID_CTRL, NLM_F_ACK, request):
                attrs = attribute_map(message.payload[GENL_HEADER.size :])
                if CTRL_ATTR_FAMILY_ID in attrs and len(attrs[CTRL_ATTR_FAMILY_ID]) == 2:
                    self._family = _uint(attrs[CTRL_ATTR_FAMILY_ID], 2)
            if self._family is None:
                raise OSError(f"no generic netlink family {WG_GENL_NAME!r} in the answer")
        return self._family

    def _request(self, flags: int, payload: bytes) -> tuple[int, list[Message]]:
        """The family and the answer; a family id the kernel no longer knows (the module was
        reloaded) is looked up again, once."""
        for attempt in range(2):
            family = self._family_id()
            try:
                return family, self._socket.request(family, flags, payload)
            except OSError as error:
                if attempt or error.errno not in (errno.ENOENT, errno.EOPNOTSUPP):
                    raise
                self._family = None
        raise AssertionError("unreachable")

    def device(self, name: str) -> DeviceInfo:
        """The device named `name`."""
        request = genl_payload(
            WG_CMD_GET_DEVICE, WG_GENL_VERSION, [(WGDEVICE_A_IFNAME, name.encode() + b"\0")]
        )
        family, messages = self._request(NLM_F_DUMP, request)
        return self._parser.device(m.payload for m in messages if m.type == family)

    def set(self, request: bytes) -> None:
        """Send a set_device_request or set_peer_request; returns once the kernel took it."""
        self._request(NLM_F_ACK, request)
