"""The chat websocket protocol with real aiohttp clients against an app on 127.0.0.1.

The app here mounts :func:`serve_chat_stream` under the API.md paths *without* auth; the
control plane mounts the authenticated routes. :class:`ResumingClient` is the example client:
it remembers the last seq, resumes with ``after=last_seq`` after any drop, and so sees every
entry exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from gateway.api.chat_ws import serve_chat_stream
from gateway.chat.hub import ChatHub
from gateway.chat.log import ChatLog
from gateway.chat.service import ChatService
from gateway.config import Settings

pytestmark = pytest.mark.api

FAR = time.time() + 3600
#: ``{"monitors": {mid: (cid, ended future)}, "expires_at": pretend token expiry}``
STATE = web.AppKey("chat_test_state", dict)


def make_app(chat: ChatService, *, heartbeat: float = 30.0, sndbuf: int | None = None) -> web.Application:
    """A test app: the API.md chat paths, no auth; see :data:`STATE` for monitors and expiry."""
    app = web.Application()
    state: dict[str, Any] = {"monitors": {}, "expires_at": FAR}
    app[STATE] = state

    def shrink(request: web.Request) -> None:
        if sndbuf is not None and request.transport is not None:
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)

    async def conversation_chat(request: web.Request) -> web.StreamResponse:
        shrink(request)
        return await serve_chat_stream(
            request,
            chat,
            request.match_info["cid"],
            request.query.get("view", "customer"),
            int(request.query.get("after", "0")),
            expires_at=state["expires_at"],
            heartbeat=heartbeat,
        )

    async def monitor_chat(request: web.Request) -> web.StreamResponse:
        shrink(request)
        cid, ended = state["monitors"][request.match_info["mid"]]
        return await serve_chat_stream(
            request,
            chat,
            cid,
            "monitor",
            int(request.query.get("after", "0")),
            expires_at=state["expires_at"],
            ended=ended,
            heartbeat=heartbeat,
        )

    async def going_away(_app: web.Application) -> None:
        chat.go_away()  # what the real app does in on_shutdown: streams close 1001, no `end`

    app.on_shutdown.append(going_away)
    app.router.add_get("/v1/conversations/{cid}/chat", conversation_chat)
    app.router.add_get("/v1/monitors/{mid}/chat", monitor_chat)
    return app


def make_chat(make_log: Callable[[str], ChatLog], **over: Any) -> ChatService:
    """A chat service on a SQLite or a Redis log (``make_log``: every test here runs on both)."""
    settings = Settings(chat_rate_per_second=0).with_overrides(**over)
    return ChatService(settings, make_log("chat"), ChatHub(settings.chat_reader_cap))


@pytest.fixture
async def chat(make_log) -> AsyncIterator[ChatService]:
    service = make_chat(make_log)
    yield service
    await service.close()


@pytest.fixture
async def server(chat) -> AsyncIterator[TestServer]:
    srv = TestServer(make_app(chat, heartbeat=30.0), host="127.0.0.1", port=0)
    await srv.start_server()
    yield srv
    await srv.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def say(chat: ChatService, cid: str, text: str, *, sender: str = "customer", **kw: Any):
    args: dict[str, Any] = dict(kind="message", author=None, visibility="all")
    args.update(kw)
    entry, _ = await chat.post(cid, sender=sender, text=text, **args)
    return entry


async def frames_until(ws: aiohttp.ClientWebSocketResponse, pred, timeout: float = 5.0) -> list[dict]:
    """Read JSON frames until ``pred(frame)`` is true (that frame included)."""
    out: list[dict] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
            frame = json.loads(msg.data)
            out.append(frame)
            if pred(frame):
                return out


async def read_to_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> tuple[list[dict], int | None]:
    out: list[dict] = []
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                out.append(json.loads(msg.data))
            elif msg.type is WSMsgType.CLOSE:
                return out, msg.data  # the server's code (close_code may say 1006 if it left)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
                return out, ws.close_code


class ResumingClient:
    """Example client: keeps ``last_seq`` and resumes with ``after=last_seq`` on every drop."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.last_seq = 0
        self.entries: list[dict] = []
        self.gaps: list[dict] = []
        self.closes: list[int | None] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def connect(self, **kw: Any) -> aiohttp.ClientWebSocketResponse:
        sep = "&" if "?" in self.url else "?"
        self.ws = await self.session.ws_connect(f"{self.url}{sep}after={self.last_seq}", **kw)
        return self.ws

    def take(self, frame: dict) -> None:
        if frame["type"] == "entry":
            assert frame["seq"] > self.last_seq, "duplicate or out of order"
            self.entries.append(frame)
            self.last_seq = frame["seq"]
        elif frame["type"] == "gap":
            self.gaps.append(frame)
            self.last_seq = frame["to"]
        elif frame["type"] == "end":
            self.last_seq = max(self.last_seq, frame["final_seq"])

    async def read_until_seq(self, seq: int, timeout: float = 5.0) -> None:
        assert self.ws is not None
        frames = await frames_until(self.ws, lambda f: f.get("seq", 0) >= seq or f["type"] == "end", timeout)
        for f in frames:
            self.take(f)

    async def read_until_closed(self, timeout: float = 5.0) -> int | None:
        assert self.ws is not None
        frames, code = await read_to_close(self.ws, timeout)
        for f in frames:
            self.take(f)
        self.closes.append(code)
        return code


