"""Nonces seen recently, per cluster, so that a captured request cannot be sent again.
A nonce needs remembering only while its timestamp is fresh; pure, `now` passed in."""

from __future__ import annotations

import heapq


class ReplayGuard:
    def __init__(self, window: float) -> None:
        self.window = window
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, cluster: str, nonce: str, timestamp: float, now: float) -> bool:
        """False when (cluster, nonce) was seen while still fresh: a replay."""
        self._forget(now)
        key = (cluster, nonce)
        if key in self._seen:
            return False
        self._seen.add(key)
        heapq.heappush(self._expiry, (timestamp + 2 * self.window, cluster, nonce))
        return True

    def _forget(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, cluster, nonce = heapq.heappop(self._expiry)
            self._seen.discard((cluster, nonce))
