"""Chat mirroring through the authenticated API: views, whisper, barge-in, R7 end, rights."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.support import GatewayClient

pytestmark = pytest.mark.api


async def _open(
    gateway: GatewayClient, path: str, token: str, *, query_token: bool = False
) -> aiohttp.ClientWebSocketResponse:
    if query_token:  # how a browser does it: it can not set headers on a websocket
        sep = "&" if "?" in path else "?"
        return await gateway.http.ws_connect(gateway.ws_url(f"{path}{sep}access_token={token}"))
    return await gateway.http.ws_connect(gateway.ws_url(path), headers={"Authorization": f"Bearer {token}"})


async def _entries_until(
    ws: aiohttp.ClientWebSocketResponse, predicate: Any, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """Read frames until one satisfies ``predicate``; return every entry and end seen."""
    seen: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"timed out; saw {seen}"
        msg = await ws.receive(timeout=remaining)
        if msg.type != aiohttp.WSMsgType.TEXT:
            seen.append({"type": "closed", "code": ws.close_code})
            return seen
        frame = msg.json()
        if frame.get("type") == "heartbeat":
            continue
        seen.append(frame)
        if predicate(frame):
            return seen


async def _texts_of_view(gateway: GatewayClient, path: str, token: str, upto_seq: int) -> list[dict[str, Any]]:
    ws = await _open(gateway, path, token)
    frames = await _entries_until(ws, lambda f: f.get("seq", 0) >= upto_seq or f.get("type") == "end")
    await ws.close()
    return [f for f in frames if f.get("type") == "entry"]


async def test_whisper_reaches_agent_and_monitor_never_customer(gateway: GatewayClient) -> None:
    await gateway.conversation("w1", sessions=["chat"])
    platform, sam = await gateway.platform(), await gateway.login("sam")
    alice = await gateway.login("alice")

    def post(sender: str, text: str) -> Any:
        return gateway.call("POST", "/v1/conversations/w1/messages", platform, {"from": sender, "text": text})

    assert (await post("customer", "my order is late")).status == 201
    mid = (await gateway.monitor("sam", "w1")).body["id"]
    mirror = await _open(gateway, f"/v1/monitors/{mid}/chat?after=0", sam, query_token=True)
    whisper = await gateway.call("POST", f"/v1/monitors/{mid}/whisper", sam, {"text": "offer a voucher"})
    assert whisper.status == 201
    agent_post = await gateway.call(
        "POST", "/v1/conversations/w1/messages", alice, {"from": "agent", "text": "here is a voucher"}
    )
    assert agent_post.status == 201, agent_post.body
    last = agent_post.body["seq"]

    frames = await _entries_until(mirror, lambda f: f.get("seq") == last)
    texts = [(f["kind"], f["text"]) for f in frames if f["type"] == "entry"]
    assert ("message", "my order is late") in texts
    assert ("whisper", "offer a voucher") in texts
    assert ("message", "here is a voucher") in texts
    whisper_entry = next(f for f in frames if f.get("kind") == "whisper")
    assert whisper_entry["visibility"] == "agent" and whisper_entry["seq"] == whisper.body["seq"]

    customer = await _texts_of_view(gateway, "/v1/conversations/w1/chat?view=customer&after=0", platform, last)
    assert [f["text"] for f in customer if f.get("kind") == "message"] == ["my order is late", "here is a voucher"]
    assert all(f.get("kind") != "whisper" and f.get("visibility") != "agent" for f in customer), customer
    agent = await _texts_of_view(gateway, "/v1/conversations/w1/chat?view=agent&after=0", alice, last)
    assert "offer a voucher" in [f["text"] for f in agent]
    await mirror.close()


async def test_barge_in_reaches_the_customer(gateway: GatewayClient) -> None:
    await gateway.conversation("b1", sessions=["chat"])
    platform, sam = await gateway.platform(), await gateway.login("sam")
    mid = (await gateway.monitor("sam", "b1")).body["id"]
    refused = await gateway.call("POST", f"/v1/monitors/{mid}/messages", sam, {"text": "hello"})
    assert refused.code == "monitor_cannot_message_customer"
    assert (await gateway.call("POST", f"/v1/monitors/{mid}/barge", sam)).body["mode"] == "barged"
    sent = await gateway.call("POST", f"/v1/monitors/{mid}/messages", sam, {"text": "Hello, I am Sam, the team lead."})
    assert sent.status == 201
    customer = await _texts_of_view(
        gateway, "/v1/conversations/b1/chat?view=customer&after=0", platform, sent.body["seq"]
    )
    texts = [f["text"] for f in customer]
    assert "Hello, I am Sam, the team lead." in texts
    assert "hello" not in texts  # the refused one was never stored


async def test_agent_left_ends_the_monitor_stream(gateway: GatewayClient) -> None:
    await gateway.conversation("r7", sessions=["chat"])
    sam = await gateway.login("sam")
    mid = (await gateway.monitor("sam", "r7")).body["id"]
    mirror = await _open(gateway, f"/v1/monitors/{mid}/chat?after=0", sam)
    await asyncio.sleep(0.1)
    await gateway.event("r7", "agent_left")
    frames = await _entries_until(mirror, lambda f: f.get("type") == "end")
    assert frames[-1]["reason"] == "agent_left" and "final_seq" in frames[-1]
    # Rights are re-checked on subscribe: an ended monitor gets no new stream.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await _open(gateway, f"/v1/monitors/{mid}/chat?after=0", sam)
    assert refused.value.status == 409


async def test_chat_views_are_guarded(gateway: GatewayClient) -> None:
    await gateway.conversation("g1", sessions=["chat"])
    await gateway.conversation("g2", agent="bob", sessions=["chat"])
    alice, sam, tom = await gateway.login("alice"), await gateway.login("sam"), await gateway.login("tom")
    for path, token, status in [
        ("/v1/conversations/g1/chat?view=customer", alice, 403),  # an agent never reads the customer view
        ("/v1/conversations/g2/chat?view=agent", alice, 403),  # nor another agent's conversation
        ("/v1/conversations/g1/chat?view=agent", sam, 403),  # supervisors read through a monitor
        ("/v1/conversations/g1/chat?view=agent", "garbage", 401),
    ]:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await _open(gateway, path, token)
        assert refused.value.status == status, path
    mid = (await gateway.monitor("sam", "g1")).body["id"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await _open(gateway, f"/v1/monitors/{mid}/chat", tom)  # tom's token, sam's monitor
    assert refused.value.status == 404
    # An agent may post as agent in its own conversation only.
    wrong = await gateway.call("POST", "/v1/conversations/g2/messages", alice, {"from": "agent", "text": "hi"})
    assert (wrong.status, wrong.code) == (403, "not_your_conversation")
    posing = await gateway.call("POST", "/v1/conversations/g1/messages", alice, {"from": "customer", "text": "hi"})
    assert (posing.status, posing.code) == (403, "not_your_conversation")


async def test_idempotent_ingest(gateway: GatewayClient) -> None:
    await gateway.conversation("i1", sessions=["chat"])
    platform = await gateway.platform()
    first = await gateway.call(
        "POST", "/v1/conversations/i1/messages", platform, {"from": "customer", "text": "hi", "client_id": "up-123"}
    )
    again = await gateway.call(
        "POST", "/v1/conversations/i1/messages", platform, {"from": "customer", "text": "hi", "client_id": "up-123"}
    )
    assert first.status == again.status == 201 and first.body["seq"] == again.body["seq"]
    other = await gateway.call(
        "POST", "/v1/conversations/i1/messages", platform, {"from": "customer", "text": "hi", "client_id": "up-124"}
    )
    assert other.body["seq"] == first.body["seq"] + 1


@pytest.fixture
def gateway(gateway_any: GatewayClient) -> GatewayClient:
    """Every test here runs against the SQLite store and against Redis."""
    return gateway_any
