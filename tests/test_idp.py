"""The embedded identity provider against the real thing.

Every test taking ``provider`` runs twice: against the embedded provider (``devtools.idp`` alone
on an aiohttp server on a free loopback port) and against a real Keycloak started by
``devtools/keycloak.py`` with the same ``fixtures/realm-cx-dev.json`` (marker ``keycloak``).
Both must answer the same way to the calls the gateway, its console and python-keycloak make.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import web
from jwcrypto import jwk, jwt
from keycloak import KeycloakAdmin, KeycloakOpenID, KeycloakOpenIDConnection
from keycloak.exceptions import KeycloakAuthenticationError, KeycloakError

from devtools.idp import add_idp_routes
from devtools.keycloak import KeycloakServer, free_port
from gateway.config import Settings

TEAM_A = "fa8fc6d6-f8dd-568f-a69e-7d404d5cdb5a"


@dataclass
class Provider:
    kind: str  # "embedded" | "keycloak"
    url: str
    realm: str = "cx"

    @property
    def issuer(self) -> str:
        return f"{self.url}/realms/{self.realm}"

    @property
    def oidc(self) -> str:
        return f"{self.issuer}/protocol/openid-connect"

    def openid(self, client_id: str = "gateway-console", secret: str | None = None) -> KeycloakOpenID:
        return KeycloakOpenID(server_url=self.url, realm_name=self.realm, client_id=client_id, client_secret_key=secret)

    def admin(self, client_id: str = "cx-platform", secret: str = "dev-secret") -> KeycloakAdmin:
        conn = KeycloakOpenIDConnection(
            server_url=self.url,
            realm_name=self.realm,
            user_realm_name=self.realm,
            client_id=client_id,
            client_secret_key=secret,
            timeout=30,
        )
        return KeycloakAdmin(connection=conn)


async def _embedded(tmp_path: Path, port: int = 0) -> AsyncIterator[Provider]:
    port = port or free_port()
    settings = Settings(dev=True, port=port, data_dir=str(tmp_path / "var"))
    app = web.Application()
    add_idp_routes(app, settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Provider("embedded", settings.base_url)
    finally:
        await runner.cleanup()


@pytest.fixture(params=["embedded", pytest.param("keycloak", marks=[pytest.mark.keycloak, pytest.mark.slow])])
async def provider(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Provider]:
    if request.param == "keycloak":
        server: KeycloakServer = request.getfixturevalue("keycloak")
        yield Provider("keycloak", server.url)
        return
    async for p in _embedded(tmp_path):
        yield p


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _post(http: aiohttp.ClientSession, url: str, data: dict[str, str], **kw: Any) -> tuple[int, Any]:
    async with http.post(url, data=data, **kw) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text) if text else None
        except ValueError:
            return resp.status, text


async def _claims(http: aiohttp.ClientSession, provider: Provider, token: str) -> tuple[dict, dict]:
    """Verify ``token`` against the provider's JWKS (RS256) and return (header, claims)."""
    async with http.get(f"{provider.oidc}/certs") as resp:
        assert resp.status == 200
        jwks = jwk.JWKSet.from_json(await resp.text())
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    decoded = jwt.JWT(jwt=token, key=jwks, algs=["RS256"])
    return header, json.loads(decoded.claims)


def _aud(claims: dict[str, Any]) -> list[str]:
    aud = claims.get("aud", [])
    return [aud] if isinstance(aud, str) else list(aud)


