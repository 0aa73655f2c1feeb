"""HD voice end to end: wideband (G.722, Opus) legs reach a wideband phone and a browser
wideband; G.711 legs never carry what is above 4 kHz.

Real peers: the pjsua2 SIPREC source (``devtools.siprec_source --codecs ...``) plays a 16 kHz
fixture per leg with a narrowband and a wideband tone (agent 600 + 6000 Hz, customer 1000 +
5000 Hz, ``fixtures/audio/make_fixtures.sh``), the pjsua2 phone (``devtools.sip_phone
--codecs ...``) records what the worker sends it, and an aiortc peer is the browser (WHEP
answer from :func:`gateway.media.whep.answer_whep` on the plane's own tap, batched sender).
Needs pjsua2 built with Opus (scripts/setup.sh) and sipp; a missing tool fails, never skips.
"""

from __future__ import annotations

import asyncio
import fractions
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from devtools.fake_taps import tone
from gateway.api.context import SIP
from gateway.config import Settings
from gateway.media.batch import BatchSender
from gateway.media.g711 import index_table
from gateway.media.ice import host_addresses
from gateway.media.whep import answer_whep
from gateway.sip.plane import SipPlane

from .sip_support import (
    AUDIO,
    FakeHooks,
    RawSip,
    collect,
    free_udp_block,
    read_wav,
    require_pjsua2,
    sdp,
    sip_gateway_settings,
    start_phone,
    start_siprec,
    started_plane,
    tone_levels,
    wait_until,
)
from .support import running_gateway

pytestmark = [pytest.mark.sip, pytest.mark.webrtc]

AGENT_WAV = AUDIO / "agent_600_6000.wav"
CUSTOMER_WAV = AUDIO / "customer_1000_5000.wav"
AGENT_LOW, AGENT_HIGH, CUSTOMER_LOW, CUSTOMER_HIGH = 600.0, 6000.0, 1000.0, 5000.0
TONES = [AGENT_LOW, AGENT_HIGH, CUSTOMER_LOW, CUSTOMER_HIGH]
HEARD, ABSENT = 0.1, 0.01  # tone_levels: relative to the strongest bin
WHEP_SETTINGS = Settings(ice_host_addresses="127.0.0.1", webrtc_codec="pcmu", webrtc_batch=True)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[SipPlane, FakeHooks]]:
    require_pjsua2()
    hooks = FakeHooks({"c-1": "alice", "c-2": "bob"})
    async with started_plane(
        tmp_path, hooks, calls_per_worker=8, rtp_port_base=free_udp_block(80, 30000, 39000)
    ) as plane:
        yield plane, hooks


async def _siprec(plane: SipPlane, hooks: FakeHooks, cid: str, agent: str, codecs: str) -> object:
    src = await start_siprec(
        plane.settings.sip_port, cid, agent, AGENT_WAV, CUSTOMER_WAV, 20.0, extra=["--codecs", codecs]
    )
    await src.wait_line("CONNECTED", 8)
    await hooks.wait_for("leg_started", cid, "agent")
    await hooks.wait_for("leg_started", cid, "customer")
    return src


async def _phone_hears(plane: SipPlane, cid: str, codecs: str, tmp_path: Path) -> tuple[str, dict[float, float], int]:
    """Call a pjsua2 phone offering ``codecs``; its codec, the tone levels of its last second, its rate."""
    port = free_udp_block(30, 40000, 59000)
    rec = tmp_path / f"phone-{cid}.wav"
    phone = await start_phone(port, rec, "--codecs", codecs)
    try:
        await plane.call_phone(cid, f"m-{cid}", f"sip:sup@127.0.0.1:{port}")
        await phone.wait_line("CONNECTED", 8)
        connected = next(text for _, text in phone.lines if text.startswith("CONNECTED"))
        await asyncio.sleep(2.5)
        await plane.hang_up_phone(f"m-{cid}")
        await phone.wait_line("DISCONNECTED", 5)
    finally:
        await phone.stop()
    heard, rate = read_wav(rec)
    assert len(heard) > rate * 1.5, f"recording too short: {len(heard)} samples at {rate} Hz"
    codec = connected.split("codec=", 1)[1].split()[0]
    return codec, tone_levels(heard[-rate:], rate, TONES), rate


