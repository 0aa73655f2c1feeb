"""How the planes react to domain events, and how SIP ingress reports back to the domain.

Kept in one place so the flow is readable: the service publishes an event, and here the chat
plane ends streams, the SIP plane hangs up phones and the WebRTC plane closes listeners.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.api.context import BUS, CHAT, JWKS, METRICS, SERVICE, SIP, STATE, WHEP
from gateway.domain import DomainEvent, EventType
from gateway.errors import ErrorCode, GatewayError
from gateway.policy import rules

log = logging.getLogger(__name__)
PHONE_BUSY_RETRIES = 10


def background(app: web.Application, coro: Any) -> None:
    """Run a plane's async reaction without blocking the publisher; keep a reference, and log
    (never lose) what it raised."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(_log_failure)
    tasks: set[asyncio.Task[Any]] = app[STATE]["tasks"]
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())


def attach_planes(app: web.Application) -> None:
    """Subscribe the planes to the domain events (called once, after every plane exists)."""
    bus = app[BUS]
    state = app[STATE]
    metrics = app[METRICS]

    def on_event(event: DomainEvent) -> None:
        if event.type is EventType.MONITOR_ENDED:
            monitor = event.payload["monitor"]
            mid = monitor["id"]
            reason = event.payload["reason"]
            metrics.monitors_ended.labels(reason=reason).inc()
            future = state["monitor_end_futures"].pop(mid, None)
            if future is not None and not future.done():
                future.set_result(reason)
            if state["pending_phones"].get(event.conversation) == mid:
                del state["pending_phones"][event.conversation]
            _release_voice(app, mid)
            if app.get(CHAT) is not None and reason == rules.END_LEFT:
                background(
                    app,
                    app[CHAT].post(
                        event.conversation,
                        kind="system",
                        sender="system",
                        author=monitor["supervisor"],
                        text=f"supervisor {monitor['supervisor']} left",
                        visibility="all" if monitor["mode"] == "barged" else "agent",
                    ),
                )
        elif event.type is EventType.MONITOR_UPDATED:
            monitor = event.payload["monitor"]
            if "voice" not in monitor["channels"] and monitor["voice"] is not None:
                _release_voice(app, monitor["id"])
        elif event.type is EventType.CONVERSATION_ENDED and app.get(CHAT) is not None:
            app[CHAT].end_conversation(event.conversation, event.payload.get("reason", "ended"))

    bus.listen(on_event)

    def collect() -> None:
        store = app[SERVICE].store
        conversations = [c for c in store.conversations() if not c.ended]
        metrics.active_conversations.set(len(conversations))
        metrics.active_monitors.set(sum(1 for c in conversations for m in store.monitors_of(c.id) if m.active))
        metrics.jwks_fetches.set(app[JWKS].fetches)
        sip = app.get(SIP)
        if sip is not None:
            for name, value in sip.stats().items():
                metrics.plane_stats.labels(plane="sip", stat=name).set(value)

    metrics.on_scrape(collect)


def _release_voice(app: web.Application, mid: str) -> None:
    """Stop every media path of a monitor's voice: the SIP phone call and WebRTC listeners."""
    sip = app.get(SIP)
    if sip is not None:
        background(app, sip.hang_up_phone(mid))
    for session in app[WHEP].pop(mid, {}).values():
        background(app, session.close())


async def call_supervisor_phone(app: web.Application, mid: str) -> None:
    """Call the phone of a monitor that holds the voice with ``kind: sip``.

    The platform may say voice is on before the SIP legs arrive: the monitor then keeps the
    voice slot and the call is placed when the first leg connects (``on_leg_started``).
    Any other failure takes the voice away with the failure's code as the reason.
    """
    service = app[SERVICE]
    monitor = service.store.get_monitor(mid)
    if monitor is None or not monitor.has_voice or monitor.voice_uri is None:
        return
    sip = app.get(SIP)
    try:
        if sip is None:
            raise GatewayError(ErrorCode.SIP_DISABLED, "SIP is disabled on this gateway")
        for attempt in range(PHONE_BUSY_RETRIES + 1):
            try:
                await sip.call_phone(monitor.conversation, mid, monitor.voice_uri)
                break
            except GatewayError as exc:
                # The previous supervisor's phone may still be hanging up (BYE in flight) when
                # the domain has already handed the voice slot on: give it a moment.
                if exc.code != "voice_monitor_busy" or attempt == PHONE_BUSY_RETRIES:
                    raise
                await asyncio.sleep(0.1)
    except GatewayError as exc:
        if exc.code == "voice_not_active":
            app[STATE]["pending_phones"][monitor.conversation] = mid
            return
        service.voice_lost(mid, exc.code)
    except Exception:  # a hung or dead worker: never keep the voice slot without a phone
        log.exception("calling the supervisor phone failed", extra={"monitor": mid})
        service.voice_lost(mid, rules.END_MEDIA_FAILURE)
    app[STATE]["pending_phones"].pop(monitor.conversation, None)


class DomainSipHooks:
    """What the SIP plane asks of and tells the domain (``gateway.sip.plane.SipHooks``)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def conversation_agent(self, cid: str) -> str | None:
        conversation = self._app[SERVICE].store.get_conversation(cid)
        if conversation is None or conversation.ended or conversation.agent_left:
            return None
        return conversation.agent

    def accepting(self) -> bool:
        return not self._app[STATE].get("draining", False)

    def on_leg_started(self, cid: str, leg: str) -> None:
        self._app[SERVICE].leg_started(cid, leg)  # type: ignore[arg-type]
        pending = self._app[STATE]["pending_phones"].pop(cid, None)
        if pending is not None:
            background(self._app, call_supervisor_phone(self._app, pending))

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None:
        self._app[SERVICE].leg_ended(cid, leg, reason)  # type: ignore[arg-type]

    def on_phone_ended(self, monitor_id: str, reason: str) -> None:
        self._app[SERVICE].voice_lost(monitor_id, reason)
