"""The console works whichever instance serves it (issue 10): Chromium signs in on B's console
through A's embedded identity provider (single sign-on; the code exchanged cross-origin: CORS), monitors a conversation whose
legs (sipp, 600 Hz agent / 1000 Hz customer) are on A, and hears them: B forwards the monitor
command and the WHEP offer to A, and A's levels reach B's event stream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from devtools.redis_server import RedisServer
from tests.sip_support import require_tool
from tests.support import GatewayClient
from tests.test_cluster import _both, cluster, start_legs, until

pytestmark = [pytest.mark.browser, pytest.mark.sip, pytest.mark.slow]

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, playwright_api  # noqa: E402


async def test_console_on_one_instance_listens_to_media_on_the_other(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    require_tool("sipp")
    async with cluster(tmp_path, redis_server, redis_prefix, ice_host_addresses="127.0.0.1") as (a, b):
        assert (await a.client.conversation("cw")).status == 201
        legs = await start_legs(tmp_path, a.sip_port, "cw", 20)
        try:
            await until(lambda: _both(b.client, "cw"), 10, "both legs up on A")
            async with playwright_api.async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page()
                    failed: list[str] = []
                    page.on("requestfailed", lambda r: failed.append(r.url))
                    await page.goto(b.url + "/")
                    await page.wait_for_selector("body[data-ready='true']")
                    # single sign-on at A's provider; the code is exchanged from B's origin (CORS)
                    await page.click("[data-testid='sso-button']")
                    await page.wait_for_url(
                        re.compile(rf"^{re.escape(a.url)}/realms/cx/protocol/openid-connect/auth\?")
                    )
                    await page.fill("input[name='username']", "sam")
                    await page.fill("input[name='password']", "demo")
                    await page.click("button[type='submit']")
                    await page.wait_for_selector("[data-testid='dashboard-view']", state="visible")
                    assert page.url.startswith(b.url)
                    await page.wait_for_selector("[data-testid='conv-row-cw']")
                    await page.click("[data-testid='monitor-cw']")
                    await page.wait_for_selector("[data-testid='monitor-panel']", state="visible")
                    await page.wait_for_selector("[data-testid='voice-state'][data-state='connected']", timeout=15000)
                    energy = 0.0
                    for _ in range(50):
                        energy = float(
                            await page.evaluate(
                                """async () => {
                                    const m = window.consoleState.monitor;
                                    const s = m && m.voice ? await m.voice.stats() : null;
                                    return s ? (s.totalAudioEnergy || 0) : 0;
                                }"""
                            )
                        )
                        if energy > 0:
                            break
                        await asyncio.sleep(0.1)
                    assert energy > 0
                    # each leg's level, measured on A, reaches the console through B's events
                    for meter in ("meter-agent", "meter-customer"):
                        await page.wait_for_function(
                            f"Number(document.getElementById('{meter}').dataset.dbfs) > -30", timeout=5000
                        )
                    assert not failed, failed
                    mid = await page.get_attribute("[data-testid='monitor-panel']", "data-monitor")
                    await page.click("[data-testid='leave']")
                    await page.wait_for_selector("[data-testid='monitor-panel']", state="hidden")
                    sam = await b.client.login("sam")
                    ended = await until(lambda: _ended(b.client, sam, str(mid)), 5, "the monitor to end through B")
                    assert ended["end_reason"] == "left"
                    # the voice slot is free again (on A, where the forwarded monitor held it)
                    tom = await a.client.monitor("tom", "cw", {"kind": "webrtc"})
                    assert tom.status == 201 and tom.body["channels"] == ["chat", "voice"], tom.body
                finally:
                    await browser.close()
        finally:
            for leg in legs:
                if leg.returncode is None:
                    leg.kill()
                await leg.wait()


async def _ended(gw: GatewayClient, token: str, mid: str) -> dict[str, Any] | None:
    answer = await gw.call("GET", f"/v1/monitors/{mid}", token)
    return dict(answer.body) if answer.status == 200 and answer.body["ended_at"] else None
