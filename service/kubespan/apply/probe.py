"""Liveness probes through the tunnel: one ICMPv6 echo request to a peer's ULA.

A probe is data inside WireGuard, so the peer's kernel answers it (its receive counter and
ours tell the planner the path works), and when there is no session it makes WireGuard start
a handshake. Answers are not read: the socket filters every ICMPv6 type out, so nothing
queues up on it. Only the kubespan link is used (SO_BINDTODEVICE): a probe can never leave
on the underlay in the clear, whatever the routes say.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Sequence

from kubespan.names import LINK_NAME

log = logging.getLogger(__name__)

ICMP6_FILTER = 1
ICMP6_ECHO_REQUEST = 128
PAYLOAD = b"kubespan liveness probe"
BLOCK_ALL = b"\xff" * 32  # struct icmp6_filter: a set bit blocks that type


class TunnelProber:
    def __init__(self, link: str = LINK_NAME) -> None:
        self._link = link
        self._socket: socket.socket | None = None
        self._identifier = int.from_bytes(os.urandom(2), "big")
        self._sequence = 0
        self._failures = 0
        # Each target's text, made once: a peer is probed at every round, and formatting an
        # IPv6 address was half of sending its probe. Found by the address object's identity
        # (the members' records hand out the same objects pass after pass; hashing an
        # IPv6Address formats it in Python): its id, and the object itself, which is held
        # so that the id stays its own.
        self._destinations: dict[int, tuple[ipaddress.IPv6Address, tuple[str, int]]] = {}

    def _open(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            try:
                sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, BLOCK_ALL)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self._link.encode())
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def send(self, targets: Sequence[ipaddress.IPv6Address]) -> int:
        """Send one probe to each target; returns how many went out. Never raises: a probe
        that cannot be sent only leaves the peer to WireGuard's own timers."""
        sent = 0
        destinations = self._destinations
        if len(destinations) > 2 * len(targets) + 64:
            destinations.clear()  # peers gone: start over rather than grow
        # One packet for the round: answers are not read, so nothing tells the probes of a
        # round apart (each peer gets one). The kernel fills in the checksum of raw ICMPv6
        # sockets.
        self._sequence = (self._sequence + 1) & 0xFFFF
        packet = (
            struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, self._identifier, self._sequence)
            + PAYLOAD
        )
        sendto = None  # the socket's, looked up once per round (again after a failure)
        for target in targets:
            known = destinations.get(id(target))
            if known is None or known[0] is not target:
                known = destinations[id(target)] = (target, (str(target), 0))
            try:
                if sendto is None:
                    sendto = self._open().sendto
                sendto(packet, known[1])
                sent += 1
            except OSError as error:
                sendto = None  # _failed may have closed the socket
                self._failed(target, error)
        return sent

    def _failed(self, target: ipaddress.IPv6Address, error: OSError) -> None:
        self._failures += 1
        if error.errno in (errno.ENODEV, errno.EBADF, errno.ENOTCONN):
            self.close()  # the link was recreated: bind again next time
        if self._failures == 1 or self._failures % 1000 == 0:
            log.warning(
                "liveness probe to %s not sent (%d so far): %s", target, self._failures, error
            )

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
