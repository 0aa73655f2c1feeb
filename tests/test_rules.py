"""The pure rules module (R1–R12) on plain data: no app, no network."""

from __future__ import annotations

import pytest

from gateway.domain import Conversation, Direction, DomainEvent, EventType, Monitor, MonitorMode, Principal, VoiceKind
from gateway.errors import ErrorCode, GatewayError
from gateway.policy import rules

pytestmark = pytest.mark.unit


def _conv(**kw: object) -> Conversation:
    base: dict[str, object] = dict(id="c", direction=Direction.INBOUND, agent="alice", team="team-a")
    base.update(kw)
    conversation = Conversation(**base)  # type: ignore[arg-type]
    if "sessions" not in kw:
        conversation.sessions = {"chat": 1.0, "voice": 1.0}
    return conversation


def _principal(username: str, *roles: str, teams: frozenset[str] = frozenset()) -> Principal:
    return Principal(username, username, frozenset(roles), "session", 0.0, "console", teams)


def _code(call: object, *args: object) -> str:
    with pytest.raises(GatewayError) as refused:
        call(*args)  # type: ignore[operator]
    return refused.value.code


def test_r1_supervisor_attribute_is_a_comma_separated_list() -> None:
    groups = [
        ("team-a", {"supervisor": ["sam, tom"]}),
        ("team-b", {"supervisor": ["sue"]}),
        ("team-c", {"supervisor": ["samuel"]}),
        ("team-d", {}),
    ]
    assert rules.supervisor_teams("sam", groups) == {"team-a"}
    assert rules.supervisor_teams("tom", groups) == {"team-a"}
    assert rules.supervisor_teams("sue", groups) == {"team-b"}
    assert rules.supervisor_teams("nora", groups) == frozenset()
    assert rules.supervisor_teams("sa", groups) == frozenset()  # no substring matches


def test_may_monitor_order_of_refusals() -> None:
    assert _code(rules.check_may_monitor, _conv(), frozenset({"team-b"})) == ErrorCode.NOT_TEAM_SUPERVISOR
    assert _code(rules.check_may_monitor, _conv(team=None), frozenset({"team-a"})) == ErrorCode.NOT_TEAM_SUPERVISOR
    assert (
        _code(rules.check_may_monitor, _conv(direction=Direction.OUTBOUND), frozenset({"team-a"}))
        == ErrorCode.OUTBOUND_NOT_SUPPORTED
    )
    assert (
        _code(rules.check_may_monitor, _conv(transferred=True), frozenset({"team-a"}))
        == ErrorCode.TRANSFERRED_NOT_SUPPORTED
    )
    assert (
        _code(rules.check_may_monitor, _conv(sessions={}), frozenset({"team-a"})) == ErrorCode.CONVERSATION_NOT_ACTIVE
    )
    assert (
        _code(rules.check_may_monitor, _conv(agent_left=True), frozenset({"team-a"}))
        == ErrorCode.CONVERSATION_NOT_ACTIVE
    )
    rules.check_may_monitor(_conv(), frozenset({"team-a"}))


def test_r8_grant_channels() -> None:
    holder = Monitor(id="m1", conversation="c", supervisor="sam", channels=["chat", "voice"])
    assert rules.grant_channels(_conv(), True, None).channels == ["chat", "voice"]
    assert _code(rules.grant_channels, _conv(), True, holder) == ErrorCode.VOICE_MONITOR_BUSY
    holder.ended_at = 1.0
    assert rules.grant_channels(_conv(), True, holder).channels == ["chat", "voice"]
    chat_only = rules.grant_channels(_conv(sessions={"chat": 1.0}), True, None)
    assert chat_only.channels == ["chat"] and chat_only.voice_blocked_reason == rules.VOICE_NOT_ACTIVE
    assert rules.grant_channels(_conv(), False, None).voice_blocked_reason == rules.VOICE_NOT_REQUESTED


def test_r4_r5_r6_chat_only_actions() -> None:
    silent = Monitor(id="m", conversation="c", supervisor="sam", channels=["chat"])
    voice_only = _conv(sessions={"voice": 1.0})
    assert _code(rules.check_may_whisper, voice_only, silent) == ErrorCode.WHISPER_CHAT_ONLY
    assert _code(rules.check_may_barge, voice_only, silent) == ErrorCode.BARGE_CHAT_ONLY
    assert _code(rules.check_may_message_customer, _conv(), silent) == ErrorCode.MONITOR_CANNOT_MESSAGE_CUSTOMER
    silent.mode = MonitorMode.BARGED
    rules.check_may_message_customer(_conv(), silent)
    assert rules.refuse_transfer().code == ErrorCode.MONITOR_CANNOT_TRANSFER
    assert rules.refuse_conference().code == ErrorCode.MONITOR_CANNOT_CONFERENCE
    silent.ended_at = 2.0
    assert _code(rules.check_may_whisper, _conv(), silent) == ErrorCode.MONITOR_ENDED


