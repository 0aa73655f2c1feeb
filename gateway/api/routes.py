"""The control API v1 (API.md): platform calls, supervisor calls and the event stream."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from gateway.api import models
from gateway.api.context import BUS, CHAT, FORWARDER, METRICS, RUNTIME, SERVICE, SETTINGS
from gateway.api.identity import authenticate, authenticate_supervisor
from gateway.api.validation import conversation_id, read_body, sequence_number
from gateway.domain import Principal
from gateway.errors import ErrorCode, GatewayError
from gateway.policy import rules
from gateway.service import monitor_json

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _cid(request: web.Request) -> str:
    return conversation_id(request.match_info["cid"])


def refuse_when_draining(request: web.Request) -> None:
    """New monitors and listeners are refused while the gateway drains (SIGTERM)."""
    if request.app[RUNTIME].draining:
        error = GatewayError(ErrorCode.DRAINING, "the gateway is shutting down; try another instance")
        error.headers["Retry-After"] = "5"
        raise error


# ---------------------------------------------------------------------------- platform side


@routes.put("/v1/conversations/{cid}")
async def put_conversation(request: web.Request) -> web.Response:
    """Create or update a conversation (role ``platform``)."""
    principal = await authenticate(request, "platform")
    cid = _cid(request)
    settings = request.app[SETTINGS]
    body = await read_body(request, models.ConversationIn, max_bytes=settings.max_body_bytes)
    direction, transferred, agent, customer = body.direction, body.transferred, body.agent, body.customer
    sessions, team = body.sessions, body.team
    service = request.app[SERVICE]
    conversation, created = await service.upsert_conversation(
        cid,
        direction=direction,
        agent=agent,
        team=team,
        customer=customer,
        transferred=transferred,
        sessions=sessions,
        recording_keys=body.recording_keys,
        participants=body.participants.model_dump() if body.participants is not None else {},
        fork=body.fork,
        platform=principal.client or None,
    )
    return _json(service.describe(conversation), 201 if created else 200)


@routes.post("/v1/conversations/{cid}/events")
async def post_event(request: web.Request) -> web.Response:
    await authenticate(request, "platform")
    cid = _cid(request)
    kind = (await read_body(request, models.PlatformEventIn, max_bytes=request.app[SETTINGS].max_body_bytes)).type
    request.app[SERVICE].apply_platform_event(cid, kind)
    return _json({"accepted": kind.value}, 202)


@routes.post("/v1/conversations/{cid}/messages")
async def post_message(request: web.Request) -> web.Response:
    """Chat ingest from the platform (``from`` customer or agent) or from the agent's own token."""
    principal = await authenticate(request, "platform", "agent")
    cid = _cid(request)
    settings = request.app[SETTINGS]
    # the platform must say who wrote a message; an agent's own token writes as the agent
    model = models.PlatformChatMessageIn if principal.has_role("platform") else models.ChatMessageIn
    body = await read_body(request, model, max_bytes=settings.max_body_bytes)
    entry, created = await request.app[SERVICE].post_message(principal, cid, body.sender, body.text, body.client_id)
    return _json({"seq": entry.seq, "duplicate": not created}, 201)


@routes.get("/v1/conversations/{cid}/chat")
async def conversation_chat(request: web.Request) -> web.StreamResponse:
    """A participant's view of the chat: ``customer`` or ``agent`` (platform, or the agent itself)."""
    principal = await authenticate(request, "platform", "agent", websocket=True)
    cid = _cid(request)
    view = request.query.get("view", "agent")
    if view not in ("customer", "agent"):
        raise GatewayError(ErrorCode.INVALID_VIEW, "view is 'customer' or 'agent'")
    request.app[SERVICE].chat_view(principal, cid, view)
    return await _serve_chat(request, principal, cid, view, ended=None)


def _after(request: web.Request) -> int:
    return sequence_number(request.query.get("after", "0"))


async def _serve_chat(
    request: web.Request, principal: Principal, cid: str, view: str, ended: asyncio.Future[str] | None
) -> web.StreamResponse:
    from gateway.api.chat_ws import serve_chat_stream

    return await serve_chat_stream(
        request, request.app[CHAT], cid, view, _after(request), expires_at=principal.expires_at, ended=ended
    )


# ---------------------------------------------------------------------------- supervisor side


@routes.get("/v1/conversations")
async def list_conversations(request: web.Request) -> web.Response:
    principal = await authenticate(request, "supervisor", "platform")
    return _json(request.app[SERVICE].listing(principal))


@routes.get("/v1/conversations/{cid}")
async def get_conversation(request: web.Request) -> web.Response:
    principal = await authenticate(request, "supervisor", "platform")
    service = request.app[SERVICE]
    conversation = service.visible_conversation(principal, _cid(request))
    return _json(service.describe(conversation))


