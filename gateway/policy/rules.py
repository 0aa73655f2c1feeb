"""The rules of the brief (DESIGN.md §2, R1–R12) as pure functions over plain data.

Nothing here does I/O, awaits or mutates: each function looks at a conversation, a monitor or
the caller and either answers a decision or raises :class:`GatewayError` with the rule's stable
code. The service layer (``gateway.service``) applies the decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gateway.domain import (
    Channel,
    Conversation,
    Direction,
    DomainEvent,
    EventType,
    Monitor,
    MonitorMode,
    Principal,
    VoiceKind,
)
from gateway.errors import ErrorCode, GatewayError

# Reasons voice was not granted to a monitor (``voice_blocked_reason``).
VOICE_NOT_ACTIVE = "voice_not_active"
VOICE_STARTED_AFTER_CHAT_MONITORING = "voice_started_after_chat_monitoring"  # R9
VOICE_NOT_REQUESTED = "voice_not_requested"

# Reasons a monitor ends (``monitor_ended.reason``).
END_LEFT = "left"
END_AGENT_LEFT = "agent_left"
END_TRANSFERRED = "transferred"
END_VOICE_ENDED = "voice_ended"
END_CHAT_ENDED = "chat_ended"
END_ENDED = "ended"
END_MEDIA_FAILURE = "media_failure"
#: ``on_demand``: the platform did not fork the voice within ``GATEWAY_FORK_TIMEOUT`` seconds.
END_FORK_TIMEOUT = "fork_timeout"


def supervisor_teams(username: str, group_attributes: Iterable[tuple[str, dict[str, list[str]]]]) -> frozenset[str]:
    """R1: the teams whose ``supervisor`` attribute lists ``username`` (comma-separated usernames).

    ``group_attributes`` yields ``(team_name, attributes)`` as Keycloak represents them
    (each attribute a list of strings).
    """
    teams: set[str] = set()
    for team, attributes in group_attributes:
        for value in attributes.get("supervisor", []):
            if username in {name.strip() for name in value.split(",") if name.strip()}:
                teams.add(team)
    return frozenset(teams)


def check_may_monitor(conversation: Conversation, supervisor_teams: frozenset[str]) -> None:
    """R1, R3, R10: may this supervisor start monitoring this conversation at all?"""
    if conversation.team is None or conversation.team not in supervisor_teams:
        raise GatewayError(ErrorCode.NOT_TEAM_SUPERVISOR, "you do not supervise the team of this conversation's agent")
    if conversation.direction is Direction.OUTBOUND:
        raise GatewayError(ErrorCode.OUTBOUND_NOT_SUPPORTED, "outbound conversations can not be monitored")
    if conversation.transferred:
        raise GatewayError(ErrorCode.TRANSFERRED_NOT_SUPPORTED, "transferred conversations can not be monitored")
    if not conversation.active:
        raise GatewayError(ErrorCode.CONVERSATION_NOT_ACTIVE, "the conversation has no active session")


def check_still_supervises(conversation: Conversation, supervisor_teams: frozenset[str]) -> None:
    """R1 again on every action of a running monitor: rights are those of the caller's login
    session (R2), which may be a newer one than the monitor was started from."""
    if not may_see(conversation, supervisor_teams):
        raise GatewayError(ErrorCode.NOT_TEAM_SUPERVISOR, "you do not supervise the team of this conversation's agent")


def may_see(conversation: Conversation, teams: frozenset[str]) -> bool:
    """Listings and events are scoped to the caller's teams."""
    return conversation.team is not None and conversation.team in teams


def may_see_event(principal: Principal, event: DomainEvent) -> bool:
    """``/v1/events``: audio levels and quality go to their own supervisor only; the platform sees every
    other event, a supervisor those of its teams."""
    if event.type in (EventType.LEVELS, EventType.MONITOR_QUALITY):
        return event.payload.get("supervisor") == principal.username
    if event.type in (EventType.VOICE_FORK_REQUESTED, EventType.VOICE_FORK_RELEASED):
        # for the platform client that owns the conversation only (any platform if none is known)
        owner = event.payload.get("platform")
        return principal.has_role("platform") and (not owner or owner == principal.client)
    if principal.has_role("platform"):
        return True
    return event.team is not None and event.team in principal.teams


def check_may_post(principal: Principal, conversation: Conversation, sender: str) -> None:
    """Chat ingest: the platform posts for either side; an agent only as agent, in its own
    conversation; and only while the chat session is active."""
    if not principal.has_role("platform") and (sender != "agent" or conversation.agent != principal.username):
        raise GatewayError(ErrorCode.NOT_YOUR_CONVERSATION, "an agent may only post as agent in its own conversations")
    if not conversation.session_active("chat"):
        raise GatewayError(ErrorCode.CHAT_NOT_ACTIVE, "the conversation has no active chat session")


def check_may_read_chat(principal: Principal, conversation: Conversation, view: str) -> None:
    """A participant's chat view: the platform reads either; an agent its own agent view."""
    if not principal.has_role("platform") and (view != "agent" or conversation.agent != principal.username):
        raise GatewayError(
            ErrorCode.NOT_YOUR_CONVERSATION, "an agent may only read the agent view of its own conversations"
        )


