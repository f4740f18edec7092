"""The discovery service: a thin ASGI transport over the pure Registry, plus its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from kubespan.discovery import limits, snapshot
from kubespan.discovery.protocol import (
    API_PREFIX,
    BadRequest,
    check_id,
    listing_body,
    parse_put,
    parse_watch,
)
from kubespan.discovery.state import Registry

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Clock = Callable[[], float]


class DiscoveryApp:
    """ASGI application. `clock` gives wall-clock seconds (TTLs survive restarts)."""

    def __init__(
        self, registry: Registry, clock: Clock = time.time, state_dir: Path | None = None
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.state_dir = state_dir
        self._changed: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle -------------------------------------------------------------------------

    async def startup(self) -> None:
        self._tasks.append(asyncio.create_task(self._every(limits.GC_INTERVAL_SECONDS, self.gc)))
        if self.state_dir is not None:
            self._tasks.append(
                asyncio.create_task(self._every(limits.SNAPSHOT_INTERVAL_SECONDS, self.save))
            )

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.save()

    async def _every(self, interval: float, action: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                action()
            except OSError as error:
                log.error("periodic task failed action=%s error=%s", action.__name__, error)

    def gc(self) -> None:
        for cluster_id in self.registry.collect_garbage(self.clock()):
            self._notify(cluster_id)

    def save(self) -> None:
        if self.state_dir is not None:
            snapshot.save(self.registry, self.state_dir)

    def _notify(self, cluster_id: str) -> None:
        event = self._changed.pop(cluster_id, None)
        if event is not None:
            event.set()

    def watching(self, cluster_id: str) -> bool:
        """Whether a long poll is waiting on `cluster_id` (for tests and metrics)."""
        return cluster_id in self._changed

    async def _wait_change(self, cluster_id: str, timeout: float) -> None:
        event = self._changed.get(cluster_id)
        if event is None:
            event = self._changed[cluster_id] = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            status, body = await self._route(scope, receive)
        except BadRequest as error:
            status, body = error.status, error.body()
        await _respond(send, status, body)

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

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, dict[str, Any]]:
        method: str = scope["method"]
        path: str = scope["path"]
        if path == "/healthz":
            return 200, {"status": "ok"}
        if not path.startswith(API_PREFIX + "/"):
            raise BadRequest("path", "not found", status=404)
        parts = path[len(API_PREFIX) + 1 :].split("/")
        if parts == ["hello"]:
            _allow(method, "GET")
            client = scope.get("client")
            return 200, {"client_address": client[0] if client else None}
        if len(parts) < 3 or parts[0] != "clusters" or parts[2] != "affiliates" or len(parts) > 4:
            raise BadRequest("path", "not found", status=404)
        cluster_id = check_id("cluster", parts[1])
        if len(parts) == 3:
            _allow(method, "GET")
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            since, wait = parse_watch(query)
            return 200, await self._list(cluster_id, since, wait)
        affiliate_id = check_id("affiliate", parts[3])
        if method == "PUT":
            request = parse_put(await _read_json(receive))
            revision = self.registry.put(cluster_id, affiliate_id, request, self.clock())
            self._notify(cluster_id)
            return 200, {"revision": revision}
        if method == "DELETE":
            revision = self.registry.delete(cluster_id, affiliate_id)
            self._notify(cluster_id)
            return 200, {"revision": revision}
        raise BadRequest("method", f"{method} is not allowed here", status=405)

    async def _list(self, cluster_id: str, since: int | None, wait: float) -> dict[str, Any]:
        current = self.registry.cluster_revision(cluster_id)
        # since > current means the caller saw a revision this server never had (it lost state):
        # answer at once so the caller resynchronises.
        if since is not None and since == current and wait > 0:
            await self._wait_change(cluster_id, wait)
        return listing_body(self.registry.listing(cluster_id, self.clock()))


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise BadRequest("method", f"{method} is not allowed here", status=405)


async def _read_json(receive: Receive) -> Any:
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
            break
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("body", "must be valid JSON") from None


async def _respond(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve(sock: socket.socket, state_dir: Path | None) -> None:
    """Run the service on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn

    now = time.time()
    registry = snapshot.load(state_dir, now) if state_dir is not None else Registry()
    app = DiscoveryApp(registry, state_dir=state_dir)
    host, port = sock.getsockname()[:2]
    log.info("discovery service listening address=%s port=%d", host, port)
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", access_log=False, timeout_keep_alive=75
    )
    uvicorn.Server(config).run(sockets=[sock])