@routes.post("/v1/conversations/{cid}/monitors")
async def start_monitor(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    forwarder = request.app.get(FORWARDER)
    if forwarder is None:
        refuse_when_draining(request)
    cid = _cid(request)
    body = await read_body(
        request, models.MonitorStartIn, max_bytes=request.app[SETTINGS].max_body_bytes, required=False
    )
    voice = None if body.voice is None else body.voice.model_dump()
    if forwarder is not None:  # several instances: a voice monitor is opened where the media is
        draining = request.app[RUNTIME].draining
        target = await forwarder.monitor_target(request, cid, voice=voice is not None, draining=draining)
        if target is not None:
            forwarded = json.dumps({"voice": voice}).encode()
            answer = await forwarder.forward(request, target, forwarded, content_type="application/json")
            if answer.status == 201 and answer.body is not None:
                await forwarder.seen(json.loads(bytes(answer.body))["id"])  # type: ignore[arg-type]
            return answer
        refuse_when_draining(request)
    monitor = await request.app[SERVICE].start_monitor(principal, cid, voice)
    request.app[METRICS].monitors_started.labels(voice=monitor.voice_kind.value if monitor.voice_kind else "none").inc()
    return _json(monitor_json(monitor), 201)


@routes.get("/v1/me")
async def me(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    return _json(request.app[SERVICE].me(principal))


@routes.put("/v1/me/phone")
async def put_phone(request: web.Request) -> web.Response:
    """Remember the caller's SIP phone (per username, server side)."""
    principal = await authenticate_supervisor(request)
    body = await read_body(request, models.PhoneIn, max_bytes=request.app[SETTINGS].max_body_bytes)
    service = request.app[SERVICE]
    service.remember_phone(principal, body.uri)
    return _json(service.me(principal))


@routes.delete("/v1/me/phone")
async def forget_phone(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    request.app[SERVICE].remember_phone(principal, None)
    return web.Response(status=204)


@routes.get("/v1/monitors/{mid}")
async def get_monitor(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    return _json(request.app[SERVICE].monitor_view(principal, request.match_info["mid"]))


@routes.delete("/v1/monitors/{mid}")
async def leave(request: web.Request) -> web.Response:
    """R12: leaving is always allowed and never disturbs the conversation."""
    principal = await authenticate_supervisor(request)
    request.app[SERVICE].leave(principal, request.match_info["mid"])
    return web.Response(status=204)


@routes.get("/v1/monitors/{mid}/chat")
async def monitor_chat(request: web.Request) -> web.StreamResponse:
    principal = await authenticate(request, "supervisor", websocket=True)
    monitor = request.app[SERVICE].monitor_chat(principal, request.match_info["mid"])
    ended = request.app[RUNTIME].monitor_end(monitor.id)
    return await _serve_chat(request, principal, monitor.conversation, "monitor", ended=ended)


@routes.post("/v1/monitors/{mid}/whisper")
async def whisper(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    settings = request.app[SETTINGS]
    body = await read_body(request, models.ChatTextIn, max_bytes=settings.max_body_bytes)
    entry = await request.app[SERVICE].whisper(
        principal, request.match_info["mid"], body.text, client_id=body.client_id
    )
    return _json({"seq": entry.seq}, 201)


@routes.post("/v1/monitors/{mid}/barge")
async def barge(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    monitor = await request.app[SERVICE].barge(principal, request.match_info["mid"])
    return _json(monitor_json(monitor))


@routes.post("/v1/monitors/{mid}/messages")
async def supervisor_message(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    settings = request.app[SETTINGS]
    mid = request.match_info["mid"]
    request.app[SERVICE].check_message(principal, mid)  # a refusal comes before the body is read
    body = await read_body(request, models.ChatTextIn, max_bytes=settings.max_body_bytes)
    entry = await request.app[SERVICE].message_customer(principal, mid, body.text, client_id=body.client_id)
    return _json({"seq": entry.seq}, 201)


@routes.post("/v1/monitors/{mid}/transfer")
async def transfer(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    raise request.app[SERVICE].refuse(principal, request.match_info["mid"], "transfer")


@routes.post("/v1/monitors/{mid}/conference")
async def conference(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    raise request.app[SERVICE].refuse(principal, request.match_info["mid"], "conference")


# ---------------------------------------------------------------------------- event stream


@routes.get("/v1/events")
async def events(request: web.Request) -> web.WebSocketResponse:
    """Conversation and monitor events of the caller's teams, live, as JSON text frames."""
    principal = await authenticate(request, "supervisor", "platform", websocket=True)
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=4096)
    await ws.prepare(request)
    bus = request.app[BUS]
    metrics = request.app[METRICS]
    subscription = bus.subscribe(lambda event: rules.may_see_event(principal, event))
    metrics.events_clients.inc()
    request.app[RUNTIME].event_sockets.add(ws)

    async def drain_client() -> None:
        # The console sends nothing; anything it sends is read and dropped, close ends the stream.
        async for msg in ws:
            if msg.type in (WSMsgType.BINARY,):
                await ws.close(code=1003, message=b"text frames only")

    reader = asyncio.create_task(drain_client())
    try:
        await ws.send_json({"type": "hello", "user": principal.username, "teams": sorted(principal.teams)})
        while not ws.closed:
            remaining = principal.expires_at - time.time()
            if remaining <= 0:
                await ws.send_json({"type": "end", "reason": "token_expired"})
                await ws.close(code=4001, message=b"token expired")
                break
            get = asyncio.ensure_future(subscription.queue.get())
            done, _ = await asyncio.wait({get, reader}, timeout=min(remaining, 15), return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                if reader in done:
                    break
                continue
            event = get.result()
            if subscription.lagging:
                await ws.close(code=1013, message=b"too slow; reconnect")
                break
            await ws.send_json(event.to_json())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        reader.cancel()
        bus.unsubscribe(subscription)
        metrics.events_clients.dec()
        request.app[RUNTIME].event_sockets.discard(ws)
    return ws
