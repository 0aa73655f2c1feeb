"""One instance's Redis client, its health, and the pub/sub loop the shared parts listen on.

Health is what makes "never a wrong answer" hold: every read the instance answers from its
local copy of the shared state (:class:`~gateway.shared.store.RedisStore`) is only as fresh as
the pub/sub connection that keeps it up to date. So the instance is *available* only while that
connection is up and its PINGs (every ``timeout`` / 2) are answered within 1.5 x ``timeout``;
otherwise requests get 503 ``state_unavailable`` at once. When the connection comes back, every ``on_reconnect`` callback
runs (the store reloads, since messages sent meanwhile were lost) before the instance is
available again: it recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from hashlib import sha1
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import GatewayError, state_unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[dict[str, Any]], None]

#: What a broken, refused or slow connection raises (redis-py wraps most in RedisError).
FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
#: What says Redis is gone (rather than that it refused one command).
LOST: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
#: Lua, KEYS: a lease. ARGV: its holder's whole value. Deletes the lease only if it still holds
#: that value (1), else 0: a holder never drops a lease another one took after it expired. The
#: voice slot (store.py) and the media-owner lease (cluster.py) both release with it.
RELEASE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class SharedState:
    """The Redis client of this instance (``GATEWAY_REDIS_URL``) and whether it can be trusted now."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        prefix: str = "gw:",
        instance: str | None = None,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.timeout = timeout
        #: An operation's own deadline (a connection from the pool included): longer than the
        #: health check's, so a burst of work is not taken for an outage; an outage is seen by
        #: the health check within ``timeout`` and then refused at once (``check``).
        self.operation_timeout = 5 * timeout
        self.prefix = prefix
        #: This process's name in leases and fanned-out messages (its own are skipped).
        self.instance = instance or secrets.token_hex(6)
        # A bounded pool that makes a burst wait for a connection rather than open one per
        # concurrent command.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=self.operation_timeout,
            socket_timeout=self.operation_timeout,
            socket_connect_timeout=timeout,
        )
        self._pool = pool
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._available = False
        self._handlers: dict[str, Handler] = {}
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._on_lost: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._writes: list[Callable[[Any], None]] = []
        self._queued = 0
        self._written = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._pipeline_queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._pipeline_sender: asyncio.Task[None] | None = None
        self._scripts: dict[str, str] = {}

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- health --------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    def check(self) -> None:
        """Raise 503 ``state_unavailable`` unless Redis answers and the local copy is current."""
        if not self._available:
            raise _unavailable()

    def mark_down(self, exc: BaseException | None = None) -> None:
        if not self._available:
            return
        log.warning("shared state unreachable: %r", exc)
        self._available = False
        for callback in self._on_lost:
            callback()

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time Redis is found gone (e.g. close the ``/v1/events``
        streams: events published meanwhile would be missed, so consoles reconnect and re-read)."""
        self._on_lost.append(callback)

    async def call(self, operation: Awaitable[T]) -> T:
        """Await one Redis operation; a failure (or ``operation_timeout``) is 503 ``state_unavailable``.

        The operation runs in a task of its own, shielded: a caller that is cancelled (a chat
        stream whose client left) stops waiting at once, while the operation finishes and hands
        its connection back. redis-py may swallow a cancellation that lands mid-command, which
        left such a caller running until its next wake-up."""
        task = asyncio.ensure_future(operation)
        task.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(self.operation_timeout):
                return await asyncio.shield(task)
        except TimeoutError as exc:
            # This answer can not be confirmed; whether Redis itself is gone is the pub/sub
            # loop's call (its ping): one slow operation under load does not fail every request.
            task.cancel()
            raise _unavailable() from exc
        except LOST as exc:
            self.mark_down(exc)
            raise _unavailable() from exc
        except RedisError as exc:  # Redis answered, with an error: this request fails, not the instance
            log.error("Redis refused an operation: %r", exc)
            raise _unavailable() from exc

    def pipelined(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command (``EVALSHA`` of a script given to :meth:`script`, ``GET``...);
        the commands queued while a pipeline is on its way go together in the next one: one
        round trip (and one AOF fsync) for a burst, rather than one connection each from the
        pool. Await the result through :meth:`call`."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pipeline_queue.append((command, done))
        if self._pipeline_sender is None or self._pipeline_sender.done():
            self._pipeline_sender = asyncio.create_task(self._send_pipelined())
        return done

    def script(self, body: str) -> str:
        """The SHA of a Lua script for ``pipelined("EVALSHA", sha, ...)`` (loaded when Redis
        does not know it: a new or restarted server)."""
        sha = sha1(body.encode()).hexdigest()
        self._scripts[sha] = body
        return sha

    async def _send_pipelined(self) -> None:
        while self._pipeline_queue:
            batch, self._pipeline_queue = self._pipeline_queue, []
            try:
                results = await self._run_pipeline([command for command, _ in batch])
            except Exception as exc:  # the connection failed: every command of the batch failed
                results = [exc] * len(batch)
            for (_, done), result in zip(batch, results):
                if done.done():
                    continue  # its caller gave up (timeout)
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    async def _run_pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        redo = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if redo:
            for sha in {commands[i][1] for i in redo}:
                await self.redis.script_load(self._scripts[sha])
            for i, result in zip(redo, await self._run_pipeline([commands[i] for i in redo])):
                results[i] = result
        return results

    async def drain_pipeline(self) -> None:
        if self._pipeline_sender is not None:
            await asyncio.gather(self._pipeline_sender, return_exceptions=True)

    async def check_durability(self) -> None:
        """Refuse to start unless Redis fsyncs every write before answering (``appendonly yes``,
        ``appendfsync always``): the chat log acknowledges an entry when Redis has answered."""
        config = await self.call(self.redis.config_get("append*"))
        values = {text_of(k): text_of(v) for k, v in config.items()}
        if values.get("appendonly") != "yes" or values.get("appendfsync") != "always":
            raise RuntimeError(
                f"Redis at {self.url} has appendonly={values.get('appendonly')} "
                f"appendfsync={values.get('appendfsync')}: an acknowledged chat entry could be lost. "
                "Configure appendonly yes + appendfsync always (README, 'Redis'), or set "
                "GATEWAY_REDIS_REQUIRE_FSYNC=false to accept that."
            )

    # -- ordered writes -----------------------------------------------------------------

    def enqueue(self, write: Callable[[Any], None]) -> None:
        """Queue ``write(pipeline)``: writes reach Redis in the order they were queued, batched
        in one MULTI/EXEC. One that fails is retried (with the rest) until Redis takes it, so
        a write must be idempotent (a whole object, a compare-and-delete, a message)."""
        self._writes.append(write)
        self._queued += 1
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every write queued so far is in Redis (503 ``state_unavailable`` if that
        takes longer than ``operation_timeout``)."""
        target = self._queued
        if self._written >= target:
            return
        async with self._progress:
            try:
                async with asyncio.timeout(self.operation_timeout):
                    await self._progress.wait_for(lambda: self._written >= target)
            except TimeoutError:
                raise _unavailable() from None

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._writes:
                batch = list(self._writes)
                try:
                    pipe = self.redis.pipeline(transaction=True)
                    for write in batch:
                        write(pipe)
                    await asyncio.wait_for(pipe.execute(), self.operation_timeout)
                except FAILURES as exc:
                    self.mark_down(exc)
                    await asyncio.sleep(0.2)
                    continue
                del self._writes[: len(batch)]
                self._written += len(batch)
                async with self._progress:
                    self._progress.notify_all()

    # -- pub/sub -------------------------------------------------------------------------

    def on_message(self, channel: str, handler: Handler) -> None:
        """Call ``handler`` with every JSON message another instance publishes on ``channel``."""
        self._handlers[self.key(channel)] = handler

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` each time the pub/sub connection is (re)established, before the
        instance counts as available (e.g. reload what may have been missed)."""
        self._on_reconnect.append(callback)

    def message(self, channel: str, message: dict[str, Any]) -> tuple[str, str]:
        """The Redis channel and the text of ``message``, stamped with this instance's name."""
        return self.key(channel), json.dumps({"from": self.instance, **message}, separators=(",", ":"))

    def publish_on(self, pipe: Any, channel: str, message: dict[str, Any]) -> None:
        """Queue a message on ``pipe`` (a pipeline)."""
        pipe.publish(*self.message(channel, message))

    async def start(self, wait: float | None = None) -> None:
        """Start the pub/sub loop; wait up to ``wait`` s (3 x ``timeout``) for the first
        connection (a gateway started while Redis is down, or not usable, comes up answering
        503 and recovers when Redis does)."""
        self._writer = asyncio.create_task(self._write_loop(), name="shared-state-writer")
        self._task = asyncio.create_task(self._run(), name="shared-state")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), 3 * self.timeout if wait is None else wait)

    async def close(self) -> None:
        await self.drain_pipeline()
        with contextlib.suppress(GatewayError):
            await self.flush()
        tasks = [t for t in (self._task, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.redis.aclose()
        await self._pool.disconnect()

    def _dispatch(self, message: dict[str, Any]) -> None:
        data = json.loads(message["data"])
        if data.get("from") != self.instance:
            handler = self._handlers.get(text_of(message["channel"]))
            if handler is not None:
                handler(data)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                # always one channel at least: PING on a connection in subscribed mode is what
                # tells this instance that Redis answers
                channels = [self.key("health"), *self._handlers]
                await asyncio.wait_for(pubsub.subscribe(*channels), self.timeout)
                if self._writes:  # what was changed here while Redis was away goes first
                    self._wake.set()
                    await self.flush()
                for callback in self._on_reconnect:
                    await callback()
                self._available = True
                self._connected.set()
                backoff = 0.1
                log.info("shared state connected", extra={"instance": self.instance})
                loop = asyncio.get_running_loop()
                last_ping = last_heard = loop.time()
                while True:
                    # Health is judged on this connection alone (its own PINGs), never on the
                    # shared pool, which a burst of requests may keep busy.
                    message = await pubsub.get_message(timeout=self.timeout / 4)
                    now = loop.time()
                    if message is not None:
                        last_heard = now
                        if message.get("type") == "message":
                            self._dispatch(message)
                    if now - last_heard > self.timeout * 1.5:
                        raise TimeoutError(f"no answer from Redis for {now - last_heard:.1f} s")
                    self._available = True
                    if now - last_ping >= self.timeout / 2:
                        await pubsub.ping()
                        last_ping = now
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: unavailable, reconnect, reload
                if not isinstance(exc, LOST) and not self._available:
                    log.error("shared state not usable: %s", exc)  # e.g. Redis without fsync: say so each time
                self.mark_down(exc)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self.timeout)  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(1.0, backoff * 2)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark the outcome of an operation nobody awaits any more (its caller was cancelled) as seen."""
    if not task.cancelled():
        task.exception()


def text_of(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unavailable() -> GatewayError:
    error = state_unavailable()
    error.headers["Retry-After"] = "1"
    return error
