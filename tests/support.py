"""Test helpers: run a real gateway on a loopback port and talk to it over HTTP."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import create_app, make_runner
from gateway.config import Settings

PASSWORD = "demo"


#: Ports tests hand to servers they start: below Linux's default ephemeral range (32768-60999).
UNEPHEMERAL_PORTS = (20000, 32000)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and up): a port handed out
    by ``bind(0)`` comes from that range, and an outgoing connection (a test's HTTP client, a
    Redis connection) can take it before the gateway under test binds it (seen in CI)."""
    for _ in range(500):
        port = random.randrange(*UNEPHEMERAL_PORTS)
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below the ephemeral range")


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return self.body["error"].get("code")
        return None


@dataclass
class GatewayClient:
    """A client of the gateway's HTTP API, with token helpers for the demo realm."""

    base_url: str
    idp_url: str
    http: aiohttp.ClientSession
    realm: str = "cx"
    app: web.Application | None = None
    _tokens: dict[str, str] = field(default_factory=dict)

    async def login(self, username: str, password: str = PASSWORD, *, fresh: bool = False) -> str:
        """A password-grant access token from the identity provider (cached per user)."""
        if not fresh and username in self._tokens:
            return self._tokens[username]
        data = {
            "grant_type": "password",
            "client_id": "gateway-console",
            "username": username,
            "password": password,
            "scope": "openid",
        }
        async with self.http.post(self.token_url, data=data) as response:
            body = await response.json()
            assert response.status == 200, body
        self._tokens[username] = body["access_token"]
        return str(body["access_token"])

    async def token_response(self, username: str, password: str = PASSWORD) -> dict[str, Any]:
        data = {
            "grant_type": "password",
            "client_id": "gateway-console",
            "username": username,
            "password": password,
            "scope": "openid",
        }
        async with self.http.post(self.token_url, data=data) as response:
            assert response.status == 200
            return dict(await response.json())

    async def platform(self) -> str:
        if "@platform" not in self._tokens:
            data = {"grant_type": "client_credentials", "client_id": "cx-platform", "client_secret": "dev-secret"}
            async with self.http.post(self.token_url, data=data) as response:
                body = await response.json()
                assert response.status == 200, body
            self._tokens["@platform"] = body["access_token"]
        return self._tokens["@platform"]

    @property
    def token_url(self) -> str:
        return f"{self.idp_url}/realms/{self.realm}/protocol/openid-connect/token"

    async def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        json: Any = None,
        *,
        data: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.base_url + path, json=json, data=data, headers=all_headers
        ) as response:
            raw = await response.read()
            try:
                body: Any = await response.json(content_type=None) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            return Answer(response.status, body, response.headers)

    async def conversation(self, cid: str, **overrides: Any) -> Answer:
        body = {
            "direction": "inbound",
            "transferred": False,
            "agent": "alice",
            "customer": {"id": "c-1", "name": "Ann"},
            "sessions": ["chat", "voice"],
        }
        body.update(overrides)
        return await self.call("PUT", f"/v1/conversations/{cid}", await self.platform(), body)

    async def event(self, cid: str, kind: str) -> Answer:
        return await self.call("POST", f"/v1/conversations/{cid}/events", await self.platform(), {"type": kind})

    async def monitor(self, user: str, cid: str, voice: dict[str, Any] | None = None) -> Answer:
        return await self.call("POST", f"/v1/conversations/{cid}/monitors", await self.login(user), {"voice": voice})

    def ws_url(self, path: str) -> str:
        return self.base_url.replace("http://", "ws://") + path


async def events_of(gateway: GatewayClient, user: str) -> aiohttp.ClientWebSocketResponse:
    """``user``'s ``/v1/events`` WebSocket, past its ``hello``."""
    ws = await gateway.http.ws_connect(
        gateway.ws_url("/v1/events"), headers={"Authorization": f"Bearer {await gateway.login(user)}"}
    )
    assert (await ws.receive_json(timeout=5))["type"] == "hello"
    return ws


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    port = free_port()
    values: dict[str, Any] = dict(
        dev=True,  # the embedded identity provider with the demo realm, or its secrets for a real Keycloak
        port=port,
        data_dir=str(tmp_path / "var"),
        enable_sip=False,
        drain_seconds=0.5,
        sip_port=free_port(socket.SOCK_DGRAM),
        log_level="WARNING",
    )
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayClient]:
    """Start the gateway app on ``settings.port`` and yield a client for it."""
    app = create_app(settings)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            client = GatewayClient(
                settings.base_url, settings.keycloak_url or settings.base_url, http, settings.realm, app
            )
            await _wait_ready(client)
            yield client
    finally:
        await runner.cleanup()


async def _wait_ready(client: GatewayClient, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        answer = await client.call("GET", "/readyz")
        if answer.status == 200:
            return
        last = answer.body
        await asyncio.sleep(0.1)
    raise AssertionError(f"gateway not ready after {timeout}s: {last}")
