"""Path checks in a thread of their own: check a peer's candidates at once, answer members.

`check(peer, endpoints)` sends a request to each endpoint now and again at CHECK_AT (UDP
loses packets, and the first requests of a hole punch die at the other NAT until its own
requests open it), until the endpoint answers; an endpoint asked for again after it answered
is asked anew (the agent may count only answers from now on). A valid answer is recorded
with its time and reported to the agent (`PathAnswered`), which sets the best candidate
that answered.

`measure(peer, endpoint)` checks a path in use, only to time it: every answer's round trip
is kept (the last ROUND_TRIPS_KEPT per endpoint, for a member's latest TIMED_ENDPOINTS:
`round_trips`);
the agent times the relays it may use this way (relay.choice).

Requests from members are answered from the WireGuard port to wherever they came from.
Everything from the network is hostile until checked, in the cheapest order: size and tag
(the BPF filter and the codec), a sender that is a current member (no cryptography for
strangers), the MAC, a request not answered ANSWERS_PER_REQUEST times already (from
wherever it came), then the rates: per source and sender, per sender, overall. Nothing an
attacker sends makes us send more bytes than it did, or more than the rate limits allow;
copies of one member's requests spend that member's answers, never another's.

Never dies: a failed socket (no CAP_NET_RAW) is logged and retried with backoff; the agent
goes on without path checks (its trials still find every path, only slower).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import queue
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kubespan.discovery.forwarded import source_key
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.netaddr import Endpoint, IPAddress
from kubespan.pathcheck import codec
from kubespan.rawthread import RawPortThread, open_raw_port
from kubespan.rawudp import AddressedTransport, Datagram, PayloadMatch

log = logging.getLogger(__name__)

PATH_CHECK_MATCH = PayloadMatch(offset=0, word=codec.TAG, max_payload=codec.MESSAGE_BYTES)
# Seconds after a check starts at which an unanswered endpoint is sent a request (again).
CHECK_AT = (0.0, 0.2, 0.6, 1.4, 3.0)
CHECK_SPAN = CHECK_AT[-1] + 1.0  # answers later than this are not waited for
MAX_ENDPOINTS_PER_PEER = 32
MAX_ANSWERS_PER_PEER = 2 * MAX_ENDPOINTS_PER_PEER  # the freshest kept
MAX_CHECKS = 4096  # (peer, endpoint) checks under way at once; the oldest make room
SEND_BUDGET = 200  # requests per SEND_SLICE at most: a thousand peers checked at once are paced
SEND_SLICE = 0.1
ANSWER_KEEP = 120.0  # answers older than this are forgotten
ANSWER_EVENT_GAP = 1.0  # one event per peer and endpoint per this long at most
# Answers we send, most particular bucket first (one that refuses leaves those after it
# untouched): per source (an IPv4 address or an IPv6 /64) and sender, per sender, overall.
# Keyed by sender, a member's requests, its own or copies sent from anywhere, spend its own
# budget: neither a source's that another member shares (behind one NAT, or spoofed) nor
# the overall one everyone shares.
ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE = 20.0, 40.0
# A member asks from a few sources (its addresses, their NAT mappings) and all our candidates
# at once: room for a check of every endpoint it may ask, each request sent again unanswered.
ANSWER_RATE_PER_SENDER = 40.0
ANSWER_BURST_PER_SENDER = float(MAX_ENDPOINTS_PER_PEER * len(CHECK_AT))
ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL = 1000.0, 1000.0
# A request is answered this often at most in all, each time to another source. Every
# request a checker sends (a retry too, in every version so far) has a transaction id of its
# own, so one answer is all its sender needs; the second is for the real request when a copy
# spoofed by someone on its path came first. More copies, from however many sources (a whole
# /64, spoofed addresses), get nothing and spend no limit.
ANSWERS_PER_REQUEST = 2
# Requests answered are remembered by MAC (it stands for sender and transaction id, and only
# the pair can make it) this long, and at most this many (the oldest go first; 6 MB at most).
#
# What is left: a path check carries no time (adding one changes the wire format), so a
# request forgotten here, after SEEN_FOR_SECONDS or pushed out by newer ones, is answered
# again when replayed, however old: ANSWERS_PER_REQUEST times more each time it is
# forgotten, to whatever source it claims, within its sender's budget. Captured requests
# can so use up their sender's answers for a while, never another member's, nor all of the
# overall ones unless captured from many members.
SEEN_FOR_SECONDS = 600.0
SEEN_TRANSACTIONS = 16384
CHECK_BACK_GAP = 1.0
ROUND_TRIPS_KEPT = 6  # per endpoint: a minute's worth at the agent's busiest timing
TIMED_ENDPOINTS = 4  # endpoints per member whose round trips are kept
ROUND_TRIP_KEEP = 400.0  # seconds a round trip counts (six timings a minute apart)
MAX_DATAGRAMS_PER_TURN = 256
IDLE_TURN_SECONDS = 30.0


@dataclass(frozen=True)
class PathAnswered:
    """A peer answered a path check at this endpoint: a pass should look."""

    public_key: str
    endpoint: Endpoint


@dataclass
class _Check:
    public_key: str
    endpoint: Endpoint
    started: float
    sends: int = 0  # requests sent so far (indexes CHECK_AT)
    timing_only: bool = False  # a path in use, timed: its answer is no news to the agent
    answered: bool = False


@dataclass(frozen=True)
class _Outstanding:
    public_key: str
    endpoint: Endpoint
    sent_at: float
    timing_only: bool = False


class PathChecker(RawPortThread):
    def __init__(
        self,
        events: queue.Queue[Any],
        listen_port: int,
        private_key: bytes,
        public_key: bytes,
        cluster_key: bytes,
        monotonic: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        transport: Callable[[], AddressedTransport] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`transport` replaces the raw sockets in tests."""
        super().__init__(
            "path checker",
            "path checks",
            transport or (lambda: open_raw_port(listen_port, PATH_CHECK_MATCH, "path checks")),
            monotonic,
            rng,
        )
        self.events = events
        self.listen_port = listen_port
        self._private = private_key
        self._public = public_key
        self._cluster_key = cluster_key
        self.random_bytes = random_bytes
        self._members: dict[bytes, str] = {}  # raw public key -> base64
        self._raw_keys: dict[str, bytes] = {}  # base64 -> raw public key
        self._keys: dict[bytes, bytes] = {}  # raw public key -> pair key
        # The latest endpoints asked for per member (one entry each: bounded by members).
        self._pending: dict[str, tuple[Endpoint, ...]] = {}
        self._wanted: dict[str, frozenset[Endpoint]] = {}  # endpoints last asked, per member
        self._own: frozenset[IPAddress] = frozenset()  # our addresses, local and mapped
        self._checks: OrderedDict[tuple[str, Endpoint], _Check] = OrderedDict()
        self._outstanding: OrderedDict[bytes, _Outstanding] = OrderedDict()
        self._answers: dict[str, dict[Endpoint, float]] = {}
        # Per member: the endpoint last answered at, and the latest (when, round trip) there.
        self._round_trips: dict[str, dict[Endpoint, tuple[tuple[float, float], ...]]] = {}
        self._measure: dict[str, Endpoint] = {}  # paths to time, asked since the last turn
        self._announced: dict[tuple[str, Endpoint], float] = {}
        self._checked_back: dict[tuple[str, Endpoint], float] = {}
        # A request's MAC -> when it was first answered, and the sources answered since.
        self._seen: OrderedDict[bytes, tuple[float, tuple[bytes, ...]]] = OrderedDict()
        self._per_source = RateLimiter(ANSWER_RATE_PER_SOURCE, ANSWER_BURST_PER_SOURCE)
        self._per_sender = RateLimiter(ANSWER_RATE_PER_SENDER, ANSWER_BURST_PER_SENDER)
        self._overall = RateLimiter(ANSWER_RATE_OVERALL, ANSWER_BURST_OVERALL)
        self._slice_start = float("-inf")
        self._slice_sent = 0
        self.sent = 0  # requests sent, for tests and benchmarks
        self.answered = 0  # answers sent
        self.timed = 0  # round trips timed (answers to `measure`)

    # --- the agent's side (any thread) -------------------------------------------------

    def set_members(self, public_keys: Iterable[str]) -> None:
        """The members whose requests are answered and whose checks may be sent."""
        members: dict[bytes, str] = {}
        for key in public_keys:
            try:
                raw = base64.b64decode(key, validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == codec.KEY_BYTES and raw != self._public:
                members[raw] = key
        with self._lock:
            if members == self._members:
                return
            self._members = members
            self._raw_keys = {name: raw for raw, name in members.items()}
            self._keys = {k: v for k, v in self._keys.items() if k in members}
            known = set(members.values())
            self._answers = {k: v for k, v in self._answers.items() if k in known}
            self._wanted = {k: v for k, v in self._wanted.items() if k in known}
            self._pending = {k: v for k, v in self._pending.items() if k in known}
            self._round_trips = {k: v for k, v in self._round_trips.items() if k in known}
            self._measure = {k: v for k, v in self._measure.items() if k in known}

    def set_own_addresses(self, addresses: Iterable[IPAddress]) -> None:
        """Our addresses: those on our interfaces and those STUN says our NAT maps us to.
        An answer counts only if the peer saw our request come from one of them (a request
        that reached it through someone else's relay proves no path of ours), and answers
        go out from the address a request came to only if it is one of them."""
        own = frozenset(addresses)
        with self._lock:
            self._own = own

    def check(self, public_key: str, endpoints: Sequence[Endpoint]) -> None:
        """Check these endpoints of this member now (those already under check go on)."""
        wanted = tuple(endpoints[:MAX_ENDPOINTS_PER_PEER])
        with self._lock:
            if public_key not in self._raw_keys:
                return
            self._pending[public_key] = wanted
            self._wanted[public_key] = frozenset(wanted)
        self._poke()

    def measure(self, public_key: str, endpoint: Endpoint) -> None:
        """Time a round trip to this member at this endpoint, a path in use (not a
        candidate: no check back, no event)."""
        with self._lock:
            if public_key not in self._raw_keys:
                return
            self._measure[public_key] = endpoint
        self._poke()

    def round_trips(self, public_key: str, endpoint: Endpoint) -> tuple[float, ...]:
        """The latest round trips to this member at this endpoint (at most ROUND_TRIPS_KEPT,
        none older than ROUND_TRIP_KEEP), seconds, oldest first."""
        with self._lock:
            samples = self._round_trips.get(public_key, {}).get(endpoint, ())
        horizon = self.monotonic() - ROUND_TRIP_KEEP
        return tuple(rtt for when, rtt in samples if when >= horizon)

    def answers(self) -> dict[str, dict[Endpoint, float]]:
        """Per member, the endpoints that answered and when (monotonic), fresh within
        ANSWER_KEEP."""
        horizon = self.monotonic() - ANSWER_KEEP
        with self._lock:
            return {
                key: {e: at for e, at in by_endpoint.items() if at >= horizon}
                for key, by_endpoint in self._answers.items()
            }

    # --- the thread ------------------------------------------------------------------

    def _opened(self) -> None:
        log.info("path checks ready port=%d", self.listen_port)

    def _turn(self, transport: AddressedTransport) -> None:
        """Start what was asked, send what is due, then read until the next send is due."""
        self._wakeup.drain()
        if self._stopping:
            return  # stop() came after the loop looked, and its wake-up was just drained
        now = self.monotonic()
        self._take_pending(now)
        self._send_due(transport, now)
        # Computed once per turn (not per datagram: a flood must not cost a walk over every
        # check per packet); answers only make the next send later, never sooner.
        due = self._next_due()
        for _ in range(MAX_DATAGRAMS_PER_TURN):
            timeout = max(0.0, due - self.monotonic())
            received = transport.receive_datagram(timeout, self._wakeup.reader)
            if received is None:
                return
            try:
                self._handle(transport, received)
            except OSError as error:  # one answer that cannot be sent harms nothing else
                log.debug("path check answer not sent to=%s error=%s", received.source, error)

    def _take_pending(self, now: float) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            measure, self._measure = self._measure, {}
            members = set(self._members.values())
        timed = ((k, (e,), True) for k, e in measure.items())
        checked = ((k, endpoints, False) for k, endpoints in pending.items())
        for public_key, endpoints, timing_only in (*timed, *checked):
            if public_key not in members:
                continue
            for endpoint in endpoints:
                identity = (public_key, endpoint)
                running = self._checks.get(identity)
                # Under way: goes on, unless it was answered already (asked again, it is
                # asked anew: an answer from before may no longer count for the agent), or a
                # candidate's check finds a timing running (whose answer is not recorded as
                # a candidate's).
                if (
                    running is not None
                    and not running.answered
                    and now - running.started < CHECK_SPAN
                    and (timing_only or not running.timing_only)
                ):
                    continue
                self._checks.pop(identity, None)
                self._checks[identity] = _Check(public_key, endpoint, now, 0, timing_only)
                while len(self._checks) > MAX_CHECKS:
                    self._checks.popitem(last=False)

    def _next_due(self) -> float:
        now = self.monotonic()
        # Nothing to send: wait for a datagram, or a check asked for (it pokes the thread);
        # an idle agent's threads do not wake by the second.
        due = now + IDLE_TURN_SECONDS
        for check in self._checks.values():
            if check.sends < len(CHECK_AT):
                due = min(due, check.started + CHECK_AT[check.sends])
            else:
                due = min(due, check.started + CHECK_SPAN)  # when it is forgotten
        if self._slice_sent >= SEND_BUDGET:
            due = max(due, self._slice_start + SEND_SLICE)
        return due

    def _send_due(self, transport: AddressedTransport, now: float) -> None:
        if now - self._slice_start >= SEND_SLICE:
            self._slice_start, self._slice_sent = now, 0
        finished = []
        for identity, check in self._checks.items():
            if check.sends >= len(CHECK_AT):
                if now - check.started >= CHECK_SPAN:
                    finished.append(identity)
                continue
            if now < check.started + CHECK_AT[check.sends] or self._slice_sent >= SEND_BUDGET:
                continue
            check.sends += 1
            self._slice_sent += 1
            sent = self._send_request(
                transport, check.public_key, check.endpoint, now, check.timing_only
            )
            if not sent:
                check.sends = len(CHECK_AT)  # no key, or no route to it: no more tries
        for identity in finished:
            del self._checks[identity]
        horizon = now - CHECK_SPAN
        while self._outstanding:
            oldest = next(iter(self._outstanding.values()))
            if oldest.sent_at >= horizon:
                break
            self._outstanding.popitem(last=False)

    def _send_request(
        self,
        transport: AddressedTransport,
        public_key: str,
        endpoint: Endpoint,
        now: float,
        timing_only: bool = False,
    ) -> bool:
        """One request; False when it cannot be sent (not a member any more, no route to
        it: an IPv6 candidate on an IPv4-only host)."""
        key = self._pair_key_of(public_key)
        if key is None:
            return False
        transaction_id = self.random_bytes(codec.TRANSACTION_ID_BYTES)
        self._outstanding[transaction_id] = _Outstanding(public_key, endpoint, now, timing_only)
        while len(self._outstanding) > MAX_CHECKS * len(CHECK_AT):
            self._outstanding.popitem(last=False)
        try:
            transport.send(endpoint, codec.request(self._public, transaction_id, key))
        except OSError as error:
            log.debug("path check not sent to=%s error=%s", endpoint, error)
            return False
        self.sent += 1
        return True

    def _pair_key_of(self, public_key: str) -> bytes | None:
        with self._lock:
            raw = self._raw_keys.get(public_key)
        return None if raw is None else self._pair_key(raw)

    def _pair_key(self, raw: bytes) -> bytes | None:
        with self._lock:
            if raw not in self._members:
                return None
            cached = self._keys.get(raw)
        if cached is not None:
            return cached
        try:
            key = codec.pair_key(self._private, raw, self._public, self._cluster_key)
        except ValueError:
            return None
        with self._lock:
            if raw in self._members:
                self._keys[raw] = key
        return key

    def _handle(self, transport: AddressedTransport, datagram: Datagram) -> None:
        try:
            message = codec.parse(datagram.payload)
        except codec.PathCheckError:
            return
        if message.kind == codec.REQUEST:
            self._answer(transport, datagram, message)
        else:
            self._answered(datagram.source, datagram.payload, message)

    def _answer(
        self, transport: AddressedTransport, datagram: Datagram, message: codec.PathMessage
    ) -> None:
        source, payload = datagram.source, datagram.payload
        # Authenticated before any limit is charged: strangers, whatever they send and
        # whichever source they spoof, cannot use up the answers members are owed. A
        # stranger costs a dict lookup; a forgery under a member's key, one keyed hash.
        key = self._pair_key(message.sender)
        if key is None or not codec.authentic(payload, key):
            return
        now = self.monotonic()
        # Before any limit is charged: copies of a request beyond its answers, from however
        # many sources, must not spend the answers its sender is owed for its new ones.
        mac = payload[-codec.MAC_BYTES :]
        answered_to = self._answered_to(mac, now)
        here = source.address.packed + source.port.to_bytes(2, "big")
        if here in answered_to or len(answered_to) >= ANSWERS_PER_REQUEST:
            return
        sender = message.sender.hex()
        if not (
            self._per_source.allow(f"{source_key(str(source.address))} {sender}", now)
            and self._per_sender.allow(sender, now)
            and self._overall.allow("all", now)
        ):
            return
        if answered_to:
            # In place: the request stays where its first answer put it, and is forgotten
            # when that one would be (a copy must not keep it, nor its answers, alive).
            first, _ = self._seen[mac]
            self._seen[mac] = (first, (*answered_to, here))
        else:
            self._seen[mac] = (now, (here,))
            while len(self._seen) > SEEN_TRANSACTIONS:
                self._seen.popitem(last=False)
        # From the address the request came to (if it is one of ours): a NAT or firewall in
        # front of the requester admits only that one (a host with several addresses would
        # otherwise answer from its first).
        with self._lock:
            own = self._own
        from_address = datagram.destination if datagram.destination in own else None
        answer = codec.answer(self._public, message.transaction_id, key, source)
        transport.send(source, answer, from_address)
        self.answered += 1
        self._check_back(transport, message.sender, source, now)

    def _answered_to(self, mac: bytes, now: float) -> tuple[bytes, ...]:
        """The sources this request was answered at, within SEEN_FOR_SECONDS."""
        horizon = now - SEEN_FOR_SECONDS
        while self._seen:
            oldest, (first, _) = next(iter(self._seen.items()))
            if first >= horizon:
                break
            del self._seen[oldest]
        remembered = self._seen.get(mac)
        return () if remembered is None else remembered[1]

    def _check_back(
        self,
        transport: AddressedTransport,
        sender: bytes,
        source: Endpoint,
        now: float,
    ) -> None:
        """A member's request just opened its NAT towards us: check that path back now,
        rather than at our next scheduled retry (its answer is what proves the path to us).
        Only to an endpoint we were asked to check (a candidate), not when it answered us
        lately (no ping-pong), at most once a second per path, within the overall limit."""
        with self._lock:
            public_key = self._members.get(sender)
            wanted = self._wanted.get(public_key or "", frozenset())
            answered = self._answers.get(public_key or "", {}).get(source)
        if public_key is None or source not in wanted:
            return
        if answered is not None and now - answered < CHECK_SPAN:
            return
        identity = (public_key, source)
        last = self._checked_back.get(identity)
        if last is not None and now - last < CHECK_BACK_GAP:
            return
        if not self._overall.allow("all", now):
            return
        self._checked_back[identity] = now
        if len(self._checked_back) > MAX_CHECKS:
            horizon = now - CHECK_BACK_GAP
            self._checked_back = {i: t for i, t in self._checked_back.items() if t >= horizon}
        # From the address routing picks, not from the one the request came to: the
        # answer proves a path to the peer's WireGuard, which sends from the routed source
        # once it is recreated (it has no source cached then). A check back from a second
        # address would prove a path WireGuard does not take.
        self._send_request(transport, public_key, source, now)

    def _answered(self, source: Endpoint, payload: bytes, message: codec.PathMessage) -> None:
        asked = self._outstanding.get(message.transaction_id)
        if asked is None or asked.endpoint != source:
            return  # not ours, or from another place than asked (a NAT that remaps)
        with self._lock:
            expected = self._raw_keys.get(asked.public_key)
        key = None if expected is None else self._pair_key(expected)
        if key is None or message.sender != expected or not codec.authentic(payload, key):
            return
        with self._lock:
            own = self._own
        if message.observed is None or message.observed.address not in own:
            # The peer saw our request come from an address that is not ours: it came
            # through someone else (a relay posing as a candidate), proving no path of ours.
            log.debug("path check answer refused: seen_as=%s is not ours", message.observed)
            return
        del self._outstanding[message.transaction_id]
        now = self.monotonic()
        identity = (asked.public_key, asked.endpoint)
        check = self._checks.get(identity)
        # Answered: no more requests. A timing's answer does not complete a candidate's
        # check that replaced the timing (that answer is not recorded as a candidate's).
        if check is not None and (check.timing_only or not asked.timing_only):
            check.sends = len(CHECK_AT)
            check.answered = True
        rtt = now - asked.sent_at
        with self._lock:
            # Per endpoint: answers at a member's other candidates (checks of them while
            # this one carries the tunnel) must not wipe the timings of this one.
            timings = self._round_trips.setdefault(asked.public_key, {})
            recent = timings.pop(asked.endpoint, ())[-(ROUND_TRIPS_KEPT - 1) :]
            timings[asked.endpoint] = (*recent, (now, rtt))
            while len(timings) > TIMED_ENDPOINTS:
                del timings[next(iter(timings))]  # the one answered longest ago
        if asked.timing_only:
            # Not a candidate's answer: the agent's path logic never sees it (a path in use
            # that answered a timing must not pass for one that answers its checks).
            self.timed += 1
            log.debug(
                "path timed peer=%s endpoint=%s rtt_ms=%.1f",
                asked.public_key[:8],
                asked.endpoint,
                rtt * 1000,
            )
            return
        with self._lock:
            by_endpoint = self._answers.setdefault(asked.public_key, {})
            by_endpoint[asked.endpoint] = now
            if len(by_endpoint) > MAX_ANSWERS_PER_PEER:
                horizon = now - ANSWER_KEEP
                kept = sorted(
                    ((e, t) for e, t in by_endpoint.items() if t >= horizon),
                    key=lambda item: item[1],
                )[-MAX_ANSWERS_PER_PEER:]
                self._answers[asked.public_key] = dict(kept)
        last = self._announced.get(identity)
        if last is None or now - last >= ANSWER_EVENT_GAP:
            self._announced[identity] = now
            if len(self._announced) > MAX_CHECKS:
                horizon = now - ANSWER_EVENT_GAP
                self._announced = {i: t for i, t in self._announced.items() if t >= horizon}
            log.debug(
                "path check answered peer=%s endpoint=%s rtt_ms=%.1f seen_as=%s",
                asked.public_key[:8],
                asked.endpoint,
                rtt * 1000,
                message.observed,
            )
            self.events.put(PathAnswered(asked.public_key, asked.endpoint))