async def _browser_hears(
    plane: SipPlane, cid: str, *, only: str | None = None, codec: str | None = None, listeners: int = 1
) -> tuple[list[str], list[dict[float, float]]]:
    """``listeners`` aiortc peers listen at once through the batched sender; each answer's
    codec and the tone levels of what each decoded. ``only``: the peer offers just that codec;
    ``codec``: what the gateway prefers (default: as the WHEP route decides, by the legs)."""
    want = codec or ("opus" if plane.wideband(cid) else None)
    clients: list[RTCPeerConnection] = []
    sessions = []
    tracks: list[asyncio.Future[MediaStreamTrack]] = []
    codecs: list[str] = []
    try:
        for _ in range(listeners):
            client = RTCPeerConnection()
            clients.append(client)
            transceiver = client.addTransceiver("audio", direction="recvonly")
            if only:
                caps = RTCRtpSender.getCapabilities("audio").codecs
                transceiver.setCodecPreferences([c for c in caps if c.mimeType.lower() == f"audio/{only}"])
            got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
            tracks.append(got)
            client.on("track", lambda track, got=got: got.done() or got.set_result(track))
            offer = await client.createOffer()
            with host_addresses(["127.0.0.1"]):
                await client.setLocalDescription(offer)
            answer, session = await answer_whep(
                client.localDescription.sdp, plane.open_tap(cid), settings=WHEP_SETTINGS, stereo=False, codec=want
            )
            sessions.append(session)
            codecs.append(session.track.codec or "")
            await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        remote = [await asyncio.wait_for(t, 5) for t in tracks]
        received = await asyncio.gather(*(_decode(track, 1.5) for track in remote))
    finally:
        for session in sessions:
            await session.close("deleted")
        for client in clients:
            await client.close()
    levels = []
    for chunks in received:
        rate = chunks[0][1]
        audio = np.concatenate([c for c, _ in chunks])
        levels.append(tone_levels(audio[-rate:], rate, TONES))
    return codecs, levels


async def _decode(track: MediaStreamTrack, seconds: float) -> list[tuple[np.ndarray, int]]:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    out = []
    while loop.time() < end:
        frame = await asyncio.wait_for(track.recv(), 5)
        channels = len(frame.layout.channels)
        pcm = frame.to_ndarray().reshape(-1, channels).mean(axis=1)
        out.append((pcm, frame.sample_rate))
    return out


def _tap_levels(frames: list) -> tuple[dict[float, float], dict[float, float], set[tuple[int, int]]]:
    assert len(frames) >= 20, f"only {len(frames)} tap frames"
    rate = frames[-1].sample_rate
    a = np.concatenate([f.agent for f in frames]).astype(float)
    c = np.concatenate([f.customer for f in frames]).astype(float)
    shapes = {(f.sample_rate, f.samples) for f in frames}
    return tone_levels(a, rate, TONES), tone_levels(c, rate, TONES), shapes


def _heard(levels: dict[float, float], *tones: float) -> bool:
    return all(levels[t] > HEARD for t in tones)


def _absent(levels: dict[float, float], *tones: float) -> bool:
    return all(levels[t] < ABSENT for t in tones)