def test_r7_r10_and_session_ends() -> None:
    monitors = [Monitor(id=f"m{i}", conversation="c", supervisor=f"s{i}", channels=["chat"]) for i in range(3)]
    monitors[2].ended_at = 1.0
    assert [(m.id, r) for m, r in rules.monitors_ending_on("agent_left", monitors, _conv())] == [
        ("m0", "agent_left"),
        ("m1", "agent_left"),
    ]
    assert {r for _, r in rules.monitors_ending_on("transferred", monitors, _conv())} == {"transferred"}
    assert rules.monitors_ending_on("voice_ended", monitors, _conv(sessions={"chat": 1.0})) == []
    assert {r for _, r in rules.monitors_ending_on("voice_ended", monitors, _conv(sessions={}))} == {"voice_ended"}
    listening = Monitor(id="v", conversation="c", supervisor="sam", channels=["chat", "voice"])
    assert rules.voice_taken_away_on("voice_ended", [listening, monitors[0]]) == [listening]


def test_r9_chat_monitor_stays_chat_only() -> None:
    chat = Monitor(id="m", conversation="c", supervisor="sam", channels=["chat"])
    assert rules.voice_blocked_after_voice_start(chat) == rules.VOICE_STARTED_AFTER_CHAT_MONITORING
    voice = Monitor(id="v", conversation="c", supervisor="tom", channels=["chat", "voice"])
    assert rules.voice_blocked_after_voice_start(voice) is None


def test_chat_participants() -> None:
    platform, alice, bob = _principal("p", "platform"), _principal("alice", "agent"), _principal("bob", "agent")
    rules.check_may_post(platform, _conv(), "customer")
    rules.check_may_post(alice, _conv(), "agent")
    assert _code(rules.check_may_post, alice, _conv(), "customer") == ErrorCode.NOT_YOUR_CONVERSATION
    assert _code(rules.check_may_post, bob, _conv(), "agent") == ErrorCode.NOT_YOUR_CONVERSATION
    assert _code(rules.check_may_post, platform, _conv(sessions={"voice": 1.0}), "agent") == ErrorCode.CHAT_NOT_ACTIVE
    rules.check_may_read_chat(platform, _conv(), "customer")
    rules.check_may_read_chat(alice, _conv(), "agent")
    assert _code(rules.check_may_read_chat, alice, _conv(), "customer") == ErrorCode.NOT_YOUR_CONVERSATION
    assert _code(rules.check_may_read_chat, bob, _conv(), "agent") == ErrorCode.NOT_YOUR_CONVERSATION


def test_monitor_chat_and_webrtc_listening_are_checked_again() -> None:
    team_a = frozenset({"team-a"})
    monitor = Monitor("m", "c", "sam", ["chat", "voice"], voice_kind=VoiceKind.WEBRTC)
    rules.check_may_follow_monitor_chat(_conv(), monitor, team_a)
    assert rules.check_may_listen_webrtc(_conv(), monitor, team_a).id == "c"
    assert _code(rules.check_may_follow_monitor_chat, None, monitor, team_a) == ErrorCode.NOT_TEAM_SUPERVISOR
    assert _code(rules.check_may_listen_webrtc, None, monitor, team_a) == ErrorCode.MONITOR_ENDED
    assert _code(rules.check_may_listen_webrtc, _conv(), monitor, frozenset()) == ErrorCode.NOT_TEAM_SUPERVISOR
    sip = Monitor("m", "c", "sam", ["chat", "voice"], voice_kind=VoiceKind.SIP)
    assert _code(rules.check_may_listen_webrtc, _conv(), sip, team_a) == ErrorCode.VOICE_NOT_GRANTED
    monitor.ended_at = 1.0
    assert _code(rules.check_may_follow_monitor_chat, _conv(), monitor, frozenset()) == ErrorCode.MONITOR_ENDED


def test_event_visibility() -> None:
    sam = _principal("sam", "supervisor", teams=frozenset({"team-a"}))
    platform = _principal("p", "platform")
    update = DomainEvent(EventType.CONVERSATION_UPDATED, "c", "team-a", {})
    other = DomainEvent(EventType.CONVERSATION_UPDATED, "c", "team-b", {})
    levels = DomainEvent(EventType.LEVELS, "c", "team-a", {"supervisor": "tom"})
    assert rules.may_see_event(sam, update) and not rules.may_see_event(sam, other)
    assert rules.may_see_event(platform, other) and not rules.may_see_event(platform, levels)
    assert not rules.may_see_event(sam, levels)
    assert rules.may_see_event(_principal("tom", "supervisor"), levels)
