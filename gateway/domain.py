"""The domain: conversations, monitors and the events between them.

Plain data, no I/O and no aiohttp. The platform's facts (a conversation exists, its voice
session started, its agent left) become :class:`DomainEvent`s; the policy (``policy.rules``)
decides, and the planes (chat, SIP, WebRTC) react to the events.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

Channel = Literal["chat", "voice"]
#: A SIP voice leg: one party each, or both parties in one stream (a SIPREC client sending one mix).
Leg = Literal["agent", "customer", "mixed"]
#: How the platform forks a conversation's voice: every call while voice is active (``always``),
#: or only while a supervisor listens, when the gateway asks (``on_demand``, ``gateway.fork``).
ForkPolicy = Literal["always", "on_demand"]


@dataclass(frozen=True)
class Principal:
    """The caller, as its access token and its login session say (``policy.auth`` makes them)."""

    username: str
    subject: str
    roles: frozenset[str]
    session: str
    expires_at: float
    client: str
    #: Teams this principal supervises (empty for other roles).
    teams: frozenset[str] = field(default=frozenset())

    def has_role(self, role: str) -> bool:
        return role in self.roles


class Direction(str, Enum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class MonitorMode(str, Enum):
    SILENT = "silent"
    BARGED = "barged"


class VoiceKind(str, Enum):
    WEBRTC = "webrtc"
    SIP = "sip"


def new_id(prefix: str) -> str:
    """A short random id with a readable prefix (``m-3f9c…``)."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass
class Conversation:
    """An ongoing conversation between an agent and a customer, as the platform describes it."""

    id: str
    direction: Direction
    agent: str
    team: str | None
    customer: dict[str, Any] = field(default_factory=dict)
    transferred: bool = False
    #: Start time (epoch seconds) of each active session; absent when not active.
    sessions: dict[Channel, float] = field(default_factory=dict)
    #: Voice legs connected over SIP right now.
    voice_legs: set[Leg] = field(default_factory=set)
    #: Identifiers of the recorded call the platform knows (Session-ID, Call-ID, UCID, GCID,
    #: GUID...): a SIPREC session carrying one belongs to this conversation.
    recording_keys: list[str] = field(default_factory=list)
    #: The parties' addresses (SIP URIs, extensions, E.164 numbers): ``agent`` and ``customer``.
    participants: dict[str, list[str]] = field(default_factory=dict)
    #: Which SIP stream became which leg: ``{"leg", "label", "participant"}`` per connected leg.
    voice_streams: list[dict[str, str]] = field(default_factory=list)
    agent_left: bool = False
    ended: bool = False
    fork: ForkPolicy = "always"
    #: The platform client (token ``azp``) that last PUT the conversation: the one asked to fork.
    platform: str | None = None
    #: ``on_demand``: the id of the ``voice_fork_requested`` the platform has not been released
    #: from yet (``None``: no fork asked for); ``fork_released``: a release was sent since the
    #: last request, so legs still connected are about to go (their BYE is on its way).
    fork_requested: str | None = None
    fork_released: bool = False
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def active(self) -> bool:
        """Ongoing, with at least one active session (rule R3)."""
        return not self.ended and not self.agent_left and bool(self.sessions)

    def session_active(self, channel: Channel) -> bool:
        return channel in self.sessions

    def touch(self) -> None:
        self.updated_at = time.time()


@dataclass
class Monitor:
    """One supervisor silently monitoring one conversation."""

    id: str
    conversation: str
    supervisor: str
    channels: list[Channel]
    mode: MonitorMode = MonitorMode.SILENT
    voice_kind: VoiceKind | None = None
    voice_uri: str | None = None
    #: Why voice was not granted (or was taken away), as a stable code; ``None`` when it was.
    voice_blocked_reason: str | None = None
    #: The voice is granted but waits for the platform's fork (``on_demand``) to connect.
    voice_pending: bool = False
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    end_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.ended_at is None

    @property
    def has_voice(self) -> bool:
        return "voice" in self.channels and self.active


class EventType(str, Enum):
    CONVERSATION_UPDATED = "conversation_updated"
    CONVERSATION_ENDED = "conversation_ended"
    MONITOR_STARTED = "monitor_started"
    MONITOR_UPDATED = "monitor_updated"
    MONITOR_ENDED = "monitor_ended"
    #: Per-leg audio levels of a listening monitor (only its own supervisor gets them).
    LEVELS = "levels"
    #: To the platform that owns an ``on_demand`` conversation: fork its voice to ``sip_uri`` /
    #: stop forking (only platform tokens of that client get them, ``gateway.fork``).
    VOICE_FORK_REQUESTED = "voice_fork_requested"
    VOICE_FORK_RELEASED = "voice_fork_released"
    #: Quality of a monitor's voice, about once a second (only its own supervisor gets it).
    MONITOR_QUALITY = "monitor_quality"


@dataclass(frozen=True)
class DomainEvent:
    """Something that happened; ``team`` scopes who may see it on ``/v1/events``."""

    type: EventType
    conversation: str
    team: str | None
    payload: dict[str, Any]
    at: float = field(default_factory=time.time)
    #: Published by another gateway instance (``gateway.shared.events``): its own reactions
    #: (audit lines, chat notes, metrics) already happened there.
    remote: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type.value, "conversation": self.conversation, "at": self.at, **self.payload}


class PlatformEventType(str, Enum):
    """The facts a platform reports with ``POST /v1/conversations/{cid}/events``."""

    CHAT_STARTED = "chat_started"
    CHAT_ENDED = "chat_ended"
    VOICE_STARTED = "voice_started"
    VOICE_ENDED = "voice_ended"
    AGENT_LEFT = "agent_left"
    TRANSFERRED = "transferred"
    ENDED = "ended"
