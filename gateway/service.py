"""The domain service: applies the platform's facts and the supervisors' requests.

A request goes down: the API authenticates and parses, then calls one method here, which asks
``policy.rules`` for every decision, changes the :class:`Store`, writes the audit log, posts to
the chat plane and publishes :class:`DomainEvent`s. It never imports aiohttp, and reaches media
only through :class:`~gateway.planes.Planes` (to call a supervisor's phone): the planes listen
to the events (a monitor that ends hangs up its phone, closes its WebRTC leg and ends its chat
stream, ``gateway.wiring``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

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
    Principal,
    VoiceKind,
    new_id,
)
from gateway.errors import ErrorCode, GatewayError, not_found
from gateway.events import EventBus
from gateway.fork import ForkSettings, fork_event
from gateway.planes import ChatPlane, Planes
from gateway.policy import rules
from gateway.policy.audit import AuditLog
from gateway.policy.limits import TokenBuckets, retry_after
from gateway.runtime import BackgroundTasks
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.chat.log import ChatEntry

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
        # Only legs with media up: a call answered whose media never came holds no stream.
        "voice_streams": [s for s in conversation.voice_streams if s["leg"] in conversation.voice_legs],
        "monitored": bool(active),
        "monitors": [monitor_brief(m) for m in active],
        "fork": conversation.fork,
        "fork_requested": conversation.fork_requested,
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
        "voice_pending": monitor.voice_pending and monitor.has_voice,
        "started_at": monitor.started_at,
        "ended_at": monitor.ended_at,
        "end_reason": monitor.end_reason,
    }


class TeamDirectory(Protocol):
    """Where an agent's team comes from (``policy.auth.Directory``: its Keycloak group)."""

    async def agent_team(self, username: str) -> str | None: ...