# --- tokens --------------------------------------------------------------------------------------
async def test_well_known_and_jwks(provider: Provider, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{provider.issuer}/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["issuer"] == provider.issuer
    for name in ("token", "certs", "userinfo", "logout", "auth"):
        assert f"{provider.oidc}/{name}" in doc.values(), name
    assert "RS256" in doc["id_token_signing_alg_values_supported"]
    assert "S256" in doc["code_challenge_methods_supported"]
    async with http.get(doc["jwks_uri"]) as resp:
        keys = (await resp.json())["keys"]
    assert any(k["kty"] == "RSA" and k.get("use") == "sig" and k.get("alg") == "RS256" for k in keys)


async def test_password_grant_claims(provider: Provider, http: aiohttp.ClientSession) -> None:
    # Through python-keycloak's async client, as the console's dev path would.
    tokens = await provider.openid().a_token("sam", "demo")
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 300
    assert tokens["refresh_token"] and tokens["session_state"]
    header, claims = await _claims(http, provider, tokens["access_token"])
    assert header["alg"] == "RS256" and header["kid"]
    assert claims["iss"] == provider.issuer
    assert "gateway" in _aud(claims)
    assert claims["azp"] == "gateway-console"
    assert claims["typ"] == "Bearer"
    assert claims["preferred_username"] == "sam"
    assert claims["realm_access"]["roles"] == ["supervisor"]
    assert claims["sid"] == tokens["session_state"]
    assert str(uuid.UUID(claims["sub"])) == claims["sub"]
    assert claims["exp"] - claims["iat"] == 300
    assert claims["jti"] and set(claims["scope"].split()) == {
        "openid",
        "profile",
        "email",
    }  # python-keycloak asks for openid; order varies
    assert claims["email"] == "sam@cx.example" and claims["name"] == "Sam Supervisor"
    # Same realm file, same ids in both providers.
    assert claims["sub"] == "81163178-083b-596d-8851-7247a117e581"


async def test_openid_scope_id_token_userinfo_refresh_logout(provider: Provider, http: aiohttp.ClientSession) -> None:
    oidc = provider.openid()
    tokens = await oidc.a_token("alice", "demo", scope="openid")
    assert "openid" in tokens["scope"].split()
    _, id_claims = await _claims(http, provider, tokens["id_token"])
    assert id_claims["typ"] == "ID" and id_claims["aud"] == "gateway-console"
    assert id_claims["preferred_username"] == "alice"
    info = await oidc.a_userinfo(tokens["access_token"])
    assert info["preferred_username"] == "alice" and info["sub"] == id_claims["sub"]

    refreshed = await oidc.a_refresh_token(tokens["refresh_token"])
    _, claims = await _claims(http, provider, refreshed["access_token"])
    assert claims["realm_access"]["roles"] == ["agent"] and claims["sid"] == id_claims["sid"]

    await oidc.a_logout(refreshed["refresh_token"])
    status, body = await _post(
        http,
        f"{provider.oidc}/token",
        {
            "grant_type": "refresh_token",
            "client_id": "gateway-console",
            "refresh_token": refreshed["refresh_token"],
        },
    )
    assert status == 400 and body["error"] == "invalid_grant"


async def test_client_credentials_has_platform_role(provider: Provider, http: aiohttp.ClientSession) -> None:
    basic = (
        {"Authorization": aiohttp.encode_basic_auth("cx-platform", "dev-secret")}
        if hasattr(aiohttp, "encode_basic_auth")
        else {"Authorization": "Basic " + base64.b64encode(b"cx-platform:dev-secret").decode()}
    )
    for kw in ({"headers": basic}, {}):
        form = {"grant_type": "client_credentials"}
        if not kw:
            form.update(client_id="cx-platform", client_secret="dev-secret")
        status, body = await _post(http, f"{provider.oidc}/token", form, **kw)
        assert status == 200, body
        assert "refresh_token" not in body  # Keycloak 26: none for client credentials
        _, claims = await _claims(http, provider, body["access_token"])
        assert claims["azp"] == "cx-platform"
        assert claims["realm_access"]["roles"] == ["platform"]
        assert "gateway" in _aud(claims) and claims["typ"] == "Bearer"
        assert claims["preferred_username"] == "service-account-cx-platform"
        assert "sid" not in claims
        assert set(claims["resource_access"]["realm-management"]["roles"]) == {
            "view-users",
            "query-users",
            "query-groups",
            "view-realm",
        }


async def test_wrong_credentials_refused(provider: Provider, http: aiohttp.ClientSession) -> None:
    token_url = f"{provider.oidc}/token"
    for user, password in (("sam", "wrong"), ("nobody", "demo"), ("sam", "")):
        status, body = await _post(
            http,
            token_url,
            {"grant_type": "password", "client_id": "gateway-console", "username": user, "password": password},
        )
        assert (status, body["error"]) == (401, "invalid_grant"), (user, body)
        assert body["error_description"] == "Invalid user credentials"
    with pytest.raises(KeycloakAuthenticationError):
        await provider.openid().a_token("sam", "not-the-password")

    cases = [
        (
            {"grant_type": "client_credentials", "client_id": "cx-platform", "client_secret": "nope"},
            401,
            "unauthorized_client",
        ),
        ({"grant_type": "client_credentials", "client_id": "gateway-console"}, 401, "unauthorized_client"),
        ({"grant_type": "password", "client_id": "nope", "username": "sam", "password": "demo"}, 401, "invalid_client"),
        (
            {
                "grant_type": "password",
                "client_id": "cx-platform",
                "client_secret": "dev-secret",
                "username": "sam",
                "password": "demo",
            },
            400,
            "unauthorized_client",
        ),
        (
            {
                "grant_type": "password",
                "client_id": "gateway-console",
                "username": "service-account-cx-platform",
                "password": "",
            },
            401,
            "invalid_grant",
        ),
        ({"grant_type": "magic", "client_id": "gateway-console"}, 400, "unsupported_grant_type"),
        ({"client_id": "gateway-console"}, 400, "invalid_request"),
        (
            {"grant_type": "refresh_token", "client_id": "gateway-console", "refresh_token": "a.b.c"},
            400,
            "invalid_grant",
        ),
    ]
    for form, status, error in cases:
        got, body = await _post(http, token_url, form)
        assert (got, body["error"]) == (status, error), (form, body)


async def test_console_redirect_uris(provider: Provider, http: aiohttp.ClientSession) -> None:
    """The console's loopback redirect URIs (any port) are accepted; others are not."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    base = {
        "client_id": "gateway-console",
        "response_type": "code",
        "scope": "openid",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "s",
    }
    for uri, ok in (
        ("http://127.0.0.1:8080/", True),
        ("http://127.0.0.1:5173/console/cb", True),
        ("http://localhost:8080/console/", True),
        ("http://evil.example/", False),
        ("http://127.0.0.1.evil.example/", False),
    ):
        async with http.get(
            f"{provider.oidc}/auth", params={**base, "redirect_uri": uri}, allow_redirects=False
        ) as resp:
            await resp.read()
            assert (resp.status == 200) == ok, (uri, resp.status)


# --- admin API via python-keycloak ---------------------------------------------------------------
async def test_admin_groups_with_attributes(provider: Provider) -> None:
    admin = provider.admin()
    groups = await admin.a_get_groups(query={"briefRepresentation": False})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"team-a", "team-b"}
    assert by_name["team-a"]["id"] == TEAM_A
    assert by_name["team-a"]["attributes"] == {"supervisor": ["sam,tom"]}
    assert by_name["team-b"]["attributes"] == {"supervisor": ["sue"]}
    # Keycloak lists attributes only with briefRepresentation=false (DESIGN.md §4).
    assert all("attributes" not in g for g in await admin.a_get_groups())

    group = await admin.a_get_group(TEAM_A)
    assert group["path"] == "/team-a" and group["attributes"]["supervisor"] == ["sam,tom"]

    users = await admin.a_get_users({"username": "alice", "exact": True})
    assert [u["username"] for u in users] == ["alice"]
    assert users[0]["email"] == "alice@cx.example" and users[0]["enabled"] is True
    assert await admin.a_get_users({"username": "ali", "exact": True}) == []
    member_of = await admin.a_get_user_groups(users[0]["id"], brief_representation=False)
    assert [(g["path"], g["attributes"]) for g in member_of] == [("/team-a", {"supervisor": ["sam,tom"]})]
    nora = await admin.a_get_users({"username": "nora", "exact": True})
    assert await admin.a_get_user_groups(nora[0]["id"], brief_representation=False) == []


async def test_changing_team_supervisors_through_admin_api(provider: Provider) -> None:
    manager = provider.admin("cx-admin", "dev-admin-secret")
    reader = provider.admin()
    before = await manager.a_get_group(TEAM_A)
    try:
        await manager.a_update_group(TEAM_A, {**before, "attributes": {"supervisor": ["sam,tom,nora"]}})
        assert (await reader.a_get_group(TEAM_A))["attributes"] == {"supervisor": ["sam,tom,nora"]}
        listed = await reader.a_get_groups(query={"briefRepresentation": False})
        assert {g["name"]: g["attributes"] for g in listed}["team-a"] == {"supervisor": ["sam,tom,nora"]}
        # The platform's service account may read teams but not change them.
        with pytest.raises(KeycloakError) as refused:
            await reader.a_update_group(TEAM_A, {"attributes": {"supervisor": ["x"]}})
        assert refused.value.response_code == 403
    finally:
        await manager.a_update_group(TEAM_A, before)
    assert (await reader.a_get_group(TEAM_A))["attributes"] == {"supervisor": ["sam,tom"]}


async def test_admin_api_refuses_without_rights(provider: Provider, http: aiohttp.ClientSession) -> None:
    groups = f"{provider.url}/admin/realms/{provider.realm}/groups"
    async with http.get(groups) as resp:
        assert resp.status == 401
    async with http.get(groups, headers={"Authorization": "Bearer not.a.token"}) as resp:
        assert resp.status == 401
    user_token = (await provider.openid().a_token("sam", "demo"))["access_token"]
    async with http.get(groups, headers={"Authorization": f"Bearer {user_token}"}) as resp:
        assert resp.status == 403
    platform = (await provider.openid("cx-platform", "dev-secret").a_token(grant_type="client_credentials"))[
        "access_token"
    ]
    async with http.get(f"{groups}/{uuid.uuid4()}", headers={"Authorization": f"Bearer {platform}"}) as resp:
        assert resp.status == 404


# --- embedded only ------------------------------------------------------------------------------
@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Provider]:
    async for p in _embedded(tmp_path):
        yield p


async def test_embedded_key_survives_restart(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    agen = _embedded(tmp_path)
    first = await agen.__anext__()
    tokens = await first.openid().a_token("tom", "demo")
    logged_out = await first.openid().a_token("tom", "demo")
    await first.openid().a_logout(logged_out["refresh_token"])
    async with http.get(f"{first.oidc}/certs") as resp:
        keys_before = await resp.json()
    await agen.aclose()

    agen = _embedded(tmp_path, int(first.url.rsplit(":", 1)[1]))  # same data_dir and port
    second = await agen.__anext__()
    try:
        async with http.get(f"{second.oidc}/certs") as resp:
            assert await resp.json() == keys_before
        _, claims = await _claims(http, second, tokens["access_token"])
        assert claims["preferred_username"] == "tom"
        # The refresh token also still works (the session is rebuilt from it).
        refreshed = await second.openid().a_refresh_token(tokens["refresh_token"])
        assert refreshed["access_token"]
        # ... but a session ended by logout stays ended.
        status, body = await _post(
            http,
            f"{second.oidc}/token",
            {
                "grant_type": "refresh_token",
                "client_id": "gateway-console",
                "refresh_token": logged_out["refresh_token"],
            },
        )
        assert (status, body["error"]) == (400, "invalid_grant")
    finally:
        await agen.aclose()
    assert oct(Path(tmp_path, "var", "idp-signing-key.json").stat().st_mode & 0o777) == "0o600"


async def test_embedded_issuer_ignores_host_header(embedded: Provider, http: aiohttp.ClientSession) -> None:
    status, body = await _post(
        http,
        f"{embedded.oidc}/token",
        {"grant_type": "password", "client_id": "gateway-console", "username": "sue", "password": "demo"},
        headers={"Host": "evil.example"},
    )
    assert status == 200
    _, claims = await _claims(http, embedded, body["access_token"])
    assert claims["iss"] == embedded.issuer


async def test_embedded_authorization_code_with_pkce(embedded: Provider, http: aiohttp.ClientSession) -> None:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    redirect = "http://127.0.0.1:5173/console/callback"
    params = {
        "client_id": "gateway-console",
        "redirect_uri": redirect,
        "response_type": "code",
        "scope": "openid",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get(f"{embedded.oidc}/auth", params=params) as resp:
        assert resp.status == 200 and "<form" in await resp.text()
    # Without PKCE the console client is refused (pkce.code.challenge.method=S256).
    plain = {k: v for k, v in params.items() if not k.startswith("code_")}
    async with http.get(f"{embedded.oidc}/auth", params=plain, allow_redirects=False) as resp:
        assert resp.status == 302 and "error=invalid_request" in resp.headers["Location"]
    async with http.get(
        f"{embedded.oidc}/auth", params={**params, "redirect_uri": "http://evil.example/"}, allow_redirects=False
    ) as resp:
        assert resp.status == 400
    async with http.post(
        f"{embedded.oidc}/auth", data={**params, "username": "sam", "password": "bad"}, allow_redirects=False
    ) as resp:
        assert resp.status == 401 and "Location" not in resp.headers
    async with http.post(
        f"{embedded.oidc}/auth", data={**params, "username": "sam", "password": "demo"}, allow_redirects=False
    ) as resp:
        assert resp.status == 302
        location = resp.headers["Location"]
    assert location.startswith(redirect + "?")
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == ["st-1"]
    code = query["code"][0]
    token_url = f"{embedded.oidc}/token"
    base = {"grant_type": "authorization_code", "client_id": "gateway-console", "code": code, "redirect_uri": redirect}
    status, body = await _post(http, token_url, {**base, "code_verifier": "x" * 50})
    assert (status, body["error"]) == (400, "invalid_grant")
    # The code was used up by the failed attempt, as in Keycloak: log in again.
    async with http.post(
        f"{embedded.oidc}/auth", data={**params, "username": "sam", "password": "demo"}, allow_redirects=False
    ) as resp:
        code = parse_qs(urlsplit(resp.headers["Location"]).query)["code"][0]
    status, body = await _post(http, token_url, {**base, "code": code, "code_verifier": verifier})
    assert status == 200, body
    _, id_claims = await _claims(http, embedded, body["id_token"])
    assert id_claims["nonce"] == "n-1" and id_claims["preferred_username"] == "sam"
    status, body = await _post(http, token_url, {**base, "code": code, "code_verifier": verifier})
    assert status == 400  # one use only


async def test_embedded_never_answers_500_to_garbage(embedded: Provider, http: aiohttp.ClientSession) -> None:
    platform = (await embedded.openid("cx-platform", "dev-secret").a_token(grant_type="client_credentials"))[
        "access_token"
    ]
    admin = (await embedded.openid("cx-admin", "dev-admin-secret").a_token(grant_type="client_credentials"))[
        "access_token"
    ]
    token_url = f"{embedded.oidc}/token"
    adm = f"{embedded.url}/admin/realms/cx"
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", token_url, {"data": "grant_type=password", "headers": {"Content-Type": "text/plain"}}),
        ("POST", token_url, {"json": {"grant_type": "password"}}),
        (
            "POST",
            token_url,
            {"data": "grant_type=%ff%fe&client_id=%", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        ),
        (
            "POST",
            token_url,
            {
                "data": {
                    "grant_type": "password",
                    "client_id": "gateway-console",
                    "username": "s" * 5000,
                    "password": "x",
                }
            },
        ),
        ("POST", token_url, {"data": {"grant_type": "client_credentials"}, "headers": {"Authorization": "Basic !!!"}}),
        (
            "POST",
            token_url,
            {
                "data": {"grant_type": "client_credentials"},
                "headers": {"Authorization": "Basic " + base64.b64encode(b"nocolon").decode()},
            },
        ),
        (
            "POST",
            token_url,
            {"data": {"grant_type": "refresh_token", "client_id": "gateway-console", "refresh_token": "x" * 20000}},
        ),
        ("POST", token_url, {"data": {"grant_type": "authorization_code", "client_id": "gateway-console"}}),
        ("GET", f"{embedded.url}/realms/other/.well-known/openid-configuration", {}),
        ("GET", f"{embedded.oidc}/userinfo", {"headers": {"Authorization": "Bearer ..."}}),
        (
            "POST",
            f"{embedded.oidc}/userinfo",
            {"data": "access_token=" + "x" * 5000, "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        ),
        (
            "POST",
            f"{embedded.oidc}/userinfo",
            {"data": "%ff=%fe", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        ),
        ("GET", f"{embedded.oidc}/logout", {"params": {"id_token_hint": "garbage"}}),
        ("POST", f"{embedded.oidc}/logout", {"data": {"client_id": "gateway-console", "refresh_token": "garbage"}}),
        ("GET", f"{embedded.oidc}/auth", {"params": {"client_id": "nope"}}),
        ("GET", f"{adm}/groups", {"params": {"first": "x"}, "headers": {"Authorization": f"Bearer {platform}"}}),
        (
            "GET",
            f"{adm}/groups",
            {"params": {"briefRepresentation": "maybe"}, "headers": {"Authorization": f"Bearer {platform}"}},
        ),
        (
            "GET",
            f"{adm}/users",
            {"params": {"max": "y", "search": "*"}, "headers": {"Authorization": f"Bearer {platform}"}},
        ),
        (
            "PUT",
            f"{adm}/groups/{TEAM_A}",
            {"data": "{not json", "headers": {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}},
        ),
        ("PUT", f"{adm}/groups/{TEAM_A}", {"json": [1, 2], "headers": {"Authorization": f"Bearer {admin}"}}),
        (
            "PUT",
            f"{adm}/groups/{TEAM_A}",
            {"json": {"attributes": {"supervisor": [1]}}, "headers": {"Authorization": f"Bearer {admin}"}},
        ),
        ("PUT", f"{adm}/groups/{TEAM_A}", {"json": {"name": ""}, "headers": {"Authorization": f"Bearer {admin}"}}),
        (
            "PUT",
            f"{adm}/groups/{TEAM_A}",
            {"json": {"name": "team-b"}, "headers": {"Authorization": f"Bearer {admin}"}},
        ),
        (
            "PUT",
            f"{adm}/groups/{TEAM_A}",
            {"data": "x", "headers": {"Authorization": f"Bearer {admin}", "Content-Type": "text/plain"}},
        ),
    ]
    for method, url, kw in requests:
        async with http.request(method, url, allow_redirects=False, **kw) as resp:
            await resp.read()
            assert 400 <= resp.status < 500, (method, url, kw, resp.status)
    async with http.get(f"{adm}/groups/{TEAM_A}", headers={"Authorization": f"Bearer {platform}"}) as resp:
        assert (await resp.json())["attributes"] == {"supervisor": ["sam,tom"]}


def test_embedded_redirect_uri_patterns() -> None:
    from devtools.idp.realm import load_realm

    client = load_realm(Path(__file__).parent.parent / "fixtures" / "realm-cx-dev.json").clients["gateway-console"]
    assert client.redirect_allowed("http://127.0.0.1:8080/")
    assert client.redirect_allowed("http://localhost:5173/cb?x=1")
    assert not client.redirect_allowed("http://127.0.0.1.evil.example/")
    assert not client.redirect_allowed("http://127.0.0.1:80x/")
    assert not client.redirect_allowed("https://example.com/")
    assert re.fullmatch(r"[0-9a-f-]{36}", client.id)
