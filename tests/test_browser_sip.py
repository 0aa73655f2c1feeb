"""The supervisor console in headless Chromium against the REAL SIP plane.

Nothing is faked between the peers: the platform PUTs a conversation for alice (team-a) and
one for bob (team-b); two sipp per-leg calls carry 600 Hz (agent) and 1000 Hz (customer)
into the gateway's SIP front and workers; the console signs in as sam, monitors the
conversation over WHEP, and the test checks what Chromium itself received (getStats and an
AnalyserNode on the remote track). A second Chromium page signed in as tom (team-a) sees the
eye icon and the busy message; the chat views that the platform serves over websockets show
where whispers and barge-in messages go; Leave stops the audio; agent_left ends the session
on the page.

Playwright drives the Debian Chromium (never a downloaded browser). A missing tool fails the
test with an install hint; it never skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.api.context import MEDIA, SIP, WHEP
from gateway.media.pool import RemoteListener

from .browser_support import CHROMIUM, CHROMIUM_ARGS, monitor_in_console, playwright_api
from .sip_support import (
    AUDIO,
    free_udp_block,
    require_tool,
    sip_gateway_settings,
    start_sipp_leg,
    stop_processes,
    wait_until,
)
from .support import GatewayClient, running_gateway

pytestmark = [pytest.mark.browser, pytest.mark.sip, pytest.mark.slow]

CID = "c-sip-browser"
OTHER_TEAM_CID = "c-sip-team-b"
AGENT_HZ, CUSTOMER_HZ = 600.0, 1000.0
#: Frequencies where neither leg has energy (the fixtures are pure tones): the noise floor.
FLOOR_HZ = (300.0, 800.0, 1300.0, 1500.0, 2200.0)
SIPP_MS = 90_000  # longer than the test; the legs are ended by the test itself

# Counts getUserMedia calls: the console must never ask for the microphone.
NO_MIC_SCRIPT = """
window.__gum = 0;
if (navigator.mediaDevices) {
  navigator.mediaDevices.getUserMedia = async () => { window.__gum += 1; throw new DOMException('blocked by test', 'NotAllowedError'); };
}
"""

# An AnalyserNode on the remote track of the console's own RTCPeerConnection: what the
# supervisor hears, after Chromium's jitter buffer and decoder.
PROBE_START = """async () => {
  const voice = window.consoleState.monitor.voice;
  const track = voice.pc.getReceivers().map((r) => r.track).find((t) => t && t.kind === 'audio');
  const ctx = new AudioContext();
  await ctx.resume();
  const src = ctx.createMediaStreamSource(new MediaStream([track]));
  const an = ctx.createAnalyser();
  an.fftSize = 32768;
  an.smoothingTimeConstant = 0;
  src.connect(an);
  window.__probe = { ctx, an, track, src };
  return { rate: ctx.sampleRate, state: ctx.state, track: track.readyState };
}"""

# One snapshot: dB per bin up to 4 kHz (PCMU is 8 kHz: nothing above) and the time-domain RMS.
PROBE_READ = """() => {
  const p = window.__probe;
  const f = new Float32Array(p.an.frequencyBinCount);
  p.an.getFloatFrequencyData(f);
  const t = new Float32Array(p.an.fftSize);
  p.an.getFloatTimeDomainData(t);
  let sum = 0;
  for (const x of t) sum += x * x;
  const binHz = p.ctx.sampleRate / p.an.fftSize;
  const n = Math.min(f.length, Math.ceil(4000 / binHz));
  return { binHz, db: Array.from(f.subarray(0, n), (v) => (Number.isFinite(v) ? v : -200)), rms: Math.sqrt(sum / t.length), track: p.track.readyState, ctx: p.ctx.state };
}"""

STATS = """async () => {
  const m = window.consoleState.monitor;
  if (!m || !m.voice) return null;
  const report = await m.voice.pc.getStats();
  for (const s of report.values()) {
    if (s.type === 'inbound-rtp' && s.kind === 'audio') {
      const codec = s.codecId && report.get(s.codecId);
      return { energy: s.totalAudioEnergy || 0, packets: s.packetsReceived || 0, lost: s.packetsLost || 0, bytes: s.bytesReceived || 0, codec: codec ? codec.mimeType + '/' + codec.clockRate : null };
    }
  }
  return null;
}"""


def _require_browser() -> Any:
    return playwright_api.async_playwright


def _band_db(snap: dict[str, Any], hz: float, half_width: float = 25.0) -> float:
    lo, hi = int((hz - half_width) / snap["binHz"]), int((hz + half_width) / snap["binHz"]) + 1
    return max(snap["db"][lo:hi])


def _tone_report(snap: dict[str, Any]) -> dict[str, float]:
    """Peak dB near each leg's tone and the loudest of the floor frequencies."""
    return {
        "agent_600": _band_db(snap, AGENT_HZ),
        "customer_1000": _band_db(snap, CUSTOMER_HZ),
        "floor": max(_band_db(snap, f) for f in FLOOR_HZ),
        "rms": snap["rms"],
    }


