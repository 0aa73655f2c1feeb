"""The audio frame that crosses from a SIP media worker into the main process.

A worker holding a conversation's legs sends one :class:`LegFrame` every 20 ms while
someone listens over WebRTC: both legs side by side (not yet mixed), so the main process can
mix to mono or send stereo (agent left, customer right) and meter each leg. Its wire format
and codec are part of the SIP worker protocol (:mod:`gateway.sip.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the SIP worker imports LegFrame and must stay without numpy
    import numpy as np

FRAME_MS = 20


@dataclass(frozen=True)
class LegFrame:
    """20 ms of both legs of one conversation, int16 mono each, same length."""

    conversation: str
    seq: int
    sample_rate: int
    agent: np.ndarray
    customer: np.ndarray
    #: ``time.monotonic()`` of the worker when the frame left the legs' jitter buffers (the same
    #: clock in every process of the host); 0.0: unknown (a test's or a bench's frame)
    stamp: float = 0.0

    @property
    def samples(self) -> int:
        return int(self.agent.shape[0])


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
