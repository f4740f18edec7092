"""The relay's own thread: reads bind messages on the relay ports (raw sockets, so nothing
has to hold a thousand ports), answers them, and keeps the forwarding table equal to the
pairs whose two sides are bound (relay.bindings), dropping pairs as their bindings lapse.

Only members are answered: a bind whose sender is not a member costs one dictionary lookup
and gets nothing (no X25519 for strangers), one that is not authentic gets nothing either.
Every answer goes where the bind claims to come from, so a bind copied once must not buy
answers: one to an address the relay does not relay on gets nothing, a bind is answered
once at most (a replay, of an answered bind or of one older than its side's binding, gets
nothing), one outside the clock window is told so once a minute per side at most, and
answers are rate-limited per source (an IPv4 address or an IPv6 /64) and side, per side,
and overall, in that order, so no side's binds, its own or copies, use up what the others
are owed. A datagram recomputes the forwarded pairs only if it changed a binding; otherwise
they are looked at again when the first binding lapses. An answer that cannot be sent is
that answer's loss alone. Bindings made at an address the node has lost (renumbered: the
agent says its addresses) lapse at once. The thread never dies of an exception: it logs,
backs off and opens its sockets again."""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from kubespan.discovery.forwarded import source_key
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck.codec import pair_key
from kubespan.rawthread import RawPortThread, open_raw_port, take_waiting
from kubespan.rawudp import AddressedTransport, Datagram, PayloadMatch
from kubespan.relay import bind
from kubespan.relay.bindings import (
    CLOCK_SKEW_MS,
    RelayPolicy,
    SideBinding,
    forwarded,
    lapsed_at,
    next_change,
    remembered,
    take_bind,
)
from kubespan.relay.forward import RelayedPair, RelaySpec
from kubespan.relay.kernel import RelayForwarder, enable_ipv4_forwarding
from kubespan.relay.ports import PortRange

log = logging.getLogger(__name__)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

BIND_MATCH = PayloadMatch(offset=0, word=bind.TAG, max_payload=bind.MESSAGE_BYTES)
TURN_SECONDS = 1.0  # the longest wait for datagrams between two looks at stopping
READS_PER_TURN = 64  # datagrams taken in one turn before the forwarding is looked at
ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE = 2.0, 10.0
# A side binds from one mapping, or a few while its addresses change: twice one source's.
ANSWER_RATE_PER_SIDE, ANSWER_BURST_PER_SIDE = 4.0, 20.0
ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL = 500.0, 1000.0
STALE_EVERY_SECONDS = 60.0  # STALE is told to a side this often at most
# A bind is inside the clock window for twice the skew allowed at most: remembered as
# answered that long, it is STALE after. A relay carrying its most pairs answers some 50
# binds a second (9,000 in that time); past the bound the oldest go first (6 MB at most),
# and one of those, copied again while still fresh, is answered within the limits below.
ANSWERED_FOR_SECONDS = 2 * CLOCK_SKEW_MS / 1000
MAX_ANSWERED = 32_768


