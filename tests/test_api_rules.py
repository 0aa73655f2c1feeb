"""Rules R1–R12 through the HTTP API, against a running gateway with its embedded identity provider."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.support import GatewayClient, events_of

pytestmark = pytest.mark.api


async def _next_event(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"no {kind} event within {timeout}s"
        event = await ws.receive_json(timeout=remaining)
        if event["type"] == kind:
            return event


async def test_team_scoped_listing(gateway: GatewayClient) -> None:
    assert (await gateway.conversation("a1")).status == 201
    assert (await gateway.conversation("b1", agent="bob")).status == 201
    again = await gateway.conversation("a1")
    assert again.status == 200 and again.body["team"] == "team-a"

    sam = await gateway.call("GET", "/v1/conversations", await gateway.login("sam"))
    assert sam.status == 200
    assert [c["id"] for c in sam.body] == ["a1"]
    assert sam.body[0]["sessions"] == {"chat": True, "voice": True}
    sue = await gateway.call("GET", "/v1/conversations", await gateway.login("sue"))
    assert [c["id"] for c in sue.body] == ["b1"]
    nora = await gateway.call("GET", "/v1/conversations", await gateway.login("nora"))
    assert nora.body == []


async def test_platform_lists_every_conversation_agents_list_none(gateway: GatewayClient) -> None:
    """The decision of issue 11 (docs/API.md, Platform side): the platform created the
    conversations, so its token lists and reads every ongoing one, of every team, with who
    monitors it; an agent's token lists nothing; ended conversations are listed to no one."""
    platform = await gateway.platform()
    for cid, agent in (("a1", "alice"), ("b1", "bob"), ("gone", "alice")):
        assert (await gateway.conversation(cid, agent=agent)).status == 201
    assert (await gateway.event("gone", "ended")).status == 202
    assert (await gateway.monitor("sue", "b1")).status == 201

    listed = await gateway.call("GET", "/v1/conversations", platform)
    assert listed.status == 200
    assert [(c["id"], c["team"]) for c in listed.body] == [("a1", "team-a"), ("b1", "team-b")]
    assert [m["supervisor"] for m in listed.body[1]["monitors"]] == ["sue"]
    one = await gateway.call("GET", "/v1/conversations/b1", platform)
    assert one.status == 200 and one.body["monitored"] is True
    ended = await gateway.call("GET", "/v1/conversations/gone", platform)
    assert (ended.status, ended.code) == (404, "not_found")

    alice = await gateway.login("alice")
    for path in ("/v1/conversations", "/v1/conversations/a1"):
        refused = await gateway.call("GET", path, alice)
        assert (refused.status, refused.code) == (403, "forbidden"), path


async def test_r1_only_team_supervisors(gateway: GatewayClient) -> None:
    await gateway.conversation("a1")
    sue = await gateway.monitor("sue", "a1")
    assert (sue.status, sue.code) == (403, "not_team_supervisor")
    nora = await gateway.monitor("nora", "a1")
    assert (nora.status, nora.code) == (403, "not_team_supervisor")
    alice = await gateway.monitor("alice", "a1")  # an agent is no supervisor at all
    assert (alice.status, alice.code) == (403, "forbidden")
    sam = await gateway.monitor("sam", "a1")
    assert sam.status == 201, sam.body
    assert sam.body["channels"] == ["chat"] and sam.body["mode"] == "silent" and sam.body["conversation"] == "a1"


async def test_r3_inactive_and_r10_outbound_transferred(gateway: GatewayClient) -> None:
    await gateway.conversation("idle", sessions=[])
    answer = await gateway.monitor("sam", "idle")
    assert (answer.status, answer.code) == (409, "conversation_not_active")
    await gateway.conversation("out", direction="outbound")
    answer = await gateway.monitor("sam", "out")
    assert (answer.status, answer.code) == (409, "outbound_not_supported")
    await gateway.conversation("xfer", transferred=True)
    answer = await gateway.monitor("sam", "xfer")
    assert (answer.status, answer.code) == (409, "transferred_not_supported")
    missing = await gateway.monitor("sam", "nope")
    assert (missing.status, missing.code) == (404, "not_found")


