"""KernelWatcher: wake the agent when something of ours may have changed in the kernel.

A daemon thread listens on two raw netlink sockets, rtnetlink (links, addresses, IPv4/IPv6
routes and rules, IPv4 netconf) and netfilter (nftables changes), and calls
`on_change(reason)` once per burst of notifications that concern us (apply.changes says
which). It blocks in select() when nothing happens, so it costs nothing then.

It survives anything: a socket buffer overflow (ENOBUFS: notifications were lost) counts as a
change; a malformed message counts as a change; any other socket error is logged, and after a
backoff the sockets are reopened and a change reported (notifications may have been missed
meanwhile); a callback that raises is logged and given the same reasons again after a backoff
(the sockets stay open meanwhile, so nothing is lost). `stop()` returns promptly unless the
callback itself blocks.

    watcher = KernelWatcher(on_change=lambda reason: wake_the_reconcile_loop(reason))
    watcher.start()   # subscribed when this returns: no change after it goes unnoticed
    ...
    watcher.stop()
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from kubespan.apply.changes import (
    NFNLGRP_NFTABLES,
    RTM_NEWLINK,
    RTNL_GROUPS,
    LinkSeen,
    WatchState,
    classify_datagram,
    group_mask,
    joined,
    link_seen,
)
from kubespan.apply.links import RTM_GETLINK, every_link
from kubespan.apply.netlink import NETLINK_NETFILTER, NETLINK_ROUTE, NLM_F_DUMP, NetlinkFormatError
from kubespan.apply.nlsocket import NetlinkSocket
from kubespan.names import LINK_NAME
from kubespan.threads import named_thread

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 16
SOCKET_BUFFER = 4 << 20  # room for a burst: replacing a table of 1,000 members
BURST = 256  # datagrams read before reporting, so a flood cannot starve the callback
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
OVERFLOW = "netlink overflow: notifications were lost"
RESUBSCRIBED = "watch resubscribed: notifications may have been lost"
SO_RCVBUFFORCE = 33


class KernelWatcher:
    def __init__(self, on_change: Callable[[str], None], link: str = LINK_NAME) -> None:
        self._on_change = on_change
        self._link = link
        self._stopping = threading.Event()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sockets: dict[socket.socket, bool] = {}  # socket -> carries nftables messages
        self._state = WatchState()
        self._thread = named_thread(self._run, "kernel watcher")

    def start(self) -> None:
        """Subscribe (in the caller's thread, so nothing after this call is missed), then
        listen in the background. A failure to subscribe is retried in the background."""
        try:
            self._open()
        except OSError as error:
            log.warning("watch: cannot subscribe to netlink yet error=%s: retrying", error)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; returns within `timeout` (unless the callback blocks longer, the
        thread has ended by then). Idempotent."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive():
            # Still inside the callback: closing its descriptors now would let their numbers
            # be reused under it. It closes its sockets itself when the callback returns.
            log.warning("watch: on_change still running after %.1f s; not waiting", timeout)
            return
        self._close()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_read = self._wake_write = -1

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def subscribed(self) -> bool:
        """Whether changes are heard now (not while subscribing fails and is retried)."""
        return bool(self._sockets) and self._thread.is_alive()

    # --- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        pending: set[str] = set()  # reasons not yet delivered
        while not self._stopping.is_set():
            try:
                if not self._sockets:
                    self._open()
                    pending.add(RESUBSCRIBED)
                # Block only when there is nothing to deliver; otherwise just collect.
                pending |= self._read(list(self._sockets) if pending else self._wait())
            except Exception:  # the thread must not die: log, back off, resubscribe
                log.exception("watch: netlink error, resubscribing in %.1f s", backoff)
                self._close()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            try:
                self._notify(pending)
                pending = set()
                backoff = BACKOFF_FIRST
            except Exception:  # the callback's failure: keep the reasons, retry them
                log.exception("watch: on_change failed, retrying in %.1f s", backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        self._close()

    def _open(self) -> None:
        self._close()
        self._sockets = dict(subscribe())
        self._state = self._fresh_state()

    def _fresh_state(self) -> WatchState:
        """Our link's index and every link as they are now; read while subscribed, so a
        change after the reading is still heard."""
        links = seen_links()
        try:
            return WatchState(socket.if_nametoindex(self._link), links)
        except OSError:
            return WatchState(None, links)

    def _close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = {}

    def _wait(self) -> list[socket.socket]:
        """Block until a socket is readable or stop() is called."""
        by_fd = {sock.fileno(): sock for sock in self._sockets}
        readable, _, _ = select.select([*by_fd, self._wake_read], [], [])
        if self._wake_read in readable:
            with contextlib.suppress(OSError):
                os.read(self._wake_read, 64)
        return [by_fd[fd] for fd in readable if fd in by_fd]

    def _read(self, ready: list[socket.socket]) -> set[str]:
        reasons: set[str] = set()
        for sock in ready:
            nftables = self._sockets.get(sock)
            if nftables is None:
                continue
            for _ in range(BURST):
                try:
                    data, address = sock.recvfrom(RECEIVE_SIZE)
                except BlockingIOError:
                    break
                except OSError as error:
                    if error.errno != errno.ENOBUFS:
                        raise
                    reasons.add(OVERFLOW)
                    continue
                if address[0] != 0:
                    continue  # only the kernel speaks for the kernel
                found, self._state = classify_datagram(data, nftables, self._state)
                reasons |= found
        if OVERFLOW in reasons:
            # Lost notifications may have changed links: what was kept of them would hide
            # the next change, so it is read anew (once per burst, however many were lost).
            self._state = self._fresh_state()
        return reasons

    def _notify(self, reasons: set[str]) -> None:
        if not reasons or self._stopping.is_set():
            return
        reason = joined(reasons)
        log.debug("watch: change reason=%s", reason)
        self._on_change(reason)


def subscribe() -> list[tuple[socket.socket, bool]]:
    """Non-blocking sockets subscribed to what concerns us, each with whether it carries
    nftables messages (netfilter) or rtnetlink ones."""
    subscribed: list[tuple[socket.socket, bool]] = []
    try:
        for protocol, groups in (
            (NETLINK_ROUTE, group_mask(RTNL_GROUPS)),
            (NETLINK_NETFILTER, group_mask((NFNLGRP_NFTABLES,))),
        ):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
            subscribed.append((sock, protocol == NETLINK_NETFILTER))
            _enlarge(sock)
            sock.bind((0, groups))
            sock.setblocking(False)
    except OSError:
        for sock, _ in subscribed:
            sock.close()
        raise
    return subscribed


def _enlarge(sock: socket.socket) -> None:
    """A large receive buffer, past the system limit if we may (root), so a burst of our own
    changes does not overflow it; overflowing is survivable, only wasteful."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


def seen_links() -> dict[int, LinkSeen] | None:
    """Every link as it is now (index -> (up, name)), so that a later notification is known
    to change a link or not; None when the dump fails (every link notification counts)."""
    try:
        rtnl = NetlinkSocket(NETLINK_ROUTE)
        try:
            answer = rtnl.request(RTM_GETLINK, NLM_F_DUMP, every_link())
        finally:
            rtnl.close()
    except OSError as error:
        log.info("watch: links not read, every link notification counts: %s", error)
        return None
    seen: dict[int, LinkSeen] = {}
    for message in answer:
        if message.type != RTM_NEWLINK:
            continue
        try:
            index, link = link_seen(message)
        except NetlinkFormatError:
            continue  # unreadable here: its next notification is taken as a new link's
        seen[index] = link
    return seen
