"""KernelWatcher under faults, in the network namespace this runs in (the caller uses `ip
netns exec`): `python3 netns_watch_probe.py SCENARIO` prints one JSON result. Changes are
made with `ip`, whose notifications are queued before it returns; waits are on conditions,
with deadlines."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kubespan.apply import watch
from kubespan.apply.changes import OTHER_LINK
from kubespan.apply.watch import OVERFLOW, RESUBSCRIBED, KernelWatcher

REAL_SUBSCRIBE = watch.subscribe

DEADLINE = 10.0


class Recorder:
    """Reasons given to on_change; `fail` makes the next call raise."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.changed = threading.Condition()
        self.fail = False
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def __call__(self, reason: str) -> None:
        self.entered.set()
        self.hold.wait()
        with self.changed:
            self.reasons.append(reason)
            self.changed.notify_all()
            if self.fail:
                self.fail = False
                raise RuntimeError("callback failure (injected)")

    def wait(self, matches: Callable[[str], bool]) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: any(map(matches, self.reasons)), DEADLINE)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def route(n: int) -> None:
    ip("route", "add", "unreachable", f"198.51.100.{n}/32", "table", "180")


def callback_raises(watcher: KernelWatcher, calls: Recorder) -> dict[str, Any]:
    calls.fail = True
    route(1)
    calls.wait(lambda r: "table 180" in r)
    route(2)  # after the failure and its backoff, the next change still arrives
    calls.reasons.clear()
    route(3)
    return {"again": calls.wait(lambda r: "table 180" in r), "alive": watcher.alive}


def overflow(watcher: KernelWatcher, calls: Recorder) -> dict[str, Any]:
    ip("link", "add", "spare", "type", "veth", "peer", "name", "spare-peer")  # kept as down
    calls.hold.clear()  # the watcher thread blocks in the callback, reading nothing
    route(1)
    batch = "".join(
        f"route add unreachable 203.0.113.{n % 250}/32 table {1000 + n}\n" for n in range(3000)
    )
    subprocess.run(["ip", "-batch", "-"], input=batch, text=True, check=True)
    ip("link", "set", "spare", "up")  # its notification is lost with the overflow
    calls.hold.set()
    result = {"overflow": calls.wait(lambda r: OVERFLOW in r), "alive": watcher.alive}
    # The links are read anew after the loss: spare is known up, so its going down counts
    # (kept as down, it would look unchanged).
    ip("link", "set", "spare", "down")
    result["link_after_overflow"] = calls.wait(lambda r: OTHER_LINK in r)
    return result


class Flaky:
    """A subscribed socket whose next read fails once `broken` is set."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.broken = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        if self.broken:
            raise OSError(errno.EIO, "read failure (injected)")
        return self.sock.recvfrom(size)

    def close(self) -> None:
        self.sock.close()


FLAKY: list[Flaky] = []
FAIL_SUBSCRIBING = [False]


def flaky_subscribe() -> list[tuple[socket.socket, bool]]:
    if FAIL_SUBSCRIBING[0]:
        FAIL_SUBSCRIBING[0] = False
        raise OSError(errno.EPERM, "subscription failure (injected)")
    FLAKY[:] = [Flaky(sock) for sock, _ in REAL_SUBSCRIBE()]
    return [(flaky, index == 1) for index, flaky in enumerate(FLAKY)]  # type: ignore[misc]


def resubscribed_then_heard(watcher: KernelWatcher, calls: Recorder, n: int) -> dict[str, Any]:
    """The watcher reports that it resubscribed, then hears the next change (route `n`)."""
    resubscribed = calls.wait(lambda r: RESUBSCRIBED in r)
    calls.reasons.clear()
    route(n)
    return {
        "resubscribed": resubscribed,
        "again": calls.wait(lambda r: "table 180" in r),
        "alive": watcher.alive,
    }


def read_fails(watcher: KernelWatcher, calls: Recorder) -> dict[str, Any]:
    FLAKY[0].broken = True
    route(1)  # the read fails: resubscribed, and a change reported
    return resubscribed_then_heard(watcher, calls, 2)


def subscribing_fails(watcher: KernelWatcher, calls: Recorder) -> dict[str, Any]:
    return resubscribed_then_heard(watcher, calls, 1)  # subscribing retried in the background


def blocked_callback(watcher: KernelWatcher, calls: Recorder) -> dict[str, Any]:
    calls.hold.clear()
    route(1)
    calls.entered.wait(DEADLINE)
    started = time.monotonic()
    watcher.stop(timeout=0.2)  # the callback is stuck: stop() must not wait for it
    returned = time.monotonic() - started
    calls.hold.set()
    watcher._thread.join(DEADLINE)
    return {"stop_returned": returned < 1.0, "ended": not watcher.alive}


SCENARIOS = {
    "callback-raises": callback_raises,
    "overflow": overflow,
    "read-fails": read_fails,
    "subscribing-fails": subscribing_fails,
    "blocked-callback": blocked_callback,
}


def main() -> int:
    scenario = sys.argv[1]
    ip("link", "set", "lo", "up")
    if scenario == "overflow":
        watch.SOCKET_BUFFER = 4096  # the kernel's minimum, roughly: overflows on a burst
    if scenario in ("read-fails", "subscribing-fails"):
        watch.subscribe = flaky_subscribe
        FAIL_SUBSCRIBING[0] = scenario == "subscribing-fails"
    calls = Recorder()
    watcher = KernelWatcher(calls)
    watcher.start()
    result = SCENARIOS[scenario](watcher, calls) if scenario in SCENARIOS else {}
    started = time.monotonic()
    watcher.stop()
    result.update(stop_seconds=time.monotonic() - started, stopped=not watcher.alive)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
