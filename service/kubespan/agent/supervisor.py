"""Run the mesh as the machine config says, and follow the config as it changes.

The supervisor owns the agent's lifetime: with kubespan enabled it runs the reconcile loop;
disabled, it removes what kubespan created in the kernel and idles. A changed config file (or
SIGHUP, `systemctl reload kubespan`) is validated first: an invalid one is reported and the
running state stays exactly as it was; a valid one replaces the running config. Turning
kubespan off also takes the node out of discovery, so peers drop it at once.
"""

from __future__ import annotations

import contextlib
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
WRITING_LIMIT_SECONDS = 30.0  # a file made and not closed since is read after this anyway


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
                    told = self._wait()
                    if told is not None and not self._stopping.is_set():
                        self.check(told)
                except Exception:  # the watcher must outlive any config it is shown
                    log.exception("watching the machine config failed; looking at it instead")
                    # Whatever failed, the file is still looked at every interval.
                    self._watch.close()
                    self._stopping.wait(self.interval)
                    with contextlib.suppress(Exception):
                        self.check()
        finally:
            self._watch.close()
            self._wakeup.close()

    def _wait(self) -> bool | None:
        """Until the file may have changed, or the time to look anyway. True: read it
        whatever its stamp says (asked for by SIGHUP; told by inotify, since a rewrite of
        the same size within the file system's time granularity keeps its stamp; or
        watched anew, so that what changed while unwatched is not missed). False: look at
        its stamp. None: woken for nothing that concerns it (another file in its
        directory, or it is being written and not yet closed)."""
        watching, anew = self._watch.refresh()
        if anew:
            return True
        ready = self._poll(self.backstop if watching else self.interval)
        if not ready:
            return False
        forced = self._wakeup.reader.fileno() in ready
        if forced:
            self._wakeup.drain()
        if watching and self._watch.fileno() in ready and self._watch.changed():
            self._settle()
            return True
        return True if forced else None

    def _poll(self, timeout: float) -> set[int]:
        """The descriptors ready within `timeout` (poll: no limit on descriptor numbers)."""
        poller = select.poll()
        poller.register(self._wakeup.reader, select.POLLIN)
        if self._watch.watching:
            poller.register(self._watch.fileno(), select.POLLIN)
        return {fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)}

    def _settle(self) -> None:
        """Let a save finish: its events keep coming while it does (at most a second), and
        a file being written is waited for until it is closed (at most half a minute)."""
        began = time.monotonic()
        while not self._stopping.is_set() and self._watch.watching:
            writing = bool(self._watch.writing)
            limit = began + (WRITING_LIMIT_SECONDS if writing else SETTLE_LIMIT_SECONDS)
            left = limit - time.monotonic()
            if left <= 0:
                break
            ready = self._poll(left if writing else min(SETTLE_SECONDS, left))
            if self._wakeup.reader.fileno() in ready:
                self._wakeup.drain()  # the file is read right after anyway
            if not self._watch.watching:
                break
            if self._watch.fileno() in ready:
                self._watch.changed()
            elif not self._watch.writing:
                break  # quiet, and nothing is being written

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
