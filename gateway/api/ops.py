"""Operations endpoints: liveness, readiness, metrics, the OpenAPI document, console config."""

from __future__ import annotations

from aiohttp import web

from gateway.api.context import JWKS, METRICS, RUNTIME, SETTINGS, SHARED, SIP
from gateway.api.openapi import openapi_document

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic: SIP workers up, identity keys loaded, shared state reachable, not draining."""
    checks: dict[str, bool] = {"not_draining": not request.app[RUNTIME].draining}
    jwks = request.app[JWKS]
    if not jwks.loaded:
        await jwks.refresh()
    checks["identity"] = jwks.loaded
    sip = request.app.get(SIP)
    if sip is not None:
        checks["sip_workers"] = bool(sip.ready)
    shared = request.app.get(SHARED)
    if shared is not None:
        checks["shared_state"] = shared.available
    ready = all(checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status=200 if ready else 503
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[SETTINGS].base_url))


@routes.get("/config.json")
async def console_config(request: web.Request) -> web.Response:
    """What the browser console needs to sign in."""
    settings = request.app[SETTINGS]
    idp = settings.keycloak_url or ""  # empty: same origin (the embedded provider)
    return web.json_response(
        {"idp_url": idp, "realm": settings.realm, "client_id": "gateway-console", "embedded_idp": settings.embedded_idp}
    )
