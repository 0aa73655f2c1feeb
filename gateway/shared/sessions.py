"""The per-login-session rights (R2) in Redis: every instance, and a restarted one, applies
the teams resolved at the session's first request.

``{prefix}session:{subject}|{sid}`` holds the roles and teams as JSON, set once (``SET NX``)
with the session's maximum lifetime as TTL (``session_max_seconds``, Keycloak's "SSO Session
Max"): two instances resolving one new session at once keep the first answer. A session's rights
never change, so each instance also keeps the ones it has read (an LRU): only a session's first
request on an instance reads Redis.
"""

from __future__ import annotations

import json

from gateway.policy.auth import MemorySessionRights, Rights
from gateway.shared.connection import SharedState


class RedisSessionRights:
    def __init__(self, shared: SharedState, *, ttl_seconds: float, local_sessions: int = 50_000) -> None:
        self._shared = shared
        self._ttl_ms = max(1000, int(ttl_seconds * 1000))
        self._local = MemorySessionRights(local_sessions)

    def _key(self, key: str) -> str:
        return self._shared.key("session", key)

    async def get(self, key: str) -> Rights | None:
        rights = self._local.cached(key)
        if rights is not None:
            return rights
        raw = await self._shared.call(self._shared.redis.get(self._key(key)))
        if raw is None:
            return None
        return await self._local.put_first(key, _rights(raw))

    async def put_first(self, key: str, rights: Rights) -> Rights:
        roles, teams = rights
        data = json.dumps({"roles": sorted(roles), "teams": sorted(teams)})
        redis = self._shared.redis
        stored = await self._shared.call(redis.set(self._key(key), data, px=self._ttl_ms, nx=True))
        if not stored:  # another instance resolved this session first: its answer holds
            raw = await self._shared.call(redis.get(self._key(key)))
            if raw is not None:
                rights = _rights(raw)
        return await self._local.put_first(key, rights)


def _rights(raw: bytes | str) -> Rights:
    data = json.loads(raw)
    return frozenset(data["roles"]), frozenset(data["teams"])
