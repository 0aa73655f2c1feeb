"""WHEP listener against a real aiortc receiver, two peers in one process, on loopback.

Distinct tones per leg (600 Hz agent, 1000 Hz customer) and negative assertions: the
monitor hears both legs; the answer is send-only; nothing the monitor sends reaches the legs.
"""

from __future__ import annotations

import asyncio
import fractions
import math

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from devtools.fake_taps import ToneTap
from gateway.config import Settings
from gateway.media.frames import LegFrame
from gateway.media.ice import host_addresses
from gateway.media.whep import WhepError, WhepSession, answer_whep

pytestmark = pytest.mark.webrtc

SETTINGS = Settings(
    ice_host_addresses="127.0.0.1", webrtc_codec="opus", webrtc_batch=False
)  # each test picks codec and sender itself
LISTEN_SECONDS = 1.2


class StrictTap:
    """A ToneTap that records every attribute the gateway touches on it.

    The LegTap contract is ``next_frame()`` and ``close()``; anything else (e.g. a way to
    push audio back toward the legs) would show up in ``touched``.
    """

    def __init__(self, inner: ToneTap) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "touched", set())
        object.__setattr__(self, "frames_taken", 0)

    def __getattr__(self, name: str):  # only called for names not found normally
        if name == "next_frame_nowait":  # the optional fast path of the contract: not offered
            raise AttributeError(name)
        self.touched.add(name)
        return getattr(self._inner, name)

    async def next_frame(self) -> LegFrame:
        frame = await self._inner.next_frame()
        object.__setattr__(self, "frames_taken", self.frames_taken + 1)
        return frame

    def close(self) -> None:
        self._inner.close()