async def test_r8_fifty_concurrent_voice_requests_one_wins(gateway: GatewayClient) -> None:
    await gateway.conversation("v1")
    sam, tom = await gateway.login("sam"), await gateway.login("tom")

    async def attempt(i: int) -> Any:
        return await gateway.call(
            "POST", "/v1/conversations/v1/monitors", sam if i % 2 else tom, {"voice": {"kind": "webrtc"}}
        )

    answers = await asyncio.gather(*(attempt(i) for i in range(50)))
    created = [a for a in answers if a.status == 201]
    assert len(created) == 1, [(a.status, a.code) for a in answers]
    assert created[0].body["channels"] == ["chat", "voice"]
    refused = [(a.status, a.code) for a in answers if a.status != 201]
    assert refused == [(409, "voice_monitor_busy")] * 49
    listing = await gateway.call("GET", "/v1/conversations", sam)
    assert listing.body[0]["monitored"] is True and len(listing.body[0]["monitors"]) == 1


async def test_r8_voice_freed_after_leave(gateway: GatewayClient) -> None:
    await gateway.conversation("v2")
    first = await gateway.monitor("sam", "v2", {"kind": "webrtc"})
    busy = await gateway.monitor("tom", "v2", {"kind": "webrtc"})
    assert (busy.status, busy.code) == (409, "voice_monitor_busy")
    assert (await gateway.call("DELETE", f"/v1/monitors/{first.body['id']}", await gateway.login("sam"))).status == 204
    second = await gateway.monitor("tom", "v2", {"kind": "webrtc"})
    assert second.status == 201 and second.body["channels"] == ["chat", "voice"]


async def test_r7_agent_left_ends_every_monitor_with_event(gateway: GatewayClient) -> None:
    await gateway.conversation("a7")
    events = await events_of(gateway, "tom")
    m1 = await gateway.monitor("sam", "a7", {"kind": "webrtc"})
    m2 = await gateway.monitor("tom", "a7")
    assert m1.status == m2.status == 201
    assert (await gateway.event("a7", "agent_left")).status == 202
    ended = {}
    for _ in range(2):
        event = await _next_event(events, "monitor_ended")
        ended[event["monitor"]["id"]] = event["reason"]
    assert ended == {m1.body["id"]: "agent_left", m2.body["id"]: "agent_left"}
    state = await gateway.call("GET", f"/v1/monitors/{m1.body['id']}", await gateway.login("sam"))
    assert state.body["end_reason"] == "agent_left" and state.body["ended_at"] is not None
    again = await gateway.monitor("sam", "a7")
    assert (again.status, again.code) == (409, "conversation_not_active")
    await events.close()


async def test_r10_transfer_ends_monitors(gateway: GatewayClient) -> None:
    await gateway.conversation("t1")
    events = await events_of(gateway, "sam")
    monitor = await gateway.monitor("sam", "t1")
    await gateway.event("t1", "transferred")
    event = await _next_event(events, "monitor_ended")
    assert event["reason"] == "transferred" and event["monitor"]["id"] == monitor.body["id"]
    await events.close()


async def test_r9_chat_then_voice_stays_chat_only(gateway: GatewayClient) -> None:
    await gateway.conversation("c9", sessions=["chat"])
    monitor = await gateway.monitor("sam", "c9", {"kind": "webrtc"})
    assert monitor.body["channels"] == ["chat"] and monitor.body["voice_blocked_reason"] == "voice_not_active"
    await gateway.event("c9", "voice_started")
    state = await gateway.call("GET", f"/v1/monitors/{monitor.body['id']}", await gateway.login("sam"))
    assert state.body["channels"] == ["chat"]
    assert state.body["voice_blocked_reason"] == "voice_started_after_chat_monitoring"
    # Another supervisor may still take the (free) voice slot.
    tom = await gateway.monitor("tom", "c9", {"kind": "webrtc"})
    assert tom.body["channels"] == ["chat", "voice"]


async def test_r4_r5_r6_silent_monitor_limits(gateway: GatewayClient) -> None:
    await gateway.conversation("c4", sessions=["chat"])
    sam = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "c4")).body["id"]
    message = await gateway.call("POST", f"/v1/monitors/{mid}/messages", sam, {"text": "hello customer"})
    assert (message.status, message.code) == (403, "monitor_cannot_message_customer")
    transfer = await gateway.call("POST", f"/v1/monitors/{mid}/transfer", sam)
    assert (transfer.status, transfer.code) == (403, "monitor_cannot_transfer")
    conference = await gateway.call("POST", f"/v1/monitors/{mid}/conference", sam)
    assert (conference.status, conference.code) == (403, "monitor_cannot_conference")
    whisper = await gateway.call("POST", f"/v1/monitors/{mid}/whisper", sam, {"text": "ask for the order number"})
    assert whisper.status == 201 and whisper.body["seq"] >= 1
    barge = await gateway.call("POST", f"/v1/monitors/{mid}/barge", sam)
    assert barge.status == 200 and barge.body["mode"] == "barged"
    message = await gateway.call("POST", f"/v1/monitors/{mid}/messages", sam, {"text": "hello, I am the supervisor"})
    assert message.status == 201
    # Barged or not, a monitor never transfers.
    transfer = await gateway.call("POST", f"/v1/monitors/{mid}/transfer", sam)
    assert transfer.code == "monitor_cannot_transfer"


