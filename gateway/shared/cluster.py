"""Several instances as one gateway: who is alive, and which instance holds a conversation's media.

**Registry.** Each instance keeps ``{prefix}instance:{id}`` = its JSON card (API base URL,
SIP address, draining) with a TTL (``ttl``) renewed every third of it, and its id in the set
``{prefix}instances``. A card that expired is a dead instance (``kill -9``); the others see it
within ``ttl``. Each instance caches the live cards (read on every heartbeat) to route to.

**Media owner.** The legs of a conversation must meet on one instance (its SIP worker mixes
them, the supervisor's phone is called from there, WebRTC listeners are served there). The
lease ``{prefix}media:{cid}`` = owner id, with the same TTL, says which: taken by
:meth:`Cluster.claim_media` (a Lua script: free, already ours, or held by an instance whose
card expired: take it; else answer the live owner) when an instance places the first leg or
opens a voice monitor of a conversation nobody holds, renewed while the instance still wants it
(legs, a phone, a listener, a voice slot: ``wanted``), released when it no longer does.
Renewing compares the owner, so an instance whose lease was taken over (it was presumed dead)
learns it, and a crashed owner's conversations are taken over by the next INVITE or monitor
as soon as its card expires.

**Forwarding marker.** Requests one instance forwards to another (a relayed INVITE, a monitor
command) carry a secret every instance reads from ``{prefix}cluster-secret`` (created once,
``SET NX``): the receiving instance handles a request carrying it itself instead of routing it
again (no loops), and a client can not forge it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.shared.connection import FAILURES, RELEASE_IF_HELD, SharedState, text_of

log = logging.getLogger(__name__)

#: KEYS: media lease. ARGV: me, ttl ms, the instance-card key prefix. '' when the lease is now
#: ours (it was free, ours, or its holder's card expired), else the live holder's id.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. current) == 1 then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''
"""
#: KEYS: media lease. ARGV: me, ttl ms. 1 renewed (or taken again: it had expired and nobody
#: took it), 0 another instance holds it now.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Instance:
    """One live instance as the registry shows it."""

    id: str
    api: str  # base URL other instances (and redirected clients) use
    sip_host: str
    sip_port: int
    draining: bool = False

    @property
    def sip(self) -> tuple[str, int]:
        return self.sip_host, self.sip_port

    def card(self) -> str:
        return json.dumps(
            {"id": self.id, "api": self.api, "sip": f"{self.sip_host}:{self.sip_port}", "draining": self.draining}
        )

    @classmethod
    def from_card(cls, raw: bytes | str) -> Instance:
        data = json.loads(raw)
        host, _, port = str(data["sip"]).rpartition(":")
        return cls(str(data["id"]), str(data["api"]), host, int(port), bool(data.get("draining")))


