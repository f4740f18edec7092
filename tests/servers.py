"""Run the real discovery service in a thread on 127.0.0.1 for loopback tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from kubespan.discovery import snapshot
from kubespan.discovery.server import DiscoveryApp, Settings, bind
from kubespan.discovery.state import Registry


@dataclass
class RunningServer:
    url: str
    app: DiscoveryApp
    server: uvicorn.Server


@contextmanager
def discovery_server(
    state_dir: Path | None = None, settings: Settings | None = None
) -> Iterator[RunningServer]:
    """The service on 127.0.0.1 in a thread; no rate limit unless `settings` sets one."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    registry = snapshot.load(state_dir, time.time()) if state_dir else Registry()
    app = DiscoveryApp(registry, settings or Settings(state_dir=state_dir, rate=0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("discovery server did not start within 10 s")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
