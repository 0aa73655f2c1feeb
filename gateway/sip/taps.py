"""Taps: LegFrames from the workers, fanned out to every listener of a conversation.

A worker sends a conversation's frames only while someone listens (the plane switches it with
:class:`~gateway.sip.protocol.SetTap` when the first tap of a conversation opens and the last
one closes). Each datagram is routed by its conversation id and decoded once, for all taps.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, Protocol

from ..media.frames import LegFrame
from .protocol import decode_leg_frame, leg_frame_conversation


class TapOwner(Protocol):
    """What a :class:`Tap` reports to the fan-out that made it."""

    _tap_drops: int  # frames dropped by full taps, all taps together

    def _tap_closed(self, tap: Tap) -> None: ...


class Tap:
    """A bounded, drop-oldest stream of one conversation's :class:`LegFrame` (a ``LegTap``)."""

    def __init__(self, owner: TapOwner, cid: str, maxsize: int) -> None:
        self.owner = owner
        self.conversation = cid
        self.frames: collections.deque[LegFrame] = collections.deque(maxlen=max(1, maxsize))
        self.dropped = 0
        self.received = 0
        self.closed = False
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None

    def _put(self, frame: LegFrame) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1
            self.owner._tap_drops += 1
        self.frames.append(frame)
        self.received += 1
        self._wake()

    def _finish(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def next_frame_nowait(self) -> LegFrame | None:
        """The next frame, ``None`` when none is queued; raises ``EOFError`` once the legs are gone.
        (A sender draining taps on its own tick needs no task per listener.)"""
        if self.frames:
            return self.frames.popleft()
        if self.eof or self.closed:
            raise EOFError(self.conversation)
        return None

    async def next_frame(self) -> LegFrame:
        """Wait for the next frame; raises ``EOFError`` once the legs are gone (or closed)."""
        while True:
            if self.frames:
                return self.frames.popleft()
            if self.eof or self.closed:
                raise EOFError(self.conversation)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Stop receiving; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.frames.clear()
        self._wake()
        self.owner._tap_closed(self)


#: switch(cid, on): the first tap of ``cid`` opened (True) or its last one closed (False).
TapSwitch = Callable[[str, bool], None]


class TapFanout:
    """Every open :class:`Tap`, by conversation; receives the workers' frame datagrams."""

    def __init__(self, switch: TapSwitch) -> None:
        self._switch = switch
        self.taps: dict[str, set[Tap]] = {}
        self._tap_drops = 0
        self.frames_received = 0

    def open(self, cid: str, maxsize: int) -> Tap:
        tap = Tap(self, cid, maxsize)
        taps = self.taps.setdefault(cid, set())
        first = not taps
        taps.add(tap)
        if first:
            self._switch(cid, True)
        return tap

    def _tap_closed(self, tap: Tap) -> None:
        taps = self.taps.get(tap.conversation)
        if taps is None:
            return
        taps.discard(tap)
        if not taps:
            del self.taps[tap.conversation]
            self._switch(tap.conversation, False)

    def listened(self, cid: str) -> bool:
        return bool(self.taps.get(cid))

    def finish(self, cid: str) -> None:
        """The conversation's legs are gone: its taps end (``EOFError`` once drained)."""
        for tap in self.taps.pop(cid, set()):
            tap._finish()

    def finish_all(self) -> None:
        for cid in list(self.taps):
            self.finish(cid)

    def frame_received(self, data: bytes) -> None:
        self.frames_received += 1
        cid = leg_frame_conversation(data)
        taps = self.taps.get(cid) if cid is not None else None
        if not taps:
            return
        try:
            frame = decode_leg_frame(data)
        except ValueError:
            return
        for tap in taps:
            tap._put(frame)

    def protocol(self) -> asyncio.DatagramProtocol:
        """A receiver for one worker's frame socket."""
        return _FrameReceiver(self)

    @property
    def count(self) -> int:
        return sum(len(t) for t in self.taps.values())


class _FrameReceiver(asyncio.DatagramProtocol):
    def __init__(self, fanout: TapFanout) -> None:
        self.fanout = fanout

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.fanout.frame_received(data)
