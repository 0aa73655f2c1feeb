"""A gateway restart loses nothing: conversations, monitors, chat history and seq continue
(with its SQLite files, or with Redis)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support import make_settings, running_gateway

pytestmark = pytest.mark.api


async def _read_entries(ws: aiohttp.ClientWebSocketResponse, until_seq: int) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    while True:
        frame = await ws.receive_json(timeout=5)
        if frame["type"] == "entry":
            entries.append(frame)
            if frame["seq"] == until_seq:
                return entries


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_restart_resumes_monitor_chat_exactly_once(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    """The same with the SQLite files or with Redis (``GATEWAY_REDIS_URL``): the restarted
    instance reloads its copy from Redis and the chat log goes on there."""
    shared: dict[str, object] = {}
    if backend == "redis":
        shared = {"redis_url": request.getfixturevalue("redis_server").url, "redis_prefix": redis_prefix}
    settings = make_settings(tmp_path, **shared)
    async with running_gateway(settings) as gateway:
        await gateway.conversation("rs", sessions=["chat"])
        platform, sam = await gateway.platform(), await gateway.login("sam")
        mid = (await gateway.monitor("sam", "rs")).body["id"]
        for i in range(3):
            await gateway.call(
                "POST", "/v1/conversations/rs/messages", platform, {"from": "customer", "text": f"before {i}"}
            )
        ws = await gateway.http.ws_connect(
            gateway.ws_url(f"/v1/monitors/{mid}/chat?after=0"), headers={"Authorization": f"Bearer {sam}"}
        )
        head = (
            await gateway.call(
                "POST", "/v1/conversations/rs/messages", platform, {"from": "agent", "text": "last before"}
            )
        ).body["seq"]
        before = await _read_entries(ws, head)
        await ws.close()

    async with running_gateway(settings) as gateway:  # same data dir, same signing key
        state = await gateway.call("GET", f"/v1/monitors/{mid}", sam)
        assert state.status == 200 and state.body["ended_at"] is None, state.body
        listing = await gateway.call("GET", "/v1/conversations", sam)
        assert listing.body[0]["id"] == "rs" and listing.body[0]["monitored"] is True
        after = await gateway.call(
            "POST", "/v1/conversations/rs/messages", platform, {"from": "customer", "text": "after restart"}
        )
        assert after.body["seq"] == head + 1
        ws = await gateway.http.ws_connect(
            gateway.ws_url(f"/v1/monitors/{mid}/chat?after={head}"), headers={"Authorization": f"Bearer {sam}"}
        )
        resumed = await _read_entries(ws, head + 1)
        await ws.close()
    seqs = [e["seq"] for e in before + resumed]
    assert seqs == list(range(1, head + 2)), seqs
    assert resumed[-1]["text"] == "after restart"
