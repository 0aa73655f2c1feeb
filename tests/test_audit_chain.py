"""Tamper-evident audit log (issue 11, item 6): a SHA-256 hash chain, ``audit verify`` naming the
first broken link, ``audit export`` as JSON lines a SIEM can check on its own.

The edits are made the way an insider would: straight into the SQLite file with ``sqlite3``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.policy.audit import CHAIN_STARTED, GENESIS, AuditLog, first_broken_link, read_records, record_hash
from tests.support import GatewayClient

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent


def gateway_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_log(path: Path, n: int = 5) -> None:
    log = AuditLog(path)
    for i in range(n):
        log.record("monitor_started", actor="sam", conversation=f"c-{i}", monitor=f"m-{i}", voice="webrtc", n=i)
    log.record("monitor_refused", outcome="refused", actor="sue", conversation="c-0", code="not_team_supervisor")
    log.close()


def sql(path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(statement, args)
    db.close()


def test_records_are_chained_and_verify_says_intact(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    write_log(db)
    records = list(read_records(db))
    assert [r["id"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev_hash"] == GENESIS
    for before, record in zip(records, records[1:]):
        assert record["prev_hash"] == before["hash"]
    assert all(record_hash(r) == r["hash"] for r in records)
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact: 6 records" in result.stdout and records[-1]["hash"] in result.stdout


def test_verify_names_the_edited_record(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    write_log(db)
    sql(db, "UPDATE audit SET actor = 'tom' WHERE id = 3")
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 1
    assert "record 3:" in result.stdout and "edited" in result.stdout, result.stdout


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    write_log(db)
    forged = next(r for r in read_records(db) if r["id"] == 2)
    forged["detail"] = {"voice": None, "n": 1}
    sql(db, "UPDATE audit SET detail = ?, hash = ? WHERE id = 2", json.dumps(forged["detail"]), record_hash(forged))
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 1
    assert "record 3:" in result.stdout and "prev_hash does not match record 2" in result.stdout, result.stdout


def test_verify_names_the_record_after_a_deleted_one(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    write_log(db)
    sql(db, "DELETE FROM audit WHERE id = 4")
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 1
    assert "record 5: follows record 3; 4 missing" in result.stdout, result.stdout
    # Deleted and the ids renumbered to hide the gap: the chain still breaks there.
    db2 = tmp_path / "renumbered.sqlite3"
    write_log(db2)
    sql(db2, "DELETE FROM audit WHERE id = 4")
    sql(db2, "UPDATE audit SET id = id - 1 WHERE id > 4")
    result = gateway_cli("audit", "verify", "--db", db2)
    assert result.returncode == 1 and "record 4:" in result.stdout, result.stdout


def test_export_round_trips_and_a_siem_can_check_it(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    write_log(db)
    out = tmp_path / "audit.jsonl"
    assert gateway_cli("audit", "export", "--db", db, "--output", out).returncode == 0
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    stored = list(read_records(db))
    assert [{k: v for k, v in e.items() if k != "time"} for e in exported] == stored
    assert exported[0]["time"].endswith("Z") and exported[0]["detail"] == {"voice": "webrtc", "n": 0}
    assert first_broken_link(exported).intact and first_broken_link(exported).head == stored[-1]["hash"]
    exported[1]["actor"] = "mallory"
    assert first_broken_link(exported).broken == "record 2: its content does not match its hash (edited)"
    # stdout, and only what is new since the last export
    tail = gateway_cli("audit", "export", "--db", db, "--after", "4")
    assert [json.loads(line)["id"] for line in tail.stdout.splitlines()] == [5, 6]


def test_a_log_from_before_the_chain_is_sealed_by_a_marker(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    old = sqlite3.connect(db)
    old.executescript(
        """CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, action TEXT NOT NULL,
        outcome TEXT NOT NULL, actor TEXT, conversation TEXT, monitor TEXT, code TEXT, detail TEXT);
        INSERT INTO audit (ts, action, outcome, actor) VALUES (1.5, 'monitor_started', 'ok', 'sam');
        INSERT INTO audit (ts, action, outcome, actor) VALUES (2.5, 'monitor_ended', 'ok', 'sam');"""
    )
    old.close()
    log = AuditLog(db)
    log.record("whisper", actor="sam", conversation="c-1")
    log.close()
    records = list(read_records(db))
    assert [r["action"] for r in records] == ["monitor_started", "monitor_ended", CHAIN_STARTED, "whisper"]
    assert records[2]["detail"] == {"legacy_records": 2}
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 0 and "2 from before the chain" in result.stdout, result.stdout
    sql(db, "UPDATE audit SET actor = 'tom' WHERE id = 1")
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 1 and "record 3:" in result.stdout, result.stdout


def test_missing_log_is_exit_2(tmp_path: Path) -> None:
    result = gateway_cli("audit", "verify", "--db", tmp_path / "none.sqlite3")
    assert result.returncode == 2 and "no audit log" in result.stderr


@pytest.mark.api
async def test_the_gateway_writes_a_verifiable_chain(gateway: GatewayClient, tmp_path: Path) -> None:
    await gateway.conversation("c-audit")
    monitor = await gateway.monitor("sam", "c-audit")
    assert (await gateway.monitor("sue", "c-audit")).code == "not_team_supervisor"
    assert (
        await gateway.call("DELETE", f"/v1/monitors/{monitor.body['id']}", await gateway.login("sam"))
    ).status == 204
    db = tmp_path / "var" / "audit.sqlite3"
    actions = [r["action"] for r in read_records(db)]
    assert len(actions) >= 3
    result = gateway_cli("audit", "verify", "--db", db)
    assert result.returncode == 0, result.stdout
