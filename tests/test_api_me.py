"""``GET /v1/me`` and ``PUT``/``DELETE /v1/me/phone``: the supervisor's SIP phone is remembered
server side, per username, in both stores (SQLite for one instance, Redis for several), and a
``kind: sip`` monitor start remembers the phone it rang."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from devtools.redis_server import RedisServer
from tests.support import GatewayClient, make_settings, running_gateway

pytestmark = pytest.mark.api

Start = Callable[[str], AbstractAsyncContextManager[GatewayClient]]


@pytest.fixture(params=["sqlite", "redis"])
def start_gateway(request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str) -> Start:
    """``start_gateway(name)``: a gateway on its own SQLite file, or on the one Redis. The same
    ``name`` again is a restart (the same data directory); with Redis every gateway shares the
    state whatever its name."""

    @asynccontextmanager
    async def start(name: str) -> AsyncIterator[GatewayClient]:
        extra: dict[str, Any] = {}
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            extra = {"redis_url": server.url, "redis_prefix": redis_prefix}
        async with running_gateway(make_settings(tmp_path / name, **extra)) as gw:
            yield gw

    return start


async def test_the_phone_is_remembered_per_user_and_survives_a_restart(start_gateway: Start) -> None:
    async with start_gateway("a") as gw:
        sam, tom = await gw.login("sam"), await gw.login("tom")
        me = await gw.call("GET", "/v1/me", sam)
        assert me.status == 200 and me.body == {"username": "sam", "teams": ["team-a"], "phone_uri": None}, me.body

        put = await gw.call("PUT", "/v1/me/phone", sam, {"uri": "sip:sam@127.0.0.1:5999"})
        assert put.status == 200 and put.body["phone_uri"] == "sip:sam@127.0.0.1:5999", put.body
        assert (await gw.call("GET", "/v1/me", sam)).body["phone_uri"] == "sip:sam@127.0.0.1:5999"
        # per username: tom (same team) has none of his own
        assert (await gw.call("GET", "/v1/me", tom)).body["phone_uri"] is None

        # an invalid URI is refused with the monitor start's code, and changes nothing
        for bad in ({"uri": "tel:+331234"}, {"uri": "sip:" + "a" * 300}, {"uri": 5}):
            refused = await gw.call("PUT", "/v1/me/phone", sam, bad)
            assert refused.status == 422 and refused.code in ("invalid_sip_uri", "invalid_field"), refused.body
        assert (await gw.call("PUT", "/v1/me/phone", sam, {"uri": "tel:1"})).code == "invalid_sip_uri"
        assert (await gw.call("PUT", "/v1/me/phone", sam, {})).code == "missing_field"
        assert (await gw.call("GET", "/v1/me", sam)).body["phone_uri"] == "sip:sam@127.0.0.1:5999"

        # agents and the platform have no /v1/me (it is the console's)
        assert (await gw.call("GET", "/v1/me", await gw.login("alice"))).status == 403
        assert (await gw.call("GET", "/v1/me")).status == 401

    # a restart (SQLite: the same file; Redis: a new instance loads it) remembers it
    async with start_gateway("a") as gw:
        assert (await gw.call("GET", "/v1/me", await gw.login("sam"))).body["phone_uri"] == "sip:sam@127.0.0.1:5999"
        assert (await gw.call("DELETE", "/v1/me/phone", await gw.login("sam"))).status == 204
        assert (await gw.call("GET", "/v1/me", await gw.login("sam"))).body["phone_uri"] is None
    async with start_gateway("a") as gw:
        assert (await gw.call("GET", "/v1/me", await gw.login("sam"))).body["phone_uri"] is None


async def test_a_sip_monitor_start_remembers_its_phone(start_gateway: Start) -> None:
    async with start_gateway("a") as gw:
        assert (await gw.conversation("c-me")).status == 201
        sam = await gw.login("sam")
        # SIP is off in this gateway: the phone can not be rung, but the choice is remembered
        started = await gw.monitor("sam", "c-me", {"kind": "sip", "uri": "sips:sam@phones.example.com"})
        assert started.status == 201, started.body
        assert (await gw.call("GET", "/v1/me", sam)).body["phone_uri"] == "sips:sam@phones.example.com"
        # a browser monitor does not forget it
        assert (await gw.call("DELETE", f"/v1/monitors/{started.body['id']}", sam)).status == 204
        again = await gw.monitor("sam", "c-me", {"kind": "webrtc"})
        assert again.status == 201, again.body
        assert (await gw.call("GET", "/v1/me", sam)).body["phone_uri"] == "sips:sam@phones.example.com"
        assert (await gw.call("GET", "/v1/me", await gw.login("tom"))).body["phone_uri"] is None


async def test_two_instances_see_the_same_phone(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    """With Redis, a phone set through one instance is read through another at once (the API
    answers only once the write is in Redis; the other instance's copy follows the publish)."""
    import asyncio

    settings_a = make_settings(tmp_path / "a", redis_url=redis_server.url, redis_prefix=redis_prefix)
    async with running_gateway(settings_a) as a:
        settings_b = make_settings(
            tmp_path / "b", redis_url=redis_server.url, redis_prefix=redis_prefix, keycloak_url=settings_a.base_url
        )
        async with running_gateway(settings_b) as b:
            sam = await a.login("sam")
            assert (await a.call("PUT", "/v1/me/phone", sam, {"uri": "sip:sam@10.0.0.7"})).status == 200
            for _ in range(100):
                if (await b.call("GET", "/v1/me", sam)).body["phone_uri"] == "sip:sam@10.0.0.7":
                    break
                await asyncio.sleep(0.05)
            assert (await b.call("GET", "/v1/me", sam)).body["phone_uri"] == "sip:sam@10.0.0.7"
            assert (await b.call("DELETE", "/v1/me/phone", sam)).status == 204
            for _ in range(100):
                if (await a.call("GET", "/v1/me", sam)).body["phone_uri"] is None:
                    break
                await asyncio.sleep(0.05)
            assert (await a.call("GET", "/v1/me", sam)).body["phone_uri"] is None
