"""Fork on demand (``"fork": "on_demand"``) through the API, without SIP: the platform's
``/v1/events`` (platform token) gets ``voice_fork_requested`` when a supervisor's voice monitor is
granted and ``voice_fork_released`` when it leaves; supervisors never see them; ``always``
conversations cause none; a fork that never comes ends the monitor's voice (``fork_timeout``);
the webhook is signed, retried with the same event id, and refused by a wrong secret. The
end-to-end test with real SIP legs is ``test_fork_sip.py``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devtools.redis_server import RedisServer
from gateway.api.context import SERVICE, SETTINGS
from gateway.domain import DomainEvent, EventType, Principal
from gateway.fork import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from gateway.policy.rules import may_see_event
from gateway.shared.connection import SharedState
from gateway.shared.store import RedisStore
from gateway.store import SqliteStore
from tests.support import GatewayClient, free_port, make_settings, running_gateway
from tests.test_shared_state import conversation as plain_conversation
from tests.test_shared_state import two_gateways

pytestmark = pytest.mark.api

WEBRTC = {"kind": "webrtc"}


async def events(gw: GatewayClient, token: str) -> aiohttp.ClientWebSocketResponse:
    ws = await gw.http.ws_connect(gw.ws_url("/v1/events"), headers={"Authorization": f"Bearer {token}"})
    assert (await ws.receive_json(timeout=5))["type"] == "hello"
    return ws


async def until_event(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next ``kind`` event; every event before it is returned in ``seen`` of the result."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} within {timeout}s; saw {seen}"
        event = await ws.receive_json(timeout=left)
        if event["type"] == kind:
            return dict(event, seen=seen)
        seen.append(event["type"])


async def drain(ws: aiohttp.ClientWebSocketResponse, seconds: float) -> list[dict[str, Any]]:
    """Every event that arrives within ``seconds``."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            out.append(await ws.receive_json(timeout=left))
        except TimeoutError:
            break
    return out


async def test_platform_gets_requested_then_released_supervisors_never(gateway_any: GatewayClient) -> None:
    gw = gateway_any
    platform = await events(gw, await gw.platform())
    sam_events = await events(gw, await gw.login("sam"))
    put = await gw.conversation("od-1", fork="on_demand")
    assert put.status == 201 and put.body["fork"] == "on_demand" and put.body["fork_requested"] is None
    assert put.body["sessions"]["voice"] is True and put.body["voice_legs"] == []

    started = await gw.monitor("sam", "od-1", WEBRTC)
    assert started.status == 201 and started.body["channels"] == ["chat", "voice"], started.body
    assert started.body["voice_pending"] is True
    requested = await until_event(platform, "voice_fork_requested")
    assert requested["conversation"] == "od-1"
    assert requested["sip_uri"] == f"sip:127.0.0.1:{gw.app[SETTINGS].sip_port}"  # type: ignore[index]
    assert requested["mode"] == "siprec" and requested["id"].startswith("fork-")
    conv = await gw.call("GET", "/v1/conversations/od-1", await gw.platform())
    assert conv.body["fork_requested"] == requested["id"]
    sam = await gw.login("sam")
    mid = started.body["id"]
    assert (await gw.call("GET", f"/v1/monitors/{mid}", sam)).body["voice_pending"] is True

    assert (await gw.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
    released = await until_event(platform, "voice_fork_released")
    assert (released["conversation"], released["sip_uri"], released["mode"]) == (
        "od-1",
        requested["sip_uri"],
        "siprec",
    )
    assert released["id"] != requested["id"]
    assert (await gw.call("GET", "/v1/conversations/od-1", sam)).body["fork_requested"] is None

    # the supervisor saw the monitor come and go, and no fork event at all
    seen = [e["type"] for e in await drain(sam_events, 0.5)]
    assert "monitor_ended" in seen and not any(t.startswith("voice_fork") for t in seen), seen
    await platform.close()
    await sam_events.close()


async def test_always_conversations_and_chat_only_monitors_ask_for_nothing(gateway: GatewayClient) -> None:
    platform = await events(gateway, await gateway.platform())
    assert (await gateway.conversation("al-1")).body["fork"] == "always"  # the default
    assert (await gateway.conversation("od-2", fork="on_demand")).status == 201
    always = await gateway.monitor("sam", "al-1", WEBRTC)
    assert always.body["channels"] == ["chat", "voice"] and always.body["voice_pending"] is False
    chat_only = await gateway.monitor("sam", "od-2", None)  # no voice asked: no fork
    assert chat_only.body["channels"] == ["chat"]
    sam = await gateway.login("sam")
    for mid in (always.body["id"], chat_only.body["id"]):
        assert (await gateway.call("DELETE", f"/v1/monitors/{mid}", sam)).status == 204
    seen = [e["type"] for e in await drain(platform, 0.7)]
    assert seen.count("monitor_ended") == 2, seen  # the platform got the rest of the story
    assert not any(t.startswith("voice_fork") for t in seen), seen
    await platform.close()


async def test_a_fork_that_never_comes_ends_the_voice_after_the_timeout(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path, fork_timeout=0.6)) as gw:
        platform = await events(gw, await gw.platform())
        await gw.conversation("od-3", fork="on_demand")
        started = await gw.monitor("sam", "od-3", WEBRTC)
        t0 = time.monotonic()
        await until_event(platform, "voice_fork_requested")
        updated = await until_event(platform, "voice_fork_released", timeout=5)
        waited = time.monotonic() - t0
        assert 0.4 < waited < 4, waited  # the timeout, not at once, not never
        state = await gw.call("GET", f"/v1/monitors/{started.body['id']}", await gw.login("sam"))
        body = state.body
        assert body["channels"] == ["chat"] and body["voice_blocked_reason"] == "fork_timeout", body
        assert body["ended_at"] is None and body["voice_pending"] is False  # chat goes on
        assert updated["conversation"] == "od-3"
        await platform.close()


