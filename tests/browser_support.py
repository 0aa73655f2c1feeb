"""Headless Debian Chromium for the browser tests (driven by Playwright, no browser download).

Importing this module fails the importing test module, with the command to install what is
missing, when Chromium or Playwright is absent: a missing tool is never a skip.
"""

from __future__ import annotations

import os

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

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "playwright_api"]
