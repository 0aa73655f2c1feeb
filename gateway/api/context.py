"""Typed keys for what the app factory puts into the application (aiohttp ``AppKey``)."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Settings
from gateway.events import EventBus
from gateway.fork import ForkWebhook
from gateway.metrics import Metrics
from gateway.planes import ChatPlane, Listeners, Planes, SipPlane, WebRtcPlane
from gateway.policy.audit import AuditLog
from gateway.policy.auth import Authenticator, Directory, JwksCache
from gateway.runtime import Runtime
from gateway.service import MonitoringService
from gateway.shared.connection import SharedState

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
AUDIT = web.AppKey("audit", AuditLog)
SERVICE = web.AppKey("service", MonitoringService)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
DIRECTORY = web.AppKey("directory", Directory)
JWKS = web.AppKey("jwks", JwksCache)
METRICS = web.AppKey("metrics", Metrics)
#: Draining, background tasks, monitor chat ends, open event sockets (``gateway.runtime``).
RUNTIME = web.AppKey("runtime", Runtime)
#: The media planes as the service drives them.
PLANES = web.AppKey("planes", Planes)
#: The chat plane (``gateway.chat.service.ChatService``).
CHAT = web.AppKey("chat", ChatPlane)
#: The SIP plane (``gateway.sip.plane.SipPlane``), absent when SIP is disabled.
SIP = web.AppKey("sip", SipPlane)
#: The WebRTC media processes (``gateway.media.pool.MediaProcesses``), absent when
#: ``webrtc_processes`` is 0 or SIP is disabled: listeners then run in this process.
MEDIA = web.AppKey("media", WebRtcPlane)
#: WebRTC listeners by monitor id, then session id (``gateway.media.whep.WhepSession``).
WHEP = web.AppKey("whep", Listeners)
#: The instance's Redis connection (``gateway.shared``), present only with ``GATEWAY_REDIS_URL``.
SHARED = web.AppKey("shared", SharedState)
#: The fork webhook (``gateway.fork.ForkWebhook``), present only with ``GATEWAY_FORK_WEBHOOK_URL``.
FORK_WEBHOOK = web.AppKey("fork_webhook", ForkWebhook)
