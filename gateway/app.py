"""The application factory: every long-lived resource is a cleanup context.

Start-up and shutdown of each resource sit together in one generator, in dependency order:
(shared state →) identity → chat → core (store, audit, the service) → SIP → wiring (→ dev
tools: the embedded identity provider and the demo platform, from ``devtools/``). With
``GATEWAY_REDIS_URL`` the store, the chat log, the login-session rights and the events are
Redis's (``gateway.shared``); without it, SQLite files and this process. The event bus, the
runtime state and the planes' holder exist from the start: later contexts fill them in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from gateway.api import ops, routes, whep_routes
from gateway.api.context import (
    AUDIT,
    AUTHENTICATOR,
    BUS,
    CHAT,
    CLUSTER,
    DIRECTORY,
    FORK_WEBHOOK,
    FORWARDER,
    JWKS,
    MEDIA,
    METRICS,
    PLANES,
    RUNTIME,
    SERVICE,
    SETTINGS,
    SHARED,
    SIP,
    WHEP,
)
from gateway.api.middleware import ServerLog, errors_middleware, state_middleware
from gateway.config import PACKAGE_DIR, ConfigurationError, Settings
from gateway.domain import DomainEvent
from gateway.events import EventBus
from gateway.fork import ForkSettings, ForkWebhook, WebhookSettings, is_fork_event
from gateway.metrics import Metrics
from gateway.planes import Listeners, Planes
from gateway.policy.audit import AuditLog
from gateway.policy.auth import Authenticator, Directory, JwksCache, SessionRights, TokenValidator
from gateway.policy.limits import TokenBuckets
from gateway.policy.rules import END_MEDIA_FAILURE
from gateway.runtime import Runtime
from gateway.service import MonitoringService
from gateway.store import SqliteStore, Store
from gateway.wiring import ClusterMediaOwners, DomainSipHooks, attach_planes, media_wanted, publish_quality

log = logging.getLogger(__name__)
WEB_DIR = PACKAGE_DIR / "web"


async def shared_ctx(app: web.Application) -> AsyncIterator[None]:
    """The Redis connection; started by :func:`core_ctx` once every shared part listens on it."""
    from gateway.shared.connection import SharedState

    settings = app[SETTINGS]
    shared = SharedState(
        settings.redis_url,
        timeout=settings.redis_timeout,
        prefix=settings.redis_prefix,
        instance=settings.instance_name,
    )
    app[SHARED] = shared
    yield
    await shared.close()


async def identity_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    directory = Directory(settings)
    jwks = JwksCache(directory.certs, settings.jwks_refetch_interval, settings.identity_timeout)
    app[DIRECTORY] = directory
    app[JWKS] = jwks
    rights: SessionRights | None = None
    if SHARED in app:
        from gateway.shared.sessions import RedisSessionRights

        rights = RedisSessionRights(app[SHARED], ttl_seconds=settings.session_max_seconds)
    app[AUTHENTICATOR] = Authenticator(TokenValidator(settings, jwks), directory, rights)

    async def prefetch() -> None:
        # The embedded provider answers on our own port, which listens only after start-up:
        # fetch the keys in the background, retrying until they are there.
        while not jwks.loaded:
            await jwks.refresh(force=True)
            if not jwks.loaded:
                await asyncio.sleep(1)

    task = asyncio.create_task(prefetch())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await directory.aclose()


async def chat_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.chat.log import ChatLog, SqliteChatLog
    from gateway.chat.service import ChatService

    settings = app[SETTINGS]
    log: ChatLog
    if SHARED in app:
        from gateway.shared.chat_log import RedisChatLog

        log = RedisChatLog(
            app[SHARED], retention_seconds=settings.chat_retention_seconds, wait_replicas=settings.redis_wait_replicas
        )
    else:
        log = SqliteChatLog(settings.chat_path)
    chat = ChatService(settings, log)
    if SHARED in app:
        from gateway.shared.events import ChatFanout

        ChatFanout(app[SHARED], chat.hub)
    app[CHAT] = chat

    async def close_streams(app: web.Application) -> None:
        # Before the runner waits for open connections: chat websockets close with 1001
        # (clients resume from their last seq elsewhere), so shutdown never hangs on them.
        chat.go_away()

    app.on_shutdown.append(close_streams)
    yield
    await chat.close()  # closes the log too


async def core_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    audit = AuditLog(settings.audit_path)
    store: Store
    if SHARED in app:
        from gateway.shared.events import EventFanout
        from gateway.shared.store import RedisStore

        shared = app[SHARED]
        redis_store = store = RedisStore(shared, lease_seconds=settings.voice_lease_seconds)
        EventFanout(shared, app[BUS])
        from gateway.api.forwarding import Forwarder
        from gateway.shared.cluster import Cluster, Instance

        me = Instance(settings.instance_name, settings.base_url, *settings.sip_address)
        cluster = app[CLUSTER] = Cluster(shared, me, ttl=settings.voice_lease_seconds)
        app[FORWARDER] = Forwarder(cluster, store)
    else:
        sqlite_store = store = SqliteStore(settings.state_path)
    app[AUDIT] = audit
    service = app[SERVICE] = MonitoringService(
        store,
        audit,
        app[BUS],
        chat=app[CHAT],
        directory=app[DIRECTORY],
        planes=app[PLANES],
        background=app[RUNTIME].background,
        start_limit=TokenBuckets(settings.monitor_starts_per_minute / 60, settings.monitor_start_burst),
        fork=ForkSettings(sip_uri=settings.fork_uri, mode=settings.fork_mode, timeout=settings.fork_timeout),
    )
    if SHARED in app:
        redis_store.on_lease_lost = lambda cid, mid: service.voice_lost(mid, END_MEDIA_FAILURE)
        if settings.redis_require_fsync:
            # on every (re)connection, before the instance serves: a Redis restarted without
            # fsync must not go on acknowledging chat entries it could lose
            shared.on_reconnect(shared.check_durability)
        await shared.start()
        if not shared.available:
            log.warning("started without the shared state (Redis): answering 503 until it is usable")
        await redis_store.start()
    yield
    if SHARED in app:
        # after the planes stopped (their legs' end is published): out of the registry, media leases freed
        await app[CLUSTER].close()
        await app[FORWARDER].close()
        await redis_store.close()
    else:
        sqlite_store.close()
    audit.close()


async def fork_webhook_ctx(app: web.Application) -> AsyncIterator[None]:
    """``GATEWAY_FORK_WEBHOOK_URL``: POST this instance's fork events to the platform too."""
    settings = app[SETTINGS]
    webhook = ForkWebhook(
        WebhookSettings(
            settings.fork_webhook_url,
            settings.fork_webhook_secret,
            attempts=max(1, settings.fork_webhook_attempts),
            timeout=settings.fork_webhook_timeout,
        )
    )

    def on_event(event: DomainEvent) -> None:
        if is_fork_event(event) and not event.remote:  # another instance sends its own
            webhook.send(event)

    app[BUS].listen(on_event)
    app[FORK_WEBHOOK] = webhook
    stats = app[METRICS].plane_stats

    def collect() -> None:  # gateway_plane_stat{plane="fork",stat="webhook_delivered"|"webhook_failed"}
        stats.labels(plane="fork", stat="webhook_delivered").set(webhook.delivered)
        stats.labels(plane="fork", stat="webhook_failed").set(webhook.failed)

    app[METRICS].on_scrape(collect)
    yield
    await webhook.close()


