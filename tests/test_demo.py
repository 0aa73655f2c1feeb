"""The ``make run`` demo carries live audio: its voice conversations get SIPREC legs from the
fixture speech (devtools/demo_legs.py), a supervisor's SIP phone hears them, the chat bots
talk, and stopping the gateway leaves no source process behind. ``demo-a1`` is forked on
demand: its legs exist only while a supervisor listens (the demo platform follows
``/v1/events`` with its token)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.api.context import SIP

from .sip_support import AUDIO, free_udp_block, median_correlation, read_wav, require_pjsua2, start_phone, wait_until
from .support import GatewayClient, make_settings, running_gateway

pytestmark = [pytest.mark.sip, pytest.mark.slow]


def _our_sources(cid: str | None = None) -> list[int]:
    """Source processes started for this test process (they carry ``--parent-pid <us>``)."""
    me = str(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "devtools.siprec_source" in args and "--parent-pid" in args and args[args.index("--parent-pid") + 1] == me:
            if cid is None or any(a.startswith(f"{cid}:") for a in args):
                pids.append(int(entry.name))
    return pids


async def _legs(gw: GatewayClient, token: str, cid: str) -> list[str]:
    ans = await gw.call("GET", "/v1/conversations", token)
    assert ans.status == 200, ans.body
    return next((c.get("voice_legs", []) for c in ans.body if c["id"] == cid), [])


async def _chat_entries(gw: GatewayClient, mid: str, token: str, timeout: float) -> list[dict[str, Any]]:
    """Entries of the monitor's chat mirror until both bots have spoken (or ``timeout``)."""
    ws = await gw.http.ws_connect(
        gw.ws_url(f"/v1/monitors/{mid}/chat?after=0"), headers={"Authorization": f"Bearer {token}"}
    )
    entries: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while {"agent", "customer"} - {e.get("sender") for e in entries}:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = await ws.receive(timeout=left)
            except TimeoutError:
                break
            if msg.type.name != "TEXT":
                break
            frame = json.loads(msg.data)
            if frame.get("type") == "entry" and frame.get("kind") == "message":
                entries.append(frame)
    finally:
        await ws.close()
    return entries


async def test_demo_voice_reaches_a_sip_phone_and_bots_chat(tmp_path: Path) -> None:
    require_pjsua2()
    t_start = time.monotonic()
    settings = make_settings(
        tmp_path, enable_sip=True, demo=True, sip_port=free_udp_block(3), sip_workers=2,
        rtp_port_base=free_udp_block(80, 30000, 39000),
    )  # fmt: skip
    async with running_gateway(settings) as gw:
        sam = await gw.login("sam")
        plane = gw.app[SIP]
        await wait_until(lambda: plane.legs("demo-b1") == {"agent", "customer"}, 20, "demo-b1's legs")
        t_legs = time.monotonic() - t_start
        # demo-a1 is forked on demand: nobody listens, so no legs (its source process idles)
        await wait_until(lambda: len(_our_sources()) == 2, 5, "an always and an on-demand source process")
        await asyncio.sleep(1.0)
        assert await _legs(gw, sam, "demo-a1") == []
        a1 = await gw.call("GET", "/v1/conversations/demo-a1", sam)
        assert (a1.body["fork"], a1.body["fork_requested"], a1.body["sessions"]["voice"]) == ("on_demand", None, True)

        phone_port = free_udp_block(30, 40000, 59000)
        rec = tmp_path / "demo_phone.wav"
        phone = await start_phone(phone_port, rec)
        try:
            ans = await gw.monitor("sam", "demo-a1", {"kind": "sip", "uri": f"sip:sam@127.0.0.1:{phone_port}"})
            assert ans.status == 201, ans.body
            assert "voice" in ans.body["channels"], ans.body.get("voice_blocked_reason")
            assert ans.body["voice_pending"] is True, ans.body  # the fork was asked for
            mid = ans.body["id"]
            await phone.wait_line("CONNECTED", 5)
            t_heard = time.monotonic()
            assert sorted(await _legs(gw, sam, "demo-a1")) == ["agent", "customer"]
            assert (await gw.call("GET", f"/v1/monitors/{mid}", sam)).body["voice_pending"] is False
            entries = await _chat_entries(gw, mid, sam, 12)
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - t_heard)))  # at least 5 s of audio
            assert (await gw.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
            await phone.wait_line("DISCONNECTED", 3)
            # released: the demo platform hangs its fork up (BYE)
            await wait_until(lambda: not plane.legs("demo-a1"), 5, "demo-a1's fork hung up")
        finally:
            await phone.stop()
        senders = {e.get("sender") for e in entries}
        assert {"agent", "customer"} <= senders, entries

        heard, rate = read_wav(rec)
        assert rate == 8000 and len(heard) > 4 * rate, len(heard)
        heard = heard[rate // 2 :]  # skip the jitter buffer's start
        rms = float(np.sqrt(np.mean(heard**2)))
        assert rms > 300, f"phone heard near silence (RMS {rms:.0f})"
        agent_ref, _ = read_wav(AUDIO / "agent_speech.wav")
        customer_ref, _ = read_wav(AUDIO / "customer_speech.wav")
        # The phone hears the mix of both looping legs; each piece matches one reference well
        # where that speaker is louder, so take the better of the two.
        corr = max(median_correlation(heard, agent_ref), median_correlation(heard, customer_ref))
        assert corr > 0.5, f"recording does not look like the fixture speech (corr {corr:.2f})"

        # A gateway worker dies without BYE (legs end with media_failure): the source's probe
        # notices and re-dials; the restarted worker takes the conversation again.
        sources = _our_sources("demo-b1")
        assert len(sources) == 1, sources
        index = plane.worker_of("demo-b1")
        assert index is not None
        os.kill(plane.workers[index].proc.pid, 9)
        await wait_until(lambda: plane.legs("demo-b1") != {"agent", "customer"}, 5, "demo-b1's legs end")
        t_kill = time.monotonic()
        await wait_until(lambda: plane.legs("demo-b1") == {"agent", "customer"}, 15, "demo-b1 re-dialled")
        t_back = time.monotonic() - t_kill
        assert _our_sources("demo-b1") == sources, "the source process itself kept running"

        # The source process dies: DemoLegs starts another one (its legs come back once the
        # gateway's media timeout has ended the orphaned ones; not waited for here).
        os.kill(sources[0], 9)
        await wait_until(
            lambda: bool(_our_sources("demo-b1")) and _our_sources("demo-b1") != sources, 5, "a new source process"
        )
    # The gateway stopped: DemoLegs.stop() ended every source process (no orphans).
    await wait_until(lambda: not _our_sources(), 3, "source processes gone")
    print(
        f"legs after {t_legs:.1f}s, rms {rms:.0f}, corr {corr:.2f}, back after worker kill {t_back:.1f}s, total {time.monotonic() - t_start:.1f}s"
    )
