"""Token attacks: every one is 401 ``invalid_token`` and none makes the gateway fetch keys."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from jwcrypto import jwk, jws

from devtools.idp.keys import load_or_create_key
from gateway.api.context import JWKS, SETTINGS
from tests.support import GatewayClient, make_settings, running_gateway

pytestmark = pytest.mark.api


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(gateway: GatewayClient, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": f"{gateway.idp_url}/realms/cx",
        "sub": str(uuid.uuid4()),
        "aud": ["gateway"],
        "azp": "gateway-console",
        "typ": "Bearer",
        "exp": now + 300,
        "iat": now,
        "sid": str(uuid.uuid4()),
        "preferred_username": "sam",
        "realm_access": {"roles": ["supervisor"]},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: jwk.JWK, claims: dict[str, Any], *, alg: str = "RS256", kid: str | None = None) -> str:
    token = jws.JWS(json.dumps(claims).encode())
    header = {"alg": alg, "typ": "JWT", "kid": kid if kid is not None else key.get("kid") or key.thumbprint()}
    token.add_signature(key, alg=alg, protected=json.dumps(header))
    return str(token.serialize(compact=True))


def _realm_key(gateway: GatewayClient) -> jwk.JWK:
    assert gateway.app is not None
    key = load_or_create_key(gateway.app[SETTINGS].data_dir)
    return key


async def _fetches(gateway: GatewayClient) -> int:
    assert gateway.app is not None
    return int(gateway.app[JWKS].fetches)


async def _expect_401(gateway: GatewayClient, token: str) -> None:
    answer = await gateway.call("GET", "/v1/conversations", token)
    assert (answer.status, answer.code) == (401, "invalid_token"), (answer.status, answer.body)


async def test_a_genuine_forged_shape_is_accepted(gateway: GatewayClient) -> None:
    """The control: a token signed with the realm's key and sane claims works, so the
    refusals below are due to what each one changes."""
    token = _sign(_realm_key(gateway), _claims(gateway))
    answer = await gateway.call("GET", "/v1/conversations", token)
    assert answer.status == 200, answer.body


async def test_token_attacks_are_refused_without_fetching_keys(gateway: GatewayClient) -> None:
    realm_key = _realm_key(gateway)
    kid = realm_key.get("kid") or realm_key.thumbprint()
    public_pem = realm_key.export_to_pem()
    now = int(time.time())
    foreign = jwk.JWK.generate(kty="RSA", size=2048)
    tokens = await gateway.token_response("sam")
    before = await _fetches(gateway)

    header_none = _b64(json.dumps({"alg": "none", "kid": kid}).encode())
    attacks = {
        "alg none": f"{header_none}.{_b64(json.dumps(_claims(gateway)).encode())}.",
        "HS256 with the public key": _sign(
            jwk.JWK(kty="oct", k=_b64(public_pem)), _claims(gateway), alg="HS256", kid=kid
        ),
        "foreign key, realm kid": _sign(foreign, _claims(gateway), kid=kid),
        "expired": _sign(realm_key, _claims(gateway, exp=now - 120, iat=now - 420)),
        "nbf in the future": _sign(realm_key, _claims(gateway, nbf=now + 600)),
        "wrong iss": _sign(realm_key, _claims(gateway, iss="http://127.0.0.1:1/realms/cx")),
        "wrong audience": _sign(realm_key, _claims(gateway, aud=["someone-else"], azp="someone-else")),
        "missing exp": _sign(realm_key, _claims(gateway, exp=None)),
        "ID token": tokens["id_token"],
        "refresh token": tokens["refresh_token"],
        "garbage": "not-a-token",
        "three dots of garbage": "a.b.c",
        "8 KB+": _sign(realm_key, _claims(gateway, padding="x" * 9000)),
    }
    for name, token in attacks.items():
        try:
            await _expect_401(gateway, token)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    assert await _fetches(gateway) == before, "a refused token made the gateway fetch the JWKS"


async def test_unknown_kid_refetches_once_per_interval(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path, jwks_refetch_interval=1.0)) as gateway:
        await asyncio.sleep(1.1)  # past the interval of the start-up fetch
        foreign = jwk.JWK.generate(kty="RSA", size=2048)
        before = await _fetches(gateway)
        for i in range(20):
            await _expect_401(gateway, _sign(foreign, _claims(gateway), kid=f"unknown-{i}"))
        assert await _fetches(gateway) - before == 1
        # The genuine key is still known afterwards.
        assert (
            await gateway.call("GET", "/v1/conversations", _sign(_realm_key(gateway), _claims(gateway)))
        ).status == 200


async def test_missing_and_malformed_authorization(gateway: GatewayClient) -> None:
    answer = await gateway.call("GET", "/v1/conversations")
    assert (answer.status, answer.code) == (401, "invalid_token")
    answer = await gateway.call("GET", "/v1/conversations", headers={"Authorization": "Basic c2FtOmRlbW8="})
    assert (answer.status, answer.code) == (401, "invalid_token")
    # A query-string token is for websocket routes only (browsers can not set their headers),
    # even when a client dresses a plain request up as an upgrade.
    token = await gateway.login("sam")
    answer = await gateway.call("GET", f"/v1/conversations?access_token={token}")
    assert answer.status == 401
    answer = await gateway.call(
        "GET", f"/v1/conversations?access_token={token}", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert answer.status == 401
    # A JSON-serialised JWS of a genuine token is not a Bearer token.
    header, payload, signature = token.split(".")
    as_json = json.dumps({"protected": header, "payload": payload, "signature": signature})
    await _expect_401(gateway, as_json)