def check_may_follow_monitor_chat(conversation: Conversation | None, monitor: Monitor, teams: frozenset[str]) -> None:
    """A monitor's chat stream: checked again on every subscribe, so a monitor that ended, or a
    conversation the supervisor no longer sees from this login session (R2), gives no stream."""
    _check_active_monitor(monitor)
    if conversation is None or not may_see(conversation, teams):
        raise GatewayError(ErrorCode.NOT_TEAM_SUPERVISOR, "you do not supervise the team of this conversation's agent")


def check_may_listen_webrtc(conversation: Conversation | None, monitor: Monitor, teams: frozenset[str]) -> Conversation:
    """A WebRTC listener: only for a running monitor that holds the voice with ``kind: webrtc``.
    Answers the monitor's conversation."""
    if conversation is None or not monitor.active:
        raise GatewayError(ErrorCode.MONITOR_ENDED, f"this monitor has ended ({monitor.end_reason})")
    check_still_supervises(conversation, teams)
    if not monitor.has_voice or monitor.voice_kind is not VoiceKind.WEBRTC:
        raise GatewayError(
            ErrorCode.VOICE_NOT_GRANTED,
            "this monitor does not hold the conversation's voice over WebRTC",
            voice_blocked_reason=monitor.voice_blocked_reason,
        )
    return conversation


@dataclass(frozen=True)
class ChannelGrant:
    channels: list[Channel]
    voice_blocked_reason: str | None


def grant_channels(conversation: Conversation, wants_voice: bool, voice_holder: Monitor | None) -> ChannelGrant:
    """R8: which channels a new monitor gets. Chat always; voice only when asked, active and free.

    Raises 409 ``voice_monitor_busy`` when voice is asked for and another monitor holds it.
    """
    if not wants_voice:
        return ChannelGrant(["chat"], VOICE_NOT_REQUESTED if conversation.session_active("voice") else None)
    if not conversation.session_active("voice"):
        return ChannelGrant(["chat"], VOICE_NOT_ACTIVE)
    if voice_holder is not None and voice_holder.active:
        raise GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "another supervisor is already listening to this call")
    return ChannelGrant(["chat", "voice"], None)


def voice_blocked_after_voice_start(monitor: Monitor) -> str | None:
    """R9: a monitor that was chat-only when voice became active stays chat-only."""
    if monitor.active and "voice" not in monitor.channels:
        return VOICE_STARTED_AFTER_CHAT_MONITORING
    return None


def check_may_whisper(conversation: Conversation, monitor: Monitor) -> None:
    """R5: whisper is chat only."""
    _check_active_monitor(monitor)
    if not conversation.session_active("chat"):
        raise GatewayError(ErrorCode.WHISPER_CHAT_ONLY, "whisper is only available for chat")


def check_may_barge(conversation: Conversation, monitor: Monitor) -> None:
    """R6: barge-in is chat only."""
    _check_active_monitor(monitor)
    if not conversation.session_active("chat"):
        raise GatewayError(ErrorCode.BARGE_CHAT_ONLY, "barge-in is only available for chat")


def check_may_message_customer(conversation: Conversation, monitor: Monitor) -> None:
    """R4: a silent monitor can not message the customer; a barged one can (chat only)."""
    _check_active_monitor(monitor)
    if monitor.mode is not MonitorMode.BARGED:
        raise GatewayError(
            ErrorCode.MONITOR_CANNOT_MESSAGE_CUSTOMER, "a silent monitor can not message the customer; barge in first"
        )
    if not conversation.session_active("chat"):
        raise GatewayError(ErrorCode.BARGE_CHAT_ONLY, "messages are only available for chat")


def refuse_transfer() -> GatewayError:
    """R4: monitors never transfer."""
    return GatewayError(ErrorCode.MONITOR_CANNOT_TRANSFER, "a monitoring supervisor can not transfer the conversation")


def refuse_conference() -> GatewayError:
    """R4: monitors never conference."""
    return GatewayError(ErrorCode.MONITOR_CANNOT_CONFERENCE, "a monitoring supervisor can not start a conference")


def _check_active_monitor(monitor: Monitor) -> None:
    if not monitor.active:
        raise GatewayError(ErrorCode.MONITOR_ENDED, f"this monitor has ended ({monitor.end_reason})")


def monitors_ending_on(
    event: str, monitors: Sequence[Monitor], conversation: Conversation
) -> list[tuple[Monitor, str]]:
    """R7, R10 and session ends: which active monitors end because of a platform event, and why.

    ``conversation`` is the state *after* the event was applied.
    """
    active = [m for m in monitors if m.active]
    if event == "agent_left":
        return [(m, END_AGENT_LEFT) for m in active]
    if event == "transferred":
        return [(m, END_TRANSFERRED) for m in active]
    if event == "ended":
        return [(m, END_ENDED) for m in active]
    if not conversation.sessions:
        reason = END_VOICE_ENDED if event == "voice_ended" else END_CHAT_ENDED
        return [(m, reason) for m in active]
    return []


def voice_taken_away_on(event: str, monitors: Sequence[Monitor]) -> list[Monitor]:
    """Monitors that keep chat but lose voice when the voice session ends."""
    if event != "voice_ended":
        return []
    return [m for m in monitors if m.has_voice]
