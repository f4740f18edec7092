"""The node's public WireGuard endpoint(s), learned by STUN in a thread of its own.

Probes at start, every `interval`, and at once after `trigger()` (the network changed:
several triggers during a probe make one more probe, not several). Reports to the agent
through `events`, and only when the result differs from the last one reported. Never dies:
a failed probe (no CAP_NET_RAW, no route) is logged, and the next one waits longer.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kubespan.agent.backoff import Backoff
from kubespan.netaddr import Endpoint
from kubespan.stun import prober
from kubespan.stun.prober import Reflexive
from kubespan.threads import named_thread

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
MIN_GAP = 3.0  # between the end of one probe and the start of a triggered one

Probe = Callable[[int, Sequence[Endpoint]], Reflexive]


@dataclass(frozen=True)
class ReflexiveLearned:
    """The STUN probe's result changed (the first result counts as a change)."""

    result: Reflexive


class ReflexiveProber:
    def __init__(
        self,
        events: queue.Queue[Any],
        listen_port: int,
        reflectors: Callable[[], Sequence[Endpoint]],
        interval: float = DEFAULT_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
        random_bytes: Callable[[int], bytes] = os.urandom,
        probe: Probe | None = None,
        rng: random.Random | None = None,
        min_gap: float = MIN_GAP,
    ) -> None:
        """`probe` replaces the STUN exchange in tests."""
        self.events = events
        self.listen_port = listen_port
        self.reflectors = reflectors
        self.interval = interval
        self.monotonic = monotonic
        self._probe: Probe = probe or (
            lambda port, asked: prober.probe(port, asked, random_bytes=random_bytes)
        )
        self._backoff = Backoff(base=2.0, cap=max(interval, 2.0), rng=rng or random.Random())
        self.last: Reflexive | None = None
        self.probes = 0  # probes finished, for tests and status
        self._wake = threading.Condition()
        self._triggered = False
        self._earliest = float("-inf")
        self.min_gap = min_gap
        self._stopping = False
        self._thread = named_thread(self._run, "stun prober")

    def start(self) -> None:
        self._thread.start()

    def trigger(self) -> None:
        """Probe again as soon as the probe under way (if any) is done."""
        with self._wake:
            self._triggered = True
            self._wake.notify_all()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 0.0
        while self._wait(delay):
            try:
                self._once()
                self._backoff.reset()
                delay = self.interval
            except Exception as error:  # noqa: BLE001 - the thread must survive anything
                delay = self._backoff.next_delay()
                log.warning(
                    "stun probe failed retry_in=%.1fs error=%s: %s",
                    delay,
                    type(error).__name__,
                    error,
                )

    def _wait(self, delay: float) -> bool:
        """Wait `delay`, or until triggered but no sooner than MIN_GAP after the last probe
        (whoever triggers, be it a discovery service answering hello over and over, makes
        reflectors see a few packets a second at most); whether to go on."""
        deadline = self.monotonic() + delay
        with self._wake:
            while not self._stopping:
                left = (self._earliest if self._triggered else deadline) - self.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            self._triggered = False
            return not self._stopping

    def _once(self) -> None:
        asked = tuple(self.reflectors())
        try:
            result = self._probe(self.listen_port, asked)
        finally:
            if asked:
                # Nothing was sent without reflectors: the first ones named (by discovery's
                # first hello, a moment after start) are asked at once.
                self._earliest = self.monotonic() + self.min_gap
        self.probes += 1
        if result == self.last:
            return
        self.last = result
        log.info(
            "stun: public endpoints=%s mapping=%s answered=%d/%d",
            ",".join(str(e) for e in result.endpoints) or "-",
            result.mapping.value,
            sum(a.mapped is not None for a in result.answers),
            len(result.answers),
        )
        self.events.put(ReflexiveLearned(result))
