"""The OpenAPI document is valid OpenAPI 3.1, and it is what the gateway really answers.

Requests built from each operation (its schemas' examples, its parameters, and the usual ways
of getting them wrong) are sent to the running gateway; every status it answers must be one the
document lists for that operation, and every JSON answer must match the schema listed for it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from tests.support import Answer, GatewayClient

pytestmark = pytest.mark.api

METHODS = ("get", "put", "post", "delete", "patch")
JSON = {"Content-Type": "application/json"}


async def spec_of(gateway: GatewayClient) -> dict[str, Any]:
    answer = await gateway.call("GET", "/openapi.json")
    assert answer.status == 200
    return dict(answer.body)


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op) for path, item in spec["paths"].items() for method, op in item.items() if method in METHODS
    ]


def parameters(spec: dict[str, Any], path: str, op: dict[str, Any], where: str) -> list[dict[str, Any]]:
    declared = spec["paths"][path].get("parameters", []) + op.get("parameters", [])
    return [p for p in declared if p["in"] == where]


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


async def test_document_is_valid_openapi_31(gateway: GatewayClient) -> None:
    spec = await spec_of(gateway)
    assert spec["openapi"].startswith("3.1")
    validate_openapi(spec)  # raises on the first violation of the OpenAPI 3.1 schema


async def test_every_templated_path_declares_its_parameters(gateway: GatewayClient) -> None:
    spec = await spec_of(gateway)
    templated = [path for path in spec["paths"] if "{" in path]
    assert len(templated) >= 14
    for path, _method, op in operations(spec):
        declared = {p["name"]: p for p in parameters(spec, path, op, "path")}
        assert set(declared) == set(re.findall(r"{(\w+)}", path)), path
        assert all(p["required"] is True and "schema" in p for p in declared.values()), path
    # the conversation-id rule is the one the gateway applies
    cid = next(p for p in parameters(spec, "/v1/conversations/{cid}", {}, "path") if p["name"] == "cid")
    pattern = re.compile(cid["schema"]["pattern"])
    platform = await gateway.platform()
    for candidate in ["a1", "conv:42@cx.example", "x" * 128, "x" * 129, "has space", "semi;colon", "é"]:
        answer = await gateway.call("GET", f"/v1/conversations/{candidate}", platform)
        documented_valid = pattern.fullmatch(candidate) is not None
        assert (answer.code != "invalid_conversation_id") == documented_valid, (candidate, answer.body)


async def test_every_served_operation_is_documented(gateway: GatewayClient) -> None:
    spec = await spec_of(gateway)
    assert gateway.app is not None
    for route in gateway.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if path.startswith("/v1/") and route.method not in ("HEAD", "*"):
            assert route.method.lower() in spec["paths"][path], f"{route.method} {path} is not documented"


async def test_method_not_allowed_says_what_is(gateway: GatewayClient) -> None:
    spec = await spec_of(gateway)
    sam = await gateway.login("sam")
    for path in ["/v1/conversations", "/v1/conversations/{cid}", "/v1/monitors/{mid}"]:
        answer = await gateway.call("PATCH", path.format(cid="a1", mid="m-1"), sam)
        assert (answer.status, answer.code) == (405, "method_not_allowed")
        documented = {method.upper() for method in spec["paths"][path] if method in METHODS}
        assert set(answer.headers["Allow"].split(",")) - {"HEAD"} == documented, answer.headers["Allow"]


@dataclass
class Request:
    what: str
    token: str | None
    values: dict[str, str]
    body: bytes | None = None
    headers: dict[str, str] | None = None
    query: str = ""
    upgrade: bool = False


async def test_every_answer_is_documented(gateway: GatewayClient) -> None:
    spec = await spec_of(gateway)
    tokens = {
        "platform": await gateway.platform(),
        "supervisor": await gateway.login("sam"),
        "agent": await gateway.login("alice"),
    }
    # c1: the conversation the {cid} operations act on; the {mid} operations act on sam's
    # monitor of c2, chat only (whisper and barge need that), left at the very end.
    assert (await gateway.conversation("c1", sessions=["chat"])).status == 201
    assert (await gateway.conversation("c2", sessions=["chat"])).status == 201
    mid = (await gateway.monitor("sam", "c2")).body["id"]
    good = {"cid": "c1", "mid": mid, "session": "s-none"}
    bad = {"cid": "x" * 129, "mid": "m-none", "session": "s-none"}
    succeeded: set[tuple[str, str]] = set()
    in_order = sorted(operations(spec), key=lambda o: o[1] == "delete" and o[0] == "/v1/monitors/{mid}")
    for path, method, op in in_order:
        roles = op.get("x-role", "").split("|") if "security" in op else []
        token = tokens[roles[0]] if roles else None
        for request in requests_for(spec, path, op, token, good, bad, tokens, roles):
            status, answer = await send(gateway, method, path, request)
            check(spec, path, method, op, request, status, answer)
            if request.what == "documented" and status < 300:
                succeeded.add((method, path))
    never_succeed = {
        ("post", "/v1/monitors/{mid}/whep"),  # no SIP media in this gateway
        ("post", "/v1/monitors/{mid}/transfer"),  # R4
        ("post", "/v1/monitors/{mid}/conference"),
    }
    assert succeeded == {(method, path) for path, method, _ in operations(spec)} - never_succeed


def requests_for(
    spec: dict[str, Any],
    path: str,
    op: dict[str, Any],
    token: str | None,
    good: dict[str, str],
    bad: dict[str, str],
    tokens: dict[str, str],
    roles: list[str],
) -> list[Request]:
    """The documented request first, then the ways of getting it wrong."""
    body, headers = example_body(spec, op)
    websocket = bool(op.get("x-websocket"))
    requests = [Request("documented", token, good, body, headers, upgrade=websocket)]
    if websocket:
        requests.append(Request("no websocket upgrade", token, good))
    if not roles:
        return requests
    requests.append(Request("no token", None, good, body, headers, upgrade=websocket))
    requests.append(Request("bad token", "not.a.token", good, body, headers, upgrade=websocket))
    other = next(t for role, t in tokens.items() if role not in roles)
    requests.append(Request("another role", other, good, body, headers, upgrade=websocket))
    if "{" in path:
        requests.append(Request("unknown or invalid path values", token, bad, body, headers, upgrade=websocket))
    for query in parameters(spec, path, op, "query"):
        requests.append(Request(f"invalid ?{query['name']}", token, good, query=f"{query['name']}=-1x"))
    if "application/json" in op.get("requestBody", {}).get("content", {}):
        for what, raw, content_type in [
            ("empty body", b"", "application/json"),
            ("empty object", b"{}", "application/json"),
            ("array", b"[]", "application/json"),
            ("malformed", b"{", "application/json"),
            ("deeply nested", b"[" * 5000, "application/json"),
            ("text/plain", body or b"{}", "text/plain"),
            ("too large", b'{"text":"' + b"x" * 70_000 + b'"}', "application/json"),
            ("wrong types", b'{"text": 5, "agent": true, "type": 1, "voice": 1, "from": 1}', "application/json"),
        ]:
            requests.append(Request(what, token, good, raw, {"Content-Type": content_type}))
    return requests


def example_body(spec: dict[str, Any], op: dict[str, Any]) -> tuple[bytes | None, dict[str, str] | None]:
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        schema = resolve(spec, content["application/json"]["schema"])
        return json.dumps(schema["examples"][0]).encode(), JSON
    if "application/sdp" in content:
        return b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", {"Content-Type": "application/sdp"}
    return None, None


async def send(gateway: GatewayClient, method: str, path: str, request: Request) -> tuple[int, Answer | None]:
    url = path.format_map(request.values) + (f"?{request.query}" if request.query else "")
    auth = {"Authorization": f"Bearer {request.token}"} if request.token else {}
    if request.upgrade:
        try:
            async with gateway.http.ws_connect(gateway.ws_url(url), headers=auth) as ws:
                await ws.close()
                return 101, None
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status, None
    answer = await gateway.call(method.upper(), url, request.token, data=request.body, headers=request.headers)
    return answer.status, answer


def check(
    spec: dict[str, Any],
    path: str,
    method: str,
    op: dict[str, Any],
    request: Request,
    status: int,
    answer: Answer | None,
) -> None:
    where = f"{method.upper()} {path} ({request.what})"
    body = answer.body if answer is not None else None
    assert str(status) in op["responses"], f"{where} answered {status} {body}: not in {sorted(op['responses'])}"
    content = op["responses"][str(status)].get("content", {})
    if answer is not None and "application/json" in content:
        schema = {**content["application/json"]["schema"], "components": spec["components"]}
        try:
            jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"{where} answered {status} {body}, not as documented: {exc.message}") from None
