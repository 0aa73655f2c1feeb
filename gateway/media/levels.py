"""Per-leg level meters for the console: RMS in dBFS, reported about ten times a second.

Full scale is a square wave at int16 peak (RMS 32768 -> 0 dBFS); a full-scale sine reads
about -3 dBFS. Digital silence reads :data:`FLOOR_DBFS` rather than minus infinity so the
value is always a finite JSON number.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

FLOOR_DBFS = -96.0
FULL_SCALE = 32768.0

LevelsCallback = Callable[[float, float], None]


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16 samples in dBFS, floored at :data:`FLOOR_DBFS`."""
    if samples.size == 0:
        return FLOOR_DBFS
    x = samples.astype(np.float64)
    return _db(float(np.dot(x, x)), samples.size)


def _db(sum_squares: float, count: int) -> float:
    if count == 0 or sum_squares <= 0.0:
        return FLOOR_DBFS
    ms = sum_squares / count / (FULL_SCALE * FULL_SCALE)
    return max(FLOOR_DBFS, round(10.0 * math.log10(ms), 1))


class LevelMeter:
    """Accumulates both legs and calls ``on_levels(agent_dbfs, customer_dbfs)`` every
    ``interval_frames`` frames (5 x 20 ms = 100 ms by default, i.e. ~10 reports a second).

    The callback runs inline on the media path: it must be cheap and must not raise (a
    raising callback is disabled rather than breaking the audio).
    """

    def __init__(self, on_levels: LevelsCallback | None, *, interval_frames: int = 5) -> None:
        self._cb = on_levels
        self._interval = max(1, interval_frames)
        self._frames = 0
        self._count = 0
        self._agent = 0.0
        self._customer = 0.0

    def feed(self, agent: np.ndarray, customer: np.ndarray) -> tuple[float, float] | None:
        """Add one frame; returns the levels when a report is due, else ``None``."""
        if self._cb is None:
            return None
        a = agent.astype(np.float32)
        c = customer.astype(np.float32)
        return self.add(float(np.dot(a, a)), float(np.dot(c, c)), agent.shape[0])

    @property
    def wanted(self) -> bool:
        """Whether anyone listens to the levels (else :meth:`add` and :meth:`feed` do nothing)."""
        return self._cb is not None

    def add(self, agent_squares: float, customer_squares: float, samples: int) -> tuple[float, float] | None:
        """:meth:`feed` with the frame's sums of squares computed already (the batched sender
        computes them for all listeners of a tick at once)."""
        if self._cb is None:
            return None
        self._agent += agent_squares
        self._customer += customer_squares
        self._count += samples
        self._frames += 1
        if self._frames < self._interval:
            return None
        levels = (_db(self._agent, self._count), _db(self._customer, self._count))
        self._frames = self._count = 0
        self._agent = self._customer = 0.0
        try:
            self._cb(*levels)
        except Exception:
            self._cb = None
        return levels
