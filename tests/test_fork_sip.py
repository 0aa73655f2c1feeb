"""Fork on demand end to end, with real peers: a platform follows ``/v1/events`` with its token
and sends its legs only once the gateway asks (``voice_fork_requested``), and hangs them up on
``voice_fork_released``.

* per-leg: the platform starts two sipp calls (600 Hz agent, 1000 Hz customer) on the request;
  a supervisor's SIP phone (pjsua2), called while no leg existed yet, hears both tones.
* SIPREC: the platform's pjsua2 SIPREC source idles (``--on-demand``) until told ``DIAL``; a
  WebRTC listener (aiortc, WHEP offer posted before any leg exists) hears both tones; leaving
  releases the fork and the source's BYE ends the legs.
"""

from __future__ import annotations

import asyncio
import os
import time
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from gateway.api.context import SIP
from gateway.media.ice import host_addresses
from tests.sip_support import (
    AUDIO,
    PYTHON,
    ROOT,
    Proc,
    free_udp_block,
    read_ulaw,
    read_wav,
    require_pjsua2,
    require_tool,
    sip_gateway_settings,
    start_phone,
    start_sipp_leg,
    tone_levels,
    wait_until,
)
from tests.support import GatewayClient, running_gateway
from tests.test_webrtc_whep import _peak_power

pytestmark = [pytest.mark.sip, pytest.mark.api, pytest.mark.webrtc]

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class Platform:
    """A platform's event follower: ``on_request`` / ``on_release`` run for each fork event."""

    def __init__(self, gw: GatewayClient, on_request: Handler, on_release: Handler) -> None:
        self.gw = gw
        self.on_request, self.on_release = on_request, on_release
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Platform:
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        headers = {"Authorization": f"Bearer {await self.gw.platform()}"}
        async with self.gw.http.ws_connect(self.gw.ws_url("/v1/events"), headers=headers) as ws:
            self._ready.set()
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                event = msg.json()
                if event["type"] == "voice_fork_requested":
                    self.events.append((time.monotonic(), event))
                    await self.on_request(event)
                elif event["type"] == "voice_fork_released":
                    self.events.append((time.monotonic(), event))
                    await self.on_release(event)

    def kinds(self) -> list[str]:
        return [e["type"] for _, e in self.events]


def sip_port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


async def test_per_leg_fork_on_request_reaches_a_phone_that_waited(tmp_path: Path) -> None:
    require_pjsua2()
    require_tool("sipp")
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, fork_mode="per-leg")
    legs: list[asyncio.subprocess.Process] = []

    async def fork(event: dict[str, Any]) -> None:
        assert event["mode"] == "per-leg"
        port = sip_port_of(event["sip_uri"])
        for leg, audio in (("agent", "agent_600.ulaw"), ("customer", "customer_1000.ulaw")):
            legs.append(await start_sipp_leg(tmp_path, port, event["conversation"], leg, AUDIO / audio, 15000))

    async def release(event: dict[str, Any]) -> None:
        for proc in legs:  # sipp can not BYE on cue: the calls end with it (the gateway's media timeout)
            if proc.returncode is None:
                proc.kill()

    async with running_gateway(settings) as gw:
        assert (await gw.conversation("fk-1", fork="on_demand")).status == 201
        plane = gw.app[SIP]
        async with Platform(gw, fork, release) as platform:
            phone_port = free_udp_block(30, 40000, 59000)
            rec = tmp_path / "fork_phone.wav"
            phone = await start_phone(phone_port, rec)
            try:
                await asyncio.sleep(0.5)
                assert platform.events == [] and plane.legs("fk-1") == set()  # nobody listens: no fork
                t_join = time.monotonic()
                ans = await gw.monitor("sam", "fk-1", {"kind": "sip", "uri": f"sip:sam@127.0.0.1:{phone_port}"})
                assert ans.status == 201 and ans.body["channels"] == ["chat", "voice"], ans.body
                assert ans.body["voice_pending"] is True
                t_connected = await phone.wait_line("CONNECTED", 10)
                await wait_until(lambda: plane.legs("fk-1") == {"agent", "customer"}, 5, "both legs")
                t_request = platform.events[0][0]
                assert t_join <= t_request <= t_connected
                await asyncio.sleep(2.0)
                sam = await gw.login("sam")
                assert (await gw.call("GET", f"/v1/monitors/{ans.body['id']}", sam)).body["voice_pending"] is False
                assert (await gw.call("DELETE", f"/v1/monitors/{ans.body['id']}", sam)).status == 204
                await phone.wait_line("DISCONNECTED", 3)
                await wait_until(lambda: platform.kinds() == ["voice_fork_requested", "voice_fork_released"], 3)
            finally:
                await phone.stop()
                for proc in legs:
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()
        # the platform's legs going away does not end the voice session of an on-demand conversation
        conv = await gw.call("GET", "/v1/conversations/fk-1", await gw.login("sam"))
        assert conv.body["sessions"]["voice"] is True and conv.body["fork_requested"] is None
    heard, rate = read_wav(rec)
    levels = tone_levels(heard[-rate:], rate, [600.0, 1000.0])
    assert levels[600.0] > 0.3 and levels[1000.0] > 0.3, levels


