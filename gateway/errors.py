"""Every refusal code the gateway answers, in one table, and the one exception that carries it.

Codes are part of the contract (``docs/API.md``, ``docs/DESIGN.md`` §2): never rename one. The
domain, the policy and the planes raise :class:`GatewayError` with an :class:`ErrorCode` only;
the HTTP status each code is answered with lives here, in :data:`ERRORS`, and only the API layer
reads it (``gateway.api.middleware``). ``tests/test_errors.py`` checks that every code the console
explains (``web/messages.js``) is listed, and that every listed code is documented in the API doc.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """The stable machine-readable codes of ``{"error": {"code": ...}}``."""

    # R1-R12 (docs/DESIGN.md §2)
    NOT_TEAM_SUPERVISOR = "not_team_supervisor"
    CONVERSATION_NOT_ACTIVE = "conversation_not_active"
    MONITOR_CANNOT_MESSAGE_CUSTOMER = "monitor_cannot_message_customer"
    MONITOR_CANNOT_TRANSFER = "monitor_cannot_transfer"
    MONITOR_CANNOT_CONFERENCE = "monitor_cannot_conference"
    WHISPER_CHAT_ONLY = "whisper_chat_only"
    BARGE_CHAT_ONLY = "barge_chat_only"
    VOICE_MONITOR_BUSY = "voice_monitor_busy"
    OUTBOUND_NOT_SUPPORTED = "outbound_not_supported"
    TRANSFERRED_NOT_SUPPORTED = "transferred_not_supported"
    # monitors and conversations
    MONITOR_ENDED = "monitor_ended"
    ALREADY_MONITORING = "already_monitoring"
    CONVERSATION_ID_REUSED = "conversation_id_reused"
    NOT_YOUR_CONVERSATION = "not_your_conversation"
    CHAT_NOT_ACTIVE = "chat_not_active"
    VOICE_NOT_ACTIVE = "voice_not_active"
    VOICE_NOT_GRANTED = "voice_not_granted"
    # identity
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN = "forbidden"
    IDENTITY_UNAVAILABLE = "identity_unavailable"
    # shared state (Redis)
    STATE_UNAVAILABLE = "state_unavailable"
    # malformed input
    BAD_REQUEST = "bad_request"
    EMPTY_BODY = "empty_body"
    MALFORMED_JSON = "malformed_json"
    INVALID_BODY = "invalid_body"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    INVALID_CONVERSATION_ID = "invalid_conversation_id"
    INVALID_SIP_URI = "invalid_sip_uri"
    INVALID_AFTER = "invalid_after"
    INVALID_VIEW = "invalid_view"
    INVALID_MESSAGE = "invalid_message"
    INVALID_CLIENT_ID = "invalid_client_id"
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_TOO_LONG = "message_too_long"
    BODY_TOO_LARGE = "body_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_SDP = "invalid_sdp"
    NO_AUDIO = "no_audio"
    NO_COMMON_CODEC = "no_common_codec"
    # HTTP-level
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"
    MONITOR_RATE_LIMITED = "monitor_rate_limited"
    # capacity and media
    DRAINING = "draining"
    UNAVAILABLE = "unavailable"
    SIP_DISABLED = "sip_disabled"
    MEDIA_FAILURE = "media_failure"
    VOICE_CAPACITY = "voice_capacity"
    PHONE_UNREACHABLE = "phone_unreachable"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True)
class ErrorInfo:
    """How a code is answered over HTTP, and what it means when no message is given."""

    status: int
    message: str


E = ErrorCode
#: Every code with its HTTP status and default message.
ERRORS: dict[ErrorCode, ErrorInfo] = {
    E.NOT_TEAM_SUPERVISOR: ErrorInfo(403, "you do not supervise the team of this conversation's agent"),
    E.CONVERSATION_NOT_ACTIVE: ErrorInfo(409, "the conversation has no active session"),
    E.MONITOR_CANNOT_MESSAGE_CUSTOMER: ErrorInfo(403, "a silent monitor can not message the customer; barge in first"),
    E.MONITOR_CANNOT_TRANSFER: ErrorInfo(403, "a monitoring supervisor can not transfer the conversation"),
    E.MONITOR_CANNOT_CONFERENCE: ErrorInfo(403, "a monitoring supervisor can not start a conference"),
    E.WHISPER_CHAT_ONLY: ErrorInfo(409, "whisper is only available for chat"),
    E.BARGE_CHAT_ONLY: ErrorInfo(409, "barge-in is only available for chat"),
    E.VOICE_MONITOR_BUSY: ErrorInfo(409, "another supervisor is already listening to this call"),
    E.OUTBOUND_NOT_SUPPORTED: ErrorInfo(409, "outbound conversations can not be monitored"),
    E.TRANSFERRED_NOT_SUPPORTED: ErrorInfo(409, "transferred conversations can not be monitored"),
    E.MONITOR_ENDED: ErrorInfo(409, "this monitor has ended"),
    E.ALREADY_MONITORING: ErrorInfo(409, "you already monitor this conversation"),
    E.CONVERSATION_ID_REUSED: ErrorInfo(409, "this conversation id was used before; use a new one"),
    E.NOT_YOUR_CONVERSATION: ErrorInfo(403, "an agent may only act in its own conversations"),
    E.CHAT_NOT_ACTIVE: ErrorInfo(409, "the conversation has no active chat session"),
    E.VOICE_NOT_ACTIVE: ErrorInfo(409, "no voice legs are connected for this conversation"),
    E.VOICE_NOT_GRANTED: ErrorInfo(409, "this monitor does not hold the conversation's voice over WebRTC"),
    E.INVALID_TOKEN: ErrorInfo(401, "invalid token"),
    E.FORBIDDEN: ErrorInfo(403, "this call needs another role"),
    E.IDENTITY_UNAVAILABLE: ErrorInfo(503, "identity provider unreachable"),
    E.STATE_UNAVAILABLE: ErrorInfo(503, "the shared state (Redis) is unreachable"),
    E.BAD_REQUEST: ErrorInfo(400, "the request is malformed"),
    E.EMPTY_BODY: ErrorInfo(400, "a JSON body is required"),
    E.MALFORMED_JSON: ErrorInfo(400, "the body is not valid JSON"),
    E.INVALID_BODY: ErrorInfo(422, "the body must be a JSON object"),
    E.MISSING_FIELD: ErrorInfo(422, "a required field is missing"),
    E.INVALID_FIELD: ErrorInfo(422, "a field has the wrong type or value"),
    E.INVALID_CONVERSATION_ID: ErrorInfo(422, "conversation ids are 1-128 characters of [A-Za-z0-9-_.:@]"),
    E.INVALID_SIP_URI: ErrorInfo(422, "not a sip: URI"),
    E.INVALID_AFTER: ErrorInfo(422, "after is a non-negative sequence number"),
    E.INVALID_VIEW: ErrorInfo(422, "view is 'customer' or 'agent'"),
    E.INVALID_MESSAGE: ErrorInfo(422, "text must be a string"),
    E.INVALID_CLIENT_ID: ErrorInfo(422, "client_id must be a short string"),
    E.EMPTY_MESSAGE: ErrorInfo(422, "the message is empty"),
    E.MESSAGE_TOO_LONG: ErrorInfo(413, "the message is too long"),
    E.BODY_TOO_LARGE: ErrorInfo(413, "the body is too large"),
    E.UNSUPPORTED_MEDIA_TYPE: ErrorInfo(415, "unsupported content type"),
    E.INVALID_SDP: ErrorInfo(400, "the offer is not valid SDP"),
    E.NO_AUDIO: ErrorInfo(422, "the offer has no audio"),
    E.NO_COMMON_CODEC: ErrorInfo(422, "the offer has no codec in common with the gateway"),
    E.NOT_FOUND: ErrorInfo(404, "not found"),
    E.METHOD_NOT_ALLOWED: ErrorInfo(405, "method not allowed"),
    E.RATE_LIMITED: ErrorInfo(429, "too many requests; slow down"),
    E.MONITOR_RATE_LIMITED: ErrorInfo(429, "too many monitor starts; try again after Retry-After seconds"),
    E.DRAINING: ErrorInfo(503, "the gateway is shutting down; try another instance"),
    E.UNAVAILABLE: ErrorInfo(503, "the gateway can not serve this now"),
    E.SIP_DISABLED: ErrorInfo(503, "SIP is disabled on this gateway"),
    E.MEDIA_FAILURE: ErrorInfo(503, "the media path failed"),
    E.VOICE_CAPACITY: ErrorInfo(503, "the media worker of this conversation is full"),
    E.PHONE_UNREACHABLE: ErrorInfo(502, "calling the supervisor's phone failed"),
    E.INTERNAL_ERROR: ErrorInfo(500, "internal error; the gateway logged it"),
}
del E

#: The code answered for an HTTP status that aiohttp raised itself (no handler ran).
CODE_OF_STATUS: dict[int, ErrorCode] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.INVALID_TOKEN,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.BODY_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_BODY,
    429: ErrorCode.RATE_LIMITED,
    503: ErrorCode.UNAVAILABLE,
}


def http_status(code: ErrorCode) -> int:
    """The HTTP status a refusal with ``code`` is answered with."""
    return ERRORS[code].status


class GatewayError(Exception):
    """A refusal: a stable :class:`ErrorCode`, a human message and optional extra JSON fields.

    It carries no HTTP status of its own: the API layer answers ``http_status(code)``.
    """

    def __init__(self, code: ErrorCode, message: str | None = None, **extra: Any) -> None:
        self.code = ErrorCode(code)
        self.message = message or ERRORS[self.code].message
        super().__init__(self.message)
        self.extra = extra
        #: Extra HTTP headers for the answer (e.g. ``Retry-After``).
        self.headers: dict[str, str] = {}

    @property
    def status(self) -> int:
        """The HTTP status of this refusal (from :data:`ERRORS`)."""
        return http_status(self.code)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        body.update(self.extra)
        return {"error": body}

    def __repr__(self) -> str:
        return f"GatewayError({self.code.value!r}, {self.message!r})"


def not_found(what: str) -> GatewayError:
    return GatewayError(ErrorCode.NOT_FOUND, f"{what} not found")


def invalid_token(reason: str) -> GatewayError:
    return GatewayError(ErrorCode.INVALID_TOKEN, f"invalid token: {reason}")


def forbidden_role(role: str) -> GatewayError:
    return GatewayError(ErrorCode.FORBIDDEN, f"this call needs the {role!r} role")


def identity_unavailable(detail: str = "identity provider unreachable", retry_after: int = 5) -> GatewayError:
    error = GatewayError(ErrorCode.IDENTITY_UNAVAILABLE, detail)
    error.headers["Retry-After"] = str(retry_after)
    return error


def state_unavailable(detail: str = "the shared state (Redis) is unreachable") -> GatewayError:
    return GatewayError(ErrorCode.STATE_UNAVAILABLE, detail)
