""":class:`~gateway.chat.log.ChatLog` on Redis Streams, shared by every instance.

Per conversation (one hash tag, so a Redis Cluster keeps them on one node):

* ``{prefix}chat:{cid}:head``: the last seq assigned (``INCR``; never expires, so the seq goes on
  after trims and retention, and an ended conversation's id is never reused);
* ``{prefix}chat:{cid}:log``: a Stream whose entry ids are ``<seq>-0``, so ``XRANGE`` reads
  after a seq and ``XTRIM MINID`` trims below one; each entry holds one JSON field;
* ``{prefix}chat:{cid}:clients``: ``client_id`` -> seq, for idempotent ingest.

An append is one Lua script (atomic in Redis, whichever instance runs it; the appends of one
instance that wait at the same moment go in one pipeline): an already used
``client_id`` answers the stored entry; otherwise ``INCR`` the head and ``XADD`` with it, so
the seq grows by exactly one. The caller hears the seq only when Redis has answered, and with
``appendfsync always`` Redis answers only once the write is fsynced to its AOF ("durable before
acknowledged"; :meth:`SharedState.check_durability` refuses to start without it unless told
otherwise); ``redis_wait_replicas`` > 0 also waits (``WAIT``) for that many replicas.
Retention (``chat_retention_seconds``): a conversation's entries expire that long after its
last entry; a reader resuming after that gets ``gap`` (the head stays).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from gateway.chat.log import KINDS, SENDERS, VISIBILITIES, ChatEntry
from gateway.errors import state_unavailable
from gateway.shared.connection import SharedState

#: KEYS: head, log, clients. ARGV: client_id ('' for none), entry JSON, retention ms (0: keep).
#: Returns {created (0/1), seq, stored entry JSON if not created}.
_APPEND = """
if ARGV[1] ~= '' then
  local seq = redis.call('HGET', KEYS[3], ARGV[1])
  if seq then
    local found = redis.call('XRANGE', KEYS[2], seq .. '-0', seq .. '-0')
    if #found > 0 then
      return {0, tonumber(seq), found[1][2][2]}
    end
  end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], seq .. '-0', 'e', ARGV[2])
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], seq)
end
local retention = tonumber(ARGV[3])
if retention > 0 then
  redis.call('PEXPIRE', KEYS[2], retention)
  redis.call('PEXPIRE', KEYS[3], retention)
