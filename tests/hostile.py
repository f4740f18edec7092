"""A discovery service that serves whatever the test says, on loopback.

It stores every record agents PUT (keeping each affiliate's history, so tests can serve an
older genuine record again) and answers listings honestly until the test installs a
`listing` override: an empty or partial listing, a rollback, malformed JSON, a redirect, a
429 with any Retry-After. It checks no signature: it plays a hostile or broken service, or
anyone on an http:// path to one.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    trickle: float = 0.0  # seconds between bytes of the body (a slow answer)


@dataclass
class Stored:
    data: str  # base64, as sent
    endpoints: list[str]


ListingOverride = Callable[["Hostile"], Answer]


class Hostile:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.current: dict[str, Stored] = {}
        self.history: dict[str, list[Stored]] = {}
        self.revision = 1
        self.puts: list[str] = []
        self.listings = 0
        self.listing: ListingOverride | None = None
        self.request_headers: list[dict[str, str]] = []
        self.closing = threading.Event()
        self.url = ""

    # --- what the test uses ------------------------------------------------------------------

    def serve(self, override: ListingOverride | None) -> None:
        """Answer listings with `override` from now on (None: honestly); wakes watchers."""
        with self.lock:
            self.listing = override
            self.revision += 1
            self.lock.notify_all()

    def honest_body(self, affiliates: dict[str, Stored] | None = None) -> bytes:
        chosen = self.current if affiliates is None else affiliates
        return json.dumps(
            {
                "revision": self.revision,
                "reset": True,
                "removed": [],
                "affiliates": [
                    {"id": aid, "data": s.data, "endpoints": s.endpoints, "ttl": 600}
                    for aid, s in sorted(chosen.items())
                ],
            }
        ).encode()

    def put_count(self, affiliate: str) -> int:
        with self.lock:
            return self.puts.count(affiliate)

    # --- the HTTP side -----------------------------------------------------------------------

    def handle(self, method: str, target: str, body: bytes, client: str) -> Answer:
        parts = urlsplit(target)
        path = parts.path.split("/")
        if path[-1] == "hello":
            return Answer(body=json.dumps({"client_address": client}).encode())
        if method == "PUT" and len(path) == 6:
            document = json.loads(body)
            stored = Stored(document["data"], document.get("endpoints", []))
            with self.lock:
                self.current[path[5]] = stored
                self.history.setdefault(path[5], []).append(stored)
                self.puts.append(path[5])
                self.revision += 1
                self.lock.notify_all()
                return Answer(body=json.dumps({"revision": self.revision}).encode())
        if method == "POST":
            return Answer(body=json.dumps({"revision": self.revision}).encode())
        if method == "GET" and path[-1] == "affiliates":
            query = parse_qs(parts.query)
            since = int(query.get("since", ["-1"])[0])
            wait = min(float(query.get("wait", ["0"])[0]), 2.0)
            with self.lock:
                if since == self.revision:
                    self.lock.wait(wait)
                self.listings += 1
                override = self.listing
                if override is None:
                    return Answer(body=self.honest_body())
            return override(self)
        return Answer(404, b'{"error": {"field": "path", "message": "not found"}}')


def blob(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@contextmanager
def hostile_service() -> Iterator[Hostile]:
    hostile = Hostile()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            hostile.request_headers.append({k.lower(): v for k, v in self.headers.items()})
            answer = hostile.handle(self.command, self.path, body, self.client_address[0])
            self.send_response(answer.status)
            headers: dict[str, Any] = {"content-type": "application/json", **answer.headers}
            headers["content-length"] = str(len(answer.body))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if not answer.trickle:
                self.wfile.write(answer.body)
                return
            for byte in answer.body:
                if hostile.closing.wait(answer.trickle):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()

        do_GET = do_PUT = do_POST = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hostile.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hostile
    finally:
        hostile.closing.set()
        with hostile.lock:
            hostile.lock.notify_all()
        server.shutdown()
        server.server_close()
