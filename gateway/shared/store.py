""":class:`~gateway.store.Store` on Redis: every instance sees the same conversations and
monitors, and the voice slot (R8) is a lease.

How it fits the synchronous store interface (the service reads and writes the store between
awaits, and relies on that to keep one request's reads and writes together): each instance
keeps a local copy (a :class:`~gateway.store.MemoryStore`) that answers reads at once. Writes
change the copy and are queued, in order, to the instance's one writer
(:meth:`SharedState.enqueue`), which applies them to Redis and publishes them (one MULTI/EXEC
per batch, events included, so another instance sees a change before its event); every other instance applies what is published to
its copy. ``flush()`` waits until everything written so far is in Redis: the API awaits it
before answering a request (``gateway.api.middleware.state_middleware``), so an answer is
never sent for a change Redis does not have. While Redis does not answer, requests get 503
``state_unavailable``; when it is back, queued writes go out first, then the copy is reloaded.
Supervisors' remembered phones (``GET /v1/me``) are the hash ``{prefix}phones``, written and
published the same way. Conflicting writes to one object from two instances: the last one wins (the object is
written whole); the voice slot is the one cross-instance rule, and it is atomic in Redis.

The voice slot is ``{prefix}voice:{cid}`` = ``monitor|instance|token``, set with ``NX``
semantics by a Lua script, with a TTL (``voice_lease_seconds``) the owning instance renews
every third of it. The token comes from a per-conversation counter, so it only grows (a
fencing token): renewing or releasing compares the whole value, so an owner whose lease
expired (a paused or partitioned instance) is refused and told it lost the slot
(``on_lease_lost``), and a crashed instance's slot frees itself after the TTL. Every instance
checks the slots its copy shows held by others and, when a lease is gone, one of them (``SET NX``)
ends the voice of its monitor (``media_failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from gateway.domain import Conversation, Monitor
from gateway.shared.connection import FAILURES, RELEASE_IF_HELD, SharedState, text_of
from gateway.store import MemoryStore, conversation_from, monitor_from, plain

log = logging.getLogger(__name__)

#: KEYS: lease, fence counter. ARGV: monitor, instance, ttl ms, channel, message. The slot is
#: free, or already this monitor's: take it with a new token (returned) and tell the other
#: instances (in the script: no second round trip); else 0.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '|' then
  return 0
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2] .. '|' .. token, 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return token
"""
#: KEYS: lease. ARGV: the holder's whole value, ttl ms. 1 if renewed, 0 if the lease is not this one.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: KEYS: lease. ARGV: a monitor. Releases the slot if that monitor holds it, whoever's lease it is
#: (the monitor ended on another instance than the one that claimed it).
_RELEASE_MONITOR = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

LeaseLost = Callable[[str, str], None]


