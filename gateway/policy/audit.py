"""The audit log: every monitor start and end, whisper, barge and refused attempt, hash-chained.

SQLite in the embedded default. Writes are small and rare compared with media, so they run
on the event loop; WAL keeps readers (an operator's ``sqlite3`` shell) from blocking them.

**Tamper evidence.** Each record carries ``prev_hash`` (the ``hash`` of the record before it)
and ``hash``, the SHA-256 of its own canonical JSON (:func:`record_hash`: every field, the
``id`` and ``prev_hash`` included, keys sorted, no spaces, UTF-8). Editing a record breaks its
own hash; deleting one breaks its successor's ``prev_hash`` (and leaves a gap in the ids, which
SQLite's ``AUTOINCREMENT`` never reuses). ``python -m gateway audit verify`` names the first
broken link; ``audit export`` writes the records as JSON lines for a SIEM, which can check the
same chain (:func:`first_broken_link`) and, holding the latest hash, pins everything before it:
someone able to write the file can rewrite the whole chain, not the copy already exported.

**Databases from before the chain** (no ``hash`` column): the columns are added and the first
chained record is ``audit_chain_started``, whose ``prev_hash`` is the digest of every older
record (:func:`legacy_digest`), so those are sealed as they were at the upgrade.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    actor TEXT,
    conversation TEXT,
    monitor TEXT,
    code TEXT,
    detail TEXT,
    prev_hash TEXT,
    hash TEXT
);
CREATE INDEX IF NOT EXISTS audit_conversation ON audit(conversation);
"""
#: Columns in table order; a record as a dict has these keys (``detail`` parsed, or None).
COLUMNS = ("id", "ts", "action", "outcome", "actor", "conversation", "monitor", "code", "detail", "prev_hash", "hash")
#: ``prev_hash`` of the first record of a log that started with the chain.
GENESIS = "0" * 64
CHAIN_STARTED = "audit_chain_started"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 (hex) of the record's canonical JSON: every column but ``hash`` itself."""
    return hashlib.sha256(_canonical({k: record.get(k) for k in COLUMNS if k != "hash"})).hexdigest()


