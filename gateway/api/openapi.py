"""The OpenAPI 3.1 document of the control API, served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _op(
    summary: str, role: str, responses: dict[int, str], body: dict[str, Any] | None = None, ws: bool = False
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "x-role": role,
        "responses": {
            str(code): {
                "description": text,
                **({"content": {"application/json": {"schema": _ERROR}}} if code >= 400 else {}),
            }
            for code, text in responses.items()
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": body}
    if ws:
        op["x-websocket"] = True
    return op


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_REFUSALS = {401: "invalid_token", 403: "forbidden / not_team_supervisor", 404: "not_found", 422: "invalid input"}


def openapi_document(base_url: str) -> dict[str, Any]:
    conversation_body = {
        "type": "object",
        "required": ["agent"],
        "properties": {
            "direction": {"enum": ["inbound", "outbound"]},
            "transferred": {"type": "boolean"},
            "agent": {"type": "string"},
            "team": {"type": "string", "description": "optional; default: the agent's Keycloak group"},
            "customer": {"type": "object"},
            "sessions": {"type": "array", "items": {"enum": ["chat", "voice"]}},
        },
    }
    text_body = {
        "type": "object",
        "required": ["text"],
        "properties": {"text": {"type": "string"}, "client_id": {"type": "string"}},
    }
    paths: dict[str, Any] = {
        "/v1/conversations": {
            "get": _op("Ongoing conversations of the caller's teams (R11)", "supervisor", {200: "list", **_REFUSALS})
        },
        "/v1/conversations/{cid}": {
            "put": _op(
                "Create or update a conversation",
                "platform",
                {200: "updated", 201: "created", **_REFUSALS, 503: "identity_unavailable"},
                _json_body(conversation_body),
            ),
            "get": _op("One conversation", "supervisor", {200: "conversation", **_REFUSALS}),
        },
        "/v1/conversations/{cid}/events": {
            "post": _op(
                "A platform fact",
                "platform",
                {202: "accepted", **_REFUSALS},
                _json_body(
                    {
                        "type": "object",
                        "properties": {
                            "type": {
                                "enum": [
                                    "chat_started",
                                    "chat_ended",
                                    "voice_started",
                                    "voice_ended",
                                    "agent_left",
                                    "transferred",
                                    "ended",
                                ]
                            }
                        },
                    }
                ),
            )
        },
        "/v1/conversations/{cid}/messages": {
            "post": _op(
                "Chat ingest (idempotent on client_id)",
                "platform|agent",
                {
                    201: "{seq}",
                    409: "chat_not_active",
                    413: "message_too_long",
                    422: "empty_message",
                    429: "rate_limited",
                    **_REFUSALS,
                },
                _json_body(
                    {**text_body, "properties": {**text_body["properties"], "from": {"enum": ["customer", "agent"]}}}
                ),
            )
        },
        "/v1/conversations/{cid}/chat": {
            "get": _op(
                "Websocket: a participant view (?view=customer|agent&after=SEQ)",
                "platform|agent",
                {101: "switching protocols", **_REFUSALS},
                ws=True,
            )
        },
        "/v1/conversations/{cid}/monitors": {
            "post": _op(
                "Start silently monitoring",
                "supervisor",
                {
                    201: "monitor",
                    409: "voice_monitor_busy / conversation_not_active / outbound_not_supported / transferred_not_supported / already_monitoring",
                    **_REFUSALS,
                },
                _json_body(
                    {
                        "type": "object",
                        "properties": {
                            "voice": {
                                "oneOf": [
                                    {"type": "null"},
                                    {
                                        "type": "object",
                                        "properties": {"kind": {"enum": ["webrtc", "sip"]}, "uri": {"type": "string"}},
                                    },
                                ]
                            }
                        },
                    }
                ),
            )
        },
        "/v1/monitors/{mid}": {
            "get": _op("One of the caller's monitors", "supervisor", {200: "monitor", **_REFUSALS}),
            "delete": _op("Leave (R12)", "supervisor", {204: "left", **_REFUSALS}),
        },
        "/v1/monitors/{mid}/whep": {
            "post": _op(
                "WHEP offer: receive-only audio",
                "supervisor",
                {201: "SDP answer, Location", 409: "voice not granted", **_REFUSALS},
                {"application/sdp": {"schema": {"type": "string"}}},
            )
        },
        "/v1/monitors/{mid}/whep/{session}": {
            "delete": _op("Stop listening", "supervisor", {204: "stopped", **_REFUSALS})
        },
        "/v1/monitors/{mid}/chat": {
            "get": _op(
                "Websocket: the monitor's chat mirror (?after=SEQ)",
                "supervisor",
                {101: "switching protocols", **_REFUSALS},
                ws=True,
            )
        },
        "/v1/monitors/{mid}/whisper": {
            "post": _op(
                "Whisper to the agent (chat only, R5)",
                "supervisor",
                {201: "{seq}", 409: "whisper_chat_only", **_REFUSALS},
                _json_body(text_body),
            )
        },
        "/v1/monitors/{mid}/barge": {
            "post": _op("Barge in (chat only, R6)", "supervisor", {200: "monitor", 409: "barge_chat_only", **_REFUSALS})
        },
        "/v1/monitors/{mid}/messages": {
            "post": _op(
                "Message the customer (after barge-in only, R4)",
                "supervisor",
                {201: "{seq}", 403: "monitor_cannot_message_customer", **_REFUSALS},
                _json_body(text_body),
            )
        },
        "/v1/monitors/{mid}/transfer": {
            "post": _op("Always refused (R4)", "supervisor", {403: "monitor_cannot_transfer"})
        },
        "/v1/monitors/{mid}/conference": {
            "post": _op("Always refused (R4)", "supervisor", {403: "monitor_cannot_conference"})
        },
        "/v1/events": {
            "get": _op(
                "Websocket: conversation_updated, monitor_started, monitor_updated, monitor_ended, levels",
                "supervisor|platform",
                {101: "switching protocols", 401: "invalid_token"},
                ws=True,
            )
        },
        "/healthz": {"get": {"summary": "Process alive", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {
            "get": {
                "summary": "Ready: SIP workers, identity, not draining",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            }
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition"}}}
        },
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        "/config.json": {
            "get": {
                "summary": "What the console needs to sign in",
                "responses": {"200": {"description": "idp_url, realm, client_id"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Silent-monitoring gateway control API", "version": "1"},
        "servers": [{"url": base_url}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                }
            },
        },
    }
