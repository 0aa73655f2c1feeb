"""The durable, ordered, per-conversation chat log.

Every entry of a conversation gets a ``seq`` that grows by exactly 1 (gap-free), assigned by
the one process that owns the file (head kept in memory, recovered from the table on first
use) inside the transaction that stores the entry; the caller hears the ``seq`` only after the
commit ("stored before acknowledged"). Appends are idempotent on ``(conversation, client_id)``:
the same ``client_id`` again answers the entry stored the first time.

:class:`ChatLog` is the small protocol the chat plane depends on, so a Redis Streams log can
replace :class:`SqliteChatLog` later without touching the hub, the service or the websocket
handler.

Where the disk work happens (measured with bench/chat.py on the shared 2-core VM):
an append (one small transaction) costs ~50-100 µs on the event loop, so at 1000 msg/s the
writes themselves need no thread. What stalled the loop were WAL checkpoints: SQLite's
automatic checkpoint runs inside the commit that crosses 1000 WAL pages and fsyncs, 10-60 ms
about once a second (mirror p99 25-70 ms). So automatic checkpointing is off; a small thread
with its own connection runs ``wal_checkpoint(PASSIVE)`` every ``checkpoint_interval`` s (it
never blocks the writer). Under steady load a PASSIVE checkpoint never catches up completely,
so the WAL would never restart and would grow: once it is over ``wal_reset_bytes`` the writer
finishes one checkpoint between two writes (only the frames written since the last pass are
left, so it is short), and the WAL restarts (``journal_size_limit`` truncates it).
With ``writer_thread=True`` the writes move to one writer thread that group-commits whatever
is queued (for disks where the writes themselves stall); on this VM it cost more than it saved
(post p50 ~1.4 ms from GIL hand-offs vs ~0.09 ms inline), so it is off by default. ``:memory:``
keeps everything on the caller's thread.

Durability note: ``synchronous=NORMAL`` survives a process crash, not a power loss of the host
(the last commits before the loss may roll back).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
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


@runtime_checkable
class ChatLog(Protocol):
    """What the chat plane needs from a durable log (SQLite, or Redis Streams with GATEWAY_REDIS_URL)."""

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

    async def read_window(self, conversation: str, after: int, limit: int = 500) -> tuple[int, list[ChatEntry]]:
        """``(low_water, read(after, limit))`` in one step (one round trip for a remote log)."""
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
    head INTEGER NOT NULL,  -- written on trim: the seq must go on after every entry is gone
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


_Op = tuple[Callable[[sqlite3.Connection], Any], "Future[Any] | asyncio.Future[Any]"]


class SqliteChatLog:
    """:class:`ChatLog` on SQLite (WAL, ``synchronous=NORMAL``).

    Reads and (by default) writes run on the caller's thread, the event loop; checkpoints run
    on their own thread. With ``writer_thread=True`` writes run on one writer thread with its
    own connection, group-committed. The file belongs to one process.
    """

    #: Conversations whose head seq is kept in memory (LRU); a miss costs one indexed query.
    HEAD_CACHE = 100_000
    #: Most operations one transaction commits.
    BATCH = 512

    def __init__(
        self,
        path: str | Path,
        *,
        writer_thread: bool = False,
        checkpoint_interval: float = 1.0,
        wal_reset_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.path = str(path)
        memory = self.path == ":memory:" or self.path.startswith("file::memory")
        #: checkpoints run on their own thread; the writer only finishes one now and then
        self._own_checkpoints = checkpoint_interval > 0 and not memory
        self._wal_reset_bytes = wal_reset_bytes
        self._finish_checkpoint = False
        self.finishing_checkpoints = 0
        self._db: sqlite3.Connection | None = self._connect()
        self._db.executescript(_SCHEMA)
        #: heads as the writer sees them (writer thread only, or the caller without a thread)
        self._heads: OrderedDict[str, int] = OrderedDict()
        #: heads of committed entries, for readers (updated on the caller's side)
        self._read_heads: OrderedDict[str, int] = OrderedDict()
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._wdb: sqlite3.Connection | None = None
        if writer_thread and not memory:
            self._writer = threading.Thread(target=self._write_loop, name="chat-log-writer", daemon=True)
            self._writer.start()
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self._own_checkpoints:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, args=(checkpoint_interval,), name="chat-log-checkpoint", daemon=True
            )
            self._checkpointer.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        if self._own_checkpoints:
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(f"PRAGMA journal_size_limit={int(self._wal_reset_bytes)}")
        return db

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_loop(self, interval: float) -> None:
        """PASSIVE checkpoints off the write path (they never block the writer). Under steady
        load one never completes, so the WAL could not restart and would grow: when it is over
        ``wal_reset_bytes`` the writer is asked to finish one between two of its writes (only
        the few frames written since this pass are left, so that one is short)."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=100")
            while not self._stop.wait(interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if os.path.getsize(self.path + "-wal") > self._wal_reset_bytes:
                        self._finish_checkpoint = True
                except (sqlite3.Error, OSError):
                    pass  # busy or gone: the next pass catches up
        finally:
            conn.close()

    def _maybe_finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        if self._finish_checkpoint:
            self._finish_checkpoint = False
            self.finishing_checkpoints += 1
            row = None
            with contextlib.suppress(sqlite3.Error):
                row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # (busy, frames in the WAL, frames checkpointed): if the checkpoint thread held the
            # checkpoint lock, or new frames came in, try again after the next write.
            if row is None or row[0] or row[2] < row[1]:
                self._finish_checkpoint = True

    @property
    def db(self) -> sqlite3.Connection:
        """The read connection (also the write connection without a writer thread)."""
        if self._db is None:
            raise RuntimeError("chat log is closed")
        return self._db

    # -- the writer ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        conn = self._wdb = self._connect()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < self.BATCH:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                self._run_batch(conn, batch)
                self._maybe_finish_checkpoint(conn)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """One transaction for the whole batch (few statements per op: every statement is a
        GIL hand-off with the loop thread). If it fails, each op is retried alone so one bad op
        fails only itself."""
        heads_before = dict(self._heads)
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, _ in batch:
                results.append((True, fn(conn)))
            conn.execute("COMMIT")
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._heads.clear()
            self._heads.update(heads_before)
            results = []
            for fn, _ in batch:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    value = fn(conn)
                    conn.execute("COMMIT")
                    results.append((True, value))
                except Exception as exc:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    self._heads.clear()  # reloaded from the table on next use
                    results.append((False, exc))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, target), (ok, value) in zip(batch, results):
            if isinstance(target, Future):
                if ok:
                    target.set_result(value)
                else:
                    target.set_exception(value)
            else:
                by_loop.setdefault(target.get_loop(), []).append((target, ok, value))
        for loop, items in by_loop.items():
            # one wake-up of the loop per batch, not per op
            with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve_all, items)

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        target: Future[Any] | asyncio.Future[Any] | None = None,
        *,
        one_write: bool = False,
    ) -> Future[Any] | asyncio.Future[Any]:
        """Run ``fn(conn)`` in a write transaction; the result lands in ``target`` (a
        concurrent Future by default, or an asyncio Future of the calling loop).
        ``one_write``: ``fn`` writes with one statement, so on the caller's thread it runs in
        autocommit (its own implicit transaction) and skips BEGIN/COMMIT (~2 x 45 µs here)."""
        fut: Future[Any] | asyncio.Future[Any] = target if target is not None else Future()
        if self._writer is None:
            try:
                db = self.db
                if one_write:
                    try:
                        value = fn(db)
                    except BaseException:
                        self._heads.clear()  # reloaded from the table on next use
                        raise
                else:
                    db.execute("BEGIN IMMEDIATE")
                    try:
                        value = fn(db)
                        db.execute("COMMIT")
                    except BaseException:
                        db.execute("ROLLBACK")
                        self._heads.clear()  # reloaded from the table on next use
                        raise
                fut.set_result(value)
                self._maybe_finish_checkpoint(db)
            except Exception as exc:
                fut.set_exception(exc)
        else:
            if self._db is None:
                raise RuntimeError("chat log is closed")
            self._queue.put((fn, fut))
        return fut

    # -- operations (run inside a write transaction) ---------------------------------------

    def _op_append(
        self,
        conn: sqlite3.Connection,
        conversation: str,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None,
        ts: float | None,
    ) -> tuple[ChatEntry, bool]:
        if client_id is not None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM chat_entry WHERE conversation = ? AND client_id = ?",
                (conversation, client_id),
            ).fetchone()
            if row:
                return _row(row), False
        when = time.time() if ts is None else ts
        seq = self._writer_head(conn, conversation) + 1
        conn.execute(
            f"INSERT INTO chat_entry({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (conversation, seq, kind, sender, author, text, visibility, client_id, when),
        )
        _lru_set(self._heads, conversation, seq, self.HEAD_CACHE)
        return ChatEntry(conversation, seq, kind, sender, author, text, visibility, client_id, when), True

    def _op_trim(self, conn: sqlite3.Connection, conversation: str, below: int) -> int:
        head = self._writer_head(conn, conversation)
        below = min(below, head + 1)
        deleted = conn.execute(
            "DELETE FROM chat_entry WHERE conversation = ? AND seq < ?", (conversation, below)
        ).rowcount
        # the stored head keeps the seq going after every entry was trimmed away
        conn.execute(
            "INSERT INTO chat_conversation(conversation, head, low) VALUES (?, ?, ?) "
            "ON CONFLICT(conversation) DO UPDATE SET head = max(head, excluded.head), "
            "low = max(low, excluded.low)",
            (conversation, head, below),
        )
        return deleted

    def _writer_head(self, conn: sqlite3.Connection, conversation: str) -> int:
        head = self._heads.get(conversation)
        if head is None:
            head = _stored_head(conn, conversation)
            _lru_set(self._heads, conversation, head, self.HEAD_CACHE)
        return head

    # -- appends go to the writer; reads run on the caller's thread (WAL readers never wait) ---

    def _append_future(
        self,
        conversation: str,
        kind: str,
        sender: str,
        author: str | None,
        text: str,
        visibility: str,
        client_id: str | None,
        ts: float | None,
        target: Any = None,
    ) -> Any:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if sender not in SENDERS:
            raise ValueError(f"unknown sender {sender!r}")
        if visibility not in VISIBILITIES:
            raise ValueError(f"unknown visibility {visibility!r}")
        return self._submit(
            lambda conn: self._op_append(conn, conversation, kind, sender, author, text, visibility, client_id, ts),
            target,
            one_write=True,  # a SELECT (client_id) and one INSERT; only this process writes
        )

    def _committed(self, entry: ChatEntry) -> None:
        if self._read_heads.get(entry.conversation, 0) < entry.seq:
            _lru_set(self._read_heads, entry.conversation, entry.seq, self.HEAD_CACHE)

    def get_by_client_id_sync(self, conversation: str, client_id: str) -> ChatEntry | None:
        row = self.db.execute(
            f"SELECT {_COLUMNS} FROM chat_entry WHERE conversation = ? AND client_id = ?",
            (conversation, client_id),
        ).fetchone()
        return _row(row) if row else None

    def read_sync(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM chat_entry WHERE conversation = ? AND seq > ? ORDER BY seq LIMIT ?",
            (conversation, after, limit),
        ).fetchall()
        return [_row(r) for r in rows]

    def head_sync(self, conversation: str) -> int:
        head = self._read_heads.get(conversation)
        if head is None:
            head = _stored_head(self.db, conversation)
            if head:
                self._committed_head(conversation, head)
        return head

    def _committed_head(self, conversation: str, head: int) -> None:
        if self._read_heads.get(conversation, 0) < head:
            _lru_set(self._read_heads, conversation, head, self.HEAD_CACHE)

    def low_water_sync(self, conversation: str) -> int:
        row = self.db.execute("SELECT low FROM chat_conversation WHERE conversation = ?", (conversation,)).fetchone()
        return int(row[0]) if row else 1

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
        target: asyncio.Future[tuple[ChatEntry, bool]] = asyncio.get_running_loop().create_future()
        fut = self._append_future(conversation, kind, sender, author, text, visibility, client_id, ts, target)
        entry, created = await fut
        self._committed(entry)
        return entry, created

    async def get_by_client_id(self, conversation: str, client_id: str) -> ChatEntry | None:
        return self.get_by_client_id_sync(conversation, client_id)

    async def read(self, conversation: str, after: int, limit: int = 500) -> list[ChatEntry]:
        return self.read_sync(conversation, after, limit)

    async def head(self, conversation: str) -> int:
        return self.head_sync(conversation)

    async def low_water(self, conversation: str) -> int:
        return self.low_water_sync(conversation)

    async def read_window(self, conversation: str, after: int, limit: int = 500) -> tuple[int, list[ChatEntry]]:
        return self.low_water_sync(conversation), self.read_sync(conversation, after, limit)

    async def trim(self, conversation: str, below: int) -> int:
        target: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._submit(lambda conn: self._op_trim(conn, conversation, below), target)
        return await target

    def _stop_checkpointer(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
            self._checkpointer = None

    async def close(self) -> None:
        self._stop_checkpointer()
        writer = self._writer
        if writer is not None:
            self._queue.put(None)  # after everything already queued
            await asyncio.get_running_loop().run_in_executor(None, writer.join)
            self._writer = None
        if self._db is not None:
            self._db.close()  # the last connection checkpoints the WAL into the database
            self._db = None


def _resolve_all(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in items:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _stored_head(conn: sqlite3.Connection, conversation: str) -> int:
    (top,) = conn.execute("SELECT max(seq) FROM chat_entry WHERE conversation = ?", (conversation,)).fetchone()
    row = conn.execute("SELECT head FROM chat_conversation WHERE conversation = ?", (conversation,)).fetchone()
    return max(int(top or 0), int(row[0]) if row else 0)


def _lru_set(cache: OrderedDict[str, int], key: str, value: int, cap: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    if len(cache) > cap:
        cache.popitem(last=False)
