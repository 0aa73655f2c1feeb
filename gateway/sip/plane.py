"""The SIP plane's facade for the rest of the gateway (main process; never imports pjsua2).

:class:`SipPlane` wires

* the SIP front (:mod:`gateway.sip.front`) on ``settings.sip_host:sip_port`` (UDP and TCP),
  which forwards each acceptable ingress INVITE to a worker with room, with a one-time
  placement token, and proxies every later message of the call;
* the placement (:mod:`gateway.sip.placement`): which worker holds which conversation, slots
  and placement reservations;
* ``settings.sip_workers`` pjsua2 worker processes (default: one per core, each holding as many
  calls as its pjsua2 build allows, hundreds with the project's build), supervised (:mod:`gateway.sip.supervisor`),
  spoken to through the process protocol (:mod:`gateway.sip.protocol`): a worker that dies is
  restarted and its calls are reported ended with ``media_failure``;
* the taps (:mod:`gateway.sip.taps`): LegFrames from the workers fanned out to listeners;

and answers the domain through :class:`SipHooks`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from ..config import Settings
from ..errors import ErrorCode, GatewayError
from ..quality import IngressQuality, LegReport
from .front import RELAY_HEADER, Decision, Forward, Refuse, Relay, SipFront
from .message import InviteInfo, SipMessage, SipParseError, classify_invite, parse_message, valid_sip_uri
from .parties import Parties
from .placement import Placement, Refusal
from .protocol import (
    PLACEMENT_HEADER,
    WIDEBAND_CODECS,
    Answer,
    CallEnded,
    CallPhone,
    Event,
    HangUpPhone,
    Incoming,
    LegQuality,
    LegUp,
    PhoneEnded,
    Ready,
    Reject,
    SetTap,
)
from .supervisor import Spawn, Supervisor, Worker, spawn_subprocess
from .taps import Tap, TapFanout

__all__ = ["SipHooks", "SipPlane", "Tap"]

log = logging.getLogger("gateway.sip.plane")

T = TypeVar("T")

_RETRY = [("Retry-After", "5")]
_REFUSALS: dict[Refusal, Refuse] = {
    Refusal.LEG_TAKEN: Refuse(486, "Leg Already Connected"),
    Refusal.WORKER_RESTARTING: Refuse(503, "Worker Restarting", _RETRY),
    Refusal.NO_CAPACITY: Refuse(503, "No Capacity", _RETRY),
}


class SipHooks(Protocol):  # implemented by the control plane; all called on the asyncio loop thread
    def conversation_parties(
        self, cid: str
    ) -> Parties | None: ...  # agent username and addresses, or None if unknown/not accepting voice (→ SIP 404)

    def recording_conversation(
        self, keys: Sequence[str]
    ) -> str | None: ...  # the conversation whose platform registered one of these recording keys

    def on_streams_attributed(
        self, cid: str, streams: list[dict[str, str]]
    ) -> None: ...  # an answered call's legs: [{"leg", "label", "participant"}]

    def accepting(self) -> bool: ...  # False while draining (→ 503)

    def on_leg_started(self, cid: str, leg: str) -> None: ...  # leg in {'agent','customer'}

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None: ...  # reason e.g. 'bye', 'media_failure'

    def on_phone_ended(
        self, monitor_id: str, reason: str
    ) -> None: ...  # phone hung up: 'left'; worker died: 'media_failure'; call failed: 'phone_unreachable'


class MediaOwners(Protocol):
    """Which gateway instance holds a conversation's media (several instances on one Redis,
    ``gateway.shared.cluster``): the legs of a conversation must meet on one instance."""

    # None: this instance holds it (now); else the SIP address of the live instance that does.
    # Raises GatewayError when that can not be told (Redis unreachable).
    def claim(self, cid: str) -> Awaitable[tuple[str, int] | None]: ...

    def owner(self, cid: str) -> Awaitable[tuple[str, int] | None]: ...  # the same, without claiming

    @property
    def marker(self) -> str: ...  # the RELAY_HEADER value an instance puts on a relayed INVITE

    def is_marker(self, value: str | None) -> bool: ...


class SipPlane:
    """Facade of the SIP plane; every method runs on the asyncio loop thread.

    ``spawn`` starts one worker process (default: ``python -m gateway.sip.worker``; the tests'
    in-process fake worker speaks the same protocol).
    """

    def __init__(
        self,
        settings: Settings,
        hooks: SipHooks,
        *,
        spawn: Spawn = spawn_subprocess,
        owners: MediaOwners | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        #: set in a cluster: a new conversation's INVITE is placed here only if this instance
        #: holds (or now claims) its media, else relayed to the instance that does
        self.owners = owners
        self.taps = TapFanout(self._switch_tap)
        #: conversation -> media process sockets its worker sends the LegFrames to as well
        self.forwards: dict[str, set[str]] = {}
        #: conversation -> its legs as its worker last reported them (while someone hears it)
        self.quality: dict[str, IngressQuality] = {}
        self.supervisor = Supervisor(
            settings,
            on_event=self._event,
            on_exit=self._worker_exited,
            frame_receiver=self.taps.protocol,
            spawn=spawn,
        )
        # A worker holds no call until it reports how many it can (its Ready event).
        self.placement = Placement(
            len(self.supervisor.workers),
            0,
            reserve_phone_slot=settings.sip_reserve_phone_slot,
            reservation_seconds=settings.sip_reservation_seconds,
            mint=lambda worker: self.supervisor.workers[worker].mint_token(),
        )
        self.front: SipFront | None = None
        self.draining = False
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False

    @property
    def workers(self) -> list[Worker]:
        return self.supervisor.workers

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the SIP front, UDP and TCP (raises ``OSError`` if the port is taken), spawn the
        workers (``RuntimeError`` if they are not ready within ``sip_worker_ready_timeout``)."""
        front = self.front = SipFront(self.settings, self._decide_invite, self._options_ok, self._worker_addresses)
        front.relay_host = self.settings.sip_address[0]
        if self.owners is not None:
            front.relayed_by_peer = self.owners.is_marker
        await front.start()
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
        if self.front is not None:
            self.front.close()
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

    def _worker_addresses(self) -> set[tuple[str, int]]:
        """The workers' SIP addresses (loopback only): what the front forwards to and trusts."""
        return {("127.0.0.1", w.sip_port) for w in self.workers}

    def _decide_invite(self, msg: SipMessage) -> Decision | Awaitable[Decision]:
        draining = self.draining or self.stopping or self._safe(self.hooks.accepting) is False
        if draining and self.owners is None:
            _log_refusal(msg, 503, "draining", None)
            return Refuse(503, "Draining", _RETRY)
        try:
            info: InviteInfo = classify_invite(msg, self.hooks, self.settings.sip_srtp)
        except SipParseError as exc:
            _log_refusal(msg, exc.status, str(exc), exc.conversation)
            raise
        if self.owners is None:
            return self._place(msg, info)
        if not draining and info.conversation in self.placement.conversations:
            return self._place(msg, info)  # held here already: no need to ask
        return self._decide_in_cluster(self.owners, msg, info, draining)

    async def _decide_in_cluster(
        self, owners: MediaOwners, msg: SipMessage, info: InviteInfo, draining: bool
    ) -> Decision:
        """Place the INVITE here if this instance holds the conversation's media or claims it
        now; relay it (once: a relayed INVITE is never relayed again) to the instance that does."""
        cid = info.conversation
        relayed = owners.is_marker(msg.get(RELAY_HEADER))
        try:
            # a draining instance takes no new conversation, but still sends a leg to its owner
            owner = await (owners.owner(cid) if draining else owners.claim(cid))
        except GatewayError as exc:
            _log_refusal(msg, 503, f"which instance holds the conversation is unknown ({exc.code})", cid)
            return Refuse(503, "State Unavailable", _RETRY)
        if owner is not None and not relayed:
            log.info("sip: INVITE relayed to the instance holding the conversation", extra={
                "conversation": cid, "call_id": msg.call_id, "instance": f"{owner[0]}:{owner[1]}",
            })  # fmt: skip
            return Relay(owner, owners.marker)
        if draining or self.stopping:
            _log_refusal(msg, 503, "draining", cid)
            return Refuse(503, "Draining", _RETRY)
        if owner is not None:  # taken over between the two instances' looks: let the platform retry
            _log_refusal(msg, 503, "relayed, but another instance holds the conversation", cid)
            return Refuse(503, "Conversation Moved", _RETRY)
        return self._place(msg, info)

    def _place(self, msg: SipMessage, info: InviteInfo) -> Decision:
        wanted = {s for s in info.streams if s}
        res = self.placement.reserve(
            info.conversation, info.kind, wanted, self.supervisor.ready_workers(), time.monotonic()
        )
        if isinstance(res, Refusal):
            refusal = _REFUSALS[res]
            _log_refusal(msg, refusal.status, res.value, info.conversation)
            return refusal
        return Forward(("127.0.0.1", self.workers[res.worker].sip_port), res.token)

    # --- worker events ---------------------------------------------------------------------
    def _event(self, worker: int, event: Event) -> None:
        match event:
            case Ready():
                self.placement.set_capacity(worker, event.max_calls)
            case Incoming():
                self._incoming(worker, event)
            case LegUp():
                conv = self.placement.leg_up(worker, event.call, event.cid, event.leg, event.codec)
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
                    self.quality.pop(conv.cid, None)
                self.placement.release_if_idle(conv)
            case LegQuality():
                if self.placement.conversations.get(event.cid) is None:
                    return
                reports = {leg: r for leg, raw in event.legs.items() if (r := LegReport.parse(raw)) is not None}
                self.quality[event.cid] = IngressQuality(reports, event.phone, time.monotonic())
            case PhoneEnded():
                cid = self.placement.phone_gone(event.mid)
                if event.reason != "hung_up" and cid is not None:  # our own hang_up_phone is not reported
                    self._safe(self.hooks.on_phone_ended, event.mid, event.reason)

    def _incoming(self, worker: int, event: Incoming) -> None:
        """An INVITE reached ``worker``: it must carry the front's placement token for that
        worker (else 403: nobody bypasses the front), and be the INVITE the front decided on.

        pjsua hands over the message as text with undecodable bytes surrogate-escaped: they go
        back to bytes the same way (DESIGN.md §4b), so a Latin-1 display name works.
        """
        try:
            msg = parse_message(event.msg.encode("utf-8", "surrogateescape"))
            res = self.placement.reservation(msg.get(PLACEMENT_HEADER) or "", worker, time.monotonic())
            if res is None:
                raise SipParseError("no placement for this call", 403)
            info = classify_invite(msg, self.hooks, self.settings.sip_srtp)
            if info.conversation != res.cid or {s for s in info.streams if s} != res.legs:
                raise SipParseError("INVITE differs from the one placed", 403, res.cid)
        except SipParseError as exc:
            _log_refusal(msg, exc.status, str(exc), exc.conversation, worker)
            self.supervisor.send(worker, Reject(call=event.call, code=exc.status))
            return
        except Exception:  # never leave the worker waiting: a pending call holds a slot
            log.exception("sip plane: checking an incoming INVITE failed")
            self.supervisor.send(worker, Reject(call=event.call, code=500))
            return
        if self.placement.admit(res, event.call, info.streams) is None:
            _log_refusal(msg, 403, "placement no longer admits this call", res.cid, worker)
            self.supervisor.send(worker, Reject(call=event.call, code=403))
            return
        self.supervisor.send(worker, Answer(call=event.call, cid=res.cid, legs=info.streams))
        _log_attribution(info, worker)
        streams = [{"leg": a.leg, "label": a.label, "participant": a.participant} for a in info.attribution]
        self._safe(self.hooks.on_streams_attributed, res.cid, streams)

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
            self.quality.pop(conv.cid, None)

    # --- public API ------------------------------------------------------------------------
    def conversations(self) -> set[str]:
        """Conversations placed on this instance's workers (legs, calls, phones, reservations)."""
        return set(self.placement.conversations)

    def legs(self, cid: str) -> set[str]:
        """Legs of ``cid`` currently connected (media up)."""
        conv = self.placement.conversations.get(cid)
        return set(conv.legs) if conv is not None else set()

    def leg_codecs(self, cid: str) -> dict[str, str]:
        """Connected legs of ``cid`` and their codecs (``pcmu``, ``pcma``, ``g722``, ``opus``)."""
        conv = self.placement.conversations.get(cid)
        return dict(conv.codecs) if conv is not None else {}

    def wideband(self, cid: str) -> bool:
        """Whether every connected leg of ``cid`` is wideband (G.722 or Opus): its taps then
        carry 16 kHz frames, and a WebRTC listener should get Opus to hear them."""
        codecs = self.leg_codecs(cid)
        return bool(codecs) and all(c in WIDEBAND_CODECS for c in codecs.values())

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

    def leg_quality(self, cid: str) -> IngressQuality | None:
        """How ``cid``'s legs arrive, as its worker measured them in the last second or so
        (``None``: nobody hears it, or no report yet)."""
        report = self.quality.get(cid)
        return report if report is not None and report.fresh else None

    def phone_conversation(self, monitor_id: str) -> str | None:
        """The conversation whose mix the phone of ``monitor_id`` is called for (or hears)."""
        return self.placement.phones.get(monitor_id)

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
            "capacity_calls": float(sum(p.capacities[w.index] for w in workers if w.ready)),
            # What one worker process holds (its pjsua2 build: 512 here, 4 for the PyPI wheel).
            "calls_per_worker_limit": float(min((w.max_calls for w in workers if w.ready), default=0)),
            "invites_refused_worker": float(sum(w.refused for w in workers)),
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
            # the busiest worker's time reading its streams' statistics in its last second (quality)
            "stats_pass_seconds": max((w.stats_us for w in workers), default=0) / 1e6,
            "front_invites": float(self.front.counts["invites"] if self.front else 0),
            "front_rejected": float(self.front.counts["rejected"] if self.front else 0),
            "front_malformed": float(self.front.counts["malformed"] if self.front else 0),
            "front_forwarded": float(self.front.counts["forwarded"] if self.front else 0),
            "front_relayed": float(self.front.counts["relayed"] if self.front else 0),
            "front_rate_limited": float(self.front.counts["rate_limited"] if self.front else 0),
            "front_refusal_logs_dropped": float(self.front.counts["refusal_logs_dropped"] if self.front else 0),
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


def _log_refusal(msg: SipMessage, status: int, reason: str, cid: str | None, worker: int | None = None) -> None:
    """One JSON log line per refused INVITE: the conversation (when known), the answer, why."""
    log.warning(
        "sip: INVITE refused %d: %s",
        status,
        reason,
        extra={"conversation": cid, "status": status, "reason": reason, "worker": worker, "call_id": msg.call_id},
    )


def _log_attribution(info: InviteInfo, worker: int) -> None:
    """One JSON log line per leg of an answered call: which stream, which participant, why."""
    for a in info.attribution:
        log.info(
            "sip: stream %d (label %r) is the %s leg: %s",
            a.index,
            a.label,
            a.leg,
            a.reason,
            extra={
                "conversation": info.conversation,
                "leg": a.leg,
                "reason": a.reason,
                "worker": worker,
                "participant": a.participant,
                "identified_by": info.identified_by,
            },
        )
