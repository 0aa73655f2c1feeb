"""One listener's step from a frame of both legs to what goes on the wire.

Both senders -- :class:`~.track.LegTapTrack` (aiortc's own sender loop) and
:class:`~.batch.BatchTrack` (the process-wide ticker) -- take each 20 ms the same way:

1. the frame's two legs (or digital silence when no frame came in time) feed the level meter;
2. they are mixed to mono (:func:`~.mixer.mix_mono`) or put side by side, agent left and
   customer right (:func:`~.mixer.interleave_stereo`; G.711 is mono, so stereo degrades to the
   mix there);
3. that PCM is encoded once: Opus (:mod:`.opus`, at the legs' rate: 16 kHz wideband legs
   stay wideband) or G.711 by table lookup (:mod:`.g711`; wideband frames are first low-passed
   and decimated to 8 kHz, :class:`~.mixer.Downsampler`), as the payload of one RTP packet or
   as an ``av.Packet`` for aiortc's pre-encoded path. When there is no such encoder (G.722)
   the PCM goes to aiortc as an ``av.AudioFrame`` and aiortc encodes it.
"""

from __future__ import annotations

import fractions
import logging
from typing import Any, Protocol

import av
import numpy as np

from .frames import FRAME_MS, LegFrame
from .g711 import G711_RATE, G711PacketEncoder
from .levels import LevelMeter, LevelsCallback
from .mixer import Downsampler, interleave_stereo, mix_mono
from .opus import OpusPacketEncoder

log = logging.getLogger(__name__)

G711_CODECS = frozenset({"pcmu", "pcma"})


class PacketEncoder(Protocol):
    """One codec's encoder for one listener (:class:`OpusPacketEncoder`, :class:`G711PacketEncoder`)."""

    #: RTP clock ticks per 20 ms frame.
    ticks_per_frame: int

    def encode(self, samples: np.ndarray, index: int) -> av.Packet[Any] | None: ...

    def payload(self, samples: np.ndarray, index: int) -> bytes | None: ...


def pre_encodable(codec: str | None, sample_rate: int) -> bool:
    """Whether frames of this codec and leg rate are encoded here (Opus; G.711 at 8 kHz)."""
    return codec == "opus" or (codec in G711_CODECS and sample_rate == G711_RATE)


def packet_encoder(codec: str | None, *, stereo: bool, sample_rate: int) -> PacketEncoder | None:
    """The encoder for ``codec`` at this leg rate, or ``None`` when aiortc has to encode."""
    if codec == "opus":
        return OpusPacketEncoder(sample_rate, channels=2 if stereo else 1)
    if codec is not None and pre_encodable(codec, sample_rate):
        return G711PacketEncoder(codec)
    return None


class ListenerEncoder:
    """The frame -> PCM -> payload step of one listener (see the module docstring)."""

    def __init__(self, codec: str | None, *, stereo: bool, sample_rate: int, on_levels: LevelsCallback | None) -> None:
        self.codec = codec.lower() if codec else None
        self.stereo = stereo and self.codec not in G711_CODECS
        self._meter = LevelMeter(on_levels)
        self._set_rate(sample_rate)

    def _set_rate(self, rate: int) -> None:
        #: the frames' (legs') rate
        self.rate = rate
        self._silence = np.zeros(rate * FRAME_MS // 1000, dtype=np.int16)
        # G.711 is 8 kHz whatever the legs: wideband frames are decimated first.
        out_rate = G711_RATE if self.codec in G711_CODECS and rate % G711_RATE == 0 else rate
        self._down = Downsampler(rate, out_rate) if out_rate != rate else None
        #: the rate of the PCM handed to the codec, and its samples per frame
        self.out_rate = out_rate
        self.samples = out_rate * FRAME_MS // 1000
        self._packets = packet_encoder(self.codec, stereo=self.stereo, sample_rate=out_rate)

    @property
    def pre_encodes(self) -> bool:
        """Whether frames are encoded here (else aiortc encodes :meth:`audio_frame`\\ s)."""
        return self._packets is not None

    @property
    def ticks_per_frame(self) -> int:
        """RTP clock ticks per frame of the pre-encoded stream."""
        return self._packets.ticks_per_frame if self._packets is not None else self.samples

    @property
    def meter(self) -> LevelMeter:
        return self._meter

    @property
    def g711_mono(self) -> str | None:
        """``pcmu``/``pcma`` for a G.711 listener: a frame's payload is the table lookup of the
        mono mix, which :class:`~.batch.BatchSender` does for all such listeners' 8 kHz frames
        at once; else ``None``."""
        return self.codec if self.codec in G711_CODECS else None

    def legs(self, frame: LegFrame | None) -> tuple[np.ndarray, np.ndarray]:
        """The frame's two legs (silence for ``None``), following a change of the legs' rate."""
        if frame is None:
            return self._silence, self._silence
        if frame.sample_rate != self.rate:
            log.info("leg sample rate changed %d -> %d", self.rate, frame.sample_rate)
            self._set_rate(frame.sample_rate)
        return frame.agent, frame.customer

    def mix(self, agent: np.ndarray, customer: np.ndarray) -> np.ndarray:
        """The PCM the codec takes: the mono mix (decimated for G.711 from wideband legs) or
        the stereo pair."""
        if self.stereo:
            return interleave_stereo(agent, customer)
        pcm = mix_mono(agent, customer)
        return pcm if self._down is None else self._down.process(pcm)

    def pcm(self, frame: LegFrame | None) -> np.ndarray:
        """Meter and mix (or interleave) one frame; ``None`` is a frame of silence."""
        agent, customer = self.legs(frame)
        self._meter.feed(agent, customer)
        return self.mix(agent, customer)

    def packet(self, pcm: np.ndarray, index: int) -> av.Packet[Any] | None:
        """Frame ``index`` as an ``av.Packet`` for aiortc (``None``: not pre-encoded)."""
        return None if self._packets is None else self._packets.encode(pcm, index)

    def payload(self, pcm: np.ndarray, index: int) -> bytes | None:
        """Frame ``index`` as the payload of one RTP packet (``None``: nothing to send)."""
        return None if self._packets is None else self._packets.payload(pcm, index)

    def audio_frame(self, pcm: np.ndarray, index: int) -> av.AudioFrame:
        """Frame ``index`` as PCM for aiortc to encode."""
        out = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="stereo" if self.stereo else "mono")
        out.sample_rate = self.out_rate
        out.pts = index * self.samples
        out.time_base = fractions.Fraction(1, self.out_rate)
        return out
