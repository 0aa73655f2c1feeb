"""The supervisor console in headless Chromium against a real gateway on loopback.

The gateway runs with its embedded identity provider; the SIP plane is replaced by a fake
one whose taps play 600 Hz on the agent leg and 1000 Hz on the customer leg, so the whole
WebRTC path (console -> WHEP -> aiortc -> Chromium) is real. Playwright drives the Debian
Chromium (never a downloaded browser).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devtools.fake_taps import PollableToneTap
from gateway.api.context import SIP, WHEP
from gateway.app import create_app, make_runner
from tests.support import GatewayClient, _wait_ready, make_settings

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, monitor_in_console, playwright_api  # noqa: E402

# Counts getUserMedia calls: the console must never ask for the microphone.
NO_MIC_SCRIPT = """
window.__gum = 0;
if (navigator.mediaDevices) {
  navigator.mediaDevices.getUserMedia = async () => { window.__gum += 1; throw new DOMException('blocked by test', 'NotAllowedError'); };
}
"""


class FakeSipPlane:
    """The part of the SIP plane the control plane uses for WebRTC listening."""

    ready = True

    def __init__(self) -> None:
        self.taps: list[PollableToneTap] = []

    def open_tap(self, cid: str, maxsize: int = 50) -> PollableToneTap:
        tap = PollableToneTap(cid, capacity=maxsize)
        self.taps.append(tap)
        return tap

    async def hang_up_phone(self, mid: str) -> None:
        return None

    def stats(self) -> dict[str, float]:
        return {}

    def __getattr__(self, name: str) -> Any:  # anything else the wiring may call: a no-op
        def noop(*args: Any, **kwargs: Any) -> None:
            return None

        return noop


@asynccontextmanager
async def gateway_with_fake_sip(tmp_path: Path) -> AsyncIterator[tuple[GatewayClient, web.Application, FakeSipPlane]]:
    settings = make_settings(tmp_path, ice_host_addresses="127.0.0.1")
    app = create_app(settings)
    sip = FakeSipPlane()
    app[SIP] = sip
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            client = GatewayClient(settings.base_url, settings.base_url, http, settings.realm, app)
            await _wait_ready(client)
            yield client, app, sip
    finally:
        await runner.cleanup()


async def _sign_in(page: Any, base_url: str, user: str) -> None:
    await page.goto(base_url + "/")
    await page.wait_for_selector("body[data-ready='true']")
    await page.fill("#username", user)
    await page.fill("#password", "demo")
    await page.click("#login-submit")
    await page.wait_for_selector("[data-testid='dashboard-view']", state="visible")


async def _audio_energy(page: Any) -> float:
    return float(
        await page.evaluate(
            """async () => {
                const m = window.consoleState.monitor;
                if (!m || !m.voice) return 0;
                const s = await m.voice.stats();
                return s ? (s.totalAudioEnergy || 0) : 0;
            }"""
        )
    )


async def test_console_monitor_listen_whisper_barge_and_agent_left(tmp_path: Path) -> None:
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        assert (await gw.conversation("c-b1")).status == 201
        assert (
            await gw.call(
                "POST",
                "/v1/conversations/c-b1/messages",
                await gw.platform(),
                {"from": "customer", "text": "My parcel is late", "client_id": "u1"},
            )
        ).status == 201

        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                sam = await browser.new_page()
                await sam.add_init_script(NO_MIC_SCRIPT)
                await _sign_in(sam, gw.base_url, "sam")
                await sam.wait_for_selector("[data-testid='conv-row-c-b1']")
                assert await sam.get_attribute("[data-testid='session-voice-c-b1']", "data-active") == "true"

                # Monitor: voice over WebRTC (recvonly WHEP) + the chat mirror.
                await sam.click("[data-testid='monitor-c-b1']")
                await sam.wait_for_selector("[data-testid='monitor-panel']", state="visible")
                await sam.wait_for_selector("[data-testid='voice-state'][data-state='connected']", timeout=15000)
                await sam.wait_for_selector("[data-testid='chat-entry'][data-sender='customer']")
                await sam.wait_for_selector("[data-testid='monitored-c-b1']")  # the eye icon
                assert "sam" in (await sam.text_content("[data-testid='monitored-by-c-b1']") or "")

                # Audio arrives (Chromium's own statistics) and the meters move per leg.
                for _ in range(50):
                    if await _audio_energy(sam) > 0:
                        break
                    await asyncio.sleep(0.1)
                assert await _audio_energy(sam) > 0
                await sam.wait_for_function(
                    "Number(document.getElementById('meter-agent').dataset.dbfs) > -30", timeout=5000
                )
                await sam.wait_for_function(
                    "Number(document.getElementById('meter-customer').dataset.dbfs) > -30", timeout=5000
                )

                # Receive-only: no microphone asked for, nothing sent back to the gateway.
                assert await sam.evaluate("window.__gum") == 0
                mid = await sam.get_attribute("[data-testid='monitor-panel']", "data-monitor")
                sessions = list(app[WHEP].get(mid, {}).values())
                assert len(sessions) == 1
                assert sessions[0].state == "connected"
                assert sessions[0].inbound_rtp_packets == 0

                # A second supervisor of the team is refused voice, in plain words.
                tom = await browser.new_page()
                await tom.add_init_script(NO_MIC_SCRIPT)
                await _sign_in(tom, gw.base_url, "tom")
                await tom.wait_for_selector("[data-testid='monitored-c-b1']")
                await tom.click("[data-testid='monitor-c-b1']")
                await tom.wait_for_selector("[data-testid='error-banner']", state="visible")
                assert await tom.get_attribute("[data-testid='error-banner']", "data-code") == "voice_monitor_busy"
                assert "Another supervisor is already listening to this call" in (
                    await tom.text_content("[data-testid='error-text']") or ""
                )
                # ... and may follow the chat instead (R8: chat may have several monitors).
                await tom.click("[data-testid='monitor-chat-only']")
                await tom.wait_for_selector("[data-testid='monitor-panel']", state="visible")
                assert await tom.get_attribute("[data-testid='monitor-channels']", "data-channels") == "chat"
                assert await tom.is_hidden("[data-testid='voice-box']")
                await tom.wait_for_selector("[data-testid='chat-entry'][data-sender='customer']")

                # Whisper, then barge-in and a message to the conversation.
                await sam.click("[data-testid='tab-whisper']")
                await sam.fill("[data-testid='whisper-input']", "offer a voucher")
                await sam.click("[data-testid='whisper-send']")
                await sam.wait_for_selector("[data-testid='chat-entry'][data-kind='whisper'][data-visibility='agent']")
                await sam.click("[data-testid='barge']")
                await sam.wait_for_selector("[data-testid='monitor-mode']:has-text('barged')")
                await sam.fill("[data-testid='message-input']", "Hello Ann, Sam here")
                await sam.click("[data-testid='message-send']")
                await sam.wait_for_selector("[data-testid='chat-entry'][data-sender='supervisor'][data-kind='message']")

                # The agent leaves: the monitor ends, the console says why and stops the audio.
                assert (await gw.event("c-b1", "agent_left")).status == 202
                await sam.wait_for_selector(
                    "[data-testid='monitor-ended'][data-reason='agent_left']", state="visible", timeout=5000
                )
                assert "agent left" in (await sam.text_content("[data-testid='monitor-ended']") or "").lower()
                await tom.wait_for_selector(
                    "[data-testid='monitor-ended'][data-reason='agent_left']", state="visible", timeout=5000
                )
                await sam.wait_for_selector("[data-testid='voice-state'][data-state='stopped']")
                for _ in range(50):
                    if all(s.closed for s in sessions):
                        break
                    await asyncio.sleep(0.1)
                assert all(s.closed for s in sessions)
                assert all(t.closed for t in sip.taps)
            finally:
                await browser.close()


async def test_console_leave_releases_voice_and_shows_refusals(tmp_path: Path) -> None:
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        assert (await gw.conversation("c-b2")).status == 201
        assert (await gw.conversation("c-b3", direction="outbound")).status == 201
        assert (await gw.conversation("c-b4", agent="bob")).status == 201  # team-b: not sam's

        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                sam = await browser.new_page()
                await _sign_in(sam, gw.base_url, "sam")
                await sam.wait_for_selector("[data-testid='conv-row-c-b2']")
                assert await sam.locator("[data-testid='conv-row-c-b4']").count() == 0  # other team

                # outbound: the button is disabled and the row says why (tests/test_browser_console.py)
                assert await sam.is_disabled("[data-testid='monitor-c-b3']")
                assert await sam.get_attribute("[data-testid='why-not-c-b3']", "data-code") == "outbound_not_supported"
                assert "Outbound conversations can not be monitored" in (
                    await sam.text_content("[data-testid='why-not-c-b3']") or ""
                )

                mid = await monitor_in_console(sam, "c-b2")
                assert app[WHEP].get(mid)

                await sam.click("[data-testid='leave']")
                await sam.wait_for_selector("[data-testid='monitor-panel']", state="hidden")
                for _ in range(50):
                    if not app[WHEP].get(mid):
                        break
                    await asyncio.sleep(0.1)
                assert not app[WHEP].get(mid)  # DELETE of the WHEP location and of the monitor
                await sam.wait_for_selector("[data-testid='monitored-c-b2']", state="detached")
                # The voice slot is free again: tom can listen now.
                tom = await browser.new_page()
                await _sign_in(tom, gw.base_url, "tom")
                tom_mid = await monitor_in_console(tom, "c-b2")
                # Closing or reloading the tab is leaving too (R12): voice and monitor end.
                await tom.reload()
                for _ in range(50):
                    listed = (await gw.call("GET", "/v1/conversations", await gw.login("sam"))).body
                    if not app[WHEP].get(tom_mid) and not next(c for c in listed if c["id"] == "c-b2")["monitored"]:
                        break
                    await asyncio.sleep(0.1)
                assert not app[WHEP].get(tom_mid)
                assert not next(c for c in listed if c["id"] == "c-b2")["monitored"]
            finally:
                await browser.close()


@pytest.mark.parametrize("codec", ["opus", "pcmu"])
async def test_console_hears_the_batched_sender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str) -> None:
    """The batched media path (gateway.media.batch) plays in Chromium, Opus and PCMU."""
    import functools

    import gateway.api.whep_routes as whep_routes
    from gateway.media.whep import answer_whep

    monkeypatch.setattr(whep_routes, "answer_whep", functools.partial(answer_whep, batch=True, codec=codec))
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        assert (await gw.conversation("c-b5")).status == 201
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                sam = await browser.new_page()
                await _sign_in(sam, gw.base_url, "sam")
                mid = await monitor_in_console(sam, "c-b5")
                (session,) = app[WHEP][mid].values()
                assert session.track.mode == "batch" and session.track.codec == codec
                for _ in range(50):
                    if await _audio_energy(sam) > 0:
                        break
                    await asyncio.sleep(0.1)
                assert await _audio_energy(sam) > 0
                await sam.wait_for_function(
                    "Number(document.getElementById('meter-customer').dataset.dbfs) > -30", timeout=5000
                )
                get_stats = "async () => { const s = await window.consoleState.monitor.voice.stats(); return {lost: s.packetsLost, got: s.packetsReceived}; }"
                for _ in range(50):
                    stats = await sam.evaluate(get_stats)
                    if stats["got"] >= 50:
                        break
                    await asyncio.sleep(0.1)
                assert stats["got"] >= 50 and stats["lost"] == 0
                await sam.click("[data-testid='leave']")
                await sam.wait_for_selector("[data-testid='monitor-panel']", state="hidden")
                assert session.closed
            finally:
                await browser.close()
