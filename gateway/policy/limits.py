"""Rate limits as token buckets, one per key (a chat author, a supervisor).

Pure bookkeeping with an injected clock: no I/O, no awaiting. A bucket holds at most ``burst``
tokens and refills at ``rate`` tokens per second; a full bucket is the same as no bucket, so
full ones are forgotten when the table grows (memory stays bounded by the keys that are busy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class TokenBuckets(Generic[K]):
    """``take(key)`` spends one token of ``key``'s bucket, or says how long until one is there."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 50_000
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[K, tuple[float, float]] = {}  # key -> (tokens, when they were counted)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: K) -> float:
        """0.0 when a token was spent; otherwise the seconds until the next one (none spent)."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= self._max_keys:
            self._forget_full(now)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def wait(self, key: K) -> float:
        """Seconds until ``key`` has a token (0.0: it has one now); spends nothing."""
        if not self.enabled:
            return 0.0
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def forget(self, matches: Callable[[K], bool]) -> None:
        """Drop the buckets of the keys ``matches`` selects (e.g. an ended conversation's)."""
        for key in [k for k in self._buckets if matches(k)]:
            del self._buckets[key]

    def _tokens(self, key: K, now: float) -> float:
        counted = self._buckets.get(key)
        if counted is None:
            return self.burst
        tokens, stamp = counted
        return min(self.burst, tokens + (now - stamp) * self.rate)

    def _forget_full(self, now: float) -> None:
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.burst]:
            del self._buckets[key]

    @property
    def keys_held(self) -> int:
        """Buckets remembered now (not ``__len__``: an empty table must not make the limiter falsy)."""
        return len(self._buckets)


def retry_after(wait: float) -> str:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait`` seconds."""
    return str(max(1, round(wait + 0.5)))