def tone_wav(src: Path, out: Path) -> Path:
    """A fixture tone (raw mu-law) as the 16-bit WAV the pjsua2 source plays."""
    pcm = read_ulaw(src).astype(np.int16)
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())
    return out


async def start_on_demand_source(
    front_port: int, agent_wav: Path, customer_wav: Path, cid: str, record_prefix: Path
) -> Proc:
    port = free_udp_block(40, 40000, 59000)
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "devtools.siprec_source", "--front", f"127.0.0.1:{front_port}", "--port", str(port),
        "--conv", f"{cid}:alice", "--agent-wav", str(agent_wav), "--customer-wav", str(customer_wav),
        "--redial", "1", "--on-demand", "--record-prefix", str(record_prefix),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=str(ROOT),
    )  # fmt: skip
    source = Proc(proc)
    await source.wait_line("READY", 10)
    return source


async def listen(gw: GatewayClient, mid: str, token: str) -> tuple[RTCPeerConnection, MediaStreamTrack]:
    """A WHEP listener of ``mid`` (aiortc, loopback candidates only)."""
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    client.on("track", lambda t: got.done() or got.set_result(t))
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    answer = await gw.call(
        "POST",
        f"/v1/monitors/{mid}/whep",
        token,
        data=client.localDescription.sdp,
        headers={"Content-Type": "application/sdp"},
    )
    assert answer.status == 201, answer.body
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer.body, type="answer"))
    return client, await asyncio.wait_for(got, 5)


