"""Any instance serves the API: what needs a conversation's media goes to the instance holding it.

With several instances (``GATEWAY_REDIS_URL``), a conversation's legs, its supervisor phone and
its WebRTC listeners live on one instance, its media owner (``gateway.shared.cluster``). So:

* a voice monitor command (``POST /v1/conversations/{cid}/monitors`` with ``voice``) that reaches
  another instance is forwarded to the owner, which claims the voice slot and calls the phone;
  with no owner yet, the instance that got it claims the media and serves it;
* a WHEP offer that reaches another instance is answered ``307`` with ``Location`` on the owner
  (WHEP clients follow it), except from a browser (an ``Origin`` header): a browser drops
  ``Authorization`` on a cross-origin redirect (Fetch standard), so its offer is forwarded, and
  the console works whichever instance serves it without CORS;
* a draining instance forwards new monitors to the owner, or with none to a live instance that
  is not draining (which becomes the owner), and answers 503 ``draining`` only if none is left.

A forwarded request carries ``X-Gateway-Forwarded`` with the cluster's secret: the receiving
instance serves it itself, so a request is forwarded at most once.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from gateway.errors import ErrorCode, GatewayError
from gateway.shared.cluster import Cluster, Instance
from gateway.store import Store

log = logging.getLogger(__name__)

FORWARDED_HEADER = "X-Gateway-Forwarded"
#: Headers of the answer that go back to the client as they are.
_PASSED_BACK = ("Content-Type", "Location", "Retry-After", "Allow")
#: A monitor created on another instance reaches this one's copy of the store within this long
#: (pub/sub on loopback: a millisecond): the client's next request here then finds it.
_SEEN_WITHIN = 2.0


class Forwarder:
    """Routes requests to the instance that holds a conversation's media."""

    def __init__(self, cluster: Cluster, store: Store, *, timeout: float = 10.0) -> None:
        self.cluster = cluster
        self._store = store
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def forwarded(self, request: web.Request) -> bool:
        """The request was forwarded by another instance: serve it here."""
        return self.cluster.is_forwarded(request.headers.get(FORWARDED_HEADER))

    async def monitor_target(self, request: web.Request, cid: str, *, voice: bool, draining: bool) -> Instance | None:
        """Where a new monitor of ``cid`` is opened: ``None`` here, else that instance."""
        if self.forwarded(request):
            if voice and await self.cluster.claim_media(cid) is not None:
                # sent here as the instance to hold it, but another one took it meanwhile
                error = GatewayError(ErrorCode.UNAVAILABLE, "the conversation's media moved to another instance")
                error.headers["Retry-After"] = "1"
                raise error
            return None
        if voice:
            if draining:  # a draining instance claims nothing new: it only looks who holds the media
                owner = await self.cluster.media_owner(cid)
                if owner is None and cid in self.cluster.owned:
                    return None  # the media is here, on its way out: 503 draining
            else:
                owner = await self.cluster.claim_media(cid)
            if owner is not None:
                return owner
        return self.cluster.live_peer() if draining else None

    async def listen_target(self, request: web.Request, cid: str, *, draining: bool) -> Instance | None:
        """Where a WebRTC listener of ``cid`` is served: ``None`` here, else the owner."""
        if self.forwarded(request):
            return None
        return await (self.cluster.media_owner(cid) if draining else self.cluster.claim_media(cid))

    async def owner(self, cid: str) -> Instance | None:
        return await self.cluster.media_owner(cid)

    def redirect(self, request: web.Request, target: Instance) -> web.Response:
        """307 to the same path on ``target`` (method and body kept, RFC 9110 §15.4.8)."""
        location = target.api.rstrip("/") + request.path_qs
        return web.Response(status=307, headers={"Location": location, "Cache-Control": "no-store"})

    async def forward(
        self, request: web.Request, target: Instance, body: bytes | None = None, *, content_type: str | None = None
    ) -> web.Response:
        """Send the request to ``target`` and answer what it answers (503 ``unavailable`` if it
        does not: it may have just died, and its leases expire within the TTL)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        headers = {FORWARDED_HEADER: self.cluster.secret}
        for name in ("Authorization", "Content-Type", "Accept"):
            value = request.headers.get(name)
            if value is not None:
                headers[name] = value
        if content_type is not None:
            headers["Content-Type"] = content_type
        url = target.api.rstrip("/") + request.path_qs
        try:
            async with self._http.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            ) as answer:
                data = await answer.read()
                passed = {name: answer.headers[name] for name in _PASSED_BACK if name in answer.headers}
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("forwarding to another instance failed", extra={"instance": target.id, "error": repr(exc)})
            error = GatewayError(
                ErrorCode.UNAVAILABLE, f"the instance holding this conversation's media ({target.id}) does not answer"
            )
            error.headers["Retry-After"] = "1"
            raise error from exc
        log.info("forwarded", extra={"instance": target.id, "route": request.path, "status": status})
        return web.Response(status=status, body=data, headers=passed)

    async def seen(self, mid: str) -> None:
        """Wait (briefly) until this instance's copy of the store has monitor ``mid``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SEEN_WITHIN
        while self._store.get_monitor(mid) is None and loop.time() < deadline:
            await asyncio.sleep(0.005)
