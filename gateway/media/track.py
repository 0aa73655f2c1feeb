"""The one media abstraction toward a WebRTC listener: a ``MediaStreamTrack`` fed by a LegTap.

:class:`LegTapTrack` reads :class:`~gateway.media.frames.LegFrame`\\ s from the SIP plane's tap
(through :class:`~.tapreader.TapReader`: a small bounded buffer, drop-oldest), and ``recv()`` hands aiortc one 20 ms
frame per tick of its own media clock:

* paced: tick *n* is due at ``t0 + n * 20 ms`` (no drift; a stall longer than
  :data:`RESYNC_AFTER` re-bases the clock instead of bursting to catch up);
* bounded: at most ``max_delay_frames`` frames wait in the buffer -- older ones are dropped
  and counted, so latency cannot grow when the producer's clock runs faster than ours;
* never silent on the wire: a tick with no frame sends digital silence (counted as
  ``underruns``), so the browser's jitter buffer and ``totalAudioEnergy`` keep moving;
* pre-encoded: in ``packet`` mode each frame goes through the listener's
  :class:`~.encoder.ListenerEncoder` (mix or stereo pair, Opus or G.711, encoded once) and
  ``recv()`` returns an ``av.Packet`` that aiortc packetises as-is. ``frame`` mode returns
  ``av.AudioFrame``\\ s and lets aiortc encode (G.722, or leg rates G.711 can not carry).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .encoder import ListenerEncoder
from .frames import FRAME_MS, LegTap
from .levels import LevelsCallback
from .tapreader import TapReader, TrackStats

FRAME_SECONDS = FRAME_MS / 1000.0
#: A recv() that comes this late skips the missed ticks rather than sending a burst.
RESYNC_AFTER = 0.2
#: When a tick finds no frame, wait this long for one before sending silence: the tap and
#: the track run on independent 20 ms clocks, and a few ms of jitter on either side must
#: not turn into a gap plus a frame of extra latency.
ARRIVAL_GRACE = 0.010
#: The media clock ticks this long after the first frame's arrival, so a tap whose frames
#: come with a little jitter is read just after each frame lands rather than just before.
#: (Aligning all tracks of a process on a shared 5 ms grid to batch wake-ups was measured
#: with bench/voice_webrtc.py: no CPU saved, more jitter; not done.)
SLOT_MARGIN = 0.003
#: How long the first recv() waits for the first frame (it aligns the clock on it).
FIRST_FRAME_WAIT = 0.1

TrackMode = Literal["packet", "frame"]


class LegTapTrack(MediaStreamTrack, TapReader):
    """Audio track with the mix (or the stereo pair) of one conversation's legs."""

    kind = "audio"

    def __init__(
        self,
        tap: LegTap,
        *,
        stereo: bool = False,
        codec: str | None = "opus",
        sample_rate: int = 8000,
        on_levels: LevelsCallback | None = None,
        max_delay_frames: int = 3,
        on_tap_ended: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._encoder = ListenerEncoder(codec, stereo=stereo, sample_rate=sample_rate, on_levels=on_levels)
        self.codec = self._encoder.codec
        self.stereo = self._encoder.stereo
        self.stats = TrackStats()
        self._t0: float | None = None
        self._index = 0
        self._start_reading(tap, max_delay_frames, on_tap_ended)

    @property
    def mode(self) -> TrackMode:
        """``packet``: frames are encoded here; ``frame``: aiortc encodes them."""
        return "packet" if self._encoder.pre_encodes else "frame"

    # --- aiortc's sender task ---------------------------------------------------------------
    async def recv(self) -> av.Packet[Any] | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._t0 is None:
            await self._start_clock()
        else:
            await self._next_tick()
        self._drain()
        if not self._buffer and not self.tap_ended:
            await self._wait_for_frame(ARRIVAL_GRACE)
            if self.readyState != "live":
                raise MediaStreamError
        pcm = self._encoder.pcm(self._next_frame())
        self.stats.frames_out += 1
        packet = self._encoder.packet(pcm, self._index)
        if packet is not None:
            return packet
        # Not pre-encoded (or libopus gave nothing for this frame, which it never does at
        # 20 ms): let aiortc encode it rather than stall the sender.
        return self._encoder.audio_frame(pcm, self._index)

    async def _start_clock(self) -> None:
        """Start the media clock just after the first frame's arrival."""
        self._drain()
        if not self._buffer and not self.tap_ended:
            await self._wait_for_frame(FIRST_FRAME_WAIT)
        self._keep_newest()
        self._t0 = asyncio.get_running_loop().time() + (SLOT_MARGIN if self._buffer else 0.0)

    async def _next_tick(self) -> None:
        """Sleep until the next 20 ms tick of the media clock."""
        assert self._t0 is not None
        self._index += 1
        now = asyncio.get_running_loop().time()
        due = self._t0 + self._index * FRAME_SECONDS
        if now - due > RESYNC_AFTER:
            # The loop stalled: skip the missed ticks. The RTP timestamp jumps with them,
            # so the listener conceals a gap instead of keeping the stall as latency.
            self.stats.resyncs += 1
            self._index += int((now - due) / FRAME_SECONDS)
        elif due > now:
            await asyncio.sleep(due - now)
        if self.readyState != "live":
            raise MediaStreamError

    def stop(self) -> None:
        """End the track and stop reading the tap (the tap itself is closed by the session)."""
        self._stop_reading()
        super().stop()
