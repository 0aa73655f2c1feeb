"""The chat plane's one entry point for the control plane: post, read, subscribe, end.

The control plane authenticates, applies the rules (R4-R7) and then calls:

- ``post(cid, kind='message', sender='customer'|'agent', ...)`` for platform messages,
- ``post(cid, kind='whisper', sender='supervisor', author=username, visibility='agent')``,
- ``post(cid, kind='message', sender='supervisor', author=username, visibility='all')`` once
  barged,
- ``post(cid, kind='system', sender='system', ...)`` for "sam joined/left" lines,
- ``end_conversation(cid, reason)`` on ``agent_left``/``ended``/``transferred`` etc.,
- and resolves the monitor's ``ended`` future (given to the websocket handler) when one
  monitor ends.

No aiohttp here (DESIGN §3: the domain never imports aiohttp).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.chat.hub import ChatHub, Subscription
from gateway.chat.log import KINDS, SENDERS, VISIBILITIES, ChatEntry, ChatLog
from gateway.config import Settings
from gateway.errors import ErrorCode, GatewayError
from gateway.policy.limits import TokenBuckets, retry_after

VIEWS = frozenset({"customer", "agent", "monitor"})


def visible(entry: ChatEntry, view: str) -> bool:
    """Whether ``view`` may see ``entry``: the customer never sees ``visibility='agent'``."""
    if view == "customer":
        return entry.visibility == "all"
    if view in ("agent", "monitor"):
        return True
    raise ValueError(f"unknown view {view!r}")


def entry_json(entry: ChatEntry, view: str) -> dict[str, object]:
    """The wire form of an entry for ``view`` (the monitor view also carries ``visibility``)."""
    body: dict[str, object] = {
        "type": "entry",
        "seq": entry.seq,
        "kind": entry.kind,
        "sender": entry.sender,
        "author": entry.author,
        "text": entry.text,
        "ts": entry.ts,
        "client_id": entry.client_id,
    }
    if view != "customer":
        body["visibility"] = entry.visibility
    return body


class ChatService:
    """Durable log + live hub + the chat rules that belong to the chat plane."""

    #: Conversations remembered as ended (so a stream opened just after the end is told so).
    ENDED_MEMORY = 10_000

    def __init__(
        self,
        settings: Settings,
        log: ChatLog,
        hub: ChatHub | None = None,
        *,
        heartbeat_interval: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.log = log
        self.hub = hub if hub is not None else ChatHub(settings.chat_reader_cap)
        self.heartbeat_interval = heartbeat_interval
        rate = settings.chat_rate_per_second
        self._rate: TokenBuckets[tuple[str, str, str | None]] = TokenBuckets(rate, rate, clock=clock)
        self._locks: dict[str, asyncio.Lock] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._going_away = False

    # -- writing -----------------------------------------------------------------------------

    async def post(
        self,
        cid: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
    ) -> tuple[ChatEntry, bool]:
        """Store and fan out one entry; ``(entry, created)``.

        ``created`` is False when ``client_id`` was seen before in this conversation: the
        stored entry is answered again (same seq) and nothing is published. Whispers are
        always stored with ``visibility='agent'``.
        Raises GatewayError 422 ``empty_message`` / ``invalid_message``, 413
        ``message_too_long``, 429 ``rate_limited`` (with ``Retry-After``).
        """
        if kind not in KINDS or sender not in SENDERS or visibility not in VISIBILITIES:
            raise GatewayError(ErrorCode.INVALID_MESSAGE, "unknown kind, sender or visibility")
        if kind == "whisper":
            visibility = "agent"  # R5: a whisper never reaches the customer, whatever asked
        if client_id is not None:
            if not isinstance(client_id, str) or not client_id or len(client_id) > 200:
                raise GatewayError(ErrorCode.INVALID_CLIENT_ID, "client_id must be 1-200 chars")
            existing = await self.log.get_by_client_id(cid, client_id)
            if existing is not None:
                return existing, False
        if not isinstance(text, str):
            raise GatewayError(ErrorCode.INVALID_MESSAGE, "text must be a string")
        if not text.strip():
            raise GatewayError(ErrorCode.EMPTY_MESSAGE, "the message is empty")
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise GatewayError(ErrorCode.MESSAGE_TOO_LONG, f"a message has at most {limit} characters", max_chars=limit)
        if kind != "system":
            self._take_token(cid, sender, author)
        lock = self._locks.get(cid)
        if lock is None:
            lock = self._locks[cid] = asyncio.Lock()
        async with lock:
            # append + publish under one lock: live fan-out stays in seq order even with a
            # log whose append suspends (SqliteChatLog with writer_thread=True, Redis later).
            entry, created = await self.log.append(
                cid,
                kind=kind,
                sender=sender,
                author=author,
                text=text,
                visibility=visibility,
                client_id=client_id,
            )
            if created:
                self.hub.publish(entry)
        return entry, created

    def _take_token(self, cid: str, sender: str, author: str | None) -> None:
        wait = self._rate.take((cid, sender, author))
        if wait > 0:
            err = GatewayError(ErrorCode.RATE_LIMITED, f"at most {self._rate.rate:g} messages per second")
            err.headers["Retry-After"] = retry_after(wait)
            raise err

    # -- reading -----------------------------------------------------------------------------

    visible = staticmethod(visible)

    async def read(self, cid: str, after: int, limit: int = 500) -> tuple[tuple[int, int] | None, list[ChatEntry]]:
        """``(gap, entries)``: entries after ``after``; ``gap=(from, to)`` when the entries
        right after ``after`` were trimmed away."""
        # entries below the low water are gone, so reading after ``after`` starts at the low water
        low, entries = await self.log.read_window(cid, after, limit)
        gap = (after + 1, low - 1) if after + 1 < low else None
        return gap, entries

    async def head(self, cid: str) -> int:
        return await self.log.head(cid)

    async def trim(self, cid: str, below: int) -> int:
        return await self.log.trim(cid, below)

    def subscribe(
        self,
        cid: str,
        wake: Callable[[], None],
        on_overflow: Callable[[], None] | None = None,
    ) -> Subscription:
        """Live entries of ``cid``; if the conversation already ended the subscription is born
        ended (``end_reason`` set)."""
        sub = self.hub.subscribe(cid, wake, on_overflow)
        if self._going_away:
            sub.close()
            sub.going_away = True
            return sub
        reason = self._ended.get(cid)
        if reason is not None:
            sub.close()
            sub._end(reason)
        return sub

    # -- ending ------------------------------------------------------------------------------

    def end_conversation(self, cid: str, reason: str) -> int:
        """Every stream of ``cid`` gets the rest of the log, then ``end`` with ``reason``, then
        is closed. Returns the number of streams told."""
        self._ended[cid] = reason
        self._ended.move_to_end(cid)
        while len(self._ended) > self.ENDED_MEMORY:
            self._ended.popitem(last=False)
        self._rate.forget(lambda key: key[0] == cid)
        lock = self._locks.get(cid)
        if lock is not None and not lock.locked():
            del self._locks[cid]
        return self.hub.end(cid, reason)

    def ended_reason(self, cid: str) -> str | None:
        return self._ended.get(cid)

    def go_away(self) -> int:
        """Server shutdown (call from an ``on_shutdown`` handler):
        every stream closes with 1001 and no ``end``, so clients resume later with ``after``.
        Returns how many."""
        self._going_away = True
        return self.hub.go_away()

    async def close(self) -> None:
        """Close streams (going away) and the log (call from the app's cleanup)."""
        self.go_away()
        await self.log.close()
