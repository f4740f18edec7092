"""The relay's own thread: reads bind messages on the relay ports (raw sockets, so nothing
has to hold a thousand ports), answers them, and keeps the forwarding table equal to the
pairs whose two sides are bound (relay.bindings), dropping pairs as their bindings lapse.

Only members are answered: a bind whose sender is not a member costs one dictionary lookup
and gets nothing (no X25519 for strangers), one that is not authentic gets nothing either,
and answers are rate-limited per source and overall, so a replayed bind reflects little.
The thread never dies of an exception: it logs, backs off and opens its sockets again."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable

from kubespan.agent.backoff import Backoff
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.netaddr import Endpoint
from kubespan.pathcheck.codec import pair_key
from kubespan.rawudp import AddressedTransport, Datagram, PayloadMatch, RawUdpPort
from kubespan.relay import bind
from kubespan.relay.bindings import RelayPolicy, SideBinding, forwarded, live, take_bind
from kubespan.relay.forward import RelaySpec
from kubespan.relay.kernel import RelayForwarder
from kubespan.relay.ports import PortRange
from kubespan.wakeup import Wakeup

log = logging.getLogger(__name__)

BIND_MATCH = PayloadMatch(offset=0, word=bind.TAG, max_payload=bind.MESSAGE_BYTES)
TURN_SECONDS = 1.0  # how often lapsed bindings are looked for without any datagram
ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE = 2.0, 10.0
ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL = 500.0, 1000.0


class RelayServer:
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
        self._private = private_key
        self._public = public_key
        self._bind_key = bind_key
        self.ports = ports
        self._max_pairs = max_pairs
        self._forwarder = forwarder
        self._open = transport or self._raw
        self.monotonic = monotonic
        self.wall_ms = wall_ms
        self._backoff = Backoff(base=2.0, cap=60.0, rng=rng or random.Random())
        self._lock = threading.Lock()
        self._members: frozenset[bytes] = frozenset()
        self._keys: dict[bytes, bytes] = {}  # member key -> key of the member and the relay
        self._bindings: tuple[SideBinding, ...] = ()
        self._forwarding: RelaySpec | None = None  # None: not applied yet
        self._per_source = RateLimiter(ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE)
        self._overall = RateLimiter(ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL)
        self._stopping = False
        self._wakeup = Wakeup()
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def _raw(self) -> AddressedTransport:
        port = RawUdpPort(self.ports.first, BIND_MATCH, count=self.ports.count)
        errors = port.listen()
        if len(errors) == 2:
            port.close()
            raise OSError("; ".join(errors))
        for error in errors:
            log.info("relay without one family: %s", error)
        return port

    # --- any thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._poke()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._wakeup.close()

    def set_members(self, public_keys: Iterable[bytes]) -> None:
        """The members whose binds are answered; a side that stops being one is unbound."""
        members = frozenset(k for k in public_keys if len(k) == bind.KEY_BYTES)
        with self._lock:
            self._members = members - {self._public}
            self._keys = {k: v for k, v in self._keys.items() if k in members}
        self._poke()

    def forwarding(self) -> RelaySpec:
        """The pairs forwarded now (for status and tests)."""
        with self._lock:
            return self._forwarding or RelaySpec(())

    # --- the relay's thread -------------------------------------------------------------

    def _run(self) -> None:
        transport: AddressedTransport | None = None
        while not self._stopping:
            try:
                if transport is None:
                    transport = self._open()
                    self._backoff.reset()
                    log.info(
                        "relay ready ports=%d-%d",
                        self.ports.first,
                        self.ports.first + self.ports.count - 1,
                    )
                self._turn(transport)
            except Exception as error:  # noqa: BLE001 - the thread must survive anything
                delay = self._backoff.next_delay()
                log.warning(
                    "relay failed retry_in=%.1fs error=%s: %s", delay, type(error).__name__, error
                )
                if transport is not None:
                    transport.close()
                    transport = None
                self._sleep(delay)
        if transport is not None:
            transport.close()
        self._withdraw()

    def _turn(self, transport: AddressedTransport) -> None:
        self._wakeup.drain()
        self._forward()  # first of all: the table that keeps binds from drawing ICMP errors
        datagram = transport.receive_datagram(TURN_SECONDS, self._wakeup.reader)
        if datagram is not None:
            self._take(transport, datagram)
        self._forward()

    def _take(self, transport: AddressedTransport, datagram: Datagram) -> None:
        if datagram.destination is None or datagram.port is None:
            return
        try:
            message = bind.parse(datagram.payload)
        except bind.BindError:
            return
        with self._lock:
            members = self._members
            key = self._keys.get(message.sender)
        if message.sender not in members:
            return
        if key is None:
            try:
                key = pair_key(self._private, message.sender, self._public, self._bind_key)
            except ValueError:
                return
            with self._lock:
                self._keys[message.sender] = key
        if not bind.authentic(datagram.payload, key):
            return
        now = self.monotonic()
        relay_at = Endpoint(datagram.destination, datagram.port)
        policy = RelayPolicy(self._public, self.ports, members, self._max_pairs)
        with self._lock:
            outcome = take_bind(
                self._bindings, message, datagram.source, relay_at, policy, now, self.wall_ms()
            )
            if outcome is None:
                return
            self._bindings = outcome.bindings
        if outcome.answer.kind == bind.Kind.REFUSED:
            log.info(
                "relay refused a bind from=%s port=%d reason=%s",
                datagram.source,
                datagram.port,
                outcome.answer.reason.name if outcome.answer.reason else "-",
            )
        source = str(datagram.source.address)
        if self._per_source.allow(source, now) and self._overall.allow("", now):
            transport.send(
                datagram.source,
                bind.encode(outcome.answer, key),
                source=datagram.destination,
                source_port=datagram.port,
            )

    def _forward(self) -> None:
        now = self.monotonic()
        with self._lock:
            members = self._members
            self._bindings = tuple(
                b for b in live(self._bindings, now) if b.side in members and b.peer in members
            )
            spec = forwarded(self._bindings, now, self.ports)
            applied = self._forwarding
            changed = applied is None or spec.fingerprint != applied.fingerprint
        if not changed:
            return
        forwarder = self._forwarder_or_open()
        forwarder.apply(spec)
        with self._lock:
            self._forwarding = spec
        log.info("relay forwards pairs=%d", len(spec.pairs))

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
        with self._lock:
            self._forwarding = None

    def _sleep(self, delay: float) -> None:
        self._wakeup.sleep(delay, self.monotonic, lambda: self._stopping)

    def _poke(self) -> None:
        self._wakeup.poke()
