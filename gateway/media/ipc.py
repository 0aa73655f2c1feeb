"""The protocol between the main process and a WebRTC media process (:mod:`gateway.media.process`).

Two channels per media process:

* **control**: a unix stream socket (a socketpair made by :mod:`gateway.media.pool`), one JSON
  object per line, each message a small frozen dataclass tagged by its ``TYPE``; the codec is
  the SIP worker protocol's (:class:`gateway.sip.protocol.JsonLineCodec`). A command with ``re``
  set is a request: the media process answers it with a :class:`Reply` carrying the same ``re``.
* **audio**: the media process's own unix seqpacket socket (its path is in :class:`Ready`). The
  SIP workers send the LegFrames of every conversation it serves straight there
  (:class:`gateway.sip.protocol.SetTap` with ``to``), in the LegFrame wire format of
  :mod:`gateway.sip.protocol`: the main process never touches the audio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

# The bases, Quit (close every listener and exit) and the codec are the SIP worker protocol's.
from ..sip.protocol import Command as Command
from ..sip.protocol import Event as Event
from ..sip.protocol import JsonLineCodec
from ..sip.protocol import Quit as Quit

# --- main process -> media process ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Offer(Command):
    """Answer a WHEP ``sdp`` offer for a listener of conversation ``cid``; the session is ``session``."""

    TYPE: ClassVar[str] = "offer"
    session: str
    cid: str
    sdp: str
    stereo: bool
    #: ``""``: the process's configured codec
    codec: str = ""


@dataclass(frozen=True, kw_only=True)
class Close(Command):
    """Close listener ``session`` (DELETE, monitor ended, replaced)."""

    TYPE: ClassVar[str] = "close"
    session: str
    reason: str


# --- media process -> main process ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Ready(Event):
    """Up, listening for LegFrames on ``frame_path``."""

    TYPE: ClassVar[str] = "ready"
    pid: int
    frame_path: str


@dataclass(frozen=True, kw_only=True)
class Reply(Event):
    """Outcome of request ``re``: an :class:`Offer`'s answer ``sdp``, or ``code`` (a
    :class:`~gateway.media.whep.WhepError` code) and ``error``."""

    TYPE: ClassVar[str] = "reply"
    re: int
    ok: bool
    sdp: str = ""
    code: str = ""
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class Levels(Event):
    """Per-leg levels due this tick: ``[[session, agent_dbfs, customer_dbfs], ...]`` (one
    message per tick for all listeners of the process, ~10 reports a second each)."""

    TYPE: ClassVar[str] = "levels"
    items: list[Any]


@dataclass(frozen=True, kw_only=True)
class Transit(Event):
    """Every second: ``[[session, transit_s, transit_n], ...]``, each listener's
    :meth:`~gateway.media.whep.WhepSession.transit` so far (worker's bridge tick -> send)."""

    TYPE: ClassVar[str] = "transit"
    items: list[Any]


@dataclass(frozen=True, kw_only=True)
class InboundRtp(Event):
    """Listener ``session``'s browser sent RTP anyway (dropped unparsed): ``total`` so far.
    Sent for the first packet, then at most every 100 ms."""

    TYPE: ClassVar[str] = "inbound_rtp"
    session: str
    total: int


@dataclass(frozen=True, kw_only=True)
class Ended(Event):
    """Listener ``session`` closed on its own (``failed``, ``connect_timeout``, ``closed``)."""

    TYPE: ClassVar[str] = "ended"
    session: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Stats(Event):
    """Counters, every second."""

    TYPE: ClassVar[str] = "stats"
    listeners: int
    connected: int
    ticks: int
    lagged_ticks: int
    max_lag_ms: float
    phase_shifts: int
    frames_in: int
    frames_out: int
    underruns: int
    dropped: int
    resyncs: int


Message: TypeAlias = Command | Event
COMMANDS: tuple[type[Command], ...] = (Offer, Close, Quit)
EVENTS: tuple[type[Event], ...] = (Ready, Reply, Levels, InboundRtp, Ended, Stats, Transit)
MESSAGES: dict[str, type[Message]] = {**{c.TYPE: c for c in COMMANDS}, **{e.TYPE: e for e in EVENTS}}
CODEC = JsonLineCodec(MESSAGES)


def encode(message: Message) -> bytes:
    return CODEC.encode(message)


def decode(line: bytes | str) -> Message:
    """Raises :class:`gateway.sip.protocol.ProtocolError` on anything but a known message."""
    message: Message = CODEC.decode(line)
    return message