@pytest.mark.parametrize("codec", ["G722", "opus"])
async def test_wideband_legs_reach_phone_and_browser_wideband(
    gw: tuple[SipPlane, FakeHooks], tmp_path: Path, codec: str
) -> None:
    plane, hooks = gw
    tap = plane.open_tap("c-1", maxsize=200)
    src = await _siprec(plane, hooks, "c-1", "alice", codec)
    try:
        assert plane.leg_codecs("c-1") == {"agent": codec.lower(), "customer": codec.lower()}
        assert plane.wideband("c-1")

        # The tap (to the WebRTC plane) carries each leg at 16 kHz, its own tones only.
        frames = await collect(tap, 1.0)
        agent, customer, shapes = _tap_levels(frames[10:])
        assert shapes == {(16000, 320)}, shapes
        assert _heard(agent, AGENT_LOW, AGENT_HIGH) and _absent(agent, CUSTOMER_LOW, CUSTOMER_HIGH), agent
        assert _heard(customer, CUSTOMER_LOW, CUSTOMER_HIGH) and _absent(customer, AGENT_LOW, AGENT_HIGH), customer

        # A wideband phone gets the codec it shares with the gateway and hears all four tones.
        got, phone, rate = await _phone_hears(plane, "c-1", f"{codec},PCMU", tmp_path)
        assert got.lower() == codec.lower() and rate == 16000
        assert _heard(phone, *TONES), phone

        # Two browsers at once: Opus, wideband, one encode per frame for both.
        sender = BatchSender.instance()
        sends, encodes = sender.shared_sends, sender.shared_encodes
        codecs, browsers = await _browser_hears(plane, "c-1", listeners=2)
        assert codecs == ["opus", "opus"]
        for heard in browsers:
            assert _heard(heard, *TONES), heard
        sent, encoded = sender.shared_sends - sends, sender.shared_encodes - encodes
        # 0.5 when both listeners always take the same frame; one encoder per listener would be 1
        # (a listener that lags a frame behind under load costs an encode of its own)
        assert sent > 100 and encoded <= 0.75 * sent, f"{encoded} Opus encodes for {sent} packets"

        # A browser that offers only PCMU still hears both legs, narrowband (decimated, no alias).
        codecs, (narrow,) = await _browser_hears(plane, "c-1", only="pcmu")
        assert codecs == ["pcmu"]
        assert _heard(narrow, AGENT_LOW, CUSTOMER_LOW) and _absent(narrow, AGENT_HIGH, CUSTOMER_HIGH), narrow
    finally:
        await src.stop()
        tap.close()


async def test_browser_that_joined_before_the_legs_moves_to_opus_when_they_are_wideband(
    gw: tuple[SipPlane, FakeHooks],
) -> None:
    """Fork on demand: the browser's offer comes before any leg. It is answered with the
    configured PCMU, Opus listed second; when G.722 legs arrive the batched sender moves it to
    Opus (payload type switch, no new offer) and it hears the tones above 4 kHz."""
    plane, hooks = gw
    assert plane.leg_codecs("c-1") == {} and not plane.wideband("c-1")
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")  # offers opus, PCMU, PCMA
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    client.on("track", lambda track: got.done() or got.set_result(track))
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(await client.createOffer())
    answer, session = await answer_whep(
        client.localDescription.sdp, plane.open_tap("c-1"), settings=WHEP_SETTINGS, stereo=False
    )
    src = None
    try:
        rtpmaps = [ln.split()[1].lower() for ln in answer.splitlines() if ln.startswith("a=rtpmap:")]
        assert rtpmaps[0] == "pcmu/8000" and "opus/48000/2" in rtpmaps, rtpmaps
        await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        track = await asyncio.wait_for(got, 5)
        before = await _decode(track, 0.5)  # silence on PCMU while no leg is there
        assert {rate for _, rate in before} == {8000}
        src = await _siprec(plane, hooks, "c-1", "alice", "G722")
        chunks = await _decode(track, 2.5)
    finally:
        await session.close("deleted")
        await client.close()
        if src is not None:
            await src.stop()
    assert session.track.upgraded and session.track.codec == "opus"
    assert chunks[-1][1] == 48000  # aiortc decodes the Opus packets now
    tail = [c for c, rate in chunks if rate == 48000]
    heard = tone_levels(np.concatenate(tail)[-48000:], 48000, TONES)
    assert _heard(heard, *TONES), heard


