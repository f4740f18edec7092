"""Binding one side of a pair at a relay: small authenticated datagrams from the side's
WireGuard port to its relay port (relay.ports), and the relay's answer from that port.

A side that wants the relay sends BIND every few seconds; the relay answers BOUND, with the
mapping it saw the bind come from, or REFUSED with a reason. The relay forwards a pair once
both sides are bound (relay.bindings) and stops when either side's binding lapses. Binds are
not WireGuard-shaped, so the relay's forwarding rules never carry them: they always reach
the relay itself, from the very mapping the side's WireGuard packets use.

Layout (126 bytes; answers exactly as long as binds, so a bind reflects no more than it
costs):

    tag "KSrb" (4) | kind (1) | version (1) | reason (REFUSED) or flags (BOUND: 1, the
    other side is bound too, so the pair is forwarded; BIND: 1, leaving: the side gives its
    binding up, and wants no answer) (1) | attempt (1) | sender's WireGuard
    public key (32) | the pair's other side's key (32) | sender's clock, ms since the epoch (8)
    | transaction id (12) | observed mapping (16 address, IPv4 mapped, + 2 port; zero in a
    bind) | MAC (16)

The MAC is keyed BLAKE2b under a key only the side and the relay can compute
(pathcheck.codec.pair_key with the cluster's relay-bind key): an outsider cannot bind, and no
member can bind another member's side. In an answer the sender is the relay and the other
key is the side's peer, echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from enum import IntEnum

from kubespan.netaddr import Endpoint, endpoint_bytes, endpoint_from_bytes

TAG = 0x4B537262  # "KSrb"
VERSION = 1
KEY_BYTES = 32
TRANSACTION_ID_BYTES = 12
MAC_BYTES = 16
_BODY = struct.Struct("!IBBBB32s32sQ12s16sH")
MESSAGE_BYTES = _BODY.size + MAC_BYTES
PAIRED = 1  # BOUND's flags (the reason byte): the other side of the pair is bound too
LEAVING = 1  # BIND's flags: the side gives its binding up (relays before it ignore this)


class Kind(IntEnum):
    BIND = 1
    BOUND = 2
    REFUSED = 3


class Refusal(IntEnum):
    """Why a relay refused a bind (0 in binds and in BOUND)."""

    # Not sent any more: a bind where the relay does not relay gets no answer (a refusal
    # would reflect copies of it). Kept so that older relays' answers still read.
    NOT_A_RELAY = 1
    UNKNOWN_PEER = 2  # the other side is not a member the relay knows
    STALE = 3  # the bind's clock is too far from the relay's
    WRONG_PORT = 4  # not the port relay.ports gives this pair and attempt
    PORT_TAKEN = 5  # another pair holds the port: bind again with the next attempt
    FULL = 6  # the relay carries as many pairs as it will, or this side holds its quota
    PEER_AT_ATTEMPT = 7  # the other side is bound with the attempt in this answer: use it
    REPLAYED = 8  # not newer than the side's last bind (never sent: it would reflect it)


class BindError(ValueError):
    """A datagram that is not a well-formed bind message."""


@dataclass(frozen=True)
class BindMessage:
    kind: Kind
    sender: bytes  # a WireGuard public key
    peer: bytes  # the pair's other side
    attempt: int
    time_ms: int
    transaction_id: bytes
    reason: Refusal | None = None  # REFUSED only
    observed: Endpoint | None = None  # BOUND only: where the bind came from
    paired: bool = False  # BOUND only: the other side is bound too (the pair is forwarded)
    leaving: bool = False  # BIND only: the side gives its binding up


def encode(message: BindMessage, key: bytes) -> bytes:
    if len(message.sender) != KEY_BYTES or len(message.peer) != KEY_BYTES:
        raise ValueError("a bind names two 32-byte WireGuard keys")
    if len(message.transaction_id) != TRANSACTION_ID_BYTES:
        raise ValueError(f"a bind's transaction id is {TRANSACTION_ID_BYTES} bytes")
    if not 0 <= message.attempt <= 255:
        raise ValueError("a bind's attempt is 0 to 255")
    packed, port = endpoint_bytes(message.observed)
    if message.kind == Kind.BOUND:
        reason_byte = PAIRED if message.paired else 0
    elif message.kind == Kind.BIND:
        reason_byte = LEAVING if message.leaving else 0
    else:
        reason_byte = message.reason or 0
    body = _BODY.pack(
        TAG,
        message.kind,
        VERSION,
        reason_byte,
        message.attempt,
        message.sender,
        message.peer,
        message.time_ms,
        message.transaction_id,
        packed,
        port,
    )
    return body + _mac(key, body)


def parse(payload: bytes) -> BindMessage:
    """The fields of a bind message, unauthenticated: check `authentic` before believing any."""
    if len(payload) != MESSAGE_BYTES:
        raise BindError(f"a bind message is {MESSAGE_BYTES} bytes, not {len(payload)}")
    (tag, kind, version, reason, attempt, sender, peer, time_ms, transaction_id, packed, port) = (
        _BODY.unpack_from(payload)
    )
    if tag != TAG or version != VERSION:
        raise BindError("not a bind message of this version")
    if kind not in Kind.__members__.values():
        raise BindError(f"unknown bind message kind {kind}")
    refusal = None
    if kind == Kind.REFUSED:
        if reason not in Refusal.__members__.values():
            raise BindError(f"unknown refusal reason {reason}")
        refusal = Refusal(reason)
    elif kind == Kind.BOUND:
        if reason not in (0, PAIRED):
            raise BindError(f"unknown BOUND flags {reason}")
    elif reason not in (0, LEAVING):
        raise BindError(f"unknown BIND flags {reason}")
    observed = endpoint_from_bytes(packed, port)
    if kind == Kind.BOUND and observed is None:
        raise BindError("BOUND without the observed mapping")
    if kind != Kind.BOUND and (any(packed) or port):
        raise BindError("only BOUND carries an observed mapping")
    return BindMessage(
        Kind(kind),
        sender,
        peer,
        attempt,
        time_ms,
        transaction_id,
        refusal,
        observed,
        paired=kind == Kind.BOUND and reason == PAIRED,
        leaving=kind == Kind.BIND and reason == LEAVING,
    )


def authentic(payload: bytes, key: bytes) -> bool:
    body, mac = payload[:-MAC_BYTES], payload[-MAC_BYTES:]
    return len(payload) == MESSAGE_BYTES and hmac.compare_digest(_mac(key, body), mac)


def _mac(key: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=key, digest_size=MAC_BYTES).digest()
