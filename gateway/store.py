"""Where conversations and monitors live: a small interface and its in-process implementation.

One gateway instance keeps its state in :class:`MemoryStore`. Several instances behind one
platform need a shared store (Redis): that implementation must make :meth:`Store.claim_voice`
atomic across instances (a Lua script or ``SET NX``), which is why voice claiming is a store
operation rather than a read followed by a write in the service.
"""

from __future__ import annotations

from typing import Protocol

from gateway.domain import Conversation, Monitor


class Store(Protocol):
    def get_conversation(self, cid: str) -> Conversation | None: ...
    def put_conversation(self, conversation: Conversation) -> None: ...
    def conversations(self) -> list[Conversation]: ...
    def get_monitor(self, mid: str) -> Monitor | None: ...
    def put_monitor(self, monitor: Monitor) -> None: ...
    def monitors_of(self, cid: str) -> list[Monitor]: ...
    def voice_holder(self, cid: str) -> Monitor | None: ...
    def claim_voice(self, cid: str, monitor: Monitor) -> bool: ...
    def release_voice(self, cid: str, mid: str) -> None: ...
    def forget_conversation(self, cid: str) -> None: ...


class MemoryStore:
    """Dictionaries in one process; every method is synchronous, hence atomic on the event loop."""

    def __init__(self) -> None:
        self._conversations: dict[str, Conversation] = {}
        self._monitors: dict[str, Monitor] = {}
        self._by_conversation: dict[str, list[str]] = {}
        self._voice: dict[str, str] = {}

    def get_conversation(self, cid: str) -> Conversation | None:
        return self._conversations.get(cid)

    def put_conversation(self, conversation: Conversation) -> None:
        self._conversations[conversation.id] = conversation

    def conversations(self) -> list[Conversation]:
        return list(self._conversations.values())

    def get_monitor(self, mid: str) -> Monitor | None:
        return self._monitors.get(mid)

    def put_monitor(self, monitor: Monitor) -> None:
        if monitor.id not in self._monitors:
            self._by_conversation.setdefault(monitor.conversation, []).append(monitor.id)
        self._monitors[monitor.id] = monitor

    def monitors_of(self, cid: str) -> list[Monitor]:
        return [self._monitors[mid] for mid in self._by_conversation.get(cid, [])]

    def voice_holder(self, cid: str) -> Monitor | None:
        mid = self._voice.get(cid)
        return self._monitors.get(mid) if mid else None

    def claim_voice(self, cid: str, monitor: Monitor) -> bool:
        holder = self.voice_holder(cid)
        if holder is not None and holder.active and holder.id != monitor.id:
            return False
        self._voice[cid] = monitor.id
        return True

    def release_voice(self, cid: str, mid: str) -> None:
        if self._voice.get(cid) == mid:
            del self._voice[cid]

    def forget_conversation(self, cid: str) -> None:
        """Drop an ended conversation and its monitors (the audit log keeps the history)."""
        self._conversations.pop(cid, None)
        self._voice.pop(cid, None)
        for mid in self._by_conversation.pop(cid, []):
            self._monitors.pop(mid, None)
