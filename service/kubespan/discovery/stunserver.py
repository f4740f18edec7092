"""The discovery service's STUN reflector (RFC 8489 binding only), on UDP.

Anyone can send it a datagram with a forged source address, so it must never be worth
reflecting off: it answers only a well-formed binding request, at most once per request,
with an answer no larger than the request (our prober pads its requests to the size of the
largest answer; an unpadded 20-byte request gets nothing), and at most STUN_RATE_PER_SOURCE
answers per second to one source (an IPv4 address or IPv6 /64). Everything else is counted
and dropped.

Answers leave from the address the request came to (IP_PKTINFO), so a wildcard listener on a
host with several addresses answers from the one the client asked: a NAT would drop an
answer from another address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubespan.discovery import limits
from kubespan.discovery.forwarded import source_key
from kubespan.discovery.metrics import StunCounters
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.netaddr import Endpoint
from kubespan.stun import codec

log = logging.getLogger(__name__)

IP_PKTINFO = 8  # linux/in.h (the socket module has no name for it before Python 3.12)
_ANCILLARY_BYTES = socket.CMSG_SPACE(32)


@dataclass(frozen=True)
class StunAdvert:
    """A reflector named in `hello`: at `address`, or (None) at the address the client
    reached the service at."""

    address: str | None
    port: int

    def as_json(self) -> dict[str, object]:
        if self.address is None:
            return {"port": self.port}
        return {"address": self.address, "port": self.port}


class StunResponder:
    """The decision, without sockets: the answer to one datagram, or None."""

    def __init__(
        self,
        counters: StunCounters,
        rate: float = limits.STUN_RATE_PER_SOURCE,
        burst: float = limits.STUN_BURST_PER_SOURCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counters = counters
        self.limiter = RateLimiter(rate, burst)
        # All sources together: spoofed floods from many addresses answer no faster.
        self.overall = RateLimiter(limits.STUN_RATE_OVERALL, limits.STUN_RATE_OVERALL)
        self.clock = clock

    def answer(self, data: bytes, source: Endpoint) -> bytes | None:
        self.counters.requests += 1
        try:
            transaction_id = codec.parse_binding_request(data)
        except codec.StunError:
            self.refuse("malformed")
            return None
        response = codec.binding_response(transaction_id, source)
        if len(response) > len(data):
            self.refuse("too_small")  # answering would amplify
            return None
        now = self.clock()
        if not self.limiter.allow(source_key(str(source.address)), now) or not (
            self.overall.allow("all", now)
        ):
            self.refuse("rate")
            return None
        self.counters.answered += 1
        return response

    def refuse(self, reason: str) -> None:
        self.counters.refused[reason] += 1


def bind_udp(host: str, port: int) -> socket.socket:
    """A UDP socket for the reflector; `[::]` serves IPv4 too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            # Also given for IPv4 packets on a dual-stack socket, as a mapped address.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class StunListener:
    """Reads a UDP socket from the event loop, a bounded number of datagrams per wake-up
    (the HTTP side keeps its turn under a flood)."""

    BATCH = 64

    def __init__(self, sock: socket.socket, responder: StunResponder) -> None:
        self.sock = sock
        self.responder = responder
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None

    def _readable(self) -> None:
        for _ in range(self.BATCH):
            try:
                data, ancillary, flags, peer = self.sock.recvmsg(
                    codec.MAX_MESSAGE_BYTES + 1, _ANCILLARY_BYTES
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. an ICMP error queued for an earlier answer
                log.debug("stun receive error=%s", error)
                continue
            try:
                self._one(data, ancillary, flags, peer)
            except Exception:  # one datagram never stops the reflector
                log.exception("stun datagram failed peer=%s", peer)
                self.responder.counters.refused["error"] += 1

    def _one(
        self,
        data: bytes,
        ancillary: list[tuple[int, int, bytes]],
        flags: int,
        peer: tuple[object, ...],
    ) -> None:
        source = _endpoint(peer)
        if source is None or flags & socket.MSG_TRUNC:
            self.responder.counters.requests += 1
            self.responder.refuse("malformed")
            return
        answer = self.responder.answer(data, source)
        if answer is None:
            return
        reply_from = _reply_ancillary(ancillary)
        try:
            self.sock.sendmsg([answer], reply_from, 0, peer)
        except OSError as error:
            log.debug("stun answer not sent peer=%s error=%s", source, error)


def _endpoint(peer: tuple[object, ...]) -> Endpoint | None:
    host, port = peer[0], peer[1]
    if not isinstance(host, str) or not isinstance(port, int) or port == 0:
        return None
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Endpoint(address, port)


def _reply_ancillary(ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes the answer leave from the request's destination address."""
    for level, kind, value in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
            destination = value[8:12]  # struct in_pktinfo: ifindex, spec_dst, addr
            return [(level, kind, struct.pack("i4s4s", 0, destination, b"\0" * 4))]
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(value) >= 20:
            return [(level, kind, value[:20])]  # address and interface
    return []
