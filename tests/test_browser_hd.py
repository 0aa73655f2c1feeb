"""HD voice in headless Chromium: a console listener that joined while the legs were narrowband
(answered PCMU, Opus listed second) is moved to Opus when the legs turn wideband, without a new
offer, and Chromium then plays the tones above 4 kHz.

The SIP plane is the fake one of ``tests/test_browser.py`` with a tap that sends 8 kHz frames
(600 Hz agent, 1000 Hz customer) for 2 s, then 16 kHz frames that add 6000 Hz to the agent and
5000 Hz to the customer, as a worker's tap does once every leg is G.722 or Opus. What Chromium
decodes is read from an AnalyserNode on the console's own remote track, and its getStats().
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools.fake_taps import PollableToneTap, tone
from gateway.api.context import WHEP
from gateway.media.frames import LegFrame

from .test_browser import _sign_in, gateway_with_fake_sip
from .test_browser_sip import PROBE_START, STATS

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, monitor_in_console, playwright_api  # noqa: E402

NARROW_FRAMES = 100  # 2 s of 8 kHz frames before the legs turn wideband

# dB per bin up to 8 kHz, and the loudest bins' frequencies.
PROBE_READ_WIDE = """() => {
  const p = window.__probe;
  const f = new Float32Array(p.an.frequencyBinCount);
  p.an.getFloatFrequencyData(f);
  const binHz = p.ctx.sampleRate / p.an.fftSize;
  const n = Math.min(f.length, Math.ceil(8000 / binHz));
  return { binHz, db: Array.from(f.subarray(0, n), (v) => (Number.isFinite(v) ? v : -200)) };
}"""


class WidebandLaterTap(PollableToneTap):
    """8 kHz narrowband frames first, then 16 kHz frames with a tone above 4 kHz on each leg."""

    def _frame(self, seq: int) -> LegFrame:
        if seq < NARROW_FRAMES:
            n, rate, start = 160, 8000, seq * 160
            return LegFrame(
                self.conversation, seq, rate, tone(600, n, rate, start, 4000), tone(1000, n, rate, start, 4000)
            )
        n, rate, start = 320, 16000, seq * 320
        agent = tone(600, n, rate, start, 4000).astype(np.int32) + tone(6000, n, rate, start, 4000)
        customer = tone(1000, n, rate, start, 4000).astype(np.int32) + tone(5000, n, rate, start, 4000)
        return LegFrame(self.conversation, seq, rate, agent.astype(np.int16), customer.astype(np.int16))


def _band_db(snap: dict[str, Any], hz: float, half_width: float = 25.0) -> float:
    lo, hi = int((hz - half_width) / snap["binHz"]), int((hz + half_width) / snap["binHz"]) + 1
    return max(snap["db"][lo:hi])


async def test_console_listener_moves_to_opus_and_hears_wideband(tmp_path: Path) -> None:
    async with gateway_with_fake_sip(tmp_path) as (gw, app, sip):
        taps: list[WidebandLaterTap] = []

        def open_tap(cid: str, maxsize: int = 50) -> WidebandLaterTap:
            taps.append(WidebandLaterTap(cid, capacity=maxsize))
            return taps[-1]

        sip.open_tap = open_tap  # type: ignore[method-assign]
        assert (await gw.conversation("c-hd")).status == 201
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                sam = await browser.new_page()
                await _sign_in(sam, gw.base_url, "sam")
                mid = await monitor_in_console(sam, "c-hd")
                (session,) = app[WHEP][mid].values()
                assert session.track.mode == "batch" and session.track.codec == "pcmu"
                first = await sam.evaluate(STATS)
                assert first is None or first["codec"] in (None, "audio/PCMU/8000"), first

                # The legs turn wideband: same session, Opus from then on.
                deadline = time.monotonic() + 15
                stats = first
                while time.monotonic() < deadline:
                    stats = await sam.evaluate(STATS)
                    if stats and stats["codec"] == "audio/opus/48000" and session.track.upgraded:
                        break
                    await asyncio.sleep(0.2)
                assert session.track.upgraded and stats and stats["codec"] == "audio/opus/48000", stats
                energy = stats["energy"]

                probe = await sam.evaluate(PROBE_START)
                assert probe["track"] == "live" and probe["state"] == "running", probe
                seen: list[dict[str, float]] = []
                heard = 0
                deadline = time.monotonic() + 12
                while heard < 3 and time.monotonic() < deadline:
                    snap = await sam.evaluate(PROBE_READ_WIDE)
                    report = {hz: _band_db(snap, hz) for hz in (600.0, 1000.0, 5000.0, 6000.0, 3000.0, 7000.0)}
                    seen.append(report)
                    floor = max(report[3000.0], report[7000.0])
                    if min(report[hz] for hz in (600.0, 1000.0, 5000.0, 6000.0)) - floor > 25:
                        heard += 1
                        await asyncio.sleep(0.75)  # the next window shares no sample with this one
                    else:
                        await asyncio.sleep(0.2)
                assert heard >= 3, f"the four tones in fewer than 3 windows; last reports (dB): {seen[-4:]}"
                after = await sam.evaluate(STATS)
                assert after["energy"] > energy and after["lost"] == 0, after
            finally:
                await browser.close()