class ToneTrack(MediaStreamTrack):
    """What a misbehaving supervisor would send: a 1500 Hz tone."""

    kind = "audio"

    def __init__(self, hz: float = 1500.0) -> None:
        super().__init__()
        self.hz = hz
        self.n = 0
        self.t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self.t0 is None:
            self.t0 = loop.time()
        due = self.t0 + self.n * 0.02
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        t = (np.arange(960) + self.n * 960) / 48000
        pcm = (8000 * np.sin(2 * math.pi * self.hz * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.n * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self.n += 1
        return frame


async def _collect(track: MediaStreamTrack, seconds: float, out: list[np.ndarray]) -> None:
    """Decode frames from the receiver's remote track; keeps (channels, samples) arrays."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        frame = await asyncio.wait_for(track.recv(), timeout=5)
        pcm = frame.to_ndarray()  # packed s16: (1, samples * channels)
        channels = len(frame.layout.channels)
        out.append(pcm.reshape(-1, channels).T.astype(np.float64))


def _peak_power(signal: np.ndarray, rate: int, hz: float) -> float:
    """Power near ``hz`` relative to the total (0..1)."""
    windowed = signal * np.hanning(signal.shape[0])
    spectrum = np.abs(np.fft.rfft(windowed)) ** 2
    freqs = np.fft.rfftfreq(signal.shape[0], 1 / rate)
    band = (freqs > hz - 30) & (freqs < hz + 30)
    total = spectrum.sum()
    return float(spectrum[band].sum() / total) if total else 0.0


async def _listen(
    *,
    stereo: bool,
    direction: str = "recvonly",
    force_answer_sendrecv: bool = False,
    tap: StrictTap | None = None,
    codec: str | None = None,
    batch: bool = False,
) -> tuple[str, WhepSession, np.ndarray, RTCPeerConnection, StrictTap]:
    tap = tap or StrictTap(ToneTap("c-1"))
    client = RTCPeerConnection()  # default config is fine: gathering is pinned to loopback below
    if direction == "sendrecv":
        client.addTransceiver(ToneTrack(1500.0), direction="sendrecv")
    else:
        client.addTransceiver("audio", direction="recvonly")
    received: list[np.ndarray] = []
    got_track: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @client.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if not got_track.done():
            got_track.set_result(track)

    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer_sdp, session = await answer_whep(
        client.localDescription.sdp,
        tap,
        settings=SETTINGS,
        stereo=stereo,
        on_levels=None,
        on_inbound_rtp=None,
        codec=codec,
        batch=batch,
    )
    client_answer = answer_sdp.replace("a=sendonly", "a=sendrecv") if force_answer_sendrecv else answer_sdp
    await client.setRemoteDescription(RTCSessionDescription(sdp=client_answer, type="answer"))
    track = await asyncio.wait_for(got_track, timeout=5)
    await _collect(track, LISTEN_SECONDS, received)
    audio = np.concatenate(received, axis=1)
    return answer_sdp, session, audio, client, tap


def _media_direction(sdp: str) -> str:
    for line in sdp.splitlines():
        if line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive"):
            return line[2:]
    return "sendrecv"


async def test_mono_mix_carries_both_legs() -> None:
    answer, session, audio, client, tap = await _listen(stereo=False)
    try:
        assert _media_direction(answer) == "sendonly"
        assert session.state == "connected"
        assert session.track.mode == "packet"  # pre-encoded Opus, no aiortc re-encode
        mix = audio[0][4800:]  # skip the first 100 ms (codec warm-up)
        assert _peak_power(mix, 48000, 600) > 0.2
        assert _peak_power(mix, 48000, 1000) > 0.2
        assert _peak_power(mix, 48000, 1500) < 0.01
        assert np.allclose(audio[0], audio[1])  # mono decodes to identical channels
        assert tap.frames_taken > 30
    finally:
        await session.close()
        await client.close()
    assert session.closed and tap._inner.closed


async def test_stereo_puts_agent_left_customer_right() -> None:
    answer, session, audio, client, _ = await _listen(stereo=True)
    try:
        assert "stereo=1" in answer and "sprop-stereo=1" in answer
        left, right = audio[0][4800:], audio[1][4800:]
        assert _peak_power(left, 48000, 600) > 0.5
        assert _peak_power(left, 48000, 1000) < 0.05
        assert _peak_power(right, 48000, 1000) > 0.5
        assert _peak_power(right, 48000, 600) < 0.05
    finally:
        await session.close()
        await client.close()


async def test_pcmu_preferred_is_negotiated_and_pre_encoded() -> None:
    answer, session, audio, client, _ = await _listen(stereo=False, codec="pcmu")
    try:
        m_line = next(ln for ln in answer.splitlines() if ln.startswith("m=audio"))
        assert m_line.split()[3] == "0"  # PCMU first although the offer listed Opus first
        assert session.track.mode == "packet" and session.track.codec == "pcmu"
        mix = audio[0][800:]  # aiortc decodes G.711 at 8 kHz
        assert _peak_power(mix, 8000, 600) > 0.2
        assert _peak_power(mix, 8000, 1000) > 0.2
    finally:
        await session.close()
        await client.close()


@pytest.mark.parametrize("stereo,codec", [(False, "opus"), (True, "opus"), (False, "pcmu")])
async def test_batched_sender_carries_the_same_audio(stereo: bool, codec: str) -> None:
    answer, session, audio, client, tap = await _listen(stereo=stereo, codec=codec, batch=True)
    try:
        assert session.track.mode == "batch"
        assert _media_direction(answer) == "sendonly"
        rate, skip = (48000, 4800) if codec == "opus" else (8000, 800)
        if stereo:
            left, right = audio[0][skip:], audio[1][skip:]
            assert _peak_power(left, rate, 600) > 0.5 and _peak_power(left, rate, 1000) < 0.05
            assert _peak_power(right, rate, 1000) > 0.5 and _peak_power(right, rate, 600) < 0.05
        else:
            mix = audio[0][skip:]
            assert _peak_power(mix, rate, 600) > 0.2 and _peak_power(mix, rate, 1000) > 0.2
        assert session.stats.frames_out > 30
        assert tap.touched == set()
    finally:
        await session.close()
        await client.close()
    assert session.track.readyState == "ended"


async def test_sendrecv_offer_gets_sendonly_answer_and_nothing_flows_back() -> None:
    answer, session, audio, client, tap = await _listen(stereo=False, direction="sendrecv")
    try:
        assert _media_direction(answer) == "sendonly"
        # A well-behaved peer honours the answer and sends nothing.
        assert client.getTransceivers()[0].currentDirection == "recvonly"
        await asyncio.sleep(0.2)
        assert session.inbound_rtp_packets == 0
        assert tap.touched == set()
        mix = audio[0][4800:]
        assert _peak_power(mix, 48000, 600) > 0.2 and _peak_power(mix, 48000, 1500) < 0.01
    finally:
        await session.close()
        await client.close()


async def test_audio_a_misbehaving_peer_sends_is_counted_and_dropped() -> None:
    counted: list[int] = []
    tap = StrictTap(ToneTap("c-2"))
    # The client pretends the answer was sendrecv and pushes a 1500 Hz tone at the gateway.
    client = RTCPeerConnection()
    client.addTransceiver(ToneTrack(1500.0), direction="sendrecv")
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    client.on("track", lambda t: got.done() or got.set_result(t))
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer, session = await answer_whep(
        client.localDescription.sdp, tap, settings=SETTINGS, stereo=False, on_levels=None, on_inbound_rtp=counted.append
    )
    try:
        assert _media_direction(answer) == "sendonly"
        await client.setRemoteDescription(
            RTCSessionDescription(sdp=answer.replace("a=sendonly", "a=sendrecv"), type="answer")
        )
        received: list[np.ndarray] = []
        await _collect(await asyncio.wait_for(got, 5), LISTEN_SECONDS, received)
        assert session.inbound_rtp_packets > 10  # the browser's RTP arrived ...
        assert counted and counted[-1] == session.inbound_rtp_packets
        # ... and went nowhere: no receiver track was started or read on the gateway side,
        # the legs' tap was only ever read, and the monitor hears only the legs.
        gw_transceiver = session.pc.getTransceivers()[0]
        assert gw_transceiver.currentDirection == "sendonly"
        assert tap.touched == set()
        mix = np.concatenate(received, axis=1)[0][4800:]
        assert _peak_power(mix, 48000, 1500) < 0.01
        assert _peak_power(mix, 48000, 600) > 0.2
    finally:
        await session.close()
        await client.close()


async def test_levels_reported_ten_times_a_second() -> None:
    levels: list[tuple[float, float]] = []
    tap = ToneTap("c-3", agent_hz=600, customer_hz=0)
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer, session = await answer_whep(
        client.localDescription.sdp,
        tap,
        settings=SETTINGS,
        stereo=False,
        on_levels=lambda a, c: levels.append((a, c)),
        on_inbound_rtp=None,
    )
    try:
        await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await asyncio.sleep(1.0)
        assert 6 <= len(levels) <= 12
        agent, customer = levels[-1]
        # 8000-amplitude sine: 20*log10(8000/32768/sqrt(2)) = -15.2 dBFS
        assert -16.5 < agent < -14.0
        assert customer == -96.0
    finally:
        await session.close()
        await client.close()


async def test_answer_has_loopback_candidate_and_no_public_stun() -> None:
    tap = ToneTap("c-4")
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer, session = await answer_whep(client.localDescription.sdp, tap, settings=SETTINGS, stereo=False)
    try:
        cands = [ln for ln in answer.splitlines() if ln.startswith("a=candidate:")]
        assert cands and all(" 127.0.0.1 " in c for c in cands)
        assert "srflx" not in answer
        gatherer = session.pc.getTransceivers()[0].sender.transport.transport.iceGatherer
        assert gatherer._connection.stun_server is None  # RTCConfiguration(iceServers=[])
    finally:
        await session.close()
        await client.close()


async def test_rejects_offer_without_audio() -> None:
    tap = ToneTap("c-5")
    client = RTCPeerConnection()
    client.addTransceiver("video", direction="recvonly")
    offer = await client.createOffer()
    with pytest.raises(WhepError) as err:
        await answer_whep(offer.sdp, tap, settings=SETTINGS, stereo=False)
    assert err.value.code == "no_audio"
    assert tap.closed
    await client.close()
    with pytest.raises(WhepError) as err:
        await answer_whep("not sdp", ToneTap("c-6"), settings=SETTINGS, stereo=False)
    assert err.value.code in {"invalid_sdp", "no_audio"}


@pytest.mark.parametrize("hostile", ["payload_type_above_127", "no_fingerprint"])
async def test_rejects_offer_with_bad_payload_type_or_without_fingerprint(hostile: str) -> None:
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = (await client.createOffer()).sdp
    await client.close()
    if hostile == "payload_type_above_127":
        pt = next(ln.split(":", 1)[1].split()[0] for ln in offer.splitlines() if ln.startswith("a=rtpmap:"))
        lines = [
            " ".join("200" if i >= 3 and token == pt else token for i, token in enumerate(ln.split(" ")))
            if ln.startswith("m=audio")
            else ln.replace(f":{pt} ", ":200 ", 1)
            for ln in offer.split("\r\n")
        ]
        offer = "\r\n".join(lines)
        assert "a=rtpmap:200 " in offer and any(ln.startswith("m=audio") and " 200" in ln for ln in lines)
    else:
        offer = "\r\n".join(ln for ln in offer.split("\r\n") if not ln.startswith("a=fingerprint:"))
        assert "a=fingerprint" not in offer
    tap = ToneTap("c-7")
    with pytest.raises(WhepError) as err:
        await answer_whep(offer, tap, settings=SETTINGS, stereo=False)
    assert err.value.code == "invalid_sdp", err.value.message
    assert ("127" if hostile == "payload_type_above_127" else "fingerprint") in err.value.message
    assert tap.closed  # nothing held


async def test_unconnected_session_times_out_and_runs_close_callbacks() -> None:
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    tap = ToneTap("c-7")
    reasons: list[str] = []
    _, session = await answer_whep(
        client.localDescription.sdp, tap, settings=SETTINGS, stereo=False, connect_timeout=0.3
    )
    session.on_closed(reasons.append)
    # The browser never applies the answer: no ICE, so the session times out and cleans up.
    for _ in range(40):
        if session.closed:
            break
        await asyncio.sleep(0.05)
    assert session.closed and reasons == ["connect_timeout"] and tap.closed
    await client.close()


async def test_close_ends_a_connected_session_once() -> None:
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer, session = await answer_whep(client.localDescription.sdp, ToneTap("c-8"), settings=SETTINGS, stereo=False)
    reasons: list[str] = []
    session.on_closed(reasons.append)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    for _ in range(100):
        if session.state == "connected":
            break
        await asyncio.sleep(0.05)
    assert session.state == "connected"
    await session.close("deleted")
    assert session.closed and session.close_reason == "deleted"
    await session.close("replaced")  # idempotent: the first reason stays, callbacks ran once
    assert session.close_reason == "deleted" and reasons == ["deleted"]
    await client.close()


async def test_batch_falls_back_to_the_track_when_aiortc_lacks_the_internals(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.media.whep as whep

    monkeypatch.setattr(whep, "can_send_rtp_itself", lambda sender: False)
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    _, session = await answer_whep(
        client.localDescription.sdp, ToneTap("c-9"), settings=SETTINGS, stereo=False, codec="pcmu", batch=True
    )
    try:
        assert session.track.mode == "packet" and session.track.codec == "pcmu"
        assert session.pc.getTransceivers()[0].sender.track is session.track
    finally:
        await session.close()
        await client.close()
