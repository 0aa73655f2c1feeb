"""In-process publish/subscribe of domain events (and, with a shared store, every instance's).

Planes register plain callbacks (run synchronously, in order, on the event loop); websocket
clients of ``/v1/events`` get a bounded queue each, so one slow console never holds up the
gateway: when its queue is full the subscriber is marked lagging and closed by its handler.
With several instances, ``forward`` sends each local event to the others
(``gateway.shared.events``), which hand it to :meth:`EventBus.deliver_remote`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.domain import DomainEvent

log = logging.getLogger(__name__)

Listener = Callable[[DomainEvent], None]


class Subscription:
    """One websocket client's view of the event stream: only the events ``wants`` keeps are
    queued, so a console never pays (nor lags) for other teams' events or others' levels."""

    def __init__(self, maxsize: int, wants: Callable[[DomainEvent], bool]) -> None:
        self.queue: asyncio.Queue[DomainEvent] = asyncio.Queue(maxsize)
        self.lagging = False
        self._wants = wants

    def offer(self, event: DomainEvent) -> None:
        if not self._wants(event):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagging = True


class EventBus:
    def __init__(self, subscriber_queue: int = 1000) -> None:
        self._listeners: list[Listener] = []
        self._subscriptions: set[Subscription] = set()
        self._subscriber_queue = subscriber_queue
        #: Sends a local event to the other instances (set when the state is shared).
        self.forward: Listener | None = None

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe(self, wants: Callable[[DomainEvent], bool]) -> Subscription:
        sub = Subscription(self._subscriber_queue, wants)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, event: DomainEvent) -> None:
        if self.forward is not None:
            self.forward(event)
        self.deliver_remote(event)

    def deliver_remote(self, event: DomainEvent) -> None:
        """Hand an event to the listeners and subscribers (``event.remote``: from another instance)."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a plane's bug must not stop the others from hearing the event
                log.exception("event listener failed", extra={"conversation": event.conversation})
        for sub in self._subscriptions:
            sub.offer(event)
