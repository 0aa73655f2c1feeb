"""The gateway's one SIP address: a small stateless-ish asyncio UDP front.

It never carries media and never holds a dialog. It answers OPTIONS, and answers every
ingress INVITE with a final response chosen by the plane: 302 to a worker with room (the
caller re-sends the INVITE there), or 4xx/5xx. Non-2xx final responses to INVITE are
retransmitted (RFC 3261 timer G) until the ACK arrives or timer H (32 s) fires; INVITE
retransmissions get the same answer again and never reserve a second slot.
Malformed datagrams never raise out of :meth:`datagram_received`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from .message import MAX_MESSAGE_BYTES, SipMessage, SipParseError, build_response, parse_message

log = logging.getLogger("gateway.sip.front")

#: decide(msg) → (status, reason, extra headers). Called for each new INVITE transaction.
Decider = Callable[[SipMessage], "tuple[int, str | None, list[tuple[str, str]]]"]

_T1 = 0.5
_T2 = 4.0
_TIMER_H = 32.0
_ALLOW = "INVITE, ACK, CANCEL, OPTIONS, BYE"


class SipFront(asyncio.DatagramProtocol):
    def __init__(self, decide: Decider, options_ok: Callable[[], bool]) -> None:
        self.decide = decide
        self.options_ok = options_ok
        self.transport: asyncio.DatagramTransport | None = None
        #: (call-id, branch, method) → (response, expires) for retransmitted requests
        self.answered: dict[tuple[str, str, str], tuple[bytes, float]] = {}
        #: (call-id, branch) → retransmission timer handle, until the ACK arrives
        self.awaiting_ack: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.counts = {"malformed": 0, "invites": 0, "rejected": 0}  # the plane's front_* stats
        self._last_sweep = time.monotonic()

    # --- asyncio hooks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        for h in self.awaiting_ack.values():
            h.cancel()
        self.awaiting_ack.clear()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self._received(data, addr)
        except Exception:
            self.counts["malformed"] += 1
            log.exception("sip front: unexpected error on a datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("sip front: socket error %s", exc)

    # --- handling --------------------------------------------------------------------------
    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        now = time.monotonic()
        if now - self._last_sweep > 5.0:
            self._last_sweep = now
            self.answered = {k: v for k, v in self.answered.items() if v[1] > now}
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            msg = parse_message(data)
        except SipParseError:
            self.counts["malformed"] += 1
            return  # nothing to route an answer with
        if not msg.is_request:
            return
        method = msg.method or ""
        key = (msg.call_id, msg.branch, "INVITE" if method in ("INVITE", "ACK") else method)
        if method == "ACK":
            handle = self.awaiting_ack.pop((msg.call_id, msg.branch), None)
            if handle is None:  # some UAs put a new branch on the ACK: match the Call-ID
                for k in [k for k in self.awaiting_ack if k[0] == msg.call_id]:
                    self.awaiting_ack.pop(k).cancel()
            else:
                handle.cancel()
            return
        cached = self.answered.get(key)
        if cached is not None:
            self._send(cached[0], addr)
            return
        if len(data) > MAX_MESSAGE_BYTES:
            self._final(msg, addr, 413, None, [])
            return
        if msg.defect:
            self.counts["malformed"] += 1
            self._final(msg, addr, 400, msg.defect, [])
            return
        if method == "OPTIONS":
            ok = self.options_ok()
            extra = [("Allow", _ALLOW), ("Accept", "application/sdp, multipart/mixed")]
            if not ok:
                extra.append(("Retry-After", "5"))
            self._final(msg, addr, 200 if ok else 503, None, extra)
        elif method == "INVITE":
            self.counts["invites"] += 1
            try:
                status, reason, extra = self.decide(msg)
            except SipParseError as exc:
                status, reason, extra = exc.status, str(exc), []
            except Exception:
                log.exception("sip front: decide failed")
                status, reason, extra = 500, None, []
            if status != 302:
                self.counts["rejected"] += 1
            self._final(msg, addr, status, reason, extra)
        elif method == "CANCEL":
            self._final(msg, addr, 200, None, [])  # the INVITE was already answered
        elif method == "BYE":
            self._final(msg, addr, 481, None, [])
        else:
            self._final(msg, addr, 405, None, [("Allow", _ALLOW)])

    def _final(
        self, msg: SipMessage, addr: tuple[str, int], status: int, reason: str | None, extra: list[tuple[str, str]]
    ) -> None:
        data = build_response(msg, status, reason, extra, to_tag=uuid.uuid4().hex[:10])
        method = msg.method or ""
        self.answered[(msg.call_id, msg.branch, method)] = (data, time.monotonic() + _TIMER_H)
        self._send(data, addr)
        if method == "INVITE" and status >= 300:
            self._retransmit((msg.call_id, msg.branch), data, addr, _T1, time.monotonic() + _TIMER_H)

    def _retransmit(
        self, key: tuple[str, str], data: bytes, addr: tuple[str, int], interval: float, deadline: float
    ) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            if time.monotonic() >= deadline:
                self.awaiting_ack.pop(key, None)
                return
            self._send(data, addr)
            self._retransmit(key, data, addr, min(interval * 2, _T2), deadline)

        self.awaiting_ack[key] = loop.call_later(interval, fire)