async def test_r5_r6_whisper_and_barge_are_chat_only(gateway: GatewayClient) -> None:
    await gateway.conversation("voice-only", sessions=["voice"])
    sam = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "voice-only", {"kind": "webrtc"})).body["id"]
    whisper = await gateway.call("POST", f"/v1/monitors/{mid}/whisper", sam, {"text": "psst"})
    assert (whisper.status, whisper.code) == (409, "whisper_chat_only")
    barge = await gateway.call("POST", f"/v1/monitors/{mid}/barge", sam)
    assert (barge.status, barge.code) == (409, "barge_chat_only")


async def test_r12_leave_always_204(gateway: GatewayClient) -> None:
    await gateway.conversation("l1")
    sam = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "l1")).body["id"]
    assert (await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
    assert (await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204  # again
    mid2 = (await gateway.monitor("sam", "l1")).body["id"]
    await gateway.event("l1", "agent_left")
    assert (await gateway.call("DELETE", f"/v1/monitors/{mid2}", sam)).status == 204  # after R7
    # Leaving never disturbs the conversation.
    conv = await gateway.call("GET", "/v1/conversations/l1", await gateway.platform())
    assert conv.status == 200 and conv.body["sessions"]["chat"] is True
    # Someone else's monitor is not yours to end.
    other = await gateway.call("DELETE", f"/v1/monitors/{mid}", await gateway.login("tom"))
    assert (other.status, other.code) == (404, "not_found")


async def test_r11_monitored_flag_and_events(gateway: GatewayClient) -> None:
    await gateway.conversation("e1")
    events = await events_of(gateway, "tom")
    monitor = await gateway.monitor("sam", "e1")
    started = await _next_event(events, "monitor_started")
    assert started["monitor"]["supervisor"] == "sam" and started["conversation"] == "e1"
    updated = await _next_event(events, "conversation_updated")
    assert updated["item"]["monitored"] is True and updated["item"]["monitors"][0]["id"] == monitor.body["id"]
    # team-b's supervisor hears nothing about team-a.
    sue_events = await events_of(gateway, "sue")
    await gateway.call("DELETE", f"/v1/monitors/{monitor.body['id']}", await gateway.login("sam"))
    ended = await _next_event(events, "monitor_ended")
    assert ended["reason"] == "left"
    with pytest.raises(asyncio.TimeoutError):
        while True:
            msg = await sue_events.receive_json(timeout=0.5)
            assert msg.get("conversation") != "e1", msg
    await events.close()
    await sue_events.close()


async def test_audit_log_records_everything(gateway: GatewayClient) -> None:
    from gateway.api.context import AUDIT

    await gateway.conversation("au", sessions=["chat"])
    sam = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "au")).body["id"]
    await gateway.monitor("sue", "au")  # refused
    await gateway.call("POST", f"/v1/monitors/{mid}/whisper", sam, {"text": "hi"})
    await gateway.call("POST", f"/v1/monitors/{mid}/messages", sam, {"text": "x"})  # refused
    await gateway.call("POST", f"/v1/monitors/{mid}/barge", sam)
    await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)
    assert gateway.app is not None
    rows = gateway.app[AUDIT].query(conversation="au")
    seen = {(r["action"], r["outcome"], r["code"]) for r in rows}
    assert ("monitor_start", "ok", None) in seen
    assert ("monitor_start", "refused", "not_team_supervisor") in seen
    assert ("whisper", "ok", None) in seen
    assert ("message_customer", "refused", "monitor_cannot_message_customer") in seen
    assert ("barge", "ok", None) in seen
    ends = [r for r in rows if r["action"] == "monitor_end"]
    assert ends and ends[0]["detail"]["reason"] == "left"


async def test_platform_role_required(gateway: GatewayClient) -> None:
    sam = await gateway.login("sam")
    answer = await gateway.call("PUT", "/v1/conversations/x", sam, {"agent": "alice"})
    assert (answer.status, answer.code) == (403, "forbidden")
    answer = await gateway.call("POST", "/v1/conversations/x/events", sam, {"type": "ended"})
    assert (answer.status, answer.code) == (403, "forbidden")


