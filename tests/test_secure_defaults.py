"""Secure defaults: no identity provider, demo user or secret unless asked for (issue 11, item 1).

``python -m gateway serve`` with neither ``GATEWAY_KEYCLOAK_URL`` nor ``GATEWAY_DEV=true`` refuses
to start with one line saying what to set; so does a Keycloak URL without the client that reads
groups. The realm a real Keycloak imports (``deploy/realm-cx.json``) carries no user, no secret
and no dev administration client, and its least-privilege directory client is enough to read teams.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devtools.idp import load_realm
from gateway.app import create_app, make_runner
from gateway.config import ConfigurationError, Settings
from tests.support import free_port, make_settings, running_gateway

pytestmark = pytest.mark.api
ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_REALM = ROOT / "deploy" / "realm-cx.json"
DEV_REALM = ROOT / "fixtures" / "realm-cx-dev.json"


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without any GATEWAY_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_PORT=str(free_port()),
        GATEWAY_SIP_PORT=str(free_port(socket.SOCK_DGRAM)),
        GATEWAY_DATA_DIR=str(tmp_path / "var"),
        **extra,
    )
    return env


async def _serve_and_wait(
    env: dict[str, str], timeout: float = 30.0, *, without_devtools: bool = False
) -> tuple[int, list[str]]:
    command = ["-m", "gateway", "serve"]
    if without_devtools:  # as in the Docker image: importing devtools fails
        command = [
            "-c",
            "import sys; sys.modules['devtools'] = None; from gateway.__main__ import main; main(['serve'])",
        ]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError("the gateway kept running instead of refusing to start") from None
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert proc.returncode is not None
    return proc.returncode, lines


async def test_serve_refuses_without_identity_provider_or_dev(tmp_path: Path) -> None:
    code, lines = await _serve_and_wait(_clean_env(tmp_path))
    assert code == 2
    assert len(lines) == 1, lines  # one clear line, no traceback
    entry = json.loads(lines[0])
    assert entry["level"] == "error"
    assert "GATEWAY_KEYCLOAK_URL" in entry["msg"] and "GATEWAY_DEV=true" in entry["msg"]
    assert not (tmp_path / "var").exists() or not any((tmp_path / "var").iterdir())  # nothing was set up


async def test_serve_refuses_keycloak_without_directory_client(tmp_path: Path) -> None:
    code, lines = await _serve_and_wait(_clean_env(tmp_path, GATEWAY_KEYCLOAK_URL="http://127.0.0.1:9"))
    assert code == 2
    assert len(lines) == 1, lines
    msg = json.loads(lines[0])["msg"]
    assert "GATEWAY_ADMIN_CLIENT_ID" in msg and "GATEWAY_ADMIN_CLIENT_SECRET" in msg


async def test_an_image_without_devtools_refuses_dev_mode(tmp_path: Path) -> None:
    """``docker run -e GATEWAY_DEV=true`` can not bring the demo users back: the image has no devtools."""
    code, lines = await _serve_and_wait(_clean_env(tmp_path, GATEWAY_DEV="true"), without_devtools=True)
    assert code == 2
    assert len(lines) == 1, lines
    msg = json.loads(lines[0])["msg"]
    assert "devtools" in msg and "GATEWAY_KEYCLOAK_URL" in msg


def test_no_secret_has_a_default_outside_dev_mode() -> None:
    settings = Settings()
    assert settings.dev is False
    assert settings.admin_client_id == "" and settings.admin_client_secret == ""
    with pytest.raises(ConfigurationError, match="GATEWAY_DEV=true"):
        create_app(settings)
    with pytest.raises(ConfigurationError, match="GATEWAY_DEV=true"):
        create_app(Settings(demo=True, keycloak_url="http://127.0.0.1:9", admin_client_id="a", admin_client_secret="b"))
    # Dev mode gets the demo realm's directory client; an explicit one always wins.
    assert (Settings(dev=True).admin_client_id, Settings(dev=True).admin_client_secret) == ("cx-platform", "dev-secret")
    explicit = Settings(dev=True, admin_client_id="mine", admin_client_secret="s3")
    assert (explicit.admin_client_id, explicit.admin_client_secret) == ("mine", "s3")
    assert Settings.from_env({"GATEWAY_DEV": "true"}).admin_client_secret == "dev-secret"
    assert Settings.from_env({}).admin_client_secret == ""


async def test_dev_mode_serves_the_demo_realm(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        token = await gw.login("sam", "demo")
        await gw.conversation("c-dev")
        listed = await gw.call("GET", "/v1/conversations", token)
        assert listed.status == 200 and [c["id"] for c in listed.body] == ["c-dev"]
        config = await gw.call("GET", "/config.json")
        assert config.body["embedded_idp"] is True


async def test_a_real_deployment_serves_no_identity_provider(tmp_path: Path) -> None:
    """With a Keycloak URL and no dev mode, the demo realm's paths do not exist on the gateway."""
    settings = Settings(
        port=free_port(),
        data_dir=str(tmp_path / "var"),
        enable_sip=False,
        keycloak_url="http://127.0.0.1:9",
        admin_client_id="gateway-directory",
        admin_client_secret="from-the-vault",
        identity_timeout=0.5,
        log_level="WARNING",
    )
    runner = make_runner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    try:
        async with aiohttp.ClientSession() as http:
            token_url = f"{settings.base_url}/realms/cx/protocol/openid-connect/token"
            form = {"grant_type": "password", "client_id": "gateway-console", "username": "sam", "password": "demo"}
            async with http.post(token_url, data=form) as response:
                assert response.status == 404
            async with http.get(f"{settings.base_url}/config.json") as response:
                assert (await response.json())["embedded_idp"] is False
    finally:
        await runner.cleanup()


