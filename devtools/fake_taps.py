"""A synthetic :class:`~gateway.media.frames.LegTap` for tests, benchmarks and the demo.

:class:`ToneTap` produces a distinct tone per leg (600 Hz agent, 1000 Hz customer by
default, as rtpengine's tests do) every 20 ms of the event loop's clock, into a bounded
drop-oldest queue -- the same contract the SIP plane's taps have.
"""

from __future__ import annotations

import asyncio
import collections
import math

import numpy as np

from gateway.media.frames import FRAME_MS, LegFrame


def tone(freq: float, n: int, rate: int, start: int = 0, amplitude: float = 8000.0) -> np.ndarray:
    """``n`` int16 samples of a sine at ``freq`` Hz starting at sample index ``start``."""
    t = (np.arange(n) + start) / rate
    return np.rint(amplitude * np.sin(2 * math.pi * freq * t)).astype(np.int16)


class ToneTap:
    """Paced fake tap: one :class:`LegFrame` per 20 ms with a tone on each leg.

    ``agent_hz``/``customer_hz`` of 0 make that leg silent. ``frames`` limits how many frames
    are produced before :meth:`next_frame` raises ``EOFError`` (None: forever).
    """

    def __init__(
        self,
        conversation: str = "c-test",
        *,
        agent_hz: float = 600.0,
        customer_hz: float = 1000.0,
        sample_rate: int = 8000,
        capacity: int = 10,
        frames: int | None = None,
        amplitude: float = 8000.0,
    ) -> None:
        self.conversation = conversation
        self.sample_rate = sample_rate
        self.samples = sample_rate * FRAME_MS // 1000
        self.capacity = capacity
        self.dropped = 0
        self.produced = 0
        self.closed = False
        self._limit = frames
        self._queue: collections.deque[LegFrame] = collections.deque()
        self._ready = asyncio.Event()
        self._agent_hz, self._customer_hz, self._amp = agent_hz, customer_hz, amplitude
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _frame(self, seq: int) -> LegFrame:
        start = seq * self.samples
        agent = (
            tone(self._agent_hz, self.samples, self.sample_rate, start, self._amp)
            if self._agent_hz
            else np.zeros(self.samples, np.int16)
        )
        customer = (
            tone(self._customer_hz, self.samples, self.sample_rate, start, self._amp)
            if self._customer_hz
            else np.zeros(self.samples, np.int16)
        )
        return LegFrame(self.conversation, seq, self.sample_rate, agent, customer)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        seq = 0
        while not self.closed and (self._limit is None or seq < self._limit):
            if len(self._queue) >= self.capacity:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(self._frame(seq))
            self.produced += 1
            self._ready.set()
            seq += 1
            delay = t0 + seq * FRAME_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        self._limit = seq  # finished: readers get EOF once the queue is drained
        self._ready.set()

    async def next_frame(self) -> LegFrame:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self.closed or (self._limit is not None and self.produced >= self._limit):
                raise EOFError
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._task.cancel()
            self._ready.set()


class PollableToneTap(ToneTap):
    """A :class:`ToneTap` that also offers ``next_frame_nowait()`` (the track's fast path)."""

    def next_frame_nowait(self) -> LegFrame | None:
        if self._queue:
            return self._queue.popleft()
        if self.closed or (self._limit is not None and self.produced >= self._limit):
            raise EOFError
        return None