end
return {1, seq}
"""
#: KEYS: log, clients. ARGV: client_id. The stored entry's {seq, JSON}, or {}.
_BY_CLIENT = """
local seq = redis.call('HGET', KEYS[2], ARGV[1])
if not seq then return {} end
local found = redis.call('XRANGE', KEYS[1], seq .. '-0', seq .. '-0')
if #found == 0 then return {} end
return {tonumber(seq), found[1][2][2]}
"""
#: KEYS: head, log. ARGV: below. Deletes entries with seq < min(below, head + 1).
_TRIM = """
local head = tonumber(redis.call('GET', KEYS[1]) or '0')
local below = math.min(tonumber(ARGV[1]), head + 1)
if below <= 1 then return 0 end
return redis.call('XTRIM', KEYS[2], 'MINID', below .. '-0')
"""


class RedisChatLog:
    """The shared chat log (``GATEWAY_REDIS_URL``); see the module's docstring."""

    def __init__(self, shared: SharedState, *, retention_seconds: float = 0.0, wait_replicas: int = 0) -> None:
        self._shared = shared
        self._redis = shared.redis
        self._retention_ms = int(retention_seconds * 1000)
        self._wait_replicas = wait_replicas
        self._append_sha = shared.script(_APPEND)
        self._by_client = self._redis.register_script(_BY_CLIENT)
        self._trim = self._redis.register_script(_TRIM)

    def _keys(self, conversation: str) -> tuple[str, str, str]:
        base = self._shared.key("chat", "{" + conversation + "}")
        return base + ":head", base + ":log", base + ":clients"

    async def append(
        self,
        conversation: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
        ts: float | None = None,
    ) -> tuple[ChatEntry, bool]:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if sender not in SENDERS:
            raise ValueError(f"unknown sender {sender!r}")
        if visibility not in VISIBILITIES:
            raise ValueError(f"unknown visibility {visibility!r}")
        when = time.time() if ts is None else ts
        data = json.dumps([kind, sender, author, text, visibility, client_id, when], separators=(",", ":"))
        args = [*self._keys(conversation), client_id or "", data, self._retention_ms]
        # appends (and head reads) waiting at the same moment share one pipeline; the chat
        # service's per-conversation lock keeps one append per conversation on its way
        created, seq, *stored = await self._shared.call(self._shared.pipelined("EVALSHA", self._append_sha, 3, *args))
        if self._wait_replicas > 0:
            acked = await self._shared.call(self._redis.wait(self._wait_replicas, int(self._shared.timeout * 1000)))
            if acked < self._wait_replicas:
                # stored on the primary but not yet on enough replicas: not acknowledged (a retry
                # with the same client_id answers this entry)
                raise state_unavailable("the chat entry is not on enough Redis replicas yet")
        return _entry(conversation, int(seq), stored[0] if stored else data), bool(created)

    async def get_by_client_id(self, conversation: str, client_id: str) -> ChatEntry | None:
        _, log, clients = self._keys(conversation)
        found = await self._shared.call(self._by_client(keys=[log, clients], args=[client_id]))
        return _entry(conversation, int(found[0]), found[1]) if found else None

    async def read(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        _, log, _ = self._keys(conversation)
        rows: Any = await self._shared.call(self._redis.xrange(log, min=f"{after + 1}-0", count=limit))
        return [_entry(conversation, _seq(entry_id), fields[b"e"]) for entry_id, fields in rows]

    async def head(self, conversation: str) -> int:
        head, _, _ = self._keys(conversation)
        # pipelined: a thousand streams' heartbeats fall due together after a restart
        return int(await self._shared.call(self._shared.pipelined("GET", head)) or 0)

    async def low_water(self, conversation: str) -> int:
        return (await self.read_window(conversation, 0, 0))[0]

    async def read_window(self, conversation: str, after: int, limit: int = 500) -> tuple[int, list[ChatEntry]]:
        head, log, _ = self._keys(conversation)
        # pipelined with whatever else waits (a thousand streams resuming at once); not atomic,
        # and needs not be: an entry trimmed in between only shows as a gap to the stream
        shared = self._shared
        top_seq = shared.pipelined("GET", head)
        first = shared.pipelined("XRANGE", log, "-", "+", "COUNT", 1)
        rows = shared.pipelined("XRANGE", log, f"{after + 1}-0", "+", "COUNT", max(1, limit))
        top, oldest, found = await shared.call(asyncio.gather(top_seq, first, rows))
        # the first entry still stored, or (every entry trimmed or expired) the next seq
        low = _seq(oldest[0][0]) if oldest else int(top or 0) + 1
        entries = [_entry(conversation, _seq(entry_id), fields[b"e"]) for entry_id, fields in found]
        return low, entries[:limit]

    async def trim(self, conversation: str, below: int) -> int:
        head, log, _ = self._keys(conversation)
        return int(await self._shared.call(self._trim(keys=[head, log], args=[below])))

    async def close(self) -> None:
        """Wait for the appends on their way (the connection is the instance's: SharedState.close)."""
        await self._shared.drain_pipeline()


def _seq(entry_id: Any) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return int(raw.split("-", 1)[0])


def _entry(conversation: str, seq: int, data: Any) -> ChatEntry:
    kind, sender, author, text, visibility, client_id, ts = json.loads(data)
    return ChatEntry(conversation, seq, kind, sender, author, text, visibility, client_id, float(ts))