async def test_ops_endpoints(gateway: GatewayClient) -> None:
    assert (await gateway.call("GET", "/healthz")).body == {"status": "ok"}
    ready = await gateway.call("GET", "/readyz")
    assert ready.status == 200 and ready.body["checks"]["identity"] is True
    spec = await gateway.call("GET", "/openapi.json")
    assert spec.status == 200 and "/v1/conversations/{cid}/monitors" in spec.body["paths"]
    await gateway.conversation("m1")
    await gateway.monitor("sam", "m1")
    async with gateway.http.get(gateway.base_url + "/metrics") as response:
        text = await response.text()
    assert "gateway_monitors_active 1.0" in text
    assert "m1" not in text  # no per-conversation labels


async def test_openapi_documents_every_api_route(gateway: GatewayClient) -> None:
    spec = (await gateway.call("GET", "/openapi.json")).body
    json.dumps(spec)
    assert gateway.app is not None
    for resource in gateway.app.router.resources():
        path = resource.canonical
        if path.startswith(("/v1/", "/healthz", "/readyz", "/metrics", "/openapi", "/config")):
            assert path in spec["paths"], f"{path} is served but not in /openapi.json"


async def test_reassigned_conversation_ends_its_monitors(gateway: GatewayClient) -> None:
    await gateway.conversation("re1")
    mid = (await gateway.monitor("sam", "re1", {"kind": "webrtc"})).body["id"]
    moved = await gateway.conversation("re1", agent="bob")  # now team-b's
    assert moved.status == 200 and moved.body["team"] == "team-b" and moved.body["monitored"] is False
    state = await gateway.call("GET", f"/v1/monitors/{mid}", await gateway.login("sam"))
    assert state.body["end_reason"] == "transferred"
    sue = await gateway.call("GET", "/v1/conversations", await gateway.login("sue"))
    assert [c["id"] for c in sue.body] == ["re1"] and sue.body[0]["monitors"] == []


async def test_actions_recheck_rights_of_the_current_login(gateway: GatewayClient) -> None:
    """A monitor started from one login session; after a team change in the identity provider
    and a new login, that new session's rights apply to every action (R1, R2)."""
    await gateway.conversation("rc", sessions=["chat"])
    old = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "rc")).body["id"]
    admin = await gateway.http.post(
        gateway.token_url,
        data={"grant_type": "client_credentials", "client_id": "cx-admin", "client_secret": "dev-admin-secret"},
    )
    admin_token = (await admin.json())["access_token"]
    groups = await gateway.call("GET", "/admin/realms/cx/groups?briefRepresentation=false", admin_token)
    team_a = next(g for g in groups.body if g["name"] == "team-a")
    team_a["attributes"]["supervisor"] = ["tom"]
    assert (await gateway.call("PUT", f"/admin/realms/cx/groups/{team_a['id']}", admin_token, team_a)).status == 204
    new = await gateway.login("sam", fresh=True)
    for path, body in [("whisper", {"text": "x"}), ("barge", None), ("messages", {"text": "x"})]:
        answer = await gateway.call("POST", f"/v1/monitors/{mid}/{path}", new, body)
        assert (answer.status, answer.code) == (403, "not_team_supervisor"), path
    whep = await gateway.call(
        "POST", f"/v1/monitors/{mid}/whep", new, data="v=0", headers={"Content-Type": "application/sdp"}
    )
    assert whep.code == "not_team_supervisor"
    # The old login session keeps its old rights (R2).
    assert (await gateway.call("POST", f"/v1/monitors/{mid}/whisper", old, {"text": "still allowed"})).status == 201


async def test_conversation_ids_are_not_reused(gateway: GatewayClient) -> None:
    await gateway.conversation("once", sessions=["chat"])
    await gateway.call(
        "POST", "/v1/conversations/once/messages", await gateway.platform(), {"from": "customer", "text": "private"}
    )
    mid = (await gateway.monitor("sam", "once")).body["id"]
    await gateway.event("once", "ended")
    again = await gateway.conversation("once", agent="bob", sessions=["chat"])
    assert (again.status, again.code) == (409, "conversation_id_reused")
    # R12 after the end: the monitor can still be read and left.
    sam = await gateway.login("sam")
    state = await gateway.call("GET", f"/v1/monitors/{mid}", sam)
    assert state.status == 200 and state.body["end_reason"] == "ended"
    assert (await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204


@pytest.fixture
def gateway(gateway_any: GatewayClient) -> GatewayClient:
    """Every test here runs against the SQLite store and against Redis."""
    return gateway_any
