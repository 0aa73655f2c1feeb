"""The console's usability in headless Chromium against a real gateway on loopback (issue 12,
item 5): rows that can not be monitored say why and disable their button, durations tick, the
chat view never shows half a bubble at its top, the whole main flow works with the keyboard
only, axe-core finds no serious or critical violation, the quality badge grades what
``monitor_quality`` says, and the README's screenshot is taken here.

The SIP plane is the fake of tests/test_browser.py (600 Hz agent, 1000 Hz customer taps), so the
WebRTC path is real; tests/test_browser_phone.py covers listening on a real SIP phone.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.api.context import WHEP
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, axe_check, playwright_api
from tests.support import GatewayClient
from tests.test_browser import NO_MIC_SCRIPT, _sign_in, gateway_with_fake_sip

pytestmark = [pytest.mark.browser, pytest.mark.slow]

#: Where the screenshot goes besides tmp_path (make screenshot sets docs/console.png).
SCREENSHOT_ENV = "GATEWAY_CONSOLE_SCREENSHOT"

FOCUSED = """() => {
  const a = document.activeElement;
  if (!a || a === document.body) return null;
  const s = getComputedStyle(a);
  return { testid: a.dataset.testid || a.id || a.tagName, outline: s.outlineStyle, width: parseFloat(s.outlineWidth) || 0, shadow: s.boxShadow };
}"""

# Every bubble's box against the chat view's box (viewport coordinates).
CHAT_GEOMETRY = """() => {
  const log = document.querySelector("[data-testid='chat-log']");
  const box = log.getBoundingClientRect();
  const view = { top: box.top + log.clientTop, bottom: box.top + log.clientTop + log.clientHeight };
  const bubbles = [...log.querySelectorAll('.msg')].map((n) => {
    const r = n.getBoundingClientRect();
    return { top: r.top, bottom: r.bottom, text: n.textContent };
  });
  return { view, bubbles, scrollTop: log.scrollTop, max: log.scrollHeight - log.clientHeight };
}"""


async def tab_to(page: Any, testid: str, limit: int = 40, key: str = "Tab") -> None:
    """Press Tab until the element ``testid`` has the focus, and check it shows that it has."""
    path = []
    for _ in range(limit):
        await page.keyboard.press(key)
        focused = await page.evaluate(FOCUSED)
        path.append(focused and focused["testid"])
        if focused and focused["testid"] == testid:
            assert focused["outline"] != "none" and focused["width"] >= 2 or focused["shadow"] != "none", focused
            return
    raise AssertionError(f"{testid} never got the focus with {key}; went through {path}")


async def post(gw: GatewayClient, cid: str, sender: str, text: str) -> None:
    answer = await gw.call(
        "POST", f"/v1/conversations/{cid}/messages", await gw.platform(), {"from": sender, "text": text}
    )
    assert answer.status == 201, answer.body


async def settled(page: Any, timeout: float = 5.0) -> dict[str, Any]:
    """The chat view's geometry once scrolling (and the snap animation) has come to rest."""
    await page.wait_for_timeout(150)
    last = await page.evaluate(CHAT_GEOMETRY)
    for _ in range(int(timeout / 0.15)):
        await page.wait_for_timeout(150)
        now = await page.evaluate(CHAT_GEOMETRY)
        if now["scrollTop"] == last["scrollTop"]:
            return dict(now)
        last = now
    return dict(last)


def half_cut(geometry: dict[str, Any]) -> list[dict[str, Any]]:
    """Bubbles the view's top edge cuts through (1 px of rounding allowed)."""
    top = geometry["view"]["top"]
    return [b for b in geometry["bubbles"] if b["top"] < top - 1 and b["bottom"] > top + 1]