async def test_g711_legs_never_carry_wideband(gw: tuple[SipPlane, FakeHooks], tmp_path: Path) -> None:
    plane, hooks = gw
    tap = plane.open_tap("c-2", maxsize=200)
    # The same 16 kHz recordings, offered as PCMU: only what is below 4 kHz can cross.
    src = await _siprec(plane, hooks, "c-2", "bob", "PCMU")
    try:
        assert plane.leg_codecs("c-2") == {"agent": "pcmu", "customer": "pcmu"}
        assert not plane.wideband("c-2")
        frames = await collect(tap, 1.0)
        agent, customer, shapes = _tap_levels(frames[10:])
        assert shapes == {(8000, 160)}, shapes
        assert _heard(agent, AGENT_LOW) and _heard(customer, CUSTOMER_LOW)

        # A wideband phone: G.722 on its hop, and still no tone above 4 kHz.
        got, phone, rate = await _phone_hears(plane, "c-2", "G722,PCMU", tmp_path)
        assert got.lower() == "g722" and rate == 16000
        assert _heard(phone, AGENT_LOW, CUSTOMER_LOW), phone
        assert _absent(phone, AGENT_HIGH, CUSTOMER_HIGH), phone

        # The browser gets the configured codec (PCMU); even Opus, forced, has nothing to carry.
        codecs, (pcmu,) = await _browser_hears(plane, "c-2")
        assert codecs == ["pcmu"]
        codecs, (opus,) = await _browser_hears(plane, "c-2", codec="opus")
        assert codecs == ["opus"]
        for heard in (pcmu, opus):
            assert _heard(heard, AGENT_LOW, CUSTOMER_LOW) and _absent(heard, AGENT_HIGH, CUSTOMER_HIGH), heard
    finally:
        await src.stop()
        tap.close()


