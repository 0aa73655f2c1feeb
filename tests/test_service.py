"""The service and the planes' holder with in-process fakes of the chat and SIP planes.

Fast unit tests of the voice coordination (the supervisor's phone: busy retries, waiting for the
first leg, failures) and of the WebRTC listener bookkeeping. The real paths run in
``test_sip_api.py`` (pjsua2 and sipp) and ``test_browser*.py`` (Chromium).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.chat.log import ChatEntry
from gateway.domain import Direction, PlatformEventType, Principal, VoiceKind
from gateway.errors import ErrorCode, GatewayError
from gateway.events import EventBus
from gateway.planes import Planes
from gateway.policy import rules
from gateway.policy.audit import AuditLog
from gateway.runtime import BackgroundTasks
from gateway.service import MonitoringService
from gateway.store import MemoryStore

pytestmark = pytest.mark.unit

SAM = Principal("sam", "sam", frozenset({"supervisor"}), "s1", time.time() + 3600, "console", frozenset({"team-a"}))
ALICE = Principal("alice", "alice", frozenset({"agent"}), "s2", time.time() + 3600, "console")


class FakeChat:
    def __init__(self) -> None:
        self.entries: list[ChatEntry] = []
        self.heartbeat_interval = 15.0

    async def post(self, cid: str, **fields: Any) -> tuple[ChatEntry, bool]:
        entry = ChatEntry(
            cid,
            len(self.entries) + 1,
            fields["kind"],
            fields["sender"],
            fields["author"],
            fields["text"],
            fields["visibility"],
            fields.get("client_id"),
            time.time(),
        )
        self.entries.append(entry)
        return entry, True

    async def head(self, cid: str) -> int:
        return sum(1 for e in self.entries if e.conversation == cid)

    def ended_reason(self, cid: str) -> str | None:
        return None


class FakeSip:
    """Answers ``call_phone`` with the next of ``outcomes`` (an exception to raise, or None)."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, str, str]] = []
        self.hung_up: list[str] = []

    async def call_phone(self, cid: str, monitor_id: str, uri: str) -> None:
        self.calls.append((cid, monitor_id, uri))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome

    async def hang_up_phone(self, monitor_id: str) -> None:
        self.hung_up.append(monitor_id)


class FakeListener:
    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.closed_with: str | None = None
        self._callbacks: list[Callable[[str], Any]] = []

    async def close(self, reason: str = "deleted") -> None:
        if self.closed_with is None:
            self.closed_with = reason
            for callback in self._callbacks:
                callback(reason)

    def on_closed(self, callback: Callable[[str], Any]) -> None:
        self._callbacks.append(callback)


class Directory:
    async def agent_team(self, username: str) -> str | None:
        return "team-a"


def make_service(tmp_path: Path, sip: FakeSip | None) -> tuple[MonitoringService, Planes, FakeChat]:
    background = BackgroundTasks()
    planes = Planes(background, {}, sip=lambda: sip)  # type: ignore[arg-type,return-value]
    chat = FakeChat()
    service = MonitoringService(
        MemoryStore(),
        AuditLog(tmp_path / "audit.sqlite3"),
        EventBus(),
        chat=chat,  # type: ignore[arg-type]
        directory=Directory(),
        planes=planes,
        background=background,
    )
    return service, planes, chat


async def voice_conversation(service: MonitoringService, cid: str = "c1") -> None:
    await service.upsert_conversation(
        cid,
        direction=Direction.INBOUND,
        agent="alice",
        team=None,
        customer={},
        transferred=False,
        sessions=["chat", "voice"],
    )


SIP_VOICE = {"kind": "sip", "uri": "sip:sam@127.0.0.1:5070"}


async def test_phone_busy_hanging_up_is_retried(tmp_path: Path) -> None:
    busy = GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "the previous phone is hanging up")
    sip = FakeSip(busy, busy, None)
    service, _, chat = make_service(tmp_path, sip)
    await voice_conversation(service)
    monitor = await service.start_monitor(SAM, "c1", SIP_VOICE)
    assert len(sip.calls) == 3 and monitor.has_voice and monitor.voice_kind is VoiceKind.SIP
    await asyncio.sleep(0)  # the "joined silently" note is posted beside the answer
    assert [e.text for e in chat.entries] == ["supervisor sam joined silently"]


