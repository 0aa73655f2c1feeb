"""The project's phone tool (devtools/sip_phone.py) ends cleanly after a call: ``--once``
exits 0 with BYEBYE (it used to abort on a pjsua assert when the call's object outlived
libDestroy). Needs sipp and pjsua2; a missing tool fails, never skips."""

from __future__ import annotations

import asyncio
import os

import pytest

from .sip_support import PYTHON, ROOT, Proc, free_udp_block, require_pjsua2, require_tool

pytestmark = [pytest.mark.sip]


async def test_phone_once_exits_cleanly_after_the_call() -> None:
    require_pjsua2()
    sipp = require_tool("sipp")
    port = free_udp_block(30, 40000, 59000)
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "devtools.sip_phone", "--port", str(port), "--rtp-port", str(port + 2), "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    phone = Proc(proc)
    try:
        await phone.wait_line("READY", 10)
        caller = free_udp_block(4, 40000, 59000)
        uac = await asyncio.create_subprocess_exec(
            sipp, f"127.0.0.1:{port}", "-sn", "uac", "-m", "1", "-d", "500", "-i", "127.0.0.1",
            "-p", str(caller), "-mp", str(caller + 2), "-nostdin", "-timeout", "10s",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert await asyncio.wait_for(uac.wait(), 15) == 0
        await phone.wait_line("DISCONNECTED", 5)
        await phone.wait_line("BYEBYE", 5)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        await phone.stop()
