"""Typed keys for what the app factory puts into the application (aiohttp ``AppKey``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.config import Settings
from gateway.events import EventBus
from gateway.metrics import Metrics
from gateway.policy.audit import AuditLog
from gateway.policy.auth import Authenticator, Directory, JwksCache
from gateway.service import MonitoringService

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", EventBus)
AUDIT = web.AppKey("audit", AuditLog)
SERVICE = web.AppKey("service", MonitoringService)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
DIRECTORY = web.AppKey("directory", Directory)
JWKS = web.AppKey("jwks", JwksCache)
METRICS = web.AppKey("metrics", Metrics)
#: The chat plane (``gateway.chat.service.ChatService``).
CHAT = web.AppKey("chat", Any)
#: The SIP plane (``gateway.sip.plane.SipPlane``), absent when SIP is disabled.
SIP = web.AppKey("sip", Any)
#: WebRTC listeners by monitor id (``gateway.media`` sessions).
WHEP = web.AppKey("whep", dict)
#: Set while draining (SIGTERM): readiness fails, new monitors and calls are refused.
STATE = web.AppKey("state", dict)
