"""Datagrams from and to the WireGuard port while the kernel owns it: raw sockets (needs
CAP_NET_RAW). STUN (stun/prober.py) and path checks (pathcheck/) use it.

Sending: a raw UDP socket to which we hand the UDP header ourselves, source port = the
WireGuard listen port, checksum computed here over the source address the kernel's routing
would choose (the socket is bound to it, so that is the address it uses). `SO_MARK` is
WireGuard's own mark: our nftables rules and policy routing treat these packets as the kernel
WireGuard socket's, never as traffic for the tunnel.

Receiving: a raw UDP socket sees a copy of every UDP packet the host receives, so a classic
BPF filter keeps only those for the listen port whose payload carries the user's 32-bit
magic word at a fixed offset (STUN's cookie, the path check's tag): the thread is not woken by
WireGuard's own traffic. The kernel's WireGuard socket still gets every packet as before (it
drops ours as garbage: none starts with a WireGuard message type).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Protocol

from kubespan.names import MARK_WIREGUARD
from kubespan.netaddr import Endpoint, IPAddress

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26
UDP_HEADER_BYTES = 8
IP_HEADER_MAX_BYTES = 60  # IPv4 with options; an IPv6 raw socket gives no IP header
READ_BYTES = 2048
MAX_SENDERS = 16  # sending sockets, one per source address in use
READS_PER_WAKE = 64
# Datagrams drained from one socket before the queue is called empty after attaching the
# filter (packets queued before it was attached went through unfiltered).
DRAIN_LIMIT = 4096


@dataclass(frozen=True)
class Datagram:
    source: Endpoint
    payload: bytes
    destination: IPAddress | None  # the address it was sent to (one of ours); None: unknown
    port: int | None = None  # the port it was sent to, when the transport listens on several


class AddressedTransport(Protocol):
    """A transport that tells which of our addresses a datagram came to, and sends from
    one chosen address."""

    def send(
        self,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None = None,
        source_port: int | None = None,
    ) -> None: ...

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PayloadMatch:
    """Which datagrams to the port are ours: the 32-bit word at `offset` of the payload is
    `word`. Longer payloads than `max_payload` are cut (and then refused by their codec)."""

    offset: int
    word: int
    max_payload: int

    @property
    def capture_bytes(self) -> int:
        return IP_HEADER_MAX_BYTES + UDP_HEADER_BYTES + self.max_payload + 4


class DatagramTransport(Protocol):
    """Send a payload to an endpoint, read one that matched."""

    def send(self, destination: Endpoint, payload: bytes) -> None: ...

    def receive(
        self, timeout: float, wake: socket.socket | None = None
    ) -> tuple[Endpoint, bytes] | None:
        """One payload and who sent it, or None when `timeout` passed first or `wake`
        became readable (its caller drains it)."""
        ...

    def close(self) -> None: ...


# Classic BPF opcodes (linux/filter.h).
_LD_H_ABS, _LD_H_IND, _LD_W_IND, _LD_W_ABS = 0x28, 0x48, 0x40, 0x20
_LDX_B_MSH, _JEQ_K, _JSET_K, _RET_K = 0xB1, 0x15, 0x45, 0x06
_JGE_K, _JGT_K = 0x35, 0x25

Instruction = tuple[int, int, int, int]
_DROP = -1  # a jump to the program's last instruction, which drops


def payload_filter(
    family: socket.AddressFamily, port: int, match: PayloadMatch, count: int = 1
) -> list[Instruction]:
    """Accept UDP to `port` (or to the `count` ports from `port` on) whose payload carries
    `match`. An IPv4 raw socket's filter sees the IP header first (and only first fragments
    carry the UDP header); an IPv6 raw socket's sees the UDP header at offset 0."""
    word_at = UDP_HEADER_BYTES + match.offset
    if count == 1:
        to_port = [(_JEQ_K, 0, _DROP, port)]
    else:
        to_port = [(_JGE_K, 0, _DROP, port), (_JGT_K, _DROP, 0, port + count - 1)]
    if family == socket.AF_INET:
        head = [
            (_LD_H_ABS, 0, 0, 6),  # flags and fragment offset
            (_JSET_K, _DROP, 0, 0x1FFF),  # a later fragment: drop
            (_LDX_B_MSH, 0, 0, 0),  # x = IP header length
            (_LD_H_IND, 0, 0, 2),  # UDP destination port
            *to_port,
            (_LD_W_IND, 0, 0, word_at),
        ]
    else:
        head = [(_LD_H_ABS, 0, 0, 2), *to_port, (_LD_W_ABS, 0, 0, word_at)]
    return _resolve(
        [
            *head,
            (_JEQ_K, 0, _DROP, match.word),
            (_RET_K, 0, 0, match.capture_bytes),
            (_RET_K, 0, 0, 0),
        ]
    )