async def test_a_monitor_during_the_release_asks_again_and_legs_ending_keep_the_voice(gateway: GatewayClient) -> None:
    """The SIP plane's reports (legs up, legs gone) are played through the service here (no
    SIP): a monitor that arrives while a released fork's legs are still up (their BYE on its
    way) asks for a new fork and waits for new legs; the old legs' BYE does not end the voice
    session; a platform that forked on its own is not asked."""
    service = gateway.app[SERVICE]
    platform = await events(gateway, await gateway.platform())
    await gateway.conversation("od-4", fork="on_demand")
    sam = await gateway.monitor("sam", "od-4", WEBRTC)
    first = await until_event(platform, "voice_fork_requested")
    service.leg_started("od-4", "agent")
    service.leg_started("od-4", "customer")
    sam_token, tom_token = await gateway.login("sam"), await gateway.login("tom")
    assert (await gateway.call("GET", f"/v1/monitors/{sam.body['id']}", sam_token)).body["voice_pending"] is False
    assert (await gateway.call("DELETE", f"/v1/monitors/{sam.body['id']}", sam_token)).status == 204
    await until_event(platform, "voice_fork_released")

    tom = await gateway.monitor("tom", "od-4", WEBRTC)  # the old legs are still up: tom hears them
    assert tom.body["channels"] == ["chat", "voice"] and tom.body["voice_pending"] is False
    second = await until_event(platform, "voice_fork_requested")
    assert second["id"] != first["id"]
    service.leg_ended("od-4", "agent", "bye")  # the released fork's BYE arrives now: tom waits
    service.leg_ended("od-4", "customer", "bye")
    state = (await gateway.call("GET", f"/v1/monitors/{tom.body['id']}", tom_token)).body
    assert state["channels"] == ["chat", "voice"] and state["voice_pending"] is True, state
    conv = (await gateway.call("GET", "/v1/conversations/od-4", tom_token)).body
    assert conv["sessions"]["voice"] is True and conv["fork_requested"] == second["id"]
    service.leg_started("od-4", "agent")  # the new fork
    assert (await gateway.call("GET", f"/v1/monitors/{tom.body['id']}", tom_token)).body["voice_pending"] is False
    assert (await gateway.call("DELETE", f"/v1/monitors/{tom.body['id']}", tom_token)).status == 204
    await until_event(platform, "voice_fork_released")

    # a platform that forks on its own (legs up, nothing released): nobody is asked
    await gateway.conversation("od-5", fork="on_demand")
    service.leg_started("od-5", "agent")
    again = await gateway.monitor("sam", "od-5", WEBRTC)
    assert again.body["voice_pending"] is False
    seen = [e["type"] for e in await drain(platform, 0.5)]
    assert "voice_fork_requested" not in seen, seen
    await platform.close()


