"""The shell the threads on raw UDP ports share (path checks, the relay, a side's relay
binds): open the port, take turns on it until stopped, and never die of an exception: an
error is logged, the socket closed, and it is opened again after a backoff."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable

from kubespan.agent.backoff import Backoff
from kubespan.rawudp import AddressedTransport, Datagram, PayloadMatch, RawUdpPort
from kubespan.threads import named_thread
from kubespan.wakeup import Wakeup

log = logging.getLogger(__name__)


def open_raw_port(port: int, match: PayloadMatch, what: str, count: int = 1) -> RawUdpPort:
    """Raw sockets on `port` (and the `count - 1` after it) for datagrams `match` takes, in
    both address families where possible; OSError when neither opens."""
    raw = RawUdpPort(port, match, count=count)
    errors = raw.listen()
    if len(errors) == 2:
        raw.close()
        raise OSError("; ".join(errors))
    for error in errors:
        log.info("%s without one family: %s", what, error)
    return raw


def take_waiting(
    receive: Callable[[float, socket.socket | None], Datagram | None],
    wait: float,
    wake: socket.socket,
    take: Callable[[Datagram], None],
    limit: int,
) -> int:
    """Hand `take` what `receive` (a transport's receive_datagram) reads, waiting up to
    `wait` (or until `wake` is poked) for the first datagram: at most `limit` of them, the
    rest stay in the socket for the next turn, and none read is dropped. Returns how many
    were taken."""
    taken = 0
    datagram = receive(wait, wake)
    while datagram is not None:
        take(datagram)
        taken += 1
        if taken >= limit:
            break
        datagram = receive(0.0, None)
    return taken


class RawPortThread:
    """Subclasses take one turn on the open transport in `_turn` (waiting at most a second
    or so, and on `self._wakeup`), and keep their state under `self._lock`."""

    def __init__(
        self,
        name: str,
        what: str,
        transport: Callable[[], AddressedTransport],
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._what = what
        self._open = transport
        self.monotonic = monotonic
        self._backoff = Backoff(base=2.0, cap=60.0, rng=rng or random.Random())
        self._lock = threading.Lock()
        self._stopping = False
        self._wakeup = Wakeup()
        self._thread = named_thread(self._run, name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._poke()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is None:
            return  # never started
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._wakeup.close()

    def _poke(self) -> None:
        self._wakeup.poke()

    # --- the thread ------------------------------------------------------------------

    def _turn(self, transport: AddressedTransport) -> None:
        raise NotImplementedError

    def _opened(self) -> None:
        """Called in the thread each time the transport has been opened."""

    def _finished(self) -> None:
        """Called in the thread once it stops, after the transport is closed."""

    def _run(self) -> None:
        transport: AddressedTransport | None = None
        while not self._stopping:
            try:
                if transport is None:
                    transport = self._open()
                    self._backoff.reset()
                    self._opened()
                self._turn(transport)
            except Exception as error:  # noqa: BLE001 - the thread must survive anything
                delay = self._backoff.next_delay()
                log.warning(
                    "%s failed retry_in=%.1fs error=%s: %s",
                    self._what,
                    delay,
                    type(error).__name__,
                    error,
                )
                _close(transport, self._what)
                transport = None
                self._sleep(delay)
        _close(transport, self._what)
        self._finished()

    def _sleep(self, delay: float) -> None:
        """Wait `delay`, or until stopped (retrying the sockets sooner would only log the
        same failure faster)."""
        self._wakeup.sleep(delay, self.monotonic, lambda: self._stopping)


def _close(transport: AddressedTransport | None, what: str) -> None:
    if transport is None:
        return
    try:
        transport.close()
    except Exception as error:  # noqa: BLE001 - closing must not end the thread
        log.debug("%s: closing the socket failed: %s", what, error)
