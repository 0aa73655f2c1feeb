"""Listening on a SIP phone, chosen in the console (issue 12, item 3), against the REAL SIP plane.

sipp carries 600 Hz (agent) and 1000 Hz (customer) into the gateway; a real pjsua2 phone
(devtools/sip_phone.py, sending a 1500 Hz tone of its own) plays the supervisor's desk phone.
In headless Chromium, sam picks "my phone", types its SIP address and clicks Monitor: the
phone rings, answers, and must hear both legs' tones, while the phone's own tone reaches
neither leg; the panel's quality badge shows the gateway's own figures for that phone path
(``quality`` of ``GET /v1/monitors/{mid}``, pushed as ``monitor_quality``). The address is remembered by the gateway per username: a fresh browser (no local
storage) signed in as sam finds it pre-filled; tom, of the same team, does not see it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.api.context import SIP

from .browser_support import CHROMIUM, CHROMIUM_ARGS, playwright_api
from .sip_support import (
    AUDIO,
    assert_phone_heard,
    collect,
    free_udp_block,
    require_pjsua2,
    require_tool,
    sip_gateway_settings,
    start_phone,
    start_sipp_leg,
    stop_processes,
    tone_levels,
    wait_until,
)
from .support import GatewayClient, running_gateway
from .test_browser import NO_MIC_SCRIPT, _sign_in

pytestmark = [pytest.mark.browser, pytest.mark.sip, pytest.mark.slow]

CID = "c-phone-browser"
AGENT_HZ, CUSTOMER_HZ, PHONE_HZ = 600.0, 1000.0, 1500.0
SIPP_MS = 90_000  # longer than the test; the test ends the legs


async def test_console_rings_my_phone_and_remembers_it(tmp_path: Path) -> None:
    require_pjsua2()
    require_tool("sipp")
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, ice_host_addresses="127.0.0.1")
    legs: list[asyncio.subprocess.Process] = []
    async with running_gateway(settings) as gw:
        try:
            assert (await gw.conversation(CID)).status == 201
            legs.append(await start_sipp_leg(tmp_path, sip_port, CID, "agent", AUDIO / "agent_600.ulaw", SIPP_MS))
            legs.append(
                await start_sipp_leg(tmp_path, sip_port, CID, "customer", AUDIO / "customer_1000.ulaw", SIPP_MS)
            )
            await wait_until(lambda: gw.app[SIP].legs(CID) == {"agent", "customer"}, 10, "both sipp legs")
            phone_port = free_udp_block(30, 40000, 59000)
            record = tmp_path / "desk_phone.wav"
            phone = await start_phone(phone_port, record, "--tone", str(int(PHONE_HZ)))
            try:
                frames = await _console_flow(gw, phone, f"sip:sam@127.0.0.1:{phone_port}")
            finally:
                await phone.stop()  # the recording is a whole WAV file once the phone stops
            _check_audio(record, frames)
        finally:
            await stop_processes(legs)


async def _console_flow(gw: GatewayClient, phone: Any, uri: str) -> list[Any]:
    """The console part; returns 2 s of what the legs carried while the phone listened."""
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # --- sam chooses the phone and types its address ---------------------------------
            sam_context = await browser.new_context()
            sam = await sam_context.new_page()
            await sam.add_init_script(NO_MIC_SCRIPT)
            await _sign_in(sam, gw.base_url, "sam")
            await sam.wait_for_selector(f"[data-testid='conv-row-{CID}']")
            await sam.wait_for_selector("[data-testid='listen-on'][data-loaded='true']")
            assert await sam.input_value("[data-testid='phone-uri']") == ""  # nothing remembered yet
            assert await sam.is_disabled("[data-testid='phone-uri']")  # the browser is the default
            await sam.check("[data-testid='listen-phone']")
            await sam.fill("[data-testid='phone-uri']", "tel:+33 1 23")  # not a SIP address
            await sam.click(f"[data-testid='monitor-{CID}']")
            await sam.wait_for_selector("[data-testid='error-banner'][data-code='invalid_sip_uri']", state="visible")
            assert await sam.get_attribute("[data-testid='phone-uri']", "aria-invalid") == "true"
            assert await sam.is_hidden("[data-testid='monitor-panel']")  # no monitor was asked for
            await sam.fill("[data-testid='phone-uri']", uri)

            # --- Monitor: the gateway rings the phone; the page plays nothing ------------------
            tap = gw.app[SIP].open_tap(CID)  # what the legs carry, to check the phone's tone is not in it
            await sam.click(f"[data-testid='monitor-{CID}']")
            await sam.wait_for_selector("[data-testid='monitor-panel']", state="visible")
            await sam.wait_for_selector("[data-testid='voice-state'][data-state='phone']")
            assert uri in (await sam.text_content("[data-testid='voice-state']") or "")
            assert await sam.is_hidden("#meters")
            mid = await sam.get_attribute("[data-testid='monitor-panel']", "data-monitor")
            monitor = (await gw.call("GET", f"/v1/monitors/{mid}", await gw.login("sam"))).body
            assert monitor["voice"] == {"kind": "sip", "uri": uri} and "voice" in monitor["channels"], monitor
            await phone.wait_line("CONNECTED", 5)
            connected = next(text for _, text in phone.lines if text.startswith("CONNECTED"))
            assert "dir=2 " in connected, f"the phone's media should be receive-only: {connected}"
            frames = await collect(tap, 2.0)
            tap.close()

            # --- the quality badge: the gateway's own figures for this phone path -----------------
            badge = sam.locator("[data-testid='quality-badge']")
            await sam.wait_for_selector("[data-testid='quality-badge'][data-level]:not([data-level=''])", timeout=10000)
            quality = (await gw.call("GET", f"/v1/monitors/{mid}", await gw.login("sam"))).body["quality"]
            assert quality and set(quality["legs"]) == {"agent", "customer"}, quality
            assert await badge.get_attribute("data-level") in ("good", "fair", "poor")
            await badge.hover()
            lines = await sam.locator("[data-testid='quality-line']").all_text_contents()
            assert lines[0].startswith("Added latency: ") and lines[0].endswith(" ms"), lines
            assert lines[1].startswith("Agent: loss ") and lines[2].startswith("Customer: loss "), lines
            assert lines[-1].startswith("Measured at "), lines
            # on loopback with steady sipp legs nothing is lost: the figures say so
            assert all(leg["loss_pct"] == 0 for leg in quality["legs"].values()), quality
            assert "loss 0.0 %" in lines[1] and "loss 0.0 %" in lines[2], lines
            assert await sam.evaluate("window.__gum") == 0
            assert await sam.evaluate("document.getElementById('monitor-audio').srcObject") is None

            # --- Leave hangs the phone up ---------------------------------------------------------
            t_leave = time.monotonic()
            await sam.click("[data-testid='leave']")
            t_bye = await phone.wait_line("DISCONNECTED", 3)
            assert t_bye - t_leave < 2.0
            await sam.wait_for_selector("[data-testid='monitor-panel']", state="hidden")

            # --- remembered by the gateway, per username ---------------------------------------
            me = await gw.call("GET", "/v1/me", await gw.login("sam"))
            assert me.body["phone_uri"] == uri, me.body
            await sam.reload()
            await sam.wait_for_selector("[data-testid='dashboard-view']", state="visible")
            await sam.wait_for_function(f"document.getElementById('phone-uri').value === {uri!r}")
            assert await sam.is_checked("[data-testid='listen-phone']")  # this browser's choice
            # a fresh browser (no storage of the first): the address comes from the server
            elsewhere = await (await browser.new_context()).new_page()
            await _sign_in(elsewhere, gw.base_url, "sam")
            await elsewhere.wait_for_function(f"document.getElementById('phone-uri').value === {uri!r}")
            assert await elsewhere.is_checked("[data-testid='listen-browser']")
            assert "Remembered" in (await elsewhere.text_content("[data-testid='phone-status']") or "")
            # tom (same team) does not see sam's phone
            tom = await (await browser.new_context()).new_page()
            await _sign_in(tom, gw.base_url, "tom")
            await tom.wait_for_selector("[data-testid='listen-on'][data-loaded='true']")  # GET /v1/me answered
            assert await tom.input_value("[data-testid='phone-uri']") == ""
            assert (await gw.call("GET", "/v1/me", await gw.login("tom"))).body["phone_uri"] is None
        finally:
            await browser.close()
    return frames


def _check_audio(record: Path, frames: list[Any]) -> None:
    # --- what the phone heard: both legs, and not its own tone --------------------------------
    assert_phone_heard(record, [AGENT_HZ, CUSTOMER_HZ], [PHONE_HZ])
    # ... and the legs carried no trace of the phone's tone (receive-only toward the call)
    assert len(frames) >= 50, f"only {len(frames)} tap frames in 2 s"
    a = np.concatenate([f.agent for f in frames]).astype(float)
    c = np.concatenate([f.customer for f in frames]).astype(float)
    la = tone_levels(a, 8000, [AGENT_HZ, CUSTOMER_HZ, PHONE_HZ])
    lc = tone_levels(c, 8000, [AGENT_HZ, CUSTOMER_HZ, PHONE_HZ])
    assert la[AGENT_HZ] > 0.9 and la[PHONE_HZ] < 0.01, la
    assert lc[CUSTOMER_HZ] > 0.9 and lc[PHONE_HZ] < 0.01, lc
