"""Fork on demand: ask the platform to fork a conversation's voice only while someone listens.

A conversation PUT with ``"fork": "on_demand"`` has its voice session active without any SIP
legs: when a supervisor is granted its voice, the service publishes ``voice_fork_requested``
(:func:`fork_event`), and ``voice_fork_released`` when the last voice monitor leaves. The events
reach the platform two ways:

* ``GET /v1/events`` opened with a platform token of the client that PUT the conversation
  (``policy.rules.may_see_event``; supervisors never see them);
* a webhook, if ``GATEWAY_FORK_WEBHOOK_URL`` is set (:class:`ForkWebhook`): the event's JSON,
  POSTed with an HMAC-SHA256 signature (:func:`sign`, :func:`verify`), retried with backoff
  while it fails, each attempt carrying the same event id (the platform deduplicates on it).

Nothing here blocks an API answer: the webhook runs in background tasks, one chain per
conversation so a release never overtakes its request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass

import aiohttp

from gateway.domain import Conversation, DomainEvent, EventType

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gateway-Signature"
TIMESTAMP_HEADER = "X-Gateway-Timestamp"
EVENT_ID_HEADER = "X-Gateway-Event-Id"


@dataclass(frozen=True)
class ForkSettings:
    """What the service needs to ask for a fork (from ``gateway.config.Settings``)."""

    #: Where the platform sends the fork: the gateway's SIP address as platforms reach it.
    sip_uri: str
    #: ``siprec`` or ``per-leg``: what the gateway asks the platform to send.
    mode: str = "siprec"
    #: Seconds a granted voice waits for the fork's first leg before it ends (``fork_timeout``).
    timeout: float = 10.0


def fork_event(kind: EventType, conversation: Conversation, settings: ForkSettings) -> DomainEvent:
    """A ``voice_fork_requested`` / ``voice_fork_released`` for ``conversation``'s platform.
    ``team`` is ``None``: no supervisor's filter lets it through."""
    return DomainEvent(
        kind,
        conversation.id,
        None,
        {
            "id": f"fork-{uuid.uuid4().hex}",
            "sip_uri": settings.sip_uri,
            "mode": settings.mode,
            "platform": conversation.platform,
        },
    )


def is_fork_event(event: DomainEvent) -> bool:
    return event.type in (EventType.VOICE_FORK_REQUESTED, EventType.VOICE_FORK_RELEASED)


# ---------------------------------------------------------------------------- signatures


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 with ``secret`` over ``<timestamp>.<body>`` (the timestamp
    is signed too, so an old body can not be replayed with a fresh one)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance: float = 300.0) -> bool:
    """What a platform checks on each webhook call: the signature (compared in constant time)
    and a timestamp within ``tolerance`` seconds of now."""
    try:
        age = abs(time.time() - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


# ---------------------------------------------------------------------------- webhook


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    secret: str
    #: Attempts in all (the first one included); then the event is dropped (logged).
    attempts: int = 6
    #: Seconds one attempt may take (connect + answer).
    timeout: float = 2.0
    #: First pause between attempts; doubled each time, capped at ``backoff_max``.
    backoff: float = 0.5
    backoff_max: float = 8.0


class ForkWebhook:
    """POSTs fork events to the platform's webhook; see the module docstring."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        #: the last delivery of each conversation: the next one waits for it (order kept)
        self._last: dict[str, asyncio.Task[None]] = {}
        self.delivered = 0
        self.failed = 0

    async def close(self) -> None:
        for task in list(self._last.values()):
            task.cancel()
        await asyncio.gather(*self._last.values(), return_exceptions=True)
        self._last.clear()
        if self._session is not None:
            await self._session.close()

    def send(self, event: DomainEvent) -> None:
        """Deliver ``event`` in the background, after the conversation's previous one."""
        previous = self._last.get(event.conversation)
        task: asyncio.Task[None] = asyncio.ensure_future(self._deliver(event, previous))
        self._last[event.conversation] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._last.get(event.conversation) is t:
                del self._last[event.conversation]

        task.add_done_callback(done)

    async def _deliver(self, event: DomainEvent, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        s = self.settings
        body = json.dumps(event.to_json(), separators=(",", ":")).encode()
        event_id = str(event.payload["id"])
        pause = s.backoff
        for attempt in range(1, s.attempts + 1):
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                EVENT_ID_HEADER: event_id,
                TIMESTAMP_HEADER: timestamp,
                SIGNATURE_HEADER: sign(s.secret, timestamp, body),
            }
            try:
                if self._session is None:
                    self._session = aiohttp.ClientSession()
                async with self._session.post(
                    s.url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=s.timeout)
                ) as response:
                    status = response.status
                if 200 <= status < 300:
                    self.delivered += 1
                    return
                # 4xx other than 408/429: the platform refuses this body; sending it again can not help
                if 400 <= status < 500 and status not in (408, 429):
                    log.warning(
                        "fork webhook refused the event (%d)",
                        status,
                        extra={"conversation": event.conversation, "event": event_id},
                    )
                    self.failed += 1
                    return
                why = f"HTTP {status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                why = f"{type(exc).__name__}: {exc}"
            if attempt == s.attempts:
                break
            log.info(
                "fork webhook attempt %d failed (%s); again in %.1fs",
                attempt,
                why,
                pause,
                extra={"conversation": event.conversation, "event": event_id},
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, s.backoff_max)
        self.failed += 1
        log.warning(
            "fork webhook gave up after %d attempts",
            s.attempts,
            extra={"conversation": event.conversation, "event": event_id},
        )