class RtpSender:
    """The platform's side of a per-leg call by hand: 20 ms RTP packets of a tone mix, encoded
    by FFmpeg (PyAV): G.722 (payload type 9, 16 kHz audio on RFC 3551's 8 kHz RTP clock) or PCMU."""

    def __init__(self, codec: str, tones: list[float]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.codec, self.tones = codec, tones
        self.rate = 16000 if codec == "g722" else 8000
        self.pt = 9 if codec == "g722" else 0
        self.task: asyncio.Task[None] | None = None
        if codec == "g722":
            ctx = av.CodecContext.create("g722", "w")
            assert isinstance(ctx, av.AudioCodecContext)
            ctx.sample_rate, ctx.layout, ctx.format = 16000, "mono", "s16"
            ctx.time_base = fractions.Fraction(1, 16000)
            ctx.open()
            self._g722 = ctx

    def _payload(self, index: int) -> bytes:
        n = self.rate // 50
        pcm = sum(tone(f, n, self.rate, index * n, amplitude=3000).astype(np.int32) for f in self.tones)
        samples = np.asarray(pcm, dtype=np.int16)
        if self.codec == "pcmu":
            return bytes(index_table("pcmu")[samples.view(np.uint16)].tobytes())
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, index * n
        return b"".join(bytes(p) for p in self._g722.encode(frame))

    def start(self, to_port: int) -> None:
        async def run() -> None:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for i in range(10**6):
                header = struct.pack("!BBHII", 0x80, self.pt, i & 0xFFFF, (i * 160) & 0xFFFFFFFF, 0x1234 + self.pt)
                self.sock.sendto(header + self._payload(i), ("127.0.0.1", to_port))
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - loop.time()))

        self.task = asyncio.create_task(run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.sock.close()


async def test_per_leg_g722_agent_and_pcmu_customer(gw: tuple[SipPlane, FakeHooks], tmp_path: Path) -> None:
    """Mixed bandwidths: each leg keeps its own. A wideband phone hears the G.722 agent's 6 kHz
    tone and the PCMU customer; the tap and the browser are narrowband (not every leg is wideband)."""
    plane, hooks = gw
    port = plane.settings.sip_port
    sip = RawSip()
    agent, customer = RtpSender("g722", [AGENT_LOW, AGENT_HIGH]), RtpSender("pcmu", [CUSTOMER_LOW])
    tap = plane.open_tap("c-1", maxsize=200)
    try:
        # G.722 by its static payload type 9, offered first: the worker answers G.722.
        data, _, _ = sip.invite(
            port, body=sdp("9 0", port=agent.port), headers={"X-Conversation-ID": "c-1", "X-Leg": "agent"}
        )
        code, answer = await sip.request(data, port)
        assert code == 200, answer
        media = next(ln for ln in answer.split("\r\n") if ln.startswith("m=audio"))
        assert media.split()[3:] == ["9"], answer
        agent.start(int(media.split()[1]))
        await hooks.wait_for("leg_started", "c-1", "agent")
        assert plane.wideband("c-1")
        # A PCMU customer leg joins: the conversation is no longer wideband end to end.
        data, _, _ = sip.invite(
            port, body=sdp("0", port=customer.port), headers={"X-Conversation-ID": "c-1", "X-Leg": "customer"}
        )
        code, answer = await sip.request(data, port)
        assert code == 200, answer
        media = next(ln for ln in answer.split("\r\n") if ln.startswith("m=audio"))
        customer.start(int(media.split()[1]))
        await hooks.wait_for("leg_started", "c-1", "customer")
        assert plane.leg_codecs("c-1") == {"agent": "g722", "customer": "pcmu"}
        assert not plane.wideband("c-1")

        await asyncio.sleep(0.5)
        tap_agent, tap_customer, shapes = _tap_levels((await collect(tap, 1.0))[10:])
        assert shapes == {(8000, 160)}, shapes  # the tap follows the narrowest leg
        assert _heard(tap_agent, AGENT_LOW) and _heard(tap_customer, CUSTOMER_LOW)

        got, phone, rate = await _phone_hears(plane, "c-1", "G722,PCMU", tmp_path)
        assert got.lower() == "g722" and rate == 16000
        assert _heard(phone, AGENT_LOW, AGENT_HIGH, CUSTOMER_LOW), phone  # the agent stays wideband
        assert _absent(phone, CUSTOMER_HIGH), phone

        codecs, (browser,) = await _browser_hears(plane, "c-1")
        assert codecs == ["pcmu"]
        assert _heard(browser, AGENT_LOW, CUSTOMER_LOW) and _absent(browser, AGENT_HIGH), browser

        # A leg offering none of PCMU, PCMA, G722, opus is refused by the front.
        data, _, _ = sip.invite(port, body=sdp("18"), headers={"X-Conversation-ID": "c-2", "X-Leg": "agent"})
        code, answer = await sip.request(data, port)
        assert code == 488, answer
    finally:
        agent.stop()
        customer.stop()
        tap.close()
        sip.close()


async def test_whep_through_the_api_answers_opus_for_wideband_legs(tmp_path: Path) -> None:
    """The real path: SIPREC G.722 legs → worker → media process → a browser that posted its
    offer to ``/v1/monitors/{mid}/whep``; the route asks for Opus because every leg is wideband."""
    require_pjsua2()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, webrtc_processes=1, ice_host_addresses="127.0.0.1")
    async with running_gateway(settings) as gw:
        assert (await gw.conversation("conv-hd")).status in (200, 201)
        src = await start_siprec(
            sip_port, "conv-hd", "alice", AGENT_WAV, CUSTOMER_WAV, 20.0, extra=["--codecs", "G722"]
        )
        client = RTCPeerConnection()
        try:
            await src.wait_line("CONNECTED", 8)
            await wait_until(lambda: gw.app[SIP].wideband("conv-hd"), 10, "both legs up, wideband")
            monitor = await gw.monitor("sam", "conv-hd", {"kind": "webrtc"})
            assert monitor.status == 201, monitor.body
            client.addTransceiver("audio", direction="recvonly")  # offers opus, PCMU, PCMA
            got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
            client.on("track", lambda track: got.done() or got.set_result(track))
            with host_addresses(["127.0.0.1"]):
                await client.setLocalDescription(await client.createOffer())
            answer = await gw.call(
                "POST",
                f"/v1/monitors/{monitor.body['id']}/whep",
                await gw.login("sam"),
                data=client.localDescription.sdp,
                headers={"Content-Type": "application/sdp"},
            )
            assert answer.status == 201, answer.body
            sent = [ln for ln in answer.body.splitlines() if ln.startswith("a=rtpmap:")]
            assert sent and "opus/48000" in sent[0].lower(), sent  # the payload type the gateway sends
            await client.setRemoteDescription(RTCSessionDescription(sdp=answer.body, type="answer"))
            chunks = await _decode(await asyncio.wait_for(got, 10), 2.0)
        finally:
            await client.close()
            await src.stop()
    rate = chunks[0][1]
    heard = tone_levels(np.concatenate([c for c, _ in chunks])[-rate:], rate, TONES)
    assert _heard(heard, *TONES), heard
