"""The planes as the control plane sees them.

The Protocols say what the API and the service use of each plane, so neither imports a plane's
concrete module (``gateway.chat.service``, ``gateway.sip``, ``gateway.media``) to know its type.
:class:`Planes` holds the media planes that run in this process and does for the service what
involves them: calling a supervisor's phone, and stopping every media path of a monitor's voice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from gateway.errors import ErrorCode, GatewayError
from gateway.policy import rules
from gateway.quality import IngressQuality, Measured, QualityBoard
from gateway.runtime import BackgroundTasks

if TYPE_CHECKING:
    from gateway.chat.hub import Subscription
    from gateway.chat.log import ChatEntry
    from gateway.media.frames import LegTap

log = logging.getLogger(__name__)


class ChatPlane(Protocol):
    """``gateway.chat.service.ChatService``: the durable chat log and its live streams."""

    heartbeat_interval: float

    async def post(
        self,
        cid: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
    ) -> tuple[ChatEntry, bool]: ...

    async def head(self, cid: str) -> int: ...

    async def read(self, cid: str, after: int, limit: int = 500) -> tuple[tuple[int, int] | None, list[ChatEntry]]: ...

    def subscribe(
        self, cid: str, wake: Callable[[], None], on_overflow: Callable[[], None] | None = None
    ) -> Subscription: ...

    def ended_reason(self, cid: str) -> str | None: ...

    def end_conversation(self, cid: str, reason: str) -> int: ...


class SipPlane(Protocol):
    """``gateway.sip.plane.SipPlane``: SIP ingress of the platform's legs and supervisor phones."""

    @property
    def ready(self) -> bool: ...

    def set_draining(self, draining: bool) -> None: ...

    def stats(self) -> dict[str, float]: ...

    async def call_phone(self, cid: str, monitor_id: str, uri: str) -> None: ...

    async def hang_up_phone(self, monitor_id: str) -> None: ...

    def open_tap(self, cid: str) -> LegTap: ...

    def forward_frames(self, cid: str, path: str, on: bool) -> None: ...

    def conversations(self) -> set[str]: ...
    def wideband(self, cid: str) -> bool: ...

    def leg_quality(self, cid: str) -> IngressQuality | None: ...

    def phone_conversation(self, monitor_id: str) -> str | None: ...


class WebRtcPlane(Protocol):
    """``gateway.media.pool.MediaProcesses``: the WebRTC media processes."""

    async def answer(
        self,
        offer_sdp: str,
        cid: str,
        *,
        stereo: bool,
        on_levels: Callable[[float, float], None] | None = None,
        on_inbound_rtp: Callable[[int], None] | None = None,
        codec: str | None = None,
    ) -> tuple[str, Listener]: ...

    def stats(self) -> dict[str, float]: ...


class Listener(Protocol):
    """``gateway.media.whep.WhepSession``: one browser listening to a monitor's voice."""

    @property
    def id(self) -> str: ...

    async def close(self, reason: str = ...) -> None: ...

    def on_closed(self, callback: Callable[[str], Any]) -> None: ...


@runtime_checkable
class MeasuredListener(Protocol):
    """A listener that measures its transit (``WhepSession``, ``RemoteListener``): seconds from
    the SIP worker's bridge tick to the send, summed over how many frames (both only grow)."""

    def transit(self) -> tuple[float, int]: ...


#: WebRTC listeners by monitor id, then by session id.
Listeners = dict[str, dict[str, Listener]]


