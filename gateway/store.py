"""Where conversations and monitors live: a small interface and its in-process implementation.

One gateway instance keeps its state in :class:`MemoryStore` (tests) or :class:`SqliteStore`
(the embedded default: the same, written through to SQLite so a restart loses nothing).
Several instances share :class:`gateway.shared.store.RedisStore` (``GATEWAY_REDIS_URL``).

Reads and writes are synchronous: the service reads and changes a conversation between two
awaits, and the event loop keeps that together. Only what must be decided across instances is
async: :meth:`Store.claim_voice` (R8, atomic in Redis: a lease) and :meth:`Store.flush` (the API
awaits it before answering, so an answer never gets ahead of the shared state).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from gateway.domain import Conversation, Direction, Monitor, MonitorMode, VoiceKind
from gateway.policy.rules import END_MEDIA_FAILURE

#: Seconds an ended monitor of an ended conversation stays readable.
ENDED_MONITOR_RETENTION = 3600.0


class Store(Protocol):
    def get_conversation(self, cid: str) -> Conversation | None: ...
    def put_conversation(self, conversation: Conversation) -> None: ...
    def conversations(self) -> list[Conversation]: ...
    def conversation_by_recording_key(self, key: str) -> Conversation | None: ...
    def get_monitor(self, mid: str) -> Monitor | None: ...
    def put_monitor(self, monitor: Monitor) -> None: ...
    def monitors_of(self, cid: str) -> list[Monitor]: ...
    def voice_holder(self, cid: str) -> Monitor | None: ...
    async def claim_voice(self, cid: str, monitor: Monitor) -> bool: ...
    def release_voice(self, cid: str, mid: str) -> None: ...
    def forget_conversation(self, cid: str) -> None: ...
    def phone_uri(self, username: str) -> str | None:
        """The SIP URI a supervisor last chose to listen on (``None``: none remembered)."""
        ...

    def put_phone_uri(self, username: str, uri: str | None) -> None:
        """Remember (``None``: forget) a supervisor's phone URI, per username."""
        ...

    async def flush(self) -> None:
        """Wait until every change made so far is where every instance sees it (a shared
        store; in-process stores have nothing to wait for)."""
        ...

    def check_available(self) -> None:
        """Raise 503 ``state_unavailable`` if the store can not answer truthfully now."""
        ...


class MemoryStore:
    """Dictionaries in one process; every method is synchronous, hence atomic on the event loop."""

    def __init__(self) -> None:
        self._conversations: dict[str, Conversation] = {}
        self._monitors: dict[str, Monitor] = {}
        self._by_conversation: dict[str, list[str]] = {}
        self._voice: dict[str, str] = {}
        #: recording key (lower-case) → conversation id; the latest conversation to name a key owns it
        self._recording_keys: dict[str, str] = {}
        #: username → the SIP URI of the phone it listens on (a preference: kept for good)
        self._phones: dict[str, str] = {}

    def get_conversation(self, cid: str) -> Conversation | None:
        return self._conversations.get(cid)

    def put_conversation(self, conversation: Conversation) -> None:
        self._conversations[conversation.id] = conversation
        self._index_recording_keys(conversation.id, conversation.recording_keys)

    def conversations(self) -> list[Conversation]:
        return list(self._conversations.values())

    def conversation_by_recording_key(self, key: str) -> Conversation | None:
        cid = self._recording_keys.get(key.strip().lower())
        return self._conversations.get(cid) if cid is not None else None

    def _index_recording_keys(self, cid: str, keys: list[str]) -> None:
        wanted = {k.strip().lower() for k in keys if k.strip()}
        for key in [k for k, owner in self._recording_keys.items() if owner == cid and k not in wanted]:
            del self._recording_keys[key]
        for key in wanted:
            self._recording_keys[key] = cid

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

    async def claim_voice(self, cid: str, monitor: Monitor) -> bool:
        return self._claim_voice(cid, monitor)

    def _claim_voice(self, cid: str, monitor: Monitor) -> bool:
        holder = self.voice_holder(cid)
        if holder is not None and holder.active and holder.id != monitor.id:
            return False
        self._voice[cid] = monitor.id
        return True

    def release_voice(self, cid: str, mid: str) -> None:
        if self._voice.get(cid) == mid:
            del self._voice[cid]

    def phone_uri(self, username: str) -> str | None:
        return self._phones.get(username)

    def put_phone_uri(self, username: str, uri: str | None) -> None:
        if uri is None:
            self._phones.pop(username, None)
        else:
            self._phones[username] = uri

    async def flush(self) -> None:
        return None

    def check_available(self) -> None:
        return None

    def forget_conversation(self, cid: str) -> None:
        """Drop an ended conversation. Its (ended) monitors stay a while: their supervisors may
        still read them and leave them (R12); the audit log keeps the history for good."""
        self._conversations.pop(cid, None)
        self._index_recording_keys(cid, [])
        self._voice.pop(cid, None)
        self._by_conversation.pop(cid, None)
        horizon = time.time() - ENDED_MONITOR_RETENTION
        for mid in [m.id for m in self._monitors.values() if m.ended_at is not None and m.ended_at < horizon]:
            del self._monitors[mid]