class MonitoringService:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        bus: EventBus,
        *,
        chat: ChatPlane,
        directory: TeamDirectory,
        planes: Planes,
        background: BackgroundTasks,
        start_limit: TokenBuckets[str] | None = None,
        fork: ForkSettings | None = None,
    ) -> None:
        self.store = store
        self.audit = audit
        self.bus = bus
        self._chat = chat
        self._directory = directory
        self._planes = planes
        self._background = background
        #: Monitors opened per supervisor (each may ring a phone, post to the agent's view, open a
        #: media tap): start/leave churn is refused with 429 ``monitor_rate_limited``. Leaving never is (R12).
        self._start_limit: TokenBuckets[str] = start_limit if start_limit is not None else TokenBuckets(0, 1)
        #: Fork on demand (``gateway.fork``): where and how the platform is asked to fork.
        self._fork = fork if fork is not None else ForkSettings(sip_uri="sip:127.0.0.1:5060")

    # ------------------------------------------------------------------ shared state

    def check_state(self) -> None:
        """503 ``state_unavailable`` when the (shared) store can not answer truthfully now."""
        self.store.check_available()

    async def committed(self) -> None:
        """Wait until every change so far is where every instance sees it (before an answer)."""
        await self.store.flush()

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

    def listing(self, principal: Principal) -> list[dict[str, Any]]:
        """R11: ongoing conversations of the caller's teams (the platform's: all), with monitoring status."""
        everything = principal.has_role("platform")
        return [
            conversation_json(c, self.store.monitors_of(c.id))
            for c in sorted(self.store.conversations(), key=lambda c: c.created_at)
            if not c.ended and (everything or rules.may_see(c, principal.teams))
        ]

    def visible_conversation(self, principal: Principal, cid: str) -> Conversation:
        """A conversation the caller may see; another team's is as good as unknown."""
        conversation = self.conversation(cid)
        if not principal.has_role("platform") and not rules.may_see(conversation, principal.teams):
            raise not_found("conversation")
        return conversation

    def active_monitors(self) -> int:
        """How many monitors run now (for the metrics, and a draining gateway waits for them)."""
        return sum(
            1 for c in self.store.conversations() if not c.ended for m in self.store.monitors_of(c.id) if m.active
        )

    def describe(self, conversation: Conversation) -> dict[str, Any]:
        return conversation_json(conversation, self.store.monitors_of(conversation.id))

    # ------------------------------------------------------------------ platform side

    async def upsert_conversation(
        self,
        cid: str,
        *,
        direction: Direction,
        agent: str,
        team: str | None,
        customer: dict[str, Any],
        transferred: bool,
        sessions: list[Channel],
        recording_keys: list[str] | None = None,
        participants: dict[str, list[str]] | None = None,
        fork: str = "always",
        platform: str | None = None,
    ) -> tuple[Conversation, bool]:
        """Create or update a conversation; ``(conversation, created)``. Without ``team``, the
        agent's team is its Keycloak group (503 ``identity_unavailable`` if unreachable)."""
        existing = self.store.get_conversation(cid)
        if existing is None or existing.ended:
            # A new conversation may not inherit the chat history of an old one with the same id
            # (possibly another team's): ids are the platform's, and must not be reused.
            if self._chat.ended_reason(cid) is not None or await self._chat.head(cid) > 0:
                raise GatewayError(
                    ErrorCode.CONVERSATION_ID_REUSED, "this conversation id was used before; use a new one"
                )
        if team is None:
            if existing is not None and existing.agent == agent:
                team = existing.team
            else:
                team = await self._directory.agent_team(agent)
        return self._apply_conversation(
            cid,
            direction=direction,
            agent=agent,
            team=team,
            customer=customer,
            transferred=transferred,
            sessions=sessions,
            recording_keys=recording_keys or [],
            participants=participants or {},
            fork=fork,
            platform=platform,
        )

    def _apply_conversation(
        self,
        cid: str,
        *,
        direction: Direction,
        agent: str,
        team: str | None,
        customer: dict[str, Any],
        transferred: bool,
        sessions: list[Channel],
        recording_keys: list[str],
        participants: dict[str, list[str]],
        fork: str = "always",
        platform: str | None = None,
    ) -> tuple[Conversation, bool]:
        existing = self.store.get_conversation(cid)  # again: the awaits above let others change it
        if existing is None or existing.ended:
            conversation = Conversation(
                id=cid,
                direction=direction,
                agent=agent,
                team=team,
                customer=customer,
                transferred=transferred,
                recording_keys=recording_keys,
                participants=participants,
                fork="on_demand" if fork == "on_demand" else "always",
                platform=platform,
            )
            for channel in sessions:
                conversation.sessions[channel] = conversation.created_at
            self.store.put_conversation(conversation)
            self._publish_conversation(conversation)
            return conversation, True
        # Another agent or team, or a turn to outbound, is a different conversation as far as
        # the rules go (R1, R10): whoever monitored it must not go on doing so.
        reassigned = (existing.agent, existing.team) != (agent, team)
        turned_outbound = existing.direction is not direction and direction is Direction.OUTBOUND
        if (transferred and not existing.transferred) or reassigned or turned_outbound:
            self._end_monitors(existing, "transferred")
        existing.direction, existing.agent, existing.customer = direction, agent, customer
        existing.team = team
        existing.transferred = transferred
        existing.recording_keys, existing.participants = recording_keys, participants
        existing.fork = "on_demand" if fork == "on_demand" else "always"
        existing.platform = platform if platform is not None else existing.platform
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

    async def post_message(
        self, principal: Principal, cid: str, sender: str, text: str, client_id: str | None
    ) -> tuple[ChatEntry, bool]:
        """Chat ingest from the platform or the agent; ``(entry, created)`` (a repeated
        ``client_id`` answers the stored entry)."""
        conversation = self.conversation(cid)
        rules.check_may_post(principal, conversation, sender)
        author = conversation.agent if sender == "agent" else str(conversation.customer.get("id") or "customer")
        return await self._chat.post(
            cid, kind="message", sender=sender, author=author, text=text, visibility="all", client_id=client_id
        )

    def chat_view(self, principal: Principal, cid: str, view: str) -> Conversation:
        """A participant's view of the chat (``customer`` or ``agent``), if the caller may read it."""
        conversation = self.conversation(cid)
        rules.check_may_read_chat(principal, conversation, view)
        return conversation

    def recording_conversation(self, keys: list[str]) -> Conversation | None:
        """The ongoing conversation whose platform named one of ``keys`` as a recording key."""
        for key in keys:
            conversation = self.store.conversation_by_recording_key(key)
            if conversation is not None and not conversation.ended:
                return conversation
        return None

    def voice_streams_attributed(self, cid: str, streams: list[dict[str, str]]) -> None:
        """A SIP call of ``cid`` was answered: which of its streams became which leg (replacing
        what an earlier call said for those legs)."""
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            return
        legs = {s["leg"] for s in streams}
        conversation.voice_streams = [s for s in conversation.voice_streams if s["leg"] not in legs] + streams
        conversation.touch()
        self._publish_conversation(conversation)

    def leg_started(self, cid: str, leg: Leg) -> None:
        """SIP ingress of one leg began: voice is active from the first leg, and a supervisor
        phone that waited for the legs is called now."""
        conversation = self.store.get_conversation(cid)
        if conversation is not None and not conversation.ended:
            conversation.voice_legs.add(leg)
            if not conversation.session_active("voice"):
                self._start_session(conversation, "voice")
            for monitor in self.store.monitors_of(cid):
                if monitor.voice_pending:  # the fork it waited for is here
                    monitor.voice_pending = False
                    self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)
            conversation.touch()
            self._publish_conversation(conversation)
        waiting = self._planes.take_pending_phone(cid)
        if waiting is not None:
            self._background.spawn(self._call_phone(waiting))

    def leg_ended(self, cid: str, leg: Leg, reason: str) -> None:
        """SIP ingress of one leg ended. The agent's leg hanging up (or the last leg) ends the
        voice session: a supervisor listens to the agent's call, not to a customer on hold."""
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            return
        conversation.voice_legs.discard(leg)
        conversation.voice_streams = [s for s in conversation.voice_streams if s["leg"] != leg]
        if not conversation.voice_legs:
            conversation.fork_released = False  # the released fork is gone
            if conversation.fork_requested is not None:  # a fork is wanted: its listener waits again
                for monitor in self.store.monitors_of(cid):
                    if monitor.has_voice and not monitor.voice_pending:
                        self._await_fork(monitor, publish=True)
        # An on-demand fork comes and goes with its listeners: the platform, not the legs, says
        # when such a conversation's voice ends.
        on_demand = conversation.fork == "on_demand"
        if (leg == "agent" or not conversation.voice_legs) and conversation.session_active("voice") and not on_demand:
            self._stop_session(conversation, "voice", "voice_ended")
        conversation.touch()
        self._publish_conversation(conversation)

    def legs_lost(self, cid: str, reason: str) -> None:
        """Every leg of ``cid`` ended at once: the instance holding them is gone (a cluster)."""
        conversation = self.store.get_conversation(cid)
        if conversation is None or conversation.ended:
            return
        # the voice its monitors had ended with the media (``reason``), not with the call
        for monitor in self.store.monitors_of(cid):
            if monitor.active and monitor.has_voice:
                self._drop_voice(conversation, monitor, reason)
        for leg in sorted(conversation.voice_legs):
            self.leg_ended(cid, leg, reason)

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

    async def start_monitor(self, principal: Principal, cid: str, voice: dict[str, Any] | None) -> Monitor:
        """Start monitoring (R1, R3, R8-R10); a ``kind: sip`` voice calls the supervisor's phone
        before the answer, so a call that fails at once answers the monitor without voice."""
        monitor = await self._open_monitor(principal, cid, voice)
        # The note to the agent's view is not part of the answer: a chat hiccup must not undo the monitor.
        self._background.spawn(
            self._chat.post(
                cid,
                kind="system",
                sender="system",
                author=principal.username,
                text=f"supervisor {principal.username} joined silently",
                visibility="agent",
            )
        )
        if voice is not None and voice.get("kind") == VoiceKind.SIP.value:
            # the phone the supervisor just chose is the one the console offers next time
            self.remember_phone(principal, voice.get("uri"))
        if monitor.voice_kind is VoiceKind.SIP:
            await self._call_phone(monitor.id)
        return monitor

    # ------------------------------------------------------------------ per-user preferences

    def me(self, principal: Principal) -> dict[str, Any]:
        """``GET /v1/me``: the caller and what is remembered for its username."""
        return {
            "username": principal.username,
            "teams": sorted(principal.teams),
            "phone_uri": self.store.phone_uri(principal.username),
        }

    def remember_phone(self, principal: Principal, uri: str | None) -> None:
        """Remember (``None``: forget) the SIP phone this supervisor listens on."""
        if self.store.phone_uri(principal.username) == uri:
            return
        self.store.put_phone_uri(principal.username, uri)
        self.audit.record("phone_remembered" if uri else "phone_forgotten", actor=principal.username)

    async def _open_monitor(self, principal: Principal, cid: str, voice: dict[str, Any] | None) -> Monitor:
        # Checked first, spent only when a monitor opens: a refused attempt costs the supervisor
        # nothing (and keeps its own code), a concurrent burst is still one event-loop step.
        wait = self._start_limit.wait(principal.username)
        if wait > 0:
            limit = self._start_limit
            error = GatewayError(
                ErrorCode.MONITOR_RATE_LIMITED,
                f"too many monitor starts: at most {limit.burst:g} at once, then {limit.rate * 60:g} a minute",
            )
            error.headers["Retry-After"] = retry_after(wait)
            self.audit.record(
                "monitor_start", outcome="refused", actor=principal.username, conversation=cid, code=error.code
            )
            raise error
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
                if not await self.store.claim_voice(cid, monitor):  # R8, atomic in the store
                    raise GatewayError(
                        ErrorCode.VOICE_MONITOR_BUSY, "another supervisor is already listening to this call"
                    )
                if self.store.get_conversation(cid) is not conversation or conversation.ended:
                    # it ended (or was replaced) while a shared store decided the claim
                    self.store.release_voice(cid, monitor.id)
                    raise not_found("conversation")
                monitor.voice_kind = VoiceKind(voice["kind"])
                monitor.voice_uri = voice.get("uri") if monitor.voice_kind is VoiceKind.SIP else None
        except GatewayError as exc:
            self.audit.record(
                "monitor_start", outcome="refused", actor=principal.username, conversation=cid, code=exc.code
            )
            raise
        self.store.put_monitor(monitor)
        self._start_limit.take(principal.username)
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
        if monitor.has_voice:
            self._request_fork(conversation, monitor)
        self._publish_monitor(EventType.MONITOR_STARTED, conversation, monitor)
        self._publish_conversation(conversation)
        return monitor

    # ------------------------------------------------------------------ fork on demand

    def _request_fork(self, conversation: Conversation, monitor: Monitor) -> None:
        """``on_demand``: a voice monitor was granted; ask the platform for the fork unless one
        is asked for already, or legs are there that no release is taking away."""
        if conversation.fork != "on_demand":
            return
        if conversation.fork_requested is not None or (conversation.voice_legs and not conversation.fork_released):
            return  # asked for already, or forked by the platform on its own
        event = fork_event(EventType.VOICE_FORK_REQUESTED, conversation, self._fork)
        conversation.fork_requested = event.payload["id"]
        self.store.put_conversation(conversation)
        self.audit.record("voice_fork_requested", conversation=conversation.id, event=event.payload["id"])
        self.bus.publish(event)
        # Legs still up here belong to the released fork (their BYE is on its way): the listener
        # hears them meanwhile, and waits again if they go first (``leg_ended``).
        self._await_fork(monitor, publish=False, pending=not conversation.voice_legs)

    def _await_fork(self, monitor: Monitor, *, publish: bool, pending: bool = True) -> None:
        """The monitor waits for the fork's legs, at most ``fork_timeout`` seconds."""
        if pending:
            monitor.voice_pending = True
            self.store.put_monitor(monitor)
            conversation = self.store.get_conversation(monitor.conversation)
            if publish and conversation is not None:
                self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)
        self._background.spawn(self._fork_deadline(monitor.conversation, monitor.id))

    async def _fork_deadline(self, cid: str, mid: str) -> None:
        """No leg by now: the monitor's voice ends (``fork_timeout``), which releases the fork."""
        await asyncio.sleep(self._fork.timeout)
        monitor = self.store.get_monitor(mid)
        conversation = self.store.get_conversation(cid)
        if monitor is None or not monitor.has_voice or conversation is None or conversation.voice_legs:
            return
        log.warning("the platform did not fork in time", extra={"conversation": cid, "monitor": mid})
        self.voice_lost(mid, rules.END_FORK_TIMEOUT)

    def _release_fork(self, conversation: Conversation | None) -> None:
        """``on_demand``: the last voice monitor left; the platform may stop forking (BYE)."""
        if conversation is None or conversation.fork_requested is None:
            return
        if any(m.has_voice for m in self.store.monitors_of(conversation.id)):
            return
        event = fork_event(EventType.VOICE_FORK_RELEASED, conversation, self._fork)
        conversation.fork_requested = None
        conversation.fork_released = True
        self.store.put_conversation(conversation)
        self.audit.record("voice_fork_released", conversation=conversation.id, event=event.payload["id"])
        self.bus.publish(event)

    async def _call_phone(self, mid: str) -> None:
        """Call the phone of a monitor that holds the voice with ``kind: sip``; a call that can not
        be placed takes the voice away, with the failure's code as the reason."""
        monitor = self.store.get_monitor(mid)
        if monitor is None or not monitor.has_voice or monitor.voice_uri is None:
            return
        failure = await self._planes.call_phone(monitor.conversation, mid, monitor.voice_uri)
        if failure is not None:
            self.voice_lost(mid, failure)

    def leave(self, principal: Principal, mid: str) -> None:
        """R12: leaving is always allowed, also for a monitor that has already ended."""
        monitor = self.monitor_of(principal, mid)
        if not monitor.active:
            return
        conversation = self.store.get_conversation(monitor.conversation)
        self._end(conversation, monitor, rules.END_LEFT)

    def voice_lost(self, mid: str, reason: str) -> None:
        """The voice part of a monitor ended (the phone hung up); chat goes on."""
        monitor = self.store.get_monitor(mid)
        if monitor is None or not monitor.has_voice:
            return
        conversation = self.store.get_conversation(monitor.conversation)
        self._drop_voice(conversation, monitor, reason)

    def monitor_chat(self, principal: Principal, mid: str) -> Monitor:
        """The caller's monitor, if its chat may be streamed now (checked on every subscribe)."""
        monitor = self.monitor_of(principal, mid)
        conversation = self.store.get_conversation(monitor.conversation)
        rules.check_may_follow_monitor_chat(conversation, monitor, principal.teams)
        return monitor

    async def whisper(self, principal: Principal, mid: str, text: str, client_id: str | None) -> ChatEntry:
        """R5: a chat line to the agent only."""
        return await self._supervisor_line(
            principal, mid, text, client_id, action="whisper", check=rules.check_may_whisper, audited_as="whisper"
        )

    async def barge(self, principal: Principal, mid: str) -> Monitor:
        """Barge in (R6): the monitor turns ``barged`` and everyone in the chat is told, once."""
        conversation, monitor = self._checked(principal, mid, "barge", rules.check_may_barge)
        if monitor.mode is MonitorMode.BARGED:
            return monitor
        monitor.mode = MonitorMode.BARGED
        self.audit.record("barge", actor=principal.username, conversation=conversation.id, monitor=mid)
        self._publish_monitor(EventType.MONITOR_UPDATED, conversation, monitor)
        self._publish_conversation(conversation)
        await self._chat.post(
            monitor.conversation,
            kind="system",
            sender="system",
            author=principal.username,
            text=f"supervisor {principal.username} joined the conversation",
            visibility="all",
        )
        return monitor

    def check_message(self, principal: Principal, mid: str) -> None:
        """R4: may this monitor message the customer (audited when refused)?"""
        self._checked(principal, mid, "message_customer", rules.check_may_message_customer)

    async def message_customer(self, principal: Principal, mid: str, text: str, client_id: str | None) -> ChatEntry:
        """R4: a barged monitor's chat line to everyone."""
        return await self._supervisor_line(
            principal,
            mid,
            text,
            client_id,
            action="message_customer",
            check=rules.check_may_message_customer,
            audited_as="barged_message",
        )

    async def _supervisor_line(
        self,
        principal: Principal,
        mid: str,
        text: str,
        client_id: str | None,
        *,
        action: str,
        check: Callable[[Conversation, Monitor], None],
        audited_as: str,
    ) -> ChatEntry:
        """Post a supervisor's chat line once ``check`` allows it: a whisper reaches the agent's
        view only, a barged message everyone's; either way it is audited with its ``seq``."""
        conversation, monitor = self._checked(principal, mid, action, check)
        whisper = action == "whisper"
        entry, _ = await self._chat.post(
            conversation.id,
            kind="whisper" if whisper else "message",
            sender="supervisor",
            author=principal.username,
            text=text,
            visibility="agent" if whisper else "all",
            client_id=client_id,
        )
        self.audit.record(
            audited_as, actor=principal.username, conversation=conversation.id, monitor=monitor.id, seq=entry.seq
        )
        return entry

    # ------------------------------------------------------------------ WebRTC listeners

    def check_may_listen(self, principal: Principal, mid: str) -> tuple[Conversation, Monitor]:
        """The caller's monitor, if a WebRTC listener may start for it now."""
        monitor = self.monitor_of(principal, mid)
        conversation = self.store.get_conversation(monitor.conversation)
        return rules.check_may_listen_webrtc(conversation, monitor, principal.teams), monitor

    def listener_started(self, monitor: Monitor, session_id: str) -> None:
        """A listener of ``monitor`` answered; refused if the monitor lost the voice meanwhile."""
        if self.store.get_monitor(monitor.id) is None or not monitor.has_voice:
            raise GatewayError(ErrorCode.VOICE_NOT_GRANTED, "the monitor ended while the offer was answered")
        self.audit.record(
            "webrtc_listen",
            actor=monitor.supervisor,
            conversation=monitor.conversation,
            monitor=monitor.id,
            session=session_id,
        )

    def publish_levels(self, monitor: Monitor, team: str | None, agent_dbfs: float, customer_dbfs: float) -> None:
        """A listener's audio levels (about ten a second), for its own supervisor's console."""
        self.bus.publish(
            DomainEvent(
                EventType.LEVELS,
                monitor.conversation,
                team,
                {
                    "monitor": monitor.id,
                    "supervisor": monitor.supervisor,
                    "agent": round(agent_dbfs, 1),
                    "customer": round(customer_dbfs, 1),
                },
            )
        )

    def voice_monitors(self) -> list[Monitor]:
        """The active monitors holding voice (the quality of each is measured once a second)."""
        return [
            m
            for c in self.store.conversations()
            if not c.ended and c.session_active("voice")
            for m in self.store.monitors_of(c.id)
            if m.has_voice
        ]

    def monitor_view(self, principal: Principal, mid: str) -> dict[str, Any]:
        """``GET /v1/monitors/{mid}``: the caller's monitor and its voice's last quality figures."""
        monitor = self.monitor_of(principal, mid)
        quality = self._planes.quality.get(mid) if monitor.has_voice else None
        return {**monitor_json(monitor), "quality": quality}

    def publish_quality(self, monitor: Monitor, quality: dict[str, Any]) -> None:
        """A voice monitor's quality figures (about once a second), for its own supervisor."""
        conversation = self.store.get_conversation(monitor.conversation)
        self.bus.publish(
            DomainEvent(
                EventType.MONITOR_QUALITY,
                monitor.conversation,
                conversation.team if conversation is not None else None,
                {"monitor": monitor.id, "supervisor": monitor.supervisor, "quality": quality},
            )
        )

    def inbound_rtp_dropped(self, monitor: Monitor, total: int) -> None:
        """The answer is sendonly, so a browser should send nothing: the first packet it sends
        anyway (dropped) is audited."""
        if total == 1:
            self.audit.record(
                "webrtc_inbound_rtp_dropped",
                actor=monitor.supervisor,
                conversation=monitor.conversation,
                monitor=monitor.id,
            )

    # ------------------------------------------------------------------ refusals

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

    def _checked(
        self, principal: Principal, mid: str, action: str, check: Callable[[Conversation, Monitor], None]
    ) -> tuple[Conversation, Monitor]:
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
        self._release_fork(conversation)
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
        self._release_fork(conversation)
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
