"""State shared by several gateway instances, in Redis (``GATEWAY_REDIS_URL``).

* :mod:`.connection`: the instance's Redis client, its health (``state_unavailable`` while
  Redis does not answer) and the pub/sub loop every other part listens on;
* :mod:`.store`: :class:`~gateway.store.Store` on Redis, with the voice slot (R8) as a lease;
* :mod:`.chat_log`: :class:`~gateway.chat.log.ChatLog` on Redis Streams;
* :mod:`.sessions`: the per-login-session rights (R2) on Redis;
* :mod:`.events`: domain events fanned out to every instance's ``/v1/events``.

Without ``GATEWAY_REDIS_URL`` none of this is imported: one process, SQLite files.
"""
