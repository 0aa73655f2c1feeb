"""Bad input never gives a 500: each is a JSON error with a stable code, and nothing leaks."""

from __future__ import annotations

import pytest

from tests.support import GatewayClient

pytestmark = pytest.mark.api


async def test_malformed_bodies(gateway: GatewayClient) -> None:
    platform = await gateway.platform()
    json_header = {"Content-Type": "application/json"}
    cases = [
        ("PUT", "/v1/conversations/a1", b"{not json", json_header, 400, "malformed_json"),
        ("PUT", "/v1/conversations/a1", b"[1,2]", json_header, 422, "invalid_body"),
        ("PUT", "/v1/conversations/a1", b"", json_header, 400, "empty_body"),
        (
            "PUT",
            "/v1/conversations/a1",
            b'{"agent":"alice"}',
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        ("PUT", "/v1/conversations/a1", b'{"agent": 5}', json_header, 422, "invalid_field"),
        ("PUT", "/v1/conversations/a1", b'{"agent":"alice","transferred":"yes"}', json_header, 422, "invalid_field"),
        ("PUT", "/v1/conversations/a1", b'{"agent":"alice","sessions":["fax"]}', json_header, 422, "invalid_field"),
        ("PUT", "/v1/conversations/a1", b'{"agent":"alice","direction":"sideways"}', json_header, 422, "invalid_field"),
        ("PUT", "/v1/conversations/a1", b'{"sessions":["chat"]}', json_header, 422, "missing_field"),
        ("PUT", "/v1/conversations/" + "x" * 200, b'{"agent":"alice"}', json_header, 422, "invalid_conversation_id"),
        ("PUT", "/v1/conversations/a1", b'{"agent":"' + b"a" * 70000 + b'"}', json_header, 413, "body_too_large"),
    ]
    for method, path, body, headers, status, code in cases:
        answer = await gateway.call(method, path, platform, data=body, headers=headers)
        assert (answer.status, answer.code) == (status, code), (path, body[:40], answer.status, answer.body)


async def test_events_and_messages_validation(gateway: GatewayClient) -> None:
    platform = await gateway.platform()
    await gateway.conversation("a1")
    answer = await gateway.call("POST", "/v1/conversations/a1/events", platform, {"type": "exploded"})
    assert (answer.status, answer.code) == (422, "invalid_field")
    answer = await gateway.call("POST", "/v1/conversations/nope/events", platform, {"type": "ended"})
    assert (answer.status, answer.code) == (404, "not_found")
    answer = await gateway.call("POST", "/v1/conversations/a1/messages", platform, {"from": "customer", "text": ""})
    assert (answer.status, answer.code) == (422, "empty_message")
    answer = await gateway.call(
        "POST", "/v1/conversations/a1/messages", platform, {"from": "customer", "text": "x" * 5000}
    )
    assert (answer.status, answer.code) == (413, "message_too_long")
    answer = await gateway.call("POST", "/v1/conversations/a1/messages", platform, {"from": "robot", "text": "hi"})
    assert (answer.status, answer.code) == (422, "invalid_field")


async def test_monitor_validation_and_unknown_ids(gateway: GatewayClient) -> None:
    await gateway.conversation("a1")
    sam = await gateway.login("sam")
    answer = await gateway.call("POST", "/v1/conversations/a1/monitors", sam, {"voice": {"kind": "carrier-pigeon"}})
    assert (answer.status, answer.code) == (422, "invalid_field")
    answer = await gateway.call(
        "POST", "/v1/conversations/a1/monitors", sam, {"voice": {"kind": "sip", "uri": "http://x"}}
    )
    assert (answer.status, answer.code) == (422, "invalid_sip_uri")
    answer = await gateway.call("POST", "/v1/conversations/a1/monitors", sam, {"voice": "webrtc"})
    assert (answer.status, answer.code) == (422, "invalid_field")
    for method, path in [
        ("GET", "/v1/monitors/m-nope"),
        ("DELETE", "/v1/monitors/m-nope"),
        ("POST", "/v1/monitors/m-nope/barge"),
        ("POST", "/v1/monitors/m-nope/transfer"),
    ]:
        answer = await gateway.call(method, path, sam)
        assert (answer.status, answer.code) == (404, "not_found"), (path, answer.body)
    answer = await gateway.call("GET", "/v1/nothing-here", sam)
    assert (answer.status, answer.code) == (404, "not_found")
    answer = await gateway.call("PATCH", "/v1/conversations", sam)
    assert (answer.status, answer.code) == (405, "method_not_allowed")
    # Nothing leaked: the conversation is still monitorable with voice.
    ok = await gateway.monitor("sam", "a1", {"kind": "webrtc"})
    assert ok.status == 201 and ok.body["channels"] == ["chat", "voice"]
