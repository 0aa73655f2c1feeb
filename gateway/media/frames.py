"""The audio frame that crosses from a SIP media worker into the main process.

A worker holding a conversation's legs sends one :class:`LegFrame` every 20 ms while
someone listens over WebRTC: both legs side by side (not yet mixed), so the main process can
mix to mono or send stereo (agent left, customer right) and meter each leg.

Wire format (one datagram per frame, little-endian)::

    u8   version (=1)
    u8   length of the conversation id (N)
    u16  sample rate / 100 (80 for 8 kHz, 160 for 16 kHz)
    u32  frame sequence number (wraps)
    u16  samples per leg (S)
    N    conversation id, UTF-8
    2*S  agent samples, int16
    2*S  customer samples, int16
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

import numpy as np

FRAME_MS = 20
_HEADER = struct.Struct("<BBHIH")
_VERSION = 1


@dataclass(frozen=True)
class LegFrame:
    """20 ms of both legs of one conversation, int16 mono each, same length."""

    conversation: str
    seq: int
    sample_rate: int
    agent: np.ndarray
    customer: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.agent.shape[0])


def encode_leg_frame(frame: LegFrame) -> bytes:
    """Serialise a frame into one datagram."""
    cid = frame.conversation.encode()
    if len(cid) > 255:
        raise ValueError("conversation id longer than 255 bytes")
    header = _HEADER.pack(_VERSION, len(cid), frame.sample_rate // 100, frame.seq & 0xFFFFFFFF, frame.samples)
    return b"".join(
        (
            header,
            cid,
            frame.agent.astype("<i2", copy=False).tobytes(),
            frame.customer.astype("<i2", copy=False).tobytes(),
        )
    )


def decode_leg_frame(data: bytes) -> LegFrame:
    """Parse one datagram; raises ``ValueError`` on anything malformed."""
    if len(data) < _HEADER.size:
        raise ValueError("short frame")
    version, cid_len, rate, seq, samples = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise ValueError(f"unknown frame version {version}")
    start = _HEADER.size
    end_cid = start + cid_len
    expected = end_cid + 4 * samples
    if len(data) != expected:
        raise ValueError(f"frame length {len(data)} != {expected}")
    cid = data[start:end_cid].decode()
    pcm = np.frombuffer(data, dtype="<i2", offset=end_cid, count=2 * samples)
    return LegFrame(cid, seq, rate * 100, pcm[:samples], pcm[samples:])


class LegTap(Protocol):
    """A bounded, drop-oldest stream of one conversation's :class:`LegFrame`s.

    The SIP plane hands one out per listener (``SipPlane.open_tap``); the WebRTC plane reads it.
    """

    async def next_frame(self) -> LegFrame:
        """Wait for the next frame (raises ``EOFError`` once the legs are gone)."""
        ...

    def close(self) -> None:
        """Stop receiving; idempotent."""
        ...
