"""Slot and reservation accounting of the SIP plane: which worker holds which conversation.

Pure bookkeeping (no asyncio, no sockets, no pjsua2; the caller passes the clock), so every
rule here has a fast unit test (``tests/test_sip_placement.py``).

Each worker holds as many calls as it reported when it became ready (its pjsua2 build's limit:
hundreds for the project's own build, 4 for the PyPI wheel). A conversation is placed on one
worker, all its legs and its supervisor phone included, so that the worker's conference bridge
can mix them. It reserves its whole **footprint** when its first INVITE arrives: its ingress
calls (2 per-leg, 1 SIPREC) plus one call for a supervisor phone (``reserve_phone_slot``), so a
second leg or a later phone never finds its worker full. New conversations go to the least
loaded worker, so that load (CPU, sockets, the blast radius of a crash) spreads over every
worker instead of filling the first. Each redirect is a **reservation** (a one-time token) that
expires if the redirected INVITE does not arrive; a conversation's slots return when it has no
leg, no phone, no call and no pending reservation.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from enum import Enum


class Refusal(Enum):
    """Why a new INVITE gets no reservation (the plane maps each to a SIP answer)."""

    LEG_TAKEN = "leg already connected or on its way, or the other ingress style"
    WORKER_RESTARTING = "the conversation's worker is restarting"
    NO_CAPACITY = "no worker has room"


@dataclass
class Conversation:
    """One conversation placed on a worker."""

    cid: str
    worker: int
    footprint: int
    kind: str  # 'leg' or 'siprec': fixed by the first INVITE
    legs: dict[str, int] = field(default_factory=dict)  # connected leg → worker call key
    codecs: dict[str, str] = field(default_factory=dict)  # connected leg → its codec (worker's LegUp)
    calls: dict[int, list[str | None]] = field(default_factory=dict)  # answered call key → its streams' legs
    tokens: set[str] = field(default_factory=set)  # pending 302 reservations
    expected: set[str] = field(default_factory=set)  # legs redirected but not yet connected
    phone: str | None = None  # monitor id of the supervisor phone
    had_legs: bool = False

    @property
    def idle(self) -> bool:
        return not self.legs and not self.tokens and self.phone is None and not self.calls


@dataclass(frozen=True)
class Reservation:
    token: str
    cid: str
    worker: int
    legs: frozenset[str]
    expires: float


def _random_token(worker: int) -> str:
    return "t" + secrets.token_hex(8)


class Placement:
    """Conversations, reservations and phones of ``workers`` workers of ``capacity`` calls each
    (until :meth:`set_capacity` says otherwise for one). ``mint(worker)`` makes the one-time
    token of a reservation on ``worker``."""

    def __init__(
        self,
        workers: int,
        capacity: int,
        *,
        reserve_phone_slot: bool = True,
        reservation_seconds: float = 8.0,
        mint: Callable[[int], str] = _random_token,
    ) -> None:
        self.workers = workers
        self.capacities = [capacity] * workers
        self.mint = mint
        self.reserve_phone_slot = reserve_phone_slot
        self.reservation_seconds = reservation_seconds
        self.conversations: dict[str, Conversation] = {}
        self.reservations: dict[str, Reservation] = {}
        self.phones: dict[str, str] = {}  # monitor id → cid

    # --- capacity --------------------------------------------------------------------------
    def set_capacity(self, worker: int, calls: int) -> None:
        """``worker`` holds ``calls`` calls (what it reported when it became ready)."""
        self.capacities[worker] = max(0, calls)

    def footprint(self, kind: str, worker: int | None = None) -> int:
        """Calls a new conversation of ``kind`` reserves (never more than ``worker`` holds)."""
        ingress = 1 if kind == "siprec" else 2
        wanted = ingress + (1 if self.reserve_phone_slot else 0)
        return wanted if worker is None else min(wanted, self.capacities[worker])

    def free(self, worker: int) -> int:
        """Calls ``worker`` can still take: footprints, plus phones that were not part of one."""
        extra_phone = 0 if self.reserve_phone_slot else 1
        used = sum(
            c.footprint + (extra_phone if c.phone else 0) for c in self.conversations.values() if c.worker == worker
        )
        return self.capacities[worker] - used

    def fits_new(self) -> bool:
        """Could some worker take the smallest new conversation (the OPTIONS answer)?"""
        return any(self.capacities[w] and self.free(w) >= self.footprint("siprec", w) for w in range(self.workers))

    def phone_fits(self, cid: str) -> bool:
        """Room for a supervisor phone on ``cid``'s worker (always, when footprints include it)."""
        conv = self.conversations.get(cid)
        return conv is not None and (self.reserve_phone_slot or self.free(conv.worker) >= 1)

    # --- reservations ----------------------------------------------------------------------
    def reserve(self, cid: str, kind: str, legs: set[str], ready: Container[int], now: float) -> Reservation | Refusal:
        """A token for ``legs`` of ``cid``: on the conversation's worker, or on the least loaded one."""
        conv = self.conversations.get(cid)
        if conv is not None:
            if conv.kind != kind or legs & (set(conv.legs) | conv.expected):
                return Refusal.LEG_TAKEN
            if conv.worker not in ready:
                return Refusal.WORKER_RESTARTING
        else:
            fits = [
                w
                for w in range(self.workers)
                if w in ready and self.capacities[w] and self.free(w) >= self.footprint(kind, w)
            ]
            if not fits:
                return Refusal.NO_CAPACITY
            # Least loaded (by share of its calls in use, lowest index on a tie): every worker
            # gets its part of the load instead of the first filling up.
            worker = min(fits, key=lambda w: (1 - self.free(w) / self.capacities[w], w))
            conv = self.conversations[cid] = Conversation(cid, worker, self.footprint(kind, worker), kind)
        res = Reservation(self.mint(conv.worker), cid, conv.worker, frozenset(legs), now + self.reservation_seconds)
        self.reservations[res.token] = res
        conv.tokens.add(res.token)
        conv.expected |= legs
        return res

    def reservation(self, token: str, worker: int, now: float) -> Reservation | None:
        """The live reservation ``token`` if it was made for ``worker``."""
        res = self.reservations.get(token)
        if res is None or res.worker != worker or res.expires < now:
            return None
        return res

    def admit(self, res: Reservation, call: int, streams: list[str | None]) -> Conversation | None:
        """The redirected INVITE arrived as worker call ``call``: the reservation becomes a call."""
        self.reservations.pop(res.token, None)
        conv = self.conversations.get(res.cid)
        if conv is None:
            return None
        conv.tokens.discard(res.token)
        conv.calls[call] = streams
        return conv

    def expire(self, now: float) -> None:
        """Drop reservations whose INVITE never came, releasing what they held."""
        for token, res in list(self.reservations.items()):
            if res.expires < now:
                del self.reservations[token]
                conv = self.conversations.get(res.cid)
                if conv is not None:
                    conv.tokens.discard(token)
                    conv.expected -= res.legs
                    self.release_if_idle(conv)

    # --- calls and legs --------------------------------------------------------------------
    def leg_up(self, worker: int, call: int, cid: str, leg: str, codec: str = "") -> Conversation | None:
        """Leg ``leg`` of ``cid`` has media on ``call``; the conversation if this is news."""
        conv = self.conversations.get(cid)
        if conv is None or conv.worker != worker or call not in conv.calls:
            return None
        if leg in conv.legs:
            if conv.legs[leg] == call and codec:
                conv.codecs[leg] = codec  # a re-INVITE changed the leg's codec: not news otherwise
            return None
        conv.legs[leg] = call
        conv.codecs[leg] = codec
        conv.expected.discard(leg)
        conv.had_legs = True
        return conv

    def call_of(self, worker: int, call: int) -> Conversation | None:
        return next(
            (c for c in self.conversations.values() if c.worker == worker and call in c.calls),
            None,
        )

    def call_ended(self, worker: int, call: int) -> tuple[Conversation, list[str]] | None:
        """Forget ``call``; its conversation and the legs that ended with it (release is the caller's,
        after it has told the domain)."""
        conv = self.call_of(worker, call)
        if conv is None:
            return None
        ended = []
        for leg in conv.calls.pop(call):
            if leg and conv.legs.get(leg) == call:
                del conv.legs[leg]
                conv.codecs.pop(leg, None)
                ended.append(leg)
            if leg:
                conv.expected.discard(leg)
        return conv, ended

    def release_if_idle(self, conv: Conversation) -> None:
        if conv.idle:
            self.conversations.pop(conv.cid, None)

    # --- phones ----------------------------------------------------------------------------
    def add_phone(self, cid: str, mid: str) -> None:
        self.conversations[cid].phone = mid
        self.phones[mid] = cid

    def phone_gone(self, mid: str) -> str | None:
        """Forget monitor ``mid``'s phone; the conversation it listened to, if known."""
        cid = self.phones.pop(mid, None)
        conv = self.conversations.get(cid or "")
        if conv is not None and conv.phone == mid:
            conv.phone = None
            self.release_if_idle(conv)
        return cid

    # --- a worker died ---------------------------------------------------------------------
    def drop_worker(self, worker: int) -> list[Conversation]:
        """Forget everything ``worker`` held (it died); the conversations it held, for the caller
        to report their legs and phones ended."""
        dropped = [c for c in self.conversations.values() if c.worker == worker]
        for conv in dropped:
            for token in conv.tokens:
                self.reservations.pop(token, None)
            if conv.phone is not None:
                self.phones.pop(conv.phone, None)
            del self.conversations[conv.cid]
        return dropped

    # --- gauges ----------------------------------------------------------------------------
    def calls_on(self, worker: int) -> int:
        """Calls ``worker`` holds: answered ingress calls and phones."""
        return sum(len(c.calls) + (c.phone is not None) for c in self.conversations.values() if c.worker == worker)

    @property
    def legs(self) -> int:
        return sum(len(c.legs) for c in self.conversations.values())