async def test_keyboard_only_monitoring_axe_and_screenshot(tmp_path: Path) -> None:
    """Sign in, monitor, whisper, barge in, message and leave with the keyboard alone; axe on the
    sign-in page and on the console with a monitor open; the README's screenshot."""
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        assert (await gw.conversation("c-1001")).status == 201
        assert (await gw.conversation("c-1002", sessions=["chat"], customer={"id": "k2", "name": "Bea"})).status == 201
        assert (
            await gw.conversation("c-1003", direction="outbound", customer={"id": "k3", "name": "Cy"})
        ).status == 201
        assert (await gw.conversation("c-1004", transferred=True, customer={"id": "k4", "name": "Dee"})).status == 201
        await post(gw, "c-1001", "customer", "Hello, my parcel has not arrived yet.")
        await post(gw, "c-1001", "agent", "Sorry to hear that! Can you give me the order number?")
        await post(gw, "c-1001", "customer", "It is 4711-22.")

        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1360, "height": 820})
                await page.add_init_script(NO_MIC_SCRIPT)
                await page.goto(gw.base_url + "/")
                await page.wait_for_selector("body[data-ready='true']")
                await axe_check(page, "sign-in")

                # --- sign in: Tab to the fields, type, Enter ----------------------------------
                await tab_to(page, "username")
                await page.keyboard.type("sam")
                await tab_to(page, "password")
                await page.keyboard.type("demo")
                await page.keyboard.press("Enter")
                await page.wait_for_selector("[data-testid='dashboard-view']", state="visible")
                await page.wait_for_selector("[data-testid='conv-row-c-1001']")
                await page.wait_for_selector("[data-testid='events-status']:has-text('live')")

                # --- where to listen: radio buttons take arrows, the address is typed and saved ------
                await page.wait_for_selector("[data-testid='listen-on'][data-loaded='true']")
                await tab_to(page, "listen-browser")
                await page.keyboard.press("ArrowRight")
                assert await page.is_checked("[data-testid='listen-phone']")
                await tab_to(page, "phone-uri")
                await page.keyboard.type("sip:sam@127.0.0.1:5999")
                await tab_to(page, "listen-phone", key="Shift+Tab")  # leaving the field saves it
                await page.wait_for_selector("[data-testid='phone-status']:has-text('Saved')")
                assert (await gw.call("GET", "/v1/me", await gw.login("sam"))).body[
                    "phone_uri"
                ] == "sip:sam@127.0.0.1:5999"
                await page.keyboard.press("ArrowLeft")  # back to this browser for the rest
                assert await page.is_checked("[data-testid='listen-browser']")
                assert await page.is_disabled("[data-testid='phone-uri']")

                # the disabled buttons are skipped by Tab: the first one Tab reaches is c-1001's
                await tab_to(page, "monitor-c-1001")
                label = await page.get_attribute("[data-testid='monitor-c-1001']", "aria-label")
                assert label and "c-1001" in label, label
                await page.keyboard.press("Enter")
                await page.wait_for_selector("[data-testid='monitor-panel']", state="visible")
                await page.wait_for_selector("[data-testid='voice-state'][data-state='connected']", timeout=15000)
                assert await page.evaluate("document.activeElement.id") == "monitor-title"  # focus moved to the panel
                await page.wait_for_selector("[data-testid='chat-entry'][data-sender='customer']")

                # --- whisper: the tab list takes arrows, the form Enter -------------------------
                await tab_to(page, "tab-chat")
                await page.keyboard.press("ArrowRight")
                assert await page.get_attribute("[data-testid='tab-whisper']", "aria-selected") == "true"
                assert await page.evaluate("document.activeElement.dataset.testid") == "tab-whisper"
                await tab_to(page, "whisper-input")
                await page.keyboard.type("offer a voucher")
                await page.keyboard.press("Enter")
                await page.wait_for_selector("[data-testid='chat-entry'][data-kind='whisper'][data-visibility='agent']")

                # --- barge in with Space, then a message with Enter ---------------------------
                await tab_to(page, "barge")
                await page.keyboard.press("Space")
                await page.wait_for_selector("[data-testid='monitor-mode']:has-text('barged')")
                assert await page.evaluate("document.activeElement.dataset.testid") == "message-input"
                await page.keyboard.type("Hello Ann, Sam here")
                await page.keyboard.press("Enter")
                await page.wait_for_selector(
                    "[data-testid='chat-entry'][data-sender='supervisor'][data-kind='message']"
                )

                # --- the quality badge's tooltip opens on focus (fed a monitor_quality event) --
                mid = await page.get_attribute("[data-testid='monitor-panel']", "data-monitor")
                await page.evaluate(
                    """(mid) => window.consoleEvents({type: 'monitor_quality', monitor: mid, conversation: 'c-1001',
                        quality: {added_latency_ms: 38, updated_at: Date.now() / 1000,
                                  legs: {agent: {loss_pct: 0, jitter_ms: 2.5, packets: 1510},
                                         customer: {loss_pct: 0.2, jitter_ms: 3.1, packets: 1507}}}})""",
                    mid,
                )
                await tab_to(page, "quality-badge", key="Shift+Tab")
                assert await page.is_visible("[data-testid='quality-tip']")
                await axe_check(page, "console with a monitor open")

                # --- the README's screenshot (after the clocks have ticked) -----------------------
                await page.wait_for_function(
                    "Number(document.querySelector(\"[data-testid='monitor-elapsed']\").dataset.seconds) >= 2"
                )
                await page.focus("[data-testid='quality-badge']")
                shot = tmp_path / "console.png"
                await page.screenshot(path=str(shot))
                png = shot.read_bytes()
                assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
                target = os.environ.get(SCREENSHOT_ENV)
                if target:
                    Path(target).write_bytes(png)

                # --- leave with Enter: the panel closes, the focus goes back to the row ---------
                await tab_to(page, "leave", key="Shift+Tab")
                await page.keyboard.press("Enter")
                await page.wait_for_selector("[data-testid='monitor-panel']", state="hidden")
                assert await page.evaluate("document.activeElement.dataset.testid") == "monitor-c-1001"
                for _ in range(50):
                    if not app[WHEP].get(mid):
                        break
                    await asyncio.sleep(0.1)
                assert not app[WHEP].get(mid)  # leaving by keyboard really left

                # --- sign out with the keyboard ---------------------------------------------------
                await tab_to(page, "logout", key="Shift+Tab")
                await page.keyboard.press("Enter")
                await page.wait_for_selector("[data-testid='login-view']", state="visible")
                assert await page.evaluate("window.__gum") == 0
            finally:
                await browser.close()


