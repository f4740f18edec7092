"""One discovery service as the agent sees it: register and watch, in two threads.

The registrar keeps this node's sealed record on the service (PUT whenever the agent hands it
a new one, and again at once when the watcher finds it missing or stale on the service, e.g.
after the service restarted without its state), asks `hello` for the public address, resolves
the service's own addresses (members may never claim them), and reports harvested endpoints.
The watcher long-polls the listing and resumes from the last revision after any failure.
Both report to the agent through `events`.

Neither thread ever dies: every iteration catches everything, logs it, backs off and goes
on; every wait is cut short by `stop()`, whatever a server says in a Retry-After.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubespan.agent.backoff import Backoff
from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.listing import MAX_LISTED_AFFILIATES
from kubespan.discovery.members import Registration
from kubespan.discovery.payload import encode_endpoint, parse_address
from kubespan.discovery.protocol import Listing
from kubespan.discovery.view import ClusterView
from kubespan.errors import DiscoveryError
from kubespan.netaddr import Endpoint, IPAddress, reachable_unicast
from kubespan.threads import named_thread

log = logging.getLogger(__name__)

TTL_SECONDS = 30 * 60
WATCH_WAIT_SECONDS = 30.0
# A record found missing or stale is put back at once, but not more often than this: two
# services (or a lagging replica) disagreeing must not turn into a request storm.
REREGISTER_GAP_SECONDS = 5.0
LEAVE_DEADLINE_SECONDS = 5.0
# Between two listing requests: a service that answers at once, again and again, cannot
# make the watcher spin (changes are still seen within this).
LISTING_GAP_SECONDS = 0.2


@dataclass(frozen=True)
class ListingEvent:
    url: str
    listing: Listing
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReflexiveEvent:
    url: str
    address: IPAddress | None


@dataclass(frozen=True)
class SessionFailed:
    """A request to the service failed (the agent's readiness waits for one answer or one
    failure from every service)."""

    url: str


class DiscoverySession:
    def __init__(
        self,
        url: str,
        keys: ClusterKeys,
        events: queue.Queue[Any],
        rng: random.Random,
        random_bytes: Callable[[int], bytes],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.keys = keys
        self.events = events
        self.rng = rng
        self.random_bytes = random_bytes
        self.monotonic = monotonic
        self.reflexive: IPAddress | None = None
        # The STUN reflectors the service names (resolved: see _hello); replaced whole.
        self.stun_reflectors: tuple[Endpoint, ...] = ()
        self._hello_wanted = False
        # Called (from this session's thread) when the service names other reflectors.
        self.on_reflectors: Callable[[], None] | None = None
        # The service's own address, which members may never claim, when the URL names it:
        # what a host name resolves to is not believed (whoever answers DNS for it could
        # otherwise make members' addresses unroutable, and their traffic go in the clear).
        host = urllib.parse.urlsplit(url).hostname or ""
        try:
            self.addresses: tuple[IPAddress, ...] = (parse_address(host, "host"),)
        except ValueError:
            self.addresses = ()
        self.last_error: str | None = None
        self.last_answer: float | None = None  # wall clock, for status
        # How far the service's clock is ahead of ours (its Date header), for `kubespan check`:
        # signed requests are refused when the two differ by more than the service allows.
        self.clock_skew: float | None = None
        self.revision: int | None = None
        self._wanted: Registration | None = None
        self._sent: Registration | None = None
        self._sent_revision = 0
        self._reregister = False
        self._harvested: list[tuple[str, Endpoint]] = []
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [
            named_thread(self._register_loop, f"register {url}"),
            named_thread(self._watch_loop, f"watch {url}"),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()

    def join(self, timeout: float) -> None:
        deadline = self.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - self.monotonic()))

    def set_registration(self, registration: Registration) -> None:
        with self._wake:
            if self._wanted != registration:
                self._wanted = registration
                self._wake.notify_all()

    def refresh_address(self) -> None:
        """Ask `hello` again soon (this node's way out changed: its public address may have
        too), and register again after it."""
        with self._wake:
            self._hello_wanted = True
            self._wake.notify_all()

    def harvest(self, affiliate_id: str, endpoint: Endpoint) -> None:
        """Report, in the background, that another member was seen at `endpoint`."""
        with self._wake:
            if len(self._harvested) < 64:
                self._harvested.append((affiliate_id, endpoint))
            self._wake.notify_all()

    def leave(self, registration: Registration) -> bool:
        """Put this node's sealed leave record on the service, within a short deadline; the
        service's own DELETE would not do (a listing's absence proves nothing to peers)."""
        client = self._client(sleep=lambda _seconds: None)
        try:
            client.put(
                registration.affiliate_id,
                registration.data,
                list(registration.endpoints),
                TTL_SECONDS,
                deadline=LEAVE_DEADLINE_SECONDS,
            )
        except DiscoveryError as error:
            log.warning("could not leave discovery url=%s error=%s", self.url, error)
            return False
        finally:
            client.close()
        log.info("left discovery url=%s", self.url)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "revision": self.revision,
            "registered": self._sent is not None,
            "public_address": str(self.reflexive) if self.reflexive else None,
            "stun_reflectors": [str(r) for r in self.stun_reflectors],
            "last_error": self.last_error,
            "last_answer": self.last_answer,
            "clock_skew_s": None if self.clock_skew is None else round(self.clock_skew, 1),
        }

    # --- registrar ---------------------------------------------------------------------------

    def _client(self, sleep: Callable[[float], Any] | None = None) -> DiscoveryClient:
        return DiscoveryClient(
            self.url,
            self.keys,
            random_bytes=self.random_bytes,
            rng=self.rng,
            sleep=sleep or self._stopping.wait,
            on_clock_skew=self._clock_seen,
        )

    def _clock_seen(self, skew: float) -> None:
        self.clock_skew = skew

    def _register_loop(self) -> None:
        client = self._client()
        backoff = Backoff(base=1.0, cap=60.0, rng=self.rng)
        need_hello = True
        last_put = -REREGISTER_GAP_SECONDS
        while not self._stopping.is_set():
            try:
                with self._wake:
                    wanted = self._wanted
                    harvested, self._harvested = self._harvested, []
                    need_hello = need_hello or self._hello_wanted
                    self._hello_wanted = False
                    reregister = self._reregister and (
                        self.monotonic() - last_put >= REREGISTER_GAP_SECONDS
                    )
                    due = wanted is not None and (wanted != self._sent or need_hello or reregister)
                    if not due and not harvested:
                        wait = None
                        if self._reregister:
                            wait = max(0.1, last_put + REREGISTER_GAP_SECONDS - self.monotonic())
                        self._wake.wait(wait)
                        continue
                if harvested:
                    self._send_harvested(client, harvested)
                if not due or wanted is None:
                    continue
                if need_hello:
                    self._hello(client)
                    need_hello = False
                last_put = self.monotonic()
                with self._wake:
                    self._reregister = False
                self._put(client, wanted)
                backoff.reset()
            except DiscoveryError as error:
                delay = backoff.next_delay()
                self._failed(f"register: {error}", delay)
                need_hello = True
                self._stopping.wait(delay)
            except Exception as error:  # the thread must survive anything
                delay = backoff.next_delay()
                log.exception("registrar error url=%s retry_in=%.1fs", self.url, delay)
                self._failed(f"register: unexpected {type(error).__name__}", delay)
                self._stopping.wait(delay)
        client.close()

    def _send_harvested(
        self, client: DiscoveryClient, harvested: list[tuple[str, Endpoint]]
    ) -> None:
        for affiliate_id, endpoint in harvested:
            blob = self.keys.seal_endpoint(affiliate_id, encode_endpoint(endpoint))
            try:
                client.add_endpoints(affiliate_id, [blob], TTL_SECONDS)
                log.debug("reported harvested endpoint url=%s endpoint=%s", self.url, endpoint)
            except DiscoveryError as error:
                log.warning("harvest report failed url=%s error=%s", self.url, error)

    def _hello(self, client: DiscoveryClient) -> None:
        hello = client.hello_info()
        address = hello.client_address
        if hello.stun_problem is not None:
            log.warning("stun reflectors refused url=%s error=%s", self.url, hello.stun_problem)
        # Reflectors named without an address are at the service's own address: the one
        # in its URL, or else the one this request reached (a host name's).
        at = self.addresses or ((hello.service_address,) if hello.service_address else ())
        reflectors = hello.reflectors(at)
        reflectors_changed = reflectors != self.stun_reflectors
        if reflectors_changed:
            log.info(
                "discovery names stun reflectors url=%s reflectors=%s",
                self.url,
                ",".join(str(r) for r in reflectors) or "-",
            )
            self.stun_reflectors = reflectors
        if address is not None and not reachable_unicast(address):
            log.warning(
                "discovery url=%s says this node is at %s, which cannot be; ignored",
                self.url,
                address,
            )
            address = None
        if address != self.reflexive:
            log.info("discovery sees this node at url=%s address=%s", self.url, address)
        if reflectors_changed and self.on_reflectors is not None:
            # Straight to the STUN prober: the reconcile loop may be busy (its first pass
            # sets up the kernel), and the mapping belongs in the first records.
            self.on_reflectors()
        if address != self.reflexive or reflectors_changed:
            self.reflexive = address
            self.events.put(ReflexiveEvent(self.url, address))

    def _put(self, client: DiscoveryClient, wanted: Registration) -> None:
        revision = client.put(wanted.affiliate_id, wanted.data, list(wanted.endpoints), TTL_SECONDS)
        record = wanted.record
        if self._sent is None or self._sent.record.info != record.info:
            log.info(
                "registered url=%s version=%d addresses=%s endpoints=%s",
                self.url,
                record.version,
                ",".join(str(a) for a in record.info.addresses),
                ",".join(str(e) for e in record.endpoints),
            )
        else:
            log.debug("refreshed url=%s version=%d", self.url, record.version)
        self._sent, self._sent_revision = wanted, revision
        self._answered()

    def _answered(self) -> None:
        self.last_error = None
        self.last_answer = time.time()

    # --- watcher -----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """Long-poll for changes; after any failure, resume from the last revision seen, so
        nothing is missed and nothing is fetched twice."""
        client = self._client()
        view = ClusterView()
        backoff = Backoff(base=1.0, cap=30.0, rng=self.rng)
        while not self._stopping.is_set():
            try:
                listing, problems = client.fetch_listing(view.revision, WATCH_WAIT_SECONDS)
                backoff.reset()
                self._answered()
                first = view.revision is None
                changed = view.apply(listing)
                if len(view.affiliates) > MAX_LISTED_AFFILIATES:
                    # Deltas that add up to more than any cluster holds: start over with a
                    # whole listing rather than keep growing.
                    delay = backoff.next_delay()
                    self._failed(f"watch: listing grew past {MAX_LISTED_AFFILIATES}", delay)
                    view = ClusterView()
                    self._stopping.wait(delay)
                    continue
                if changed or first or problems:
                    self.revision = view.revision
                    self.events.put(ListingEvent(self.url, view.listing(), tuple(problems)))
                self._check_own(view)
                self._stopping.wait(LISTING_GAP_SECONDS)
            except DiscoveryError as error:
                delay = backoff.next_delay()
                self._failed(f"watch: {error}", delay)
                self._stopping.wait(delay)
            except Exception as error:  # the thread must survive anything
                delay = backoff.next_delay()
                log.exception("watcher error url=%s retry_in=%.1fs", self.url, delay)
                self._failed(f"watch: unexpected {type(error).__name__}", delay)
                view = ClusterView()
                self._stopping.wait(delay)
        client.close()

    def _check_own(self, view: ClusterView) -> None:
        """Our record must be on the service as we last put it: a service that restarted
        without its state, or serves an older record, gets ours again at once."""
        sent = self._sent
        if sent is None:
            return
        listed = view.affiliates.get(sent.affiliate_id)
        if listed is not None and listed.data == sent.data:
            return
        if listed is not None and (view.revision or 0) < self._sent_revision:
            return  # a listing from before our last put landed
        with self._wake:
            if self._sent is sent and not self._reregister:
                what = "missing from" if listed is None else "stale on"
                log.info("own record is %s the service; registering again url=%s", what, self.url)
                self._reregister = True
                self._wake.notify_all()

    def _failed(self, message: str, delay: float) -> None:
        if message != self.last_error:
            log.warning("discovery failed url=%s retry_in=%.1fs error=%s", self.url, delay, message)
        self.last_error = message
        self.events.put(SessionFailed(self.url))
