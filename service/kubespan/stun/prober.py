"""Ask STUN reflectors where they see the WireGuard port, and what that says of the NAT.

One probe sends a binding request to every reflector at once and again at RETRANSMIT_AT
(UDP loses packets; RFC 8489 retransmits the same transaction), and reads answers until each
reflector has answered or the timeout passed (or MAX_READS datagrams were read: junk from anyone
is read and refused, never taken for an answer). Two reflectors at different IP addresses of one
family that report the same mapped endpoint show an endpoint-independent mapping (a peer can
reach us at that endpoint); different endpoints show an endpoint-dependent ("symmetric") one.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kubespan.netaddr import Endpoint, address_sort_key
from kubespan.rawudp import DatagramTransport, PayloadMatch, RawUdpPort
from kubespan.stun import codec

log = logging.getLogger(__name__)

# Seconds after the start of a probe at which unanswered reflectors are asked (again).
RETRANSMIT_AT = (0.0, 0.25, 0.75, 1.5)
DEFAULT_TIMEOUT = 2.0
MAX_REFLECTORS = 8
# Datagrams read in one probe at most, answers or not: a flood on the WireGuard port then
# costs a bounded amount of CPU per probe (reading and refusing one took about 14 us through
# RawUdpPort on a development host: some 60 ms). Junk ends a probe early only when this many
# come within a reflector's round trip (80 000 a second at 50 ms), about as fast as this
# thread can read them at all: past that the socket's queue overflows and the kernel drops
# the answer whatever we count.
MAX_READS = 4096
# STUN's magic cookie is bytes 4-7 of every message.
STUN_MATCH = PayloadMatch(offset=4, word=codec.MAGIC_COOKIE, max_payload=codec.MAX_MESSAGE_BYTES)


class Mapping(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ENDPOINT_DEPENDENT = "endpoint-dependent"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class ReflectorAnswer:
    reflector: Endpoint
    mapped: Endpoint | None  # None: no valid answer within the timeout


@dataclass(frozen=True)
class Reflexive:
    """What one probe learned: per reflector (in the order asked), the distinct mapped
    endpoints per family (sorted), and the mapping behaviour."""

    answers: tuple[ReflectorAnswer, ...]
    ipv4: tuple[Endpoint, ...]
    ipv6: tuple[Endpoint, ...]
    mapping: Mapping

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self.ipv4 + self.ipv6

    @classmethod
    def of(cls, answers: Sequence[ReflectorAnswer]) -> Reflexive:
        mapped = {a.mapped for a in answers if a.mapped is not None}
        ordered = sorted(mapped, key=lambda e: (address_sort_key(e.address), e.port))
        return cls(
            tuple(answers),
            tuple(e for e in ordered if e.address.version == 4),
            tuple(e for e in ordered if e.address.version == 6),
            classify(answers),
        )


def classify(answers: Sequence[ReflectorAnswer]) -> Mapping:
    """Dependent if any family shows two reflector addresses seeing different endpoints;
    independent if some family shows two reflector addresses seeing the same one; unknown
    otherwise (one reflector address per family tells nothing)."""
    verdicts: set[Mapping] = set()
    for version in (4, 6):
        seen = [
            (a.reflector.address, a.mapped)
            for a in answers
            if a.mapped is not None and a.reflector.address.version == version
        ]
        if len({address for address, _ in seen}) < 2:
            continue
        same = len({mapped for _, mapped in seen}) == 1
        verdicts.add(Mapping.ENDPOINT_INDEPENDENT if same else Mapping.ENDPOINT_DEPENDENT)
    if Mapping.ENDPOINT_DEPENDENT in verdicts:
        return Mapping.ENDPOINT_DEPENDENT
    if verdicts:
        return Mapping.ENDPOINT_INDEPENDENT
    return Mapping.UNKNOWN


def probe(
    listen_port: int,
    reflectors: Sequence[Endpoint],
    timeout: float = DEFAULT_TIMEOUT,
    random_bytes: Callable[[int], bytes] = os.urandom,
    monotonic: Callable[[], float] = time.monotonic,
    transport: DatagramTransport | None = None,
) -> Reflexive:
    """Probe `reflectors` (the first MAX_REFLECTORS distinct ones) from `listen_port`.
    OSError when the raw sockets cannot be opened (no CAP_NET_RAW)."""
    asked = list(dict.fromkeys(reflectors))[:MAX_REFLECTORS]
    if not asked:
        return Reflexive.of(())
    own = transport is None
    channel: DatagramTransport = (
        RawUdpPort(listen_port, STUN_MATCH) if transport is None else transport
    )
    try:
        mapped = _exchange(channel, asked, timeout, random_bytes, monotonic)
    finally:
        if own:
            channel.close()
    return Reflexive.of([ReflectorAnswer(r, mapped.get(r)) for r in asked])


def _exchange(
    channel: DatagramTransport,
    asked: list[Endpoint],
    timeout: float,
    random_bytes: Callable[[int], bytes],
    monotonic: Callable[[], float],
) -> dict[Endpoint, Endpoint]:
    transactions: dict[bytes, Endpoint] = {}
    for reflector in asked:
        transaction_id = random_bytes(codec.TRANSACTION_ID_BYTES)
        if len(transaction_id) != codec.TRANSACTION_ID_BYTES or transaction_id in transactions:
            raise ValueError("random_bytes gave an unusable transaction id")
        transactions[transaction_id] = reflector
    requests = {r: codec.binding_request(t) for t, r in transactions.items()}
    mapped: dict[Endpoint, Endpoint] = {}
    unreachable: set[Endpoint] = set()
    start = monotonic()
    deadline = start + timeout
    schedule = [start + at for at in RETRANSMIT_AT if at < timeout]
    reads = ignored = 0
    while True:
        now = monotonic()
        waiting = [r for r in asked if r not in mapped and r not in unreachable]
        if not waiting or now >= deadline:
            break
        if reads >= MAX_READS:
            log.warning(
                "stun probe stopped after reading %d datagrams, %d of them no new answer from "
                "a reflector asked: a flood on the WireGuard port? answered=%d/%d",
                reads,
                ignored,
                len(mapped),
                len(asked),
            )
            break
        while schedule and schedule[0] <= now:
            schedule.pop(0)
            for reflector in waiting:
                try:
                    channel.send(reflector, requests[reflector])
                except OSError as error:
                    log.debug("stun request not sent reflector=%s error=%s", reflector, error)
                    unreachable.add(reflector)
        until = min(deadline, schedule[0]) if schedule else deadline
        received = channel.receive(max(0.0, until - monotonic()))
        if received is None:
            continue
        reads += 1
        source, payload = received
        if not _answer(source, payload, transactions, mapped):
            ignored += 1
    if ignored:
        log.debug("stun probe ignored %d datagrams that were no new answer", ignored)
    return mapped


def _answer(
    source: Endpoint,
    payload: bytes,
    transactions: dict[bytes, Endpoint],
    mapped: dict[Endpoint, Endpoint],
) -> bool:
    """Whether `payload` is a reflector's first valid answer (then recorded in `mapped`).
    Anyone can send to the WireGuard port, with a reflector's address as source too: only
    the transaction id, which that reflector alone was told, makes an answer."""
    if source in mapped or source not in transactions.values():
        return False  # not parsed: junk from elsewhere costs no more than its read
    try:
        answer = codec.parse_binding_response(payload)
    except codec.StunError:
        return False
    if transactions.get(answer.transaction_id) != source:
        return False
    mapped[source] = answer.mapped
    return True
