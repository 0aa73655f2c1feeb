"""Encode a listener's audio to Opus once, ourselves, and hand aiortc finished packets.

aiortc 1.x (``RTCRtpSender._next_encoded_frame``) encodes whatever ``track.recv()`` returns
if it is an ``av.Frame`` -- resampling to 48 kHz stereo at 96 kb/s in an executor thread --
but if ``recv()`` returns an ``av.Packet`` it only calls ``OpusEncoder.pack(packet)``, which
converts ``packet.pts`` from ``packet.time_base`` to the 48 kHz RTP clock and sends
``bytes(packet)`` as the payload. No thread hop, no resampler, no second encode: this module
makes those packets (mono at 24 kb/s, or stereo at 48 kb/s, 20 ms each).
"""

from __future__ import annotations

import fractions
from typing import Any, Literal

import av
import numpy as np

from .frames import FRAME_MS
from .mixer import OPUS_RATE, Upsampler

#: Input rates libopus accepts as they are (its RTP clock is 48 kHz regardless).
OPUS_NATIVE_RATES = frozenset({8000, 12000, 16000, 24000, 48000})
RTP_TIME_BASE = fractions.Fraction(1, OPUS_RATE)


class OpusPacketEncoder:
    """One libopus encoder for one listener: int16 PCM in, one ``av.Packet`` per 20 ms out.

    ``channels=2`` expects interleaved ``L R`` samples (agent left, customer right).
    Packets carry ``pts`` in 48 kHz ticks (``time_base = 1/48000``) counted by the caller's
    frame index, so inserted silence and dropped frames keep the RTP timestamps regular.
    """

    #: 20 ms on Opus's 48 kHz RTP clock, whatever the input rate.
    ticks_per_frame = OPUS_RATE * FRAME_MS // 1000

    def __init__(
        self,
        in_rate: int,
        *,
        channels: Literal[1, 2] = 1,
        bitrate: int | None = None,
        complexity: int = 0,
    ) -> None:
        self.layout = "mono" if channels == 1 else "stereo"
        if in_rate in OPUS_NATIVE_RATES:
            self.rate = in_rate
            self._resampler: Upsampler | None = None
        else:
            self.rate = OPUS_RATE
            self._resampler = Upsampler(in_rate, OPUS_RATE, channels=channels)
        ctx = av.CodecContext.create("libopus", "w")
        assert isinstance(ctx, av.AudioCodecContext)
        ctx.sample_rate = self.rate
        ctx.layout = self.layout
        ctx.format = "s16"
        ctx.bit_rate = bitrate or (24_000 if channels == 1 else 48_000)
        ctx.time_base = fractions.Fraction(1, self.rate)
        # complexity 0 of 10: ~60 us instead of ~100-180 us per 20 ms at 8 kHz input, for
        # speech that started life as 8 kHz G.711 anyway; "voip" favours intelligibility.
        ctx.options = {"application": "voip", "frame_duration": "20", "compression_level": str(complexity)}
        ctx.open()
        self._ctx = ctx

    def encode(self, samples: np.ndarray, index: int) -> av.Packet[Any] | None:
        """Encode 20 ms (interleaved when stereo); ``index`` is the frame number (pts source)."""
        if self._resampler is not None:
            samples = self._resampler.process(samples)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=self.layout)
        frame.sample_rate = self.rate
        frame.pts = index * (self.rate * FRAME_MS // 1000)
        frame.time_base = self._ctx.time_base
        packets = self._ctx.encode(frame)
        if not packets:
            return None
        packet = packets[-1]
        packet.pts = index * self.ticks_per_frame
        packet.time_base = RTP_TIME_BASE
        return packet

    def payload(self, samples: np.ndarray, index: int) -> bytes | None:
        """The Opus bytes of one frame, as :meth:`encode` makes them."""
        packet = self.encode(samples, index)
        return None if packet is None else bytes(packet)
