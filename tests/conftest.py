"""Shared fixtures: a real gateway on loopback (embedded identity provider, or a real Keycloak)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from devtools.keycloak import KeycloakServer, start_keycloak
from devtools.redis_server import RedisServer, start_redis
from gateway.chat.log import ChatLog, SqliteChatLog
from gateway.shared.chat_log import RedisChatLog
from gateway.shared.connection import SharedState
from tests.support import GatewayClient, make_settings, running_gateway


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayClient]:
    """The gateway with its embedded identity provider and SIP disabled (control-plane tests)."""
    async with running_gateway(make_settings(tmp_path)) as client:
        yield client


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole run (AOF, fsync always); tests keep apart by key prefix."""
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_prefix() -> str:
    return f"t{secrets.token_hex(4)}:"


@pytest.fixture(params=["sqlite", "redis"])
async def make_log(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[Callable[[str], ChatLog]]:
    """``make_log(name)``: a chat log, SQLite or Redis (every chat-log test runs against both).
    The same ``name`` again is the same log (a restart): the same file, or the same keys."""
    states: list[SharedState] = []

    def make(name: str = "chat") -> ChatLog:
        if request.param == "sqlite":
            return SqliteChatLog(tmp_path / f"{name}.sqlite3")
        server: RedisServer = request.getfixturevalue("redis_server")
        shared = SharedState(server.url, prefix=f"{redis_prefix}{name}:")
        states.append(shared)
        return RedisChatLog(shared)

    yield make
    for shared in states:
        await shared.close()


@pytest.fixture(params=["sqlite", "redis"])
async def gateway_any(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[GatewayClient]:
    """The gateway of :func:`gateway`, with its SQLite store or with Redis (``GATEWAY_REDIS_URL``)."""
    overrides: dict[str, object] = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        overrides = {"redis_url": server.url, "redis_prefix": redis_prefix}
    async with running_gateway(make_settings(tmp_path, **overrides)) as client:
        yield client


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeycloakServer]:
    """One real Keycloak for the whole run (started once: it takes tens of seconds)."""
    with start_keycloak(tmp_path_factory.mktemp("keycloak")) as server:
        yield server
