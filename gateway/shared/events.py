"""Domain events and chat entries fanned out to every instance, so ``/v1/events`` on any
instance sees every change its caller may see, each instance's planes react to monitors that
end elsewhere, and a chat stream on one instance is woken by an entry stored on another.

Each local event goes out through the instance's ordered writer (after the store writes that
caused it, in the same MULTI/EXEC) on Redis pub/sub; the others deliver it to their bus marked
``remote``. Pub/sub is at most once: an instance whose connection drops misses what was
published meanwhile, is ``state_unavailable`` until it has reloaded the state, and consoles
re-read the listing when they reconnect.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

from gateway.chat.hub import ChatHub
from gateway.chat.log import ChatEntry
from gateway.domain import DomainEvent, EventType
from gateway.events import EventBus
from gateway.shared.connection import SharedState


class EventFanout:
    CHANNEL = "events"

    def __init__(self, shared: SharedState, bus: EventBus) -> None:
        self._shared = shared
        self._bus = bus
        shared.on_message(self.CHANNEL, self._deliver)
        bus.forward = self._send

    def _send(self, event: DomainEvent) -> None:
        # Levels too (ten a second per listener): the listener is served by the instance holding
        # the media, its supervisor's console may be connected to another one.
        message = {
            "type": event.type.value,
            "conversation": event.conversation,
            "team": event.team,
            "payload": event.payload,
            "at": event.at,
        }

        def write(pipe: Any) -> None:
            self._shared.publish_on(pipe, self.CHANNEL, message)

        self._shared.enqueue(write)

    def _deliver(self, message: dict[str, Any]) -> None:
        event = DomainEvent(
            EventType(message["type"]),
            message["conversation"],
            message["team"],
            message["payload"],
            at=float(message["at"]),
            remote=True,
        )
        self._bus.deliver_remote(event)


class ChatFanout:
    """Each entry this instance stored goes to the other instances' chat hubs (the log has
    it already: this only wakes their streams, which read what they miss from the log)."""

    CHANNEL = "chat"

    def __init__(self, shared: SharedState, hub: ChatHub) -> None:
        self._shared = shared
        self._hub = hub
        shared.on_message(self.CHANNEL, self._deliver)
        hub.forward = self._send

    def _send(self, entry: ChatEntry) -> None:
        message = {"entry": astuple(entry)}

        def write(pipe: Any) -> None:
            self._shared.publish_on(pipe, self.CHANNEL, message)

        self._shared.enqueue(write)

    def _deliver(self, message: dict[str, Any]) -> None:
        self._hub.deliver(ChatEntry(*message["entry"]))