def test_production_realm_holds_no_user_secret_or_dev_client() -> None:
    raw = json.loads(PRODUCTION_REALM.read_text())
    clients = {c["clientId"]: c for c in raw["clients"]}
    assert set(clients) == {"gateway-console", "cx-platform", "gateway-directory"}  # no cx-admin
    assert not any("secret" in c for c in clients.values())  # Keycloak generates them on import
    assert all(not u.get("credentials") for u in raw["users"])
    assert all(u.get("serviceAccountClientId") for u in raw["users"])  # no person, demo or not
    assert raw["groups"] == []
    assert raw["sslRequired"] != "none" and raw["bruteForceProtected"] is True
    console = clients["gateway-console"]
    assert console["directAccessGrantsEnabled"] is False  # no password grant outside dev
    assert not any("127.0.0.1" in uri or "localhost" in uri for uri in console["redirectUris"])
    # Least privilege: the directory client reads, never manages; the platform reads nothing.
    by_client = {u["serviceAccountClientId"]: u for u in raw["users"]}
    assert by_client["gateway-directory"]["clientRoles"]["realm-management"] == [
        "view-users",
        "query-users",
        "query-groups",
    ]
    assert by_client["cx-platform"]["clientRoles"] == {} and by_client["cx-platform"]["realmRoles"] == ["platform"]
    # The same roles and token audiences as the dev realm the tests run against.
    dev = json.loads(DEV_REALM.read_text())
    assert raw["roles"] == dev["roles"]
    dev_clients = {c["clientId"]: c for c in dev["clients"]}
    for name in ("gateway-console", "cx-platform"):
        assert clients[name]["protocolMappers"] == dev_clients[name]["protocolMappers"]


async def test_production_realm_directory_client_reads_teams(tmp_path: Path) -> None:
    """The production realm, with the secrets and a team an operator would add, served by the
    embedded provider: a gateway using ``gateway-directory`` resolves a supervisor's team."""
    raw = json.loads(PRODUCTION_REALM.read_text())
    for client in raw["clients"]:
        if client["clientId"] in ("cx-platform", "gateway-directory"):
            client["secret"] = f"{client['clientId']}-secret"
    raw["clients"][0]["directAccessGrantsEnabled"] = True  # the test signs in with a password
    raw["groups"] = [{"name": "team-x", "attributes": {"supervisor": ["vera"]}}]
    raw["users"] += [
        {"username": "vera", "enabled": True, "realmRoles": ["supervisor"], "credentials": [{"value": "pw"}]},
        {"username": "ann", "enabled": True, "realmRoles": ["agent"], "groups": ["/team-x"]},
    ]
    realm_file = tmp_path / "realm.json"
    realm_file.write_text(json.dumps(raw))
    load_realm(realm_file)  # the provider reads it as Keycloak would import it
    settings = make_settings(
        tmp_path,
        realm_file=str(realm_file),
        admin_client_id="gateway-directory",
        admin_client_secret="gateway-directory-secret",
    )
    async with running_gateway(settings) as gw:
        async with gw.http.post(
            gw.token_url,
            data={
                "grant_type": "client_credentials",
                "client_id": "cx-platform",
                "client_secret": "cx-platform-secret",
            },
        ) as response:
            platform = (await response.json())["access_token"]
        body = {
            "direction": "inbound",
            "transferred": False,
            "agent": "ann",
            "customer": {"id": "c"},
            "sessions": ["chat"],
        }
        created = await gw.call("PUT", "/v1/conversations/p-1", platform, body)
        assert created.status == 201 and created.body["team"] == "team-x"
        vera = await gw.login("vera", "pw")
        listed = await gw.call("GET", "/v1/conversations", vera)
        assert listed.status == 200 and [c["id"] for c in listed.body] == ["p-1"]


def test_sip_tls_and_srtp_settings_are_checked_before_serving(tmp_path: Path) -> None:
    """SIP over TLS and SRTP (issue 11, item 5): a wrong setting stops the start with one line."""
    base: dict[str, Any] = {"dev": True, "data_dir": str(tmp_path)}
    assert Settings().sip_srtp == "optional" and Settings().sip_tls_port == 0
    with pytest.raises(ConfigurationError, match="GATEWAY_SIP_SRTP"):
        create_app(Settings(sip_srtp="always", **base))
    with pytest.raises(ConfigurationError, match="GATEWAY_SIP_TLS_CERT and GATEWAY_SIP_TLS_KEY"):
        create_app(Settings(sip_tls_port=5061, **base))
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigurationError, match="can not be loaded"):
        create_app(Settings(sip_tls_port=5061, sip_tls_cert=missing, sip_tls_key=missing, **base))
