"""Batched sending: one 20 ms tick per process sends every listener's packet.

Why: with pre-encoded packets, what a WebRTC listener still costs is aiortc's per-packet
path -- a task wake-up, ``RtpPacket`` objects, header-extension encoding, two NTP clock
reads and three awaits per packet, ~150-200 us of Python on this host -- not the
cryptography or the socket (RTP header + SRTP + ``sendto`` measure ~20 us, see
``bench/voice_webrtc.py``). :class:`BatchSender` keeps aiortc for what it is good at (SDP,
ICE, DTLS, RTCP) and does the media itself: one timer for all listeners of the process, and
per listener a struct-packed RTP header, ``libsrtp`` protect with the DTLS-derived key and
one ``sendto`` on the nominated ICE pair.

The SSRC, the SRTP context and the ICE pair are aiortc internals, read through
:mod:`.aiortc_compat` (:func:`~.aiortc_compat.can_send_rtp_itself` tells
:func:`gateway.media.whep.answer_whep` whether to use the plain :class:`~.track.LegTapTrack`
instead). aiortc's own sender loop for the transceiver stays parked on a track whose
``recv()`` never returns, so it sends nothing and costs nothing; its RTCP task still runs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .aiortc_compat import SrtpRoute, sender_ssrc, srtp_route
from .encoder import ListenerEncoder, pre_encodable
from .frames import FRAME_MS, LegFrame, LegTap
from .g711 import G711_RATE, index_table
from .levels import LevelMeter, LevelsCallback
from .opus import OpusPacketEncoder
from .tapreader import TapReader, TrackStats
from .track import ARRIVAL_GRACE, FRAME_SECONDS, RESYNC_AFTER

log = logging.getLogger(__name__)

_RTP = struct.Struct("!BBHII")
#: Ticks with a frame left over after sending before one frame is dropped to catch up.
CATCH_UP_AFTER_TICKS = 25


def _answer_params(sdp: str) -> tuple[int, str | None, int | None, int | None]:
    """Payload type aiortc will send (first of the audio m-line), its mid, the mid extmap id,
    and the payload type of Opus when the answer lists it (the HD voice upgrade)."""
    pt, mid, ext, opus = 0, None, None, None
    in_audio = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            in_audio = line.startswith("m=audio") and mid is None
            if in_audio:
                pt = int(line.split()[3])
        elif in_audio and line.startswith("a=mid:"):
            mid = line[6:].strip()
        elif in_audio and line.startswith("a=extmap:") and "sdes:mid" in line:
            ext = int(line[9:].split()[0].split("/")[0])
        elif in_audio and line.lower().startswith("a=rtpmap:") and " opus/48000" in line.lower() and opus is None:
            opus = int(line[9:].split()[0])
    return pt, mid, ext, opus


class Skip(enum.Enum):
    """What :meth:`BatchTrack.take` gives instead of a frame."""

    DEFER = "defer"  #: no frame yet: ask again after the arrival grace
    IDLE = "idle"  #: not connected yet: nothing to send


class BatchTrack(MediaStreamTrack, TapReader):
    """The listener's media state; as an aiortc track it only ever parks the stock sender.

    Has the same public surface as :class:`~.track.LegTapTrack` (``stats``, ``mode``,
    ``codec``, ``stereo``, ``tap_ended``, ``stop()``) so :class:`~.whep.WhepSession` does not
    care which one it holds.
    """

    kind = "audio"
    mode = "batch"

    def __init__(
        self,
        tap: LegTap,
        *,
        codec: str,
        stereo: bool,
        sample_rate: int = 8000,
        on_levels: LevelsCallback | None = None,
        max_delay_frames: int = 3,
        on_tap_ended: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        if not pre_encodable(codec, sample_rate):
            raise ValueError(f"batched sending does not do {codec} at {sample_rate} Hz")
        self._encoder = ListenerEncoder(codec, stereo=stereo, sample_rate=sample_rate, on_levels=on_levels)
        self._on_levels = on_levels
        #: the Opus payload type the answer also lists: a G.711 listener moves to it when the
        #: legs turn wideband (16 kHz frames), without a new offer; None: stays as it is
        self._opus_pt: int | None = None
        self.upgraded = False
        # Read by every tick: plain attributes (the codec's clock and frame length do not change).
        self._ticks_per_frame = self._encoder.ticks_per_frame
        #: the G.711 codec when the payload is the table lookup of the 8 kHz mix (batched), else None
        self.g711_mono = self._encoder.g711_mono
        #: the level meter, fed by the batched G.711 pass; None when nobody reads the levels
        self.meter: LevelMeter | None = self._encoder.meter if self._encoder.meter.wanted else None
        self.codec = self._encoder.codec
        self.stereo = self._encoder.stereo
        self.stats = TrackStats()
        self._backlog_ticks = 0
        self._parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._start_reading(tap, max_delay_frames, on_tap_ended)
        # RTP state, bound once the answer is made (attach()).
        self._sender: RTCRtpSender | None = None
        self._route: SrtpRoute | None = None
        self._seq = random.randint(0, 0xFFFF)
        self._ts = random.randint(0, 0xFFFFFFFF)
        self._header_ext = b""
        self._pt = 0
        self._ssrc = 0
        self._marker = True
        self._index = 0

    # --- aiortc side: park the stock sender -------------------------------------------------
    async def recv(self) -> Any:
        await asyncio.shield(self._parked)
        raise MediaStreamError

    def attach(self, sender: RTCRtpSender, answer_sdp: str) -> None:
        """Remember the sender and the negotiated payload type, mid and extension."""
        self._sender = sender
        self._pt, mid, ext, opus = _answer_params(answer_sdp)
        if self.g711_mono is not None and opus is not None and opus != self._pt:
            self._opus_pt = opus
        self._ssrc = sender_ssrc(sender)
        if mid is not None and ext is not None and 0 < ext < 15:
            data = mid.encode()
            element = bytes([(ext << 4) | (len(data) - 1)]) + data
            element += b"\x00" * (-len(element) % 4)
            self._header_ext = struct.pack("!HH", 0xBEDE, len(element) // 4) + element

    # --- one tick ---------------------------------------------------------------------------
    def _connected_route(self) -> SrtpRoute | None:
        if self._route is not None and not self._route.closed:
            return self._route
        self._route = None
        if self._sender is None:
            return None
        route = srtp_route(self._sender.transport)
        if route is None:
            return None
        # Cached: WHEP has no ICE restart, so the pair and the SRTP context live as long
        # as the session (a closed socket invalidates it above).
        self._route = route
        self._keep_newest()  # first send: frames queued while connecting are old
        return route

    def take(self, may_defer: bool) -> LegFrame | Skip | None:
        """This tick's frame (``None``: silence), :attr:`Skip.DEFER` to be asked again after
        the grace, or :attr:`Skip.IDLE`: nothing to send (not connected yet)."""
        self._drain()
        route = self._route
        if (route is None or route.closed) and self._connected_route() is None:
            return Skip.IDLE  # not connected yet: keep only the newest frames
        if not self._buffer and may_defer and not self.tap_ended:
            return Skip.DEFER
        frame = self._next_frame()
        if frame is not None:
            self._catch_up()
        return frame

    def encode_and_send(self, frame: LegFrame | None) -> None:
        """Meter, mix, encode and send one frame the per-listener way (Opus, stereo, other rates)."""
        payload = self._encoder.payload(self._encoder.pcm(frame), self._index)
        if payload is not None:
            self.send(payload)

    def upgrade_for(self, frame: LegFrame) -> None:
        """A G.711 listener whose answer also lists Opus gets wideband frames (every leg is now
        G.722 or Opus): from this packet on it sends Opus, at 16 kHz, on Opus's payload type.
        The browser decodes whichever negotiated payload type arrives (RFC 3550 §5.1; the
        marker bit starts the talkspurt); the RTP clock goes on in Opus's 48 kHz units."""
        if self._opus_pt is None or self.upgraded or frame.sample_rate == G711_RATE:
            return
        log.info("listener upgraded to Opus: the legs are wideband (%d Hz)", frame.sample_rate)
        self._encoder = ListenerEncoder("opus", stereo=False, sample_rate=frame.sample_rate, on_levels=self._on_levels)
        self._ticks_per_frame = self._encoder.ticks_per_frame
        self.meter = self._encoder.meter if self._encoder.meter.wanted else None
        self.g711_mono = None
        self.codec = "opus"
        self._pt = self._opus_pt
        self._marker = True
        self.upgraded = True

    def send_shared(self, frame: LegFrame, shared: SharedOpus) -> None:
        """Meter this listener's frame and send the conversation's Opus packet for it (encoded
        by the first of its listeners this tick)."""
        encoder = self._encoder
        agent, customer = encoder.legs(frame)
        encoder.meter.feed(agent, customer)
        payload = shared.payload(frame, encoder.mix, agent, customer)
        if payload is not None:
            self.send(payload)

    def send(self, payload: bytes) -> None:
        """Send one frame's payload as the next RTP packet."""
        route = self._route
        if route is None:
            return
        self._index += 1
        self.stats.frames_out += 1
        first = 0x90 if self._header_ext else 0x80
        header = _RTP.pack(first, self._pt | (0x80 if self._marker else 0), self._seq, self._ts, self._ssrc)
        self._marker = False
        try:
            route.send(header + self._header_ext + payload)
        except Exception:
            log.debug("batched send failed", exc_info=True)
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + self._ticks_per_frame) & 0xFFFFFFFF

    def tick(self, may_defer: bool) -> bool:
        """Send this tick's packet on its own; returns False (nothing sent) to be retried after the grace."""
        frame = self.take(may_defer)
        if frame is Skip.DEFER:
            return False
        if frame is not Skip.IDLE:
            self.encode_and_send(frame)
        return True

    def _catch_up(self) -> None:
        """A frame still queued after this tick's, tick after tick, is latency the listener
        would keep for the rest of the session (the producers drifted a whole frame ahead of
        the tick): after half a second of it, drop one frame (a 20 ms gap, concealed)."""
        if not self._buffer:
            self._backlog_ticks = 0
            return
        self._backlog_ticks += 1
        if self._backlog_ticks >= CATCH_UP_AFTER_TICKS:
            self._buffer.popleft()
            self.stats.dropped += 1
            self._backlog_ticks = 0

    def skip(self, frames: int) -> None:
        """The sender stalled for ``frames`` ticks: advance the RTP clock past them."""
        self._index += frames
        self._ts = (self._ts + frames * self._ticks_per_frame) & 0xFFFFFFFF
        self.stats.resyncs += 1

    def delay(self, seconds: float) -> None:
        """Every later packet goes out ``seconds`` later: move the RTP clock with it (a gap of
        that much the listener conceals), or each such move would stay in the stream as
        lateness against its own time stamps."""
        ticks = round(seconds * self._ticks_per_frame / FRAME_SECONDS)
        self._ts = (self._ts + ticks) & 0xFFFFFFFF

    def stop(self) -> None:
        BatchSender.instance().remove(self)
        self._stop_reading()
        if not self._parked.done():
            self._parked.set_result(None)
        super().stop()


