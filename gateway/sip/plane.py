"""The SIP plane's facade for the rest of the gateway (main process; never imports pjsua2).

:class:`SipPlane` wires

* the SIP front (:mod:`gateway.sip.front`) on ``settings.sip_host:sip_port``, which redirects
  each ingress INVITE (302) to a worker with room;
* the placement (:mod:`gateway.sip.placement`): which worker holds which conversation, slots
  and 302 reservations;
* ``settings.sip_workers`` pjsua2 worker processes, supervised (:mod:`gateway.sip.supervisor`),
  spoken to through the process protocol (:mod:`gateway.sip.protocol`): a worker that dies is
  restarted and its calls are reported ended with ``media_failure``;
* the taps (:mod:`gateway.sip.taps`): LegFrames from the workers fanned out to listeners;

and answers the domain through :class:`SipHooks`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from ..config import Settings
from ..errors import ErrorCode, GatewayError
from .front import SipFront
from .message import InviteInfo, SipMessage, SipParseError, classify_invite, parse_message, uri_user, valid_sip_uri
from .placement import Placement, Refusal
from .protocol import Answer, CallEnded, CallPhone, Event, HangUpPhone, Incoming, LegUp, PhoneEnded, Reject, SetTap
from .supervisor import Spawn, Supervisor, Worker, spawn_subprocess
from .taps import Tap, TapFanout

__all__ = ["SipHooks", "SipPlane", "Tap"]

log = logging.getLogger("gateway.sip.plane")

T = TypeVar("T")

_RETRY = [("Retry-After", "5")]
_REFUSALS: dict[Refusal, tuple[int, str, list[tuple[str, str]]]] = {
    Refusal.LEG_TAKEN: (486, "Leg Already Connected", []),
    Refusal.WORKER_RESTARTING: (503, "Worker Restarting", _RETRY),
    Refusal.NO_CAPACITY: (503, "No Capacity", _RETRY),
}


class SipHooks(Protocol):  # implemented by the control plane; all called on the asyncio loop thread
    def conversation_agent(
        self, cid: str
    ) -> str | None: ...  # agent username, or None if the conversation is unknown/not accepting voice (→ SIP 404)

    def accepting(self) -> bool: ...  # False while draining (→ 503)

    def on_leg_started(self, cid: str, leg: str) -> None: ...  # leg in {'agent','customer'}

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None: ...  # reason e.g. 'bye', 'media_failure'

    def on_phone_ended(
        self, monitor_id: str, reason: str
    ) -> None: ...  # phone hung up: 'left'; worker died: 'media_failure'; call failed: 'phone_unreachable'


class SipPlane:
    """Facade of the SIP plane; every method runs on the asyncio loop thread.

    ``spawn`` starts one worker process (default: ``python -m gateway.sip.worker``; the tests'
    in-process fake worker speaks the same protocol).
    """

    def __init__(self, settings: Settings, hooks: SipHooks, *, spawn: Spawn = spawn_subprocess) -> None:
        self.settings = settings
        self.hooks = hooks
        self.capacity = max(1, min(4, settings.calls_per_worker))
        self.taps = TapFanout(self._switch_tap)
        #: conversation -> media process sockets its worker sends the LegFrames to as well
        self.forwards: dict[str, set[str]] = {}
        self.supervisor = Supervisor(
            settings,
            self.capacity,
            on_event=self._event,
            on_exit=self._worker_exited,
            frame_receiver=self.taps.protocol,
            spawn=spawn,
        )
        self.placement = Placement(
            len(self.supervisor.workers),
            self.capacity,
            reserve_phone_slot=settings.sip_reserve_phone_slot,
            reservation_seconds=settings.sip_reservation_seconds,
        )
        self.front: SipFront | None = None
        self._front_transport: asyncio.BaseTransport | None = None
        self.draining = False
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False

    @property
    def workers(self) -> list[Worker]:
        return self.supervisor.workers

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the SIP front (raises ``OSError`` if the port is taken), spawn the workers
        (``RuntimeError`` if they are not ready within ``sip_worker_ready_timeout``)."""
        loop = asyncio.get_running_loop()
        front = self.front = SipFront(self._decide_invite, self._options_ok)
        self._front_transport, _ = await loop.create_datagram_endpoint(
            lambda: front, local_addr=(self.settings.sip_host, self.settings.sip_port)
        )
        self._started = True
        try:
            await self.supervisor.start()
        except RuntimeError:
            await self.stop()
            raise
        self._sweeper = asyncio.create_task(self._sweep(), name="sip-sweeper")

    async def stop(self) -> None:
        """Hang up everything (BYE), stop the workers, close the front."""
        if self.stopping:
            return
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._front_transport is not None:
            self._front_transport.close()
        await self.supervisor.stop()
        self.taps.finish_all()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    @property
    def ready(self) -> bool:
        """All workers up."""
        return self._started and not self.stopping and self.supervisor.ready

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            self.supervisor.kill_hung(now)
            self.placement.expire(now)

    # --- the front's decisions -------------------------------------------------------------
    def _options_ok(self) -> bool:
        """OPTIONS answer: 200 only if ready, not draining and a new conversation would fit."""
        if not self.ready or self.draining or self._safe(self.hooks.accepting) is False:
            return False
        return self.placement.fits_new()

    def _decide_invite(self, msg: SipMessage) -> tuple[int, str | None, list[tuple[str, str]]]:
        if self.draining or self.stopping or self._safe(self.hooks.accepting) is False:
            return 503, "Draining", _RETRY
        info: InviteInfo = classify_invite(msg, self.hooks.conversation_agent)
        wanted = {s for s in info.streams if s}
        res = self.placement.reserve(
            info.conversation, info.kind, wanted, self.supervisor.ready_workers(), time.monotonic()
        )
        if isinstance(res, Refusal):
            return _REFUSALS[res]
        worker = self.workers[res.worker]
        return 302, None, [("Contact", f"<sip:{res.token}@{self.settings.sip_host}:{worker.sip_port}>")]

    # --- worker events ---------------------------------------------------------------------
    def _event(self, worker: int, event: Event) -> None:
        match event:
            case Incoming():
                self._incoming(worker, event)
            case LegUp():
                conv = self.placement.leg_up(worker, event.call, event.cid, event.leg)
                if conv is None:
                    return
                self._safe(self.hooks.on_leg_started, conv.cid, event.leg)
                if self.taps.listened(conv.cid):
                    self.supervisor.send(worker, SetTap(cid=conv.cid, on=True))
                for path in self.forwards.get(conv.cid, ()):
                    self.supervisor.send(worker, SetTap(cid=conv.cid, on=True, to=path))
            case CallEnded():
                ended = self.placement.call_ended(worker, event.call)
                if ended is None:
                    return
                conv, legs = ended
                for leg in legs:
                    self._safe(self.hooks.on_leg_ended, conv.cid, leg, event.reason)
                if not conv.legs and conv.had_legs:
                    self.taps.finish(conv.cid)
                self.placement.release_if_idle(conv)
            case PhoneEnded():
                cid = self.placement.phone_gone(event.mid)
                if event.reason != "hung_up" and cid is not None:  # our own hang_up_phone is not reported
                    self._safe(self.hooks.on_phone_ended, event.mid, event.reason)

    def _incoming(self, worker: int, event: Incoming) -> None:
        """A redirected INVITE reached ``worker``: check its reservation, answer or reject."""
        try:
            msg = parse_message(event.msg.encode())
            res = self.placement.reservation(uri_user(msg.uri or ""), worker, time.monotonic())
            if res is None:
                raise SipParseError("no reservation for this call", 403)
            info = classify_invite(msg, self.hooks.conversation_agent)
            if info.conversation != res.cid or {s for s in info.streams if s} != res.legs:
                raise SipParseError("INVITE differs from the one redirected", 403)
        except SipParseError as exc:
            self.supervisor.send(worker, Reject(call=event.call, code=exc.status))
            return
        if self.placement.admit(res, event.call, info.streams) is None:
            self.supervisor.send(worker, Reject(call=event.call, code=403))
            return
        self.supervisor.send(worker, Answer(call=event.call, cid=res.cid, legs=info.streams))

    def _worker_exited(self, worker: int) -> None:
        """Every call of a dead worker ended (``shutdown`` when we stopped it); its taps end."""
        reason = "shutdown" if self.stopping else "media_failure"
        dropped = self.placement.drop_worker(worker)
        for conv in dropped:  # phones first: after a leg ends the domain takes its monitors' voice as voice_ended
            if conv.phone is not None:
                self._safe(self.hooks.on_phone_ended, conv.phone, reason)
        for conv in dropped:
            for leg in conv.legs:
                self._safe(self.hooks.on_leg_ended, conv.cid, leg, reason)
            self.taps.finish(conv.cid)

    # --- public API ------------------------------------------------------------------------
    def legs(self, cid: str) -> set[str]:
        """Legs of ``cid`` currently connected (media up)."""
        conv = self.placement.conversations.get(cid)
        return set(conv.legs) if conv is not None else set()

    async def call_phone(self, cid: str, monitor_id: str, uri: str) -> None:
        """Call the supervisor's SIP phone with ``a=sendonly`` and send it the mix of both legs.

        Returns once the INVITE is sent (ringing is not awaited); the outcome arrives through
        ``hooks.on_phone_ended`` (``phone_unreachable`` if it never answers).
        """
        if not valid_sip_uri(uri):
            raise GatewayError(ErrorCode.INVALID_SIP_URI, f"not a SIP URI: {uri[:80]!r}")
        conv = self.placement.conversations.get(cid)
        if conv is None or not conv.legs:
            raise GatewayError(ErrorCode.VOICE_NOT_ACTIVE, "no voice legs are connected for this conversation")
        if conv.phone is not None:
            raise GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "a phone already listens to this conversation")
        if monitor_id in self.placement.phones:
            raise GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "this monitor already has a phone call")
        if not self.placement.phone_fits(cid):
            raise GatewayError(ErrorCode.VOICE_CAPACITY, "the media worker of this conversation is full")
        self.placement.add_phone(cid, monitor_id)
        try:
            reply = await self.supervisor.request(conv.worker, CallPhone(cid=cid, mid=monitor_id, uri=uri))
        except BaseException:
            self.placement.phone_gone(monitor_id)
            raise
        if not reply.ok:
            self.placement.phone_gone(monitor_id)
            if "URI" in reply.error.upper():
                raise GatewayError(ErrorCode.INVALID_SIP_URI, f"the phone URI was refused: {reply.error}")
            raise GatewayError(ErrorCode.PHONE_UNREACHABLE, f"calling the phone failed: {reply.error}")

    async def hang_up_phone(self, monitor_id: str) -> None:
        """Hang up the supervisor phone of ``monitor_id`` (BYE, or CANCEL while ringing); idempotent.

        ``hooks.on_phone_ended`` is *not* called for a hang-up the gateway asked for.
        """
        cid = self.placement.phones.get(monitor_id)
        if cid is None:
            return
        conv = self.placement.conversations.get(cid)
        if conv is None:
            self.placement.phones.pop(monitor_id, None)
            return
        try:
            await self.supervisor.request(conv.worker, HangUpPhone(mid=monitor_id))
        except (TimeoutError, GatewayError):
            pass

    def open_tap(self, cid: str, maxsize: int = 50) -> Tap:
        """Start receiving ``cid``'s LegFrames (both legs, unmixed, 20 ms each)."""
        return self.taps.open(cid, maxsize)

    def forward_frames(self, cid: str, path: str, on: bool) -> None:
        """Have the worker holding ``cid`` (now, or when its legs arrive) send the LegFrames
        straight to ``path``, a media process's unix datagram socket (``on``), or stop."""
        paths = self.forwards.setdefault(cid, set())
        if on == (path in paths):
            return
        (paths.add if on else paths.discard)(path)
        if not paths:
            del self.forwards[cid]
        conv = self.placement.conversations.get(cid)
        if conv is not None:
            self.supervisor.send(conv.worker, SetTap(cid=cid, on=on, to=path))

    def _switch_tap(self, cid: str, on: bool) -> None:
        conv = self.placement.conversations.get(cid)
        if conv is not None:
            self.supervisor.send(conv.worker, SetTap(cid=cid, on=on))

    def stats(self) -> dict[str, float]:
        """Gauges/counters for Prometheus (no per-conversation labels)."""
        workers, p = self.workers, self.placement
        return {
            "workers": float(len(workers)),
            "workers_ready": float(sum(w.ready for w in workers)),
            "worker_restarts": float(sum(w.restarts for w in workers)),
            "worker_hung_kills": float(sum(w.hung_kills for w in workers)),
            "calls": float(sum(p.calls_on(w.index) for w in workers)),
            "capacity_calls": float(self.capacity * len(workers)),
            "conversations": float(len(p.conversations)),
            "legs": float(p.legs),
            "phones": float(len(p.phones)),
            "reservations": float(len(p.reservations)),
            "free_conversation_slots": float(sum(max(0, p.free(w.index)) for w in workers if w.ready)),
            "taps": float(self.taps.count),
            "frames_sent": float(sum(w.frames for w in workers)),
            "frames_received": float(self.taps.frames_received),
            "frames_dropped_worker": float(sum(w.drops for w in workers)),
            "frames_dropped_tap": float(self.taps._tap_drops),
            "front_invites": float(self.front.counts["invites"] if self.front else 0),
            "front_rejected": float(self.front.counts["rejected"] if self.front else 0),
            "front_malformed": float(self.front.counts["malformed"] if self.front else 0),
        }

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (tests and operators)."""
        return [w.pid for w in self.workers]

    def worker_of(self, cid: str) -> int | None:
        conv = self.placement.conversations.get(cid)
        return conv.worker if conv is not None else None

    @staticmethod
    def _safe(fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except Exception:
            log.exception("sip hook %s failed", getattr(fn, "__name__", fn))
            return None
