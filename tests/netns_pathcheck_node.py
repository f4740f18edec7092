"""One node's path checker inside a network namespace, for tests/test_netns_pathcheck.py.

The caller starts this file with `ip netns exec`, the JSON file argv[1] saying:

  {"private": b64, "cluster": b64, "members": [b64, ...], "seconds": S,
   "checks": [{"peer": b64, "endpoints": ["ip:port", ...], "delay": D}, ...]}

It binds a plain UDP socket to the listen port first (standing in for the kernel's WireGuard
socket, which the host lacks), starts a PathChecker on its real raw sockets with these
members, prints {"ready": true} once the checker's sockets are open, and waits for a line on
stdin. Then it asks for each check (`delay` seconds after that line), records the checker's
PathAnswered events for S seconds, answering the other nodes meanwhile, and prints:

  {"events": [{"peer": b64, "endpoint": "ip:port", "after": seconds}, ...],
   "answers": {peer: ["ip:port", ...]}, "sent": N, "answered": N, "stand_in_received": N}
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import socket
import sys
import threading
import time
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from kubespan.netaddr import Endpoint
from kubespan.pathcheck.checker import PathAnswered, PathChecker

LISTEN_PORT = 51820
READY_TIMEOUT = 10.0


class ReadyWatch(logging.Handler):
    """Sets `ready` when the checker logs that its sockets are open."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ready = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("path checks ready"):
            self.ready.set()


def main() -> None:
    spec: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    watch = ReadyWatch()
    logging.getLogger("kubespan.pathcheck.checker").addHandler(watch)

    stand_in = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The port is taken, as WireGuard's would be (in the test's own namespace).
    stand_in.bind(("0.0.0.0", LISTEN_PORT))  # noqa: S104
    stand_in.setblocking(False)

    private = base64.b64decode(spec["private"])
    public = bytes(PrivateKey(private).public_key)
    events: queue.Queue[Any] = queue.Queue()
    checker = PathChecker(events, LISTEN_PORT, private, public, base64.b64decode(spec["cluster"]))
    checker.set_members(spec["members"])
    checker.set_own_addresses(ip_address(a) for a in spec["own"])
    checker.start()
    if not watch.ready.wait(READY_TIMEOUT):
        raise SystemExit("the path checker's sockets did not open")
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()

    started = time.monotonic()
    timers = [
        threading.Timer(
            float(check.get("delay", 0.0)),
            checker.check,
            (check["peer"], [Endpoint.parse(e) for e in check["endpoints"]]),
        )
        for check in spec["checks"]
    ]
    for timer in timers:
        timer.start()
    recorded = []
    end = started + float(spec["seconds"])
    while (remaining := end - time.monotonic()) > 0:
        try:
            event = events.get(timeout=remaining)
        except queue.Empty:
            break
        if isinstance(event, PathAnswered):
            after = time.monotonic() - started
            recorded.append(
                {"peer": event.public_key, "endpoint": str(event.endpoint), "after": after}
            )
    for timer in timers:
        timer.cancel()
    checker.stop()
    checker.join(5.0)

    received = 0
    while True:
        try:
            stand_in.recv(2048)
        except BlockingIOError:
            break
        received += 1
    document = {
        "events": recorded,
        "answers": {
            peer: sorted(str(e) for e in by_endpoint)
            for peer, by_endpoint in checker.answers().items()
        },
        "sent": checker.sent,
        "answered": checker.answered,
        "stand_in_received": received,
    }
    print(json.dumps(document), flush=True)


if __name__ == "__main__":
    main()
