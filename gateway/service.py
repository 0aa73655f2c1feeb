"""The domain service: applies the platform's facts and the supervisors' requests.

It asks ``policy.rules`` for every decision, changes the :class:`Store`, writes the audit log
and publishes :class:`DomainEvent`s. It never imports aiohttp and never touches media: the
planes listen to the events (a monitor that ends hangs up its phone, closes its WebRTC leg and
ends its chat stream).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from gateway.domain import (
    Channel,
    Conversation,
    Direction,
    DomainEvent,
    EventType,
    Leg,
    Monitor,
    MonitorMode,
    PlatformEventType,
    VoiceKind,
    new_id,
)
from gateway.errors import ErrorCode, GatewayError, not_found
from gateway.events import EventBus
from gateway.policy import rules
from gateway.policy.audit import AuditLog
from gateway.policy.auth import Principal
from gateway.store import Store

log = logging.getLogger(__name__)


def conversation_json(conversation: Conversation, monitors: list[Monitor]) -> dict[str, Any]:
    """A conversation as ``GET /v1/conversations`` lists it (R11: ``monitored`` and who)."""
    active = [m for m in monitors if m.active]
    return {
        "id": conversation.id,
        "agent": conversation.agent,
        "team": conversation.team,
        "direction": conversation.direction.value,
        "transferred": conversation.transferred,
        "customer": conversation.customer,
        "sessions": {channel: conversation.session_active(channel) for channel in ("chat", "voice")},
        "session_started": {channel: started for channel, started in conversation.sessions.items()},
        "voice_legs": sorted(conversation.voice_legs),
        "monitored": bool(active),
        "monitors": [monitor_brief(m) for m in active],
    }


def monitor_brief(monitor: Monitor) -> dict[str, Any]:
    return {
        "id": monitor.id,
        "supervisor": monitor.supervisor,
        "channels": list(monitor.channels),
        "mode": monitor.mode.value,
    }


def monitor_json(monitor: Monitor) -> dict[str, Any]:
    """A monitor as the API answers it."""
    return {
        **monitor_brief(monitor),
        "conversation": monitor.conversation,
        "voice_blocked_reason": monitor.voice_blocked_reason,
        "voice": {"kind": monitor.voice_kind.value, "uri": monitor.voice_uri} if monitor.voice_kind else None,
        "started_at": monitor.started_at,
        "ended_at": monitor.ended_at,
        "end_reason": monitor.end_reason,
    }


class MonitoringService:
    def __init__(self, store: Store, audit: AuditLog, bus: EventBus) -> None:
        self.store = store
        self.audit = audit
        self.bus = bus

    # ------------------------------------------------------------------ lookups

    def conversation(self, cid: str) -> Conversation:
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            raise not_found("conversation")
        return conversation

    def monitor_of(self, principal: Principal, mid: str) -> Monitor:
        """The caller's own monitor; someone else's is as good as unknown."""
        monitor = self.store.get_monitor(mid)
        if monitor is None or monitor.supervisor != principal.username:
            raise not_found("monitor")
        return monitor

    def listing(self, teams: frozenset[str] | None) -> list[dict[str, Any]]:
        """R11: ongoing conversations of these teams (``None``: all), with monitoring status."""
        return [
            conversation_json(c, self.store.monitors_of(c.id))
            for c in sorted(self.store.conversations(), key=lambda c: c.created_at)
            if not c.ended and (teams is None or rules.may_see(c, teams))
        ]

    def describe(self, conversation: Conversation) -> dict[str, Any]:
        return conversation_json(conversation, self.store.monitors_of(conversation.id))

    # ------------------------------------------------------------------ platform side

    def upsert_conversation(
        self,
        cid: str,
        *,
        direction: Direction,
        agent: str,
        team: str | None,
        customer: dict[str, Any],
        transferred: bool,
        sessions: list[Channel],
    ) -> tuple[Conversation, bool]:
        existing = self.store.get_conversation(cid)
        created = existing is None or existing.ended
        if created:
            conversation = Conversation(
                id=cid, direction=direction, agent=agent, team=team, customer=customer, transferred=transferred
            )
            for channel in sessions:
                conversation.sessions[channel] = conversation.created_at
            self.store.put_conversation(conversation)
            self._publish_conversation(conversation)
            return conversation, True
        assert existing is not None
        # Another agent or team, or a turn to outbound, is a different conversation as far as
        # the rules go (R1, R10): whoever monitored it must not go on doing so.
        reassigned = (existing.agent, existing.team) != (agent, team)
        turned_outbound = existing.direction is not direction and direction is Direction.OUTBOUND
        if (transferred and not existing.transferred) or reassigned or turned_outbound:
            self._end_monitors(existing, "transferred")
        existing.direction, existing.agent, existing.customer = direction, agent, customer
        existing.team = team
        existing.transferred = transferred
        for channel in ("chat", "voice"):
            if channel in sessions and channel not in existing.sessions:
                self._start_session(existing, channel)
            elif channel not in sessions and channel in existing.sessions:
                self._stop_session(existing, channel, f"{channel}_ended")
        existing.touch()
        self._publish_conversation(existing)
        return existing, False

    def apply_platform_event(self, cid: str, event: PlatformEventType) -> Conversation:
        conversation = self.conversation(cid)
        if event is PlatformEventType.CHAT_STARTED:
            self._start_session(conversation, "chat")
        elif event is PlatformEventType.VOICE_STARTED:
            self._start_session(conversation, "voice")
        elif event is PlatformEventType.CHAT_ENDED:
            self._stop_session(conversation, "chat", event.value)
        elif event is PlatformEventType.VOICE_ENDED:
            self._stop_session(conversation, "voice", event.value)
        elif event is PlatformEventType.AGENT_LEFT:
            conversation.agent_left = True
            self._end_monitors(conversation, event.value)
        elif event is PlatformEventType.TRANSFERRED:
            conversation.transferred = True
            self._end_monitors(conversation, event.value)
        elif event is PlatformEventType.ENDED:
            conversation.ended = True
            conversation.sessions.clear()
            self._end_monitors(conversation, event.value)
        conversation.touch()
        self.audit.record("platform_event", conversation=cid, event=event.value)
        if conversation.ended:
            self.bus.publish(DomainEvent(EventType.CONVERSATION_ENDED, cid, conversation.team, {"reason": "ended"}))
            self.store.forget_conversation(cid)
        else:
            self._publish_conversation(conversation)
        return conversation

    def leg_started(self, cid: str, leg: Leg) -> None:
        """SIP ingress of one leg began: voice is active from the first leg."""
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            return
        conversation.voice_legs.add(leg)
        if not conversation.session_active("voice"):
            self._start_session(conversation, "voice")
        conversation.touch()
        self._publish_conversation(conversation)

    def leg_ended(self, cid: str, leg: Leg, reason: str) -> None:
        """SIP ingress of one leg ended. The agent's leg hanging up (or the last leg) ends the
        voice session: a supervisor listens to the agent's call, not to a customer on hold."""
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            return
        conversation.voice_legs.discard(leg)
        if (leg == "agent" or not conversation.voice_legs) and conversation.session_active("voice"):
            self._stop_session(conversation, "voice", "voice_ended")
        conversation.touch()
        self._publish_conversation(conversation)

    def _start_session(self, conversation: Conversation, channel: Channel) -> None:
        if channel in conversation.sessions:
            return
        conversation.sessions[channel] = conversation.updated_at = time.time()
        if channel == "voice":
            # R9: chat monitoring already in progress stays chat only.
            for monitor in self.store.monitors_of(conversation.id):
                reason = rules.voice_blocked_after_voice_start(monitor)
                if reason and monitor.voice_blocked_reason != reason:
                    monitor.voice_blocked_reason = reason
                    self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)

    def _stop_session(self, conversation: Conversation, channel: Channel, event: str) -> None:
        if channel not in conversation.sessions:
            return
        del conversation.sessions[channel]
        monitors = self.store.monitors_of(conversation.id)
        for monitor in rules.voice_taken_away_on(event, monitors):
            self._drop_voice(conversation, monitor, rules.END_VOICE_ENDED)
        for monitor, reason in rules.monitors_ending_on(event, monitors, conversation):
            self._end(conversation, monitor, reason)

    # ------------------------------------------------------------------ supervisor side

    def start_monitor(self, principal: Principal, cid: str, voice: dict[str, Any] | None) -> Monitor:
        conversation = self.conversation(cid)
        try:
            rules.check_may_monitor(conversation, principal.teams)
            grant = rules.grant_channels(conversation, voice is not None, self.store.voice_holder(cid))
            for other in self.store.monitors_of(cid):
                if other.active and other.supervisor == principal.username:
                    raise GatewayError(
                        ErrorCode.ALREADY_MONITORING, "you already monitor this conversation", monitor=other.id
                    )
            monitor = Monitor(
                id=new_id("m"),
                conversation=cid,
                supervisor=principal.username,
                channels=grant.channels,
                voice_blocked_reason=grant.voice_blocked_reason,
            )
            if "voice" in monitor.channels:
                assert voice is not None
                if not self.store.claim_voice(cid, monitor):  # R8, atomic in the store
                    raise GatewayError(
                        ErrorCode.VOICE_MONITOR_BUSY, "another supervisor is already listening to this call"
                    )
                monitor.voice_kind = VoiceKind(voice["kind"])
                monitor.voice_uri = voice.get("uri") if monitor.voice_kind is VoiceKind.SIP else None
        except GatewayError as exc:
            self.audit.record(
                "monitor_start", outcome="refused", actor=principal.username, conversation=cid, code=exc.code
            )
            raise
        self.store.put_monitor(monitor)
        self.audit.record(
            "monitor_start",
            actor=principal.username,
            conversation=cid,
            monitor=monitor.id,
            channels=monitor.channels,
            voice=monitor.voice_kind,
        )
        log.info(
            "monitor started", extra={"conversation": cid, "monitor": monitor.id, "supervisor": principal.username}
        )
        self._publish_monitor(EventType.MONITOR_STARTED, conversation, monitor)
        self._publish_conversation(conversation)
        return monitor

    def leave(self, principal: Principal, mid: str) -> None:
        """R12: leaving is always allowed, also for a monitor that has already ended."""
        monitor = self.monitor_of(principal, mid)
        if not monitor.active:
            return
        conversation = self.store.get_conversation(monitor.conversation)
        self._end(conversation, monitor, rules.END_LEFT)

    def end_monitor(self, mid: str, reason: str) -> None:
        """End a monitor for a reason outside the API (its media failed, its session ended)."""
        monitor = self.store.get_monitor(mid)
        if monitor is None or not monitor.active:
            return
        self._end(self.store.get_conversation(monitor.conversation), monitor, reason)

    def voice_lost(self, mid: str, reason: str) -> None:
        """The voice part of a monitor ended (the phone hung up); chat goes on."""
        monitor = self.store.get_monitor(mid)
        if monitor is None or not monitor.has_voice:
            return
        conversation = self.store.get_conversation(monitor.conversation)
        self._drop_voice(conversation, monitor, reason)

    def check_whisper(self, principal: Principal, mid: str) -> tuple[Conversation, Monitor]:
        return self._checked(principal, mid, "whisper", rules.check_may_whisper)

    def barge(self, principal: Principal, mid: str) -> tuple[Monitor, bool]:
        """Barge in (R6); answers the monitor and whether it just changed to ``barged``."""
        conversation, monitor = self._checked(principal, mid, "barge", rules.check_may_barge)
        changed = monitor.mode is not MonitorMode.BARGED
        if changed:
            monitor.mode = MonitorMode.BARGED
            self.audit.record("barge", actor=principal.username, conversation=conversation.id, monitor=mid)
            self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)
            self._publish_conversation(conversation)
        return monitor, changed

    def check_message(self, principal: Principal, mid: str) -> tuple[Conversation, Monitor]:
        return self._checked(principal, mid, "message_customer", rules.check_may_message_customer)

    def refuse(self, principal: Principal, mid: str, action: str) -> GatewayError:
        """R4: transfer and conference are always refused (and audited)."""
        monitor = self.monitor_of(principal, mid)
        error = rules.refuse_transfer() if action == "transfer" else rules.refuse_conference()
        self.audit.record(
            action,
            outcome="refused",
            actor=principal.username,
            conversation=monitor.conversation,
            monitor=mid,
            code=error.code,
        )
        return error

    def _checked(self, principal: Principal, mid: str, action: str, check: Any) -> tuple[Conversation, Monitor]:
        monitor = self.monitor_of(principal, mid)
        conversation = self.store.get_conversation(monitor.conversation)
        try:
            if conversation is None:
                raise GatewayError(ErrorCode.MONITOR_ENDED, "the conversation has ended")
            rules.check_still_supervises(conversation, principal.teams)
            check(conversation, monitor)
        except GatewayError as exc:
            self.audit.record(
                action,
                outcome="refused",
                actor=principal.username,
                conversation=monitor.conversation,
                monitor=mid,
                code=exc.code,
            )
            raise
        return conversation, monitor

    # ------------------------------------------------------------------ internals

    def _end_monitors(self, conversation: Conversation, event: str) -> None:
        for monitor, reason in rules.monitors_ending_on(event, self.store.monitors_of(conversation.id), conversation):
            self._end(conversation, monitor, reason)

    def _end(self, conversation: Conversation | None, monitor: Monitor, reason: str) -> None:
        monitor.ended_at = time.time()
        monitor.end_reason = reason
        self.store.release_voice(monitor.conversation, monitor.id)
        self.store.put_monitor(monitor)
        self.audit.record(
            "monitor_end",
            actor=monitor.supervisor,
            conversation=monitor.conversation,
            monitor=monitor.id,
            reason=reason,
        )
        log.info("monitor ended", extra={"conversation": monitor.conversation, "monitor": monitor.id, "reason": reason})
        team = conversation.team if conversation else None
        self.bus.publish(
            DomainEvent(
                EventType.MONITOR_ENDED,
                monitor.conversation,
                team,
                {"monitor": monitor_json(monitor), "reason": reason},
            )
        )
        if conversation is not None and not conversation.ended:
            self._publish_conversation(conversation)

    def _drop_voice(self, conversation: Conversation | None, monitor: Monitor, reason: str) -> None:
        monitor.channels = [c for c in monitor.channels if c != "voice"]
        monitor.voice_blocked_reason = reason
        self.store.release_voice(monitor.conversation, monitor.id)
        self.store.put_monitor(monitor)
        self.audit.record(
            "monitor_voice_end",
            actor=monitor.supervisor,
            conversation=monitor.conversation,
            monitor=monitor.id,
            reason=reason,
        )
        if conversation is not None:
            self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)
            self._publish_conversation(conversation)

    def _publish_conversation(self, conversation: Conversation) -> None:
        self.store.put_conversation(conversation)  # every change is published, so saved, here
        self.bus.publish(
            DomainEvent(
                EventType.CONVERSATION_UPDATED,
                conversation.id,
                conversation.team,
                {"item": self.describe(conversation)},
            )
        )

    def _publish_monitor(self, kind: EventType, conversation: Conversation, monitor: Monitor) -> None:
        self.store.put_monitor(monitor)
        self.bus.publish(DomainEvent(kind, conversation.id, conversation.team, {"monitor": monitor_json(monitor)}))
