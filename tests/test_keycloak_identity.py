"""Identity against a real Keycloak (started once per run by ``devtools/keycloak.py``).

Covers team scoping, rule R2 (rights come from the login session), token checks that only a real
Keycloak can exercise (its own ID and refresh tokens, another issuer), and fail-closed lookups
within 2 s when Keycloak stops answering while cached keys keep validating.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devtools.keycloak import KeycloakServer, _http
from tests.support import GatewayClient, make_settings, running_gateway

pytestmark = [pytest.mark.keycloak, pytest.mark.slow]


@pytest.fixture
async def kc_gateway(tmp_path: Path, keycloak: KeycloakServer) -> AsyncIterator[GatewayClient]:
    async with running_gateway(make_settings(tmp_path, keycloak_url=keycloak.url)) as client:
        yield client


def _group(keycloak: KeycloakServer, name: str) -> dict[str, Any]:
    status, groups = keycloak.admin("GET", "/groups?briefRepresentation=false")
    assert status == 200, groups
    return next(g for g in groups if g["name"] == name)


def _set_supervisors(keycloak: KeycloakServer, team: str, value: str) -> None:
    group = _group(keycloak, team)
    attributes = dict(group.get("attributes") or {})
    attributes["supervisor"] = [value]
    status, body = keycloak.admin("PUT", f"/groups/{group['id']}", {**group, "attributes": attributes})
    assert status in (200, 204), body


async def test_teams_from_real_keycloak(kc_gateway: GatewayClient) -> None:
    await kc_gateway.conversation("kc-a1")
    await kc_gateway.conversation("kc-b1", agent="bob")
    sam = await kc_gateway.call("GET", "/v1/conversations", await kc_gateway.login("sam"))
    assert sam.status == 200, sam.body
    assert [c["id"] for c in sam.body] == ["kc-a1"] and sam.body[0]["team"] == "team-a"
    sue = await kc_gateway.monitor("sue", "kc-a1")
    assert (sue.status, sue.code) == (403, "not_team_supervisor")
    nora = await kc_gateway.monitor("nora", "kc-a1")
    assert (nora.status, nora.code) == (403, "not_team_supervisor")
    assert (await kc_gateway.monitor("sam", "kc-a1")).status == 201


async def test_r2_changes_apply_after_a_new_login(kc_gateway: GatewayClient, keycloak: KeycloakServer) -> None:
    await kc_gateway.conversation("r2-a")
    await kc_gateway.conversation("r2-b", agent="bob")
    old_token = await kc_gateway.login("sam")
    before = await kc_gateway.call("GET", "/v1/conversations", old_token)
    assert [c["id"] for c in before.body] == ["r2-a"]
    try:
        # Keycloak's admin API: sam moves from team-a to team-b.
        _set_supervisors(keycloak, "team-a", "tom")
        _set_supervisors(keycloak, "team-b", "sue,sam")
        assert _group(keycloak, "team-b")["attributes"]["supervisor"] == ["sue,sam"]

        still_old = await kc_gateway.call("GET", "/v1/conversations", old_token)
        assert [c["id"] for c in still_old.body] == ["r2-a"], "the old login session must keep its old rights"
        answer = await kc_gateway.call("POST", "/v1/conversations/r2-b/monitors", old_token, {"voice": None})
        assert answer.code == "not_team_supervisor"

        new_token = await kc_gateway.login("sam", fresh=True)
        assert new_token != old_token
        after = await kc_gateway.call("GET", "/v1/conversations", new_token)
        assert [c["id"] for c in after.body] == ["r2-b"]
        answer = await kc_gateway.call("POST", "/v1/conversations/r2-a/monitors", new_token, {"voice": None})
        assert answer.code == "not_team_supervisor"
        answer = await kc_gateway.call("POST", "/v1/conversations/r2-b/monitors", new_token, {"voice": None})
        assert answer.status == 201
    finally:
        _set_supervisors(keycloak, "team-a", "sam,tom")
        _set_supervisors(keycloak, "team-b", "sue")


async def test_real_keycloak_tokens_of_the_wrong_kind(
    kc_gateway: GatewayClient, keycloak: KeycloakServer, tmp_path: Path
) -> None:
    tokens = keycloak.token("sam", "demo", scope="openid")
    for name in ("id_token", "refresh_token"):
        answer = await kc_gateway.call("GET", "/v1/conversations", tokens[name])
        assert (answer.status, answer.code) == (401, "invalid_token"), name
    # A token of the embedded provider (another issuer, another key) is not Keycloak's.
    async with running_gateway(make_settings(tmp_path / "embedded")) as embedded:
        foreign = await embedded.login("sam")
    answer = await kc_gateway.call("GET", "/v1/conversations", foreign)
    assert (answer.status, answer.code) == (401, "invalid_token")


class Blackhole:
    """A TCP front for Keycloak that can stop answering (accepts, then says nothing)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.silent = False
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.silent:
            await asyncio.sleep(30)
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.silent:
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_keycloak_unreachable_fails_closed_and_cached_keys_keep_working(
    tmp_path: Path, keycloak: KeycloakServer
) -> None:
    front = Blackhole(int(keycloak.url.rsplit(":", 1)[1]))
    await front.start()
    try:
        settings = make_settings(tmp_path, keycloak_url=f"http://127.0.0.1:{front.port}")
        async with running_gateway(settings) as gateway:
            await gateway.conversation("down-a")
            known = await gateway.login("sam")
            assert (await gateway.call("GET", "/v1/conversations", known)).status == 200
            unresolved = await gateway.login("tom")  # a login session the gateway has not seen yet
            front.silent = True
            # Cached keys and the cached session keep validating.
            assert (await gateway.call("GET", "/v1/conversations", known)).status == 200
            started = time.monotonic()
            answer = await gateway.call("GET", "/v1/conversations", unresolved)
            elapsed = time.monotonic() - started
            assert (answer.status, answer.code) == (503, "identity_unavailable"), answer.body
            assert elapsed < 4.0, f"identity lookup took {elapsed:.1f}s to fail"
    finally:
        await front.stop()


