"""G.711 (PCMU / PCMA) encoding by table lookup, for listeners whose offer prefers it.

The legs arrive as 8 kHz G.711 from the telephony side anyway, so a PCMU stream to the
browser loses nothing and costs a 64 Ki-entry table lookup per frame (~10 us) instead of an
Opus encode (~60-150 us). Tables are built once with FFmpeg's own encoders, so they are
bit-exact with what aiortc would have produced.
"""

from __future__ import annotations

import fractions
from functools import lru_cache
from typing import Any

import av
import numpy as np

from .frames import FRAME_MS

G711_RATE = 8000
TIME_BASE = fractions.Fraction(1, G711_RATE)


@lru_cache(maxsize=2)
def table(codec: str) -> np.ndarray:
    """``table('pcmu')[x + 32768]`` is the G.711 byte for int16 sample ``x``."""
    name = {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec]
    ctx = av.CodecContext.create(name, "w")
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate = G711_RATE
    ctx.layout = "mono"
    ctx.format = "s16"
    ctx.time_base = TIME_BASE
    ctx.open()
    ramp = np.arange(-32768, 32768, dtype=np.int16)
    frame = av.AudioFrame.from_ndarray(ramp.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = G711_RATE
    frame.pts = 0
    out = b"".join(bytes(p) for p in ctx.encode(frame))
    out += b"".join(bytes(p) for p in ctx.encode(None))
    lut = np.frombuffer(out, dtype=np.uint8)
    assert lut.shape[0] == 65536, lut.shape
    return lut


@lru_cache(maxsize=2)
def index_table(codec: str) -> np.ndarray:
    """:func:`table` re-ordered so an int16 sample's own bit pattern (viewed as uint16) is the
    index: no conversion of the samples per frame. Shared by every listener of the process."""
    lut = table(codec)
    return np.ascontiguousarray(np.concatenate((lut[32768:], lut[:32768])))


class G711PacketEncoder:
    """int16 mono 8 kHz in, one 20 ms payload (or ``av.Packet``, pts in 8 kHz ticks) out."""

    ticks_per_frame = G711_RATE * FRAME_MS // 1000

    def __init__(self, codec: str) -> None:
        self._lut = index_table(codec)

    def payload(self, samples: np.ndarray, index: int) -> bytes:
        """The G.711 bytes of one frame (``index`` is unused: G.711 has no state)."""
        pcm = samples if samples.dtype == np.int16 else samples.astype(np.int16)
        return self._lut[pcm.view(np.uint16)].tobytes()

    def encode(self, samples: np.ndarray, index: int) -> av.Packet[Any]:
        """The frame as a packet for aiortc's pre-encoded path (``index`` is the frame number)."""
        packet = av.Packet(self.payload(samples, index))
        packet.pts = index * self.ticks_per_frame
        packet.time_base = TIME_BASE
        return packet