class SharedOpus:
    """One Opus encoder per conversation and channel layout in a process: all its Opus
    listeners send the same packets, so a wideband conversation costs one encode per 20 ms
    however many browsers listen (the RTP header, SRTP and ``sendto`` stay per listener).

    A frame is encoded once, by its sequence number; a listener whose frame differs this
    tick (it lagged, or dropped one) gets that frame encoded too, by the same encoder.
    """

    def __init__(self, rate: int, stereo: bool) -> None:
        self.rate = rate
        self._encoder = OpusPacketEncoder(rate, channels=2 if stereo else 1)
        self._seq = -1
        self._payload: bytes | None = None
        self._frames = 0
        #: the sender's tick that last used it (idle ones are dropped)
        self.used = 0
        self.encodes = 0

    def payload(
        self,
        frame: LegFrame,
        mix: Callable[[np.ndarray, np.ndarray], np.ndarray],
        agent: np.ndarray,
        customer: np.ndarray,
    ) -> bytes | None:
        """The Opus payload of ``frame`` (``mix`` makes its PCM when it is not encoded yet)."""
        if frame.seq != self._seq:
            self._seq = frame.seq
            self._payload = self._encoder.payload(mix(agent, customer), self._frames)
            self._frames += 1
            self.encodes += 1
        return self._payload