def _resolve(program: list[Instruction]) -> list[Instruction]:
    """Jumps to _DROP made relative: classic BPF jumps count the instructions skipped."""
    last = len(program) - 1

    def offset(index: int, jump: int) -> int:
        return last - index - 1 if jump == _DROP else jump

    return [
        (code, offset(index, jump_true), offset(index, jump_false), k)
        for index, (code, jump_true, jump_false, k) in enumerate(program)
    ]


DROP_ALL: list[Instruction] = [(_RET_K, 0, 0, 0)]


def attach_filter(sock: socket.socket, program: Sequence[Instruction]) -> None:
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def udp_checksum(source: IPAddress, destination: IPAddress, segment: bytes) -> int:
    """The UDP checksum over the pseudo header and `segment` (header with a zero checksum,
    and payload); 0 is sent as 0xffff (0 means "none" in IPv4 and is invalid in IPv6)."""
    if source.version == 4:
        pseudo = source.packed + destination.packed + struct.pack("!BBH", 0, 17, len(segment))
    else:
        pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(segment), 17)
    data = pseudo + segment + b"\0" * (len(segment) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF) or 0xFFFF


def udp_segment(
    source: IPAddress, destination: Endpoint, source_port: int, payload: bytes
) -> bytes:
    length = UDP_HEADER_BYTES + len(payload)
    header = struct.pack("!HHHH", source_port, destination.port, length, 0)
    checksum = udp_checksum(source, destination.address, header + payload)
    return header[:6] + struct.pack("!H", checksum) + payload


def parse_ipv4_udp(packet: bytes, port: int) -> tuple[IPAddress, int, bytes] | None:
    """Source address, source port and payload of an IPv4 UDP packet to `port`; None for
    anything else or anything truncated."""
    parsed = parse_ipv4_udp_to(packet, port, 1)
    return None if parsed is None else parsed[:3]


