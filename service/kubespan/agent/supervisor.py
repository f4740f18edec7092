"""Run the mesh as the machine config says, and follow the config as it changes.

The supervisor owns the agent's lifetime: with kubespan enabled it runs the reconcile loop;
disabled, it removes what kubespan created in the kernel and idles. A changed config file (or
SIGHUP, `systemctl reload kubespan`) is validated first: an invalid one is reported and the
running state stays exactly as it was; a valid one replaces the running config. Turning
kubespan off also takes the node out of discovery, so peers drop it at once.
"""

from __future__ import annotations

import logging
import queue
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubespan import notify
from kubespan.agent.events import ConfigChanged, Stop, Terminal
from kubespan.agent.loop import Agent, KernelPort
from kubespan.agent.statusserver import LatestStatus, placeholder
from kubespan.config import MachineConfig, parse_config
from kubespan.errors import ConfigError
from kubespan.filewatch import SETTLE_SECONDS, FileWatch
from kubespan.identity import Identity
from kubespan.threads import named_thread
from kubespan.wakeup import Wakeup

log = logging.getLogger(__name__)

WATCH_INTERVAL_SECONDS = 2.0  # where inotify cannot watch the file
BACKSTOP_SECONDS = 60.0  # where it can
SETTLE_LIMIT_SECONDS = 1.0


@dataclass(frozen=True)
class FileStamp:
    device: int
    inode: int
    size: int
    mtime_ns: int


def stamp(path: Path) -> FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ConfigWatcher:
    """Follows the config file; puts ConfigChanged on `events` for each new valid content.

    Told by inotify when the file may have changed (filewatch): an idle agent wakes for
    nothing. Where inotify cannot watch, the file is looked at every `interval`; where it
    does, every `backstop` still (a file system that sends no events, as some network ones).
    """

    def __init__(
        self,
        path: Path,
        current: bytes,
        events: queue.Queue[Any],
        interval: float = WATCH_INTERVAL_SECONDS,
        backstop: float = BACKSTOP_SECONDS,
    ) -> None:
        self.path = path
        self.events = events
        self.interval = interval
        self.backstop = backstop
        self._current = current
        self._rejected: bytes | None = None
        self._stamp = stamp(path)
        self._watch = FileWatch(path)
        self._wakeup = Wakeup()
        self._stopping = threading.Event()
        self._thread = named_thread(self._loop, "config watcher")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.poke()

    def trigger(self) -> None:
        """Check now (SIGHUP)."""
        self._wakeup.poke()

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    forced = self._wait()
                    if not self._stopping.is_set():
                        self.check(forced)
                except Exception:  # the watcher must outlive any config it is shown
                    log.exception("checking the machine config failed; keeping the running config")
                    self._stopping.wait(self.interval)
        finally:
            self._watch.close()
            self._wakeup.close()

    def _wait(self) -> bool:
        """Until the file may have changed, or the time to look anyway; whether a check
        was asked for (SIGHUP)."""
        watching = self._watch.refresh()
        waited: list[Any] = [self._wakeup.reader, *([self._watch] if watching else [])]
        ready, _, _ = select.select(waited, [], [], self.backstop if watching else self.interval)
        forced = self._wakeup.reader in ready
        self._wakeup.drain()
        if self._watch in ready and self._watch.changed():
            forced = self._settle() or forced
        return forced

    def _settle(self) -> bool:
        """Let a save finish (its events keep coming while it does), at most a second;
        whether a check was asked for meanwhile."""
        forced = False
        deadline = time.monotonic() + SETTLE_LIMIT_SECONDS
        while not self._stopping.is_set() and self._watch.watching:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waited: list[Any] = [self._wakeup.reader, self._watch]
            ready, _, _ = select.select(waited, [], [], min(SETTLE_SECONDS, left))
            if self._wakeup.reader in ready:
                forced = True
                self._wakeup.drain()
            if self._watch not in ready or not self._watch.changed():
                break
        return forced

    def check(self, forced: bool = False) -> None:
        now = stamp(self.path)
        if now == self._stamp and not forced:
            return
        self._stamp = now
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            log.error(
                "cannot read the machine config %s: %s; keeping the running config",
                self.path,
                error.strerror,
            )
            return
        if raw in (self._current, self._rejected):
            return
        try:
            config = parse_config(raw, str(self.path))
        except ConfigError as error:
            self._rejected = raw
            for problem in error.problems:
                log.error("invalid machine config: %s", problem)
            log.error("the changed machine config is invalid; keeping the running config")
            return
        self._current = raw
        self._rejected = None
        log.info("machine config changed file=%s", self.path)
        self.events.put(ConfigChanged(config, raw, str(self.path)))


IDLE_WAKE_SECONDS = 5.0  # an idle supervisor still feeds the watchdog this often


class Supervisor:
    def __init__(
        self,
        config: MachineConfig,
        kernel: KernelPort,
        identity: Callable[[], Identity],
        make_agent: Callable[[MachineConfig, Identity, queue.Queue[Any]], Agent],
        events: queue.Queue[Any],
        latest: LatestStatus | None = None,
        powering_off: Callable[[], bool] = lambda: False,
    ) -> None:
        self.latest = latest  # the live status: says "disabled" while idle
        self.powering_off = powering_off  # asked once the agent stops
        self.config = config
        self.kernel = kernel
        self.identity = identity
        self.make_agent = make_agent
        self.events = events

    def run(self) -> None:
        previous: Agent | None = None
        while True:
            if self.config.kubespan.enabled:
                agent = self.make_agent(self.config, self.identity(), self.events)
                if previous is not None:
                    agent.inherit(previous)
                outcome: Terminal = agent.run()
                previous = agent
                if isinstance(outcome, ConfigChanged) and leaves_mesh(self.config, outcome.config):
                    self._leave(agent, "kubespan is off or the cluster changed")
                    previous = None
                elif isinstance(outcome, Stop) and self.powering_off():
                    self._leave(agent, "the machine powers off")
            else:
                outcome = self._idle()
            if isinstance(outcome, Stop):
                return
            self.config = outcome.config

    @staticmethod
    def _leave(agent: Agent, why: str) -> None:
        log.info("leaving the cluster: %s", why)
        try:
            agent.leave()
        except Exception:  # leaving is best effort; the teardown or stop must still run
            log.exception("could not publish the leave record")

    def _idle(self) -> Terminal:
        removed = self.kernel.teardown()
        for item in removed:
            log.info("kubespan is disabled: removed %s", item)
        if self.latest is not None:
            self.latest.set(placeholder("disabled"))
        notify.ready("kubespan disabled in machine config")
        log.info("kubespan is disabled in the machine config; idle")
        watchdog = notify.Watchdog(time.monotonic)
        while True:
            watchdog.feed()
            try:
                event = self.events.get(timeout=IDLE_WAKE_SECONDS)
            except queue.Empty:
                continue
            if isinstance(event, Stop | ConfigChanged):
                return event


def leaves_mesh(old: MachineConfig, new: MachineConfig) -> bool:
    """Whether the node stops being a member of the cluster it registered in."""
    return (
        not new.kubespan.enabled
        or new.cluster.id != old.cluster.id
        or new.cluster.secret != old.cluster.secret
    )