def _tones_heard(r: dict[str, float]) -> bool:
    # both pure tones stand well out of the floor, and each is loud in absolute terms
    return (
        min(r["agent_600"], r["customer_1000"]) - r["floor"] > 30
        and min(r["agent_600"], r["customer_1000"]) > -50
        and r["rms"] > 0.01
    )


class ChatView:
    """One participant's chat websocket (``/v1/conversations/{cid}/chat?view=...``)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.entries: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, gw: GatewayClient, view: str, token: str) -> ChatView:
        ws = await gw.http.ws_connect(
            gw.ws_url(f"/v1/conversations/{CID}/chat?view={view}&after=0"), headers={"Authorization": f"Bearer {token}"}
        )
        return cls(ws)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                if frame.get("type") == "entry":
                    self.entries.append(frame)
                    self.changed.set()

    def texts(self) -> list[str]:
        return [e["text"] for e in self.entries]

    async def wait_text(self, text: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.entries:
                if e["text"] == text:
                    return e
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen; got {self.texts()}"
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def _sign_in(page: Any, base_url: str, user: str) -> None:
    await page.add_init_script(NO_MIC_SCRIPT)
    await page.goto(base_url + "/")
    await page.wait_for_selector("body[data-ready='true']")
    await page.fill("#username", user)
    await page.fill("#password", "demo")
    await page.click("#login-submit")
    await page.wait_for_selector("[data-testid='dashboard-view']", state="visible")


async def _poll(fn: Any, ok: Any, timeout: float, interval: float = 0.2) -> Any:
    """Call ``fn()`` until ``ok(value)`` or ``timeout``; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if ok(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def test_console_monitors_real_sip_legs(tmp_path: Path) -> None:
    require_tool("sipp")
    async_playwright = _require_browser()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port, ice_host_addresses="127.0.0.1")
    sipp_legs: list[asyncio.subprocess.Process] = []
    views: list[ChatView] = []
    async with running_gateway(settings) as gw:
        try:
            assert (await gw.conversation(CID)).status == 201
            assert (
                await gw.conversation(OTHER_TEAM_CID, agent="bob", customer={"id": "c-2", "name": "Bea"})
            ).status == 201
            platform = await gw.platform()
            assert (
                await gw.call(
                    "POST",
                    f"/v1/conversations/{CID}/messages",
                    platform,
                    {"from": "customer", "text": "My parcel is late", "client_id": "u1"},
                )
            ).status == 201
            customer_view = await ChatView.open(gw, "customer", platform)
            agent_view = await ChatView.open(gw, "agent", await gw.login("alice"))
            views += [customer_view, agent_view]

            # The two legs: real SIP (INVITE -> 302 -> worker -> 200/ACK) and real RTP from sipp.
            sipp_legs.append(await start_sipp_leg(tmp_path, sip_port, CID, "agent", AUDIO / "agent_600.ulaw", SIPP_MS))
            sipp_legs.append(
                await start_sipp_leg(tmp_path, sip_port, CID, "customer", AUDIO / "customer_1000.ulaw", SIPP_MS)
            )
            await wait_until(
                lambda: gw.app[SIP].legs(CID) == {"agent", "customer"}, 10, "both sipp legs in the SIP plane"
            )

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    await _run_console(gw, browser, agent_view, customer_view)
                finally:
                    await browser.close()
            # The legs were still up all along: the silence after Leave was the console's doing.
            assert all(p.returncode is None for p in sipp_legs), (
                "a sipp leg ended early (see sipp_*_err.log in tmp_path)"
            )
        finally:
            for v in views:
                await v.close()
            await stop_processes(sipp_legs)

    # where the chat went (checked after everything was sent; views are in seq order)
    whisper = next((e for e in agent_view.entries if e["text"] == "offer a voucher"), None)
    assert whisper and whisper["kind"] == "whisper" and whisper.get("visibility") == "agent", agent_view.entries
    assert "offer a voucher" not in customer_view.texts(), customer_view.entries
    assert not [e for e in customer_view.entries if e["kind"] == "whisper" or e.get("visibility") == "agent"], (
        customer_view.entries
    )
    barge = next(e for e in customer_view.entries if e["text"] == "Hello Ann, Sam here")
    assert barge["sender"] == "supervisor" and barge["kind"] == "message" and barge["author"] == "sam", barge
    assert max(e["seq"] for e in customer_view.entries) > whisper["seq"]  # the customer view got past the whisper's seq


