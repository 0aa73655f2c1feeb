"""WHEP-style listening (API.md): an SDP offer in, a ``sendonly`` audio answer out.

One voice monitor per conversation (R8) is enforced when the monitor is created; here the
monitor must hold the voice channel with ``kind: webrtc``. A new offer for the same monitor
replaces the previous listener (a reloaded console page).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection

from aiohttp import web

from gateway.api.context import FORWARDER, MEDIA, METRICS, PLANES, RUNTIME, SERVICE, SETTINGS, SIP
from gateway.api.identity import authenticate_supervisor
from gateway.api.routes import refuse_when_draining
from gateway.api.validation import read_limited
from gateway.errors import ErrorCode, GatewayError
from gateway.media.whep import WhepError, answer_whep
from gateway.planes import Listener

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.post("/v1/monitors/{mid}/whep")
async def whep_offer(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    app = request.app
    settings = app[SETTINGS]
    forwarder = app.get(FORWARDER)
    if forwarder is None:
        refuse_when_draining(request)
    conversation, monitor = app[SERVICE].check_may_listen(principal, request.match_info["mid"])
    if request.content_type != "application/sdp":
        raise GatewayError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the offer as application/sdp")
    raw = await read_limited(request, settings.max_body_bytes)
    if forwarder is not None:  # several instances: the listener is served where the media is
        target = await forwarder.listen_target(request, monitor.conversation, draining=app[RUNTIME].draining)
        if target is not None:
            if "Origin" in request.headers:  # a browser: see gateway.api.forwarding
                return await forwarder.forward(request, target, raw)
            return forwarder.redirect(request, target)
        refuse_when_draining(request)
    offer = raw.decode("utf-8", errors="replace")
    sip = app.get(SIP)
    if sip is None:
        raise GatewayError(ErrorCode.SIP_DISABLED, "no SIP media on this gateway, so there is nothing to listen to")

    service, metrics = app[SERVICE], app[METRICS]
    mid, cid, team = monitor.id, monitor.conversation, conversation.team

    def on_levels(agent_dbfs: float, customer_dbfs: float) -> None:
        service.publish_levels(monitor, team, agent_dbfs, customer_dbfs)

    def on_inbound_rtp(total: int) -> None:
        metrics.inbound_rtp_dropped.inc()
        service.inbound_rtp_dropped(monitor, total)

    stereo = _stereo(request, settings.webrtc_stereo, conversation.voice_legs)
    # HD voice: when every leg is wideband (G.722, Opus) the frames are 16 kHz, and only Opus
    # carries them to the browser (G.711 would cut them to 4 kHz); else the configured codec.
    wide = sip.wideband(cid)
    media = app.get(MEDIA)
    session: Listener
    try:
        if media is not None:  # a media process answers and sends; frames go there from the worker
            answer, session = await media.answer(
                offer,
                cid,
                stereo=stereo,
                on_levels=on_levels,
                on_inbound_rtp=on_inbound_rtp,
                codec="opus" if wide else None,
            )
        else:
            # (no codec argument otherwise: answer_whep's own default applies)
            answer_here = functools.partial(answer_whep, codec="opus") if wide else answer_whep
            answer, session = await answer_here(
                offer,
                sip.open_tap(cid),
                settings=settings,
                stereo=stereo,
                on_levels=on_levels,
                on_inbound_rtp=on_inbound_rtp,
            )
    except WhepError as exc:
        raise GatewayError(ErrorCode(exc.code), str(exc)) from exc
    except ConnectionError as exc:  # no media process up, or it died while answering
        raise GatewayError(ErrorCode.UNAVAILABLE, "no WebRTC media process can take the listener now") from exc
    await app[PLANES].add_listener(mid, session)
    try:
        service.listener_started(monitor, session.id)
    except GatewayError:  # the monitor ended while the offer was answered
        await session.close("monitor_ended")
        raise
    location = f"/v1/monitors/{mid}/whep/{session.id}"
    return web.Response(status=201, text=answer, content_type="application/sdp", headers={"Location": location})


@routes.delete("/v1/monitors/{mid}/whep/{session}")
async def whep_delete(request: web.Request) -> web.Response:
    principal = await authenticate_supervisor(request)
    monitor = request.app[SERVICE].monitor_of(principal, request.match_info["mid"])
    session = request.app[PLANES].take_listener(monitor.id, request.match_info["session"])
    if session is not None:  # already gone (closed, replaced, monitor ended): DELETE is idempotent
        await session.close("deleted")
        return web.Response(status=204)
    forwarder = request.app.get(FORWARDER)
    if forwarder is not None and not forwarder.forwarded(request):
        # a browser's listener is served by the media owner behind the instance it talks to
        owner = await forwarder.owner(monitor.conversation)
        if owner is not None:
            return await forwarder.forward(request, owner)
    return web.Response(status=204)


def _stereo(request: web.Request, default: bool, voice_legs: Collection[str]) -> bool:
    """Agent left, customer right when asked (``?stereo=``, else the setting); never for one
    mixed SIPREC stream, which carries both parties: the second channel would be silence."""
    if "mixed" in voice_legs:
        return False
    raw = request.query.get("stereo")
    return default if raw is None else raw.lower() in ("1", "true", "yes")
