"""Quality the supervisor can see (issue 12), measured on real workers and real RTP.

* Loss and jitter per leg: the test sends each leg's RTP itself, the agent's with every tenth
  sequence number skipped, the customer's complete but with its send times jittered; the
  worker's report must show ~10 % loss on the agent leg only, and the larger jitter on the
  customer leg.
* Added latency, phone path: the legs switch a tone on and off (onsets at known send times)
  and a hand-made SIP phone (a raw UAS: no jitter buffer of its own) time-stamps the RTP it
  receives; the latency the gateway reports must be within a tolerance of the one the phone
  measured, first with steady legs and then with bursty legs (which grow the jitter buffer),
  so a made-up figure (a constant) can not pass both.

Needs the project's pjsua2 (scripts/setup.sh).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import socket
import statistics
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from gateway.config import Settings
from gateway.media.aiortc_compat import divert_inbound_rtp
from gateway.media.g711 import table
from gateway.media.ice import host_addresses
from gateway.media.pool import MediaProcesses
from gateway.quality import QualityBoard
from gateway.sip.plane import SipPlane

from .sip_support import (
    FakeHooks,
    RawSip,
    free_udp_block,
    raw_leg_call,
    require_pjsua2,
    sip_gateway_settings,
    wait_until,
)
from .support import GatewayClient, running_gateway

pytestmark = [pytest.mark.sip, pytest.mark.api, pytest.mark.webrtc]

RATE = 8000
SAMPLES = 160
ULAW_SILENCE = b"\xff" * SAMPLES
#: Kernel receive time stamps (struct timespec, CLOCK_REALTIME); Python names it only on some builds.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def ulaw_tone(hz: float, n: int, phase: int = 0) -> bytes:
    """G.711 u-law of a sine at -6 dBFS."""
    pcm = (16000 * np.sin(2 * np.pi * hz * (np.arange(n) + phase) / RATE)).astype(np.int16)
    return bytes(table("pcmu")[pcm.astype(np.int32) + 32768])


def ulaw_level(payload: bytes) -> float:
    """Mean absolute sample of a u-law payload (0 for digital silence, ~10000 for the tone)."""
    return float(np.abs(_ULAW_DECODE[np.frombuffer(payload, dtype=np.uint8)]).mean())


def _ulaw_decode_table() -> np.ndarray:
    out = np.zeros(256, dtype=np.int32)
    for code in range(256):
        u = ~code & 0xFF
        sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
        magnitude = ((mantissa << 3) + 0x84) << exponent
        out[code] = -(magnitude - 0x84) if sign else magnitude - 0x84
    return out


_ULAW_DECODE = _ulaw_decode_table()


def rtp(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 0) -> bytes:
    return struct.pack("!BBHII", 0x80, pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


class LegSender:
    """One leg's RTP, sent by the test on a 20 ms schedule: ``skip(seq)`` leaves packets out
    (loss), ``delay(i)`` postpones packet ``i`` (jitter, bursts) without reordering,
    ``payload(i)`` is what packet ``i`` carries. Records when each packet really left."""

    def __init__(self, port: int, hz: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.to = ("127.0.0.1", port)
        self.hz = hz
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(15)
        self.i = 0
        self.skip: Callable[[int], bool] = lambda i: False
        self.delay: Callable[[int], float] = lambda i: 0.0
        self.tone: Callable[[int], bool] = lambda i: True
        self.sent_at: dict[int, float] = {}

    def payload(self, i: int) -> bytes:
        return ulaw_tone(self.hz, SAMPLES, i * SAMPLES) if self.tone(i) else ULAW_SILENCE

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        t0 = last = loop.time()
        for k in range(int(seconds * 50)):
            i = self.i
            due = max(t0 + k * 0.02 + self.delay(i), last)
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            last = due
            if not self.skip(i):
                self.sock.sendto(rtp(self.seq + i, i * SAMPLES, self.ssrc, self.payload(i)), self.to)
                self.sent_at[i] = time.monotonic()
            self.i += 1

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[SipPlane, FakeHooks]]:
    require_pjsua2()
    hooks = FakeHooks({"c-q": "alice"})
    settings = Settings(
        sip_port=free_udp_block(2),
        sip_workers=1,
        rtp_port_base=free_udp_block(40, 22000, 30000),
        data_dir=str(tmp_path),
        sip_media_timeout=0,
        sip_invite_rate=0,
    )
    p = SipPlane(settings, hooks)
    await p.start()
    try:
        yield p, hooks
    finally:
        await p.stop()


async def legs_of(plane: SipPlane, hooks: FakeHooks, sip: RawSip, cid: str) -> tuple[LegSender, LegSender]:
    agent = await raw_leg_call(sip, plane.settings.sip_port, cid, "agent")
    customer = await raw_leg_call(sip, plane.settings.sip_port, cid, "customer")
    await hooks.wait_for("leg_started", cid, "agent")
    await hooks.wait_for("leg_started", cid, "customer")
    return LegSender(agent.media_port, 600.0), LegSender(customer.media_port, 1000.0)


async def reports(plane: SipPlane, cid: str, seconds: float) -> list[dict[str, object]]:
    """Every fresh per-second leg report of ``cid`` during ``seconds``."""
    out: list[dict[str, object]] = []
    seen = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        q = plane.leg_quality(cid)
        if q is not None and q.at != seen:
            seen = q.at
            out.append({"at": q.at, "legs": q.legs, "phone": q.phone})
        await asyncio.sleep(0.05)
    return out


async def test_loss_and_jitter_are_measured_per_leg(plane: tuple[SipPlane, FakeHooks]) -> None:
    p, hooks = plane
    sip = RawSip()
    tap = p.open_tap("c-q", maxsize=500)  # someone hears the conversation: its legs are measured
    agent, customer = await legs_of(p, hooks, sip, "c-q")
    try:
        agent.skip = lambda i: i % 10 == 9  # 10 % of the sequence numbers never sent
        jitter = random.Random(7)
        customer.delay = lambda i: jitter.uniform(0, 0.03)  # up to 30 ms late, in order
        senders = [asyncio.create_task(s.run(7)) for s in (agent, customer)]
        await asyncio.sleep(2)  # baseline and settling
        got = await reports(p, "c-q", 4.5)
        await asyncio.gather(*senders)
    finally:
        tap.close()
        agent.close()
        customer.close()
        sip.close()
    assert len(got) >= 3, got
    legs = [r["legs"] for r in got]
    a_lost = sum(r["agent"].lost for r in legs)  # type: ignore[index]
    a_pkts = sum(r["agent"].packets for r in legs)  # type: ignore[index]
    c_lost = sum(r["customer"].lost for r in legs)  # type: ignore[index]
    c_pkts = sum(r["customer"].packets for r in legs)  # type: ignore[index]
    assert 40 <= a_pkts / len(legs) <= 50 and 40 <= c_pkts / len(legs) <= 55, (a_pkts, c_pkts, len(legs))
    assert 7.0 <= 100 * a_lost / (a_pkts + a_lost) <= 13.0, (a_lost, a_pkts)
    assert c_lost <= 1, c_lost
    a_jitter = statistics.median(r["agent"].jitter_ms for r in legs)  # type: ignore[index]
    c_jitter = statistics.median(r["customer"].jitter_ms for r in legs)  # type: ignore[index]
    # uniform 0-30 ms extra delay: RFC 3550 jitter ~ E|D| / 1 = ~10 ms; steady legs ~ 1 ms
    assert c_jitter > a_jitter + 3 and c_jitter > 4, (a_jitter, c_jitter)
    assert all(r["phone"] is False for r in got)
    # G.711 legs into the 16 kHz bridge and out to an 8 kHz tap: two conversions of 3 ms each
    # (the worker's resampler, docs/DESIGN.md §4c), and no phone path
    assert all(r.resample_ms == {"webrtc": 6.0} for leg in legs for r in leg.values()), legs  # type: ignore[attr-defined]


async def test_nobody_hears_no_reports(plane: tuple[SipPlane, FakeHooks]) -> None:
    """Streams of a conversation nobody hears are not read for quality (the cost stays with
    the monitored ones), and no report is kept."""
    p, hooks = plane
    sip = RawSip()
    agent, customer = await legs_of(p, hooks, sip, "c-q")
    try:
        senders = [asyncio.create_task(s.run(3)) for s in (agent, customer)]
        got = await reports(p, "c-q", 2.5)
        await asyncio.gather(*senders)
    finally:
        agent.close()
        customer.close()
        sip.close()
    assert got == []


# --- the phone path's added latency, against a phone that time-stamps what it receives -------


class RawPhone:
    """A supervisor phone by hand: answers the gateway's INVITE with plain RTP to a socket of
    its own, and records the arrival time (CLOCK_MONOTONIC) and payload of every packet. No
    jitter buffer: what it sees is what the gateway sent, when it sent it (loopback)."""

    def __init__(self) -> None:
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind(("127.0.0.1", 0))
        self.sip.setblocking(False)
        self.port = self.sip.getsockname()[1]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.rtp.setblocking(False)
        self.packets: list[tuple[float, int, bytes]] = []  # (arrival, seq, payload)
        self._task: asyncio.Task[None] | None = None

    @property
    def uri(self) -> str:
        return f"sip:sup@127.0.0.1:{self.port}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            await asyncio.sleep(0.002)
            while True:
                try:
                    data, addr = self.sip.recvfrom(65536)
                except BlockingIOError:
                    break
                self._sip(data.decode("utf-8", "surrogateescape"), addr)
            while True:
                try:
                    data, anc, _flags, _addr = self.rtp.recvmsg(2048, 64)
                except BlockingIOError:
                    break
                arrival = time.monotonic()
                for level, kind, value in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("qq", value[:16])
                        # kernel stamps are CLOCK_REALTIME: move them onto the monotonic clock
                        arrival = time.monotonic() - (time.time() - (sec + nsec / 1e9))
                if len(data) > 12:
                    self.packets.append((arrival, struct.unpack("!H", data[2:4])[0], data[12:]))

    def _sip(self, text: str, addr: tuple[str, int]) -> None:
        head, _, _body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        if lines[0].startswith("SIP/2.0"):
            return
        method = lines[0].split(" ", 1)[0]
        if method == "ACK":
            return
        keep = [
            ln for ln in lines[1:] if ln.lower().startswith(("via:", "from:", "call-id:", "cseq:", "record-route:"))
        ]
        to = next(ln for ln in lines[1:] if ln.lower().startswith("to:"))
        if method == "INVITE" and ";tag=" not in to:
            to += ";tag=" + uuid.uuid4().hex[:8]
        body = b""
        if method == "INVITE":
            rtp_port = self.rtp.getsockname()[1]
            body = (
                "v=0\r\no=sup 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                f"m=audio {rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=recvonly\r\n"
            ).encode()
        out = ["SIP/2.0 200 OK", *keep, to, f"Contact: <sip:sup@127.0.0.1:{self.port}>"]
        if body:
            out.append("Content-Type: application/sdp")
        out.append(f"Content-Length: {len(body)}")
        self.sip.sendto(("\r\n".join(out) + "\r\n\r\n").encode() + body, addr)

    def onsets(self) -> list[float]:
        """Arrival times of each first loud packet after at least 5 quiet ones (the tone is off
        for 12 packets: a lone concealed or silent packet inside a tone is no onset)."""
        out = []
        quiet = 0
        for arrival, _seq, payload in self.packets:
            if ulaw_level(payload) > 2000:
                if quiet >= 5:
                    out.append(arrival)
                quiet = 0
            else:
                quiet += 1
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.sip.close()
        self.rtp.close()


#: The agent's tone is on for 13 packets, off for 12: a 500 ms cycle, so its onsets fall on
#: every position of the 240 ms burst pattern in turn.
CYCLE = 25


async def latency_phase(
    p: SipPlane,
    phone: RawPhone,
    agent: LegSender,
    customer: LegSender,
    seconds: float,
    board: QualityBoard,
    path: Literal["sip", "webrtc"] = "sip",
    transit: Callable[[], tuple[float, int]] | None = None,
) -> tuple[float, float, int]:
    """Send both legs for ``seconds``; over the second half: (latency the phone measured from
    each tone onset's send to its arrival, mean ms; latency the gateway reported, mean ms;
    onsets measured)."""
    agent.tone = lambda i: i % CYCLE < CYCLE // 2 + 1
    customer.tone = lambda i: False
    phone.packets.clear()
    agent.sent_at.clear()
    runs = [asyncio.create_task(s.run(seconds)) for s in (agent, customer)]
    t_half = time.monotonic() + seconds / 2
    reported: list[float] = []
    seen = None
    while not all(r.done() for r in runs):
        await asyncio.sleep(0.05)
        q = p.leg_quality("c-q")
        if q is not None and q.at != seen:
            seen = q.at
            measured = board.measure("m-q", q, path, transit() if transit is not None else None)
            if time.monotonic() > t_half and measured.added_ms is not None:
                reported.append(measured.added_ms)
    await asyncio.sleep(0.3)  # the last packets' way to the phone
    starts = sorted(agent.sent_at[i] for i in agent.sent_at if i % CYCLE == 0)
    latencies = []
    for arrival in phone.onsets():
        before = [t for t in starts if t < arrival]
        if before and before[-1] > t_half and arrival - before[-1] < 0.4:
            latencies.append(1000 * (arrival - before[-1]))
    assert reported and latencies, (reported, latencies)
    return statistics.mean(latencies), statistics.mean(reported), len(latencies)


#: How far the reported latency may be from the measured one (a phase's means; the bursty
#: legs' jitter buffer swings by ~240 ms within each burst, and it is read once a second).
TOLERANCE_MS = 35.0


def assert_tracks(steady: tuple[float, float, int], bursty: tuple[float, float, int]) -> None:
    """Each phase's reported latency is within the tolerance of the measured one, and the
    reported figure rises with the measured one (a constant, or one that ignores the jitter
    buffer, can not pass)."""
    assert abs(steady[1] - steady[0]) < TOLERANCE_MS, steady
    assert abs(bursty[1] - bursty[0]) < TOLERANCE_MS, bursty
    assert bursty[0] - steady[0] > 50, ("the bursts did not grow the latency", steady, bursty)
    assert bursty[1] - steady[1] > 50, ("the reported latency did not follow", steady, bursty)


async def test_reported_phone_latency_follows_the_measured_one(plane: tuple[SipPlane, FakeHooks]) -> None:
    p, hooks = plane
    sip = RawSip()
    phone = RawPhone()
    phone.start()
    agent, customer = await legs_of(p, hooks, sip, "c-q")
    board = QualityBoard()
    try:
        await p.call_phone("c-q", "m-q", phone.uri)
        await wait_until(lambda: (q := p.leg_quality("c-q")) is not None and q.phone, 10, "a phone report")
        q = p.leg_quality("c-q")
        # PCMU legs to a PCMU phone through the 16 kHz bridge: 3 ms up, 3 ms down, reported
        assert q is not None and all(r.resample_ms.get("sip") == 6.0 for r in q.legs.values()), q
        steady = await latency_phase(p, phone, agent, customer, 8, board)
        # bursts of 12 packets every 240 ms: pjmedia's jitter buffer grows to hold them
        for s in (agent, customer):
            s.delay = lambda i: (11 - i % 12) * 0.02
        bursty = await latency_phase(p, phone, agent, customer, 14, board)
    finally:
        await phone.close()
        agent.close()
        customer.close()
        sip.close()
    print(f"steady: measured {steady[0]:.1f} ms, reported {steady[1]:.1f} ms ({steady[2]} onsets)")
    print(f"bursty: measured {bursty[0]:.1f} ms, reported {bursty[1]:.1f} ms ({bursty[2]} onsets)")
    assert_tracks(steady, bursty)


# --- through the API: GET /v1/monitors/{mid}, /v1/events, /metrics ----------------------------


async def _events(gw: GatewayClient, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await gw.http.ws_connect(gw.ws_url("/v1/events"), headers={"Authorization": f"Bearer {await gw.login(user)}"})
    assert (await ws.receive_json(timeout=5))["type"] == "hello"
    return ws


async def _drain(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[tuple[float, dict[str, Any]]]:
    """Every event ``ws`` receives in ``seconds``, with its arrival time."""
    out: list[tuple[float, dict[str, Any]]] = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            out.append((time.monotonic(), await ws.receive_json(timeout=left)))
        except TimeoutError:
            break
    return out


async def test_quality_through_the_api_events_and_metrics(tmp_path: Path) -> None:
    require_pjsua2()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, sip_media_timeout=0, webrtc_processes=0)
    async with running_gateway(settings) as gw:
        assert (await gw.conversation("conv-q")).status in (200, 201)
        sip = RawSip()
        phone = RawPhone()
        phone.start()
        agent_call = await raw_leg_call(sip, sip_port, "conv-q", "agent")
        customer_call = await raw_leg_call(sip, sip_port, "conv-q", "customer")
        agent, customer = LegSender(agent_call.media_port, 600.0), LegSender(customer_call.media_port, 1000.0)
        agent.skip = lambda i: i % 10 == 9
        senders = [asyncio.create_task(s.run(9)) for s in (agent, customer)]
        sam_events = await _events(gw, "sam")
        tom_events = await _events(gw, "tom")  # supervises the same team, is not the monitor's supervisor
        try:
            sam = await gw.login("sam")
            started = await gw.monitor("sam", "conv-q", {"kind": "sip", "uri": phone.uri})
            assert started.status == 201 and "voice" in started.body["channels"], started.body
            mid = started.body["id"]
            sam_got, tom_got = await asyncio.gather(_drain(sam_events, 5), _drain(tom_events, 5))
            state = await gw.call("GET", f"/v1/monitors/{mid}", sam)
            metrics = (await gw.call("GET", "/metrics")).body
            assert (await gw.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
            after = await gw.call("GET", f"/v1/monitors/{mid}", sam)
            await asyncio.gather(*senders)
        finally:
            for s in senders:
                s.cancel()
            await sam_events.close()
            await tom_events.close()
            await phone.close()
            agent.close()
            customer.close()
            sip.close()
    assert phone.onsets() or phone.packets, "the phone heard nothing"
    quality_events = [(t, e) for t, e in sam_got if e["type"] == "monitor_quality"]
    assert 3 <= len(quality_events) <= 6, [e["type"] for _t, e in sam_got]  # about once a second
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(quality_events)]
    assert min(gaps) > 0.7, gaps  # not more often than once a second
    for _t, e in quality_events:
        assert e["monitor"] == mid and e["conversation"] == "conv-q"
        assert set(e["quality"]) == {"added_latency_ms", "legs", "updated_at"}
    assert not [e for _t, e in tom_got if e["type"] == "monitor_quality"], "another supervisor got the quality"
    assert any(e["type"] == "conversation_updated" for _t, e in tom_got)  # tom does hear his team's events

    quality = state.body["quality"]
    assert state.status == 200 and quality is not None, state.body
    legs = quality["legs"]
    assert set(legs) == {"agent", "customer"}
    assert 5.0 <= legs["agent"]["loss_pct"] <= 15.0 and legs["customer"]["loss_pct"] <= 2.0, legs
    assert 35 <= legs["customer"]["packets"] <= 55 and legs["agent"]["packets"] <= 50, legs
    assert isinstance(quality["added_latency_ms"], float | int) and 0 < quality["added_latency_ms"] < 500, quality
    updated = datetime.fromisoformat(quality["updated_at"].replace("Z", "+00:00"))
    assert updated.tzinfo is not None and abs(time.time() - updated.timestamp()) < 5
    assert after.body["quality"] is None, after.body  # left: no voice, no quality

    for name in (
        "gateway_voice_added_latency_seconds",
        "gateway_voice_leg_loss_ratio",
        "gateway_voice_leg_jitter_seconds",
    ):
        count = re.search(rf'^{name}_count{{path="sip"}} (\S+)$', metrics, re.M)
        assert count is not None and float(count.group(1)) > 0, name
    voice_lines = [ln for ln in metrics.splitlines() if ln.startswith("gateway_voice_")]
    assert voice_lines and not [ln for ln in voice_lines if "conv-q" in ln or mid in ln]
    labels = {label for ln in voice_lines for label in re.findall(r"(\w+)=", ln.split(" ")[0])}
    assert labels <= {"path", "le"}, labels


# --- the WebRTC path's added latency, against a browser-side receiver -------------------------


class WebRtcReceiver:
    """A WebRTC listener (an aiortc peer, PCMU) that time-stamps each decrypted RTP packet as
    it comes off its socket, before any jitter buffer: the ``onsets()`` of :class:`RawPhone`."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.pc.addTransceiver("audio", direction="recvonly")
        self.packets: list[tuple[float, int, bytes]] = []

    async def offer(self) -> str:
        offer = await self.pc.createOffer()
        with host_addresses(["127.0.0.1"]):
            await self.pc.setLocalDescription(offer)
        return str(self.pc.localDescription.sdp)

    async def answered(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

        async def on_rtp(data: bytes, arrival_time_ms: int = 0) -> None:
            self.packets.append((time.monotonic(), struct.unpack("!H", data[2:4])[0], data[12:]))

        dtls = self.pc.getTransceivers()[0].receiver.transport
        assert divert_inbound_rtp(dtls, on_rtp)

    onsets = RawPhone.onsets

    async def close(self) -> None:
        await self.pc.close()


async def test_reported_webrtc_latency_follows_the_measured_one(
    plane: tuple[SipPlane, FakeHooks], tmp_path: Path
) -> None:
    """Worker -> media process (frames stamped at the worker's bridge tick) -> a WebRTC
    receiver: the reported added latency (jitter-buffer wait + measured transit) against the
    tone onsets the receiver time-stamped, steady then bursty legs."""
    p, hooks = plane
    pool = MediaProcesses(
        Settings(ice_host_addresses="127.0.0.1", webrtc_processes=1, log_level="WARNING", data_dir=str(tmp_path)),
        p.forward_frames,
    )
    await pool.start()
    sip = RawSip()
    receiver = WebRtcReceiver()
    agent, customer = await legs_of(p, hooks, sip, "c-q")
    board = QualityBoard()
    try:
        answer, listener = await pool.answer(await receiver.offer(), "c-q", stereo=False, codec="pcmu")
        await receiver.answered(answer)
        await wait_until(lambda: p.leg_quality("c-q") is not None, 10, "a leg report")

        def transit() -> tuple[float, int]:
            return listener.transit()

        steady = await latency_phase(p, receiver, agent, customer, 8, board, "webrtc", transit)  # type: ignore[arg-type]
        for s in (agent, customer):
            s.delay = lambda i: (11 - i % 12) * 0.02
        bursty = await latency_phase(p, receiver, agent, customer, 14, board, "webrtc", transit)  # type: ignore[arg-type]
    finally:
        await receiver.close()
        await pool.stop()
        agent.close()
        customer.close()
        sip.close()
    print(f"webrtc steady: measured {steady[0]:.1f} ms, reported {steady[1]:.1f} ms ({steady[2]} onsets)")
    print(f"webrtc bursty: measured {bursty[0]:.1f} ms, reported {bursty[1]:.1f} ms ({bursty[2]} onsets)")
    assert_tracks(steady, bursty)


async def test_webrtc_monitor_quality_through_the_api(tmp_path: Path) -> None:
    """A browser-style listener (WHEP through the API, served by a media process): its quality
    carries a measured added latency, and the histograms count it under path="webrtc"."""
    require_pjsua2()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(
        tmp_path, sip_port, sip_media_timeout=0, webrtc_processes=1, ice_host_addresses="127.0.0.1"
    )
    async with running_gateway(settings) as gw:
        assert (await gw.conversation("conv-w")).status in (200, 201)
        sip = RawSip()
        receiver = WebRtcReceiver()
        agent_call = await raw_leg_call(sip, sip_port, "conv-w", "agent")
        customer_call = await raw_leg_call(sip, sip_port, "conv-w", "customer")
        agent, customer = LegSender(agent_call.media_port, 600.0), LegSender(customer_call.media_port, 1000.0)
        customer.skip = lambda i: i % 10 == 9
        senders = [asyncio.create_task(s.run(8)) for s in (agent, customer)]
        try:
            sam = await gw.login("sam")
            started = await gw.monitor("sam", "conv-w", {"kind": "webrtc"})
            assert started.status == 201 and "voice" in started.body["channels"], started.body
            mid = started.body["id"]
            offer = await receiver.offer()
            whep = await gw.call(
                "POST", f"/v1/monitors/{mid}/whep", sam, data=offer, headers={"Content-Type": "application/sdp"}
            )
            assert whep.status == 201, whep.body
            await receiver.answered(str(whep.body))
            await asyncio.sleep(4.5)
            state = await gw.call("GET", f"/v1/monitors/{mid}", sam)
            metrics = (await gw.call("GET", "/metrics")).body
            await asyncio.gather(*senders)
        finally:
            for s in senders:
                s.cancel()
            await receiver.close()
            agent.close()
            customer.close()
            sip.close()
    assert receiver.packets, "the listener received nothing"
    quality = state.body["quality"]
    assert quality is not None, state.body
    assert 0 < quality["added_latency_ms"] < 500, quality
    assert quality["legs"]["agent"]["loss_pct"] <= 2.0 and 5.0 <= quality["legs"]["customer"]["loss_pct"] <= 15.0
    count = re.search(r'^gateway_voice_added_latency_seconds_count{path="webrtc"} (\S+)$', metrics, re.M)
    assert count is not None and float(count.group(1)) > 0
