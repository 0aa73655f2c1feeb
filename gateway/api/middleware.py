"""Every answer that is not a success is a JSON error with a stable code; nothing else leaks."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.api.context import METRICS, SERVICE
from gateway.errors import CODE_OF_STATUS, ERRORS, ErrorCode, GatewayError, http_status

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Headers of an HTTP exception's own text body, replaced by the JSON error's.
_BODY_HEADERS = frozenset({"content-type", "content-length"})


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of aiohttp's HTTP server: a request it can not parse (a NUL byte in a header,
    a bad request line) is the client's fault, answered 400 before any handler runs. Log it at
    info on one line, without the traceback and without the offending line (it may hold a token)."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: object = True, **kwargs: object) -> None:
        if isinstance(exc_info, HttpProcessingError) and exc_info.code == 400:
            reason = str(exc_info.message).strip().splitlines()[0].rstrip(":") if exc_info.message else "malformed"
            remote = args[0] if args else None
            self.logger.info("refused an unparsable HTTP request from %s: %s", remote, reason, extra={"status": 400})
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = time.perf_counter()
    try:
        response = await handler(request)
    except GatewayError as exc:
        status = http_status(exc.code)
        metrics.refusals.labels(code=exc.code.value).inc()
        response = web.json_response(exc.to_json(), status=status, headers=exc.headers or None)
        log.info("refused: %s", exc.message, extra={"route": route, "status": status, "code": exc.code.value})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = CODE_OF_STATUS.get(exc.status, ErrorCode.BAD_REQUEST if exc.status < 500 else ErrorCode.UNAVAILABLE)
        # keep what the exception says besides its text body, e.g. a 405's `Allow`
        headers = {name: value for name, value in exc.headers.items() if name.lower() not in _BODY_HEADERS}
        response = error_response(exc.status, code.value, exc.reason, headers)
    except Exception:
        log.exception("unhandled error", extra={"route": route})
        response = error_response(500, ErrorCode.INTERNAL_ERROR.value, ERRORS[ErrorCode.INTERNAL_ERROR].message)
    metrics.requests.labels(route=route, status=str(response.status)).inc()
    metrics.latency.labels(route=route).observe(time.perf_counter() - started)
    return response


@web.middleware
async def state_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a shared store (Redis): an API request is refused at once with 503
    ``state_unavailable`` while the store can not answer truthfully, and its answer waits until
    what it changed is in the shared store (so no answer gets ahead of what other instances see)."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    service = request.app[SERVICE]
    service.check_state()
    response = await handler(request)
    if not isinstance(response, web.WebSocketResponse):
        await service.committed()
    return response