async def test_replay_live_drop_and_resume_exactly_once(chat, server, session):
    url = str(server.make_url("/v1/conversations/c1/chat?view=agent"))
    for i in range(1, 6):
        await say(chat, "c1", f"m{i}")
    client = ResumingClient(session, url)
    await client.connect()
    await client.read_until_seq(5)  # replay
    for i in range(6, 9):
        await say(chat, "c1", f"m{i}", sender="agent", author="alice")
    await client.read_until_seq(8)  # live
    # drop the connection abruptly (no close handshake), post while it is down
    client.ws.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
    await client.ws.close()
    for i in range(9, 13):
        await say(chat, "c1", f"m{i}")
    await client.connect()
    pending = asyncio.ensure_future(client.read_until_seq(20))
    await asyncio.sleep(0.05)
    for i in range(13, 21):
        await say(chat, "c1", f"m{i}")
        if i == 15:
            await client.ws.close()  # a clean drop this time, in the middle of live delivery
            await asyncio.sleep(0.01)
    with pytest.raises(Exception):  # noqa: B017 - whichever error the closed socket gives
        await pending
    await client.connect()
    await client.read_until_seq(20)
    assert [e["seq"] for e in client.entries] == list(range(1, 21))
    assert [e["text"] for e in client.entries] == [f"m{i}" for i in range(1, 21)]
    await client.ws.close()
    await asyncio.sleep(0.05)
    assert chat.hub.subscribers() == 0


async def test_restart_new_process_same_file_resumes(make_log, session):
    chat = make_chat(make_log)
    srv = TestServer(make_app(chat), host="127.0.0.1", port=0)
    await srv.start_server()
    client = ResumingClient(session, str(srv.make_url("/v1/conversations/c1/chat?view=customer")))
    for i in range(1, 4):
        await say(chat, "c1", f"before{i}", client_id=f"k{i}")
    await client.connect()
    await client.read_until_seq(3)
    await srv.close()
    assert await client.read_until_closed() == 1001
    await chat.close()

    chat2 = make_chat(make_log)  # new log on the same file (keys), new service, new server
    srv2 = TestServer(make_app(chat2), host="127.0.0.1", port=0)
    await srv2.start_server()
    client.url = str(srv2.make_url("/v1/conversations/c1/chat?view=customer"))
    e, created = await chat2.post(
        "c1", kind="message", sender="customer", author=None, text="again", visibility="all", client_id="k2"
    )
    assert not created and e.seq == 2
    for i in range(4, 7):
        assert (await say(chat2, "c1", f"after{i}")).seq == i
    await client.connect()
    await client.read_until_seq(6)
    assert [e["seq"] for e in client.entries] == [1, 2, 3, 4, 5, 6]
    await client.ws.close()
    await srv2.close()
    await chat2.close()


