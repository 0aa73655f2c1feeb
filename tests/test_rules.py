"""The pure rules module (R1–R12) on plain data: no app, no network."""

from __future__ import annotations

import pytest

from gateway.domain import Conversation, Direction, Monitor, MonitorMode
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