async def sip_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.sip.plane import SipPlane

    owners = ClusterMediaOwners(app[CLUSTER]) if CLUSTER in app else None
    plane = SipPlane(app[SETTINGS], DomainSipHooks(app[SERVICE], app[RUNTIME]), owners=owners)
    await plane.start()
    app[SIP] = plane
    yield
    await plane.stop()


async def media_ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.media.pool import MediaProcesses

    pool = MediaProcesses(app[SETTINGS], app[SIP].forward_frames)
    await pool.start()
    app[MEDIA] = pool
    yield
    await pool.stop()


async def wiring_ctx(app: web.Application) -> AsyncIterator[None]:
    attach_planes(app)

    async def close_event_streams(app: web.Application) -> None:
        # on_shutdown runs before the runner waits for open handlers: consoles reconnect elsewhere.
        for ws in list(app[RUNTIME].event_sockets):
            await ws.close(code=1001, message=b"gateway shutting down")

    app.on_shutdown.append(close_event_streams)
    quality = asyncio.create_task(publish_quality(app)) if SIP in app else None
    if SHARED in app:
        runtime = app[RUNTIME]

        async def close_for_lost_state() -> None:
            for ws in list(runtime.event_sockets):
                await ws.close(code=1013, message=b"shared state unreachable; reconnect")

        # events published while this instance can not hear them would be missed silently
        app[SHARED].on_lost(lambda: runtime.background.spawn(close_for_lost_state()))
        cluster = app[CLUSTER]
        cluster.wanted = lambda: media_wanted(app)
        cluster.draining = lambda: runtime.draining
        service = app[SERVICE]
        placed = app.get(SIP)
        cluster.legs_elsewhere = lambda: {
            c.id
            for c in service.store.conversations()
            if c.voice_legs and not c.ended and (placed is None or c.id not in placed.conversations())
        }
        cluster.on_orphaned = lambda cid: service.legs_lost(cid, END_MEDIA_FAILURE)
        await cluster.start()
    yield
    if quality is not None:
        quality.cancel()
        await asyncio.gather(quality, return_exceptions=True)
    await app[PLANES].close_listeners()
    # The planes' reactions still running are cancelled while the planes still exist.
    await app[RUNTIME].background.cancel_all()