async def test_views_whisper_barge_system_and_monitor_marks(chat, server, session):
    mon_end: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server.app[STATE]["monitors"]["m1"] = ("c1", mon_end)
    cust = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=customer&after=0"))
    agent = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=agent&after=0"))
    mon = await session.ws_connect(server.make_url("/v1/monitors/m1/chat?after=0"))
    await asyncio.sleep(0.05)
    await say(chat, "c1", "hi")
    await chat.post("c1", kind="system", sender="system", author=None, text="sam joined", visibility="agent")
    await chat.post("c1", kind="whisper", sender="supervisor", author="sam", text="offer 10%", visibility="agent")
    await say(chat, "c1", "I can help", sender="supervisor", author="sam")
    await say(chat, "c1", "thanks", sender="agent", author="alice")
    last = lambda f: f.get("seq") == 5  # noqa: E731
    cf = [f for f in await frames_until(cust, last) if f["type"] == "entry"]
    af = [f for f in await frames_until(agent, last) if f["type"] == "entry"]
    mf = [f for f in await frames_until(mon, last) if f["type"] == "entry"]
    assert [f["seq"] for f in cf] == [1, 4, 5]
    assert all(f["kind"] != "whisper" and "visibility" not in f for f in cf)
    assert [f["seq"] for f in af] == [1, 2, 3, 4, 5]
    assert [(f["kind"], f["visibility"]) for f in mf] == [
        ("message", "all"),
        ("system", "agent"),
        ("whisper", "agent"),
        ("message", "all"),
        ("message", "all"),
    ]
    assert mf[3]["sender"] == "supervisor" and mf[3]["author"] == "sam"
    # one monitor ends (it left): only that stream gets `end`
    mon_end.set_result("left")
    frames, code = await read_to_close(mon)
    assert frames[-1] == {"type": "end", "final_seq": 5, "reason": "left"} and code == 1000
    # the conversation ends: every remaining stream gets the rest, then `end`
    await say(chat, "c1", "bye")
    chat.end_conversation("c1", "agent_left")
    for ws in (cust, agent):
        frames, code = await read_to_close(ws)
        assert frames[-2]["seq"] == 6 and frames[-1] == {"type": "end", "final_seq": 6, "reason": "agent_left"}
        assert code == 1000
    # a stream opened after the end replays and ends at once
    late = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=customer&after=4"))
    frames, code = await read_to_close(late)
    assert [f.get("seq") for f in frames] == [5, 6, None] and frames[-1]["reason"] == "agent_left"


async def test_heartbeat_gap_and_final_reason(make_log, session):
    chat = make_chat(make_log)
    app = make_app(chat, heartbeat=0.1)

    async def over(request: web.Request) -> web.StreamResponse:
        return await serve_chat_stream(request, chat, "c1", "agent", 0, expires_at=FAR, final_reason="ended")

    app.router.add_get("/over", over)
    srv = TestServer(app, host="127.0.0.1", port=0)
    await srv.start_server()
    for i in range(1, 11):
        await say(chat, "c1", f"m{i}")
    await chat.trim("c1", 5)
    ws = await session.ws_connect(srv.make_url("/v1/conversations/c1/chat?view=agent&after=2"))
    frames = await frames_until(ws, lambda f: f["type"] == "heartbeat")
    assert frames[0] == {"type": "gap", "from": 3, "to": 4}
    assert [f["seq"] for f in frames[1:-1]] == list(range(5, 11))
    assert frames[-1] == {"type": "heartbeat", "head_seq": 10}
    await ws.close()
    ws = await session.ws_connect(srv.make_url("/over"))
    frames, code = await read_to_close(ws)
    assert frames[0]["type"] == "gap" and frames[-1] == {"type": "end", "final_seq": 10, "reason": "ended"}
    assert code == 1000
    await srv.close()
    await chat.close()


async def test_token_expiry_mid_stream_closes_4001(chat, server, session):
    server.app[STATE]["expires_at"] = time.time() + 0.3
    await say(chat, "c1", "one")
    ws = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=agent&after=0"))
    frames, code = await read_to_close(ws)
    assert frames[0]["seq"] == 1
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "token_expired"
    assert frames[-1]["last_seq"] == 1
    assert code == 4001