async def test_siprec_fork_on_request_reaches_a_webrtc_listener_and_bye_on_release(tmp_path: Path) -> None:
    require_pjsua2()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, ice_host_addresses="127.0.0.1", webrtc_processes=1)
    agent_wav = tone_wav(AUDIO / "agent_600.ulaw", tmp_path / "agent_600.wav")
    customer_wav = tone_wav(AUDIO / "customer_1000.ulaw", tmp_path / "customer_1000.wav")
    # the source records what the gateway sends back on each leg: it must stay silent
    source = await start_on_demand_source(sip_port, agent_wav, customer_wav, "fk-2", tmp_path / "src")
    assert source.proc.stdin is not None
    stdin = source.proc.stdin

    async def fork(event: dict[str, Any]) -> None:
        assert event["mode"] == "siprec" and sip_port_of(event["sip_uri"]) == sip_port
        stdin.write(f"DIAL {event['conversation']}\n".encode())

    async def release(event: dict[str, Any]) -> None:
        stdin.write(f"HANGUP {event['conversation']}\n".encode())

    try:
        async with running_gateway(settings) as gw:
            assert (await gw.conversation("fk-2", fork="on_demand")).status == 201
            plane = gw.app[SIP]
            sam = await gw.login("sam")
            async with Platform(gw, fork, release) as platform:
                ans = await gw.monitor("sam", "fk-2", {"kind": "webrtc"})
                assert ans.status == 201 and ans.body["voice_pending"] is True, ans.body
                mid = ans.body["id"]
                client, track = await listen(gw, mid, sam)  # offered before any leg exists
                try:
                    await source.wait_line("CONNECTED", 10)
                    await wait_until(lambda: plane.legs("fk-2") == {"agent", "customer"}, 5, "both legs")
                    received: list[np.ndarray] = []
                    rate = 0
                    end = time.monotonic() + 3.0
                    while time.monotonic() < end:
                        frame = await asyncio.wait_for(track.recv(), 5)
                        received.append(frame.to_ndarray().reshape(-1).astype(np.float64))
                        rate = frame.sample_rate
                finally:
                    await client.close()
                assert (await gw.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
                await wait_until(lambda: platform.kinds() == ["voice_fork_requested", "voice_fork_released"], 3)
                await source.wait_line("DISCONNECTED", 5)  # the source's BYE
                await wait_until(lambda: plane.legs("fk-2") == set(), 5, "legs gone after the BYE")
                # a second supervisor, on a SIP phone that sends a 1500 Hz tone: a new request, the
                # source dials again, the phone (called once the legs are up) hears both tones
                phone_port = free_udp_block(30, 40000, 59000)
                phone = await start_phone(phone_port, tmp_path / "tom.wav", "--tone", "1500")
                try:
                    again = await gw.monitor("tom", "fk-2", {"kind": "sip", "uri": f"sip:tom@127.0.0.1:{phone_port}"})
                    assert again.status == 201 and again.body["voice_pending"] is True
                    await wait_until(lambda: platform.kinds().count("voice_fork_requested") == 2, 3)
                    await phone.wait_line("CONNECTED", 10)
                    assert plane.legs("fk-2") == {"agent", "customer"}
                    await asyncio.sleep(2.0)
                    tom = await gw.login("tom")
                    assert (await gw.call("DELETE", f"/v1/monitors/{again.body['id']}", tom)).status == 204
                    await phone.wait_line("DISCONNECTED", 3)
                    await wait_until(lambda: platform.kinds().count("voice_fork_released") == 2, 3)
                    await wait_until(lambda: plane.legs("fk-2") == set(), 5, "legs gone after the second BYE")
                finally:
                    await phone.stop()
    finally:
        await source.stop()
    mix = np.concatenate(received)
    assert rate == 8000  # PCMU (the default toward browsers), mono
    tail = mix[-rate:]  # the last second: the legs are surely up
    print(f"webrtc listener: 600 Hz {_peak_power(tail, rate, 600):.2f}, 1000 Hz {_peak_power(tail, rate, 1000):.2f}")
    assert _peak_power(tail, rate, 600) > 0.2 and _peak_power(tail, rate, 1000) > 0.2, (
        _peak_power(tail, rate, 600),
        _peak_power(tail, rate, 1000),
    )
    heard, phone_rate = read_wav(tmp_path / "tom.wav")
    levels = tone_levels(heard[-phone_rate:], phone_rate, [600.0, 1000.0, 1500.0])
    assert levels[600.0] > 0.3 and levels[1000.0] > 0.3 and levels[1500.0] < 0.05, levels
    # nothing the phone sent reached the platform's legs (the second call's recordings)
    for leg in ("agent", "customer"):
        back, back_rate = read_wav(tmp_path / f"src-{leg}.wav")
        assert len(back) > back_rate, f"{leg}: recording too short ({len(back)} samples)"
        assert float(np.sqrt(np.mean(back**2))) < 50, f"the {leg} leg got audio back"
