"""Nonces seen recently, per cluster, so that a captured request cannot be sent again, even
across a restart. Pure, `now` passed in.

A nonce needs remembering only while its timestamp is fresh (within the allowed skew). The
nonces are saved with every snapshot and restored after a clean stop. After an unclean stop
(a crash, kill -9, a power cut) the nonces seen since the last snapshot are lost, so the
service then refuses every timestamp up to its own start (`not_before`): anything signed
before the crash is refused, and replays of it with it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class ReplayGuard:
    def __init__(self, window: float, not_before: int = 0) -> None:
        self.window = window
        self.not_before = not_before
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def predates_start(self, timestamp: int) -> bool:
        return timestamp <= self.not_before

    def check_and_remember(self, cluster: str, nonce: str, timestamp: float, now: float) -> bool:
        """False when (cluster, nonce) was seen while still fresh: a replay."""
        self._forget(now)
        key = (cluster, nonce)
        if key in self._seen:
            return False
        self._seen.add(key)
        # Refused as stale once now > timestamp + window: remembered until just after that.
        heapq.heappush(self._expiry, (timestamp + self.window + 1, cluster, nonce))
        return True

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, cluster, nonce = heapq.heappop(self._expiry)
            self._seen.discard((cluster, nonce))

    def export(self, now: float) -> list[tuple[str, str, float]]:
        """(cluster, nonce, forget_at) of every nonce still worth remembering."""
        self._forget(now)
        return [(cluster, nonce, at) for at, cluster, nonce in self._expiry]

    def restore(self, entries: Iterable[tuple[str, str, float]], now: float) -> None:
        for cluster, nonce, at in entries:
            if at >= now and (cluster, nonce) not in self._seen:
                self._seen.add((cluster, nonce))
                heapq.heappush(self._expiry, (at, cluster, nonce))
