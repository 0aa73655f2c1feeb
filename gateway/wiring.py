"""How the planes react to domain events, and how SIP ingress reports back to the domain.

Kept in one place so the flow is readable: the service publishes an event, and here the chat
plane ends streams, the SIP plane hangs up phones and the WebRTC plane closes listeners.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import cast

from aiohttp import web

from gateway.api.context import BUS, CHAT, JWKS, MEDIA, METRICS, PLANES, RUNTIME, SERVICE, SIP
from gateway.domain import DomainEvent, EventType, Leg
from gateway.metrics import Metrics
from gateway.planes import Planes
from gateway.policy import rules
from gateway.runtime import Runtime
from gateway.service import MonitoringService
from gateway.shared.cluster import Cluster
from gateway.sip.parties import Parties

log = logging.getLogger(__name__)


def attach_planes(app: web.Application) -> None:
    """Subscribe the planes to the domain events (called once, after every plane exists).
    Events from other instances (``event.remote``) end this instance's streams and media of
    what ended there; the chat note and the metrics belong to the instance where it happened."""
    runtime = app[RUNTIME]
    planes = app[PLANES]
    chat = app[CHAT]
    metrics = app[METRICS]

    def on_event(event: DomainEvent) -> None:
        if event.type is EventType.MONITOR_ENDED:
            monitor = event.payload["monitor"]
            mid = monitor["id"]
            reason = event.payload["reason"]
            runtime.end_monitor_streams(mid, reason)
            planes.release_voice(event.conversation, mid)
            if event.remote:
                return  # counted, and the note posted, where it ended
            metrics.monitors_ended.labels(reason=reason).inc()
            if reason == rules.END_LEFT:
                runtime.background.spawn(
                    chat.post(
                        event.conversation,
                        kind="system",
                        sender="system",
                        author=monitor["supervisor"],
                        text=f"supervisor {monitor['supervisor']} left",
                        visibility="all" if monitor["mode"] == "barged" else "agent",
                    )
                )
        elif event.type is EventType.MONITOR_UPDATED:
            monitor = event.payload["monitor"]
            if "voice" not in monitor["channels"] and monitor["voice"] is not None:
                planes.release_voice(event.conversation, monitor["id"])
        elif event.type is EventType.CONVERSATION_ENDED:
            chat.end_conversation(event.conversation, event.payload.get("reason", "ended"))

    app[BUS].listen(on_event)

    def collect() -> None:
        service = app[SERVICE]
        metrics.active_conversations.set(sum(1 for c in service.store.conversations() if not c.ended))
        metrics.active_monitors.set(service.active_monitors())
        metrics.jwks_fetches.set(app[JWKS].fetches)
        sip = planes.sip
        if sip is not None:
            for name, value in sip.stats().items():
                metrics.plane_stats.labels(plane="sip", stat=name).set(value)
        media = app.get(MEDIA)
        if media is not None:
            for name, value in media.stats().items():
                metrics.plane_stats.labels(plane="webrtc", stat=name).set(value)

    metrics.on_scrape(collect)


#: How often each voice monitor's quality is measured, observed and sent to its supervisor.
QUALITY_INTERVAL = 1.0


async def publish_quality(app: web.Application) -> None:
    """Once a second (the workers report their legs as often): the quality of every voice
    monitor heard through this process goes to its supervisor (``monitor_quality``) and into
    the histograms; ``GET /v1/monitors/{mid}`` answers the last figures."""
    while True:
        await asyncio.sleep(QUALITY_INTERVAL)
        try:
            quality_round(app[SERVICE], app[PLANES], app[METRICS])
        except Exception:  # a bug here must not end the measurements for good
            log.exception("measuring the voice quality failed")


def quality_round(service: MonitoringService, planes: Planes, metrics: Metrics) -> None:
    """One measurement of every voice monitor (see :func:`publish_quality`)."""
    monitors = service.voice_monitors()
    planes.quality.retain({m.id for m in monitors})
    for monitor in monitors:
        measured = planes.measure_quality(monitor.id, monitor.conversation)
        if measured is None or measured.path is None:
            continue
        service.publish_quality(monitor, measured.to_json())
        path = measured.path
        if measured.added_ms is not None:
            metrics.voice_added_latency.labels(path=path).observe(measured.added_ms / 1000)
        for report in measured.legs.values():
            if report.packets + report.lost:
                metrics.voice_leg_loss.labels(path=path).observe(report.loss_ratio)
                metrics.voice_leg_jitter.labels(path=path).observe(report.jitter_ms / 1000)


class DomainSipHooks:
    """What the SIP plane asks of and tells the domain (``gateway.sip.plane.SipHooks``)."""

    def __init__(self, service: MonitoringService, runtime: Runtime) -> None:
        self._service = service
        self._runtime = runtime

    def conversation_parties(self, cid: str) -> Parties | None:
        conversation = self._service.store.get_conversation(cid)
        if conversation is None or conversation.ended or conversation.agent_left:
            return None
        addresses = conversation.participants
        return Parties(conversation.agent, tuple(addresses.get("agent", ())), tuple(addresses.get("customer", ())))

    def recording_conversation(self, keys: Sequence[str]) -> str | None:
        conversation = self._service.recording_conversation(list(keys))
        return conversation.id if conversation is not None else None

    def on_streams_attributed(self, cid: str, streams: list[dict[str, str]]) -> None:
        self._service.voice_streams_attributed(cid, streams)

    def accepting(self) -> bool:
        return not self._runtime.draining

    # The SIP plane names its legs "agent" and "customer" only.
    def on_leg_started(self, cid: str, leg: str) -> None:
        self._service.leg_started(cid, cast(Leg, leg))

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None:
        self._service.leg_ended(cid, cast(Leg, leg), reason)

    def on_phone_ended(self, monitor_id: str, reason: str) -> None:
        self._service.voice_lost(monitor_id, reason)


def media_wanted(app: web.Application) -> set[str]:
    """Conversations whose media this instance must keep holding (``Cluster.wanted``): legs or
    calls on its SIP workers, a supervisor phone waiting for the legs, a WebRTC listener, or a
    voice slot it holds (the monitor's listener or phone comes here)."""
    wanted: set[str] = set()
    sip = app.get(SIP)
    if sip is not None:
        wanted |= sip.conversations()
    planes = app[PLANES]
    wanted |= planes.pending_conversations()
    store = app[SERVICE].store
    for mid in planes.listeners:
        monitor = store.get_monitor(mid)
        if monitor is not None:
            wanted.add(monitor.conversation)
    wanted |= set(getattr(store, "leases", {}))
    return wanted


class ClusterMediaOwners:
    """The SIP plane's view of the cluster (``gateway.sip.plane.MediaOwners``)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    async def claim(self, cid: str) -> tuple[str, int] | None:
        owner = await self._cluster.claim_media(cid)
        return owner.sip if owner is not None else None

    async def owner(self, cid: str) -> tuple[str, int] | None:
        owner = await self._cluster.media_owner(cid)
        return owner.sip if owner is not None else None

    @property
    def marker(self) -> str:
        return self._cluster.secret

    def is_marker(self, value: str | None) -> bool:
        return self._cluster.is_forwarded(value)
