"""Live fan-out of stored chat entries to the streams of a conversation.

The hub is a best-effort accelerator in front of the log: it holds, per subscriber, at most
``cap`` entries that were published but not yet sent (or, once the client has started to
acknowledge, sent but not acknowledged). A subscriber that goes over its cap is *overflowed*:
its buffer is dropped at once (server memory does not grow with a slow reader), it is removed
from the hub, and its ``on_overflow`` callback closes its connection (1013). Nothing is lost:
the client resumes from its last seq and the log replays the rest.

Everything here is synchronous and runs on the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from gateway.chat.log import ChatEntry


class Subscription:
    """One stream's view of the live entries of one conversation."""

    __slots__ = (
        "conversation",
        "cap",
        "queue",
        "inflight",
        "acking",
        "overflowed",
        "end_reason",
        "going_away",
        "_wake",
        "_on_overflow",
        "_hub",
    )

    def __init__(
        self,
        hub: ChatHub,
        conversation: str,
        cap: int,
        wake: Callable[[], None],
        on_overflow: Callable[[], None] | None,
    ) -> None:
        self._hub = hub
        self.conversation = conversation
        self.cap = cap
        self.queue: deque[ChatEntry] = deque()
        #: seqs sent but not acknowledged; only kept once the client has sent an ack.
        self.inflight: deque[int] = deque()
        self.acking = False
        self.overflowed = False
        self.end_reason: str | None = None
        #: the server is shutting down: close (1001) without ``end``, the client resumes later
        self.going_away = False
        self._wake = wake
        self._on_overflow = on_overflow

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.inflight)

    def _push(self, entry: ChatEntry) -> None:
        if self.overflowed:
            return
        self.queue.append(entry)
        if self.pending > self.cap:
            self._overflow()
        else:
            self._wake()

    def _overflow(self) -> None:
        self.overflowed = True
        self.queue.clear()
        self.inflight.clear()
        self._hub._remove(self)
        self._wake()
        if self._on_overflow is not None:
            self._on_overflow()

    def _end(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason
        self._wake()

    def sent(self, seq: int) -> None:
        """The stream wrote the entry ``seq`` to its client."""
        if self.acking and not self.overflowed:
            self.inflight.append(seq)
            if self.pending > self.cap:
                self._overflow()

    def ack(self, seq: int) -> None:
        """The client confirmed every entry up to ``seq``."""
        if not self.acking:
            self.acking = True
            return
        inflight = self.inflight
        while inflight and inflight[0] <= seq:
            inflight.popleft()

    def close(self) -> None:
        """Leave the hub (the stream is done)."""
        self.queue.clear()
        self.inflight.clear()
        self._hub._remove(self)


class ChatHub:
    """Subscribers per conversation; ``publish`` is called right after an entry is stored."""

    def __init__(self, cap: int = 256) -> None:
        self.cap = cap
        self._subs: dict[str, set[Subscription]] = {}
        self.overflows = 0
        #: Sends each stored entry to the other instances' hubs (set when the log is shared,
        #: ``gateway.shared.events``); they hand it to :meth:`deliver`.
        self.forward: Callable[[ChatEntry], None] | None = None

    def subscribe(
        self,
        conversation: str,
        wake: Callable[[], None],
        on_overflow: Callable[[], None] | None = None,
        cap: int | None = None,
    ) -> Subscription:
        sub = Subscription(self, conversation, cap or self.cap, wake, on_overflow)
        self._subs.setdefault(conversation, set()).add(sub)
        return sub

    def publish(self, entry: ChatEntry) -> None:
        """An entry was stored here: to this instance's streams, and to the others'."""
        if self.forward is not None:
            self.forward(entry)
        self.deliver(entry)

    def deliver(self, entry: ChatEntry) -> None:
        """Wake this instance's streams of the entry's conversation (entries from another
        instance may arrive out of order: a stream fills a hole from the log)."""
        subs = self._subs.get(entry.conversation)
        if not subs:
            return
        for sub in list(subs):
            sub._push(entry)

    def end(self, conversation: str, reason: str) -> int:
        """Tell every stream of the conversation that it ended; returns how many."""
        subs = self._subs.pop(conversation, set())
        for sub in subs:
            sub._end(reason)
        return len(subs)

    def go_away(self) -> int:
        """Server shutdown: every stream closes with 1001 and no ``end`` (clients resume)."""
        count = 0
        for subs in self._subs.values():
            for sub in subs:
                sub.going_away = True
                sub._wake()
                count += 1
        self._subs.clear()
        return count

    def _remove(self, sub: Subscription) -> None:
        if sub.overflowed and sub in self._subs.get(sub.conversation, ()):
            self.overflows += 1
        subs = self._subs.get(sub.conversation)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.conversation]

    def subscribers(self, conversation: str | None = None) -> int:
        if conversation is not None:
            return len(self._subs.get(conversation, ()))
        return sum(len(s) for s in self._subs.values())

    def buffered(self) -> int:
        """Entries held for all subscribers right now (what a slow reader could grow)."""
        return sum(sub.pending for subs in self._subs.values() for sub in subs)