def test_fork_events_reach_only_the_owning_platform_client() -> None:
    def principal(client: str, *roles: str) -> Principal:
        return Principal("u", "s", frozenset(roles), "sid", time.time() + 60, client, frozenset({"team-a"}))

    event = DomainEvent(EventType.VOICE_FORK_REQUESTED, "c", None, {"id": "fork-1", "platform": "cx-platform"})
    assert may_see_event(principal("cx-platform", "platform"), event)
    assert not may_see_event(principal("other-platform", "platform"), event)
    assert not may_see_event(principal("gateway-console", "supervisor"), event)
    # a conversation whose PUT named no client (none known): any platform, still no supervisor
    anyone = DomainEvent(EventType.VOICE_FORK_RELEASED, "c", "team-a", {"id": "fork-2", "platform": None})
    assert may_see_event(principal("other-platform", "platform"), anyone)
    assert not may_see_event(principal("gateway-console", "supervisor"), anyone)


async def test_fork_fields_survive_in_both_stores(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    conv = plain_conversation("st-1")
    conv.fork, conv.platform, conv.fork_requested = "on_demand", "cx-platform", "fork-abc"
    sqlite = SqliteStore(tmp_path / "state.sqlite3")
    sqlite.put_conversation(conv)
    sqlite.close()
    again = SqliteStore(tmp_path / "state.sqlite3").get_conversation("st-1")
    assert again is not None and (again.fork, again.platform, again.fork_requested) == (
        "on_demand",
        "cx-platform",
        "fork-abc",
    )
    for step in ("write", "read"):
        shared = SharedState(redis_server.url, prefix=redis_prefix)
        store = RedisStore(shared)
        await shared.start()
        try:
            if step == "write":
                store.put_conversation(conv)
                await store.flush()
            else:  # a fresh instance loads it from Redis
                loaded = store.get_conversation("st-1")
                assert loaded is not None and (loaded.fork, loaded.fork_requested) == ("on_demand", "fork-abc")
        finally:
            await store.close()
            await shared.close()


async def test_fork_events_cross_instances(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    """With Redis, a platform following instance B hears the fork asked for on instance A, and
    the release when the monitor is left through B."""
    async with two_gateways(tmp_path, redis_server, redis_prefix) as (a, b):
        platform = await events(b, await b.platform())
        assert (await a.conversation("rx-1", fork="on_demand")).status == 201
        started = await a.monitor("sam", "rx-1", WEBRTC)
        assert started.body["voice_pending"] is True
        requested = await until_event(platform, "voice_fork_requested")
        assert requested["conversation"] == "rx-1"
        listing = await b.call("GET", "/v1/conversations/rx-1", await b.platform())
        assert listing.body["fork_requested"] == requested["id"]  # B's copy knows
        assert (await b.call("DELETE", f"/v1/monitors/{started.body['id']}", await b.login("sam"))).status == 204
        released = await until_event(platform, "voice_fork_released")
        assert released["conversation"] == "rx-1" and released["id"] != requested["id"]
        await platform.close()


# ---------------------------------------------------------------------------- the webhook


class Hook:
    """A platform's webhook endpoint (a real aiohttp server): answers ``statuses`` in turn
    (then 200) and keeps every call it got."""

    def __init__(self, statuses: list[int], secret: str) -> None:
        self.statuses = list(statuses)
        self.secret = secret
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        self.calls.append((dict(request.headers), body, status))
        self.arrived.set()
        return web.Response(status=status)

    def delivered(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, status in self.calls if status == 200]


@asynccontextmanager
async def hook_server(hook: Hook) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/fork", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/fork"
    finally:
        await runner.cleanup()


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_webhook_is_signed_retried_with_the_same_id_and_ordered(tmp_path: Path) -> None:
    secret = "s3cret-for-the-test"
    hook = Hook([500, 503], secret)  # the first two attempts fail
    async with hook_server(hook) as url:
        settings = make_settings(tmp_path, fork_webhook_url=url, fork_webhook_secret=secret, fork_mode="per-leg")
        async with running_gateway(settings) as gw:
            await gw.conversation("wh-1", fork="on_demand")
            t0 = time.monotonic()
            started = await gw.monitor("sam", "wh-1", WEBRTC)
            assert started.status == 201
            assert time.monotonic() - t0 < 0.4, "the API answer never waits for the webhook"
            assert (await gw.call("DELETE", f"/v1/monitors/{started.body['id']}", await gw.login("sam"))).status == 204
            await until(lambda: len(hook.delivered()) == 2)
            metrics = (await gw.call("GET", "/metrics")).body
            assert 'gateway_plane_stat{plane="fork",stat="webhook_delivered"} 2.0' in metrics, metrics[-600:]
    # attempts 1, 2 failed, 3 delivered the request; then the release (after it: kept in order)
    assert [status for _, _, status in hook.calls] == [500, 503, 200, 200]
    ids = [headers[EVENT_ID_HEADER] for headers, _, _ in hook.calls]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    requested, released = hook.delivered()
    assert requested["type"] == "voice_fork_requested" and released["type"] == "voice_fork_released"
    assert requested["id"] == ids[0] and requested["mode"] == "per-leg" and requested["conversation"] == "wh-1"
    bodies = {body for _, body, _ in hook.calls[:3]}
    assert len(bodies) == 1, "every retry carries the same body"
    for headers, body, _ in hook.calls:
        stamp, signature = headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
        assert verify(secret, stamp, body, signature)
        assert not verify("wrong-secret", stamp, body, signature)
        assert not verify(secret, stamp, body + b" ", signature)  # a changed body fails too
        assert not verify(secret, str(int(stamp) - 3600), body, sign(secret, str(int(stamp) - 3600), body))  # stale


async def test_webhook_that_never_answers_holds_nothing(tmp_path: Path) -> None:
    """A webhook that hangs: each attempt times out, the API answers at once, the event stream
    still gets the event, and the attempts are bounded."""
    hang = asyncio.Event()
    calls: list[float] = []

    async def slow(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        await hang.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/fork", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        settings = make_settings(
            tmp_path,
            fork_webhook_url=f"http://127.0.0.1:{port}/fork",
            fork_webhook_secret="x",
            fork_webhook_timeout=0.3,
            fork_webhook_attempts=3,
        )
        async with running_gateway(settings) as gw:
            platform = await events(gw, await gw.platform())
            await gw.conversation("wh-2", fork="on_demand")
            t0 = time.monotonic()
            assert (await gw.monitor("sam", "wh-2", WEBRTC)).status == 201
            assert time.monotonic() - t0 < 0.4
            await until_event(platform, "voice_fork_requested")
            await until(lambda: len(calls) == 3, 10)
            await asyncio.sleep(2.5)  # 0.3 s per attempt, 0.5 s + 1 s pauses: no fourth
            assert len(calls) == 3
            await platform.close()
    finally:
        hang.set()
        await runner.cleanup()


def test_a_webhook_without_secret_does_not_start(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, fork_webhook_url="http://127.0.0.1:9/fork")
    assert "GATEWAY_FORK_WEBHOOK_SECRET" in (settings.startup_problem() or "")
    assert "GATEWAY_FORK_MODE" in (make_settings(tmp_path, fork_mode="both").startup_problem() or "")
