"""Headless Debian Chromium for the browser tests (driven by Playwright, no browser download).

Importing this module fails the importing test module, with the command to install what is
missing, when Chromium or Playwright is absent: a missing tool is never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]

if not os.path.exists(CHROMIUM):
    pytest.fail(f"{CHROMIUM} is not installed: apt-get install chromium", pytrace=False)
try:
    import playwright.async_api as playwright_api
except ImportError:
    pytest.fail(
        "playwright is not installed: .venv/bin/pip install 'playwright>=1.40' (it drives the Debian chromium; no browser download)",
        pytrace=False,
    )


async def monitor_in_console(page: Any, cid: str) -> str | None:
    """Click Monitor on ``cid``'s row of the signed-in console, wait until the voice is connected
    (WebRTC up), and return the monitor's id from the panel."""
    await page.click(f"[data-testid='monitor-{cid}']")
    await page.wait_for_selector("[data-testid='voice-state'][data-state='connected']", timeout=15000)
    mid: str | None = await page.get_attribute("[data-testid='monitor-panel']", "data-monitor")
    return mid


#: axe-core from the npm registry (package.json; scripts/setup.sh test runs npm ci).
AXE_JS = Path(__file__).resolve().parent.parent / "node_modules" / "axe-core" / "axe.min.js"
#: Impacts that fail the check; the others are printed.
AXE_FAILING = ("serious", "critical")

_AXE_RUN = """async () => {
  const result = await axe.run(document, { resultTypes: ['violations'] });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 6).map((n) => n.target.join(' ') + ' :: ' + (n.failureSummary || '').split('\\n').slice(1, 2).join('')),
  }));
}"""


async def axe_check(page: Any, where: str) -> list[dict[str, Any]]:
    """Run axe-core on the page as it is now: fail on serious or critical violations, print the
    rest (minor and moderate ones are reported, not hidden). Returns all violations."""
    if not AXE_JS.exists():
        pytest.fail(f"{AXE_JS} is missing: run scripts/setup.sh test (it runs npm ci for axe-core)", pytrace=False)
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.add_script_tag(content=AXE_JS.read_text())
    violations: list[dict[str, Any]] = await page.evaluate(_AXE_RUN)
    for v in violations:
        print(f"axe [{where}] {v['impact']}: {v['id']} ({v['help']}) {v['nodes']}")
    failing = [v for v in violations if v["impact"] in AXE_FAILING]
    assert not failing, f"axe [{where}]: serious or critical violations: {failing}"
    return violations


__all__ = ["AXE_JS", "CHROMIUM", "CHROMIUM_ARGS", "axe_check", "playwright_api"]
