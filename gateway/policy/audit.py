"""The audit log: every monitor start and end, whisper, barge and refused attempt.

SQLite in the embedded default. Writes are small and rare compared with media, so they run
on the event loop; WAL keeps readers (an operator's ``sqlite3`` shell) from blocking them.
"""

from __future__ import annotations

import json
import sqlite3
import time
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
    detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_conversation ON audit(conversation);
"""


class AuditLog:
    """Append-only records; ``outcome`` is ``ok`` or ``refused``."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

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
        self._db.execute(
            "INSERT INTO audit (ts, action, outcome, actor, conversation, monitor, code, detail) VALUES (?,?,?,?,?,?,?,?)",
            (
                time.time(),
                action,
                outcome,
                actor,
                conversation,
                monitor,
                code,
                json.dumps(detail, default=str) if detail else None,
            ),
        )

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