def create_app(settings: Settings | None = None) -> web.Application:
    """Build the gateway for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()
    problem = settings.startup_problem()
    if problem is not None:
        raise ConfigurationError(problem)
    middlewares = [errors_middleware, state_middleware] if settings.redis_url else [errors_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[BUS] = EventBus()
    listeners: Listeners = {}
    app[RUNTIME] = runtime = Runtime()
    app[WHEP] = listeners
    app[PLANES] = Planes(runtime.background, listeners, sip=lambda: app.get(SIP))

    if settings.redis_url:
        app.cleanup_ctx.append(shared_ctx)
    app.cleanup_ctx.append(identity_ctx)
    app.cleanup_ctx.append(chat_ctx)
    app.cleanup_ctx.append(core_ctx)
    if settings.fork_webhook_url:
        app.cleanup_ctx.append(fork_webhook_ctx)
    if settings.enable_sip:
        app.cleanup_ctx.append(sip_ctx)
        if settings.webrtc_processes > 0:
            app.cleanup_ctx.append(media_ctx)
    app.cleanup_ctx.append(wiring_ctx)

    app.router.add_routes(ops.routes)
    app.router.add_routes(routes.routes)
    app.router.add_routes(whep_routes.routes)
    _add_console(app)
    if settings.embedded_idp or settings.demo:
        _add_dev_tools(app, settings)
    return app


def _add_dev_tools(app: web.Application, settings: Settings) -> None:
    """The embedded identity provider and the demo platform are development tools
    (``devtools/`` in the repository), not part of the shipped package."""
    try:
        import devtools
    except ImportError:
        raise ConfigurationError(
            "GATEWAY_DEV=true needs the development tools (devtools/), which this installation does not "
            "include: set GATEWAY_KEYCLOAK_URL, GATEWAY_ADMIN_CLIENT_ID and GATEWAY_ADMIN_CLIENT_SECRET"
        ) from None
    devtools.install(app, settings)


def _add_console(app: web.Application) -> None:
    index = WEB_DIR / "index.html"

    async def console(request: web.Request) -> web.FileResponse:
        return web.FileResponse(index)

    if index.exists():
        app.router.add_get("/", console)
        app.router.add_get("/console", console)
        app.router.add_static("/static/", Path(WEB_DIR), show_index=False)


#: Header limit of the HTTP server: larger than aiohttp's 8 KiB default so that an oversized
#: bearer token reaches the validator and gets a JSON 401 ``invalid_token``, not a bare 400.
MAX_HEADER_BYTES = 32 * 1024


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner every entry point uses (``python -m gateway``, tests, benchmarks)."""
    return web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        logger=ServerLog(),
        max_field_size=MAX_HEADER_BYTES,
        max_line_size=MAX_HEADER_BYTES,
    )
