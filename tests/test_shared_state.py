"""The Redis shared state (``GATEWAY_REDIS_URL``) against a real redis-server: the voice slot's
lease across instances, fencing and expiry, the per-login-session rights, events fanned out
between two gateways, and 503 ``state_unavailable`` while Redis is down, recovering by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devtools.redis_server import RedisServer, start_redis
from gateway.api.context import CLUSTER, SERVICE, SHARED
from gateway.app import create_app, make_runner
from gateway.domain import Conversation, Direction, Monitor
from gateway.shared.connection import SharedState
from gateway.shared.sessions import RedisSessionRights
from gateway.shared.store import RedisStore
from tests.support import GatewayClient, events_of, make_settings, running_gateway

pytestmark = pytest.mark.api


@asynccontextmanager
async def instances(server: RedisServer, prefix: str, n: int, lease: float = 6.0) -> AsyncIterator[list[RedisStore]]:
    """``n`` instances' stores on one Redis (what ``n`` gateway processes hold)."""
    async with AsyncExitStack() as stack:
        stores = []
        for _ in range(n):
            shared = SharedState(server.url, prefix=prefix)
            store = RedisStore(shared, lease_seconds=lease)
            await shared.start()
            await store.start()
            stack.push_async_callback(shared.close)
            stack.push_async_callback(store.close)
            stores.append(store)
        yield stores