async def test_rows_say_why_durations_tick_chat_aligns_and_quality_grades(tmp_path: Path) -> None:
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        assert (await gw.conversation("c-in")).status == 201
        assert (await gw.conversation("c-out", direction="outbound")).status == 201
        assert (await gw.conversation("c-tr", transferred=True)).status == 201

        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.add_init_script(NO_MIC_SCRIPT)
                await _sign_in(page, gw.base_url, "sam")
                await page.wait_for_selector("[data-testid='conv-row-c-tr']")

                # --- outbound and transferred: disabled, and why, in the gateway's words -------
                for cid, code, words in (
                    ("c-out", "outbound_not_supported", "Outbound conversations can not be monitored."),
                    ("c-tr", "transferred_not_supported", "Transferred conversations can not be monitored."),
                ):
                    assert await page.is_disabled(f"[data-testid='monitor-{cid}']")
                    why = page.locator(f"[data-testid='why-not-{cid}']")
                    assert await why.get_attribute("data-code") == code
                    assert (await why.text_content() or "").strip() == words
                    # the button is described by the reason (screen readers read it with the button)
                    assert (
                        await page.get_attribute(f"[data-testid='monitor-{cid}']", "aria-describedby")
                        == f"why-not-{cid}"
                    )
                assert await page.is_enabled("[data-testid='monitor-c-in']")
                assert await page.locator("[data-testid='why-not-c-in']").count() == 0
                # the gateway agrees: the refusal the button spares the supervisor
                refused = await gw.monitor("sam", "c-out", {"kind": "webrtc"})
                assert refused.code == "outbound_not_supported"

                # --- how long each conversation has been going, ticking ------------------------
                duration = page.locator("[data-testid='conv-duration-c-in']")
                first = int(await duration.get_attribute("data-seconds") or "-1")
                await page.wait_for_function(
                    f"Number(document.querySelector(\"[data-testid='conv-duration-c-in']\").dataset.seconds) >= {first + 2}",
                    timeout=5000,
                )
                text = (await duration.text_content() or "").strip()
                assert text.count(":") == 1 and text.split(":")[1].isdigit(), text
                started = (await gw.call("GET", "/v1/conversations/c-in", await gw.login("sam"))).body[
                    "session_started"
                ]
                seconds_here = int(await duration.get_attribute("data-seconds") or "0")
                seconds_server = await page.evaluate("(t) => Date.now() / 1000 - t", min(started.values()))
                assert abs(seconds_here - seconds_server) <= 1.5, (seconds_here, seconds_server)

                # --- the monitor panel: how long sam has been listening ------------------------
                await page.click("[data-testid='monitor-c-in']")
                await page.wait_for_selector("[data-testid='monitor-panel']", state="visible")
                mid = await page.get_attribute("[data-testid='monitor-panel']", "data-monitor")
                monitor = (await gw.call("GET", f"/v1/monitors/{mid}", await gw.login("sam"))).body
                elapsed = page.locator("[data-testid='monitor-elapsed']")
                assert float(await elapsed.get_attribute("data-since") or 0) == pytest.approx(monitor["started_at"])
                await page.wait_for_function(
                    "Number(document.querySelector(\"[data-testid='monitor-elapsed']\").dataset.seconds) >= 2",
                    timeout=5000,
                )
                assert (await elapsed.text_content() or "").startswith("listening for 0:0")

                # --- the chat view after many messages of many sizes ----------------------------
                for i in range(45):
                    text = f"message {i} " + "lorem ipsum dolor sit amet " * (1 + (i * 7) % 9)
                    await post(gw, "c-in", "customer" if i % 2 else "agent", text)
                    await asyncio.sleep(0.06)  # the platform may post 20 a second
                await page.wait_for_selector("[data-testid='chat-entry']:has-text('message 44 ')")
                await page.wait_for_timeout(300)  # one layout pass after the last entry
                geometry = await page.evaluate(CHAT_GEOMETRY)
                assert geometry["max"] > 1000, geometry["max"]  # it does scroll: the check is not empty
                assert geometry["scrollTop"] >= geometry["max"] - 1  # following the newest
                newest = geometry["bubbles"][-1]
                assert "message 44 " in newest["text"], newest
                view = geometry["view"]
                assert newest["top"] >= view["top"] - 1 and newest["bottom"] <= view["bottom"] + 1, (newest, view)
                assert not half_cut(geometry), (half_cut(geometry), view)
                # the top edge of the view IS a bubble's top edge (not a gap either)
                assert any(abs(b["top"] - view["top"]) <= 1.5 for b in geometry["bubbles"]), (
                    view,
                    [(b["top"], b["bottom"]) for b in geometry["bubbles"] if abs(b["top"] - view["top"]) < 60],
                    geometry["scrollTop"],
                    geometry["max"],
                )

                # reading back with the mouse wheel: the view snaps to whole bubbles as well
                await page.hover("[data-testid='chat-log']")
                for delta in (-137, -251, -89):
                    await page.mouse.wheel(0, delta)
                    geometry = await settled(page)
                    assert not half_cut(geometry), (delta, half_cut(geometry), geometry["view"])
                assert geometry["scrollTop"] < geometry["max"] - 50  # it did scroll back
                # a new message while reading back does not yank the view ...
                before = geometry["scrollTop"]
                await post(gw, "c-in", "customer", "one more")
                await page.wait_for_selector("[data-testid='chat-entry']:has-text('one more')")
                await page.wait_for_timeout(300)
                assert abs((await page.evaluate(CHAT_GEOMETRY))["scrollTop"] - before) <= 1
                # ... and back at the end, the newest is followed again
                await page.evaluate("document.querySelector(\"[data-testid='chat-log']\").scrollTop = 1e9")
                await page.wait_for_timeout(300)
                await post(gw, "c-in", "agent", "and the last one, which is a little longer " * 3)
                await page.wait_for_selector("[data-testid='chat-entry']:has-text('and the last one')")
                await page.wait_for_timeout(300)
                geometry = await page.evaluate(CHAT_GEOMETRY)
                newest, view = geometry["bubbles"][-1], geometry["view"]
                assert "and the last one" in newest["text"] and newest["bottom"] <= view["bottom"] + 1, (newest, view)
                assert not half_cut(geometry)

                # --- the quality badge: hidden until measured, graded by the thresholds -----------
                badge = page.locator("[data-testid='quality-badge']")
                assert await badge.is_hidden()

                async def feed(quality: Any, monitor_id: str | None = None) -> None:
                    await page.evaluate(
                        "([mid, q]) => window.consoleEvents({type: 'monitor_quality', monitor: mid, conversation: 'c-in', quality: q})",
                        [monitor_id or mid, quality],
                    )

                def legs(loss: float, jitter: float) -> dict[str, Any]:
                    return {
                        "agent": {"loss_pct": 0.0, "jitter_ms": 1.0, "packets": 500},
                        "customer": {"loss_pct": loss, "jitter_ms": jitter, "packets": 498},
                    }

                for quality, level in (
                    ({"added_latency_ms": 40, "legs": legs(0.0, 2.0), "updated_at": 1.7e9}, "good"),
                    ({"added_latency_ms": 40, "legs": legs(1.5, 2.0), "updated_at": 1.7e9}, "fair"),
                    ({"added_latency_ms": 180, "legs": legs(0.0, 2.0), "updated_at": 1.7e9}, "fair"),
                    ({"added_latency_ms": 40, "legs": legs(0.0, 45.0), "updated_at": 1.7e9}, "fair"),
                    ({"added_latency_ms": 40, "legs": legs(7.0, 2.0), "updated_at": 1.7e9}, "poor"),
                    ({"added_latency_ms": 450, "legs": legs(0.0, 2.0), "updated_at": 1.7e9}, "poor"),
                    ({"added_latency_ms": None, "legs": legs(0.5, 2.0), "updated_at": 1.7e9}, "good"),
                ):
                    await feed(quality)
                    assert await badge.get_attribute("data-level") == level, quality
                    assert (await badge.text_content() or "").strip() == f"audio {level}"
                # the tooltip carries the figures, per leg, and opens on hover
                await feed(
                    {
                        "added_latency_ms": 42.4,
                        "legs": {"mixed": {"loss_pct": 0.25, "jitter_ms": 3.14, "packets": 1234}},
                        "updated_at": 1.7e9,
                    }
                )
                tip = page.locator("[data-testid='quality-tip']")
                assert await tip.is_hidden()
                await badge.hover()
                assert await tip.is_visible()
                lines = await page.locator("[data-testid='quality-line']").all_text_contents()
                assert lines[0] == "Added latency: 42 ms", lines
                assert lines[1] == "Both legs (mixed): loss 0.3 %, jitter 3.1 ms, 1234 packets", lines
                assert lines[2].startswith("Measured at "), lines
                # the gateway writes updated_at in ISO 8601
                await feed({"added_latency_ms": 12, "legs": legs(0, 1), "updated_at": "2026-12-02T09:30:00.123Z"})
                lines = await page.locator("[data-testid='quality-line']").all_text_contents()
                assert lines[-1].startswith("Measured at ") and "Invalid" not in lines[-1], lines
                # another monitor's figures are not this panel's; null hides the badge again
                await feed({"added_latency_ms": 999, "legs": legs(50, 500)}, monitor_id="m-someone-else")
                assert await badge.get_attribute("data-level") == "good"
                await feed(None)
                assert await badge.is_hidden()
                # the gateway's own monitor_updated carrying quality is rendered too
                await page.evaluate(
                    "(mid) => window.consoleEvents({type: 'monitor_updated', conversation: 'c-in', monitor: {id: mid, channels: ['chat', 'voice'], mode: 'silent', quality: {added_latency_ms: 20, legs: {agent: {loss_pct: 9, jitter_ms: 1, packets: 9}}}}})",
                    mid,
                )
                assert await badge.get_attribute("data-level") == "poor"
                await axe_check(page, "console, many messages, badge")
            finally:
                await browser.close()
