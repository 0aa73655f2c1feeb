"""Start-up never blames a valid token (issue 11, item 3).

A real gateway whose identity provider (the embedded one, on its own port) comes up only after
the gateway: until the signing keys are loaded, a valid token gets 503 ``identity_unavailable``
with ``Retry-After``, not 401; once they are, the same token is served. A forged token is 401 as
soon as the keys are there.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from devtools.idp import add_idp_routes
from gateway.app import create_app, make_runner
from gateway.config import Settings
from tests.support import GatewayClient, _wait_ready, free_port, make_settings

pytestmark = pytest.mark.api


@asynccontextmanager
async def identity_provider(port: int, data_dir: Path) -> AsyncIterator[str]:
    """The embedded provider alone on ``port`` (its signing key kept in ``data_dir``)."""
    settings = Settings(dev=True, port=port, data_dir=str(data_dir))
    app = web.Application()
    add_idp_routes(app, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield settings.base_url
    finally:
        await runner.cleanup()


async def test_valid_token_waits_for_signing_keys_instead_of_401(tmp_path: Path) -> None:
    idp_port = free_port()
    idp_data = tmp_path / "idp"
    async with aiohttp.ClientSession() as http:
        # A token issued by the provider, which then goes away (same key when it returns).
        async with identity_provider(idp_port, idp_data) as idp_url:
            issuer = GatewayClient(idp_url, idp_url, http)
            token = await issuer.login("sam")
            platform = await issuer.platform()

        settings = make_settings(tmp_path, keycloak_url=f"http://127.0.0.1:{idp_port}")
        runner = make_runner(create_app(settings))
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        try:
            gw = GatewayClient(settings.base_url, settings.keycloak_url, http)
            for _ in range(3):  # the background key fetch keeps failing: still not the token's fault
                answer = await gw.call("GET", "/v1/conversations", token)
                assert (answer.status, answer.code) == (503, "identity_unavailable"), answer.body
                assert int(answer.headers["Retry-After"]) >= 1
                assert (await gw.call("GET", "/readyz")).status == 503
                await asyncio.sleep(0.3)

            async with identity_provider(idp_port, idp_data):
                await _wait_ready(gw, timeout=10)
                assert (await gw.call("PUT", "/v1/conversations/k-1", platform, _conversation())).status == 201
                listed = await gw.call("GET", "/v1/conversations", token)
                assert listed.status == 200 and [c["id"] for c in listed.body] == ["k-1"]
                # With the keys loaded an unknown key is the token's fault again.
                forged = await gw.call("GET", "/v1/conversations", _with_kid(token, "no-such-key"))
                assert (forged.status, forged.code) == (401, "invalid_token"), forged.body
        finally:
            await runner.cleanup()


def _conversation() -> dict[str, object]:
    return {
        "direction": "inbound",
        "transferred": False,
        "agent": "alice",
        "customer": {"id": "c-1"},
        "sessions": ["chat"],
    }


def _with_kid(token: str, kid: str) -> str:
    header_b64, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    header["kid"] = kid
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return f"{encoded}.{payload}.{signature}"
