"""A side's half of relaying: bind the pairs the agent wants relayed at their relay, from the
WireGuard port, and keep the bindings alive.

For each wanted peer the client binds at the first relay of the pair's order (relay.choice)
that has not failed it lately: BIND at 0, 0.5, 1.5 and 3.5 s until an authentic answer with
the round's transaction id comes. BOUND gives the endpoint the agent sets for the peer (the
relay's address and this side's port, relay.ports); the binding is renewed every
REFRESH_SECONDS, well within the relay's lifetime, and every UNPAIRED_REFRESH while the
relay says the other side is not bound yet. A renewal that goes unanswered is retried while
the relay still holds the binding; only then does the binding go. PORT_TAKEN moves to the
next attempt, PEER_AT_ATTEMPT to the other side's; any other refusal, no answer to a first
bind within ANSWER_WAIT, or the agent saying the relay did not carry the pair (`want`'s
`failing`), fails that relay for the pair for FAILED_FOR and the next one is bound. A pair
the agent says has a much nearer relay (`want`'s `nearer`, relay.choice.nearer) binds at
the first of its order, at most every MOVE_EVERY; the relay it left carries the pair until
the new one has paired it in every answer for CONFIRM_FOR (its bindings there lapse only
after the relay's lifetime), and if the new
one fails the pair, it is not tried again for MOVE_FAILED_FOR. The agent must have said so
for NEARER_HOLD: both sides act on the same records, and a figure that came and went would
move one side only. A move the other side did not follow (bound alone there too long) is no
fault of the relay: the pair goes back to the relay it left (before that one's binding
lapses), and may move again after FAILED_FOR, UNFOLLOWED_TRIES times in a row while the
relay stays much nearer; the relay remains a choice should the pair's relay fail. A pair
the agent stops wanting and wants again (up directly a while, a state that flapped) keeps
what failed it, where it is not to move, and when it last moved. A side that gives a
binding up (the relay failed the pair, a move was not followed, the peer is no longer
wanted) says so to the relay (a BIND marked leaving), which stops forwarding the pair and
tells the other side, should it bind there later, that it is alone.

Both sides normally pick the same relay (relay.choice), but their views can differ (one
reaches a relay the other does not, one failed it lately, one's records have not reached
the other yet). A side not yet paired follows its order: when another relay comes first
(the records arrived), it binds there at once. A side bound alone moves on:
the side with the higher key after UNPAIRED_WAIT, the other after three times as long, so
the higher one walks through its relays to the lower one's while that one waits. A side
with no other relay to go to stays (after a relay died, the survivor is where both sides
go, each when it finds the pair dead: leaving it would fail it for FAILED_FOR just as the
other side arrives). A relay walked on from is no fault of its own: when every relay of the
order has failed the pair since (the one it walked to died), it is bound again at once, not
after FAILED_FOR. Every
change of what is bound is put on the agent's queue (`RelayChanged`), so the pass that sets
the endpoint comes at once.

Answers are believed only from the relay asked, with the MAC of that relay's pair key and
the transaction id of the round under way. Never dies: a failed socket is logged and opened
again with backoff; the agent's direct paths do not depend on it.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubespan.netaddr import Endpoint
from kubespan.pathcheck.codec import pair_key
from kubespan.rawthread import RawPortThread, open_raw_port, take_waiting
from kubespan.rawudp import AddressedTransport, Datagram
from kubespan.relay import bind
from kubespan.relay.choice import RelayOffer
from kubespan.relay.ports import MAX_ATTEMPTS, pair_ports
from kubespan.relay.server import BIND_MATCH

log = logging.getLogger(__name__)

SEND_AT = (0.0, 0.5, 1.5, 3.5)  # seconds into a round at which BIND is sent
ANSWER_WAIT = 5.5  # a round without an answer this long: the relay failed the pair
REFRESH_SECONDS = 20.0  # a binding is renewed this often (the relay keeps it 60 s)
UNPAIRED_REFRESH = 2.0  # ... and this often while the other side is not bound there
UNPAIRED_WAIT = 12.0  # bound alone this long, the side with the higher key moves on
KEEP_BOUND = 50.0  # unanswered renewals keep the binding this long (the relay's is 60 s)
FAILED_FOR = 60.0  # a relay that failed a pair is not asked for it again this long
MOVE_FAILED_FOR = 900.0  # ... when the pair had moved there from a working relay
MOVE_EVERY = 300.0  # a pair moves to a nearer relay at most this often
NEARER_HOLD = 15.0  # a relay is found much nearer this long before the pair moves there
UNFOLLOWED_TRIES = 4  # moves in a row the other side does not follow, tried FAILED_FOR apart
CONFIRM_FOR = 12.0  # paired this long at a relay moved to (beyond the relay's 10 s) to be so
LEAVE_MARGIN = 5.0  # a move not followed is given up this long before the binding left lapses
MAX_PAIRS = 256  # pairs bound at once at most (the relay's quota is lower per side anyway)
TURN_SECONDS = 1.0
IDLE_TURN_SECONDS = 30.0
READS_PER_TURN = 64


@dataclass(frozen=True)
class RelayChanged:
    """What the client has bound changed: the agent's next pass sets the endpoints."""