class SqliteStore(MemoryStore):
    """:class:`MemoryStore` written through to SQLite, so a restarted gateway knows its
    conversations and monitors (chat streams resume; browsers re-offer WHEP).

    Reads stay in memory. What cannot survive a restart is dropped on load: SIP legs (the
    platform re-INVITEs) and SIP phone calls (their worker is gone), whose monitors keep chat.
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS monitors (id TEXT PRIMARY KEY, conversation TEXT NOT NULL, data TEXT NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS phones (username TEXT PRIMARY KEY, uri TEXT NOT NULL)")
        self._load()

    def _load(self) -> None:
        for (data,) in self._db.execute("SELECT data FROM conversations"):
            conversation = conversation_from(json.loads(data))
            conversation.voice_legs.clear()
            conversation.voice_streams.clear()
            super().put_conversation(conversation)
        for (data,) in self._db.execute("SELECT data FROM monitors ORDER BY rowid"):
            monitor = monitor_from(json.loads(data))
            if monitor.active and monitor.voice_kind is VoiceKind.SIP and "voice" in monitor.channels:
                monitor.channels = [c for c in monitor.channels if c != "voice"]
                monitor.voice_blocked_reason = END_MEDIA_FAILURE
            super().put_monitor(monitor)
            if monitor.active and "voice" in monitor.channels:
                self._claim_voice(monitor.conversation, monitor)
        for username, uri in self._db.execute("SELECT username, uri FROM phones"):
            super().put_phone_uri(username, uri)

    def put_conversation(self, conversation: Conversation) -> None:
        super().put_conversation(conversation)
        self._db.execute(
            "INSERT OR REPLACE INTO conversations (id, data) VALUES (?, ?)",
            (conversation.id, json.dumps(plain(conversation))),
        )

    def put_monitor(self, monitor: Monitor) -> None:
        super().put_monitor(monitor)
        self._db.execute(
            "INSERT OR REPLACE INTO monitors (id, conversation, data) VALUES (?, ?, ?)",
            (monitor.id, monitor.conversation, json.dumps(plain(monitor))),
        )

    def put_phone_uri(self, username: str, uri: str | None) -> None:
        super().put_phone_uri(username, uri)
        if uri is None:
            self._db.execute("DELETE FROM phones WHERE username = ?", (username,))
        else:
            self._db.execute("INSERT OR REPLACE INTO phones (username, uri) VALUES (?, ?)", (username, uri))

    def forget_conversation(self, cid: str) -> None:
        super().forget_conversation(cid)
        self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,))
        live = set(self._monitors)
        for (mid,) in self._db.execute("SELECT id FROM monitors").fetchall():
            if mid not in live:
                self._db.execute("DELETE FROM monitors WHERE id = ?", (mid,))

    def close(self) -> None:
        self._db.close()


def plain(item: Conversation | Monitor) -> dict[str, Any]:
    data = asdict(item)
    for key, value in data.items():
        if isinstance(value, Enum):
            data[key] = value.value
        elif isinstance(value, set):
            data[key] = sorted(value)
    return data


def conversation_from(data: dict[str, Any]) -> Conversation:
    data["direction"] = Direction(data["direction"])
    data["voice_legs"] = set(data.get("voice_legs", []))
    return Conversation(**data)


def monitor_from(data: dict[str, Any]) -> Monitor:
    data["mode"] = MonitorMode(data["mode"])
    data["voice_kind"] = VoiceKind(data["voice_kind"]) if data.get("voice_kind") else None
    return Monitor(**data)