async def test_production_realm_in_keycloak_least_privilege_directory(tmp_path: Path, keycloak: KeycloakServer) -> None:
    """``deploy/realm-cx.json`` imported into a real Keycloak (as realm ``cx-prod``, beside the demo
    realm), with a team and two people an operator would add: Keycloak generates the client
    secrets, and a gateway outside dev mode reads teams with ``gateway-directory``, which can not
    change anything."""
    realm = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "realm-cx.json").read_text())
    realm["realm"] = "cx-prod"
    for client in realm["clients"]:
        if client["clientId"] == "gateway-console":
            client["directAccessGrantsEnabled"] = True  # the test signs in with a password
    realm["groups"] = [{"name": "team-x", "attributes": {"supervisor": ["vera"]}}]
    person = {"enabled": True, "emailVerified": True, "lastName": "Example"}
    realm["users"] += [
        {
            **person,
            "username": "vera",
            "firstName": "Vera",
            "email": "vera@cx.example",
            "realmRoles": ["supervisor"],
            "credentials": [{"type": "password", "value": "pw-vera", "temporary": False}],
        },
        {
            **person,
            "username": "ann",
            "firstName": "Ann",
            "email": "ann@cx.example",
            "realmRoles": ["agent"],
            "groups": ["/team-x"],
        },
    ]
    status, body = _http("POST", f"{keycloak.url}/admin/realms", token=keycloak.admin_token(), body=realm)
    assert status == 201, body
    try:
        admin = f"{keycloak.url}/admin/realms/cx-prod"
        secrets = {}
        for name in ("cx-platform", "gateway-directory"):
            status, found = _http("GET", f"{admin}/clients?clientId={name}", token=keycloak.admin_token())
            assert status == 200 and len(found) == 1, found
            status, secret = _http(
                "GET", f"{admin}/clients/{found[0]['id']}/client-secret", token=keycloak.admin_token()
            )
            assert status == 200 and secret["value"], secret
            secrets[name] = secret["value"]

        settings = make_settings(
            tmp_path,
            dev=False,
            keycloak_url=keycloak.url,
            realm="cx-prod",
            admin_client_id="gateway-directory",
            admin_client_secret=secrets["gateway-directory"],
        )
        async with running_gateway(settings) as gw:
            token_url = gw.token_url
            form = {
                "grant_type": "client_credentials",
                "client_id": "cx-platform",
                "client_secret": secrets["cx-platform"],
            }
            async with gw.http.post(token_url, data=form) as response:
                assert response.status == 200
                platform = (await response.json())["access_token"]
            conversation = {"direction": "inbound", "transferred": False, "agent": "ann", "sessions": ["chat"]}
            created = await gw.call("PUT", "/v1/conversations/prod-1", platform, conversation)
            assert created.status == 201 and created.body["team"] == "team-x", created.body
            vera = await gw.login("vera", "pw-vera")
            listed = await gw.call("GET", "/v1/conversations", vera)
            assert listed.status == 200 and [c["id"] for c in listed.body] == ["prod-1"], listed.body
            assert (await gw.monitor("vera", "prod-1")).status == 201

            # The directory client reads; it may not change a team (nor anything else).
            form = {
                "grant_type": "client_credentials",
                "client_id": "gateway-directory",
                "client_secret": secrets["gateway-directory"],
            }
            async with gw.http.post(token_url, data=form) as response:
                directory = (await response.json())["access_token"]
            status, groups = _http("GET", f"{admin}/groups?briefRepresentation=false", token=directory)
            assert status == 200 and [g["name"] for g in groups] == ["team-x"]
            changed = {**groups[0], "attributes": {"supervisor": ["mallory"]}}
            status, _ = _http("PUT", f"{admin}/groups/{groups[0]['id']}", token=directory, body=changed)
            assert status == 403
    finally:
        _http("DELETE", f"{keycloak.url}/admin/realms/cx-prod", token=keycloak.admin_token())
