"""Reading a :class:`~.frames.LegTap` into a small drop-oldest buffer: the only code that
calls a tap's ``next_frame``.

Both senders (:class:`~.track.LegTapTrack`, aiortc's own sender loop, and
:class:`~.batch.BatchTrack`, the process-wide ticker) take frames the same way: a tap with
``next_frame_nowait()`` (frame, ``None`` when empty, ``EOFError`` at the end) is drained on
each tick, with no task per listener; any other tap is read by a pump task. Each tick then
takes one frame (:meth:`TapReader._next_frame`), or counts an underrun.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .frames import LegFrame, LegTap

log = logging.getLogger(__name__)


@dataclass
class TrackStats:
    """Counters of one listener track (read them any time; they only grow)."""

    frames_in: int = 0  #: frames taken from the tap
    frames_out: int = 0  #: ticks delivered to aiortc (real + silence)
    underruns: int = 0  #: ticks with no frame in time: silence sent instead
    dropped: int = 0  #: frames dropped because the buffer was full (drop-oldest)
    resyncs: int = 0  #: media-clock re-bases after a stall of the event loop
    first_frame_at: float | None = None  #: loop time of the first real frame sent
    #: Seconds, summed over the frames taken for sending (``transit_n`` of them), from the SIP
    #: worker's bridge tick (the frame's ``stamp``, CLOCK_MONOTONIC) to the moment this process
    #: took the frame to encode and send it: the added latency of this hop, measured.
    transit_s: float = 0.0
    transit_n: int = 0


class TapReader:
    """Mixin: ``self._buffer`` holds at most ``max_delay`` frames (oldest dropped and counted
    in ``self.stats.dropped``); ``self.tap_ended`` turns true once, when the tap ends or fails.

    A track calls :meth:`_start_reading` once, then per tick :meth:`_drain`, perhaps
    :meth:`_wait_for_frame`, and :meth:`_next_frame`; :meth:`_stop_reading` at the end.
    """

    tap: LegTap
    stats: TrackStats

    def _start_reading(self, tap: LegTap, max_delay: int, on_tap_ended: Callable[[], None] | None) -> None:
        self.tap = tap
        self.tap_ended = False
        self._buffer: collections.deque[LegFrame] = collections.deque()
        self._max_delay = max(1, max_delay)
        self._on_tap_ended = on_tap_ended
        self._nowait: Callable[[], LegFrame | None] | None = getattr(tap, "next_frame_nowait", None)
        self._arrived = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        if self._nowait is None:
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _stop_reading(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None

    def _push(self, frame: LegFrame) -> None:
        if len(self._buffer) >= self._max_delay:
            self._buffer.popleft()
            self.stats.dropped += 1
        self._buffer.append(frame)
        if self._nowait is None:  # a pump task's frames: a tick may be waiting for one
            self._arrived.set()

    def _ended(self, failed: bool = False) -> None:
        if self.tap_ended:
            return
        if failed:
            log.exception("leg tap failed")
        else:
            log.info("leg tap ended")
        self.tap_ended = True
        self._nowait = None
        if self._on_tap_ended is not None:
            self._on_tap_ended()

    async def _pump(self) -> None:
        try:
            while True:
                self._push(await self.tap.next_frame())
        except EOFError:
            self._ended()
        except asyncio.CancelledError:
            raise
        except Exception:
            self._ended(failed=True)

    def _drain(self) -> None:
        if self._nowait is None:
            return
        try:
            while (frame := self._nowait()) is not None:
                self._push(frame)
        except EOFError:
            self._ended()
        except Exception:
            self._ended(failed=True)

    async def _wait_for_frame(self, timeout: float) -> None:
        """Give a frame that is a few ms late up to ``timeout`` seconds to arrive."""
        try:
            if self._nowait is not None:
                self._push(await asyncio.wait_for(self.tap.next_frame(), timeout))
            else:
                self._arrived.clear()
                if not self._buffer:
                    await asyncio.wait_for(self._arrived.wait(), timeout)
        except TimeoutError:
            pass
        except EOFError:
            self._ended()
        except Exception:
            self._ended(failed=True)

    def _keep_newest(self) -> None:
        """Frames queued while the listener connected are old: keep only the newest, or they
        would stay in the buffer as extra latency for the rest of the session."""
        while len(self._buffer) > 1:
            self._buffer.popleft()
            self.stats.dropped += 1

    def _next_frame(self) -> LegFrame | None:
        """This tick's frame, counted in :attr:`stats`; ``None`` (an underrun) when none came."""
        if not self._buffer:
            self.stats.underruns += 1
            return None
        frame = self._buffer.popleft()
        self.stats.frames_in += 1
        if frame.stamp:
            self.stats.transit_s += time.monotonic() - frame.stamp
            self.stats.transit_n += 1
        if self.stats.first_frame_at is None:
            self.stats.first_frame_at = asyncio.get_running_loop().time()
        return frame