async def test_phone_waits_for_the_first_leg(tmp_path: Path) -> None:
    sip = FakeSip(GatewayError(ErrorCode.VOICE_NOT_ACTIVE, "no legs yet"), None)
    service, planes, _ = make_service(tmp_path, sip)
    await voice_conversation(service)
    monitor = await service.start_monitor(SAM, "c1", SIP_VOICE)
    assert monitor.has_voice and len(sip.calls) == 1  # keeps the voice slot, no phone yet
    service.leg_started("c1", "agent")
    for _ in range(10):
        await asyncio.sleep(0)
    assert [mid for _, mid, _ in sip.calls] == [monitor.id, monitor.id]
    assert monitor.has_voice and planes.take_pending_phone("c1") is None


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (GatewayError(ErrorCode.PHONE_UNREACHABLE, "no answer"), "phone_unreachable"),
        (RuntimeError("the worker died"), rules.END_MEDIA_FAILURE),
    ],
)
async def test_a_phone_that_can_not_be_called_takes_the_voice_away(
    tmp_path: Path, failure: BaseException, reason: str
) -> None:
    service, _, _ = make_service(tmp_path, FakeSip(failure))
    await voice_conversation(service)
    monitor = await service.start_monitor(SAM, "c1", SIP_VOICE)
    assert not monitor.has_voice and monitor.active and monitor.voice_blocked_reason == reason
    assert service.store.voice_holder("c1") is None


async def test_no_sip_plane_no_phone(tmp_path: Path) -> None:
    service, _, _ = make_service(tmp_path, None)
    await voice_conversation(service)
    monitor = await service.start_monitor(SAM, "c1", SIP_VOICE)
    assert not monitor.has_voice and monitor.voice_blocked_reason == "sip_disabled"


async def test_release_voice_stops_phone_listeners_and_a_waiting_call(tmp_path: Path) -> None:
    sip = FakeSip(GatewayError(ErrorCode.VOICE_NOT_ACTIVE, "no legs yet"))
    service, planes, _ = make_service(tmp_path, sip)
    await voice_conversation(service)
    monitor = await service.start_monitor(SAM, "c1", SIP_VOICE)
    listener = FakeListener("l1")
    await planes.add_listener(monitor.id, listener)
    planes.release_voice("c1", monitor.id)
    for _ in range(10):
        await asyncio.sleep(0)
    assert sip.hung_up == [monitor.id] and listener.closed_with == "deleted"
    assert planes.take_pending_phone("c1") is None and planes.listeners == {}


async def test_a_new_listener_replaces_the_previous_one(tmp_path: Path) -> None:
    _, planes, _ = make_service(tmp_path, None)
    first, second = FakeListener("l1"), FakeListener("l2")
    await planes.add_listener("m1", first)
    await planes.add_listener("m1", second)
    assert first.closed_with == "replaced" and list(planes.listeners["m1"]) == ["l2"]
    await second.close("failed")  # closed from the media side: no longer tracked
    assert planes.listeners["m1"] == {}
    assert planes.take_listener("m1", "l2") is None


async def test_chat_rules_and_audit_in_the_service(tmp_path: Path) -> None:
    service, _, chat = make_service(tmp_path, None)
    await voice_conversation(service)
    with pytest.raises(GatewayError) as refused:
        await service.post_message(ALICE, "c1", "customer", "hi", None)
    assert refused.value.code == "not_your_conversation"
    entry, created = await service.post_message(ALICE, "c1", "agent", "hello", None)
    assert created and entry.author == "alice"
    monitor = await service.start_monitor(SAM, "c1", None)
    whisper = await service.whisper(SAM, monitor.id, "psst", None)
    (record,) = service.audit.query(action="whisper")
    assert record["monitor"] == monitor.id and record["detail"] == {"seq": whisper.seq}
    await asyncio.sleep(0)  # the "joined silently" note
    service.apply_platform_event("c1", PlatformEventType.ENDED)
    with pytest.raises(GatewayError) as reused:
        await voice_conversation(service)  # the chat plane still holds c1's history
    assert reused.value.code == "conversation_id_reused"
    assert await chat.head("c1") == 3
