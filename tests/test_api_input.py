"""Bad input never gives a 500: each is a JSON error with a stable code, and nothing leaks."""

from __future__ import annotations

import asyncio
import logging

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


async def test_refusals_name_the_field(gateway: GatewayClient) -> None:
    """Strict types (a flag is never a number and a number never a flag) and the field named
    as the API always named it: the key in the object that holds the error."""
    await gateway.conversation("f1", sessions=["chat"])
    platform, sam, alice = await gateway.platform(), await gateway.login("sam"), await gateway.login("alice")
    cases: list[tuple[str, str, str, object, int, str, str | None]] = [
        (
            "PUT",
            "/v1/conversations/f2",
            platform,
            {"agent": "alice", "transferred": 1},
            422,
            "invalid_field",
            "transferred",
        ),
        ("PUT", "/v1/conversations/f2", platform, {"agent": True}, 422, "invalid_field", "agent"),
        ("PUT", "/v1/conversations/f2", platform, {"agent": "  "}, 422, "invalid_field", "agent"),
        ("PUT", "/v1/conversations/f2", platform, {"agent": "a" * 257}, 422, "invalid_field", "agent"),
        (
            "PUT",
            "/v1/conversations/f2",
            platform,
            {"agent": "alice", "sessions": ["chat", 1]},
            422,
            "invalid_field",
            "sessions",
        ),
        ("PUT", "/v1/conversations/f2", platform, {"agent": "alice", "customer": []}, 422, "invalid_field", "customer"),
        ("PUT", "/v1/conversations/f2", platform, {"direction": "sideways"}, 422, "invalid_field", "direction"),
        ("POST", "/v1/conversations/f1/events", platform, {}, 422, "missing_field", "type"),
        ("POST", "/v1/conversations/f1/messages", platform, {"text": "hi"}, 422, "missing_field", "from"),
        (
            "POST",
            "/v1/conversations/f1/messages",
            platform,
            {"from": "customer", "text": 5},
            422,
            "invalid_field",
            "text",
        ),
        (
            "POST",
            "/v1/conversations/f1/messages",
            alice,
            {"text": "hi", "client_id": 7},
            422,
            "invalid_field",
            "client_id",
        ),
        ("POST", "/v1/conversations/f1/monitors", sam, {"voice": {}}, 422, "missing_field", "kind"),
        ("POST", "/v1/conversations/f1/monitors", sam, {"voice": {"kind": 1}}, 422, "invalid_field", "kind"),
        ("POST", "/v1/conversations/f1/monitors", sam, {"voice": {"kind": "sip"}}, 422, "missing_field", "uri"),
        (
            "POST",
            "/v1/conversations/f1/monitors",
            sam,
            {"voice": {"kind": "sip", "uri": 5}},
            422,
            "invalid_field",
            "uri",
        ),
        (
            "POST",
            "/v1/conversations/f1/monitors",
            sam,
            {"voice": {"kind": "sip", "uri": "sip:a b"}},
            422,
            "invalid_sip_uri",
            None,
        ),
        (
            "POST",
            "/v1/conversations/f1/monitors",
            sam,
            {"voice": {"kind": "sip", "uri": "sip:a\n"}},
            422,
            "invalid_sip_uri",
            None,
        ),
        ("POST", "/v1/conversations/f1/monitors", sam, {"voice": 1}, 422, "invalid_field", "voice"),
    ]
    for method, path, token, body, status, code, field in cases:
        answer = await gateway.call(method, path, token, body)
        assert (answer.status, answer.code) == (status, code), (path, body, answer.body)
        assert answer.body["error"].get("field") == field, (path, body, answer.body)


async def test_null_and_absent_mean_the_default(gateway: GatewayClient) -> None:
    platform, sam, alice = await gateway.platform(), await gateway.login("sam"), await gateway.login("alice")
    body = {"agent": "alice", "direction": None, "transferred": None, "customer": None, "sessions": None, "team": None}
    answer = await gateway.call("PUT", "/v1/conversations/n1", platform, body)
    assert answer.status == 201 and answer.body["direction"] == "inbound" and answer.body["team"] == "team-a"
    await gateway.conversation("n2", sessions=["chat"])
    # an agent's own token writes as the agent; unknown fields are ignored
    answer = await gateway.call(
        "POST", "/v1/conversations/n2/messages", alice, {"text": "hi", "client_id": None, "x": 1}
    )
    assert answer.status == 201, answer.body
    # no body at all, or a null voice: a chat-only monitor
    answer = await gateway.call("POST", "/v1/conversations/n2/monitors", sam, data=b"")
    assert answer.status == 201 and answer.body["channels"] == ["chat"], answer.body
    # a UTF-8 byte order mark is not an error
    answer = await gateway.call(
        "PUT",
        "/v1/conversations/n3",
        platform,
        data=b'\xef\xbb\xbf{"agent":"alice"}',
        headers={"Content-Type": "application/json"},
    )
    assert answer.status == 201, answer.body


async def test_deeply_nested_json_is_malformed_not_a_crash(gateway: GatewayClient) -> None:
    platform = await gateway.platform()
    json_header = {"Content-Type": "application/json"}
    for raw in [b"[" * 20000, b'{"agent":"alice","customer":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"]:
        answer = await gateway.call("PUT", "/v1/conversations/d1", platform, data=raw, headers=json_header)
        assert (answer.status, answer.code) == (400, "malformed_json"), answer.body


async def test_nul_byte_in_a_header_is_a_400_logged_at_info(
    gateway: GatewayClient, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp refuses the request before any handler runs; that is the client's fault, not an
    ERROR with a traceback, and the offending line (here a bearer token) stays out of the log."""
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    host, port = gateway.base_url.removeprefix("http://").split(":")
    requests = [
        b"GET /v1/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\x00token\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n",
    ]
    for raw in requests:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer[:80]
    server_records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert len(server_records) == 2
    assert all(r.levelno == logging.INFO and not r.exc_info for r in server_records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)
    assert "secret" not in caplog.text
    assert (await gateway.call("GET", "/healthz")).status == 200  # and the server carries on
