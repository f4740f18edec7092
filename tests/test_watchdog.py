"""systemd's watchdog is fed by the reconcile loop itself: while it runs passes, and no
longer once a pass hangs (so systemd restarts the agent); never when systemd did not ask."""

from __future__ import annotations

import base64
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubespan import notify
from kubespan.plan.diff import Operation

from agents import config_text, make_agent, running, wait_for
from servers import discovery_server


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket where systemd would listen, and the watchdog asked for."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.setenv("WATCHDOG_USEC", "60000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        yield sock


def messages(sock: socket.socket) -> list[str]:
    found = []
    while True:
        try:
            found.append(sock.recv(4096).decode())
        except TimeoutError:
            return found


def test_feeding_is_paced_and_only_when_asked(
    systemd: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    watchdog = notify.Watchdog(lambda: now[0], every=1.0)
    watchdog.feed()
    watchdog.feed()  # too soon
    now[0] += 1.0
    watchdog.feed()
    assert messages(systemd) == ["WATCHDOG=1", "WATCHDOG=1"]
    # By default a quarter of the interval systemd set (WatchdogSec=60 here).
    assert notify.Watchdog(lambda: now[0]).every == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert not notify.Watchdog(lambda: now[0]).enabled
    monkeypatch.delenv("WATCHDOG_USEC")
    assert not notify.Watchdog(lambda: now[0]).enabled


def test_the_loop_feeds_it_until_a_pass_hangs(tmp_path: Path, systemd: socket.socket) -> None:
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        agent, kernel = make_agent(tmp_path, "fed", 21, config_text(server.url, cluster_id, secret))
        hang, hanging, release = threading.Event(), threading.Event(), threading.Event()
        real_apply = kernel.apply

        def apply(operations: list[Operation]) -> None:
            if hang.is_set():
                hanging.set()
                release.wait(30)  # a netlink call that does not come back
            real_apply(operations)

        kernel.apply = apply  # type: ignore[method-assign]
        fed: list[str] = []

        def fed_twice() -> bool:
            fed.extend(messages(systemd))
            return fed.count("WATCHDOG=1") >= 2

        with running(agent):
            wait_for(fed_twice, "the watchdog fed while passes run")
            hang.set()
            kernel.link = None  # the link is gone: the next pass must apply, and hangs
            agent.events.put(object())  # any input makes a pass now
            assert hanging.wait(10)
            messages(systemd)  # fed before the pass began
            systemd.settimeout(3.0)  # three feeding periods
            try:
                after = systemd.recv(4096)
            except TimeoutError:
                after = b""
            release.set()
        assert after == b""  # a hung loop feeds nothing: systemd would restart it


def test_a_long_pass_that_makes_progress_keeps_feeding(
    tmp_path: Path, systemd: socket.socket
) -> None:
    """A pass that applies many changes on a starved machine takes long, but each change
    applied is progress: fed between them, not killed for the pass's length."""
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        agent, kernel = make_agent(
            tmp_path, "slow", 22, config_text(server.url, cluster_id, secret)
        )
        now = [1000.0]
        agent._watchdog = notify.Watchdog(lambda: now[0], every=1.0)
        real_apply = kernel.apply
        applied, fed = [0], []

        def slow_apply(operations: list[Operation]) -> None:
            fed.extend(messages(systemd))  # as systemd would, while the pass goes on
            now[0] += 2.0  # each change takes two feeding periods
            applied[0] += 1
            real_apply(operations)

        kernel.apply = slow_apply  # type: ignore[method-assign]
        agent.reconcile()  # the first pass: link, addresses, routes, rules, table
        fed.extend(messages(systemd))
        assert applied[0] >= 5
        assert fed.count("WATCHDOG=1") == applied[0]


def test_systemd_is_told_the_status_line_only_when_it_changes(
    tmp_path: Path, systemd: socket.socket
) -> None:
    """Each datagram is work for PID 1 as well: an idle node's passes say nothing new."""
    cluster_id = base64.b64encode(os.urandom(32)).decode()
    secret = base64.b64encode(os.urandom(32)).decode()
    with discovery_server() as server:
        agent, _kernel = make_agent(
            tmp_path, "told", 23, config_text(server.url, cluster_id, secret)
        )
        for _ in range(3):
            agent.reconcile()
        told = [m for m in messages(systemd) if m.startswith("STATUS=")]
        assert told == ["STATUS=0 peers, 0 up"]