async def _run_console(gw: GatewayClient, browser: Any, agent_view: ChatView, customer_view: ChatView) -> None:
    app = gw.app
    assert app is not None

    # --- sam: team-a's conversation, not team-b's --------------------------------------------
    sam = await browser.new_page()
    await _sign_in(sam, gw.base_url, "sam")
    await sam.wait_for_selector(f"[data-testid='conv-row-{CID}']")
    assert await sam.locator(f"[data-testid='conv-row-{OTHER_TEAM_CID}']").count() == 0
    assert await sam.locator("[data-testid^='conv-row-']").count() == 1
    assert await sam.get_attribute(f"[data-testid='session-voice-{CID}']", "data-active") == "true"

    # --- Monitor: WHEP to the real SIP plane's tap ----------------------------------------------
    await sam.click(f"[data-testid='monitor-{CID}']")
    await sam.wait_for_selector("[data-testid='monitor-panel']", state="visible")
    await sam.wait_for_selector("[data-testid='voice-state'][data-state='connected']", timeout=15000)
    await sam.wait_for_selector("[data-testid='chat-entry'][data-sender='customer']")
    await sam.wait_for_selector(f"[data-testid='monitored-{CID}']")
    mid = await sam.get_attribute("[data-testid='monitor-panel']", "data-monitor")
    assert mid and app[WHEP].get(mid)

    # Chromium's own statistics: RTP arrives and carries audio energy.
    stats = await _poll(lambda: sam.evaluate(STATS), lambda s: bool(s) and s["energy"] > 0 and s["packets"] >= 50, 10)
    assert stats and stats["energy"] > 0 and stats["packets"] >= 50, stats

    # What the supervisor hears: both legs' tones, at their own frequencies.
    probe = await sam.evaluate(PROBE_START)
    assert probe["track"] == "live" and probe["state"] == "running", probe
    # Steadily, not in one lucky window: three analyser windows (~0.7 s each, taken apart)
    # must show both tones; one concealed packet on a loaded machine may spoil a window.
    heard: list[dict[str, float]] = []
    seen: list[dict[str, float]] = []
    deadline = time.monotonic() + 12
    while len(heard) < 3 and time.monotonic() < deadline:
        report = _tone_report(await sam.evaluate(PROBE_READ))
        seen.append(report)
        if _tones_heard(report):
            heard.append(report)
            await asyncio.sleep(0.75)  # the next window shares no sample with this one
        else:
            await asyncio.sleep(0.2)
    assert len(heard) >= 3, f"both tones in fewer than 3 windows; last reports (dB): {seen[-4:]}; stats {stats}"
    # the console's per-leg meters (the gateway's levels events) move for both legs too
    await sam.wait_for_function("Number(document.getElementById('meter-agent').dataset.dbfs) > -30", timeout=5000)
    await sam.wait_for_function("Number(document.getElementById('meter-customer').dataset.dbfs) > -30", timeout=5000)
    assert await sam.evaluate("window.__gum") == 0  # never a microphone
    (session,) = app[WHEP][mid].values()
    assert session.inbound_rtp_packets == 0  # receive-only
    # served by a media process (webrtc_processes defaults to one per core), fed by the worker
    assert isinstance(session, RemoteListener) and app[MEDIA].stats()["webrtc_listeners"] == 1

    # the quality badge: the gateway's figures for this WebRTC path, figures in its tooltip
    await sam.wait_for_selector("[data-testid='quality-badge'][data-level]:not([data-level=''])", timeout=10000)
    quality = (await gw.call("GET", f"/v1/monitors/{mid}", await gw.login("sam"))).body["quality"]
    assert quality and set(quality["legs"]) == {"agent", "customer"}, quality
    assert quality["added_latency_ms"] is not None, quality  # measured per frame on the WebRTC path
    await sam.hover("[data-testid='quality-badge']")
    lines = await sam.locator("[data-testid='quality-line']").all_text_contents()
    assert lines[0].startswith("Added latency: ") and lines[0].endswith(" ms"), lines
    assert lines[1].startswith("Agent: loss ") and lines[2].startswith("Customer: loss "), lines

    # --- tom: the eye icon, the busy message, the chat on its own -------------------------------
    tom = await browser.new_page()
    await _sign_in(tom, gw.base_url, "tom")
    await tom.wait_for_selector(f"[data-testid='monitored-{CID}']")
    assert await tom.locator(f"[data-testid='conv-row-{OTHER_TEAM_CID}']").count() == 0
    assert "sam" in (await tom.text_content(f"[data-testid='monitored-by-{CID}']") or "")
    await tom.click(f"[data-testid='monitor-{CID}']")
    await tom.wait_for_selector("[data-testid='error-banner']", state="visible")
    assert await tom.get_attribute("[data-testid='error-banner']", "data-code") == "voice_monitor_busy"
    assert "Another supervisor is already listening to this call" in (
        await tom.text_content("[data-testid='error-text']") or ""
    )
    assert len(app[WHEP][mid]) == 1  # sam still the only listener
    await tom.click("[data-testid='monitor-chat-only']")
    await tom.wait_for_selector("[data-testid='monitor-panel']", state="visible")
    assert await tom.get_attribute("[data-testid='monitor-channels']", "data-channels") == "chat"

    # --- whisper: agent view only -----------------------------------------------------------------
    await sam.click("[data-testid='tab-whisper']")
    await sam.fill("[data-testid='whisper-input']", "offer a voucher")
    await sam.click("[data-testid='whisper-send']")
    await sam.wait_for_selector("[data-testid='chat-entry'][data-kind='whisper'][data-visibility='agent']")
    whisper = await agent_view.wait_text("offer a voucher")
    assert whisper["kind"] == "whisper" and whisper["visibility"] == "agent", whisper

    # --- barge-in: the supervisor's message reaches the customer view --------------------------
    await sam.click("[data-testid='barge']")
    await sam.wait_for_selector("[data-testid='monitor-mode']:has-text('barged')")
    await sam.fill("[data-testid='message-input']", "Hello Ann, Sam here")
    await sam.click("[data-testid='message-send']")
    await sam.wait_for_selector("[data-testid='chat-entry'][data-sender='supervisor'][data-kind='message']")
    barge = await customer_view.wait_text("Hello Ann, Sam here")
    assert barge["sender"] == "supervisor", barge
    await agent_view.wait_text("Hello Ann, Sam here")
    assert "offer a voucher" not in customer_view.texts()

    # --- Leave: the audio stops ---------------------------------------------------------------
    await sam.click("[data-testid='leave']")
    await sam.wait_for_selector("[data-testid='monitor-panel']", state="hidden")
    after = await _poll(lambda: sam.evaluate(PROBE_READ), lambda s: s["track"] == "ended" and s["rms"] < 1e-4, 5)
    assert after["track"] == "ended" and after["rms"] < 1e-4, {"track": after["track"], "rms": after["rms"]}
    silent = _tone_report(after)
    assert max(silent["agent_600"], silent["customer_1000"]) < -100, silent
    assert await sam.evaluate(
        "(() => { const a = document.getElementById('monitor-audio'); return a.srcObject === null && a.paused; })()"
    )
    await wait_until(lambda: not app[WHEP].get(mid), 5, "the WHEP session to be deleted")
    assert session.closed
    assert gw.app[SIP].legs(CID) == {"agent", "customer"}  # the source did not stop: the console did

    # --- Monitor again (the voice slot is free), then agent_left ends it on the page ------------
    mid2 = await monitor_in_console(sam, CID)
    assert mid2 and mid2 != mid and app[WHEP].get(mid2)
    stats = await _poll(lambda: sam.evaluate(STATS), lambda s: bool(s) and s["energy"] > 0, 10)
    assert stats and stats["energy"] > 0, stats
    sessions2 = list(app[WHEP][mid2].values())

    assert (await gw.event(CID, "agent_left")).status == 202
    for page in (sam, tom):
        await page.wait_for_selector(
            "[data-testid='monitor-ended'][data-reason='agent_left']", state="visible", timeout=5000
        )
        assert "agent left" in (await page.text_content("[data-testid='monitor-ended']") or "").lower()
        assert await page.is_hidden("[data-testid='whisper-form']")
        assert await page.is_hidden("[data-testid='message-form']")
    await sam.wait_for_selector("[data-testid='voice-state'][data-state='stopped']")
    await wait_until(
        lambda: all(s.closed for s in sessions2) and not app[WHEP].get(mid2),
        5,
        "the WHEP session to close on agent_left",
    )
