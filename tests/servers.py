"""Run the real discovery service in a thread on 127.0.0.1 for loopback tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kubespan.discovery.daemon import bind, run_service
from kubespan.discovery.server import DiscoveryApp, Settings
from kubespan.discovery.signing import authority
from kubespan.discovery.stunserver import StunAdvert, bind_udp


@dataclass
class RunningServer:
    url: str
    metrics_url: str
    app: DiscoveryApp
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread
    stun_port: int | None = None  # the STUN reflector's UDP port on 127.0.0.1

    def stop(self) -> None:
        """Stop the service as SIGTERM would (idempotent)."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stop_event.set)
            self.thread.join(timeout=15)


@contextmanager
def discovery_server(
    state_dir: Path | None = None, settings: Settings | None = None, stun: bool = False
) -> Iterator[RunningServer]:
    """The service on 127.0.0.1 in a thread; no rate limit unless `settings` sets one. Its
    names default to its own address, as `kubespan discovery serve` does. With `stun`, its
    STUN reflector on a free UDP port, advertised as at the service's address."""
    api, ops = bind("127.0.0.1", 0), bind("127.0.0.1", 0)
    reflector = bind_udp("127.0.0.1", 0) if stun else None
    stun_port = reflector.getsockname()[1] if reflector else None
    port = api.getsockname()[1]
    chosen = settings or Settings(state_dir=state_dir, rate=0)
    if not chosen.services:
        chosen = replace(chosen, services=(authority("127.0.0.1", port),))
    if stun_port is not None and not chosen.stun:
        chosen = replace(chosen, stun=(StunAdvert(None, stun_port),))
    reflectors = (reflector,) if reflector else ()
    app = DiscoveryApp.open(chosen)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    done = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run_service(app, api, ops, None, stop, reflectors))
        finally:
            loop.close()
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not app.ready:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("discovery server did not start within 10 s")
        time.sleep(0.01)
    running = RunningServer(
        f"http://127.0.0.1:{port}",
        f"http://127.0.0.1:{ops.getsockname()[1]}",
        app,
        loop,
        stop,
        thread,
        stun_port,
    )
    try:
        yield running
    finally:
        running.stop()
        api.close()
        ops.close()
        if reflector is not None:
            reflector.close()
