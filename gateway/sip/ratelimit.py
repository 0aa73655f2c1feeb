"""A per-source token bucket: how many new INVITEs one address may send the SIP front.

Pure bookkeeping with the clock passed in (unit-tested in ``tests/test_sip_front.py``).
"""

from __future__ import annotations

import math


class RateLimit:
    """``rate`` requests per second per key, bursts up to ``burst``; ``rate`` ≤ 0 disables it."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, at)

    def wait(self, key: str, now: float) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is free."""
        if self.rate <= 0:
            return 0.0
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> str:
        """A ``Retry-After`` value (whole seconds, at least 1) for a wait."""
        return str(max(1, math.ceil(wait)))

    def sweep(self, now: float) -> None:
        """Forget keys whose bucket has refilled (so a spray of sources holds no memory)."""
        if self.rate <= 0:
            return
        full = self.burst / self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}

    def __len__(self) -> int:
        return len(self._buckets)
