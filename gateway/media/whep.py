"""WHEP-style WebRTC listener: one browser offer in, one send-only answer out.

The control plane calls :func:`answer_whep` with the SDP offer it received on
``POST /v1/monitors/{mid}/whep`` and a :class:`LegTap` from the SIP plane, answers ``201``
with the returned SDP and ``Location: .../whep/{session.id}``, keeps the session by monitor,
and calls :meth:`WhepSession.close` on ``DELETE`` of that location or when the monitor ends.

Rules this module enforces (DESIGN.md section 4, rule R4):

* the answer's audio is ``a=sendonly`` whatever the offer asked for: the transceiver
  direction is set after ``setRemoteDescription`` and before ``createAnswer``; every other
  m-line (video, a second audio) is answered ``inactive``;
* the remote track is never read (a ``sendrecv`` offer still creates one; reading it would
  decode the supervisor's microphone for nothing). RTP the browser sends anyway is counted
  and dropped before parsing (:attr:`WhepSession.inbound_rtp_packets`, ``on_inbound_rtp``;
  :func:`.aiortc_compat.divert_inbound_rtp`);
* ``RTCConfiguration`` has the configured ICE servers or none -- never a public STUN host;
  host candidates come from ``Settings.ice_host_addresses`` (see :mod:`gateway.media.ice`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpSender, RTCRtpTransceiver, RTCSessionDescription
from aiortc.sdp import SessionDescription

from ..config import Settings
from .aiortc_compat import can_send_rtp_itself, divert_inbound_rtp
from .batch import BatchSender, BatchTrack
from .encoder import pre_encodable
from .frames import LegTap
from .ice import filter_offer_candidates, host_addresses, loopback_only, rtc_configuration, split_csv
from .levels import LevelsCallback
from .tapreader import TrackStats
from .track import LegTapTrack

log = logging.getLogger(__name__)

InboundRtpCallback = Callable[[int], None]
#: Seconds a session may stay unconnected before it is closed (the browser went away);
#: ``answer_whep(connect_timeout=...)`` overrides it.
CONNECT_TIMEOUT = 30.0


class WhepError(ValueError):
    """The offer can not be answered (malformed SDP, no audio, no common codec)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WhepSession:
    """One listening browser: its peer connection, its track, its counters.

    ``id`` names the WHEP resource (the control plane puts it in ``Location``).
    ``on_closed`` callbacks run once, with the reason (``deleted``, ``failed``,
    ``connect_timeout``; the tap ending is *not* a close reason: it only sets the track's
    ``tap_ended``, and the monitor's end closes the session).
    """

    def __init__(
        self,
        pc: RTCPeerConnection,
        track: LegTapTrack | BatchTrack,
        tap: LegTap,
        *,
        stereo: bool,
        on_inbound_rtp: InboundRtpCallback | None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.pc = pc
        self.track = track
        self.tap = tap
        self.stereo = stereo
        self.connected_at: float | None = None
        self.inbound_rtp_packets = 0
        self.close_reason: str | None = None
        self._on_inbound_rtp = on_inbound_rtp
        self._closed = asyncio.Event()
        self._closing = False
        self._close_callbacks: list[Callable[[str], Any]] = []
        self._timeout: asyncio.TimerHandle | None = None

    # --- state --------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """aiortc's ``connectionState`` (``new``, ``connecting``, ``connected``, ``failed``, ``closed``)."""
        return self.pc.connectionState

    @property
    def stats(self) -> TrackStats:
        return self.track.stats

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def on_closed(self, callback: Callable[[str], Any]) -> None:
        """Register ``callback(reason)``; runs once when the session closes for any reason."""
        if self.closed:
            callback(self.close_reason or "closed")
        else:
            self._close_callbacks.append(callback)

    def transit(self) -> tuple[float, int]:
        """Seconds from the SIP worker's bridge tick to the send, summed over how many frames
        (both only grow; :mod:`gateway.quality` takes the mean of each window)."""
        return self.track.stats.transit_s, self.track.stats.transit_n

    def describe(self) -> dict[str, Any]:
        """JSON-friendly status (for logs, metrics, a debug endpoint)."""
        s = self.track.stats
        return {
            "id": self.id,
            "state": self.state,
            "stereo": self.stereo,
            "codec": self.track.codec,
            "mode": self.track.mode,
            "frames_out": s.frames_out,
            "underruns": s.underruns,
            "dropped": s.dropped,
            "inbound_rtp_packets": self.inbound_rtp_packets,
            "closed": self.closed,
        }

    # --- inbound RTP: count and drop -----------------------------------------------------
    async def _count_inbound(self, data: bytes, arrival_time_ms: int = 0) -> None:
        """Stands in for aiortc's inbound RTP handling: count, never parse or route."""
        self.inbound_rtp_packets += 1
        if self._on_inbound_rtp is not None:
            try:
                self._on_inbound_rtp(self.inbound_rtp_packets)
            except Exception:
                self._on_inbound_rtp = None

    # --- lifecycle -----------------------------------------------------------------------
    def _watch(self, connect_timeout: float) -> None:
        """Count and drop inbound RTP; close on ICE/DTLS failure or when nothing connects in time."""
        for dtls in {t.sender.transport for t in self.pc.getTransceivers() if t.sender.transport is not None}:
            divert_inbound_rtp(dtls, self._count_inbound)

        @self.pc.on("connectionstatechange")
        async def _on_state() -> None:
            state = self.pc.connectionState
            log.info("whep session %s connection %s", self.id, state)
            if state == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()
                if self._timeout is not None:
                    self._timeout.cancel()
            elif state in ("failed", "closed") and not self._closing:
                await self.close(state)

        def _timed_out() -> None:
            if self.connected_at is None and not self._closing:
                asyncio.ensure_future(self.close("connect_timeout"))

        self._timeout = asyncio.get_running_loop().call_later(connect_timeout, _timed_out)

    async def close(self, reason: str = "deleted") -> None:
        """Stop sending, close the peer connection and the tap; idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self.close_reason = reason
        if self._timeout is not None:
            self._timeout.cancel()
        self.track.stop()
        try:
            self.tap.close()
        except Exception:
            log.exception("closing leg tap failed")
        try:
            await self.pc.close()
        except Exception:
            log.exception("closing peer connection failed")
        self._closed.set()
        log.info("whep session %s closed (%s), %s", self.id, reason, self.describe())
        for cb in self._close_callbacks:
            try:
                res = cb(reason)
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("on_closed callback failed")
        self._close_callbacks.clear()


SUPPORTED_CODECS = ("opus", "pcmu", "pcma", "g722")


def _offered_codecs(offer: SessionDescription) -> list[str]:
    """Codec names of the first audio m-line that aiortc can send, in the offer's order."""
    for media in offer.media:
        if media.kind == "audio":
            names = [c.name.lower() for c in media.rtp.codecs]
            return [n for n in dict.fromkeys(names) if n in SUPPORTED_CODECS]
    return []


def _unacceptable_audio(offer: SessionDescription) -> str | None:
    """Why the offer's audio can not be answered although it parsed: a payload type outside
    RTP's 7 bits (RFC 3550), or no DTLS fingerprint to authenticate the peer (RFC 8827)."""
    for media in offer.media:
        if media.kind != "audio":
            continue
        types = [*media.fmt, *(c.payloadType for c in media.rtp.codecs)]
        if any(not isinstance(pt, int) or not 0 <= pt <= 127 for pt in types):
            return "the offer's audio uses a payload type outside 0-127"
        if media.dtls is None or not media.dtls.fingerprints:
            return "the offer's audio has no a=fingerprint (DTLS-SRTP is required)"
    return None


def _munge_stereo(answer_sdp: str) -> str:
    """Tell the browser the Opus stream is stereo (``stereo=1; sprop-stereo=1``)."""
    lines = answer_sdp.splitlines()
    opus_pts = [
        ln.split(":", 1)[1].split()[0] for ln in lines if ln.startswith("a=rtpmap:") and "opus/48000" in ln.lower()
    ]
    out: list[str] = []
    done = set()
    for ln in lines:
        for pt in opus_pts:
            if ln.startswith(f"a=fmtp:{pt} "):
                params = ln.split(" ", 1)[1]
                extra = [p for p in ("stereo=1", "sprop-stereo=1") if p not in params]
                ln = f"a=fmtp:{pt} " + ";".join([params] + extra)
                done.add(pt)
        out.append(ln)
        if ln.startswith("a=rtpmap:"):
            pt = ln.split(":", 1)[1].split()[0]
            if pt in opus_pts and pt not in done and not any(x.startswith(f"a=fmtp:{pt} ") for x in lines):
                out.append(f"a=fmtp:{pt} stereo=1;sprop-stereo=1")
                done.add(pt)
    return "\r\n".join(out) + "\r\n"


async def answer_whep(
    offer_sdp: str,
    tap: LegTap,
    *,
    settings: Settings,
    stereo: bool,
    on_levels: LevelsCallback | None = None,
    on_inbound_rtp: InboundRtpCallback | None = None,
    sample_rate: int = 8000,
    codec: str | None = None,
    batch: bool | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> tuple[str, WhepSession]:
    """Answer a WHEP offer with a send-only audio stream of ``tap``'s conversation.

    Returns ``(answer_sdp, session)``; the answer already holds all candidates (no trickle).
    ``stereo`` sends agent left / customer right (else a mono mix). ``on_levels(agent_dbfs,
    customer_dbfs)`` runs ~10x/s on the media path; ``on_inbound_rtp(total)`` runs for each
    RTP packet the browser sends anyway (it should send none: the answer is ``sendonly``).

    ``codec`` (``opus``, ``pcmu``, ``pcma``; default ``settings.webrtc_codec``, and Opus when
    ``stereo``) is used when the offer has it, else the offer's first
    codec aiortc speaks. Opus and G.711 are encoded here once per frame and handed to aiortc
    as packets; G.711 is mono only (``stereo`` then degrades to the mix).

    ``batch`` (default ``settings.webrtc_batch``) sends the
    media from the process-wide :class:`~.batch.BatchSender` instead of aiortc's per-track
    sender loop: same packets, a fraction of the CPU per listener (see :mod:`.batch`).

    The session closes itself (``connect_timeout``) if the browser has not connected after
    ``connect_timeout`` seconds.

    Raises :class:`WhepError` (``code`` ``invalid_sdp`` / ``no_audio`` / ``no_common_codec``)
    for an offer that can not be answered (``invalid_sdp`` too for an audio payload type above
    127 or no ``a=fingerprint``); the tap is closed in that case.
    """
    try:
        parsed = SessionDescription.parse(offer_sdp)
    except Exception as exc:
        tap.close()
        raise WhepError("invalid_sdp", f"the offer is not valid SDP: {exc}") from exc
    if not any(m.kind == "audio" for m in parsed.media):
        tap.close()
        raise WhepError("no_audio", "the offer has no audio m-line")
    problem = _unacceptable_audio(parsed)
    if problem is not None:
        tap.close()
        raise WhepError("invalid_sdp", problem)
    offered = _offered_codecs(parsed)
    if not offered:
        tap.close()
        raise WhepError("no_common_codec", "the offer has no audio codec the gateway speaks (opus, PCMU, PCMA, G722)")
    # Stereo (agent left, customer right) needs Opus; mono defaults to the configured codec.
    preferred = "opus" if stereo and codec is None else (codec or settings.webrtc_codec or "opus").lower()
    chosen = preferred if preferred in offered else offered[0]

    addresses = split_csv(settings.ice_host_addresses)
    offer_sdp = filter_offer_candidates(offer_sdp, keep_loopback_only=loopback_only(addresses))

    # A G.711 answer also lists Opus when the offer has it, so the batched sender can move the
    # listener to Opus if the legs turn wideband later (HD voice; BatchTrack.upgrade_for).
    also = "opus" if chosen in ("pcmu", "pcma") and "opus" in offered and not stereo else None
    pc = RTCPeerConnection(rtc_configuration(settings))
    try:
        audio = await _take_offer(pc, offer_sdp, chosen, first_offered=offered[0], also=also)
    except Exception as exc:
        tap.close()
        await pc.close()
        if isinstance(exc, WhepError):
            raise
        raise WhepError("invalid_sdp", f"the offer could not be answered: {exc}") from exc

    def tap_ended() -> None:
        log.info("leg tap of whep session %s ended", session.id)

    use_batch = settings.webrtc_batch if batch is None else batch
    use_batch = use_batch and pre_encodable(chosen, sample_rate)  # the batched sender only sends packets
    if use_batch and not can_send_rtp_itself(audio.sender):
        log.warning("batched sending not supported by this aiortc; using the per-track sender")
        use_batch = False
    track: LegTapTrack | BatchTrack = (BatchTrack if use_batch else LegTapTrack)(
        tap, stereo=stereo, codec=chosen, sample_rate=sample_rate, on_levels=on_levels, on_tap_ended=tap_ended
    )
    # No await between the track and the session: tap_ended() can not run before this.
    session = WhepSession(pc, track, tap, stereo=stereo, on_inbound_rtp=on_inbound_rtp)
    audio.sender.replaceTrack(track)
    try:
        answer = await pc.createAnswer()
        with host_addresses(addresses):
            await pc.setLocalDescription(answer)
    except Exception as exc:
        await session.close("rejected")
        raise WhepError("invalid_sdp", f"the offer could not be answered: {exc}") from exc
    session._watch(connect_timeout)

    sdp = pc.localDescription.sdp
    if isinstance(track, BatchTrack):
        track.attach(audio.sender, sdp)
        BatchSender.instance().add(track)
    if track.stereo and chosen == "opus":
        sdp = _munge_stereo(sdp)
    log.info(
        "whep session %s answered (codec %s, %s, %s)",
        session.id,
        chosen,
        "stereo" if track.stereo else "mono",
        track.mode,
    )
    return sdp, session


async def _take_offer(
    pc: RTCPeerConnection, offer_sdp: str, codec: str, *, first_offered: str, also: str | None = None
) -> RTCRtpTransceiver:
    """Apply the offer; returns the transceiver that will send (the first audio m-line's),
    ``sendonly``, with every other m-line ``inactive``. The answer lists ``codec`` first and
    ``also`` second (when given), nothing else."""
    if codec != first_offered or also:
        # aiortc sends the offer's first common codec unless the transceiver that will
        # take the first audio m-line prefers another: create that transceiver up front.
        all_caps = RTCRtpSender.getCapabilities("audio").codecs
        caps = [c for name in (codec, also) if name for c in all_caps if c.mimeType.lower() == f"audio/{name}"]
        pc.addTransceiver("audio", direction="sendonly").setCodecPreferences(caps)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
    audio = None
    for t in pc.getTransceivers():
        if t.kind == "audio" and audio is None:
            audio = t
            t.direction = "sendonly"
        else:
            t.direction = "inactive"  # video or a second audio line: nothing flows
    if audio is None:  # pragma: no cover - guarded by the parse in answer_whep
        raise WhepError("no_audio", "the offer has no audio m-line")
    return audio
