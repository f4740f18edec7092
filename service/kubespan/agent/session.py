"""One discovery service as the agent sees it: register, refresh, and watch, in two threads.

The registrar keeps this node's sealed registration current (PUT on change, refresh at half
the TTL, hello to learn the public address); the watcher long-polls the member listing and
resumes from the last revision after any failure. Both report to the agent through `events`.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from kubespan.agent.backoff import Backoff
from kubespan.crypto import ClusterKeys
from kubespan.discovery.client import DiscoveryClient
from kubespan.discovery.members import Registration, seal_registration
from kubespan.discovery.payload import encode_endpoint
from kubespan.discovery.protocol import Listing
from kubespan.discovery.view import ClusterView
from kubespan.errors import DiscoveryError
from kubespan.model import AffiliateInfo
from kubespan.netaddr import Endpoint, IPAddress

log = logging.getLogger(__name__)

TTL_SECONDS = 30 * 60
WATCH_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class ListingEvent:
    url: str
    listing: Listing


@dataclass(frozen=True)
class ReflexiveEvent:
    url: str
    address: IPAddress | None


class DiscoverySession:
    def __init__(
        self,
        url: str,
        keys: ClusterKeys,
        events: queue.Queue[Any],
        rng: random.Random,
        random_bytes: Any,
    ) -> None:
        self.url = url
        self.keys = keys
        self.events = events
        self.rng = rng
        self.random_bytes = random_bytes
        self.reflexive: IPAddress | None = None
        self.last_error: str | None = None
        self.revision: int | None = None
        self._wanted: tuple[AffiliateInfo, tuple[Endpoint, ...]] | None = None
        self._harvested: list[tuple[str, Endpoint]] = []
        self._sent: tuple[AffiliateInfo, tuple[Endpoint, ...]] | None = None
        self._sealed: Registration | None = None
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._register_loop, name=f"register {url}", daemon=True),
            threading.Thread(target=self._watch_loop, name=f"watch {url}", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()

    def leave(self, affiliate_id: str) -> None:
        client = self._client()
        try:
            client.delete(affiliate_id)
            log.info("left discovery url=%s", self.url)
        except DiscoveryError as error:
            log.warning("could not leave discovery url=%s error=%s", self.url, error)
        finally:
            client.close()

    def harvest(self, affiliate_id: str, endpoint: Endpoint) -> None:
        """Report, in the background, that another member was seen at `endpoint`."""
        with self._wake:
            self._harvested.append((affiliate_id, endpoint))
            self._wake.notify_all()

    def set_registration(self, info: AffiliateInfo, endpoints: tuple[Endpoint, ...]) -> None:
        with self._wake:
            if self._wanted != (info, endpoints):
                self._wanted = (info, endpoints)
                self._wake.notify_all()

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "revision": self.revision,
            "registered": self._sent is not None,
            "public_address": str(self.reflexive) if self.reflexive else None,
            "last_error": self.last_error,
        }

    # --- registrar ---------------------------------------------------------------------------

    def _client(self) -> DiscoveryClient:
        return DiscoveryClient(self.url, self.keys, random_bytes=self.random_bytes, rng=self.rng)

    def _register_loop(self) -> None:
        client = self._client()
        backoff = Backoff(base=1.0, cap=60.0, rng=self.rng)
        refresh_at = 0.0
        need_hello = True
        while not self._stopping.is_set():
            with self._wake:
                wanted = self._wanted
                harvested, self._harvested = self._harvested, []
                due = wanted is not None and (
                    wanted != self._sent or time.monotonic() >= refresh_at or need_hello
                )
                if not due and not harvested:
                    timeout = max(0.1, refresh_at - time.monotonic()) if wanted else None
                    self._wake.wait(timeout)
                    continue
            if harvested:
                self._send_harvested(client, harvested)
            if not due:
                continue
            assert wanted is not None
            try:
                if need_hello:
                    self._hello(client)
                    need_hello = False
                self._put(client, wanted)
            except DiscoveryError as error:
                delay = backoff.next_delay()
                self._failed(f"register: {error}", delay)
                need_hello = True
                self._stopping.wait(delay)
                continue
            backoff.reset()
            refresh_at = time.monotonic() + TTL_SECONDS / 2
        client.close()

    def _send_harvested(
        self, client: DiscoveryClient, harvested: list[tuple[str, Endpoint]]
    ) -> None:
        for affiliate_id, endpoint in harvested:
            blob = self.keys.seal_endpoint(affiliate_id, encode_endpoint(endpoint))
            try:
                client.add_endpoints(affiliate_id, [blob], TTL_SECONDS)
                log.info("reported harvested endpoint url=%s endpoint=%s", self.url, endpoint)
            except DiscoveryError as error:
                log.warning("harvest report failed url=%s error=%s", self.url, error)

    def _hello(self, client: DiscoveryClient) -> None:
        address = client.hello()
        if address != self.reflexive:
            log.info("discovery sees this node at url=%s address=%s", self.url, address)
            self.reflexive = address
            self.events.put(ReflexiveEvent(self.url, address))

    def _put(
        self, client: DiscoveryClient, wanted: tuple[AffiliateInfo, tuple[Endpoint, ...]]
    ) -> None:
        info, endpoints = wanted
        if self._sealed is None or self._sent != wanted:
            # Re-seal only when the content changed: an identical blob refreshes the TTL without
            # waking every watcher of the cluster.
            self._sealed = seal_registration(self.keys, info, endpoints, self.random_bytes(24))
        sealed = self._sealed
        client.put(sealed.affiliate_id, sealed.data, list(sealed.endpoints), TTL_SECONDS)
        if self._sent != wanted:
            log.info(
                "registered url=%s addresses=%s endpoints=%s",
                self.url,
                ",".join(str(a) for a in info.addresses),
                ",".join(str(e) for e in endpoints),
            )
        self._sent = wanted
        self.last_error = None

    # --- watcher -----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """Long-poll for changes; after any failure, resume from the last revision seen, so
        nothing is missed and nothing is fetched twice."""
        client = self._client()
        view = ClusterView()
        backoff = Backoff(base=1.0, cap=30.0, rng=self.rng)
        while not self._stopping.is_set():
            try:
                listing = client.listing(since=view.revision, wait=WATCH_WAIT_SECONDS)
            except DiscoveryError as error:
                delay = backoff.next_delay()
                self._failed(f"watch: {error}", delay)
                self._stopping.wait(delay)
                continue
            backoff.reset()
            first = view.revision is None
            if view.apply(listing) or first:
                self.revision = view.revision
                self.events.put(ListingEvent(self.url, view.listing()))
        client.close()

    def _failed(self, message: str, delay: float) -> None:
        if message != self.last_error:
            log.warning("discovery failed url=%s retry_in=%.1fs error=%s", self.url, delay, message)
        self.last_error = message
