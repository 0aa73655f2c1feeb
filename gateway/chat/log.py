"""The durable, ordered, per-conversation chat log.

Every entry of a conversation gets a ``seq`` that grows by exactly 1 (gap-free), assigned in
the same SQLite transaction that stores the entry, so an entry is on disk before anyone is told
its ``seq`` ("stored before acknowledged"). Appends are idempotent on ``(conversation,
client_id)``: the same ``client_id`` again answers the entry stored the first time.

:class:`ChatLog` is the small protocol the chat plane depends on, so a Redis Streams log can
replace :class:`SqliteChatLog` later without touching the hub, the service or the websocket
handler.

Why the SQLite log runs on the event loop (no thread): in WAL mode with
``synchronous=NORMAL`` a commit does not fsync (only checkpoints do), and one append (upsert of
the head + insert + commit) costs tens of microseconds; at 1000 messages/s that is a few percent
of one core, well below what a thread hop (~50-100 µs of loop wake-ups per call) would cost.
``bench/chat.py`` prints the measured append time. Running on the loop also makes
append+publish atomic with respect to other coroutines, which keeps live fan-out in seq order.
Durability note: ``synchronous=NORMAL`` survives a process crash, not a power loss of the host
(the last few commits before the loss may roll back).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

KINDS = frozenset({"message", "whisper", "system"})
SENDERS = frozenset({"customer", "agent", "supervisor", "system"})
VISIBILITIES = frozenset({"all", "agent"})


@dataclass(frozen=True, slots=True)
class ChatEntry:
    """One stored chat entry.

    ``visibility`` ``'all'`` reaches the customer, agent and monitor views; ``'agent'`` reaches
    the agent and monitor views only (every whisper is ``'agent'``).
    """

    conversation: str
    seq: int
    kind: str
    sender: str
    author: str | None
    text: str
    visibility: str
    client_id: str | None
    ts: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class ChatLog(Protocol):
    """What the chat plane needs from a durable log (SQLite today, Redis Streams later)."""

    async def append(
        self,
        conversation: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
        ts: float | None = None,
    ) -> tuple[ChatEntry, bool]:
        """Store an entry with the next seq; ``(entry, True)``, or ``(existing, False)`` when
        ``client_id`` was already used in this conversation."""
        ...

    async def get_by_client_id(self, conversation: str, client_id: str) -> ChatEntry | None: ...

    async def read(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        """Entries with ``seq > after`` in seq order, at most ``limit``."""
        ...

    async def head(self, conversation: str) -> int:
        """The highest seq ever assigned in the conversation (0: none)."""
        ...

    async def low_water(self, conversation: str) -> int:
        """The lowest seq still stored (entries below it were trimmed); 1 when never trimmed."""
        ...

    async def trim(self, conversation: str, below: int) -> int:
        """Delete entries with ``seq < below``; returns how many were deleted."""
        ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS chat_conversation (
    conversation TEXT PRIMARY KEY,
    head INTEGER NOT NULL,
    low INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chat_entry (
    conversation TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    author TEXT,
    text TEXT NOT NULL,
    visibility TEXT NOT NULL,
    client_id TEXT,
    ts REAL NOT NULL,
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS chat_entry_client
    ON chat_entry(conversation, client_id) WHERE client_id IS NOT NULL;
"""

_COLUMNS = "conversation, seq, kind, sender, author, text, visibility, client_id, ts"


def _row(row: tuple[Any, ...]) -> ChatEntry:
    return ChatEntry(*row)


class SqliteChatLog:
    """:class:`ChatLog` on one SQLite connection (WAL, ``synchronous=NORMAL``).

    Used from the event loop only; the async methods never suspend, which is what keeps
    "append, then publish" in seq order without a lock (the service still takes one per
    conversation so that a log that does suspend stays correct).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False
        )
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=2000")
        db.executescript(_SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("chat log is closed")
        return self._db

    # -- sync core (also handy for tests and benches) ------------------------------------------

    def append_sync(
        self,
        conversation: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
        ts: float | None = None,
    ) -> tuple[ChatEntry, bool]:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if sender not in SENDERS:
            raise ValueError(f"unknown sender {sender!r}")
        if visibility not in VISIBILITIES:
            raise ValueError(f"unknown visibility {visibility!r}")
        db = self.db
        if client_id is not None:
            existing = self.get_by_client_id_sync(conversation, client_id)
            if existing is not None:
                return existing, False
        when = time.time() if ts is None else ts
        db.execute("BEGIN IMMEDIATE")
        try:
            (seq,) = db.execute(
                "INSERT INTO chat_conversation(conversation, head) VALUES (?, 1) "
                "ON CONFLICT(conversation) DO UPDATE SET head = head + 1 RETURNING head",
                (conversation,),
            ).fetchone()
            db.execute(
                f"INSERT INTO chat_entry({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (conversation, seq, kind, sender, author, text, visibility, client_id, when),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return (
            ChatEntry(conversation, seq, kind, sender, author, text, visibility, client_id, when),
            True,
        )

    def get_by_client_id_sync(self, conversation: str, client_id: str) -> ChatEntry | None:
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM chat_entry WHERE conversation = ? AND client_id = ?",
            (conversation, client_id),
        ).fetchone()
        return _row(row) if row else None

    def read_sync(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM chat_entry WHERE conversation = ? AND seq > ? "
            "ORDER BY seq LIMIT ?",
            (conversation, after, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def head_sync(self, conversation: str) -> int:
        row = self.db.execute(
            "SELECT head FROM chat_conversation WHERE conversation = ?", (conversation,)
        ).fetchone()
        return int(row[0]) if row else 0

    def low_water_sync(self, conversation: str) -> int:
        row = self.db.execute(
            "SELECT low FROM chat_conversation WHERE conversation = ?", (conversation,)
        ).fetchone()
        return int(row[0]) if row else 1

    def trim_sync(self, conversation: str, below: int) -> int:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            head = self.head_sync(conversation)
            below = min(below, head + 1)
            cur = db.execute(
                "DELETE FROM chat_entry WHERE conversation = ? AND seq < ?", (conversation, below)
            )
            deleted = cur.rowcount
            db.execute(
                "UPDATE chat_conversation SET low = max(low, ?) WHERE conversation = ?",
                (below, conversation),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return deleted

    # -- ChatLog -----------------------------------------------------------------------------

    async def append(
        self,
        conversation: str,
        *,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None = None,
        ts: float | None = None,
    ) -> tuple[ChatEntry, bool]:
        return self.append_sync(
            conversation,
            kind=kind,
            sender=sender,
            author=author,
            text=text,
            visibility=visibility,
            client_id=client_id,
            ts=ts,
        )

    async def get_by_client_id(self, conversation: str, client_id: str) -> ChatEntry | None:
        return self.get_by_client_id_sync(conversation, client_id)

    async def read(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        return self.read_sync(conversation, after, limit)

    async def head(self, conversation: str) -> int:
        return self.head_sync(conversation)

    async def low_water(self, conversation: str) -> int:
        return self.low_water_sync(conversation)

    async def trim(self, conversation: str, below: int) -> int:
        return self.trim_sync(conversation, below)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
