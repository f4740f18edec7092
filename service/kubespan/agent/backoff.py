"""Exponential backoff with jitter; randomness comes in from the caller."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    base: float
    cap: float
    rng: random.Random
    failures: int = 0

    def next_delay(self) -> float:
        """Delay before the next attempt: doubles per failure, capped, 50-100% jitter."""
        delay: float = min(self.cap, self.base * 2.0**self.failures)
        self.failures = min(self.failures + 1, 32)
        return delay * (0.5 + 0.5 * self.rng.random())

    def reset(self) -> None:
        self.failures = 0