def legacy_digest(records: Iterable[dict[str, Any]]) -> str:
    """SHA-256 (hex) over the canonical JSON lines of records written before the chain existed."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(_canonical({k: record.get(k) for k in COLUMNS if k not in ("prev_hash", "hash")}) + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """The outcome of checking a chain: ``broken`` names the first bad record, or is None."""

    records: int
    legacy: int
    head: str | None
    broken: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken is None


def first_broken_link(records: Iterable[dict[str, Any]]) -> ChainReport:
    """Check records in ``id`` order (as stored, or as exported): each one's ``hash`` matches its
    content, its ``prev_hash`` is the hash of the record before it, and no id is missing."""
    legacy: list[dict[str, Any]] = []
    previous: dict[str, Any] | None = None
    count = 0
    for record in records:
        count += 1
        rid = record.get("id")
        if record.get("hash") is None:
            if previous is not None:
                return ChainReport(
                    count, len(legacy), previous["hash"], f"record {rid}: has no hash after the chain began"
                )
            legacy.append(record)
            continue
        if previous is not None and isinstance(rid, int) and rid != previous["id"] + 1:
            missing = previous["id"] + 1 if rid == previous["id"] + 2 else f"{previous['id'] + 1}-{rid - 1}"
            return ChainReport(
                count,
                len(legacy),
                previous["hash"],
                f"record {rid}: follows record {previous['id']}; {missing} missing",
            )
        expected_prev = previous["hash"] if previous is not None else legacy_digest(legacy) if legacy else GENESIS
        if record.get("prev_hash") != expected_prev:
            what = f"record {previous['id']}" if previous is not None else "the start of the chain"
            head = previous["hash"] if previous is not None else None
            return ChainReport(
                count, len(legacy), head, f"record {rid}: prev_hash does not match {what} (edited or deleted before it)"
            )
        if record_hash(record) != record["hash"]:
            head = previous["hash"] if previous is not None else None
            return ChainReport(count, len(legacy), head, f"record {rid}: its content does not match its hash (edited)")
        previous = record
    return ChainReport(count, len(legacy), previous["hash"] if previous is not None else None)


def _row(row: tuple[Any, ...]) -> dict[str, Any]:
    record = dict(zip(COLUMNS, row))
    record["detail"] = json.loads(record["detail"]) if record["detail"] else None
    return record


class AuditLog:
    """Append-only, hash-chained records; ``outcome`` is ``ok`` or ``refused``."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._upgrade()
        self._db.executescript(_SCHEMA)

    def _upgrade(self) -> None:
        """A log from before the chain: add the columns, then seal the old records with a marker."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(audit)")}
        if not columns or "hash" in columns:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("ALTER TABLE audit ADD COLUMN prev_hash TEXT")
            self._db.execute("ALTER TABLE audit ADD COLUMN hash TEXT")
            legacy = self._db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            self._append(CHAIN_STARTED, "ok", None, None, None, None, {"legacy_records": legacy})
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def record(
        self,
        action: str,
        *,
        outcome: str = "ok",
        actor: str | None = None,
        conversation: str | None = None,
        monitor: str | None = None,
        code: str | None = None,
        **detail: Any,
    ) -> None:
        # One transaction per record: the predecessor's hash is read under the write lock, so
        # two writers (another process on the same file) can never fork the chain.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._append(action, outcome, actor, conversation, monitor, code, detail or None)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _append(
        self,
        action: str,
        outcome: str,
        actor: str | None,
        conversation: str | None,
        monitor: str | None,
        code: str | None,
        detail: dict[str, Any] | None,
    ) -> None:
        last = self._db.execute("SELECT hash FROM audit WHERE hash IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None:
            prev_hash = str(last[0])
        else:
            legacy = [_row(row) for row in self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit ORDER BY id")]
            prev_hash = legacy_digest(legacy) if legacy else GENESIS
        # Stored as parsed back, so the hash covers exactly what a reader (or an export) sees.
        stored_detail = json.dumps(detail, default=str) if detail else None
        cursor = self._db.execute(
            "INSERT INTO audit (ts, action, outcome, actor, conversation, monitor, code, detail, prev_hash)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (time.time(), action, outcome, actor, conversation, monitor, code, stored_detail, prev_hash),
        )
        rid = cursor.lastrowid
        row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM audit WHERE id = ?", (rid,)).fetchone()
        self._db.execute("UPDATE audit SET hash = ? WHERE id = ?", (record_hash(_row(row)), rid))

    def query(
        self, *, conversation: str | None = None, action: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        sql = "SELECT ts, action, outcome, actor, conversation, monitor, code, detail FROM audit WHERE 1=1"
        args: list[Any] = []
        if conversation is not None:
            sql += " AND conversation = ?"
            args.append(conversation)
        if action is not None:
            sql += " AND action = ?"
            args.append(action)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        keys = ("ts", "action", "outcome", "actor", "conversation", "monitor", "code", "detail")
        rows = []
        for row in self._db.execute(sql, args):
            item = dict(zip(keys, row))
            item["detail"] = json.loads(item["detail"]) if item["detail"] else {}
            rows.append(item)
        return rows

    def close(self) -> None:
        self._db.close()


def read_records(path: Path | str, after: int = 0) -> Iterator[dict[str, Any]]:
    """Every record with ``id > after``, in order, from the file opened read-only."""
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
        selected = ", ".join(c if c in columns else f"NULL AS {c}" for c in COLUMNS)
        for row in db.execute(f"SELECT {selected} FROM audit WHERE id > ? ORDER BY id", (after,)):
            yield _row(row)
    finally:
        db.close()


def verify(path: Path | str) -> ChainReport:
    """Check the chain of the audit log at ``path`` (read-only)."""
    return first_broken_link(read_records(path))


def export_line(record: dict[str, Any]) -> str:
    """One record as a JSON line for a SIEM: the stored fields plus ``time`` (ISO 8601, UTC)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["ts"])) + f".{int(record['ts'] % 1 * 1000):03d}Z"
    return json.dumps({**record, "time": stamp}, ensure_ascii=False, separators=(",", ":"))
