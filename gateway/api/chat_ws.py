"""The chat websocket protocol: replay from ``after + 1``, then live, with nothing lost.

Server → client frames (JSON text):

- ``{"type":"entry","seq":n,"kind":..,"sender":..,"author":..,"text":..,"ts":..,"client_id":..}``
  (agent and monitor views also carry ``"visibility"``), strictly increasing ``seq``, never a
  duplicate within one connection; resuming with ``after=<last seq received>`` continues
  exactly after it.
- ``{"type":"gap","from":a,"to":b}``: entries ``a..b`` were trimmed from the log.
- ``{"type":"heartbeat","head_seq":n}`` every ``heartbeat`` seconds.
- ``{"type":"end","final_seq":n,"reason":r}`` then close 1000: the conversation (or this
  monitor) ended; every entry up to ``final_seq`` was delivered. Do not reconnect.
- ``{"type":"error","code":"token_expired","last_seq":n}`` then close 4001: reconnect with a
  fresh token and ``after=last_seq``.

Close codes: 1001 the server shuts down (resume with ``after``); 1013 the client fell more than ``chat_reader_cap`` entries behind (resume with
``after``); 1003 a binary frame; 1007 a frame that is not a JSON object (or a bad ack); 1009 a
frame over ``max_msg_size`` bytes; 4001 token expired. Each closes only that connection.

Client → server frames: JSON objects only. ``{"type":"ack","seq":n}`` is optional; once a client
has sent one, the reader cap counts sent-but-unacknowledged entries too. Unknown types are
ignored (forward compatibility).

Authentication and the rights check happen in the caller (control plane) before this runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from gateway.chat.hub import Subscription
from gateway.chat.log import ChatEntry
from gateway.chat.service import VIEWS, entry_json, visible
from gateway.errors import ErrorCode, GatewayError
from gateway.planes import ChatPlane

log = logging.getLogger("gateway.chat.ws")

#: Close codes of this protocol.
CLOSE_OVERFLOW = 1013
CLOSE_GOING_AWAY = 1001
CLOSE_TOKEN_EXPIRED = 4001
#: How long a close handshake may take before the transport is dropped.
CLOSE_TIMEOUT = 2.0
#: A closed-but-unread connection keeps at most this long before it is aborted.
ABORT_AFTER = 30.0
PAGE = 500

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


async def serve_chat_stream(
    request: web.Request,
    chat: ChatPlane,
    cid: str,
    view: str,
    after: int,
    *,
    expires_at: float,
    ended: asyncio.Future[str] | None = None,
    final_reason: str | None = None,
    heartbeat: float | None = None,
    max_msg_size: int = 4096,
) -> web.WebSocketResponse:
    """Serve one chat websocket for ``view`` (``customer``/``agent``/``monitor``) of ``cid``.

    ``expires_at``: epoch seconds of the access token's ``exp``; at that moment the stream
    closes with 4001. ``ended``: resolves to a reason when this stream must end (a monitor
    ended: ``left``, ``agent_left``, ...); the conversation's own end comes through
    :meth:`ChatService.end_conversation`. ``final_reason``: the conversation is already over;
    replay the history, then ``end`` with this reason. ``heartbeat``: seconds between
    heartbeats (default ``chat.heartbeat_interval``). Returns the closed response.
    """
    if view not in VIEWS:
        raise GatewayError(ErrorCode.INVALID_VIEW, f"view must be one of {sorted(VIEWS)}")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise GatewayError(ErrorCode.INVALID_AFTER, "after must be a non-negative integer")
    beat = heartbeat if heartbeat is not None else chat.heartbeat_interval
    ws = web.WebSocketResponse(
        max_msg_size=max_msg_size,
        autoping=True,
        timeout=CLOSE_TIMEOUT,
        # protocol pings find dead peers (a JSON heartbeat to a vanished host only fails
        # after TCP gives up, minutes later)
        heartbeat=max(10.0, 2 * beat),
    )
    await ws.prepare(request)
    stream = _ChatStream(
        request,
        ws,
        chat,
        cid,
        view,
        after,
        expires_at=expires_at,
        ended=ended,
        final_reason=final_reason,
        heartbeat=beat,
    )
    await stream.run()
    return ws


class _ChatStream:
    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        chat: ChatPlane,
        cid: str,
        view: str,
        after: int,
        *,
        expires_at: float,
        ended: asyncio.Future[str] | None,
        final_reason: str | None,
        heartbeat: float,
    ) -> None:
        self.request = request
        self.ws = ws
        self.chat = chat
        self.cid = cid
        self.view = view
        #: Highest seq this client has been given everything (visible) up to.
        self.cursor = after
        self.expires_at = expires_at
        self.ended = ended
        self.final_reason = final_reason
        self.heartbeat = heartbeat
        self.loop = asyncio.get_running_loop()
        self.sub: Subscription | None = None
        self.kill: asyncio.Future[tuple[int, str]] = self.loop.create_future()
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None
        self._first_ack: int | None = None

    # -- wake-ups ----------------------------------------------------------------------------

    def wake(self) -> None:
        self._flag = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _overflowed(self) -> None:
        if not self.kill.done():
            self.kill.set_result((CLOSE_OVERFLOW, "reader_overflow"))

    async def _sleep(self, timeout: float) -> None:
        if self._flag or timeout <= 0:
            return
        w = self._waiter = self.loop.create_future()
        handle = self.loop.call_later(timeout, _resolve, w)
        try:
            await w
        finally:
            handle.cancel()
            self._waiter = None

    # -- the two halves ----------------------------------------------------------------------

    async def run(self) -> None:
        def on_ended(_f: asyncio.Future[str]) -> None:
            self.wake()

        if self.ended is not None:
            self.ended.add_done_callback(on_ended)
        writer = asyncio.ensure_future(self._write())
        reader = asyncio.ensure_future(self._read())
        decision: tuple[int, str] | None = None
        try:
            racing: set[asyncio.Future[Any]] = {writer, reader, self.kill}
            done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            if self.kill.done():
                decision = self.kill.result()
            elif writer in done:
                decision = _result(writer)
            else:
                decision = _result(reader)
        finally:
            # synchronous cleanup first: it must happen even if this task is being cancelled
            if self.ended is not None:
                # the future may outlive this connection (shared by a monitor's reconnects)
                self.ended.remove_done_callback(on_ended)
            if self.sub is not None:
                self.sub.close()
            if not self.kill.done():
                self.kill.cancel()
            if not writer.done():
                writer.cancel()
            await asyncio.wait({writer})
            if decision is not None and not self.ws.closed:
                code, message = decision
                try:
                    await asyncio.wait_for(self.ws.close(code=code, message=message.encode()), CLOSE_TIMEOUT * 2)
                except (TimeoutError, ConnectionError):
                    pass
            if not reader.done():
                await asyncio.wait({reader}, timeout=CLOSE_TIMEOUT)
                if not reader.done():
                    reader.cancel()
            if decision is not None and decision[0] == CLOSE_OVERFLOW:
                # a reader that never reads would pin its unsent bytes in the transport
                transport = self.request.transport
                if transport is not None:
                    self.loop.call_later(ABORT_AFTER, transport.abort)
        log.debug("chat stream %s/%s closed: %s", self.cid, self.view, decision)

    async def _read(self) -> tuple[int, str] | None:
        ws = self.ws
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT:
                try:
                    data = json.loads(msg.data)
                except (ValueError, RecursionError):  # nesting deeper than the parser's limit too
                    return (1007, "invalid_json")
                if not isinstance(data, dict):
                    return (1007, "invalid_json")
                if data.get("type") == "ack":
                    seq = data.get("seq")
                    if isinstance(seq, bool) or not isinstance(seq, int):
                        return (1007, "invalid_ack")
                    if self.sub is not None:
                        self.sub.ack(seq)
                    elif self._first_ack is None:
                        self._first_ack = seq
                # other types: ignored, so clients may add frames later
            elif msg.type is WSMsgType.BINARY:
                return (1003, "binary_not_supported")
            else:
                # CLOSE/CLOSING/CLOSED, or ERROR (aiohttp already closed with 1009/1002/...)
                return None

    async def _write(self) -> tuple[int, str] | None:
        try:
            return await self._write_inner()
        except (ConnectionError, RuntimeError) as exc:  # the peer went away mid-send
            log.debug("chat stream %s/%s: send failed: %r", self.cid, self.view, exc)
            return None

    async def _write_inner(self) -> tuple[int, str] | None:
        await self._catch_up()
        if self.final_reason is not None:
            return await self._finish(self.final_reason)
        sub = self.sub = self.chat.subscribe(self.cid, self.wake, self._overflowed)
        if self._first_ack is not None:
            sub.ack(self._first_ack)
        # entries stored between the replay above and subscribe() are in the log, not the queue
        await self._catch_up()
        next_beat = self.loop.time() + self.heartbeat
        while True:
            self._flag = False
            if sub.overflowed:
                return (CLOSE_OVERFLOW, "reader_overflow")
            if sub.going_away:
                return (CLOSE_GOING_AWAY, "going_away")
            await self._drain(sub)
            reason = self._end_reason(sub)
            if reason is not None:
                return await self._finish(reason)
            wall = time.time()
            if wall >= self.expires_at:
                await self._send(
                    {
                        "type": "error",
                        "code": "token_expired",
                        "message": "the access token expired; reconnect with a fresh one",
                        "last_seq": self.cursor,
                    }
                )
                return (CLOSE_TOKEN_EXPIRED, "token_expired")
            now = self.loop.time()
            if now >= next_beat:
                await self._send({"type": "heartbeat", "head_seq": await self.chat.head(self.cid)})
                now = self.loop.time()
                next_beat = now + self.heartbeat
            await self._sleep(min(next_beat - now, self.expires_at - wall))

    def _end_reason(self, sub: Subscription) -> str | None:
        if sub.end_reason is not None:
            return sub.end_reason
        ended = self.ended
        if ended is not None and ended.done():
            if ended.cancelled() or ended.exception() is not None:
                return "ended"
            return str(ended.result())
        return None

    async def _drain(self, sub: Subscription) -> None:
        queue = sub.queue
        while queue:
            entry = queue.popleft()
            if entry.seq <= self.cursor:
                continue
            if entry.seq > self.cursor + 1:
                # a hole in the live feed: the log has the missing entries (or says gap)
                await self._catch_up()
                if entry.seq <= self.cursor:
                    continue
            await self._deliver(entry)

    async def _finish(self, reason: str) -> tuple[int, str]:
        if self.sub is not None:
            await self._drain(self.sub)
        await self._catch_up()
        await self._send({"type": "end", "final_seq": self.cursor, "reason": reason})
        return (1000, reason)

    async def _catch_up(self) -> None:
        """Send everything the log holds after the cursor (with gap frames for trimmed runs)."""
        while True:
            gap, entries = await self.chat.read(self.cid, self.cursor, PAGE)
            if gap is not None:
                await self._send({"type": "gap", "from": gap[0], "to": gap[1]})
                self.cursor = gap[1]
            for entry in entries:
                if entry.seq <= self.cursor:
                    continue
                if entry.seq > self.cursor + 1:
                    await self._send({"type": "gap", "from": self.cursor + 1, "to": entry.seq - 1})
                    self.cursor = entry.seq - 1
                await self._deliver(entry)
            if len(entries) < PAGE:
                return

    async def _deliver(self, entry: ChatEntry) -> None:
        if visible(entry, self.view):
            await self._send(entry_json(entry, self.view))
            if self.sub is not None:
                self.sub.sent(entry.seq)
        self.cursor = entry.seq

    async def _send(self, body: dict[str, Any]) -> None:
        await self.ws.send_str(_dumps(body))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _result(task: asyncio.Future[tuple[int, str] | None]) -> tuple[int, str] | None:
    if task.cancelled() or task.exception() is not None:
        if not task.cancelled():
            log.warning("chat stream task failed", exc_info=task.exception())
            return (1011, "internal_error")
        return None
    return task.result()
