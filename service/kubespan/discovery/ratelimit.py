"""Token buckets per source (an IPv4 address or an IPv6 /64, see forwarded.source_key): the
request rate, and the rate at which one source may create clusters. Pure, `now` passed in."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kubespan.discovery import limits


@dataclass
class _Bucket:
    tokens: float
    updated: float


SWEEP_INTERVAL = 1.0


class RateLimiter:
    """`rate` requests per second on average, bursts up to `burst`; rate 0 disables it."""

    MAX_SOURCES = limits.MAX_SOURCES_TRACKED

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._swept = float("-inf")

    def allow(self, source: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.MAX_SOURCES and now - self._swept >= SWEEP_INTERVAL:
                # A sweep walks every bucket: at most once a second, or a flood of new
                # sources would make every packet cost the whole table.
                self._swept = now
                self.forget_idle(now)
            while len(self._buckets) >= self.MAX_SOURCES:
                # Memory stays bounded even when every tracked source is busy: the oldest
                # tracked source starts afresh.
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def retry_after(self, source: str) -> float:
        bucket = self._buckets.get(source)
        if bucket is None or self.rate <= 0:
            return 0.0
        return max(0.0, (1 - bucket.tokens) / self.rate)

    def forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely: they carry no information."""
        full_after = self.burst / self.rate if self.rate > 0 else 0
        self._buckets = OrderedDict(
            (source, bucket)
            for source, bucket in self._buckets.items()
            if now - bucket.updated < full_after
        )
