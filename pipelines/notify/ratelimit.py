"""Per-recipient token buckets: at most N notifications per hour, with a burst.

Rule (docs/alerts-and-load-control.md): one token per alert per recipient, whatever the
number of channels it goes out on. CRITICAL alerts (trips, tamper) either bypass the limit
("bypass", the default: a merchant must always learn that the power is off) or draw from
a separate, larger bucket so a flapping relay cannot flood a phone either. The clock is
injected so tests and replays control time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate_per_s: float
    capacity: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    def __init__(self, per_hour: float, burst: int | None = None, *,
                 critical_per_hour: float | None = None, critical_burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        """critical_per_hour None: CRITICAL bypasses the limit."""
        self._normal = (per_hour / 3600.0, float(burst or math.ceil(per_hour)))
        self._critical = (None if critical_per_hour is None else
                          (critical_per_hour / 3600.0, float(critical_burst or math.ceil(critical_per_hour))))
        self._clock = clock
        self._buckets: dict[tuple[str, bool], TokenBucket] = {}
        self._max_keys = max_keys

    def allow(self, recipient_key: str, severity: str) -> bool:
        critical = severity == "CRITICAL"
        if critical and self._critical is None:
            return True
        rate, capacity = self._critical if critical else self._normal  # type: ignore[misc]
        now = self._clock()
        bucket = self._buckets.get((recipient_key, critical))
        if bucket is None:
            if len(self._buckets) >= self._max_keys:  # a full bucket is the default: forget the oldest
                self._buckets.pop(next(iter(self._buckets)))
            bucket = self._buckets[(recipient_key, critical)] = TokenBucket(rate, capacity, capacity, now)
        return bucket.take(now)
