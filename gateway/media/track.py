"""The one media abstraction toward a WebRTC listener: a ``MediaStreamTrack`` fed by a LegTap.

:class:`LegTapTrack` reads :class:`~gateway.media.frames.LegFrame`\\ s from the SIP plane's tap
(a pump task into a small bounded buffer, drop-oldest), and ``recv()`` hands aiortc one 20 ms
frame per tick of its own media clock:

* paced: tick *n* is due at ``t0 + n * 20 ms`` (no drift; a stall longer than
  :data:`RESYNC_AFTER` re-bases the clock instead of bursting to catch up);
* bounded: at most ``max_delay_frames`` frames wait in the buffer -- older ones are dropped
  and counted, so latency cannot grow when the producer's clock runs faster than ours;
* never silent on the wire: a tick with no frame sends digital silence (counted as
  ``underruns``), so the browser's jitter buffer and ``totalAudioEnergy`` keep moving;
* pre-encoded: in ``packet`` mode each frame is mixed (mono) or interleaved (stereo: agent
  left, customer right) and encoded once here -- Opus (:mod:`gateway.media.opus`) or G.711
  by table lookup (:mod:`gateway.media.g711`, mono only) -- and ``recv()`` returns an
  ``av.Packet`` that aiortc packetises as-is. ``frame`` mode returns ``av.AudioFrame``\\ s
  and lets aiortc encode (G.722, or leg rates G.711 can not carry).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
from collections.abc import Callable
from typing import Literal

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .frames import FRAME_MS, LegTap
from .g711 import G711_RATE, G711PacketEncoder
from .levels import LevelMeter, LevelsCallback
from .mixer import interleave_stereo, mix_mono
from .opus import OpusPacketEncoder
from .tapreader import TapReader, TrackStats

log = logging.getLogger(__name__)

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
#: Codecs this module pre-encodes itself; anything else goes to aiortc as AudioFrames.
PACKET_CODECS = frozenset({"opus", "pcmu", "pcma"})


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
        self.codec = codec.lower() if codec else None
        # G.711 is mono: a stereo request degrades to the mix.
        self.stereo = stereo and self.codec not in ("pcmu", "pcma")
        self.mode: TrackMode = "packet" if self.codec in PACKET_CODECS else "frame"
        self.stats = TrackStats()
        self._rate = sample_rate
        self._samples = sample_rate * FRAME_MS // 1000
        self._silence = np.zeros(self._samples, dtype=np.int16)
        self._meter = LevelMeter(on_levels)
        self._arrived = asyncio.Event()
        self._encoder: OpusPacketEncoder | G711PacketEncoder | None = None
        self._t0: float | None = None
        self._index = 0
        self._start_reading(tap, max_delay_frames, on_tap_ended)

    # --- producer side (TapReader) ---------------------------------------------------
    def _frame_arrived(self) -> None:
        self._arrived.set()

    # --- consumer side (aiortc's sender task) -------------------------------------------
    async def recv(self) -> av.Packet | av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._t0 is None:
            await self._start_clock()
        else:
            self._index += 1
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

        if self._nowait is not None:
            self._drain()
        if not self._buffer and not self.tap_ended and self._t0 is not None:
            await self._wait_for_frame()
            if self.readyState != "live":
                raise MediaStreamError
        if self._buffer:
            frame = self._buffer.popleft()
            agent, customer = frame.agent, frame.customer
            self.stats.frames_in += 1
            if self.stats.first_frame_at is None:
                self.stats.first_frame_at = loop.time()
            if frame.sample_rate != self._rate:
                self._set_rate(frame.sample_rate)
        else:
            agent = customer = self._silence
            self.stats.underruns += 1
        self._meter.feed(agent, customer)
        self.stats.frames_out += 1
        pcm = interleave_stereo(agent, customer) if self.stereo else mix_mono(agent, customer)

        if self.mode == "packet":
            packet = self._encode(pcm)
            if packet is not None:
                return packet
            # libopus gave nothing for this frame (it never does at 20 ms, but be safe):
            # fall through and let aiortc encode it rather than stall the sender.
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo" if self.stereo else "mono")
        out.sample_rate = self._rate
        out.pts = self._index * self._samples
        out.time_base = fractions.Fraction(1, self._rate)
        return out

    async def _start_clock(self) -> None:
        """Start the media clock just after the first frame's arrival, on the shared grid."""
        if self._nowait is not None:
            self._drain()
        if not self._buffer and not self.tap_ended:
            await self._wait_for_frame(FIRST_FRAME_WAIT)
        # Frames queued while ICE/DTLS were connecting are old: start with the newest only,
        # or they would stay in the buffer as permanent extra latency.
        while len(self._buffer) > 1:
            self._buffer.popleft()
            self.stats.dropped += 1
        now = asyncio.get_running_loop().time()
        self._t0 = now + (SLOT_MARGIN if self._buffer else 0.0)

    async def _wait_for_frame(self, timeout: float = ARRIVAL_GRACE) -> None:
        """Give a frame that is a few ms late ``timeout`` seconds to arrive."""
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

    def _encode(self, pcm: np.ndarray) -> av.Packet | None:
        if self._encoder is None:
            if self.codec == "opus":
                self._encoder = OpusPacketEncoder(self._rate, channels=2 if self.stereo else 1)
            elif self._rate == G711_RATE:
                self._encoder = G711PacketEncoder(self.codec or "pcmu")
            else:  # G.711 needs 8 kHz: let aiortc resample and encode this one
                self.mode = "frame"
                return None
        return self._encoder.encode(pcm, self._index)

    def _set_rate(self, rate: int) -> None:
        log.info("leg sample rate changed %d -> %d", self._rate, rate)
        self._rate = rate
        self._samples = rate * FRAME_MS // 1000
        self._silence = np.zeros(self._samples, dtype=np.int16)
        self._encoder = None
        self.mode = "packet" if self.codec in PACKET_CODECS else "frame"

    def stop(self) -> None:
        """End the track and stop reading the tap (the tap itself is closed by the session)."""
        self._stop_reading()
        super().stop()
