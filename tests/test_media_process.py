"""WebRTC listeners served by media processes (gateway/media/pool.py, process.py).

The processes are real (``python -m gateway.media.process``); the listeners are real aiortc
peers on loopback. A small in-test frame source stands in for the SIP worker: when the pool
asks for a conversation's frames (``forward``), it connects to the media process's frame
socket and sends LegFrames (agent 600 Hz, customer 1000 Hz) every 20 ms in the SIP worker
protocol's wire format, as a worker does after ``SetTap(to=path)``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from devtools.fake_taps import tone
from gateway.config import Settings
from gateway.media.ice import host_addresses
from gateway.media.pool import MediaProcesses, RemoteListener
from gateway.media.whep import WhepError
from gateway.sip.protocol import encode_leg_frame
from tests.test_webrtc_whep import ToneTrack, _collect, _peak_power

pytestmark = pytest.mark.webrtc

LISTEN_SECONDS = 1.2


class FrameSource:
    """The SIP workers' side: LegFrames to every media process socket the pool forwards to."""

    def __init__(self) -> None:
        self.forwards: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.calls: list[tuple[str, str, bool]] = []

    def forward(self, cid: str, path: str, on: bool) -> None:
        self.calls.append((cid, path, on))
        if on:
            self.forwards[cid, path] = asyncio.get_running_loop().create_task(self._send(cid, path))
        else:
            self.forwards.pop((cid, path)).cancel()

    async def _send(self, cid: str, path: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(path)
        sock.setblocking(False)
        seq, t0, loop = 0, asyncio.get_running_loop().time(), asyncio.get_running_loop()
        try:
            while True:
                agent = tone(600, 160, 8000, start=seq * 160).tobytes()
                customer = tone(1000, 160, 8000, start=seq * 160).tobytes()
                try:
                    sock.send(encode_leg_frame(cid.encode(), seq, 8000, agent, customer))
                except OSError:
                    pass
                seq += 1
                await asyncio.sleep(max(0.0, t0 + seq * 0.02 - loop.time()))
        finally:
            sock.close()


@pytest.fixture
async def media() -> AsyncIterator[tuple[MediaProcesses, FrameSource]]:
    source = FrameSource()
    pool = MediaProcesses(
        Settings(ice_host_addresses="127.0.0.1", webrtc_processes=2, log_level="WARNING"), source.forward
    )
    await pool.start()
    try:
        yield pool, source
    finally:
        await pool.stop()
        for task in source.forwards.values():
            task.cancel()


async def _offer(client: RTCPeerConnection) -> str:
    offer = await client.createOffer()
    with host_addresses(["127.0.0.1"]):
        await client.setLocalDescription(offer)
    return str(client.localDescription.sdp)


async def _listen(
    pool: MediaProcesses, cid: str, *, stereo: bool, codec: str | None = None, **callbacks: Any
) -> tuple[str, RemoteListener, np.ndarray, RTCPeerConnection]:
    client = RTCPeerConnection()
    client.addTransceiver("audio", direction="recvonly")
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    client.on("track", lambda t: got.done() or got.set_result(t))
    answer, listener = await pool.answer(await _offer(client), cid, stereo=stereo, codec=codec, **callbacks)
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    received: list[np.ndarray] = []
    await _collect(await asyncio.wait_for(got, 5), LISTEN_SECONDS, received)
    return answer, listener, np.concatenate(received, axis=1), client


async def test_stereo_listener_hears_agent_left_customer_right(media: tuple[MediaProcesses, FrameSource]) -> None:
    pool, source = media
    levels: list[tuple[float, float]] = []
    answer, listener, audio, client = await _listen(
        pool, "c-1", stereo=True, on_levels=lambda a, c: levels.append((a, c))
    )
    try:
        assert "opus/48000/2" in answer.lower() and "sendonly" in answer
        assert audio.shape[0] == 2  # aiortc decodes the stereo Opus to two planes
        left, right = audio[0][4800:], audio[1][4800:]
        assert _peak_power(left, 48000, 600) > 0.5 and _peak_power(left, 48000, 1000) < 0.05
        assert _peak_power(right, 48000, 1000) > 0.5 and _peak_power(right, 48000, 600) < 0.05
        # levels reach the main process: both legs at the tone's level (8000 peak: about -15 dBFS)
        assert len(levels) >= 5
        assert all(-20 < a < -10 and -20 < c < -10 for a, c in levels[-3:])
        assert source.calls == [("c-1", pool.processes[0].frame_path, True)]
    finally:
        await listener.close()
        await client.close()
    assert source.calls[-1] == ("c-1", pool.processes[0].frame_path, False)
    assert not pool.processes[0].listeners


async def test_pcmu_mix_carries_both_legs_and_listeners_spread(media: tuple[MediaProcesses, FrameSource]) -> None:
    pool, source = media
    levels: list[tuple[float, float]] = []
    answer1, first, mix1, client1 = await _listen(
        pool, "c-1", stereo=False, on_levels=lambda a, c: levels.append((a, c))
    )
    answer2, second, mix2, client2 = await _listen(pool, "c-2", stereo=False)
    try:
        for answer, mix in ((answer1, mix1), (answer2, mix2)):
            assert "PCMU/8000" in answer
            samples = mix[0][800:]  # aiortc decodes PCMU at 8 kHz
            assert _peak_power(samples, 8000, 600) > 0.2 and _peak_power(samples, 8000, 1000) > 0.2
        # metered in the batched G.711 pass: both legs at the tone's level (about -15 dBFS)
        assert len(levels) >= 5 and all(-20 < a < -10 and -20 < c < -10 for a, c in levels[-3:])
        # least loaded: one listener per process, each fed by its own forward
        assert {first._proc.index, second._proc.index} == {0, 1}
        assert {(cid, on) for cid, _path, on in source.calls} == {("c-1", True), ("c-2", True)}
    finally:
        await first.close()
        await second.close()
        await client1.close()
        await client2.close()


async def test_rtp_a_browser_sends_is_dropped_and_counted(media: tuple[MediaProcesses, FrameSource]) -> None:
    pool, _source = media
    counted: list[int] = []
    client = RTCPeerConnection()
    client.addTransceiver(ToneTrack(1500.0), direction="sendrecv")
    got: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    client.on("track", lambda t: got.done() or got.set_result(t))
    answer, listener = await pool.answer(await _offer(client), "c-3", stereo=False, on_inbound_rtp=counted.append)
    try:
        assert "a=sendonly" in answer and "a=sendrecv" not in answer
        await client.setRemoteDescription(
            RTCSessionDescription(sdp=answer.replace("a=sendonly", "a=sendrecv"), type="answer")
        )
        received: list[np.ndarray] = []
        await _collect(await asyncio.wait_for(got, 5), LISTEN_SECONDS, received)
        await asyncio.sleep(0.2)  # the last counts arrive with the next report
        assert listener.inbound_rtp_packets > 10
        assert counted == list(range(1, listener.inbound_rtp_packets + 1))  # once per packet, as in-process
        mix = np.concatenate(received, axis=1)[0][800:]  # PCMU, 8 kHz
        assert _peak_power(mix, 8000, 1500) < 0.01  # nothing the supervisor sends is heard
        assert _peak_power(mix, 8000, 600) > 0.2
    finally:
        await listener.close()
        await client.close()


async def test_bad_offer_is_refused_and_holds_nothing(media: tuple[MediaProcesses, FrameSource]) -> None:
    pool, source = media
    with pytest.raises(WhepError) as err:
        await pool.answer("v=0\r\nnot sdp", "c-4", stereo=False)
    assert err.value.code in ("invalid_sdp", "no_audio")
    assert all(not p.listeners and not p.conversations for p in pool.processes)
    assert source.calls[-1][2] is False  # the forward was switched off again


async def test_a_dead_media_process_ends_its_listeners_and_is_restarted(
    media: tuple[MediaProcesses, FrameSource],
) -> None:
    pool, _source = media
    _answer, listener, _audio, client = await _listen(pool, "c-5", stereo=False)
    ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    listener.on_closed(lambda reason: ended.done() or ended.set_result(reason))
    proc = listener._proc
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGKILL)
    assert await asyncio.wait_for(ended, 5) == "media_failure"
    for _ in range(100):
        if proc.up and proc.restarts == 1 and proc.frame_path:
            break
        await asyncio.sleep(0.05)
    assert proc.up and proc.restarts == 1
    await client.close()
    _answer, again, audio, client = await _listen(pool, "c-5", stereo=False)
    try:
        assert _peak_power(audio[0][800:], 8000, 600) > 0.2
    finally:
        await again.close()
        await client.close()


async def test_listeners_of_one_conversation_share_its_process_and_forward(
    media: tuple[MediaProcesses, FrameSource],
) -> None:
    pool, source = media
    _a1, first, mix1, client1 = await _listen(pool, "c-6", stereo=False)
    _a2, second, mix2, client2 = await _listen(pool, "c-6", stereo=False)
    try:
        assert first._proc is second._proc  # the worker sends each frame once per process
        assert [on for cid, _path, on in source.calls if cid == "c-6"] == [True]
        for mix in (mix1, mix2):
            assert _peak_power(mix[0][800:], 8000, 1000) > 0.2
        await first.close()
        assert [on for cid, _path, on in source.calls if cid == "c-6"] == [True]  # still listened to
    finally:
        await second.close()
        await client1.close()
        await client2.close()
    assert [on for cid, _path, on in source.calls if cid == "c-6"] == [True, False]
