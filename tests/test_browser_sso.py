"""Single sign-on in the supervisor console: authorization code + PKCE (S256) in headless Chromium.

Against the gateway's embedded identity provider (its ``/auth`` login form) and against a real
Keycloak (``devtools/keycloak.py``): the console sends the browser to the realm's
authorization endpoint, comes back with ``?code=&state=``, checks the state, exchanges the code
with the verifier and lands on the Ongoing Conversations dashboard, team-scoped as after a
password sign-in. Playwright drives the Debian Chromium (never a downloaded browser).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest

from devtools.keycloak import KeycloakServer
from tests.support import GatewayClient, make_settings, running_gateway

pytestmark = [pytest.mark.browser, pytest.mark.slow]

from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, playwright_api  # noqa: E402


@asynccontextmanager
async def chromium_page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            page.console_log = []
            page.on("console", lambda m: page.console_log.append(m.text))
            yield page
        finally:
            await browser.close()


async def _open_console(page: Any, base_url: str) -> None:
    await page.goto(base_url + "/")
    await page.wait_for_selector("body[data-ready='true']")
    await page.wait_for_selector("[data-testid='sso-button']", state="visible")


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _check_authorization_request(url: str, idp_base: str, base_url: str) -> None:
    assert url.startswith(f"{idp_base}/realms/cx/protocol/openid-connect/auth?"), url
    q = _query(url)
    assert q["response_type"] == "code" and q["client_id"] == "gateway-console" and q["scope"] == "openid"
    assert q["redirect_uri"] == base_url + "/"
    assert q["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", q["code_challenge"]), q["code_challenge"]
    assert len(q["state"]) >= 16


async def _dashboard_rows(page: Any) -> list[str]:
    try:
        await page.wait_for_selector("[data-testid='dashboard-view']", state="visible", timeout=15000)
    except playwright_api.TimeoutError:
        error = (
            await page.text_content("[data-testid='sso-error']")
            if await page.query_selector("[data-testid='sso-error']")
            else None
        )
        raise AssertionError(
            f"no dashboard at {page.url}; sign-in error: {error!r}; console: {getattr(page, 'console_log', [])}"
        ) from None
    await page.wait_for_selector("[data-testid^='conv-row-']")
    return sorted(
        await page.eval_on_selector_all("[data-testid^='conv-row-']", "rows => rows.map(r => r.dataset.conversation)")
    )


async def _assert_clean_return(page: Any, base_url: str) -> None:
    """Back on the console: the code and state are gone from the URL, the verifier from storage."""
    assert page.url == base_url + "/", page.url
    assert await page.evaluate("sessionStorage.getItem('gateway-console.pkce')") is None


async def test_sso_against_the_embedded_provider(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        assert (await gw.conversation("sso-a1")).status == 201
        assert (await gw.conversation("sso-b1", agent="bob")).status == 201
        async with chromium_page() as page:
            await _open_console(page, gw.base_url)
            # The embedded dev realm keeps the password form next to single sign-on.
            assert await page.is_visible("[data-testid='login-form']")

            await page.click("[data-testid='sso-button']")
            await page.wait_for_url(re.compile(r".*/protocol/openid-connect/auth\?.*"))
            _check_authorization_request(page.url, gw.base_url, gw.base_url)
            await page.fill("input[name='username']", "sam")
            await page.fill("input[name='password']", "demo")
            await page.click("button[type='submit']")

            assert await _dashboard_rows(page) == ["sso-a1"]
            assert await page.text_content("[data-testid='user-name']") == "sam"
            await _assert_clean_return(page, gw.base_url)
            # The session is a normal one: it carries a refresh token, the API accepts it.
            session = await page.evaluate("JSON.parse(sessionStorage.getItem('gateway-console.session'))")
            assert session["refresh_token"] and session["username"] == "sam"
            answer = await gw.call("GET", "/v1/conversations", session["access_token"])
            assert answer.status == 200 and [c["id"] for c in answer.body] == ["sso-a1"]


@pytest.fixture
async def kc_gateway(tmp_path: Path, keycloak: KeycloakServer) -> AsyncIterator[GatewayClient]:
    """The gateway against Keycloak, its console origin registered as a web origin of the client.

    The console exchanges the code with a cross-origin fetch, so Keycloak must answer with CORS
    headers for the console's origin. The realm fixture's ``"webOrigins": ["+"]`` derives origins
    from the redirect URIs, and its dev redirect URIs have wildcard ports (``http://127.0.0.1:*``),
    which give no usable origin; a deployment lists the console's exact URL. So this fixture adds
    the gateway's exact origin for the test and restores the client afterwards (the Keycloak is
    shared by the whole run).
    """
    settings = make_settings(tmp_path, keycloak_url=keycloak.url)
    status, clients = keycloak.admin("GET", "/clients?clientId=gateway-console")
    assert status == 200 and len(clients) == 1, clients
    original = clients[0]
    origin = settings.base_url.rstrip("/")
    updated = {**original, "webOrigins": sorted(set(original.get("webOrigins") or []) | {origin})}
    status, body = keycloak.admin("PUT", f"/clients/{original['id']}", updated)
    assert status in (200, 204), body
    try:
        async with running_gateway(settings) as client:
            yield client
    finally:
        keycloak.admin("PUT", f"/clients/{original['id']}", original)


async def _keycloak_login(page: Any, keycloak: KeycloakServer, base_url: str, user: str) -> None:
    await page.click("[data-testid='sso-button']")
    await page.wait_for_selector("#kc-login", timeout=30000)
    _check_authorization_request(page.url, keycloak.url, base_url)
    await page.fill("#username", user)
    await page.fill("#password", "demo")
    await page.click("#kc-login")


@pytest.mark.keycloak
async def test_sso_against_real_keycloak(kc_gateway: GatewayClient, keycloak: KeycloakServer) -> None:
    gw = kc_gateway
    assert (await gw.conversation("kcsso-a1")).status == 201
    assert (await gw.conversation("kcsso-b1", agent="bob")).status == 201
    async with chromium_page() as page:
        await _open_console(page, gw.base_url)
        # A real Keycloak: no password form in the console, single sign-on only.
        assert await page.is_hidden("[data-testid='login-form']")
        assert await page.is_hidden("[data-testid='username']")

        await _keycloak_login(page, keycloak, gw.base_url, "sam")
        rows = await _dashboard_rows(page)
        assert rows == ["kcsso-a1"] and "kcsso-b1" not in rows
        assert await page.text_content("[data-testid='user-name']") == "sam"
        await _assert_clean_return(page, gw.base_url)
        session = await page.evaluate("JSON.parse(sessionStorage.getItem('gateway-console.session'))")
        assert session["refresh_token"]


@pytest.mark.keycloak
async def test_sso_wrong_state_is_refused(kc_gateway: GatewayClient, keycloak: KeycloakServer) -> None:
    gw = kc_gateway
    assert (await gw.conversation("kcsso-a2")).status == 201
    async with chromium_page() as page:
        tampered: list[str] = []

        async def tamper(route: Any) -> None:
            # Keycloak's answer to the login form redirects back to the console with ?code=&state=:
            # change the state before the browser follows it (a redirect target can not be routed).
            response = await route.fetch(max_redirects=0)
            location = response.headers.get("location", "")
            parts = urlsplit(location)
            query = parse_qs(parts.query)
            if response.status not in (302, 303) or "code" not in query or not location.startswith(gw.base_url):
                await route.fulfill(response=response)
                return
            query["state"] = ["forged-" + query["state"][0]]
            target = urlunsplit(parts._replace(query=urlencode({k: v[0] for k, v in query.items()})))
            tampered.append(target)
            await route.fulfill(status=302, headers={"Location": target})

        await page.route(re.compile(re.escape(keycloak.url) + r"/realms/cx/login-actions/authenticate.*"), tamper)
        await _open_console(page, gw.base_url)
        await _keycloak_login(page, keycloak, gw.base_url, "sam")

        await page.wait_for_selector("[data-testid='sso-error']", state="visible", timeout=15000)
        assert tampered, "the redirect back to the console was not seen"
        assert await page.get_attribute("[data-testid='sso-error']", "data-code") == "sso_state_mismatch"
        assert "did not match" in (await page.text_content("[data-testid='sso-error']") or "")
        assert await page.is_hidden("[data-testid='dashboard-view']")
        assert await page.evaluate("sessionStorage.getItem('gateway-console.session')") is None
        await _assert_clean_return(page, gw.base_url)
