"""``python -m gateway serve`` as a real process: JSON logs, readiness, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support import GatewayClient, free_port

pytestmark = pytest.mark.api
ROOT = Path(__file__).resolve().parent.parent


async def test_sigterm_drains_then_exits(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "GATEWAY_DEV": "true",
        "GATEWAY_PORT": str(port),
        "GATEWAY_DATA_DIR": str(tmp_path / "var"),
        "GATEWAY_ENABLE_SIP": "false",
        "GATEWAY_DRAIN_SECONDS": "20",
        "GATEWAY_SIP_PORT": str(free_port(socket.SOCK_DGRAM)),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            client = GatewayClient(base, base, http)
            for _ in range(150):
                try:
                    if (await client.call("GET", "/readyz")).status == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("gateway process did not become ready")
            await client.conversation("d1")
            monitor = await client.monitor("sam", "d1")
            assert monitor.status == 201

            # An open console event stream must not hold up the shutdown.
            events = await http.ws_connect(f"ws://127.0.0.1:{port}/v1/events?access_token={await client.login('tom')}")
            assert (await events.receive_json(timeout=5))["type"] == "hello"
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            ready = await client.call("GET", "/readyz")
            assert ready.status == 503 and ready.body["checks"]["not_draining"] is False
            refused = await client.monitor("tom", "d1")
            assert (refused.status, refused.code) == (503, "draining")
            assert refused.headers.get("Retry-After")
            assert proc.returncode is None, "stopped while a monitor was still active"
            # The last monitor leaves: the gateway stops well before drain_seconds.
            assert (
                await client.call("DELETE", f"/v1/monitors/{monitor.body['id']}", await client.login("sam"))
            ).status == 204
            await asyncio.wait_for(proc.wait(), 10)
            closing = await events.receive(timeout=5)
            while closing.type is aiohttp.WSMsgType.TEXT:  # the last events, then the close
                closing = await events.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert proc.returncode == 0
        assert proc.stderr is not None
        lines = (await proc.stderr.read()).decode().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records, "no JSON log lines"
        assert any(r.get("monitor") == monitor.body["id"] and r.get("conversation") == "d1" for r in records)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
