"""The OpenAPI 3.1 document of the control API, served at `/openapi.json`.

Body and answer schemas are generated from the pydantic models (:mod:`gateway.api.models`), the
ones that validate requests. Each operation lists every status it answers; a refusal status lists
the error codes it carries, with their statuses from the one registry (:mod:`gateway.errors`), so
a code can not be documented under the wrong status. Every templated path declares its path
parameters, taken from the template itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from gateway.api import models
from gateway.api.models import MAX_SEQ
from gateway.errors import ERRORS, ErrorCode, http_status

E = ErrorCode
_SCHEMAS = "#/components/schemas/{model}"
#: The `$ref` of a model's schema in the document, in validation (request) or serialization mode.
SchemaOf = Callable[[type[BaseModel], JsonSchemaMode], dict[str, Any]]


@dataclass(frozen=True)
class Answer:
    """A success answer: JSON of `model` (a list of them when `many`), another media type, or
    no body (`media_type` empty)."""

    description: str
    model: type[BaseModel] | None = None
    many: bool = False
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Operation:
    summary: str
    #: Roles of which the bearer token must hold one; empty: no token needed.
    roles: tuple[str, ...]
    answers: dict[int, Answer]
    refusals: Sequence[ErrorCode] = ()
    body: type[BaseModel] | None = None
    body_required: bool = True
    #: The body is an SDP offer, not JSON.
    sdp_body: bool = False
    query: tuple[Query, ...] = ()
    #: A websocket: answered `101` after an `Upgrade`, `400` without one.
    websocket: bool = False


# ---------------------------------------------------------------------------- refusal sets

#: Every `/v1/` route: authentication, and (with a shared store) whether Redis answers.
_AUTH = (E.INVALID_TOKEN, E.FORBIDDEN, E.IDENTITY_UNAVAILABLE, E.STATE_UNAVAILABLE)
_JSON = (E.BODY_TOO_LARGE, E.UNSUPPORTED_MEDIA_TYPE, E.MALFORMED_JSON, E.INVALID_BODY, E.MISSING_FIELD, E.INVALID_FIELD)
_REQUIRED_JSON = (E.EMPTY_BODY, *_JSON)
_CID = (E.INVALID_CONVERSATION_ID,)
_CHAT_POST = (E.EMPTY_MESSAGE, E.MESSAGE_TOO_LONG, E.INVALID_CLIENT_ID, E.RATE_LIMITED)
#: A supervisor's action on a monitor: it must be the caller's, active, and still supervised.
_ON_MONITOR = (E.NOT_FOUND, E.MONITOR_ENDED, E.NOT_TEAM_SUPERVISOR)
#: A websocket path requested without `Upgrade: websocket` (aiohttp refuses the handshake).
_WEBSOCKET = (E.BAD_REQUEST,)

_AFTER = Query(
    "after",
    {"type": "integer", "minimum": 0, "maximum": MAX_SEQ, "default": 0},
    "replay the entries after this sequence number",
)
_ACCESS_TOKEN = Query(
    "access_token", {"type": "string"}, "the bearer token, for browsers that can not set headers on websockets"
)
_MONITOR = Answer("the monitor", models.MonitorOut)
_SEQ = Answer("stored", models.SeqOut)
_UPGRADED = Answer("switching protocols: JSON text frames follow", media_type="")

#: Path parameters by name, for every templated path.
_PATH_PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "cid": (TypeAdapter(models.ConversationId).json_schema(), "the platform's conversation id"),
    "mid": ({"type": "string"}, "a monitor id (`m-...`) of the caller"),
    "session": ({"type": "string"}, "the listener session from the WHEP answer's `Location`"),
}

OPERATIONS: dict[str, dict[str, Operation]] = {
    "/v1/conversations": {
        "get": Operation(
            "Ongoing conversations of the caller's teams (R11)",
            ("supervisor", "platform"),
            {200: Answer("the conversations", models.ConversationOut, many=True)},
            _AUTH,
        ),
    },
    "/v1/conversations/{cid}": {
        "put": Operation(
            "Create or update a conversation",
            ("platform",),
            {200: Answer("updated", models.ConversationOut), 201: Answer("created", models.ConversationOut)},
            (*_AUTH, *_CID, *_REQUIRED_JSON, E.CONVERSATION_ID_REUSED),
            body=models.ConversationIn,
        ),
        "get": Operation(
            "One conversation",
            ("supervisor", "platform"),
            {200: Answer("the conversation", models.ConversationOut)},
            (*_AUTH, *_CID, E.NOT_FOUND),
        ),
    },
    "/v1/conversations/{cid}/events": {
        "post": Operation(
            "A platform fact",
            ("platform",),
            {202: Answer("accepted", models.EventAcceptedOut)},
            (*_AUTH, *_CID, *_REQUIRED_JSON, E.NOT_FOUND),
            body=models.PlatformEventIn,
        ),
    },
    "/v1/conversations/{cid}/messages": {
        "post": Operation(
            "Chat ingest (idempotent on client_id)",
            ("platform", "agent"),
            {201: Answer("stored (or stored before, with this client_id)", models.ChatPostedOut)},
            (*_AUTH, *_CID, *_REQUIRED_JSON, E.NOT_FOUND, E.NOT_YOUR_CONVERSATION, E.CHAT_NOT_ACTIVE, *_CHAT_POST),
            body=models.ChatMessageIn,
        ),
    },
    "/v1/conversations/{cid}/chat": {
        "get": Operation(
            "Websocket: a participant view (?view=customer|agent&after=SEQ)",
            ("platform", "agent"),
            {101: _UPGRADED},
            (*_AUTH, *_WEBSOCKET, *_CID, E.INVALID_VIEW, E.INVALID_AFTER, E.NOT_FOUND, E.NOT_YOUR_CONVERSATION),
            query=(
                Query("view", {"enum": ["customer", "agent"], "default": "agent"}, "whose view of the chat"),
                _AFTER,
                _ACCESS_TOKEN,
            ),
            websocket=True,
        ),
    },
    "/v1/conversations/{cid}/monitors": {
        "post": Operation(
            "Start silently monitoring",
            ("supervisor",),
            {201: Answer("the monitor", models.MonitorOut)},
            (
                *_AUTH,
                E.DRAINING,
                *_CID,
                *_JSON,
                E.INVALID_SIP_URI,
                E.NOT_FOUND,
                E.NOT_TEAM_SUPERVISOR,
                E.OUTBOUND_NOT_SUPPORTED,
                E.TRANSFERRED_NOT_SUPPORTED,
                E.CONVERSATION_NOT_ACTIVE,
                E.VOICE_MONITOR_BUSY,
                E.ALREADY_MONITORING,
                E.MONITOR_RATE_LIMITED,
                E.UNAVAILABLE,  # several instances: the one holding the media does not answer
            ),
            body=models.MonitorStartIn,
            body_required=False,
        ),
    },
    "/v1/me": {
        "get": Operation(
            "The caller and what is remembered for it (its phone)",
            ("supervisor",),
            {200: Answer("the caller", models.MeOut)},
            _AUTH,
        ),
    },
    "/v1/me/phone": {
        "put": Operation(
            "Remember the caller's SIP phone (per username)",
            ("supervisor",),
            {200: Answer("the caller", models.MeOut)},
            (*_AUTH, *_REQUIRED_JSON, E.INVALID_SIP_URI),
            body=models.PhoneIn,
        ),
        "delete": Operation(
            "Forget the caller's SIP phone", ("supervisor",), {204: Answer("forgotten", media_type="")}, _AUTH
        ),
    },
    "/v1/monitors/{mid}": {
        "get": Operation(
            "One of the caller's monitors, with its voice's quality",
            ("supervisor",),
            {200: Answer("the monitor", models.MonitorStateOut)},
            (*_AUTH, E.NOT_FOUND),
        ),
        "delete": Operation(
            "Leave (R12)", ("supervisor",), {204: Answer("left", media_type="")}, (*_AUTH, E.NOT_FOUND)
        ),
    },
    "/v1/monitors/{mid}/whep": {
        "post": Operation(
            "WHEP offer: receive-only audio",
            ("supervisor",),
            {
                201: Answer(
                    "the SDP answer",
                    media_type="application/sdp",
                    headers={"Location": "the listener session, to DELETE when done"},
                ),
                307: Answer(
                    "several instances: another one holds this conversation's media; send the same "
                    "offer to Location (a browser's offer, with an Origin header, is forwarded instead)",
                    media_type="",
                    headers={"Location": "the same path on the instance holding the media"},
                ),
            },
            (
                *_AUTH,
                E.DRAINING,
                *_ON_MONITOR,
                E.VOICE_NOT_GRANTED,
                E.UNSUPPORTED_MEDIA_TYPE,
                E.BODY_TOO_LARGE,
                E.SIP_DISABLED,
                E.INVALID_SDP,
                E.NO_AUDIO,
                E.NO_COMMON_CODEC,
                E.MEDIA_FAILURE,
                E.UNAVAILABLE,
            ),
            sdp_body=True,
            query=(Query("stereo", {"type": "boolean"}, "agent and customer on two channels (1/true/yes)"),),
        ),
    },
    "/v1/monitors/{mid}/whep/{session}": {
        "delete": Operation(
            "Stop listening (idempotent)",
            ("supervisor",),
            {204: Answer("stopped", media_type="")},
            (*_AUTH, E.NOT_FOUND, E.UNAVAILABLE),
        ),
    },
    "/v1/monitors/{mid}/chat": {
        "get": Operation(
            "Websocket: the monitor's chat mirror (?after=SEQ)",
            ("supervisor",),
            {101: _UPGRADED},
            (*_AUTH, *_WEBSOCKET, *_ON_MONITOR, E.INVALID_AFTER),
            query=(_AFTER, _ACCESS_TOKEN),
            websocket=True,
        ),
    },
    "/v1/monitors/{mid}/whisper": {
        "post": Operation(
            "Whisper to the agent (chat only, R5)",
            ("supervisor",),
            {201: _SEQ},
            (*_AUTH, *_REQUIRED_JSON, *_ON_MONITOR, E.WHISPER_CHAT_ONLY, *_CHAT_POST),
            body=models.ChatTextIn,
        ),
    },
    "/v1/monitors/{mid}/barge": {
        "post": Operation(
            "Barge in (chat only, R6)", ("supervisor",), {200: _MONITOR}, (*_AUTH, *_ON_MONITOR, E.BARGE_CHAT_ONLY)
        ),
    },
    "/v1/monitors/{mid}/messages": {
        "post": Operation(
            "Message the customer (after barge-in only, R4)",
            ("supervisor",),
            {201: _SEQ},
            (
                *_AUTH,
                *_ON_MONITOR,
                E.MONITOR_CANNOT_MESSAGE_CUSTOMER,
                E.BARGE_CHAT_ONLY,
                *_REQUIRED_JSON,
                *_CHAT_POST,
            ),
            body=models.ChatTextIn,
        ),
    },
    "/v1/monitors/{mid}/transfer": {
        "post": Operation("Always refused (R4)", ("supervisor",), {}, (*_AUTH, E.NOT_FOUND, E.MONITOR_CANNOT_TRANSFER)),
    },
    "/v1/monitors/{mid}/conference": {
        "post": Operation(
            "Always refused (R4)", ("supervisor",), {}, (*_AUTH, E.NOT_FOUND, E.MONITOR_CANNOT_CONFERENCE)
        ),
    },
    "/v1/events": {
        "get": Operation(
            "Websocket: conversation_updated, monitor_started, monitor_updated, monitor_ended, levels, monitor_quality; "
            "platform tokens also voice_fork_requested, voice_fork_released",
            ("supervisor", "platform"),
            {101: _UPGRADED},
            (*_AUTH, *_WEBSOCKET),
            query=(_ACCESS_TOKEN,),
            websocket=True,
        ),
    },
    "/healthz": {"get": Operation("Process alive", (), {200: Answer("alive", models.HealthOut)})},
    "/readyz": {
        "get": Operation(
            "Ready: SIP workers, identity, not draining",
            (),
            {200: Answer("ready", models.ReadyOut), 503: Answer("not ready", models.ReadyOut)},
        )
    },
    "/metrics": {
        "get": Operation("Prometheus metrics", (), {200: Answer("text exposition", media_type="text/plain")}),
    },
    "/openapi.json": {"get": Operation("This document", (), {200: Answer("OpenAPI 3.1")})},
    "/config.json": {
        "get": Operation(
            "What the console needs to sign in", (), {200: Answer("the sign-in settings", models.ConsoleConfigOut)}
        )
    },
}


def openapi_document(base_url: str) -> dict[str, Any]:
    return {**_document(), "servers": [{"url": base_url}]}


@cache
def _document() -> dict[str, Any]:
    uses: list[tuple[type[BaseModel], JsonSchemaMode]] = [(models.ErrorOut, "serialization")]
    for operations in OPERATIONS.values():
        for op in operations.values():
            if op.body is not None:
                uses.append((op.body, "validation"))
            uses.extend((answer.model, "serialization") for answer in op.answers.values() if answer.model)
    refs, definitions = models_json_schema(uses, ref_template=_SCHEMAS)

    def schema_of(model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(refs[(model, mode)])

    paths: dict[str, Any] = {}
    for path, operations in OPERATIONS.items():
        item: dict[str, Any] = {method: _operation(op, schema_of) for method, op in operations.items()}
        if parameters := _path_parameters(path):
            item = {"parameters": parameters, **item}
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "Silent-monitoring gateway control API", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": definitions.get("$defs", {}),
        },
    }


def _path_parameters(path: str) -> list[dict[str, Any]]:
    parameters = []
    for name in re.findall(r"{(\w+)}", path):
        schema, description = _PATH_PARAMETERS[name]
        parameters.append({"name": name, "in": "path", "required": True, "description": description, "schema": schema})
    return parameters


def _operation(op: Operation, schema_of: SchemaOf) -> dict[str, Any]:
    document: dict[str, Any] = {"summary": op.summary}
    if op.roles:
        document["security"] = [{"bearer": []}]
        document["x-role"] = "|".join(op.roles)
    if op.websocket:
        document["x-websocket"] = True
    if op.query:
        document["parameters"] = [
            {"name": q.name, "in": "query", "required": False, "description": q.description, "schema": q.schema}
            for q in op.query
        ]
    if op.body is not None:
        document["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": schema_of(op.body, "validation")}},
        }
    elif op.sdp_body:
        document["requestBody"] = {"required": True, "content": {"application/sdp": {"schema": {"type": "string"}}}}
    responses: dict[str, Any] = {str(status): _answer(answer, schema_of) for status, answer in op.answers.items()}
    for status, codes in _by_status(op.refusals).items():
        responses[str(status)] = _refusal(codes)
    document["responses"] = dict(sorted(responses.items()))
    return document


def _answer(answer: Answer, schema_of: SchemaOf) -> dict[str, Any]:
    document: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        document["headers"] = {
            name: {"description": text, "schema": {"type": "string"}} for name, text in answer.headers.items()
        }
    if not answer.media_type:
        return document
    if answer.model is not None:
        schema = schema_of(answer.model, "serialization")
        if answer.many:
            schema = {"type": "array", "items": schema}
    else:
        schema = {"type": "object" if answer.media_type == "application/json" else "string"}
    document["content"] = {answer.media_type: {"schema": schema}}
    return document


def _by_status(codes: Sequence[ErrorCode]) -> dict[int, list[ErrorCode]]:
    grouped: dict[int, list[ErrorCode]] = {}
    for code in dict.fromkeys(codes):
        grouped.setdefault(http_status(code), []).append(code)
    return grouped


def _refusal(codes: list[ErrorCode]) -> dict[str, Any]:
    """A refusal status: its codes in the description, and a schema that allows only those."""
    return {
        "description": "; ".join(f"`{code.value}`: {ERRORS[code].message}" for code in codes),
        "content": {
            "application/json": {
                "schema": {
                    "allOf": [
                        {"$ref": _SCHEMAS.format(model="ErrorOut")},
                        {"properties": {"error": {"properties": {"code": {"enum": [c.value for c in codes]}}}}},
                    ]
                }
            }
        },
    }
