"""End to end through the HTTP API: platform PUTs a conversation, sipp sends both legs, a
supervisor's SIP phone monitor hears the mix, leaving hangs the phone up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.api.context import SIP

from .sip_support import (
    AUDIO,
    RawSip,
    free_udp_block,
    read_wav,
    require_pjsua2,
    require_tool,
    sdp,
    sip_gateway_settings,
    start_phone,
    start_sipp_leg,
    tone_levels,
    wait_until,
)
from .support import running_gateway

pytestmark = [pytest.mark.sip, pytest.mark.api]


async def test_sip_phone_monitor_through_the_api(tmp_path: Path) -> None:
    require_pjsua2()
    require_tool("sipp")
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port)
    async with running_gateway(settings) as gw:
        assert (await gw.conversation("conv-sip")).status in (200, 201)
        raw = RawSip()
        try:
            data, _, _ = raw.invite(sip_port, body=sdp(), headers={"X-Conversation-ID": "nope", "X-Leg": "agent"})
            assert (await raw.request(data, sip_port))[0] == 404
        finally:
            raw.close()
        agent = await start_sipp_leg(tmp_path, sip_port, "conv-sip", "agent", AUDIO / "agent_600.ulaw", 6000)
        customer = await start_sipp_leg(tmp_path, sip_port, "conv-sip", "customer", AUDIO / "customer_1000.ulaw", 6000)
        sam = await gw.login("sam")

        async def voice_on() -> bool:
            ans = await gw.call("GET", "/v1/conversations", sam)
            return any(c["id"] == "conv-sip" and c["sessions"]["voice"] for c in ans.body)

        # The PUT's sessions already say voice; wait for the SIP legs themselves.
        await wait_until(lambda: gw.app[SIP].legs("conv-sip") == {"agent", "customer"}, 10, "both legs")
        assert await voice_on()
        phone_port = free_udp_block(30, 40000, 59000)
        rec = tmp_path / "api_phone.wav"
        phone = await start_phone(phone_port, rec)
        try:
            ans = await gw.monitor("sam", "conv-sip", {"kind": "sip", "uri": f"sip:sam@127.0.0.1:{phone_port}"})
            assert ans.status == 201, ans.body
            assert "voice" in ans.body["channels"], ans.body.get("voice_blocked_reason")

            await phone.wait_line("CONNECTED", 5)
            await asyncio.sleep(1.5)
            t_leave = time.monotonic()
            assert (await gw.call("DELETE", f"/v1/monitors/{ans.body['id']}", sam)).status == 204
            t_disc = await phone.wait_line("DISCONNECTED", 3)
            assert t_disc - t_leave < 1.0
        finally:
            await phone.stop()
        heard, rate = read_wav(rec)
        levels = tone_levels(heard[-6000:], rate, [600.0, 1000.0])
        assert levels[600.0] > 0.3 and levels[1000.0] > 0.3, levels
        assert await agent.wait() == 0 and await customer.wait() == 0
        # The agent's BYE ends the voice session in the domain.
        t0 = time.monotonic()
        while await voice_on():
            assert time.monotonic() - t0 < 3, "voice still active after the legs hung up"
            await asyncio.sleep(0.1)
        assert gw.app[SIP].stats()["conversations"] == 0


async def test_phone_monitor_before_the_legs_then_busy_then_agent_left(tmp_path: Path) -> None:
    """Voice is on (the platform said so) before the SIP legs arrive: the phone monitor keeps
    the voice slot and its call is placed when the first leg connects. A second supervisor is
    refused while it listens; ``agent_left`` (R7) hangs the phone up within a second."""
    require_pjsua2()
    require_tool("sipp")
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port)
    async with running_gateway(settings) as gw:
        assert (await gw.conversation("early")).status == 201
        phone_port = free_udp_block(30, 40000, 59000)
        rec = tmp_path / "early_phone.wav"
        phone = await start_phone(phone_port, rec)
        try:
            ans = await gw.monitor("sam", "early", {"kind": "sip", "uri": f"sip:sam@127.0.0.1:{phone_port}"})
            assert ans.status == 201 and ans.body["channels"] == ["chat", "voice"], ans.body
            busy = await gw.monitor("tom", "early", {"kind": "sip", "uri": "sip:tom@127.0.0.1:5999"})
            assert (busy.status, busy.code) == (409, "voice_monitor_busy")

            agent = await start_sipp_leg(tmp_path, sip_port, "early", "agent", AUDIO / "agent_600.ulaw", 8000)
            customer = await start_sipp_leg(tmp_path, sip_port, "early", "customer", AUDIO / "customer_1000.ulaw", 8000)
            await phone.wait_line("CONNECTED", 5)
            await wait_until(lambda: gw.app[SIP].legs("early") == {"agent", "customer"}, 10, "both legs")
            await asyncio.sleep(1.5)
            t_event = time.monotonic()
            assert (await gw.event("early", "agent_left")).status == 202
            t_disc = await phone.wait_line("DISCONNECTED", 3)
            assert t_disc - t_event < 1.0
            state = await gw.call("GET", f"/v1/monitors/{ans.body['id']}", await gw.login("sam"))
            assert state.body["end_reason"] == "agent_left"
        finally:
            await phone.stop()
        heard, rate = read_wav(rec)
        levels = tone_levels(heard[-6000:], rate, [600.0, 1000.0])
        assert levels[600.0] > 0.3 and levels[1000.0] > 0.3, levels
        for leg in (agent, customer):  # sipp would play on for seconds: the test is done
            if leg.returncode is None:
                leg.kill()
            await leg.wait()
