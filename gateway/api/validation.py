"""Reading request input: size, media type, JSON and fields, each refusal with its own code.

The bodies are the pydantic models of :mod:`gateway.api.models`; :func:`refusal` is the one
place a :class:`pydantic.ValidationError` becomes a :class:`GatewayError`. Every malformed input
is a 400/413/415/422, never a 500.
"""

from __future__ import annotations

import codecs
from typing import TypeVar

from aiohttp import web
from pydantic import TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from gateway.api.models import MAX_SEQ, ConversationId, RequestBody
from gateway.errors import ErrorCode, GatewayError

Body = TypeVar("Body", bound=RequestBody)

_CONVERSATION_ID: TypeAdapter[str] = TypeAdapter(ConversationId)
_CODES = frozenset(code.value for code in ErrorCode)
_JSON_TYPES = ("application/json", "application/octet-stream", "")


async def read_body(request: web.Request, model: type[Body], *, max_bytes: int, required: bool = True) -> Body:
    """The body as ``model``; an empty body is ``{}`` when not ``required``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise GatewayError(ErrorCode.BODY_TOO_LARGE, f"the body is larger than {max_bytes} bytes")
    raw = await read_limited(request, max_bytes)
    if not raw.strip():
        if required:
            raise GatewayError(ErrorCode.EMPTY_BODY, "a JSON body is required")
        raw = b"{}"
    elif request.content_type not in _JSON_TYPES:
        raise GatewayError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
    try:
        # pydantic's JSON parser caps nesting depth itself: deep nesting is malformed, not a crash
        return model.model_validate_json(raw.removeprefix(codecs.BOM_UTF8))
    except ValidationError as exc:
        raise refusal(exc) from None


async def read_limited(request: web.Request, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(16384):
        size += len(chunk)
        if size > max_bytes:
            raise GatewayError(ErrorCode.BODY_TOO_LARGE, f"the body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def refusal(exc: ValidationError) -> GatewayError:
    """The API's answer to a body the model refused: its first error, as a stable code."""
    error = exc.errors(include_url=False)[0]
    kind = error["type"]
    if kind == "json_invalid":
        return GatewayError(ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {_context(error, 'error')}")
    if not error["loc"]:
        return GatewayError(ErrorCode.INVALID_BODY, "the body must be a JSON object")
    name = _field_name(error)
    if kind in ("missing", "union_tag_not_found"):
        return GatewayError(ErrorCode.MISSING_FIELD, f"field {name!r} is required", field=name)
    if kind in _CODES and kind != ErrorCode.INVALID_FIELD:
        # a model's own check (PydanticCustomError) names its code, e.g. invalid_sip_uri
        return GatewayError(ErrorCode(kind), error["msg"])
    message = error["msg"] if kind == ErrorCode.INVALID_FIELD else f"field {name!r}: {error['msg']}"
    return GatewayError(ErrorCode.INVALID_FIELD, message, field=name)


def _field_name(error: ErrorDetails) -> str:
    """The name of the field in the JSON object that holds the error (``sessions`` for
    ``sessions[2]``, ``kind`` for a voice of an unknown kind), as the API always named it."""
    if error["type"].startswith("union_tag_"):
        return _context(error, "discriminator").strip("'")
    return next(str(part) for part in reversed(error["loc"]) if isinstance(part, str))


def _context(error: ErrorDetails, key: str) -> str:
    return str((error.get("ctx") or {}).get(key, ""))


def conversation_id(raw: str) -> str:
    """A conversation id from a path: 1-128 characters of ``[A-Za-z0-9-_.:@]``."""
    try:
        return _CONVERSATION_ID.validate_python(raw)
    except ValidationError:
        raise GatewayError(ErrorCode.INVALID_CONVERSATION_ID) from None


def sequence_number(raw: str) -> int:
    """``?after=``: a chat sequence number, 0 when absent."""
    try:
        after = int(raw)
    except ValueError:
        raise GatewayError(ErrorCode.INVALID_AFTER, "after is a sequence number") from None
    if not 0 <= after <= MAX_SEQ:
        raise GatewayError(ErrorCode.INVALID_AFTER, "after is a sequence number")
    return after