@dataclass(frozen=True)
class Bound:
    relay: RelayOffer
    endpoint: Endpoint  # the peer's WireGuard endpoint through the relay (and attempt)
    paired: bool  # the relay said the other side is bound too: the pair is forwarded
    attempt: int = 0  # relay.ports' attempt the binding is at


@dataclass
class _Pair:
    """One wanted peer, as the client's thread tracks it."""

    relays: tuple[RelayOffer, ...]
    relay: RelayOffer | None = None
    attempt: int = 0
    round_start: float | None = None
    sends: int = 0
    transaction: bytes = b""
    bound: Bound | None = None
    bound_at: float = 0.0
    alone_since: float | None = None  # bound, the other side not (yet)
    failed: dict[bytes, float] = field(default_factory=dict)  # relay key -> until
    # Of those, the relays left only because the other side did not come there: no fault of
    # theirs, so when every relay of the order has failed the pair they are bound still.
    passed_over: set[bytes] = field(default_factory=set)
    no_move: dict[bytes, float] = field(default_factory=dict)  # not moved to until (by key)
    moving: bool = False  # left a working relay for a nearer one, not yet settled there
    moved_at: float = float("-inf")
    moved_before: float = float("-inf")  # `moved_at` before the move under way
    unfollowed: int = 0  # moves in a row the other side did not follow
    nearer_since: float | None = None  # the agent has said a much nearer relay since then
    confirmed_from: float | None = None  # moving: paired at the new relay in every answer since
    previous: Bound | None = None  # the binding left, still shown until `previous_until`
    previous_until: float = 0.0
    ever_paired: bool = False  # forwarded at some relay since it was wanted


