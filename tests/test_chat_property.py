"""Property: over random interleavings of customer/agent messages, whispers, barged supervisor
messages, system entries, and view clients dropping and resuming, every view receives exactly
the log entries it may see, in seq order, once; the customer view never sees a whisper.

Runs real websocket clients against an aiohttp app on 127.0.0.1 (one per example).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.redis_server import RedisServer
from gateway.api.chat_ws import serve_chat_stream
from gateway.chat.log import ChatLog, SqliteChatLog
from gateway.chat.service import ChatService, visible
from gateway.config import Settings
from gateway.shared.chat_log import RedisChatLog
from gateway.shared.connection import SharedState

pytestmark = pytest.mark.api

VIEWS = ("customer", "agent", "monitor")
POSTS = {
    "customer": dict(kind="message", sender="customer", author=None, visibility="all"),
    "agent": dict(kind="message", sender="agent", author="alice", visibility="all"),
    "whisper": dict(kind="whisper", sender="supervisor", author="sam", visibility="agent"),
    # a whisper that (wrongly) asks for 'all' must still never reach the customer
    "whisper_all": dict(kind="whisper", sender="supervisor", author="sam", visibility="all"),
    "barge": dict(kind="message", sender="supervisor", author="sam", visibility="all"),
    "system": dict(kind="system", sender="system", author=None, visibility="all"),
    "system_agent": dict(kind="system", sender="system", author=None, visibility="agent"),
}

op = st.one_of(
    st.tuples(st.just("post"), st.sampled_from(sorted(POSTS)), st.booleans()),
    st.tuples(st.just("drop"), st.sampled_from(VIEWS), st.booleans()),
    st.tuples(st.just("yield"), st.sampled_from(VIEWS), st.booleans()),
)


class ViewClient:
    def __init__(self, session: aiohttp.ClientSession, base: str, view: str) -> None:
        self.session, self.base, self.view = session, base, view
        self.last_seq = 0
        self.entries: list[dict[str, Any]] = []
        self.ended: dict[str, Any] | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.task: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        url = f"{self.base}/v1/conversations/c1/chat?view={self.view}&after={self.last_seq}"
        self.ws = await self.session.ws_connect(url)
        self.task = asyncio.ensure_future(self._read(self.ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                break
            frame = json.loads(msg.data)
            if frame["type"] == "entry":
                assert frame["seq"] > self.last_seq, (self.view, frame["seq"], self.last_seq)
                self.entries.append(frame)
                self.last_seq = frame["seq"]
            elif frame["type"] == "end":
                self.ended = frame
            else:
                assert frame["type"] == "heartbeat", frame

    async def drop(self, abrupt: bool) -> None:
        assert self.ws is not None and self.task is not None
        if abrupt:
            transport = self.ws.get_extra_info("socket")
            transport.shutdown(2)
        await self.ws.close()
        await self.task


async def scenario(ops: list[tuple[str, str, bool]], redis_url: str | None = None) -> None:
    """One example, on a SQLite log in memory or (``redis_url``) on fresh keys in Redis."""
    s = Settings(chat_rate_per_second=0, chat_reader_cap=64)
    shared = SharedState(redis_url, prefix=f"prop{secrets.token_hex(4)}:") if redis_url else None
    log: ChatLog = RedisChatLog(shared) if shared is not None else SqliteChatLog(":memory:")
    chat = ChatService(s, log)
    app = web.Application()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_chat_stream(
            request,
            chat,
            request.match_info["cid"],
            request.query["view"],
            int(request.query["after"]),
            expires_at=time.time() + 600,
            heartbeat=5.0,
        )

    app.router.add_get("/v1/conversations/{cid}/chat", handler)
    srv = TestServer(app, host="127.0.0.1", port=0)
    await srv.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            base = str(srv.make_url("")).rstrip("/")
            clients = {v: ViewClient(session, base, v) for v in VIEWS}
            for c in clients.values():
                await c.connect()
            n = 0
            for kind, what, flag in ops:
                if kind == "post":
                    n += 1
                    await chat.post("c1", text=f"t{n}", client_id=f"k{n}", **POSTS[what])  # type: ignore[arg-type]
                    if flag:  # a retry of the same upload: same entry, nothing new
                        await chat.post("c1", text=f"t{n}", client_id=f"k{n}", **POSTS[what])  # type: ignore[arg-type]
                elif kind == "drop":
                    await clients[what].drop(abrupt=flag)
                    if flag:
                        await chat.post("c1", text="while down", **POSTS["agent"])  # type: ignore[arg-type]
                        n += 1
                    await clients[what].connect()
                else:
                    for _ in range(3 if flag else 1):
                        await asyncio.sleep(0)
            chat.end_conversation("c1", "ended")
            for c in clients.values():
                assert c.task is not None
                await asyncio.wait_for(c.task, 5)
            log = await chat.log.read("c1", 0, 10_000)
            assert [e.seq for e in log] == list(range(1, len(log) + 1))  # the log is gap-free
            for view, c in clients.items():
                expected = [e.seq for e in log if visible(e, view)]
                got = [f["seq"] for f in c.entries]
                assert got == expected, (view, got, expected)  # nothing visible missing, no dup
                assert c.ended == {"type": "end", "final_seq": len(log), "reason": "ended"}
                if view == "customer":
                    assert all(f["kind"] != "whisper" for f in c.entries)
                    assert all(f["sender"] != "supervisor" or f["kind"] == "message" for f in c.entries)
                if view == "monitor":
                    assert all("visibility" in f and "kind" in f for f in c.entries)
    finally:
        await srv.close()
        await chat.log.close()
        if shared is not None:
            await shared.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=30))
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_views_are_exact_and_customer_never_sees_a_whisper(redis_server: RedisServer, backend: str, ops):
    asyncio.run(scenario(ops, redis_server.url if backend == "redis" else None))