@pytest.mark.parametrize(
    "bad, expected",
    [("binary", 1003), ("json", 1007), ("deep", 1007), ("notobject", 1007), ("badack", 1007), ("oversize", 1009)],
)
async def test_malformed_frames_close_only_their_connection(chat, server, session, bad, expected):
    good = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=agent&after=0"))
    evil = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=agent&after=0"))
    await good.send_str(json.dumps({"type": "ack", "seq": 0}))
    await good.send_str(json.dumps({"type": "something_new"}))  # unknown types are ignored
    await say(chat, "c1", "before")
    if bad == "binary":
        await evil.send_bytes(b"\x00\x01")
    elif bad == "json":
        await evil.send_str("{not json")
    elif bad == "deep":  # deeper than the JSON parser's recursion limit, within the frame limit
        await evil.send_str("[" * 4000)
    elif bad == "notobject":
        await evil.send_str("[1,2]")
    elif bad == "badack":
        await evil.send_str('{"type":"ack","seq":"x"}')
    else:
        await evil.send_str(json.dumps({"type": "ack", "pad": "x" * 5000}))
    frames, code = await read_to_close(evil)
    assert code == expected
    await say(chat, "c1", "after")
    frames = await frames_until(good, lambda f: f.get("seq") == 2)
    assert [f["text"] for f in frames if f["type"] == "entry"] == ["before", "after"]
    await good.close()


async def test_idempotent_client_id_is_delivered_once(chat, server, session):
    ws = await session.ws_connect(server.make_url("/v1/conversations/c1/chat?view=customer&after=0"))
    await asyncio.sleep(0.05)
    a, created_a = await chat.post(
        "c1", kind="message", sender="customer", author=None, text="hi", visibility="all", client_id="up-123"
    )
    b, created_b = await chat.post(
        "c1", kind="message", sender="customer", author=None, text="hi", visibility="all", client_id="up-123"
    )
    await say(chat, "c1", "next")
    frames = await frames_until(ws, lambda f: f.get("seq") == 2)
    assert created_a and not created_b and a == b
    assert [(f["seq"], f["client_id"]) for f in frames] == [(1, "up-123"), (2, None)]
    await ws.close()


def small_rcvbuf_session() -> aiohttp.ClientSession:
    def factory(addr_info: Any) -> socket.socket:
        family, type_, proto, _, _ = addr_info
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=factory))


async def test_slow_reader_is_bounded_cut_off_and_resumes_without_loss(make_log, session):
    cap = 32
    chat = make_chat(make_log, chat_reader_cap=cap)
    srv = TestServer(make_app(chat, sndbuf=4096), host="127.0.0.1", port=0)
    await srv.start_server()
    url = str(srv.make_url("/v1/conversations/c1/chat?view=monitor"))
    slow_session = small_rcvbuf_session()
    slow = ResumingClient(slow_session, url)
    await slow.connect(max_msg_size=0)
    fast = ResumingClient(session, url)
    await fast.connect()
    await asyncio.sleep(0.05)
    assert chat.hub.subscribers("c1") == 2
    n = 400
    text = "x" * 3000
    fast_reader = asyncio.ensure_future(fast.read_until_seq(n, timeout=30))
    peak = 0
    for i in range(1, n + 1):
        await say(chat, "c1", f"{i}:{text}")
        peak = max(peak, chat.hub.buffered())
        await asyncio.sleep(0.001)
    await fast_reader
    # the server never held more than the cap per subscriber, and the slow one was cut off
    assert peak <= 2 * cap
    assert chat.hub.subscribers("c1") == 1 and chat.hub.buffered() == 0
    assert [e["seq"] for e in fast.entries] == list(range(1, n + 1))
    # now the slow client reads what got through, sees 1013, resumes from its last seq
    code = await slow.read_until_closed(timeout=10)
    assert code == 1013
    assert slow.last_seq < n
    await slow.connect(max_msg_size=0)
    await slow.read_until_seq(n, timeout=10)
    assert [e["seq"] for e in slow.entries] == list(range(1, n + 1))
    assert not fast.ws.closed
    await slow.ws.close()
    await fast.ws.close()
    await slow_session.close()
    await srv.close()
    await chat.close()