class RelayClient(RawPortThread):
    def __init__(
        self,
        events: queue.Queue[Any],
        listen_port: int,
        private_key: bytes,
        public_key: bytes,
        bind_key: bytes,
        transport: Callable[[], AddressedTransport] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            "relay-client",
            "relay binds",
            transport or (lambda: open_raw_port(listen_port, BIND_MATCH, "relay binds")),
            monotonic,
            rng,
        )
        self._events = events
        self._private = private_key
        self._public = public_key
        self._bind_key = bind_key
        self._wall_ms = wall_ms
        self._random_bytes = random_bytes
        self._wanted: dict[bytes, tuple[RelayOffer, ...]] = {}
        self._failing: frozenset[bytes] = frozenset()
        # Peers newly said to be failing, acted on once: until the agent's next pass, the
        # set it gave still names a peer whose relay was just left.
        self._newly_failing: frozenset[bytes] = frozenset()
        self._nearer: frozenset[bytes] = frozenset()
        self._pairs: dict[bytes, _Pair] = {}  # the thread's own
        # A pair no longer wanted (up directly a while, or its state flapped) comes back
        # with what it learned: the relays that failed it, those it is not to move to, and
        # when it last moved.
        self._left: dict[bytes, tuple[dict[bytes, float], dict[bytes, float], float]] = {}
        self._bound: dict[bytes, Bound] = {}  # what the agent reads
        self._keys: dict[bytes, bytes | None] = {}
        self._outbox: list[tuple[Endpoint, bytes]] = []  # releases, sent at the turn's end

    # --- any thread ---------------------------------------------------------------------

    def want(
        self,
        wanted: Mapping[bytes, tuple[RelayOffer, ...]],
        failing: frozenset[bytes] = frozenset(),
        nearer: frozenset[bytes] = frozenset(),
    ) -> None:
        """The peers to bind, each with its relays in order (relay.choice.relay_order);
        `failing`: peers whose relay said the pair is forwarded, yet the pair did not come
        up through it (a relay that does not forward): that relay is left for the next;
        `nearer`: peers whose pair should move to the first relay of its order (much
        nearer than the one bound: relay.choice.nearer), unless that one failed lately."""
        if len(wanted) > MAX_PAIRS:
            log.warning("relay wanted for %d peers; binding the first %d", len(wanted), MAX_PAIRS)
        trimmed = dict(list(wanted.items())[:MAX_PAIRS])
        with self._lock:
            if trimmed == self._wanted and (failing, nearer) == (self._failing, self._nearer):
                return
            self._newly_failing |= failing - self._failing
            self._wanted, self._failing, self._nearer = trimmed, failing, nearer
        self._poke()

    def bound(self) -> dict[bytes, Bound]:
        with self._lock:
            return dict(self._bound)

    # --- the client's thread ------------------------------------------------------------

    def _turn(self, transport: AddressedTransport) -> None:
        self._wakeup.drain()
        if self._stopping:
            return  # stop() came after the loop looked, and its wake-up was just drained
        now = self.monotonic()
        self._take_wanted(now)
        for peer, pair in self._pairs.items():
            self._step(transport, peer, pair, now)
        self._send_outbox(transport)
        self._publish()
        # With no pair to bind, only a datagram or a want() (it pokes) can change anything:
        # an idle agent's threads do not wake by the second.
        turn = TURN_SECONDS if self._pairs else IDLE_TURN_SECONDS
        wait = max(0.0, min(turn, self._next_due(now) - now))
        take_waiting(
            transport.receive_datagram, wait, self._wakeup.reader, self._take, READS_PER_TURN
        )
        self._send_outbox(transport)
        self._publish()

    def _send_outbox(self, transport: AddressedTransport) -> None:
        outbox, self._outbox = self._outbox, []
        for destination, payload in outbox:
            try:
                transport.send(destination, payload)
            except OSError as error:
                log.debug("relay release to %s not sent: %s", destination, error)

    def _take_wanted(self, now: float) -> None:
        with self._lock:
            wanted, failing, nearer = dict(self._wanted), self._newly_failing, self._nearer
            self._newly_failing = frozenset()
        for peer, pair in self._pairs.items():
            if peer not in wanted:
                self._left[peer] = (pair.failed, pair.no_move, pair.moved_at)
                self._release(peer, pair.bound)
                if pair.moving:
                    self._release(peer, pair.previous)
        self._pairs = {
            peer: self._pairs.get(peer) or self._returning(peer, relays, now)
            for peer, relays in wanted.items()
        }
        self._left = {
            peer: (failed, no_move, moved_at)
            for peer, (failed, no_move, moved_at) in self._left.items()
            if peer not in wanted
            and (
                now - moved_at < MOVE_EVERY
                or any(u > now for u in (*failed.values(), *no_move.values()))
            )
        }
        while len(self._left) > MAX_PAIRS:
            del self._left[next(iter(self._left))]
        for peer, pair in self._pairs.items():
            pair.relays = wanted[peer]
            keys = {r.public_key: r for r in pair.relays}
            if pair.relay is not None and keys.get(pair.relay.public_key) != pair.relay:
                self._release(peer, pair.bound)  # harmless if bound again at its new address
                self._drop(pair)  # gone, or reached at another address now
            if peer in failing and pair.moving and pair.previous is not None:
                # What the agent found forwarding nothing is the binding shown: the one left.
                log.info(
                    "relay %s forwards nothing for peer %s; not going back there",
                    pair.previous.relay.name,
                    peer.hex()[:16],
                )
                pair.failed[pair.previous.relay.public_key] = now + FAILED_FOR
                pair.passed_over.discard(pair.previous.relay.public_key)
                self._release(peer, pair.previous)
                pair.previous = None
            elif peer in failing and pair.bound is not None and pair.relay is not None:
                log.info(
                    "relay %s forwards nothing for peer %s; trying the next",
                    pair.relay.name,
                    peer.hex()[:16],
                )
                self._fail(peer, pair, now)
            first = self._first_choice(pair, now)
            self._follow_order(peer, pair, first)
            current = pair.relay
            if peer not in nearer:
                pair.nearer_since, pair.unfollowed = None, 0
            elif pair.nearer_since is None:
                pair.nearer_since = now
            # Only to the first of the order, the one found nearer (and the one the other
            # side moves to), not while it failed this pair lately, and not on a figure that
            # came and went: the other side acts on the same records, and must find it too.
            if (
                pair.nearer_since is not None
                and now - pair.nearer_since >= NEARER_HOLD
                and current is not None
                and first is not None
                and first is pair.relays[0]
                and current != first
                and pair.no_move.get(first.public_key, 0.0) <= now
                and pair.bound is not None
                and pair.bound.paired
                and now - pair.moved_at >= MOVE_EVERY
            ):
                log.info(
                    "relay %s is much nearer than %s for peer %s; moving there",
                    first.name,
                    current.name,
                    peer.hex()[:16],
                )
                left, until = pair.bound, pair.bound_at + KEEP_BOUND
                self._drop(pair)  # not failed: it stays the next choice
                pair.moving, pair.moved_before, pair.moved_at = True, pair.moved_at, now
                pair.previous, pair.previous_until = left, until
            if pair.relay is None:
                pair.relay, pair.attempt = first, 0

    @staticmethod
    def _first_choice(pair: _Pair, now: float) -> RelayOffer | None:
        """The first relay of the pair's order that has not failed it lately; when all have,
        the first it only passed over: the relay the pair was at died after it had walked
        on from this one for want of the other side, and this one is where both sides go
        now (without it the pair would wait out FAILED_FOR with no relay at all)."""
        failed = pair.failed
        fresh = next((r for r in pair.relays if failed.get(r.public_key, 0.0) <= now), None)
        if fresh is not None:
            return fresh
        return next((r for r in pair.relays if r.public_key in pair.passed_over), None)

    def _follow_order(self, peer: bytes, pair: _Pair, first: RelayOffer | None) -> None:
        """A pair never forwarded yet whose order now ranks another relay first (the sides'
        records reached each other) goes there now, where the other side goes, rather than
        wait out UNPAIRED_WAIT alone: it has nothing to lose. A pair that was forwarded
        before is left to the walk (patience, failures, moves and their way back)."""
        if (
            pair.relay is None
            or first is None
            or pair.relay == first
            or pair.ever_paired
            or pair.moving
            or (pair.bound is not None and pair.bound.paired)
        ):
            return
        log.info(
            "relay %s is now first for peer %s; binding there, not at %s",
            first.name,
            peer.hex()[:16],
            pair.relay.name,
        )
        self._release(peer, pair.bound)
        self._drop(pair)

    def _returning(self, peer: bytes, relays: tuple[RelayOffer, ...], now: float) -> _Pair:
        failed, no_move, moved_at = self._left.get(peer, ({}, {}, float("-inf")))
        return _Pair(
            relays,
            failed={k: u for k, u in failed.items() if u > now},
            no_move={k: u for k, u in no_move.items() if u > now},
            moved_at=moved_at,
        )

    def _step(self, transport: AddressedTransport, peer: bytes, pair: _Pair, now: float) -> None:
        relay = pair.relay
        if relay is None:
            return
        if self._gave_up_waiting(peer, pair, now):
            return
        if pair.round_start is None and (pair.bound is None or now >= self._renew_at(pair)):
            self._new_round(pair, now)
        if pair.round_start is None:
            return
        if now - pair.round_start >= ANSWER_WAIT:
            if pair.bound is not None and now - pair.bound_at < KEEP_BOUND and not pair.moving:
                self._new_round(pair, now)  # the relay still holds it: ask again
            else:
                log.info(
                    "relay %s did not answer for peer %s; trying the next",
                    relay.name,
                    peer.hex()[:16],
                )
                self._fail(peer, pair, now)
                return
        key = self._key(relay.public_key)
        if key is None:
            self._fail(peer, pair, now)
            return
        while pair.sends < len(SEND_AT) and now - pair.round_start >= SEND_AT[pair.sends]:
            pair.sends += 1
            port = pair_ports(relay.ports, relay.public_key, self._public, peer, pair.attempt)[0]
            message = self._bind(peer, pair.attempt, pair.transaction)
            try:
                transport.send(Endpoint(relay.address, port), bind.encode(message, key))
            except OSError as error:
                log.debug("relay bind to %s not sent: %s", relay.name, error)

    def _take(self, datagram: Datagram) -> None:
        try:
            message = bind.parse(datagram.payload)
        except bind.BindError:
            return
        pair = self._pairs.get(message.peer)
        if (
            pair is None
            or pair.relay is None
            or pair.round_start is None
            or message.kind == bind.Kind.BIND
            or message.sender != pair.relay.public_key
            or message.transaction_id != pair.transaction
        ):
            return
        key = self._key(pair.relay.public_key)
        if key is None or not bind.authentic(datagram.payload, key):
            return
        now = self.monotonic()
        relay = pair.relay
        if message.kind == bind.Kind.BOUND:
            port = pair_ports(
                relay.ports, relay.public_key, self._public, message.peer, pair.attempt
            )
            bound = Bound(relay, Endpoint(relay.address, port[0]), message.paired, pair.attempt)
            if pair.bound != bound:
                log.info(
                    "relay %s bound for peer %s at %s (seen from %s)%s",
                    relay.name,
                    message.peer.hex()[:16],
                    bound.endpoint,
                    message.observed,
                    ", forwarded" if bound.paired else ", waiting for the peer to bind",
                )
            if bound.paired:
                pair.alone_since, pair.ever_paired = None, True
                if pair.moving:
                    self._confirm(pair, now)
            else:
                pair.confirmed_from = None
                if pair.alone_since is None:
                    pair.alone_since = now
            pair.bound, pair.bound_at, pair.round_start = bound, now, None
            return
        reason = message.reason
        if reason == bind.Refusal.PORT_TAKEN and pair.attempt + 1 < MAX_ATTEMPTS:
            self._again(pair, pair.attempt + 1, now)
        elif reason == bind.Refusal.PEER_AT_ATTEMPT and message.attempt < MAX_ATTEMPTS:
            self._again(pair, message.attempt, now)
        else:
            log.info(
                "relay %s refused peer %s: %s",
                relay.name,
                message.peer.hex()[:16],
                reason.name if reason else "-",
            )
            self._fail(message.peer, pair, now)

    def _again(self, pair: _Pair, attempt: int, now: float) -> None:
        pair.attempt, pair.bound = attempt, None
        self._new_round(pair, now)

    def _new_round(self, pair: _Pair, now: float) -> None:
        pair.round_start, pair.sends = now, 0
        pair.transaction = self._random_bytes(bind.TRANSACTION_ID_BYTES)

    @staticmethod
    def _confirm(pair: _Pair, now: float) -> None:
        """Paired at the relay moved to: the move is made once every answer for
        CONFIRM_FOR said so. A first "paired" can come from a binding the other side is
        just giving up (its leave not yet there, or lost: then the relay believes it for
        up to bindings.ALONE_RENEWED_WITHIN_SECONDS); meanwhile the binding left is still
        shown, so a pair that was not there costs no gap."""
        if pair.confirmed_from is None:
            pair.confirmed_from = now
        if now - pair.confirmed_from >= CONFIRM_FOR:
            pair.moving, pair.confirmed_from, pair.unfollowed = False, None, 0

    @staticmethod
    def _renew_at(pair: _Pair) -> float:
        settled = pair.bound is not None and pair.bound.paired and not pair.moving
        return pair.bound_at + (REFRESH_SECONDS if settled else UNPAIRED_REFRESH)

    def _gave_up_waiting(self, peer: bytes, pair: _Pair, now: float) -> bool:
        """Bound alone past its patience: the pair moves on (True), unless there is nowhere
        else to go (the others failed it, or there are none): leaving would only leave the
        pair without a relay while the other side comes here. It waits on."""
        alone_until = self._alone_until(peer, pair)
        if alone_until is None or now < alone_until:
            return False
        if not pair.moving and not self._elsewhere(pair, now):
            pair.alone_since = now
            return False
        log.info(
            "relay %s: peer %s did not bind there; trying the next",
            pair.relay.name if pair.relay else "-",
            peer.hex()[:16],
        )
        if pair.moving:
            self._unfollowed(peer, pair, now)
        else:
            self._fail(peer, pair, now, passed_over=True)
        return True

    @staticmethod
    def _elsewhere(pair: _Pair, now: float) -> bool:
        """Whether the pair has a relay to go to other than its own: one of its order that
        has not failed it lately."""
        return any(
            r != pair.relay and pair.failed.get(r.public_key, 0.0) <= now for r in pair.relays
        )

    def _alone_until(self, peer: bytes, pair: _Pair) -> float | None:
        """When this side, bound alone, stops waiting: the higher key waits UNPAIRED_WAIT,
        the lower three times as long (so the higher one comes to it); a side moving goes
        back before the binding it left lapses (that one carries the pair meanwhile)."""
        if pair.alone_since is None or pair.bound is None or pair.bound.paired:
            return None
        patience = UNPAIRED_WAIT if self._public > peer else 3 * UNPAIRED_WAIT
        until = pair.alone_since + patience
        if pair.moving and pair.previous is not None:
            until = min(until, pair.previous_until - LEAVE_MARGIN)
        return until

    def _fail(
        self,
        peer: bytes,
        pair: _Pair,
        now: float,
        wait: float | None = None,
        passed_over: bool = False,
    ) -> None:
        """The relay failed the pair: not asked for it again for a while; a pair that was
        moving goes back to the relay it left. `passed_over`: left for want of the other
        side, not for a fault (see _first_choice)."""
        self._release(peer, pair.bound)
        moving = pair.moving
        if pair.relay is not None:
            # A nearer relay that did not carry the pair is not moved to again for long:
            # the pair had a working relay, and each try costs it a gap.
            if wait is None:
                wait = MOVE_FAILED_FOR if moving else FAILED_FOR
            key = pair.relay.public_key
            pair.failed[key] = now + wait
            if passed_over:
                pair.passed_over.add(key)
            else:
                pair.passed_over.discard(key)
        pair.failed = {k: until for k, until in pair.failed.items() if until > now}
        pair.passed_over &= pair.failed.keys()
        self._drop(pair)
        if moving:
            self._go_back(pair)

    @staticmethod
    def _go_back(pair: _Pair) -> None:
        """Bind again at the relay a move left: it carries the pair meanwhile."""
        left = pair.previous
        if left is not None and left.relay in pair.relays:
            pair.relay, pair.attempt = left.relay, left.attempt

    def _unfollowed(self, peer: bytes, pair: _Pair, now: float) -> None:
        """A move the other side did not make (it found the relay nearer later, or not at
        all): no fault of the relay, and it cost no gap (the binding left is still shown).
        The pair goes back to the relay it left, and may move again once the other side
        can be expected to agree, after FAILED_FOR; the move it did not make is not counted
        against MOVE_EVERY. A fixed wait, so two sides out of step still meet: the higher
        key tries about every 72 s (FAILED_FOR and its 12 s alone), the lower waits up to
        36 s alone about every 96 s, so one of a few tries falls in a wait of the other's.
        After UNFOLLOWED_TRIES in a row, the other side is not coming (it does not find
        the relay nearer, or does not reach it): MOVE_FAILED_FOR. The relay is still a
        choice should the one the pair is at fail: it is not failed."""
        moved_to = pair.relay
        pair.unfollowed += 1
        pair.moved_at = pair.moved_before
        if pair.previous is None or pair.previous.relay not in pair.relays:
            # Nothing to go back to (the binding left lapsed, or its relay is gone): the
            # relay is passed over like one that failed, or the pair binds there again.
            self._fail(peer, pair, now, FAILED_FOR)
            return
        if moved_to is not None:
            wait = FAILED_FOR if pair.unfollowed < UNFOLLOWED_TRIES else MOVE_FAILED_FOR
            pair.no_move[moved_to.public_key] = now + wait
        pair.no_move = {k: until for k, until in pair.no_move.items() if until > now}
        self._release(peer, pair.bound)
        self._drop(pair)
        self._go_back(pair)

    def _release(self, peer: bytes, bound: Bound | None) -> None:
        """Tell the relay this side gives this binding up (sent with the turn's datagrams),
        so it stops forwarding the pair and a peer binding later hears it is alone; lost,
        the binding lapses by itself. A binding left for a nearer relay is not released
        while the move is under way: it carries the pair until the new one does."""
        key = None if bound is None else self._key(bound.relay.public_key)
        if bound is None or key is None:
            return
        transaction = self._random_bytes(bind.TRANSACTION_ID_BYTES)
        message = self._bind(peer, bound.attempt, transaction, leaving=True)
        self._outbox.append((bound.endpoint, bind.encode(message, key)))

    def _bind(
        self, peer: bytes, attempt: int, transaction: bytes, leaving: bool = False
    ) -> bind.BindMessage:
        return bind.BindMessage(
            bind.Kind.BIND,
            self._public,
            peer,
            attempt,
            self._wall_ms(),
            transaction,
            leaving=leaving,
        )

    @staticmethod
    def _drop(pair: _Pair) -> None:
        pair.relay, pair.bound, pair.round_start, pair.attempt = None, None, None, 0
        pair.alone_since, pair.moving, pair.confirmed_from = None, False, None

    def _next_due(self, now: float) -> float:
        due = now + (TURN_SECONDS if self._pairs else IDLE_TURN_SECONDS)
        for peer, pair in self._pairs.items():
            if pair.relay is None:
                offered = {r.public_key for r in pair.relays}
                waits = [u for k, u in pair.failed.items() if u > now and k in offered]
                if waits:
                    due = min(due, *waits)
            elif pair.round_start is None:
                due = min(due, self._renew_at(pair))
            else:
                at = SEND_AT[pair.sends] if pair.sends < len(SEND_AT) else ANSWER_WAIT
                due = min(due, pair.round_start + at)
            alone_until = self._alone_until(peer, pair)
            if alone_until is not None:
                due = min(due, max(now, alone_until))
            if pair.nearer_since is not None and pair.nearer_since + NEARER_HOLD > now:
                due = min(due, pair.nearer_since + NEARER_HOLD)
        return due

    def _publish(self) -> None:
        now = self.monotonic()
        bound = {}
        for peer, pair in self._pairs.items():
            shown = self._shown(pair, now)
            if shown is not None:
                bound[peer] = shown
        with self._lock:
            changed = bound != self._bound
            self._bound = bound
        if changed:
            self._events.put(RelayChanged())

    @staticmethod
    def _shown(pair: _Pair, now: float) -> Bound | None:
        """What the agent sets for the peer: a pair moving to a nearer relay keeps the
        binding it left (the relay forwards it until it lapses) until the move is made
        (paired at the new one, and confirmed), so a move costs no gap, and one the other
        side does not follow none."""
        moved_to = pair.bound
        if pair.previous is not None and (
            now >= pair.previous_until
            or (moved_to is not None and moved_to.paired and not pair.moving)
        ):
            pair.previous = None
        return pair.bound if pair.previous is None else pair.previous

    def _key(self, relay: bytes) -> bytes | None:
        if relay not in self._keys:
            if len(self._keys) > 4 * MAX_PAIRS:
                self._keys.clear()
            try:
                self._keys[relay] = pair_key(self._private, relay, self._public, self._bind_key)
            except ValueError:
                self._keys[relay] = None
        return self._keys[relay]