def parse_ipv4_udp_to(
    packet: bytes, port: int, count: int
) -> tuple[IPAddress, int, bytes, int] | None:
    """Like parse_ipv4_udp, for any of the `count` ports from `port`, and which one."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
        return None
    header_bytes = (packet[0] & 0x0F) * 4
    if header_bytes < 20 or len(packet) < header_bytes + UDP_HEADER_BYTES:
        return None
    return _udp_payload(
        packet[header_bytes:], port, count, socket.inet_ntop(socket.AF_INET, packet[12:16])
    )


def ipv4_destination(packet: bytes) -> IPAddress | None:
    return ip_address(packet[16:20]) if len(packet) >= 20 else None


_PKTINFO = struct.Struct("16sI")  # struct in6_pktinfo: address, interface index
PKTINFO_SPACE = socket.CMSG_SPACE(_PKTINFO.size)


def ipv6_destination(ancillary: list[tuple[int, int, bytes]]) -> IPAddress | None:
    for level, kind, data in ancillary:
        pktinfo = level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO
        if pktinfo and len(data) >= _PKTINFO.size:
            return ip_address(data[:16])
    return None


def _udp_payload(
    segment: bytes, port: int, count: int, source: str
) -> tuple[IPAddress, int, bytes, int] | None:
    if len(segment) < UDP_HEADER_BYTES:
        return None
    source_port, destination_port, length = struct.unpack_from("!HHH", segment)
    if not port <= destination_port < port + count:
        return None
    if not UDP_HEADER_BYTES <= length <= len(segment):
        return None
    return ip_address(source), source_port, segment[UDP_HEADER_BYTES:length], destination_port


class RawUdpPort:
    """Payloads from `listen_port`, and those to it that `match`, over raw sockets. Sockets
    are opened per family on first use (a host without IPv6 sends IPv4 only), or by
    `listen` for a program that answers. With `count`, the `count` ports from `listen_port`
    on (a relay's ports): datagrams say which one they came to, and answers choose theirs."""

    def __init__(
        self, listen_port: int, match: PayloadMatch, mark: int = MARK_WIREGUARD, count: int = 1
    ) -> None:
        if count < 1 or not 1 <= listen_port <= 65536 - count:
            raise ValueError(f"listen ports {listen_port}+{count} are not all within 1 to 65535")
        self.listen_port = listen_port
        self.count = count
        self.match = match
        self.mark = mark
        self._receivers: dict[int, socket.socket] = {}
        self._senders: dict[IPAddress, socket.socket] = {}

    def __enter__(self) -> RawUdpPort:
        return self

    def listen(self) -> list[str]:
        """Open the receivers of both families now; the errors of those that failed (a host
        without IPv6 has only IPv4)."""
        errors = []
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                self._receiver(family)
            except OSError as error:
                errors.append(f"{family.name}: {error}")
        return errors

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in (*self._receivers.values(), *self._senders.values()):
            sock.close()
        self._receivers.clear()
        self._senders.clear()

    def send(
        self,
        destination: Endpoint,
        payload: bytes,
        source: IPAddress | None = None,
        source_port: int | None = None,
    ) -> None:
        """Send from `source` (one of ours: an answer goes out from the address its request
        came to, as WireGuard's own do), or from the address routing picks; from
        `source_port`, one of ours, or the listen port."""
        port = self.listen_port if source_port is None else source_port
        if not self.listen_port <= port < self.listen_port + self.count:
            raise ValueError(f"port {port} is not one this transport listens on")
        family = socket.AF_INET if destination.address.version == 4 else socket.AF_INET6
        self._receiver(family)  # before sending: the answer may come at once
        if source is None or source.version != destination.address.version:
            source = self._source_for(family, destination)
        sender = self._senders.get(source)
        if sender is None:
            if len(self._senders) >= MAX_SENDERS:
                # Addresses come and go (roaming): old senders are not kept forever.
                for stale in self._senders.values():
                    stale.close()
                self._senders.clear()
            sender = self._open(family)
            attach_filter(sender, DROP_ALL)  # it only sends; keep its queue empty
            try:
                sender.bind((str(source), 0))
            except OSError:
                sender.close()
                raise
            self._senders[source] = sender
        segment = udp_segment(source, destination, port, payload)
        # The port of a raw socket's destination is the protocol number (ignored) on Linux.
        sender.sendto(segment, (str(destination.address), 0))

    def receive(
        self, timeout: float, wake: socket.socket | None = None
    ) -> tuple[Endpoint, bytes] | None:
        datagram = self.receive_datagram(timeout, wake)
        return None if datagram is None else (datagram.source, datagram.payload)

    def receive_datagram(
        self, timeout: float, wake: socket.socket | None = None
    ) -> Datagram | None:
        """Like `receive`, with the address the datagram was sent to."""
        watched = list(self._receivers.values())
        if wake is not None:
            watched.append(wake)
        if not watched:
            return None
        readable, _, _ = select.select(watched, [], [], max(0.0, timeout))
        for sock in readable:
            if sock is wake:
                continue
            # Past datagrams the filter let through but that do not parse, to a valid one:
            # a stream of malformed ones must not cost the caller a whole turn each.
            for _ in range(READS_PER_WAKE):
                try:
                    datagram = self._read(sock)
                except BlockingIOError:
                    break
                if datagram is not None:
                    return datagram
        return None

    def _read(self, sock: socket.socket) -> Datagram | None:
        """One datagram; None for one that does not parse; BlockingIOError when none."""
        packet, ancillary, _flags, sender = sock.recvmsg(READ_BYTES, PKTINFO_SPACE)
        destination: IPAddress | None
        if sock.family == socket.AF_INET:
            parsed = parse_ipv4_udp_to(packet, self.listen_port, self.count)
            destination = ipv4_destination(packet)
        else:
            # An IPv6 raw socket returns no IP header: the packet starts at the UDP header,
            # and the destination comes as ancillary data.
            source = str(sender[0]).partition("%")[0]
            parsed = _udp_payload(packet, self.listen_port, self.count, source)
            destination = ipv6_destination(ancillary)
        if parsed is None or parsed[1] == 0:
            return None
        address, port, payload, to_port = parsed
        return Datagram(Endpoint(address, port), payload, destination, to_port)

    def _open(self, family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        except OSError:
            sock.close()
            raise
        return sock

    def _receiver(self, family: socket.AddressFamily) -> socket.socket:
        sock = self._receivers.get(family)
        if sock is not None:
            return sock
        sock = self._open(family)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            program = payload_filter(family, self.listen_port, self.match, self.count)
            attach_filter(sock, program)
            sock.setblocking(False)
            # Packets queued between socket() and the filter were not filtered.
            for _ in range(DRAIN_LIMIT):
                sock.recv(READ_BYTES)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            raise
        self._receivers[family] = sock
        return sock

    def _source_for(self, family: socket.AddressFamily, destination: Endpoint) -> IPAddress:
        """The source address routing picks for the destination, with our mark (connecting a
        UDP socket sends nothing)."""
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            try:
                probe.connect((str(destination.address), destination.port))
            except OSError as error:
                if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    raise OSError(error.errno, f"no route to {destination}") from None
                raise
            return ip_address(probe.getsockname()[0].partition("%")[0])