class BatchSender:
    """The process-wide ticker (one per event loop)."""

    _instances: dict[int, BatchSender] = {}

    @classmethod
    def instance(cls) -> BatchSender:
        loop = asyncio.get_running_loop()
        sender = cls._instances.get(id(loop))
        if sender is None or sender._loop is not loop:
            sender = cls._instances[id(loop)] = BatchSender(loop)
        return sender

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.tracks: set[BatchTrack] = set()
        self._task: asyncio.Task[None] | None = None
        self.late_ticks = 0
        self.phase_shifts = 0
        #: ticks run, ticks that started more than 20 ms late, and the worst lag (seconds)
        self.ticks = 0
        self.lagged_ticks = 0
        self.max_lag = 0.0
        #: called at the start of each pass of a tick, before any track takes its frame (a
        #: media process reads the SIP workers' frames there: no wake-up per datagram)
        self.before_tick: list[Callable[[], None]] = []
        #: Opus encoders shared by the listeners of one conversation: (conversation, stereo) →
        self.shared: dict[tuple[str, bool], SharedOpus] = {}
        #: Opus packets sent from a shared encoder, and the encodes they took
        self.shared_sends = 0
        self.shared_encodes = 0

    def add(self, track: BatchTrack) -> None:
        self.tracks.add(track)
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run())

    def remove(self, track: BatchTrack) -> None:
        self.tracks.discard(track)

    async def _run(self) -> None:
        loop = self._loop
        t0 = loop.time()
        n = 0
        while self.tracks:
            n += 1
            due = t0 + n * FRAME_SECONDS
            now = loop.time()
            if now - due > RESYNC_AFTER:
                # Stalled: skip the missed ticks; every stream's RTP timestamp jumps with them
                # (a gap the listener conceals, not latency it keeps).
                self.late_ticks += 1
                skipped = int((now - due) / FRAME_SECONDS)
                n += skipped
                due += skipped * FRAME_SECONDS
                for t in self.tracks:
                    t.skip(skipped)
            elif due > now:
                await asyncio.sleep(due - now)
            lag = loop.time() - due
            self.ticks += 1
            if lag > 0.02:
                self.lagged_ticks += 1
            self.max_lag = max(self.max_lag, lag)
            tracks = list(self.tracks)
            if self.ticks % 50 == 0 and self.shared:  # once a second: forget idle shared encoders
                self.shared = {k: v for k, v in self.shared.items() if self.ticks - v.used < 50}
            deferred = self._send_all(tracks, may_defer=True)
            if deferred:
                if len(deferred) * 2 > len(tracks) and len(tracks) >= 4:
                    # Most frames land just after our tick (producers that share a clock,
                    # as a SIP worker's calls do): move the tick into their wake for good.
                    t0 += ARRIVAL_GRACE
                    self.phase_shifts += 1
                    for t in tracks:  # from now on every packet (the deferred: this one) is later
                        t.delay(ARRIVAL_GRACE)
                await asyncio.sleep(ARRIVAL_GRACE)
                self._send_all([t for t in deferred if t in self.tracks], may_defer=False)

    def _send_all(self, tracks: list[BatchTrack], *, may_defer: bool) -> list[BatchTrack]:
        """One tick of ``tracks``; returns those that deferred.

        G.711 mono listeners (the default) are mixed, metered and encoded together: one numpy
        pass over all their frames, then per listener only the RTP header, SRTP and ``sendto``.
        """
        for hook in self.before_tick:
            hook()
        deferred: list[BatchTrack] = []
        groups: dict[str, list[tuple[BatchTrack, LegFrame | None]]] = {}
        for t in tracks:
            frame = t.take(may_defer)
            if frame is Skip.DEFER:
                deferred.append(t)
            elif frame is not Skip.IDLE:
                if frame is not None and t.g711_mono is not None and frame.sample_rate != G711_RATE:
                    t.upgrade_for(frame)  # wideband legs: to Opus, when the answer allows
                codec = t.g711_mono
                if codec is not None and (frame is None or frame.sample_rate == G711_RATE):
                    groups.setdefault(codec, []).append((t, frame))
                elif frame is not None and t.codec == "opus":
                    self._send_shared(t, frame)
                else:
                    t.encode_and_send(frame)
        for codec, items in groups.items():
            _send_g711(codec, items)
        return deferred

    def _send_shared(self, track: BatchTrack, frame: LegFrame) -> None:
        key = (frame.conversation, track.stereo)
        shared = self.shared.get(key)
        if shared is None or shared.rate != frame.sample_rate:
            shared = self.shared[key] = SharedOpus(frame.sample_rate, track.stereo)
        shared.used = self.ticks
        before = shared.encodes
        track.send_shared(frame, shared)
        self.shared_sends += 1
        self.shared_encodes += shared.encodes - before


def _send_g711(codec: str, items: list[tuple[BatchTrack, LegFrame | None]]) -> None:
    """Mix, meter and encode the frames of many G.711 mono listeners at once, then send each."""
    samples = G711_RATE * FRAME_MS // 1000
    legs = np.zeros((len(items), 2, samples), dtype=np.int16)
    for i, (_t, frame) in enumerate(items):
        if frame is not None and frame.samples == samples:
            legs[i, 0] = frame.agent
            legs[i, 1] = frame.customer
    wide = legs.astype(np.int32)
    mix = wide[:, 0] + wide[:, 1]
    np.minimum(mix, 32767, out=mix)
    np.maximum(mix, -32768, out=mix)
    payloads = index_table(codec)[mix.astype(np.int16).view(np.uint16)].tobytes()
    # sums of squares per listener and leg, for the level meters
    squares = np.einsum("kls,kls->kl", wide, wide, dtype=np.float64).tolist()
    for i, (t, _frame) in enumerate(items):
        meter = t.meter
        if meter is not None:
            meter.add(squares[i][0], squares[i][1], samples)
        t.send(payloads[i * samples : (i + 1) * samples])