class RelayServer(RawPortThread):
    def __init__(
        self,
        private_key: bytes,
        public_key: bytes,
        bind_key: bytes,  # the cluster's relay-bind key (crypto.ClusterKeys)
        ports: PortRange,
        max_pairs: int,
        forwarder: RelayForwarder | None = None,
        transport: Callable[[], AddressedTransport] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        rng: random.Random | None = None,
    ) -> None:
        """`forwarder` and `transport` replace the kernel's in tests."""
        super().__init__("relay", "relay", transport or self._raw, monotonic, rng)
        self._private = private_key
        self._public = public_key
        self._bind_key = bind_key
        self.ports = ports
        self._max_pairs = max_pairs
        self._forwarder = forwarder
        self.wall_ms = wall_ms
        self._members: frozenset[bytes] = frozenset()
        # member key -> key of the member and the relay; b"" for a key that gives none
        self._keys: dict[bytes, bytes] = {}
        self._bindings: tuple[SideBinding, ...] = ()
        self._own_addresses: frozenset[IPAddress] | None = None  # None: not said yet
        self._forwarding: RelaySpec | None = None  # None: not applied yet
        # Bytes each pair (by its two ports) sent before the table was last replaced (a
        # replacement starts the kernel's counters from zero).
        self._banked: dict[tuple[int, int], int] = {}
        self._recompute_at: float | None = 0.0  # when to look at the pairs again; None: idle
        self.ready = threading.Event()  # listening, and the first table applied
        # Only the relay's thread touches these (not under the lock):
        self._per_source = RateLimiter(ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE)
        self._per_side = RateLimiter(ANSWER_RATE_PER_SIDE, ANSWER_BURST_PER_SIDE)
        self._overall = RateLimiter(ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL)
        self._stale = RateLimiter(1 / STALE_EVERY_SECONDS, 1.0)
        self._answered: OrderedDict[bytes, float] = OrderedDict()  # a bind's MAC -> when

    def _raw(self) -> AddressedTransport:
        if enable_ipv4_forwarding():
            log.info("relay: IPv4 forwarding enabled (net.ipv4.ip_forward=1)")
        return open_raw_port(self.ports.first, BIND_MATCH, "relay", count=self.ports.count)

    # --- any thread ---------------------------------------------------------------------

    def set_members(self, public_keys: Iterable[bytes]) -> None:
        """The members whose binds are answered; a side that stops being one is unbound."""
        members = frozenset(k for k in public_keys if len(k) == bind.KEY_BYTES)
        with self._lock:
            self._members = members - {self._public}
            self._keys = {k: v for k, v in self._keys.items() if k in members}
            self._recompute_at = 0.0  # a side that left is unbound at once
        self._poke()

    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None:
        """This node's addresses now (the agent's underlay): bindings made at one it had
        and no longer has lapse at once (relay.bindings.lapsed_at). An address never said
        is left alone: a bind can reach a new address before the agent's pass has seen it."""
        current = frozenset(addresses)
        with self._lock:
            before, self._own_addresses = self._own_addresses, current
            gone = frozenset() if before is None else before - current
            if not gone:
                return
            now = self.monotonic()
            kept = lapsed_at(self._bindings, gone, now)
            if kept == self._bindings:
                return
            lapsed = sum(1 for b, k in zip(self._bindings, kept, strict=True) if b is not k)
            self._bindings, self._recompute_at = kept, now
        log.info(
            "relay: address gone %s; %d bindings there lapse",
            ",".join(sorted(str(a) for a in gone)),
            lapsed,
        )
        self._poke()

    def forwarding(self) -> RelaySpec:
        """The pairs forwarded now (for status and tests)."""
        with self._lock:
            return self._forwarding or RelaySpec(())

    def traffic(self) -> list[tuple[RelayedPair, int]]:
        """The pairs forwarded now, each with the bytes its two sides sent through the relay
        while it was forwarded (status and metrics)."""
        with self._lock:
            spec, banked, forwarder = self._forwarding, dict(self._banked), self._forwarder
        if spec is None:
            return []
        live = _sent_bytes(forwarder)
        return [(pair, banked.get(pair.ports, 0) + _pair_bytes(pair, live)) for pair in spec.pairs]

    # --- the relay's thread -------------------------------------------------------------

    def _opened(self) -> None:
        log.info(
            "relay ready ports=%d-%d", self.ports.first, self.ports.first + self.ports.count - 1
        )

    def _finished(self) -> None:
        self._withdraw()

    def _turn(self, transport: AddressedTransport) -> None:
        self._wakeup.drain()
        if self._stopping:
            return
        self._forward()  # first of all: the table that keeps binds from drawing ICMP errors
        self.ready.set()
        with self._lock:
            due = self._recompute_at
        wait = TURN_SECONDS if due is None else min(TURN_SECONDS, due - self.monotonic())
        take_waiting(
            transport.receive_datagram,
            max(0.0, wait),
            self._wakeup.reader,
            lambda datagram: self._take(transport, datagram),
            READS_PER_TURN,
        )

    def _take(self, transport: AddressedTransport, datagram: Datagram) -> None:
        destination = datagram.destination
        if destination is None or datagram.port is None or not _unicast(destination):
            return
        try:
            message = bind.parse(datagram.payload)
        except bind.BindError:
            return
        key = self._key_for(message.sender)
        if key is None or not bind.authentic(datagram.payload, key):
            return
        now = self.monotonic()
        mac = datagram.payload[-bind.MAC_BYTES :]
        if self._answered_before(mac, now):
            # Whichever copy came first was answered; the side's own copy too, if first. Not
            # keyed by source: then every spoofed source would earn an answer of its own.
            return
        relay_at = Endpoint(destination, datagram.port)
        with self._lock:
            policy = RelayPolicy(self._public, self.ports, self._members, self._max_pairs)
            outcome = take_bind(
                self._bindings, message, datagram.source, relay_at, policy, now, self.wall_ms()
            )
            if outcome is None:
                return
            if outcome.bindings != self._bindings:
                self._bindings = outcome.bindings
                self._recompute_at = now
        answer = outcome.answer
        if answer is None:
            return  # a side leaving: it wants no answer
        side = message.sender.hex()
        # STALE first: a bind copied once is STALE forever after, and its copies must not
        # use up the side's own answers below.
        if answer.reason == bind.Refusal.STALE and not self._stale.allow(side, now):
            return
        # Most particular first, so a bucket that refuses leaves those after it untouched: a
        # side (or whoever sends its binds) flooding from many sources spends its own budget,
        # never the overall one everyone shares.
        source = f"{source_key(str(datagram.source.address))} {side}"
        if not (
            self._per_source.allow(source, now)
            and self._per_side.allow(side, now)
            and self._overall.allow("", now)
        ):
            return
        if answer.kind == bind.Kind.REFUSED:
            log.debug(
                "relay refused a bind from=%s port=%d reason=%s",
                datagram.source,
                datagram.port,
                answer.reason.name if answer.reason else "-",
            )
        self._answered[mac] = now
        while len(self._answered) > MAX_ANSWERED:
            self._answered.popitem(last=False)
        try:
            transport.send(
                datagram.source,
                bind.encode(answer, key),
                source=destination,
                source_port=datagram.port,
            )
        except OSError as error:
            # This answer's loss alone (an address it cannot leave from, a route that
            # refuses it): the side binds again, and every other side is still heard.
            log.debug("relay answer to %s not sent: %s", datagram.source, error)

    def _answered_before(self, mac: bytes, now: float) -> bool:
        """Whether the bind with this MAC was answered while it can still be fresh."""
        # In the order answered (the monotonic clock does not go back): the oldest go first.
        while self._answered:
            oldest, at = next(iter(self._answered.items()))
            if now - at < ANSWERED_FOR_SECONDS:
                break
            del self._answered[oldest]
        return mac in self._answered

    def _key_for(self, sender: bytes) -> bytes | None:
        """The key of a member and the relay; None for a stranger or a key without one."""
        with self._lock:
            if sender not in self._members:
                return None
            key = self._keys.get(sender)
        if key is None:
            try:
                key = pair_key(self._private, sender, self._public, self._bind_key)
            except ValueError:
                key = b""  # remembered: no X25519 again for it
            with self._lock:
                self._keys[sender] = key
        return key or None

    def _forward(self) -> None:
        now = self.monotonic()
        with self._lock:
            if self._recompute_at is None or now < self._recompute_at:
                return
            members = self._members
            self._bindings = tuple(
                b
                for b in remembered(self._bindings, now)
                if b.side in members and b.peer in members
            )
            spec = forwarded(self._bindings, now, self.ports)
            self._recompute_at = next_change(self._bindings, now)
            applied = self._forwarding
        if applied is not None and spec.fingerprint == applied.fingerprint:
            return
        self._bank(applied, spec)
        try:
            self._forwarder_or_open().apply(spec)
        except Exception:
            with self._lock:
                self._recompute_at = now  # tried again at the next turn, after the backoff
            raise
        with self._lock:
            self._forwarding = spec
        log.info("relay forwards pairs=%d", len(spec.pairs))

    def _bank(self, applied: RelaySpec | None, spec: RelaySpec) -> None:
        """Keep what the pairs that stay have sent, before the replacement zeroes it."""
        live = _sent_bytes(self._forwarder) if applied is not None else {}
        staying = {pair.ports for pair in spec.pairs}
        with self._lock:
            self._banked = {
                pair.ports: self._banked.get(pair.ports, 0) + _pair_bytes(pair, live)
                for pair in (applied.pairs if applied is not None else ())
                if pair.ports in staying
            }

    def _forwarder_or_open(self) -> RelayForwarder:
        if self._forwarder is None:
            self._forwarder = RelayForwarder()
        return self._forwarder

    def _withdraw(self) -> None:
        """Stop forwarding when the thread ends: the pairs' sides find another way."""
        if self._forwarder is None:
            return
        try:
            self._forwarder.teardown()
        except Exception as error:  # noqa: BLE001 - stopping must finish
            log.warning("relay table not removed: %s", error)
        finally:
            self._forwarder.close()
            self._forwarder = None
        with self._lock:
            self._forwarding = None


def _sent_bytes(forwarder: RelayForwarder | None) -> dict[int, int]:
    if forwarder is None:
        return {}
    try:
        return forwarder.sent_bytes()
    except Exception as error:  # noqa: BLE001 - counting must never stop forwarding
        log.debug("relay counters not read: %s", error)
        return {}


def _pair_bytes(pair: RelayedPair, sent: dict[int, int]) -> int:
    return sent.get(pair.first.port, 0) + sent.get(pair.second.port, 0)


def _unicast(address: IPAddress) -> bool:
    """Not an address no answer may come from (multicast, broadcast, unspecified)."""
    return not (
        address.is_multicast
        or address.is_unspecified
        or (address.version == 4 and address == _BROADCAST)
    )
