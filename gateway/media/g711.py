"""G.711 (PCMU / PCMA) encoding by table lookup, for listeners whose offer prefers it.

The legs arrive as 8 kHz G.711 from the telephony side anyway, so a PCMU stream to the
browser loses nothing and costs a 64 Ki-entry table lookup per frame (~10 us) instead of an
Opus encode (~60-150 us). Tables are built once with FFmpeg's own encoders, so they are
bit-exact with what aiortc would have produced.
"""

from __future__ import annotations

import fractions
from functools import lru_cache

import av
import numpy as np

G711_RATE = 8000
TIME_BASE = fractions.Fraction(1, G711_RATE)


@lru_cache(maxsize=2)
def table(codec: str) -> np.ndarray:
    """``table('pcmu')[x + 32768]`` is the G.711 byte for int16 sample ``x``."""
    name = {"pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}[codec]
    ctx = av.CodecContext.create(name, "w")
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


class G711PacketEncoder:
    """int16 mono 8 kHz in, one ``av.Packet`` (pts in 8 kHz ticks) per 20 ms out."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        lut = table(codec)
        # Re-ordered so the int16 sample's own bit pattern (viewed as uint16) is the index:
        # no conversion of the samples per frame.
        self._lut = np.ascontiguousarray(np.concatenate((lut[32768:], lut[:32768])))
        self._lut_offset = lut  # indexed by sample + 32768

    def encode_mix(self, agent: np.ndarray, customer: np.ndarray) -> bytes:
        """Mix two int16 legs (saturating) and encode, in one pass: the batched sender's path."""
        total = agent.astype(np.int32)
        total += customer
        np.minimum(total, 32767, out=total)
        np.maximum(total, -32768, out=total)
        total += 32768
        return self._lut_offset[total].tobytes()

    def encode(self, samples: np.ndarray, index: int) -> av.Packet:
        pcm = samples if samples.dtype == np.int16 else samples.astype(np.int16)
        packet = av.Packet(self._lut[pcm.view(np.uint16)].tobytes())
        packet.pts = index * samples.shape[0]
        packet.time_base = TIME_BASE
        return packet
