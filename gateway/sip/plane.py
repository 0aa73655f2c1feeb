"""The SIP plane's facade for the rest of the gateway (main process; never imports pjsua2).

:class:`SipPlane` owns

* the SIP front (:class:`~gateway.sip.front.SipFront`) on ``settings.sip_host:sip_port``, which
  redirects each ingress INVITE (302) to a worker with room, keeping every leg of one
  conversation on the same worker so its conference bridge can mix them;
* ``settings.sip_workers`` pjsua2 worker processes (:mod:`gateway.sip.worker`), supervised:
  a worker that dies is restarted and its calls are reported ended with ``media_failure``;
* the taps: LegFrames arriving from workers over unix datagram sockets, fanned out to
  :class:`Tap` objects (bounded, drop-oldest).

Slot accounting (pjsua2 holds at most 4 calls per process): a conversation placed on a worker
reserves its whole footprint at once: its ingress calls (2 in per-leg mode, 1 for SIPREC)
plus one call for a supervisor phone, so that a second leg or a later phone monitor never
finds its worker full.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import PROJECT_DIR, Settings
from ..errors import ErrorCode, GatewayError
from ..media.frames import LegFrame, decode_leg_frame
from .front import SipFront
from .message import InviteInfo, SipMessage, SipParseError, classify_invite, parse_message, uri_user, valid_sip_uri

log = logging.getLogger("gateway.sip.plane")

#: Seconds a 302 reservation waits for the redirected INVITE at the worker.
RESERVATION_SECONDS = 8.0
#: Reserve a supervisor-phone call in every conversation's footprint.
RESERVE_PHONE_SLOT = True
_RTP_PORTS_PER_WORKER = 40
_READY_TIMEOUT = 15.0
_CMD_TIMEOUT = 5.0
#: An ingress call that receives no RTP for this long is hung up (reason ``media_timeout``).
MEDIA_TIMEOUT_SECONDS = 20.0
#: A supervisor phone that does not answer within this long is ``phone_unreachable``.
RING_TIMEOUT_SECONDS = 30.0
#: A ready worker that sends nothing (it reports stats every second) for this long is killed.
HUNG_SECONDS = 6.0


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


# --- taps ------------------------------------------------------------------------------------


class Tap:
    """A bounded, drop-oldest stream of one conversation's :class:`LegFrame` (a ``LegTap``)."""

    def __init__(self, plane: SipPlane, cid: str, maxsize: int) -> None:
        self.plane = plane
        self.conversation = cid
        self.frames: collections.deque[LegFrame] = collections.deque(maxlen=max(1, maxsize))
        self.dropped = 0
        self.received = 0
        self.closed = False
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None

    def _put(self, frame: LegFrame) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped += 1
            self.plane._tap_drops += 1
        self.frames.append(frame)
        self.received += 1
        self._wake()

    def _finish(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def next_frame(self) -> LegFrame:
        """Wait for the next frame; raises ``EOFError`` once the legs are gone (or closed)."""
        while True:
            if self.frames:
                return self.frames.popleft()
            if self.eof or self.closed:
                raise EOFError(self.conversation)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Stop receiving; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.frames.clear()
        self._wake()
        self.plane._tap_closed(self)


# --- bookkeeping -----------------------------------------------------------------------------


@dataclass
class _Call:
    key: int
    cid: str
    streams: list[str | None]
    token: str


@dataclass
class _Conv:
    cid: str
    worker: int
    footprint: int
    kind: str
    legs: dict[str, int] = field(default_factory=dict)  # connected leg → worker call key
    tokens: set[str] = field(default_factory=set)  # pending 302 reservations
    expected: set[str] = field(default_factory=set)  # legs announced but not yet connected
    phone: str | None = None  # monitor id
    had_legs: bool = False


@dataclass
class _Reservation:
    token: str
    cid: str
    worker: int
    legs: set[str]
    expires: float


class _FrameProtocol(asyncio.DatagramProtocol):
    def __init__(self, plane: SipPlane) -> None:
        self.plane = plane

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.plane._frame_in(data)


class _Worker:
    def __init__(self, index: int, sip_port: int, rtp_port: int) -> None:
        self.index = index
        self.sip_port = sip_port
        self.rtp_port = rtp_port
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frame_transport: asyncio.DatagramTransport | None = None
        self.ready = False
        self.ready_event = asyncio.Event()
        self.pid = 0
        self.calls: dict[int, _Call] = {}
        self.phones: set[str] = set()
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_re = 1
        self.frames = 0
        self.drops = 0
        self.restarts = 0
        self.task: asyncio.Task[None] | None = None
        self.last_error = ""
        self.last_seen = 0.0
        self.hung_kills = 0


class SipPlane:
    """Facade of the SIP plane; every method runs on the asyncio loop thread."""

    def __init__(self, settings: Settings, hooks: SipHooks) -> None:
        self.settings = settings
        self.hooks = hooks
        self.capacity = max(1, min(4, settings.calls_per_worker))
        base = settings.sip_worker_base_port or settings.sip_port + 1
        self.workers = [
            _Worker(i, base + i, settings.rtp_port_base + i * _RTP_PORTS_PER_WORKER)
            for i in range(max(1, settings.sip_workers))
        ]
        self.front: SipFront | None = None
        self._front_transport: asyncio.DatagramTransport | None = None
        self.convs: dict[str, _Conv] = {}
        self.reservations: dict[str, _Reservation] = {}
        self.phones: dict[str, str] = {}  # monitor id → cid
        self.taps: dict[str, set[Tap]] = {}
        self.draining = False
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None
        self._tap_drops = 0
        self._frames_in = 0
        self._started = False

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind the SIP front (raises ``OSError`` if the port is taken), spawn the workers."""
        loop = asyncio.get_running_loop()
        self.front = SipFront(self._decide_invite, self._options_ok)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.front,
            local_addr=(self.settings.sip_host, self.settings.sip_port),  # type: ignore[return-value]
        )
        self._front_transport = transport  # type: ignore[assignment]
        self._started = True
        for w in self.workers:
            w.task = asyncio.create_task(self._supervise(w), name=f"sip-worker-{w.index}")
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready_event.wait() for w in self.workers)),
                max(_READY_TIMEOUT, 0.2 * len(self.workers)),
            )
        except TimeoutError:
            errors = "; ".join(f"worker {w.index}: {w.last_error or 'not ready'}" for w in self.workers if not w.ready)
            await self.stop()
            raise RuntimeError(f"SIP workers did not start: {errors}") from None
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
        for w in self.workers:
            if w.ready:
                self._send(w, {"op": "quit"})
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 3.0)
                except TimeoutError:
                    w.proc.kill()
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
                try:
                    await w.task
                except (asyncio.CancelledError, Exception):
                    pass
        for taps in list(self.taps.values()):
            for t in list(taps):
                t._finish()
        self.taps.clear()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining

    @property
    def ready(self) -> bool:
        """All workers up."""
        return self._started and not self.stopping and all(w.ready for w in self.workers)

    # --- supervision -----------------------------------------------------------------------
    async def _supervise(self, w: _Worker) -> None:
        backoff = 0.2
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._run_worker(w)
            except asyncio.CancelledError:
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.kill()
                raise
            except Exception as exc:
                w.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("sip worker %d failed", w.index)
            self._worker_died(w)
            if self.stopping:
                return
            w.restarts += 1
            backoff = 0.2 if time.monotonic() - started > 30 else min(backoff * 2, 5.0)
            log.warning("sip worker %d exited; restarting in %.1fs", w.index, backoff)
            await asyncio.sleep(backoff)

    async def _run_worker(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        frm_parent, frm_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        frm_parent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s = self.settings
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.sip.worker",
                "--ctl-fd", str(ctl_child.fileno()), "--frame-fd", str(frm_child.fileno()),
                "--host", s.sip_host, "--sip-port", str(w.sip_port),
                "--media-host", s.media_host, "--rtp-port", str(w.rtp_port),
                "--rtp-range", str(_RTP_PORTS_PER_WORKER), "--max-calls", str(self.capacity),
                "--media-timeout", str(MEDIA_TIMEOUT_SECONDS), "--ring-timeout", str(RING_TIMEOUT_SECONDS),
                pass_fds=(ctl_child.fileno(), frm_child.fileno()), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                # Own session: a terminal's Ctrl-C reaches the gateway, which stops workers in order.
                # If the gateway itself dies, workers see EOF on the control socket and exit.
                start_new_session=True,
            )  # fmt: skip
        finally:
            ctl_child.close()
            frm_child.close()
        w.pid = w.proc.pid
        w.last_seen = time.monotonic()
        log_task = asyncio.create_task(self._worker_log(w, w.proc.stdout))  # type: ignore[arg-type]
        reader, writer = await asyncio.open_unix_connection(sock=ctl_parent, limit=1 << 20)
        w.writer = writer
        ft, _ = await loop.create_datagram_endpoint(lambda: _FrameProtocol(self), sock=frm_parent)
        w.frame_transport = ft  # type: ignore[assignment]
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, OSError):
                    break  # a worker exiting with unread input resets the socket: same as EOF
                if not line:
                    break
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                try:
                    self._event(w, ev)
                except Exception:
                    log.exception("sip worker %d: bad event %r", w.index, ev.get("ev"))
        finally:
            writer.close()
            ft.close()
            log_task.cancel()
            if w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 2.0)
                except TimeoutError:
                    w.proc.kill()
                    await w.proc.wait()

    async def _worker_log(self, w: _Worker, stream: asyncio.StreamReader) -> None:
        """pjsua logs (errors only after start-up) go to our logger, not to a terminal."""
        while True:
            line = await stream.readline()
            if not line:
                return
            log.debug("sip worker %d: %s", w.index, line.decode(errors="replace").rstrip())

    def _worker_died(self, w: _Worker) -> None:
        was_ready, w.ready = w.ready, False
        w.ready_event = asyncio.Event() if was_ready else w.ready_event
        w.writer = None
        for fut in w.replies.values():
            if not fut.done():
                fut.set_exception(GatewayError(ErrorCode.MEDIA_FAILURE, "SIP media worker died"))
        w.replies.clear()
        if self.stopping:
            reason_leg, reason_phone = "shutdown", "shutdown"
        else:
            reason_leg, reason_phone = "media_failure", "media_failure"
        calls, w.calls = w.calls, {}
        for mid in list(w.phones):
            self.phones.pop(mid, None)
            self._safe(self.hooks.on_phone_ended, mid, reason_phone)
        w.phones.clear()
        for cid, conv in list(self.convs.items()):
            if conv.worker != w.index:
                continue
            for leg in list(conv.legs):
                self._safe(self.hooks.on_leg_ended, cid, leg, reason_leg)
            conv.legs.clear()
            for tok in conv.tokens:
                self.reservations.pop(tok, None)
            del self.convs[cid]
            self._finish_taps(cid)
        del calls

    # --- worker events ---------------------------------------------------------------------
    def _event(self, w: _Worker, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        w.last_seen = time.monotonic()
        if kind == "ready":
            w.ready = True
            w.last_error = ""
            w.ready_event.set()
            log.info("sip worker %d ready (pid %s, port %s)", w.index, ev.get("pid"), ev.get("sip_port"))
        elif kind == "fatal":
            w.last_error = str(ev.get("error"))
            log.error("sip worker %d fatal: %s", w.index, w.last_error)
        elif kind == "reply":
            fut = w.replies.pop(int(ev.get("re", 0)), None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
        elif kind == "incoming":
            self._incoming(w, int(ev["call"]), str(ev.get("msg", "")))
        elif kind == "leg_up":
            call = w.calls.get(int(ev["call"]))
            conv = self.convs.get(str(ev.get("cid")))
            leg = str(ev.get("leg"))
            if call is None or conv is None or leg in conv.legs:
                return
            conv.legs[leg] = call.key
            conv.expected.discard(leg)
            conv.had_legs = True
            self._safe(self.hooks.on_leg_started, conv.cid, leg)
            if self.taps.get(conv.cid):
                self._send(w, {"op": "tap", "cid": conv.cid, "on": True})
        elif kind == "call_ended":
            call = w.calls.pop(int(ev["call"]), None)
            if call is None:
                return
            conv = self.convs.get(call.cid)
            if conv is None:
                return
            for leg in call.streams:
                if leg and conv.legs.get(leg) == call.key:
                    del conv.legs[leg]
                    self._safe(self.hooks.on_leg_ended, conv.cid, leg, str(ev.get("reason", "bye")))
                if leg:
                    conv.expected.discard(leg)
            if not conv.legs and conv.had_legs:
                self._finish_taps(conv.cid)
            self._maybe_release(conv)
        elif kind == "phone_state":
            mid = str(ev.get("mid"))
            if ev.get("state") != "ended":
                return
            w.phones.discard(mid)
            cid = self.phones.pop(mid, None)
            conv = self.convs.get(cid or "")
            if conv is not None and conv.phone == mid:
                conv.phone = None
                self._maybe_release(conv)
            reason = str(ev.get("reason", "left"))
            if reason != "hung_up" and cid is not None:  # our own hang_up_phone is not reported
                self._safe(self.hooks.on_phone_ended, mid, reason)
        elif kind == "stats":
            w.frames = int(ev.get("frames", 0))
            w.drops = int(ev.get("drops", 0))

    def _incoming(self, w: _Worker, key: int, raw: str) -> None:
        """A redirected INVITE reached worker ``w``: check its reservation, answer or reject."""
        try:
            msg = parse_message(raw.encode())
            token = uri_user(msg.uri or "")
            res = self.reservations.get(token)
            if res is None or res.worker != w.index or res.expires < time.monotonic():
                raise SipParseError("no reservation for this call", 403)
            info = classify_invite(msg, self.hooks.conversation_agent)
            if info.conversation != res.cid or {s for s in info.streams if s} != res.legs:
                raise SipParseError("INVITE differs from the one redirected", 403)
        except SipParseError as exc:
            self._send(w, {"op": "reject", "call": key, "code": exc.status})
            return
        del self.reservations[token]
        conv = self.convs.get(res.cid)
        if conv is None:
            self._send(w, {"op": "reject", "call": key, "code": 403})
            return
        conv.tokens.discard(token)
        w.calls[key] = _Call(key, res.cid, info.streams, token)
        self._send(w, {"op": "answer", "call": key, "cid": res.cid, "legs": info.streams})

    # --- the front's decisions ---------------------------------------------------------------
    def _options_ok(self) -> bool:
        """OPTIONS answer: 200 only if ready, not draining and a new conversation would fit."""
        if not self.ready or self.draining or self._safe(self.hooks.accepting) is False:
            return False
        smallest = min(self.capacity, 1 + (1 if RESERVE_PHONE_SLOT else 0))
        return any(self._free(w) >= smallest for w in self.workers)

    def _free(self, w: _Worker) -> int:
        """Calls worker ``w`` can still take (footprints of its conversations, plus phones that
        were not part of a footprint)."""
        extra_phone = 0 if RESERVE_PHONE_SLOT else 1
        used = sum(c.footprint + (extra_phone if c.phone else 0) for c in self.convs.values() if c.worker == w.index)
        return self.capacity - used

    def _decide_invite(self, msg: SipMessage) -> tuple[int, str | None, list[tuple[str, str]]]:
        busy = [("Retry-After", "5")]
        if self.draining or self.stopping or self._safe(self.hooks.accepting) is False:
            return 503, "Draining", busy
        info: InviteInfo = classify_invite(msg, self.hooks.conversation_agent)
        wanted = {s for s in info.streams if s}
        conv = self.convs.get(info.conversation)
        if conv is not None:
            if conv.kind != info.kind or (wanted & (set(conv.legs) | conv.expected)):
                return 486, "Leg Already Connected", []
            w = self.workers[conv.worker]
            if not w.ready:
                return 503, "Worker Restarting", busy
        else:
            footprint = (1 if info.kind == "siprec" else 2) + (1 if RESERVE_PHONE_SLOT else 0)
            footprint = min(footprint, self.capacity)
            fits = [w for w in self.workers if w.ready and self._free(w) >= footprint]
            if not fits:
                return 503, "No Capacity", busy
            w = min(fits, key=self._free)  # best fit: keep workers full, idle ones idle
            conv = self.convs[info.conversation] = _Conv(info.conversation, w.index, footprint, info.kind)
        token = "t" + secrets.token_hex(8)
        self.reservations[token] = _Reservation(
            token, info.conversation, w.index, wanted, time.monotonic() + RESERVATION_SECONDS
        )
        conv.tokens.add(token)
        conv.expected |= wanted
        contact = f"<sip:{token}@{self.settings.sip_host}:{w.sip_port}>"
        return 302, None, [("Contact", contact)]

    def _maybe_release(self, conv: _Conv) -> None:
        busy_calls = any(c.cid == conv.cid for c in self.workers[conv.worker].calls.values())
        if not conv.legs and not conv.tokens and conv.phone is None and not busy_calls:
            self.convs.pop(conv.cid, None)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for w in self.workers:
                # A worker emits stats every second; one silent for long is stuck in C: kill it,
                # supervision restarts it and reports its calls as media_failure.
                if w.ready and w.proc is not None and w.proc.returncode is None and now - w.last_seen > HUNG_SECONDS:
                    log.error("sip worker %d silent for %.0fs: killing it", w.index, now - w.last_seen)
                    w.hung_kills += 1
                    w.last_seen = now
                    w.proc.kill()
            for tok, res in list(self.reservations.items()):
                if res.expires < now:
                    del self.reservations[tok]
                    conv = self.convs.get(res.cid)
                    if conv is not None:
                        conv.tokens.discard(tok)
                        conv.expected -= res.legs
                        self._maybe_release(conv)

    # --- commands to workers -----------------------------------------------------------------
    def _send(self, w: _Worker, cmd: dict[str, Any]) -> None:
        if w.writer is None:
            return
        try:
            w.writer.write((json.dumps(cmd, separators=(",", ":")) + "\n").encode())
        except (ConnectionError, RuntimeError):
            pass

    async def _request(self, w: _Worker, cmd: dict[str, Any]) -> dict[str, Any]:
        if w.writer is None or not w.ready:
            raise GatewayError(ErrorCode.MEDIA_FAILURE, "SIP media worker not ready")
        re_ = w.next_re
        w.next_re += 1
        cmd["re"] = re_
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        w.replies[re_] = fut
        self._send(w, cmd)
        try:
            return await asyncio.wait_for(fut, _CMD_TIMEOUT)
        finally:
            w.replies.pop(re_, None)

    # --- public API ----------------------------------------------------------------------------
    def legs(self, cid: str) -> set[str]:
        """Legs of ``cid`` currently connected (media up)."""
        conv = self.convs.get(cid)
        return set(conv.legs) if conv is not None else set()

    async def call_phone(self, cid: str, monitor_id: str, uri: str) -> None:
        """Call the supervisor's SIP phone with ``a=sendonly`` and send it the mix of both legs.

        Returns once the INVITE is sent (ringing is not awaited); the outcome arrives through
        ``hooks.on_phone_ended`` (``phone_unreachable`` if it never answers).
        """
        if not valid_sip_uri(uri):
            raise GatewayError(ErrorCode.INVALID_SIP_URI, f"not a SIP URI: {uri[:80]!r}")
        conv = self.convs.get(cid)
        if conv is None or not conv.legs:
            raise GatewayError(ErrorCode.VOICE_NOT_ACTIVE, "no voice legs are connected for this conversation")
        if conv.phone is not None:
            raise GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "a phone already listens to this conversation")
        if monitor_id in self.phones:
            raise GatewayError(ErrorCode.VOICE_MONITOR_BUSY, "this monitor already has a phone call")
        w = self.workers[conv.worker]
        if not RESERVE_PHONE_SLOT and self._free(w) < 1:
            raise GatewayError(ErrorCode.VOICE_CAPACITY, "the media worker of this conversation is full")
        conv.phone = monitor_id
        self.phones[monitor_id] = cid
        w.phones.add(monitor_id)
        try:
            rep = await self._request(w, {"op": "phone", "cid": cid, "mid": monitor_id, "uri": uri})
        except BaseException:
            self._phone_forget(conv, w, monitor_id)
            raise
        if not rep.get("ok"):
            self._phone_forget(conv, w, monitor_id)
            err = str(rep.get("error", ""))
            if "URI" in err.upper():
                raise GatewayError(ErrorCode.INVALID_SIP_URI, f"the phone URI was refused: {err}")
            raise GatewayError(ErrorCode.PHONE_UNREACHABLE, f"calling the phone failed: {err}")

    def _phone_forget(self, conv: _Conv, w: _Worker, mid: str) -> None:
        if conv.phone == mid:
            conv.phone = None
        self.phones.pop(mid, None)
        w.phones.discard(mid)
        self._maybe_release(conv)

    async def hang_up_phone(self, monitor_id: str) -> None:
        """Hang up the supervisor phone of ``monitor_id`` (BYE, or CANCEL while ringing); idempotent.

        ``hooks.on_phone_ended`` is *not* called for a hang-up the gateway asked for.
        """
        cid = self.phones.get(monitor_id)
        if cid is None:
            return
        conv = self.convs.get(cid)
        if conv is None:
            self.phones.pop(monitor_id, None)
            return
        w = self.workers[conv.worker]
        try:
            await self._request(w, {"op": "phone_hangup", "mid": monitor_id})
        except (TimeoutError, GatewayError):
            pass

    def open_tap(self, cid: str, maxsize: int = 50) -> Tap:
        """Start receiving ``cid``'s LegFrames (both legs, unmixed, 20 ms each)."""
        tap = Tap(self, cid, maxsize)
        taps = self.taps.setdefault(cid, set())
        first = not taps
        taps.add(tap)
        conv = self.convs.get(cid)
        if first and conv is not None:
            self._send(self.workers[conv.worker], {"op": "tap", "cid": cid, "on": True})
        return tap

    def _tap_closed(self, tap: Tap) -> None:
        taps = self.taps.get(tap.conversation)
        if taps is None:
            return
        taps.discard(tap)
        if not taps:
            del self.taps[tap.conversation]
            conv = self.convs.get(tap.conversation)
            if conv is not None:
                self._send(self.workers[conv.worker], {"op": "tap", "cid": tap.conversation, "on": False})

    def _finish_taps(self, cid: str) -> None:
        for t in self.taps.pop(cid, set()):
            t._finish()

    def _frame_in(self, data: bytes) -> None:
        self._frames_in += 1
        if len(data) < 12:
            return
        n = data[1]
        try:
            cid = data[10 : 10 + n].decode()
        except UnicodeDecodeError:
            return
        taps = self.taps.get(cid)
        if not taps:
            return
        try:
            frame = decode_leg_frame(data)
        except ValueError:
            return
        for t in taps:
            t._put(frame)

    def stats(self) -> dict[str, float]:
        """Gauges/counters for Prometheus (no per-conversation labels)."""
        return {
            "workers": float(len(self.workers)),
            "workers_ready": float(sum(w.ready for w in self.workers)),
            "worker_restarts": float(sum(w.restarts for w in self.workers)),
            "worker_hung_kills": float(sum(w.hung_kills for w in self.workers)),
            "calls": float(sum(len(w.calls) + len(w.phones) for w in self.workers)),
            "capacity_calls": float(self.capacity * len(self.workers)),
            "conversations": float(len(self.convs)),
            "legs": float(sum(len(c.legs) for c in self.convs.values())),
            "phones": float(len(self.phones)),
            "reservations": float(len(self.reservations)),
            "free_conversation_slots": float(sum(max(0, self._free(w)) for w in self.workers if w.ready)),
            "taps": float(sum(len(t) for t in self.taps.values())),
            "frames_sent": float(sum(w.frames for w in self.workers)),
            "frames_received": float(self._frames_in),
            "frames_dropped_worker": float(sum(w.drops for w in self.workers)),
            "frames_dropped_tap": float(self._tap_drops),
            "front_invites": float(self.front.counts["invites"] if self.front else 0),
            "front_rejected": float(self.front.counts["rejected"] if self.front else 0),
            "front_malformed": float(self.front.counts["malformed"] if self.front else 0),
        }

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (tests and operators)."""
        return [w.pid for w in self.workers]

    def worker_of(self, cid: str) -> int | None:
        conv = self.convs.get(cid)
        return conv.worker if conv is not None else None

    @staticmethod
    def _safe(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:
            log.exception("sip hook %s failed", getattr(fn, "__name__", fn))
            return None