class RedisStore(MemoryStore):
    """The shared store of a cluster (``GATEWAY_REDIS_URL``); see the module's docstring."""

    CHANNEL = "state"
    #: Seconds between the two looks at a lease that seems gone (see reap_foreign_leases).
    RECHECK_SECONDS = 0.2

    def __init__(self, shared: SharedState, *, lease_seconds: float = 6.0) -> None:
        super().__init__()
        self._shared = shared
        self._redis = shared.redis
        self._lease_ms = max(1, int(lease_seconds * 1000))
        #: leases this instance holds: conversation -> (monitor, the lease's whole value)
        self.leases: dict[str, tuple[str, str]] = {}
        #: told when a lease of this instance was lost or a foreign holder's lease is gone
        self.on_lease_lost: LeaseLost = lambda cid, mid: None
        self._tasks: list[asyncio.Task[None]] = []
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(RELEASE_IF_HELD)
        shared.on_message(self.CHANNEL, self._apply_remote)
        shared.on_reconnect(self._resync)

    def _key(self, *parts: str) -> str:
        return self._shared.key(*parts)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lease_loop(), name="voice-leases")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # a clean stop frees this instance's slots at once (a crash frees them after the TTL)
        with contextlib.suppress(*FAILURES):
            for cid, (_, value) in list(self.leases.items()):
                await asyncio.wait_for(self._release(keys=[self._key("voice", cid)], args=[value]), 1.0)

    # -- writes: local copy first, then Redis in order -----------------------------------

    def _queue(self, write: Callable[[Any], None]) -> None:
        self._shared.enqueue(write)

    def put_conversation(self, conversation: Conversation) -> None:
        super().put_conversation(conversation)
        data = json.dumps(plain(conversation))

        def write(pipe: Any) -> None:
            pipe.hset(self._key("conversations"), conversation.id, data)
            self._shared.publish_on(pipe, self.CHANNEL, {"put": "conversation", "data": data})

        self._queue(write)

    def put_monitor(self, monitor: Monitor) -> None:
        super().put_monitor(monitor)
        data = json.dumps(plain(monitor))

        def write(pipe: Any) -> None:
            pipe.hset(self._key("monitors"), monitor.id, data)
            self._shared.publish_on(pipe, self.CHANNEL, {"put": "monitor", "data": data})

        self._queue(write)

    def put_phone_uri(self, username: str, uri: str | None) -> None:
        super().put_phone_uri(username, uri)

        def write(pipe: Any) -> None:
            if uri is None:
                pipe.hdel(self._key("phones"), username)
            else:
                pipe.hset(self._key("phones"), username, uri)
            self._shared.publish_on(pipe, self.CHANNEL, {"put": "phone", "user": username, "uri": uri})

        self._queue(write)

    def forget_conversation(self, cid: str) -> None:
        before = set(self._monitors)
        super().forget_conversation(cid)
        gone = sorted(before - set(self._monitors))
        self.leases.pop(cid, None)

        def write(pipe: Any) -> None:
            pipe.hdel(self._key("conversations"), cid)
            if gone:
                pipe.hdel(self._key("monitors"), *gone)
            pipe.delete(self._key("voice", cid), self._key("fence", cid))
            self._shared.publish_on(pipe, self.CHANNEL, {"forget": cid, "monitors": gone})

        self._queue(write)

    async def flush(self) -> None:
        await self._shared.flush()

    def check_available(self) -> None:
        self._shared.check()

    # -- what other instances wrote ------------------------------------------------------

    def _apply_remote(self, message: dict[str, Any]) -> None:
        kind = message.get("put")
        if kind == "conversation":
            MemoryStore.put_conversation(self, conversation_from(json.loads(message["data"])))
        elif kind == "monitor":
            monitor = monitor_from(json.loads(message["data"]))
            MemoryStore.put_monitor(self, monitor)
            lease = self.leases.get(monitor.conversation)
            if lease is not None and lease[0] == monitor.id and not monitor.has_voice:
                # it ended (or lost its voice) on another instance, which freed the slot
                del self.leases[monitor.conversation]
            if not monitor.has_voice and self._voice.get(monitor.conversation) == monitor.id:
                del self._voice[monitor.conversation]  # e.g. its lease expired and another instance reaped it
        elif kind == "phone":
            MemoryStore.put_phone_uri(self, message["user"], message.get("uri"))
        elif "voice" in message:
            cid, mid = message["voice"], message.get("monitor")
            if mid:
                self._voice[cid] = mid
            elif cid in self._voice and cid not in self.leases:
                del self._voice[cid]
        elif "forget" in message:
            MemoryStore.forget_conversation(self, message["forget"])
            for mid in message.get("monitors", []):
                self._monitors.pop(mid, None)

    async def _resync(self) -> None:
        """(Re)connected: reload everything (messages published while the connection was down
        are lost; what this instance queued meanwhile was written first)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(self._key("conversations"))
        pipe.hgetall(self._key("monitors"))
        pipe.hgetall(self._key("phones"))
        conversations, monitors, phones = await asyncio.wait_for(pipe.execute(), self._shared.operation_timeout)
        voice_keys = [self._key("voice", cid.decode()) for cid in conversations]
        holders = (
            await asyncio.wait_for(self._redis.mget(voice_keys), self._shared.operation_timeout) if voice_keys else []
        )
        self._conversations.clear()
        self._monitors.clear()
        self._by_conversation.clear()
        self._voice.clear()
        self._recording_keys.clear()
        self._phones = {text_of(user): text_of(uri) for user, uri in phones.items()}
        for data in conversations.values():
            MemoryStore.put_conversation(self, conversation_from(json.loads(data)))
        for data in sorted(monitors.values(), key=lambda d: json.loads(d)["started_at"]):
            MemoryStore.put_monitor(self, monitor_from(json.loads(data)))
        for cid, holder in zip(conversations, holders):
            if holder:
                self._voice[cid.decode()] = text_of(holder).split("|", 1)[0]

    # -- the voice slot (R8) -------------------------------------------------------------

    async def claim_voice(self, cid: str, monitor: Monitor) -> bool:
        channel, message = self._shared.message(self.CHANNEL, {"voice": cid, "monitor": monitor.id})
        token = await self._shared.call(
            self._claim(
                keys=[self._key("voice", cid), self._key("fence", cid)],
                args=[monitor.id, self._shared.instance, self._lease_ms, channel, message],
            )
        )
        if not token:
            return False
        self.leases[cid] = (monitor.id, f"{monitor.id}|{self._shared.instance}|{int(token)}")
        self._voice[cid] = monitor.id
        return True

    def release_voice(self, cid: str, mid: str) -> None:
        held = self._voice.get(cid) == mid
        super().release_voice(cid, mid)
        lease = self.leases.get(cid)
        if lease is not None and lease[0] == mid:
            del self.leases[cid]
            value = lease[1]

            def write(pipe: Any) -> None:
                pipe.eval(RELEASE_IF_HELD, 1, self._key("voice", cid), value)
                self._shared.publish_on(pipe, self.CHANNEL, {"voice": cid, "monitor": None})

        elif held:  # another instance claimed it; its next renewal finds it gone

            def write(pipe: Any) -> None:
                pipe.eval(_RELEASE_MONITOR, 1, self._key("voice", cid), mid)
                self._shared.publish_on(pipe, self.CHANNEL, {"voice": cid, "monitor": None})

        else:
            return
        self._queue(write)

    async def renew_leases(self) -> None:
        """Renew this instance's leases; a lease that is no longer ours (it expired, and maybe
        another monitor holds the slot now) is lost: its monitor's voice ends."""
        leases = list(self.leases.items())
        if not leases:
            return
        pipe = self._redis.pipeline(transaction=False)
        for cid, (_, value) in leases:
            await self._renew(keys=[self._key("voice", cid)], args=[value, self._lease_ms], client=pipe)
        results = await asyncio.wait_for(pipe.execute(), self._shared.operation_timeout)
        for (cid, (mid, value)), renewed in zip(leases, results):
            if not renewed and self.leases.get(cid) == (mid, value):
                del self.leases[cid]
                if self._voice.get(cid) == mid:
                    del self._voice[cid]
                log.warning("voice lease lost", extra={"conversation": cid, "monitor": mid})
                self.on_lease_lost(cid, mid)

    async def reap_foreign_leases(self) -> None:
        """Slots the copy shows held by another instance whose lease is gone (it crashed):
        free them and end that monitor's voice.

        A slot released normally disappears from Redis a moment before the message saying so
        reaches this instance (another connection), so a missing lease is looked at twice, a
        short while apart: a release has been heard of by then, a crash has not."""
        missing = await self._foreign_leases_missing()
        if not missing:
            return
        await asyncio.sleep(self.RECHECK_SECONDS)
        for cid, mid in await self._foreign_leases_missing(only=missing):
            del self._voice[cid]
            # every instance sees it; one of them ends the monitor's voice (one event, one audit line)
            mine = await asyncio.wait_for(
                self._redis.set(self._key("reaped", cid, mid), self._shared.instance, nx=True, px=self._lease_ms * 10),
                self._shared.operation_timeout,
            )
            if mine:
                log.warning("voice lease of another instance expired", extra={"conversation": cid, "monitor": mid})
                self.on_lease_lost(cid, mid)

    async def _foreign_leases_missing(self, only: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        foreign = [(cid, mid) for cid, mid in self._voice.items() if cid not in self.leases]
        if only is not None:
            foreign = [held for held in foreign if held in only]
        if not foreign:
            return []
        keys = [self._key("voice", cid) for cid, _ in foreign]
        holders = await asyncio.wait_for(self._redis.mget(keys), self._shared.operation_timeout)
        return [
            (cid, mid) for (cid, mid), holder in zip(foreign, holders) if holder is None and self._voice.get(cid) == mid
        ]

    async def _lease_loop(self) -> None:
        interval = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_leases()
                await self.reap_foreign_leases()
            except FAILURES as exc:
                self._shared.mark_down(exc)
            except Exception:
                log.exception("voice lease upkeep failed")
