"""Authenticating a request: the bearer token, the role it needs, and the audit of refusals."""

from __future__ import annotations

from aiohttp import web

from gateway.api.context import AUTHENTICATOR, METRICS
from gateway.domain import Principal
from gateway.errors import GatewayError, forbidden_role, invalid_token


def bearer_token(request: web.Request, *, websocket: bool = False) -> str:
    """The access token from ``Authorization: Bearer``. Websocket routes (``websocket=True``)
    also take ``?access_token=`` on the GET that upgrades, because browsers can not set
    headers on websockets; no other route does (query strings end up in logs)."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise invalid_token("expected 'Authorization: Bearer <token>'")
        return token.strip()
    token = request.query.get("access_token", "")
    if token and websocket and request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket":
        return token
    raise invalid_token("no bearer token")


async def authenticate(request: web.Request, *roles: str, websocket: bool = False) -> Principal:
    """The caller, who must hold at least one of ``roles`` (any role when none is given)."""
    try:
        principal = await request.app[AUTHENTICATOR].authenticate(bearer_token(request, websocket=websocket))
    except GatewayError as exc:
        if exc.code == "invalid_token":
            request.app[METRICS].token_rejections.inc()
        raise
    if roles and not any(principal.has_role(role) for role in roles):
        raise forbidden_role(" or ".join(roles))
    return principal


async def authenticate_supervisor(request: web.Request) -> Principal:
    return await authenticate(request, "supervisor")
