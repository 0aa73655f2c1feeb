"""Reading request bodies: size, media type, JSON, and field types, each with its own code.

Every malformed input becomes a :class:`GatewayError` (400/413/415/422), never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gateway.errors import ErrorCode, GatewayError

_MISSING = object()


async def read_json(request: web.Request, *, max_bytes: int, required: bool = True) -> dict[str, Any]:
    """The JSON object in the body; ``{}`` for an empty body when not ``required``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise GatewayError(ErrorCode.BODY_TOO_LARGE, f"the body is larger than {max_bytes} bytes")
    raw = await read_limited(request, max_bytes)
    if not raw.strip():
        if required:
            raise GatewayError(ErrorCode.EMPTY_BODY, "a JSON body is required")
        return {}
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise GatewayError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise GatewayError(ErrorCode.INVALID_BODY, "the body must be a JSON object")
    return body


async def read_limited(request: web.Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(16384):
        size += len(chunk)
        if size > max_bytes:
            raise GatewayError(ErrorCode.BODY_TOO_LARGE, f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def field(
    body: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    *,
    default: Any = _MISSING,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """``body[name]`` checked against ``kind`` (and ``choices``); 422 ``invalid_field`` otherwise."""
    if name not in body or body[name] is None and default is not _MISSING:
        if default is _MISSING:
            raise GatewayError(ErrorCode.MISSING_FIELD, f"field {name!r} is required", field=name)
        return default
    value = body[name]
    # bool is an int in Python: never accept true for a number or 1 for a flag.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise GatewayError(ErrorCode.INVALID_FIELD, f"field {name!r} has the wrong type", field=name)
    if not isinstance(value, kind):
        raise GatewayError(ErrorCode.INVALID_FIELD, f"field {name!r} has the wrong type", field=name)
    if choices is not None and value not in choices:
        raise GatewayError(ErrorCode.INVALID_FIELD, f"field {name!r} must be one of {list(choices)}", field=name)
    return value


def conversation_id(raw: str) -> str:
    """Conversation ids appear in SIP headers and logs: keep them printable and short."""
    if not raw or len(raw) > 128 or not all(c.isalnum() or c in "-_.:@" for c in raw):
        raise GatewayError(
            ErrorCode.INVALID_CONVERSATION_ID, "conversation ids are 1-128 characters of [A-Za-z0-9-_.:@]"
        )
    return raw
