"""The SIP plane against real peers: sipp per-leg platforms, a pjsua2 SIPREC source, a pjsua2 phone.

Drives :class:`gateway.sip.plane.SipPlane` directly with a fake :class:`SipHooks`.
Needs sipp (apt-get install sip-tester) and pjsua2-python; a missing tool fails, never skips.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.sip.plane import SipPlane

from .sip_support import (
    AUDIO,
    FakeHooks,
    RawSip,
    assert_phone_heard,
    collect,
    free_udp_block,
    in_dialog_request,
    median_correlation,
    metadata,
    multipart,
    raw_leg_call,
    read_ulaw,
    read_wav,
    require_pjsua2,
    require_tool,
    sdp,
    start_phone,
    start_sipp_leg,
    start_sipp_siprec,
    start_siprec,
    started_plane,
    tone_levels,
    wait_until,
)

pytestmark = [pytest.mark.sip]

AGENT_HZ, CUSTOMER_HZ, PHONE_HZ = 600.0, 1000.0, 1500.0


@pytest.fixture
async def gw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[SipPlane, FakeHooks]]:
    """A started plane with 2 workers; ``@pytest.mark.parametrize("gw", [{setting: value}], indirect=True)``
    overrides settings."""
    require_pjsua2()
    require_tool("sipp")
    hooks = FakeHooks({"c-1": "alice", "c-2": "alice", "c-3": "bob", "c-4": "bob"})
    async with started_plane(
        tmp_path,
        hooks,
        sip_workers=2,
        calls_per_worker=4,
        rtp_port_base=free_udp_block(80, 30000, 39000),
        **getattr(request, "param", {}),
    ) as plane:
        assert plane.ready
        yield plane, hooks


async def test_per_leg_mix_reaches_phone_never_the_phones_tone(gw: tuple[SipPlane, FakeHooks], tmp_path: Path) -> None:
    plane, hooks = gw
    port = plane.settings.sip_port
    tap = plane.open_tap("c-1")
    agent = await start_sipp_leg(tmp_path, port, "c-1", "agent", AUDIO / "agent_600.ulaw", 6000)
    customer = await start_sipp_leg(tmp_path, port, "c-1", "customer", AUDIO / "customer_1000.ulaw", 6000)
    await hooks.wait_for("leg_started", "c-1", "agent")
    await hooks.wait_for("leg_started", "c-1", "customer")
    assert plane.legs("c-1") == {"agent", "customer"}

    phone_port = free_udp_block(30, 40000, 59000)
    rec = tmp_path / "phone.wav"
    phone = await start_phone(phone_port, rec, "--tone", str(int(PHONE_HZ)))
    try:
        await plane.call_phone("c-1", "m-1", f"sip:sam@127.0.0.1:{phone_port}")
        await phone.wait_line("CONNECTED", 5)
        connected = next(text for _, text in phone.lines if text.startswith("CONNECTED"))
        assert "dir=2 " in connected, f"the phone's media should be receive-only (PJMEDIA_DIR_DECODING): {connected}"
        frames = await collect(tap, 2.0)
        t_hang = time.monotonic()
        await plane.hang_up_phone("m-1")
        t_disc = await phone.wait_line("DISCONNECTED", 3)
        assert t_disc - t_hang < 1.0, "BYE to the phone took more than 1 s"
        await plane.hang_up_phone("m-1")  # idempotent
        await asyncio.sleep(0.3)
        assert ("phone_ended", "m-1", "hung_up") not in hooks.events
        assert not [e for e in hooks.events if e[0] == "phone_ended"], "our own hang-up is not reported"
        # Hanging up the phone never disturbs the conversation (R12): legs and tap go on.
        assert plane.legs("c-1") == {"agent", "customer"}
        assert len(await collect(tap, 0.5)) >= 15
    finally:
        await phone.stop()

    # The phone heard both legs, and nothing of its own tone came back to it.
    assert_phone_heard(rec, [AGENT_HZ, CUSTOMER_HZ], [PHONE_HZ])

    # The tap carried each leg unmixed, and never the phone's tone.
    assert len(frames) >= 80, f"only {len(frames)} tap frames in 2 s"
    assert all(f.sample_rate == 8000 and f.samples == 160 for f in frames)
    a = np.concatenate([f.agent for f in frames]).astype(float)
    c = np.concatenate([f.customer for f in frames]).astype(float)
    la = tone_levels(a, 8000, [AGENT_HZ, CUSTOMER_HZ, PHONE_HZ])
    lc = tone_levels(c, 8000, [AGENT_HZ, CUSTOMER_HZ, PHONE_HZ])
    assert la[AGENT_HZ] > 0.9 and la[CUSTOMER_HZ] < 0.01 and la[PHONE_HZ] < 0.01, la
    assert lc[CUSTOMER_HZ] > 0.9 and lc[AGENT_HZ] < 0.01 and lc[PHONE_HZ] < 0.01, lc
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs)

    # The platform's BYE on the agent leg ends it promptly.
    assert await agent.wait() == 0
    waited = await hooks.wait_for("leg_ended", "c-1", "agent", "bye", timeout=2)
    assert waited < 1.0
    assert await customer.wait() == 0
    await hooks.wait_for("leg_ended", "c-1", "customer", "bye", timeout=2)
    with pytest.raises(EOFError):
        while True:
            await asyncio.wait_for(tap.next_frame(), 2)
    tap.close()
    await wait_until(lambda: plane.stats()["conversations"] == 0, 3, "slots released")
    assert plane.stats()["calls"] == 0


async def test_siprec_speech_per_leg_and_phone_hangup(gw: tuple[SipPlane, FakeHooks], tmp_path: Path) -> None:
    plane, hooks = gw
    port = plane.settings.sip_port
    tap = plane.open_tap("c-2", maxsize=500)
    src = await start_siprec(
        port, "c-2", "alice", AUDIO / "agent_speech.wav", AUDIO / "customer_speech.wav", 6.0,
        swap=True, record_prefix=tmp_path / "src",
    )  # fmt: skip
    try:
        await src.wait_line("CONNECTED", 5)
        await hooks.wait_for("leg_started", "c-2", "agent")
        await hooks.wait_for("leg_started", "c-2", "customer")
        phone_port = free_udp_block(30, 40000, 59000)
        phone = await start_phone(phone_port, tmp_path / "p.wav", "--hangup-after", "1.0", "--tone", "1500")
        try:
            await plane.call_phone("c-2", "m-2", f"sip:tom@127.0.0.1:{phone_port}")
            with pytest.raises(GatewayError) as busy:
                await plane.call_phone("c-2", "m-3", f"sip:tom@127.0.0.1:{phone_port}")
            assert busy.value.status == 409
            await hooks.wait_for("phone_ended", "m-2", "left", timeout=6)
        finally:
            await phone.stop()
        # A phone that refuses the call.
        phone_port2 = free_udp_block(30, 40000, 59000)
        phone2 = await start_phone(phone_port2, tmp_path / "p2.wav", "--reject", "486")
        try:
            await plane.call_phone("c-2", "m-4", f"sip:tom@127.0.0.1:{phone_port2}")
            await hooks.wait_for("phone_ended", "m-4", "phone_unreachable", timeout=5)
        finally:
            await phone2.stop()
        frames = await collect(tap, 2.5)
    finally:
        await src.wait_line("BYEBYE", 10)
        await src.stop()
    await hooks.wait_for("leg_ended", "c-2", "agent", "bye", timeout=3)
    await hooks.wait_for("leg_ended", "c-2", "customer", "bye", timeout=3)
    tap.close()
    assert len(frames) > 100
    a = np.concatenate([f.agent for f in frames]).astype(float)
    c = np.concatenate([f.customer for f in frames]).astype(float)
    ref_a, _ = read_wav(AUDIO / "agent_speech.wav")
    ref_c, _ = read_wav(AUDIO / "customer_speech.wav")
    # Labels were swapped on the wire (customer on the first m-line): the metadata decides.
    assert median_correlation(a, ref_a) >= 0.9
    assert median_correlation(c, ref_c) >= 0.9
    assert median_correlation(a, ref_c) < 0.5
    assert median_correlation(c, ref_a) < 0.5
    # The gateway answered recvonly: the source heard nothing at all (no phone tone either).
    for leg in ("agent", "customer"):
        back, _ = read_wav(tmp_path / f"src-{leg}.wav")
        assert np.abs(back).max(initial=0) < 50, f"the gateway sent audio back on the {leg} stream"


async def test_sipp_siprec_metadata_names_the_conversation_and_agent(
    gw: tuple[SipPlane, FakeHooks], tmp_path: Path
) -> None:
    plane, hooks = gw
    tap = plane.open_tap("c-3")
    src = await start_sipp_siprec(tmp_path, plane.settings.sip_port, "c-3", "bob", AUDIO / "agent_600.ulaw", 2500)
    await hooks.wait_for("leg_started", "c-3", "agent")
    await hooks.wait_for("leg_started", "c-3", "customer")
    frames = await collect(tap, 1.0)
    assert len(frames) >= 40
    a = np.concatenate([f.agent for f in frames]).astype(float)
    c = np.concatenate([f.customer for f in frames]).astype(float)
    assert tone_levels(a, 8000, [AGENT_HZ])[AGENT_HZ] > 0.9
    assert np.abs(c).max() < 50, "sipp sends nothing on the customer stream"
    assert await src.wait() == 0, (
        (tmp_path / "sipp_siprec_c-3_err.log").read_text() if (tmp_path / "sipp_siprec_c-3_err.log").exists() else ""
    )
    await hooks.wait_for("leg_ended", "c-3", "agent", "bye", timeout=2)
    await hooks.wait_for("leg_ended", "c-3", "customer", "bye", timeout=2)


async def test_worker_crash_ends_only_its_calls_and_restarts(gw: tuple[SipPlane, FakeHooks], tmp_path: Path) -> None:
    plane, hooks = gw
    port = plane.settings.sip_port
    procs = [
        await start_sipp_leg(tmp_path, port, "c-1", "agent", AUDIO / "agent_600.ulaw", 8000),
        await start_sipp_leg(tmp_path, port, "c-3", "agent", AUDIO / "agent_600.ulaw", 8000),
    ]
    try:
        await hooks.wait_for("leg_started", "c-1", "agent")
        await hooks.wait_for("leg_started", "c-3", "agent")
        w1, w3 = plane.worker_of("c-1"), plane.worker_of("c-3")
        assert w1 is not None and w3 is not None and w1 != w3, "footprints of 3 calls: one conversation per worker"
        phone_port = free_udp_block(30, 40000, 59000)
        phone = await start_phone(phone_port, tmp_path / "crash.wav")
        try:
            await plane.call_phone("c-1", "m-7", f"sip:sam@127.0.0.1:{phone_port}")
            await phone.wait_line("CONNECTED", 5)
            victim = plane.worker_pids()[w1]
            os.kill(victim, signal.SIGKILL)
            await hooks.wait_for("leg_ended", "c-1", "agent", "media_failure", timeout=3)
            await hooks.wait_for("phone_ended", "m-7", "media_failure", timeout=3)
        finally:
            await phone.stop()
        await wait_until(lambda: plane.ready and plane.worker_pids()[w1] != victim, 10, "worker restart")  # type: ignore[index]
        assert plane.stats()["worker_restarts"] == 1
        assert plane.legs("c-3") == {"agent"}
        assert not [e for e in hooks.events if e[0] == "leg_ended" and e[1] == "c-3"]
        # The next call works (on the restarted worker: the other one is full).
        procs.append(await start_sipp_leg(tmp_path, port, "c-4", "customer", AUDIO / "customer_1000.ulaw", 1000))
        await hooks.wait_for("leg_started", "c-4", "customer", timeout=5)
        assert plane.worker_of("c-4") == w1
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
            await p.wait()


async def test_leg_without_rtp_times_out(tmp_path: Path) -> None:
    require_pjsua2()
    hooks = FakeHooks({"c-1": "alice"})
    async with started_plane(tmp_path, hooks, sip_port=free_udp_block(2), sip_media_timeout=2.0) as plane:
        sip = RawSip()
        try:
            await raw_leg_call(sip, plane.settings.sip_port, "c-1", "agent")
            await hooks.wait_for("leg_started", "c-1", "agent", timeout=3)
            await hooks.wait_for("leg_ended", "c-1", "agent", "media_timeout", timeout=6)
            await wait_until(lambda: plane.stats()["conversations"] == 0, 2, "slots released")
        finally:
            sip.close()


@pytest.mark.parametrize("gw", [{"sip_hung_seconds": 2.0}], indirect=True)
async def test_hung_worker_is_killed_and_restarted(gw: tuple[SipPlane, FakeHooks]) -> None:
    plane, _hooks = gw
    victim = plane.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        await wait_until(lambda: plane.worker_pids()[0] != victim and plane.ready, 8, "hung worker replaced")
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert plane.stats()["worker_hung_kills"] == 1


@pytest.mark.parametrize("gw", [{"sip_reservation_seconds": 2.0}], indirect=True)
async def test_bad_input_gets_4xx_and_leaks_no_slot(gw: tuple[SipPlane, FakeHooks]) -> None:
    plane, hooks = gw
    port = plane.settings.sip_port
    sip = RawSip()
    hdr = {"X-Conversation-ID": "c-1", "X-Leg": "agent"}

    async def status(body: bytes = b"", ctype: str = "application/sdp", headers: dict[str, str] | None = None) -> int:
        data, _, _ = sip.invite(port, body=body, ctype=ctype, headers=hdr if headers is None else headers)
        code, _text = await sip.request(data, port)
        return code

    try:
        assert await status(sdp(audio=False)) == 488  # no audio
        assert await status(sdp("0 200")) == 400  # payload type > 127
        assert await status(sdp("18")) == 488  # no PCMU/PCMA
        assert await status(b"", "multipart/mixed;boundary=x") == 400  # empty multipart
        assert await status(b"--x\r\nno headers here", "multipart/mixed;boundary=x") == 400
        assert await status(b"garbage", "multipart/mixed") == 400  # no boundary
        body, ct = multipart(
            [("application/sdp", sdp(streams=2, labels=True)), ("application/rs-metadata+xml", b"<recording><oops")]
        )
        assert await status(body, ct, {"X-Conversation-ID": "c-1"}) == 400  # invalid XML
        bomb = (
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><recording>&b;</recording>'
        )
        body, ct = multipart([("application/sdp", sdp(streams=2, labels=True)), ("application/rs-metadata+xml", bomb)])
        assert await status(body, ct, {"X-Conversation-ID": "c-1"}) == 400  # entities refused
        body, ct = multipart(
            [
                ("application/sdp", sdp(streams=2, labels=True)),
                ("application/rs-metadata+xml", metadata("sip:zed@x", "sip:c@x", "c-1")),
            ]
        )
        assert await status(body, ct, {}) == 404  # the agent is not a participant
        assert await status(sdp(), headers={"X-Conversation-ID": "nope", "X-Leg": "agent"}) == 404
        assert await status(sdp(), headers={"X-Leg": "agent"}) == 404
        assert await status(sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "boss"}) == 400
        # ~64 KB, about the most one UDP datagram holds, is read whole (413 is for TCP beyond 64 KB).
        big = sdp() + b"a=x-pad:" + b"x" * (63 * 1024) + b"\r\n"
        assert await status(big, headers={"X-Conversation-ID": "nope", "X-Leg": "agent"}) == 404
        assert await status(sdp(), "text/plain") == 415
        # Straight to a worker (loopback only), without a placement token: refused by the main process.
        wport = plane.workers[0].sip_port
        code, _ = await sip.request(sip.invite(wport, body=sdp(), headers=hdr)[0], wport)
        assert code == 403
        forged = {**hdr, "X-Gateway-Placement": "t-made-up"}
        assert (await sip.request(sip.invite(wport, body=sdp(), headers=forged)[0], wport))[0] == 403
        await wait_until(lambda: plane.stats()["calls"] == 0, 3, "refused calls gone")
        # Garbage and truncated datagrams: no answer, no crash.
        for junk in (
            b"\x00\xff" * 100,
            b"INVITE",
            b"SIP/2.0 200 OK\r\n\r\n",
            b"INVITE sip:x SIP/2.0\r\nVia: x\r\n\r\n",
        ):
            sip.send(junk, port)
        data, _, _ = sip.invite(port, body=sdp(), headers=hdr)
        bad_len = data.replace(b"Content-Length: ", b"Content-Length: 9")
        assert (await sip.request(bad_len, port))[0] == 400
        # OPTIONS: 200, and 503 while draining (INVITEs too).
        opt, _, _ = sip.invite(port, method="OPTIONS")
        assert (await sip.request(opt, port))[0] == 200
        plane.set_draining(True)
        code, text = await sip.request(sip.invite(port, method="OPTIONS")[0], port)
        assert code == 503
        code, text = await sip.request(sip.invite(port, body=sdp(), headers=hdr)[0], port)
        assert code == 503 and "Retry-After:" in text
        plane.set_draining(False)
        await wait_until(
            lambda: plane.stats()["conversations"] == 0 and plane.stats()["reservations"] == 0, 12, "no slot held"
        )

        # A refusal never ACKed is retransmitted (timer G); the retransmitted INVITE gets the
        # same answer and is not decided again.
        mute = RawSip()
        try:
            data, _, _ = mute.invite(port, body=sdp(), headers={"X-Conversation-ID": "nope", "X-Leg": "agent"})
            code, text = await mute.request(data, port, ack=False)
            assert code == 404
            again = await mute.recv(1.5)
            assert again is not None and again.startswith(b"SIP/2.0 404"), "404 not retransmitted without ACK"
            invites = plane.stats()["front_invites"]
            mute.send(data, port)
            assert (await mute.recv(1.0) or b"").startswith(b"SIP/2.0 404")
            assert plane.stats()["front_invites"] == invites
        finally:
            mute.close()

        # Capacity: 2 workers x 4 calls = 2 per-leg conversations (3 calls each with the phone slot).
        # Each call is answered by its worker through the front: no redirect to follow.
        calls = {}
        for cid in ("c-1", "c-2"):
            calls[cid] = await raw_leg_call(sip, port, cid, "agent")
        assert plane.stats()["calls"] == 2 and plane.stats()["front_forwarded"] >= 2
        code, text = await sip.request(
            sip.invite(port, body=sdp(), headers={"X-Conversation-ID": "c-3", "X-Leg": "agent"})[0], port
        )
        assert code == 503 and "Retry-After:" in text
        assert (await sip.request(sip.invite(port, method="OPTIONS")[0], port))[0] == 503  # full
        # The same leg twice is refused, the other leg of c-1 is welcome on the same worker.
        code, _ = await sip.request(
            sip.invite(port, body=sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "agent"})[0], port
        )
        assert code == 486
        calls["c-1b"] = await raw_leg_call(sip, port, "c-1", "customer")
        await hooks.wait_for("leg_started", "c-1", "customer")
        assert plane.legs("c-1") == {"agent", "customer"}
        # BYE along the Record-Route set: through the front to the worker, 200 back.
        for invite, ok in calls.values():
            code, _ = await sip.request(in_dialog_request("BYE", invite, ok, 2), port)
            assert code == 200
        await wait_until(lambda: plane.stats()["conversations"] == 0, 4, "slots released")
        assert plane.ready and plane.stats()["front_malformed"] >= 1
    finally:
        sip.close()


async def test_call_phone_refusals(gw: tuple[SipPlane, FakeHooks]) -> None:
    plane, _hooks = gw
    with pytest.raises(GatewayError) as e:
        await plane.call_phone("c-1", "m-9", "sip:sam@127.0.0.1:5090")
    assert (e.value.status, e.value.code) == (409, "voice_not_active")
    for bad in ("tel:+1555", "sam@127.0.0.1", "sip:sam@bad host", "sip:<x>", "", "sip:sam@h:99999"):
        with pytest.raises(GatewayError) as e:
            await plane.call_phone("c-1", "m-9", bad)
        assert (e.value.status, e.value.code) == (422, "invalid_sip_uri"), bad
    await plane.hang_up_phone("nobody")  # idempotent on unknown monitors
    assert "pjsua2" not in sys.modules, "the main process must never import pjsua2"
    tap = plane.open_tap("c-9")
    tap.close()
    tap.close()
    with pytest.raises(EOFError):
        await tap.next_frame()


async def test_start_fails_when_sip_port_taken(tmp_path: Path) -> None:
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    try:
        plane = SipPlane(Settings(sip_port=s.getsockname()[1], data_dir=str(tmp_path)), FakeHooks())
        with pytest.raises(OSError):
            await plane.start()
        await plane.stop()
    finally:
        s.close()


def test_fixture_tones_are_distinct() -> None:
    for name, hz in (("agent_600", AGENT_HZ), ("customer_1000", CUSTOMER_HZ), ("phone_1500", PHONE_HZ)):
        x = read_ulaw(AUDIO / f"{name}.ulaw")
        lv = tone_levels(x, 8000, [AGENT_HZ, CUSTOMER_HZ, PHONE_HZ])
        assert lv[hz] > 0.99 and sorted(lv.values())[1] < 0.01, (name, lv)


async def test_tap_is_bounded_drop_oldest() -> None:
    from gateway.media.frames import LegFrame
    from gateway.sip.taps import Tap

    class _Plane:
        _tap_drops = 0

        def _tap_closed(self, tap: Tap) -> None:
            pass

    plane = _Plane()
    tap = Tap(plane, "c-1", maxsize=2)  # type: ignore[arg-type]
    z = np.zeros(160, dtype=np.int16)
    for i in range(5):
        tap._put(LegFrame("c-1", i, 8000, z, z))
    assert tap.dropped == 3 and plane._tap_drops == 3
    assert [(await tap.next_frame()).seq for _ in range(2)] == [3, 4]
    tap._finish()
    with pytest.raises(EOFError):
        await tap.next_frame()
