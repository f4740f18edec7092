"""STUN from the WireGuard port while the kernel owns it: raw sockets (needs CAP_NET_RAW).

Sending: a raw UDP socket to which we hand the UDP header ourselves, source port = the
WireGuard listen port, checksum computed here over the source address the kernel's routing
would choose (the socket is bound to it, so that is the address it uses). `SO_MARK` is
WireGuard's own mark: our nftables rules and policy routing treat these packets as the kernel
WireGuard socket's, never as traffic for the tunnel.

Receiving: a raw UDP socket sees a copy of every UDP packet the host receives, so a classic
BPF filter keeps only those for the listen port whose payload starts with a STUN header
(the magic cookie): the thread is not woken by WireGuard's own traffic. The kernel's
WireGuard socket still gets every packet as before (it drops STUN answers as garbage).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import select
import socket
import struct
from collections.abc import Sequence
from ipaddress import ip_address
from typing import Protocol

from kubespan.names import MARK_WIREGUARD
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.stun import codec

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = 26
UDP_HEADER_BYTES = 8
# Bytes of a packet the filter lets through: an IPv4 header with options and the largest
# STUN message we parse. Anything longer is cut here and then refused by the codec.
CAPTURE_BYTES = 60 + UDP_HEADER_BYTES + codec.MAX_MESSAGE_BYTES + 4
READ_BYTES = 2048
# Datagrams drained from one socket before the queue is called empty after attaching the
# filter (packets queued before it was attached went through unfiltered).
DRAIN_LIMIT = 4096


class StunTransport(Protocol):
    """What the prober needs: send a request to a reflector, read an answer."""

    def send(self, reflector: Endpoint, payload: bytes) -> None: ...

    def receive(self, timeout: float) -> tuple[Endpoint, bytes] | None:
        """One STUN payload and who sent it, or None when `timeout` passed first."""
        ...

    def close(self) -> None: ...


# Classic BPF opcodes (linux/filter.h).
_LD_H_ABS, _LD_H_IND, _LD_W_IND, _LD_W_ABS = 0x28, 0x48, 0x40, 0x20
_LDX_B_MSH, _JEQ_K, _JSET_K, _RET_K = 0xB1, 0x15, 0x45, 0x06

Instruction = tuple[int, int, int, int]


def stun_filter(family: socket.AddressFamily, port: int) -> list[Instruction]:
    """Accept UDP to `port` whose payload carries the magic cookie at bytes 4-7. An IPv4 raw
    socket's filter sees the IP header first (and only first fragments carry the UDP
    header); an IPv6 raw socket's sees the UDP header at offset 0."""
    if family == socket.AF_INET:
        return [
            (_LD_H_ABS, 0, 0, 6),  # flags and fragment offset
            (_JSET_K, 5, 0, 0x1FFF),  # a later fragment: drop
            (_LDX_B_MSH, 0, 0, 0),  # x = IP header length
            (_LD_H_IND, 0, 0, 2),  # UDP destination port
            (_JEQ_K, 0, 3, port),
            (_LD_W_IND, 0, 0, UDP_HEADER_BYTES + 4),  # the STUN magic cookie
            (_JEQ_K, 0, 1, codec.MAGIC_COOKIE),
            (_RET_K, 0, 0, CAPTURE_BYTES),
            (_RET_K, 0, 0, 0),
        ]
    return [
        (_LD_H_ABS, 0, 0, 2),
        (_JEQ_K, 0, 3, port),
        (_LD_W_ABS, 0, 0, UDP_HEADER_BYTES + 4),
        (_JEQ_K, 0, 1, codec.MAGIC_COOKIE),
        (_RET_K, 0, 0, CAPTURE_BYTES),
        (_RET_K, 0, 0, 0),
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
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != socket.IPPROTO_UDP:
        return None
    header_bytes = (packet[0] & 0x0F) * 4
    if header_bytes < 20 or len(packet) < header_bytes + UDP_HEADER_BYTES:
        return None
    return _udp_payload(
        packet[header_bytes:], port, socket.inet_ntop(socket.AF_INET, packet[12:16])
    )


def _udp_payload(segment: bytes, port: int, source: str) -> tuple[IPAddress, int, bytes] | None:
    if len(segment) < UDP_HEADER_BYTES:
        return None
    source_port, destination_port, length = struct.unpack_from("!HHH", segment)
    if destination_port != port or not UDP_HEADER_BYTES <= length <= len(segment):
        return None
    return ip_address(source), source_port, segment[UDP_HEADER_BYTES:length]


class RawStunSocket:
    """STUN requests from `listen_port` and their answers, over raw sockets. Sockets are
    opened per family on first use (a host without IPv6 probes IPv4 only)."""

    def __init__(self, listen_port: int, mark: int = MARK_WIREGUARD) -> None:
        if not 1 <= listen_port <= 65535:
            raise ValueError(f"listen port {listen_port} is not 1 to 65535")
        self.listen_port = listen_port
        self.mark = mark
        self._receivers: dict[int, socket.socket] = {}
        self._senders: dict[IPAddress, socket.socket] = {}

    def __enter__(self) -> RawStunSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock in (*self._receivers.values(), *self._senders.values()):
            sock.close()
        self._receivers.clear()
        self._senders.clear()

    def send(self, reflector: Endpoint, payload: bytes) -> None:
        family = socket.AF_INET if reflector.address.version == 4 else socket.AF_INET6
        self._receiver(family)  # before sending: the answer may come at once
        source = self._source_for(family, reflector)
        sender = self._senders.get(source)
        if sender is None:
            sender = self._open(family)
            attach_filter(sender, DROP_ALL)  # it only sends; keep its queue empty
            try:
                sender.bind((str(source), 0))
            except OSError:
                sender.close()
                raise
            self._senders[source] = sender
        segment = udp_segment(source, reflector, self.listen_port, payload)
        # The port of a raw socket's destination is the protocol number (ignored) on Linux.
        sender.sendto(segment, (str(reflector.address), 0))

    def receive(self, timeout: float) -> tuple[Endpoint, bytes] | None:
        if not self._receivers:
            return None
        readable, _, _ = select.select(list(self._receivers.values()), [], [], max(0.0, timeout))
        for sock in readable:
            answer = self._read(sock)
            if answer is not None:
                return answer
        return None

    def _read(self, sock: socket.socket) -> tuple[Endpoint, bytes] | None:
        try:
            packet, sender = sock.recvfrom(READ_BYTES)
        except BlockingIOError:
            return None
        if sock.family == socket.AF_INET:
            parsed = parse_ipv4_udp(packet, self.listen_port)
        else:
            # An IPv6 raw socket returns no IP header: the packet starts at the UDP header.
            parsed = _udp_payload(packet, self.listen_port, str(sender[0]).partition("%")[0])
        if parsed is None or parsed[1] == 0:
            return None
        address, port, payload = parsed
        return Endpoint(address, port), payload

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
            attach_filter(sock, stun_filter(family, self.listen_port))
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

    def _source_for(self, family: socket.AddressFamily, reflector: Endpoint) -> IPAddress:
        """The source address routing picks for the reflector, with our mark (connecting a
        UDP socket sends nothing)."""
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            try:
                probe.connect((str(reflector.address), reflector.port))
            except OSError as error:
                if error.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    raise OSError(error.errno, f"no route to {reflector}") from None
                raise
            return ip_address(probe.getsockname()[0].partition("%")[0])