async def until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it is truthy (a condition to wait for, not a speed assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def conversation(cid: str) -> Conversation:
    conv = Conversation(
        id=cid, direction=Direction.INBOUND, agent="alice", team="team-a", customer={}, transferred=False
    )
    conv.sessions["voice"] = conv.created_at
    return conv


def monitor(cid: str, mid: str, supervisor: str = "sam") -> Monitor:
    return Monitor(id=mid, conversation=cid, supervisor=supervisor, channels=["chat", "voice"])


async def test_fifty_concurrent_claims_on_two_instances_one_wins(redis_server: RedisServer, redis_prefix: str) -> None:
    async with instances(redis_server, redis_prefix, 2) as (a, b):
        claims = [(a if i % 2 else b).claim_voice("v1", monitor("v1", f"m{i}")) for i in range(50)]
        won = [i for i, ok in enumerate(await asyncio.gather(*claims)) if ok]
        assert len(won) == 1
        winner, loser = (a, b) if won[0] % 2 else (b, a)
        assert list(winner.leases) == ["v1"] and not loser.leases
        # the same monitor claiming again (a retry) keeps it; another still can not
        assert await winner.claim_voice("v1", monitor("v1", f"m{won[0]}"))
        assert not await loser.claim_voice("v1", monitor("v1", "m-late"))
        # released by the instance that holds it: free for the other one
        winner.release_voice("v1", f"m{won[0]}")
        await winner.flush()
        assert await loser.claim_voice("v1", monitor("v1", "m-next"))


async def test_released_on_another_instance_than_the_claimer(redis_server: RedisServer, redis_prefix: str) -> None:
    async with instances(redis_server, redis_prefix, 2) as (a, b):
        a.put_conversation(conversation("v2"))
        first = monitor("v2", "m1")
        assert await a.claim_voice("v2", first)
        a.put_monitor(first)
        await a.flush()
        await until(lambda: b.voice_holder("v2") is not None)
        # the monitor ends on B (its supervisor left through B): B frees the slot
        b.release_voice("v2", "m1")
        await b.flush()
        assert await b.claim_voice("v2", monitor("v2", "m2", "tom"))
        # A's lease is gone: A is told at its next renewal, and may not renew it
        lost: list[tuple[str, str]] = []
        a.on_lease_lost = lambda cid, mid: lost.append((cid, mid))
        await a.renew_leases()
        assert lost == [("v2", "m1")] and not a.leases


async def test_lease_expires_stale_owner_is_refused_and_others_see_it_free(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with instances(redis_server, redis_prefix, 3, lease=0.6) as (a, b, c):
        a.put_conversation(conversation("v3"))
        held = monitor("v3", "m1")
        assert await a.claim_voice("v3", held)
        a.put_monitor(held)
        await a.flush()
        await until(lambda: b.voice_holder("v3") is not None and c.voice_holder("v3") is not None)
        # A stops renewing (paused or crashed: its lease loop is gone); the lease runs out.
        a._tasks[0].cancel()
        b_lost: list[tuple[str, str]] = []
        b.on_lease_lost = lambda cid, mid: b_lost.append((cid, mid))
        c.on_lease_lost = lambda cid, mid: b_lost.append((cid, mid))
        # B's and C's upkeep see it gone; one of them ends the monitor's voice, once
        await until(lambda: b.voice_holder("v3") is None and c.voice_holder("v3") is None, timeout=5)
        await asyncio.sleep(0.5)
        assert b_lost == [("v3", "m1")]
        assert await b.claim_voice("v3", monitor("v3", "m2", "tom"))
        # A comes back with its old fencing token: renewing is refused, A learns it lost it
        a_lost: list[tuple[str, str]] = []
        a.on_lease_lost = lambda cid, mid: a_lost.append((cid, mid))
        await a.renew_leases()
        assert a_lost == [("v3", "m1")] and not a.leases
        # and its stale release does not free B's slot
        a.release_voice("v3", "m1")
        await a.flush()
        assert not await a.claim_voice("v3", monitor("v3", "m3", "sue"))


async def test_a_release_heard_late_is_not_taken_for_a_crash(redis_server: RedisServer, redis_prefix: str) -> None:
    async with instances(redis_server, redis_prefix, 2) as (a, b):
        held = monitor("v4", "m1")
        assert await a.claim_voice("v4", held)
        a.put_monitor(held)
        await a.flush()
        await until(lambda: b.voice_holder("v4") is not None)
        lost: list[tuple[str, str]] = []
        b.on_lease_lost = lambda cid, mid: lost.append((cid, mid))
        # the slot is freed in Redis; the message saying so reaches B a moment later
        await a._redis.delete(a._key("voice", "v4"))
        reaping = asyncio.create_task(b.reap_foreign_leases())
        await asyncio.sleep(RedisStore.RECHECK_SECONDS / 4)
        b._apply_remote({"voice": "v4", "monitor": None})
        await reaping
        assert lost == []
        # a lease that stays gone (its instance crashed) is reaped
        await until(lambda: b.voice_holder("v4") is None)
        assert await a.claim_voice("v4", monitor("v4", "m2"))
        await until(lambda: b._voice.get("v4") == "m2")  # B heard of the claim
        a.leases.clear()  # A "crashes": nobody renews or releases
        await a._redis.delete(a._key("voice", "v4"))
        await b.reap_foreign_leases()
        assert lost == [("v4", "m2")]


async def test_state_written_on_one_instance_is_read_on_the_other(redis_server: RedisServer, redis_prefix: str) -> None:
    async with instances(redis_server, redis_prefix, 2) as (a, b):
        a.put_conversation(conversation("s1"))
        a.put_monitor(monitor("s1", "m1"))
        await a.flush()
        await until(lambda: b.get_monitor("m1") is not None)
        assert b.get_conversation("s1") is not None and b.get_conversation("s1").agent == "alice"  # type: ignore[union-attr]
        a.forget_conversation("s1")
        await a.flush()
        await until(lambda: b.get_conversation("s1") is None)
    # a new instance (a restart) loads everything from Redis
    async with instances(redis_server, redis_prefix, 1) as (c,):
        assert c.get_monitor("m1") is not None and c.get_conversation("s1") is None


async def test_session_rights_are_shared_and_survive_a_restart(redis_server: RedisServer, redis_prefix: str) -> None:
    first, second = (
        SharedState(redis_server.url, prefix=redis_prefix),
        SharedState(redis_server.url, prefix=redis_prefix),
    )
    try:
        a = RedisSessionRights(first, ttl_seconds=60)
        b = RedisSessionRights(second, ttl_seconds=60)
        kept = await a.put_first("u|sid-1", (frozenset({"supervisor"}), frozenset({"team-a"})))
        assert kept == (frozenset({"supervisor"}), frozenset({"team-a"}))
        # B resolved the same session a moment later (Keycloak changed meanwhile): A's answer holds
        assert await b.put_first("u|sid-1", (frozenset({"supervisor"}), frozenset({"team-b"}))) == kept
        assert await RedisSessionRights(second, ttl_seconds=60).get("u|sid-1") == kept  # a restarted instance
        assert await b.get("u|other") is None
        ttl = await first.redis.pttl(first.key("session", "u|sid-1"))
        assert 0 < ttl <= 60_000
    finally:
        await first.close()
        await second.close()


# ---------------------------------------------------------------------------- whole gateways


@asynccontextmanager
async def two_gateways(
    tmp_path: Path, server: RedisServer, prefix: str, **overrides: Any
) -> AsyncIterator[tuple[GatewayClient, GatewayClient]]:
    """Two gateways on one Redis; B uses A's embedded identity provider."""
    settings_a = make_settings(tmp_path / "a", redis_url=server.url, redis_prefix=prefix, **overrides)
    async with running_gateway(settings_a) as a:
        settings_b = make_settings(
            tmp_path / "b", redis_url=server.url, redis_prefix=prefix, keycloak_url=settings_a.base_url, **overrides
        )
        async with running_gateway(settings_b) as b:
            yield a, b


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str) -> dict[str, Any]:
    while True:
        event = await ws.receive_json(timeout=5)
        if event["type"] == kind:
            return dict(event)


async def test_two_gateways_share_conversations_voice_and_events(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    async with two_gateways(tmp_path, redis_server, redis_prefix) as (a, b):
        events_b = await events_of(b, "tom")
        assert (await a.conversation("x1")).status == 201
        updated = await next_event(events_b, "conversation_updated")  # created on A, seen on B
        assert updated["conversation"] == "x1"
        listing = await b.call("GET", "/v1/conversations", await b.login("sam"))
        assert [c["id"] for c in listing.body] == ["x1"]
        # R8 across instances: sam and tom ask on both at once; one voice monitor in all
        sam, tom = await a.login("sam"), await a.login("tom")

        async def attempt(i: int) -> Any:
            via = a if i % 2 else b
            body = {"voice": {"kind": "webrtc"}}
            return await via.call("POST", "/v1/conversations/x1/monitors", sam if i % 4 < 2 else tom, body)

        answers = await asyncio.gather(*(attempt(i) for i in range(50)))
        created = [x for x in answers if x.status == 201]
        assert len(created) == 1, [(x.status, x.code) for x in answers]
        refusals = {(x.status, x.code) for x in answers if x.status != 201}
        assert refusals <= {(409, "already_monitoring"), (409, "voice_monitor_busy")}, refusals
        started = await next_event(events_b, "monitor_started")
        assert started["monitor"]["id"] == created[0].body["id"]
        # the monitor ends through the other instance than the one that may have created it
        owner = created[0].body["supervisor"]
        for via in (a, b):
            answer = await via.call("DELETE", f"/v1/monitors/{created[0].body['id']}", await a.login(owner))
            assert answer.status == 204
        ended = await next_event(events_b, "monitor_ended")
        assert ended["reason"] == "left"
        other = "tom" if owner == "sam" else "sam"
        second = await a.call(
            "POST", "/v1/conversations/x1/monitors", await a.login(other), {"voice": {"kind": "webrtc"}}
        )
        assert second.status == 201 and second.body["channels"] == ["chat", "voice"]
        # chat: one log whichever instance ingests (seq goes on, client_id is one across both)
        platform = await a.platform()
        seqs = []
        for via, text, client_id in ((a, "hi", "k1"), (b, "hi again", "k2"), (b, "hi", "k1")):
            body = {"from": "customer", "text": text, "client_id": client_id}
            posted = await via.call("POST", "/v1/conversations/x1/messages", platform, body)
            assert posted.status == 201, posted.body
            seqs.append((posted.body["seq"], posted.body["duplicate"]))
        assert seqs[1][0] > seqs[0][0] and seqs[2] == (seqs[0][0], True) and not seqs[0][1]
        # a monitor's chat stream on B gets an entry stored through A live (the heartbeat is 15 s)
        stream = await b.http.ws_connect(
            b.ws_url(f"/v1/monitors/{second.body['id']}/chat?after={seqs[1][0]}"),
            headers={"Authorization": f"Bearer {await b.login(other)}"},
        )
        await asyncio.sleep(0.2)  # subscribed (its replay is empty)
        body = {"from": "agent", "text": "live from A"}
        live = await a.call("POST", "/v1/conversations/x1/messages", platform, body)
        assert live.status == 201
        while True:
            frame = await stream.receive_json(timeout=5)
            assert frame["type"] == "entry", frame
            if frame["text"] == "live from A":
                break
        assert frame["seq"] == live.body["seq"]
        await stream.close()
        await events_b.close()


async def test_a_login_sessions_rights_are_the_same_on_every_instance(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    """R2 across instances: the teams resolved at the session's first request (on A) hold on B,
    even though Keycloak changed in between; a new login gets the new teams everywhere."""
    async with two_gateways(tmp_path, redis_server, redis_prefix) as (a, b):
        assert (await a.conversation("r2", sessions=["chat"])).status == 201
        old = await a.login("sam")
        assert [c["id"] for c in (await a.call("GET", "/v1/conversations", old)).body] == ["r2"]
        admin = await a.http.post(
            a.token_url,
            data={"grant_type": "client_credentials", "client_id": "cx-admin", "client_secret": "dev-admin-secret"},
        )
        admin_token = (await admin.json())["access_token"]
        groups = await a.call("GET", "/admin/realms/cx/groups?briefRepresentation=false", admin_token)
        team_a = next(g for g in groups.body if g["name"] == "team-a")
        team_a["attributes"]["supervisor"] = ["tom"]
        assert (await a.call("PUT", f"/admin/realms/cx/groups/{team_a['id']}", admin_token, team_a)).status == 204
        # the old session's first request on B: A's resolution holds
        assert [c["id"] for c in (await b.call("GET", "/v1/conversations", old)).body] == ["r2"]
        new = await a.login("sam", fresh=True)
        for via in (a, b):
            assert (await via.call("GET", "/v1/conversations", new)).body == []


async def test_an_instance_that_stops_renewing_loses_the_voice_to_media_failure(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    async with two_gateways(tmp_path, redis_server, redis_prefix, voice_lease_seconds=0.6) as (a, b):
        assert (await a.conversation("k1")).status == 201
        events_b = await events_of(b, "tom")
        held = await a.monitor("sam", "k1", {"kind": "webrtc"})
        assert held.status == 201 and held.body["channels"] == ["chat", "voice"]
        store_a = a.app[SERVICE].store  # type: ignore[index]
        assert isinstance(store_a, RedisStore) and list(store_a.leases) == ["k1"]
        # A hangs (its lease upkeep stops, as in a crash): within the TTL B frees the slot and
        # ends that monitor's voice; its chat goes on
        store_a._tasks[0].cancel()
        a.app[CLUSTER]._task.cancel()  # type: ignore[index,union-attr]  # its registry card expires too
        while True:
            event = await next_event(events_b, "monitor_updated")
            if event["monitor"]["id"] == held.body["id"]:
                break
        assert event["monitor"]["channels"] == ["chat"]
        assert event["monitor"]["voice_blocked_reason"] == "media_failure"
        taken = await b.monitor("tom", "k1", {"kind": "webrtc"})
        assert taken.status == 201 and taken.body["channels"] == ["chat", "voice"]
        # A comes back with its stale lease: refused, and it takes nothing from tom
        await store_a.renew_leases()
        assert not store_a.leases
        listing = await b.call("GET", "/v1/conversations", await b.login("tom"))
        voice = [m["supervisor"] for m in listing.body[0]["monitors"] if "voice" in m["channels"]]
        assert voice == ["tom"]
        await events_b.close()


async def test_redis_down_is_503_state_unavailable_and_recovers(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    async with running_gateway(make_settings(tmp_path, redis_url=redis_server.url, redis_prefix=redis_prefix)) as gw:
        sam = await gw.login("sam")
        assert (await gw.conversation("d1")).status == 201
        console = await events_of(gw, "sam")
        say = {"from": "customer", "text": "before", "client_id": "b1"}
        before = await gw.call("POST", "/v1/conversations/d1/messages", await gw.platform(), say)
        assert before.status == 201
        redis_server.stop(kill=True)  # SIGKILL: nothing flushed on the way out
        try:
            answer = await gw.call("GET", "/v1/conversations", sam)
            if answer.status == 200:  # asked before the loss was noticed: the next one knows
                await until(lambda: not gw.app[SHARED].available)  # type: ignore[index]
                answer = await gw.call("GET", "/v1/conversations", sam)
            assert (answer.status, answer.code) == (503, "state_unavailable")
            assert answer.headers["Retry-After"] == "1"
            refused = await gw.monitor("sam", "d1", {"kind": "webrtc"})
            assert (refused.status, refused.code) == (503, "state_unavailable")
            ready = await gw.call("GET", "/readyz")
            assert ready.status == 503 and ready.body["checks"]["shared_state"] is False
            # the console's event stream is closed (it would miss events): it reconnects later
            while (message := await console.receive(timeout=5)).type is aiohttp.WSMsgType.TEXT:
                pass
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1013
        finally:
            redis_server.start()
        await until(lambda: gw.app[SHARED].available)  # type: ignore[index]
        listing = await gw.call("GET", "/v1/conversations", sam)
        assert listing.status == 200 and [c["id"] for c in listing.body] == ["d1"]
        created = await gw.monitor("sam", "d1", {"kind": "webrtc"})
        assert created.status == 201 and created.body["channels"] == ["chat", "voice"]
        # the acknowledged message survived Redis's kill -9 (AOF, fsync always); the seq goes
        # on, and the restarted Redis, which forgot the append script, is given it again
        platform = await gw.platform()
        again = await gw.call("POST", "/v1/conversations/d1/messages", platform, say)
        assert (again.status, again.body) == (201, {"seq": before.body["seq"], "duplicate": True})
        after = await gw.call("POST", "/v1/conversations/d1/messages", platform, {"from": "customer", "text": "after"})
        assert after.status == 201 and after.body["seq"] > before.body["seq"]


async def test_a_redis_that_does_not_fsync_each_write_is_not_used(tmp_path: Path, redis_prefix: str) -> None:
    """An acknowledged chat entry must survive a crash of Redis: with ``appendfsync everysec``
    the gateway serves nothing (503 ``state_unavailable``, not ready) and says why."""
    with start_redis(tmp_path / "redis", appendfsync="everysec") as lax:
        settings = make_settings(tmp_path, redis_url=lax.url, redis_prefix=redis_prefix)
        app = create_app(settings)
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{settings.base_url}/v1/conversations") as answer:
                    assert answer.status == 503
                    assert (await answer.json())["error"]["code"] == "state_unavailable"
                async with http.get(f"{settings.base_url}/readyz") as ready:
                    assert ready.status == 503 and (await ready.json())["checks"]["shared_state"] is False
        finally:
            await runner.cleanup()
