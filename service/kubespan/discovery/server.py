"""The discovery service: a thin ASGI transport over the pure Registry, plus its lifecycle.

Checks run cheapest first, and nothing is stored before all of them pass: the per-source rate
limit, the path, the method, the body size, the signature and its freshness and nonce, then
the request body's fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from kubespan.discovery import limits, snapshot
from kubespan.discovery.forwarded import client_address
from kubespan.discovery.metrics import Metrics
from kubespan.discovery.protocol import (
    API_PREFIX,
    BadRequest,
    check_id,
    listing_body,
    parse_post_endpoints,
    parse_put,
    parse_watch,
)
from kubespan.discovery.ratelimit import RateLimiter
from kubespan.discovery.replay import ReplayGuard
from kubespan.discovery.signing import SignatureRejected, verify
from kubespan.discovery.state import Registry
from kubespan.netaddr import IPNetwork

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Clock = Callable[[], float]
JSON = b"application/json"


@dataclass(frozen=True)
class Settings:
    state_dir: Path | None = None
    rate: float = limits.RATE_PER_SOURCE
    burst: float = limits.BURST_PER_SOURCE
    max_skew: float = limits.MAX_CLOCK_SKEW_SECONDS
    trusted_proxies: tuple[IPNetwork, ...] = field(default=())
    snapshot_interval: float = limits.SNAPSHOT_INTERVAL_SECONDS
    gc_interval: float = limits.GC_INTERVAL_SECONDS


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(status: int, document: Any) -> Response:
    return Response(status, json.dumps(document, separators=(",", ":")).encode())


class DiscoveryApp:
    """ASGI application. `clock` gives wall-clock seconds (TTLs survive restarts)."""

    def __init__(
        self, registry: Registry, settings: Settings | None = None, clock: Clock = time.time
    ) -> None:
        self.registry = registry
        self.settings = settings or Settings()
        self.clock = clock
        self.metrics = Metrics()
        self.limiter = RateLimiter(self.settings.rate, self.settings.burst)
        self.replays = ReplayGuard(self.settings.max_skew)
        self.ready = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._watchers = 0
        self._encoded: dict[tuple[str, int | None, int], bytes] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        self._tasks.append(asyncio.create_task(self._every(self.settings.gc_interval, self.gc)))
        if self.settings.state_dir is not None:
            interval = self.settings.snapshot_interval
            self._tasks.append(asyncio.create_task(self._every(interval, self.save)))
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.save()

    async def _every(self, interval: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            action()

    def gc(self) -> None:
        now = self.clock()
        for cluster_id in self.registry.collect_garbage(now):
            self._notify(cluster_id)
        self.limiter.forget_idle(now)

    def save(self) -> None:
        if self.settings.state_dir is None:
            return
        try:
            snapshot.save(self.registry, self.settings.state_dir)
        except OSError as error:
            self.metrics.snapshot_failures += 1
            log.error("SNAPSHOT FAILED dir=%s error=%s", self.settings.state_dir, error)

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

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = "other"
        try:
            route, response = await self._handle(scope, receive)
        except BadRequest as error:
            extra: list[tuple[bytes, bytes]] = []
            if error.retry:
                extra.append((b"retry-after", str(error.retry).encode()))
            if error.allow:
                extra.append((b"allow", error.allow.encode()))
            body = json.dumps(error.body(), separators=(",", ":")).encode()
            response = Response(error.status, body, headers=tuple(extra))
        self.metrics.request(scope["method"], route, response.status)
        await _respond(send, response)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive) -> tuple[str, Response]:
        method: str = scope["method"]
        path: str = scope["path"]
        if path in _PLAIN:
            _allow(method, "GET")
            return path.strip("/"), self._plain(path)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        peer = scope.get("client")
        source = client_address(
            peer[0] if peer else None, headers.get("x-forwarded-for"), self.settings.trusted_proxies
        )
        now = self.clock()
        if not self.limiter.allow(source or "unknown", now):
            self.metrics.reject("rate")
            raise BadRequest(
                "source",
                f"too many requests from {source}: at most {self.settings.rate:g}/s",
                status=429,
                retry=max(1, round(self.limiter.retry_after(source or "unknown"))),
            )
        route, cluster, affiliate = _route(path, method)
        body = await _read_body(receive)
        query = scope.get("query_string", b"").decode("latin-1")
        target = f"{path}?{query}" if query else path
        try:
            timestamp, nonce = verify(
                cluster, method, target, body, headers, now, self.settings.max_skew
            )
        except SignatureRejected as error:
            self.metrics.reject("signature")
            raise BadRequest(error.field, error.message, status=401) from None
        if not self.replays.check_and_remember(cluster, nonce, timestamp, now):
            self.metrics.reject("replay")
            raise BadRequest("x-kubespan-nonce", "was already used (a replayed request)", 401)
        return route, await self._dispatch(route, cluster, affiliate, body, query, source)

    def _plain(self, path: str) -> Response:
        if path == "/healthz":
            return json_response(200, {"status": "ok"})
        if path == "/readyz":
            return json_response(200 if self.ready else 503, {"ready": self.ready})
        if path == "/openapi.json":
            return Response(200, openapi_document())
        text = self.metrics.render(
            {
                "clusters": lambda: len(self.registry.clusters),
                "affiliates": self.registry.affiliate_count,
                "watchers": lambda: self._watchers,
                "revision": lambda: self.registry.revision,
            }
        )
        return Response(200, text.encode(), b"text/plain; version=0.0.4")

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
            return json_response(200, {"client_address": source})
        if route == "list":
            since, wait = parse_watch(dict(parse_qsl(query)))
            if since is not None and since == self.registry.cluster_revision(cluster) and wait > 0:
                await self._wait_change(cluster, wait)
            return Response(200, self._encoded_listing(cluster, since))
        assert affiliate is not None
        now = self.clock()
        if route == "put":
            revision = self.registry.put(cluster, affiliate, parse_put(_json(body)), now)
        elif route == "endpoints":
            request = parse_post_endpoints(_json(body))
            revision = self.registry.add_endpoints(
                cluster, affiliate, request.endpoints, request.ttl, now
            )
        else:
            revision = self.registry.delete(cluster, affiliate)
        self._notify(cluster)
        return json_response(200, {"revision": revision})

    def _encoded_listing(self, cluster: str, since: int | None) -> bytes:
        """Watchers woken by one change all ask for the same thing: encode it once."""
        key = (cluster, since, self.registry.cluster_revision(cluster))
        encoded = self._encoded.get(key)
        if encoded is None:
            if len(self._encoded) > 256:
                self._encoded.clear()
            listing = self.registry.listing(cluster, self.clock(), since)
            encoded = json.dumps(listing_body(listing), separators=(",", ":")).encode()
            self._encoded[key] = encoded
        return encoded


_PLAIN = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _route(path: str, method: str) -> tuple[str, str, str | None]:
    """(route name, cluster, affiliate) of a /v1 path; 404/405 otherwise."""
    if not path.startswith(API_PREFIX + "/"):
        raise BadRequest("path", "not found", status=404)
    parts = path[len(API_PREFIX) + 1 :].split("/")
    if len(parts) < 3 or parts[0] != "clusters":
        raise BadRequest("path", "not found", status=404)
    cluster = check_id("cluster", parts[1])
    rest = parts[2:]
    if rest == ["hello"]:
        _allow(method, "GET")
        return "hello", cluster, None
    if rest == ["affiliates"]:
        _allow(method, "GET")
        return "list", cluster, None
    if len(rest) == 2 and rest[0] == "affiliates":
        affiliate = check_id("affiliate", rest[1])
        _allow(method, "PUT", "DELETE")
        return ("put" if method == "PUT" else "delete"), cluster, affiliate
    if len(rest) == 3 and rest[0] == "affiliates" and rest[2] == "endpoints":
        _allow(method, "POST")
        return "endpoints", cluster, check_id("affiliate", rest[1])
    raise BadRequest("path", "not found", status=404)


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise BadRequest(
            "method", f"{method} is not allowed here", status=405, allow=", ".join(allowed)
        )


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body", "must be valid JSON") from None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.MAX_BODY_BYTES:
            raise BadRequest("body", f"must be at most {limits.MAX_BODY_BYTES} bytes", status=413)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, response: Response) -> None:
    headers = [
        (b"content-type", response.content_type),
        (b"content-length", str(len(response.body)).encode()),
        *response.headers,
    ]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body})


def openapi_document() -> bytes:
    return resources.files("kubespan").joinpath("discovery/openapi.json").read_bytes()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(
    sock: socket.socket,
    settings: Settings,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    """Run the service on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn

    now = time.time()
    state_dir = settings.state_dir
    registry = snapshot.load(state_dir, now) if state_dir is not None else Registry()
    app = DiscoveryApp(registry, settings)
    host, port = sock.getsockname()[:2]
    scheme = "https" if tls_cert else "http"
    log.info("discovery service listening url=%s://%s:%d pid=%d", scheme, host, port, os.getpid())
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=75,
        # Long polls and idle keep-alive connections must not hold up a restart: give them
        # a moment, then stop (the snapshot is written in any case).
        timeout_graceful_shutdown=3,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
    uvicorn.Server(config).run(sockets=[sock])
