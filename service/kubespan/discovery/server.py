"""The discovery service's request handling: a thin layer between the HTTP transport
(http.py) and the pure Registry, plus the state's lifecycle (epochs, snapshots, GC).

Checks run cheapest first, and nothing is stored before all of them pass: the per-source rate
limit, the path, the method, the signature (made for this service) and its freshness and
nonce, then the request body's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from kubespan.discovery import limits, snapshot
from kubespan.discovery.forwarded import client_address, is_trusted, source_key
from kubespan.discovery.http import HttpLimits, HttpServer, Request, Response, error_body
from kubespan.discovery.metrics import Metrics
from kubespan.discovery.protocol import (
    BadRequest,
    allow,
    listing_body,
    parse_body,
    parse_post_endpoints,
    parse_put,
    parse_query,
    parse_watch,
    route,
)
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.discovery.replay import ReplayGuard
from kubespan.discovery.signing import SignatureRejected, verify
from kubespan.discovery.state import Quotas, Registry
from kubespan.discovery.stunserver import StunAdvert, StunResponder
from kubespan.netaddr import IPNetwork

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Settings:
    state_dir: Path | None = None
    rate: float = limits.RATE_PER_SOURCE
    burst: float = limits.BURST_PER_SOURCE
    max_skew: float = limits.MAX_CLOCK_SKEW_SECONDS
    trusted_proxies: tuple[IPNetwork, ...] = field(default=())
    snapshot_interval: float = limits.SNAPSHOT_INTERVAL_SECONDS
    gc_interval: float = limits.GC_INTERVAL_SECONDS
    # Canonical authorities (host:port) requests must be signed for: see signing.py.
    services: tuple[str, ...] = ()
    quotas: Quotas = field(default_factory=Quotas)
    http: HttpLimits = field(default_factory=HttpLimits)
    # STUN reflectors named to clients in `hello` (see stunserver.StunAdvert).
    stun: tuple[StunAdvert, ...] = ()


def json_response(status: int, document: object) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


class DiscoveryApp:
    """`clock` gives wall-clock seconds (TTLs survive restarts)."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        clock: Clock = time.time,
        replays: ReplayGuard | None = None,
    ) -> None:
        if not settings.services:
            raise ValueError("the service needs at least one name to verify signatures against")
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings.rate, settings.burst)
        self.stun = StunResponder(self.metrics.stun)
        # Without saved state there is nothing of an earlier run to roll back to; what was
        # signed before this second is refused all the same.
        self.replays = replays or ReplayGuard(settings.max_skew, not_before=int(clock()) - 1)
        self.ready = False
        self.stopping = False
        self.transports: list[HttpServer] = []
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._watchers = 0
        self._encoded: dict[tuple[str, int | None, int, int], bytes] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._saving = asyncio.Lock()

    @classmethod
    def open(cls, settings: Settings, clock: Clock = time.time) -> DiscoveryApp:
        """The service with its state restored and a new epoch made durable; the state
        directory is proven writable here (StateDirError), before anything is served."""
        now = clock()
        if settings.state_dir is None:
            registry = Registry(quotas=settings.quotas)
            registry.start_epoch(snapshot.clock_epoch(now))
            return cls(registry, settings, clock)
        snapshot.check_state_dir(settings.state_dir)
        restored = snapshot.load(settings.state_dir, now, settings.quotas)
        epoch = max(restored.epoch + 1, snapshot.clock_epoch(now))
        try:
            snapshot.write_epoch(settings.state_dir, epoch)
        except OSError as error:
            raise snapshot.StateDirError(
                f"{settings.state_dir}: cannot write: {error.strerror}"
            ) from None
        restored.registry.start_epoch(epoch)
        # After a clean stop every nonce of the last window was saved; after a crash some
        # may be lost, so whatever was signed up to this start is refused. (The first
        # second is then waited out: a client with a good clock is not refused at all.)
        not_before = int(now) - 1
        if restored.found and not restored.clean:
            not_before = int(now)
            time.sleep(max(0.0, not_before + 1 - clock()))
        replays = ReplayGuard(settings.max_skew, not_before=0 if restored.clean else not_before)
        replays.restore(restored.nonces, now)
        app = cls(restored.registry, settings, clock, replays)
        app.save_now(clean=False)  # a crash from here on is recognised as one
        if not restored.clean:
            log.warning(
                "unclean start (first start, crash or kill): requests signed before %d are refused",
                int(now),
            )
        return app

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._every(self.settings.gc_interval, self.gc)))
        if self.settings.state_dir is not None:
            interval = self.settings.snapshot_interval
            self._tasks.append(asyncio.create_task(self._every(interval, self.save)))
        self.ready = True

    def wake_all(self) -> int:
        """Stop waiting: every open long poll answers now; how many there were."""
        self.stopping = True
        self.ready = False
        woken = self._watchers
        for cluster_id in list(self._waiters):
            self._notify(cluster_id)
        return woken

    async def stop(self) -> bool:
        """After the transports are closed: stop the timers, write the final snapshot;
        whether it was written."""
        self.wake_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return await self.save(clean=True)

    async def _every(self, interval: float, action: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                result = action()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as error:  # noqa: BLE001 - the timer outlives any one failure
                self.metrics.errors += 1
                log.error("periodic task failed error=%s: %s", type(error).__name__, error)

    def gc(self) -> None:
        now = self.clock()
        for cluster_id in self.registry.collect_garbage(now):
            self._notify(cluster_id)
        self.limiter.forget_idle(now)
        self.stun.limiter.forget_idle(self.stun.clock())
        self._next_epoch_if_needed()

    def _next_epoch_if_needed(self) -> None:
        if not self.registry.needs_new_epoch:
            return
        epoch = max(self.registry.epoch + 1, snapshot.clock_epoch(self.clock()))
        if self.settings.state_dir is not None:
            try:
                snapshot.write_epoch(self.settings.state_dir, epoch)
            except OSError as error:
                # Not switching is safe: this epoch still has room (see limits.MAX_COUNTER).
                log.error("cannot write the next epoch error=%s", error)
                return
        self.registry.start_epoch(epoch)
        log.info("new revision epoch=%d", epoch)

    def save_now(self, clean: bool) -> None:
        """Write a snapshot synchronously (at start, before anything is served)."""
        state_dir = self.settings.state_dir
        if state_dir is None:
            return
        view = self._view(clean)
        try:
            snapshot.save(view, state_dir)
        except OSError as error:
            raise snapshot.StateDirError(f"{state_dir}: cannot write: {error.strerror}") from None

    def _view(self, clean: bool) -> snapshot.View:
        now = self.clock()
        return snapshot.capture(self.registry, self.replays.export(now), clean, now)

    async def save(self, clean: bool = False) -> bool:
        """Snapshot: captured on the loop (references only), encoded and written in a worker
        thread so the event loop keeps serving. Whether it was written."""
        state_dir = self.settings.state_dir
        if state_dir is None:
            return False
        async with self._saving:
            view = self._view(clean)
            started = time.monotonic()
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, snapshot.save, view, state_dir
                )
            except OSError as error:
                self.metrics.snapshot_failures += 1
                log.error("SNAPSHOT FAILED dir=%s error=%s", state_dir, error)
                return False
            self.metrics.snapshot_seconds = time.monotonic() - started
            return True

    # --- long polls --------------------------------------------------------------------------

    def watching(self, cluster_id: str) -> bool:
        """Whether a long poll is waiting on `cluster_id`."""
        return bool(self._waiters.get(cluster_id))

    def _notify(self, cluster_id: str) -> None:
        for waiter in self._waiters.pop(cluster_id, ()):
            if not waiter.done():
                waiter.set_result(None)
                self.metrics.notifications += 1

    async def _wait_change(self, cluster_id: str, timeout: float) -> None:
        # A bare future per watcher and one timer: a thousand watchers woken by one change
        # cost a thousand callbacks, not a thousand tasks.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.setdefault(cluster_id, set()).add(waiter)
        timer = loop.call_later(timeout, _settle, waiter)
        self._watchers += 1
        try:
            await waiter
        finally:
            timer.cancel()
            self._watchers -= 1
            waiters = self._waiters.get(cluster_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[cluster_id]

    # --- requests ----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        """The public API."""
        route = "other"
        try:
            route, response = await self._handle(request)
        except BadRequest as error:
            extra: list[tuple[bytes, bytes]] = []
            if error.retry:
                extra.append((b"retry-after", str(error.retry).encode()))
            if error.allow:
                extra.append((b"allow", error.allow.encode()))
            response = Response(
                error.status, error_body(error.field, error.message), headers=tuple(extra)
            )
        self.metrics.request(request.method, route, response.status)
        # RFC 9110's Date, from the clock signatures are checked against: a node whose
        # requests are refused as stale can tell by how much its clock is off.
        date = (b"date", email.utils.formatdate(self.clock(), usegmt=True).encode())
        return replace(response, headers=(*response.headers, date))

    async def _handle(self, request: Request) -> tuple[str, Response]:
        method = request.method
        path, _, query = request.target.partition("?")
        if path == "/openapi.json":
            allow(method, "GET")
            return "openapi", Response(200, openapi_document())
        source = client_address(
            request.peer, request.headers.get("x-forwarded-for"), self.settings.trusted_proxies
        )
        key = source_key(source) if source else "unknown"
        now = self.clock()
        if not self.limiter.allow(key, now):
            self.metrics.reject("rate")
            raise BadRequest(
                "source",
                f"too many requests from {key}: at most {self.settings.rate:g}/s",
                status=429,
                retry=max(1, round(self.limiter.retry_after(key))),
            )
        name, cluster, affiliate = route(path, method)
        try:
            timestamp, nonce = verify(
                cluster,
                method,
                request.target,
                request.body,
                request.headers,
                now,
                self.settings.max_skew,
                self.settings.services,
            )
        except SignatureRejected as error:
            self.metrics.reject("signature")
            raise BadRequest(error.field, error.message, status=401) from None
        if self.replays.predates_start(timestamp):
            self.metrics.reject("replay")
            raise BadRequest(
                "x-kubespan-timestamp",
                "predates the service's last unclean start; sign the request again",
                status=401,
            )
        if not self.replays.check_and_remember(cluster, nonce, timestamp, now):
            self.metrics.reject("replay")
            raise BadRequest("x-kubespan-nonce", "was already used (a replayed request)", 401)
        return name, await self._dispatch(name, cluster, affiliate, request.body, query, source)

    async def _dispatch(
        self,
        route: str,
        cluster: str,
        affiliate: str | None,
        body: bytes,
        query: str,
        source: str | None,
    ) -> Response:
        if route == "hello":
            stun = [advert.as_json() for advert in self.settings.stun]
            return json_response(200, {"client_address": source, "stun": stun})
        if route == "list":
            since, wait = parse_watch(parse_query(query))
            current = self.registry.cluster_revision(cluster)
            if since is not None and since == current and wait > 0 and not self.stopping:
                await self._wait_change(cluster, wait)
            return Response(200, self._encoded_listing(cluster, since))
        if query:
            raise BadRequest("query", "this operation takes no query parameters")
        assert affiliate is not None
        now = self.clock()
        reporter = source_key(source) if source else "unknown"
        if route == "put":
            request = parse_put(parse_body(body))
            revision = self.registry.put(cluster, affiliate, request, now, reporter)
        elif route == "endpoints":
            posted = parse_post_endpoints(parse_body(body))
            revision = self.registry.add_endpoints(
                cluster, affiliate, posted.endpoints, posted.ttl, now, reporter
            )
        else:
            if body:
                raise BadRequest("body", "DELETE takes no body")
            revision = self.registry.delete(cluster, affiliate)
        self._notify(cluster)
        self._next_epoch_if_needed()
        return json_response(200, {"revision": revision})

    def _encoded_listing(self, cluster: str, since: int | None) -> bytes:
        """Watchers woken by one change all ask for the same thing: encode it once."""
        now = self.clock()
        key = (cluster, since, self.registry.cluster_revision(cluster), int(now))
        encoded = self._encoded.get(key)
        if encoded is None:
            if len(self._encoded) > 256:
                self._encoded.clear()
            listing = self.registry.listing(cluster, now, since)
            encoded = json.dumps(listing_body(listing), separators=(",", ":")).encode()
            self._encoded[key] = encoded
        return encoded

    # --- operations listener (--metrics-listen) ----------------------------------------------

    async def handle_ops(self, request: Request) -> Response:
        """Health and metrics, served only on the operations address."""
        path = request.target.partition("?")[0]
        try:
            allow(request.method, "GET")
            if path == "/healthz":
                return json_response(200, {"status": "ok"})
            if path == "/readyz":
                return json_response(200 if self.ready else 503, {"ready": self.ready})
            if path == "/metrics":
                return Response(200, self._metrics_text(), b"text/plain; version=0.0.4")
            raise BadRequest("path", "not found", status=404)
        except BadRequest as error:
            return Response(error.status, error_body(error.field, error.message))

    def _metrics_text(self) -> bytes:
        registry = self.registry
        gauges: dict[str, Callable[[], float]] = {
            "clusters": lambda: len(registry.clusters),
            "affiliates": registry.affiliate_count,
            "stored_bytes": lambda: registry.stored_bytes,
            "watchers": lambda: self._watchers,
            "epoch": lambda: registry.epoch,
            "replay_nonces": lambda: len(self.replays),
            "connections": lambda: sum(len(t.connections) for t in self.transports),
            "connections_waiting": lambda: sum(t.waiting for t in self.transports),
        }
        transports = {t.name: t.counters for t in self.transports}
        return self.metrics.render(gauges, transports).encode()


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def openapi_document() -> bytes:
    return resources.files("kubespan").joinpath("discovery/openapi.json").read_bytes()


def exempt_from_source_limits(trusted: tuple[IPNetwork, ...]) -> Callable[[str], bool]:
    """Trusted proxies carry many clients: their connections are not counted per source."""
    return lambda peer: is_trusted(peer, trusted)