class Planes:
    """The media planes of this process, and the voice actions the service asks of them."""

    def __init__(
        self,
        background: BackgroundTasks,
        listeners: Listeners,
        sip: Callable[[], SipPlane | None],
        *,
        phone_busy_retries: int = 10,
    ) -> None:
        self._background = background
        self._sip = sip
        self.listeners = listeners
        #: A phone still hanging up holds the call's slot for a moment: retry that often, 0.1 s apart.
        self._phone_busy_retries = phone_busy_retries
        #: conversation -> the monitor whose phone is called once the conversation's first leg connects.
        self._pending_phones: dict[str, str] = {}
        #: each voice monitor's quality figures (gateway.quality), measured once a second
        self.quality = QualityBoard()

    @property
    def sip(self) -> SipPlane | None:
        """The SIP plane while it runs (``None``: SIP is disabled, or not started yet)."""
        return self._sip()

    async def call_phone(self, cid: str, mid: str, uri: str) -> str | None:
        """Call the phone of monitor ``mid``; ``None`` when ringing (or deferred), else why not.

        The platform may say voice is on before the SIP legs arrive: the call is then placed
        when the first leg connects (:meth:`take_pending_phone`). Any other failure is answered
        as its code (the reason the monitor loses the voice).
        """
        sip = self.sip
        failure: str | None = None
        try:
            if sip is None:
                raise GatewayError(ErrorCode.SIP_DISABLED, "SIP is disabled on this gateway")
            for attempt in range(self._phone_busy_retries + 1):
                try:
                    await sip.call_phone(cid, mid, uri)
                    break
                except GatewayError as exc:
                    # The previous supervisor's phone may still be hanging up (BYE in flight) when
                    # the domain has already handed the voice slot on: give it a moment.
                    if exc.code != ErrorCode.VOICE_MONITOR_BUSY or attempt == self._phone_busy_retries:
                        raise
                    await asyncio.sleep(0.1)
        except GatewayError as exc:
            if exc.code == ErrorCode.VOICE_NOT_ACTIVE:
                self._pending_phones[cid] = mid
                return None
            failure = exc.code
        except Exception:  # a hung or dead worker: never keep the voice slot without a phone
            log.exception("calling the supervisor phone failed", extra={"monitor": mid})
            failure = rules.END_MEDIA_FAILURE
        self._pending_phones.pop(cid, None)
        return failure

    def pending_conversations(self) -> set[str]:
        """Conversations with a supervisor phone waiting for their first leg."""
        return set(self._pending_phones)

    def take_pending_phone(self, cid: str) -> str | None:
        """The monitor whose phone waits for ``cid``'s first leg, if any (now no longer waiting)."""
        return self._pending_phones.pop(cid, None)

    def release_voice(self, cid: str, mid: str) -> None:
        """Stop every media path of a monitor's voice: the SIP phone call (placed or waiting for
        the legs) and the WebRTC listeners."""
        if self._pending_phones.get(cid) == mid:
            del self._pending_phones[cid]
        sip = self.sip
        if sip is not None:
            self._background.spawn(sip.hang_up_phone(mid))
        for session in self.listeners.pop(mid, {}).values():
            self._background.spawn(session.close())

    async def add_listener(self, mid: str, session: Listener) -> None:
        """A new WebRTC listener of monitor ``mid`` replaces the previous one (a reloaded console page)."""
        sessions = self.listeners.setdefault(mid, {})
        for old_id, old in list(sessions.items()):
            sessions.pop(old_id)
            await old.close("replaced")
        sessions[session.id] = session
        session.on_closed(lambda _reason: self.listeners.get(mid, {}).pop(session.id, None))

    def take_listener(self, mid: str, session_id: str) -> Listener | None:
        """The listener ``session_id`` of monitor ``mid``, no longer tracked (the caller closes it)."""
        return self.listeners.get(mid, {}).pop(session_id, None)

    def measure_quality(self, mid: str, cid: str) -> Measured | None:
        """This second's quality of monitor ``mid``'s voice, if it is heard through this process
        (a WebRTC listener, or a phone of the SIP plane) and its legs were measured; else its
        figures are forgotten and ``None``."""
        sip = self.sip
        ingress = sip.leg_quality(cid) if sip is not None else None
        transit: tuple[float, int] | None = None
        sessions = self.listeners.get(mid)
        if sessions:
            session = next(reversed(sessions.values()))  # the newest replaces the others
            transit = session.transit() if isinstance(session, MeasuredListener) else None
            path: Literal["sip", "webrtc"] | None = "webrtc"
        elif sip is not None and sip.phone_conversation(mid) == cid:
            path = "sip"
        else:
            path = None
        if ingress is None or path is None:
            self.quality.forget(mid)
            return None
        return self.quality.measure(mid, ingress, path, transit)

    async def close_listeners(self) -> None:
        """Close every WebRTC listener (at shutdown)."""
        for sessions in list(self.listeners.values()):
            for session in list(sessions.values()):
                await session.close()
        self.listeners.clear()