class Cluster:
    """This instance's card in the registry and the media leases it holds."""

    def __init__(self, shared: SharedState, me: Instance, *, ttl: float = 6.0) -> None:
        self._shared = shared
        self._redis = shared.redis
        self.me = me
        self.ttl_ms = max(300, int(ttl * 1000))
        #: live instances (this one included) as read at the last heartbeat
        self.instances: dict[str, Instance] = {}
        #: conversations whose media this instance holds -> monotonic time of the claim
        self.owned: dict[str, float] = {}
        #: the conversations this instance still needs the media of (set by the app's wiring)
        self.wanted: Callable[[], set[str]] = lambda: set()
        self.draining: Callable[[], bool] = lambda: False
        #: told when a media lease of this instance was taken over by another one
        self.on_media_lost: Callable[[str], None] = lambda cid: None
        #: conversations the shared state shows with legs up, and that are not placed here
        self.legs_elsewhere: Callable[[], set[str]] = lambda: set()
        #: told (on one instance) that such a conversation has no media owner any more: the
        #: instance holding its legs died, so they are gone
        self.on_orphaned: Callable[[str], None] = lambda cid: None
        self._suspects: set[str] = set()
        #: the forwarding marker (see the module's docstring); empty until read from Redis
        self.secret = ""
        self._task: asyncio.Task[None] | None = None
        self._beat = asyncio.Event()
        # Back from a Redis outage: renew the card at once (it may have expired meanwhile), before
        # the instance serves again, so no other instance takes its conversations for a dead one's.
        shared.on_reconnect(self._heartbeat_if_started)
        self._claim = self._redis.register_script(_CLAIM)
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(RELEASE_IF_HELD)

    def _key(self, *parts: str) -> str:
        return self._shared.key(*parts)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (when Redis answers; the loop retries otherwise) and keep the card fresh."""
        with contextlib.suppress(*FAILURES):
            await self.heartbeat()
        self._task = asyncio.create_task(self._loop(), name="cluster-heartbeat")

    async def close(self) -> None:
        """Leave the registry and free this instance's media leases at once (a crash frees them
        after the TTL)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(*FAILURES):
            pipe = self._redis.pipeline(transaction=False)
            for cid in self.owned:
                await self._release(keys=[self._key("media", cid)], args=[self.me.id], client=pipe)
            pipe.delete(self._key("instance", self.me.id))
            pipe.srem(self._key("instances"), self.me.id)
            await asyncio.wait_for(pipe.execute(), 1.0)
        self.owned.clear()

    async def _heartbeat_if_started(self) -> None:
        if self._task is not None:
            await self.heartbeat()

    def poke(self) -> None:
        """Heartbeat now (e.g. draining started: the others should know at once)."""
        self._beat.set()

    async def _loop(self) -> None:
        interval = self.ttl_ms / 3000
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), interval)
            self._beat.clear()
            try:
                await self.heartbeat()
            except FAILURES as exc:
                self._shared.mark_down(exc)
            except Exception:
                log.exception("cluster heartbeat failed")

    async def heartbeat(self) -> None:
        """Renew the card, read the others', renew the media leases still wanted, free the rest."""
        me = Instance(self.me.id, self.me.api, self.me.sip_host, self.me.sip_port, self.draining())
        self.me = me
        timeout = self._shared.operation_timeout
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(self._key("instance", me.id), me.card(), px=self.ttl_ms)
        pipe.sadd(self._key("instances"), me.id)
        pipe.set(self._key("cluster-secret"), secrets.token_hex(16), nx=True)
        pipe.get(self._key("cluster-secret"))
        pipe.smembers(self._key("instances"))
        *_, secret, members = await asyncio.wait_for(pipe.execute(), timeout)
        self.secret = text_of(secret)
        ids = sorted(text_of(m) for m in members)
        cards = await asyncio.wait_for(self._redis.mget([self._key("instance", i) for i in ids]), timeout)
        live = {}
        for instance_id, card in zip(ids, cards):
            if card is None:  # expired: that instance died (its id leaves the set)
                await asyncio.wait_for(self._redis.srem(self._key("instances"), instance_id), timeout)
            else:
                live[instance_id] = Instance.from_card(card)
        self.instances = live
        await self._upkeep()
        await self._reap_orphans()

    async def _reap_orphans(self) -> None:
        """Conversations with legs up that no live instance holds the media of: their owner
        died (its lease expired, or was taken over). Looked at on two heartbeats in a row (a normal release is heard of by
        then: the legs' end is published before the lease is released); one instance (``SET
        NX``) reports them."""
        candidates = sorted(self.legs_elsewhere())
        if not candidates:
            self._suspects = set()
            return
        timeout = self._shared.operation_timeout
        holders = await asyncio.wait_for(self._redis.mget([self._key("media", c) for c in candidates]), timeout)
        # no holder, or this instance (it took the media over, e.g. for a new monitor, but its
        # workers do not hold these legs): the legs the shared state shows are a dead instance's
        missing = {cid for cid, holder in zip(candidates, holders) if holder is None or text_of(holder) == self.me.id}
        confirmed, self._suspects = missing & self._suspects, missing - self._suspects
        for cid in sorted(confirmed):
            mine = await asyncio.wait_for(
                self._redis.set(self._key("orphaned", cid), self.me.id, nx=True, px=self.ttl_ms * 10), timeout
            )
            if mine:
                log.warning("the instance holding a conversation's legs is gone", extra={"conversation": cid})
                self.on_orphaned(cid)

    async def _upkeep(self) -> None:
        wanted = self.wanted()
        now = time.monotonic()
        # a claim is kept a little while even before anything needs it: the INVITE that made it
        # is still on its way to a worker, the monitor that made it is still being opened
        keep = [cid for cid, at in self.owned.items() if cid in wanted or now - at < self.ttl_ms / 1000]
        drop = [cid for cid in self.owned if cid not in keep]
        if not keep and not drop:
            return
        pipe = self._redis.pipeline(transaction=False)
        for cid in keep:
            await self._renew(keys=[self._key("media", cid)], args=[self.me.id, self.ttl_ms], client=pipe)
        for cid in drop:
            await self._release(keys=[self._key("media", cid)], args=[self.me.id], client=pipe)
        results = await asyncio.wait_for(pipe.execute(), self._shared.operation_timeout)
        for cid in drop:
            self.owned.pop(cid, None)
        for cid, renewed in zip(keep, results):
            if not renewed:
                self.owned.pop(cid, None)
                log.warning("media of a conversation taken over by another instance", extra={"conversation": cid})
                self.on_media_lost(cid)

    # -- routing ----------------------------------------------------------------------------

    def peer(self, instance_id: str) -> Instance | None:
        """A live instance other than this one."""
        return None if instance_id == self.me.id else self.instances.get(instance_id)

    def peers(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.id != self.me.id]

    def peer_sip_addresses(self) -> set[tuple[str, int]]:
        return {i.sip for i in self.peers()}

    def live_peer(self) -> Instance | None:
        """A live, not draining instance other than this one (for new work while this one drains)."""
        candidates = [i for i in self.peers() if not i.draining]
        return secrets.choice(candidates) if candidates else None

    def is_forwarded(self, marker: str | None) -> bool:
        """Whether a request carries the marker only instances know (it was forwarded by one)."""
        return bool(self.secret) and bool(marker) and secrets.compare_digest(marker or "", self.secret)

    async def claim_media(self, cid: str) -> Instance | None:
        """Hold ``cid``'s media here unless a live instance holds it: ``None`` (it is ours now),
        or that instance. 503 ``state_unavailable`` when Redis does not answer."""
        self._shared.check()
        holder = text_of(
            await self._shared.call(
                self._claim(keys=[self._key("media", cid)], args=[self.me.id, self.ttl_ms, self._key("instance", "")])
            )
        )
        if not holder:
            self.owned.setdefault(cid, time.monotonic())
            return None
        return await self._instance(holder)

    async def media_owner(self, cid: str) -> Instance | None:
        """The live instance other than this one that holds ``cid``'s media, if any (no claim)."""
        self._shared.check()
        holder = await self._shared.call(self._redis.get(self._key("media", cid)))
        if holder is None or text_of(holder) == self.me.id:
            return None
        return await self._instance(text_of(holder))

    async def _instance(self, instance_id: str) -> Instance | None:
        known = self.peer(instance_id)
        if known is not None:
            return known
        card = await self._shared.call(self._redis.get(self._key("instance", instance_id)))
        if card is None:
            return None  # it died since: nobody holds the media
        instance = Instance.from_card(card)
        self.instances[instance.id] = instance
        return instance
