"""Every answer that is not a success is a JSON error with a stable code; nothing else leaks."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.api.context import METRICS
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_body",
    429: "rate_limited",
    503: "unavailable",
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except GatewayError as exc:
        metrics.refusals.labels(code=exc.code).inc()
        response = web.json_response(exc.to_json(), status=exc.status, headers=exc.headers or None)
        log.info("refused: %s", exc.message, extra={"route": route, "status": exc.status, "code": exc.code})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        response = error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("unhandled error", extra={"route": route})
        response = error_response(500, "internal_error", "internal error; the gateway logged it")
    metrics.requests.labels(route=route, status=str(response.status)).inc()
    metrics.latency.labels(route=route).observe(time.perf_counter() - started)
    return response
