"""The durable chat log and the chat service's rules (no network)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from gateway.chat.hub import ChatHub
from gateway.chat.log import ChatLog, SqliteChatLog
from gateway.chat.service import ChatService, visible
from gateway.config import Settings
from gateway.errors import GatewayError

pytestmark = pytest.mark.unit


def msg(log: SqliteChatLog, cid: str, text: str, **kw: object):
    args = dict(kind="message", sender="customer", author=None, text=text, visibility="all")
    args.update(kw)
    return asyncio.run(log.append(cid, **args))  # type: ignore[arg-type]


async def amsg(log: ChatLog, cid: str, text: str, **kw: object):
    args = dict(kind="message", sender="customer", author=None, text=text, visibility="all")
    args.update(kw)
    return await log.append(cid, **args)  # type: ignore[arg-type]


async def seqs(log: ChatLog, cid: str, after: int = 0) -> list[int]:
    return [e.seq for e in await log.read(cid, after)]


async def test_seq_is_gap_free_per_conversation(make_log):
    log = make_log()
    assert isinstance(log, ChatLog)
    for i in range(5):
        await amsg(log, "a", f"a{i}")
        await amsg(log, "b", f"b{i}")
    assert await seqs(log, "a") == [1, 2, 3, 4, 5]
    assert [e.text for e in await log.read("b", 3)] == ["b3", "b4"]
    assert await log.head("a") == 5 and await log.head("zzz") == 0
    if isinstance(log, SqliteChatLog):
        assert log.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    await log.close()


async def test_idempotent_client_id(make_log):
    log = make_log()
    first, created = await amsg(log, "a", "hello", client_id="up-1")
    again, created2 = await amsg(log, "a", "hello (retry)", client_id="up-1")
    other, created3 = await amsg(log, "b", "hello", client_id="up-1")  # another conversation
    assert created and not created2 and created3
    assert again == first and other.seq == 1
    assert await log.head("a") == 1
    assert await log.get_by_client_id("a", "up-1") == first
    assert await log.get_by_client_id("a", "nope") is None
    await log.close()


async def test_history_and_seq_survive_restart(make_log):
    log = make_log("c")
    for i in range(3):
        await amsg(log, "a", f"m{i}", client_id=f"c{i}")
    await log.close()
    log2 = make_log("c")
    assert [e.text for e in await log2.read("a", 0)] == ["m0", "m1", "m2"]
    e, created = await amsg(log2, "a", "m3")
    assert created and e.seq == 4
    assert (await amsg(log2, "a", "dup", client_id="c1"))[0].seq == 2
    await log2.close()


async def test_trim_keeps_head_and_low_water(make_log):
    log = make_log()
    for i in range(10):
        await amsg(log, "a", f"m{i}")
    assert await log.low_water("a") == 1
    assert await log.trim("a", 4) == 3
    assert await log.low_water("a") == 4
    assert (await seqs(log, "a"))[:2] == [4, 5]
    await log.trim("a", 100)  # trimming past the head keeps the head
    assert await log.read("a", 0) == [] and await log.head("a") == 10
    assert await log.low_water("a") == 11
    assert (await amsg(log, "a", "next"))[0].seq == 11
    await log.close()


async def test_unknown_kind_refused(make_log):
    log = make_log()
    with pytest.raises(ValueError):
        await amsg(log, "a", "x", kind="shout")
    assert await log.head("a") == 0
    await log.close()


def service(make_log, **over: object) -> ChatService:
    settings = Settings().with_overrides(**over)
    return ChatService(settings, make_log(), ChatHub(settings.chat_reader_cap))


async def test_post_validation_and_whisper_visibility(make_log):
    chat = service(make_log, max_message_chars=10)
    with pytest.raises(GatewayError) as e:
        await chat.post("c", kind="message", sender="agent", author="alice", text="x" * 11, visibility="all")
    assert (e.value.status, e.value.code) == (413, "message_too_long")
    with pytest.raises(GatewayError) as e:
        await chat.post("c", kind="message", sender="agent", author="alice", text="  \n", visibility="all")
    assert (e.value.status, e.value.code) == (422, "empty_message")
    w, _ = await chat.post("c", kind="whisper", sender="supervisor", author="sam", text="psst", visibility="all")
    assert w.visibility == "agent" and w.seq == 1
    assert not visible(w, "customer") and visible(w, "agent") and visible(w, "monitor")
    await chat.close()


async def test_rate_limit_per_author(make_log):
    t = [0.0]
    settings = Settings(chat_rate_per_second=2.0)
    chat = ChatService(settings, make_log(), clock=lambda: t[0])

    async def post(author: str, client_id: str | None = None):
        return await chat.post(
            "c", kind="message", sender="agent", author=author, text="hi", visibility="all", client_id=client_id
        )

    await post("alice", "k1")
    await post("alice")
    with pytest.raises(GatewayError) as e:
        await post("alice")
    assert (e.value.status, e.value.code) == (429, "rate_limited")
    assert e.value.headers["Retry-After"]
    assert (await post("alice", "k1"))[0].seq == 1  # an idempotent retry is never limited
    await post("bob")  # another author has its own budget
    await chat.post("c", kind="system", sender="system", author=None, text="sam joined", visibility="all")
    t[0] += 0.5
    await post("alice")
    await chat.close()


async def test_end_reaches_subscribers_and_late_subscribers(make_log):
    chat = service(make_log)
    woke: list[int] = []
    sub = chat.subscribe("c", lambda: woke.append(1))
    await chat.post("c", kind="message", sender="customer", author=None, text="hi", visibility="all")
    assert [e.seq for e in sub.queue] == [1]
    assert chat.end_conversation("c", "agent_left") == 1
    assert sub.end_reason == "agent_left"
    late = chat.subscribe("c", lambda: None)
    assert late.end_reason == "agent_left" and chat.hub.subscribers("c") == 0
    await chat.close()


def test_hub_overflow_drops_buffer():
    hub = ChatHub(cap=3)
    overflowed: list[bool] = []
    slow = hub.subscribe("c", lambda: None, lambda: overflowed.append(True))
    fast = hub.subscribe("c", lambda: None)
    from gateway.chat.log import ChatEntry

    for seq in range(1, 5):
        hub.publish(ChatEntry("c", seq, "message", "customer", None, "x", "all", None, 0.0))
        fast.queue.clear()
    assert slow.overflowed and overflowed == [True] and not slow.queue
    assert not fast.overflowed and hub.subscribers("c") == 1
    # with acks, sent-but-unacknowledged entries count too
    acker = hub.subscribe("c", lambda: None)
    acker.ack(0)
    for seq in (5, 6, 7):
        acker.sent(seq)
    assert not acker.overflowed
    acker.ack(6)
    assert list(acker.inflight) == [7]
    for seq in (8, 9, 10):
        acker.sent(seq)
    assert acker.overflowed


@pytest.mark.parametrize("writer_thread", [False, True])
async def test_concurrent_posts_stay_ordered(tmp_path, writer_thread):
    settings = Settings(data_dir=str(tmp_path), chat_rate_per_second=0)
    chat = ChatService(settings, SqliteChatLog(settings.chat_path, writer_thread=writer_thread))
    assert (chat.log._writer is not None) == writer_thread  # type: ignore[attr-defined]
    await concurrent_posts_stay_ordered(chat)


async def test_concurrent_posts_stay_ordered_any_log(make_log):
    await concurrent_posts_stay_ordered(ChatService(Settings(chat_rate_per_second=0), make_log()))


async def concurrent_posts_stay_ordered(chat: ChatService) -> None:
    seen: dict[str, list[int]] = {f"c{i}": [] for i in range(5)}
    subs = {cid: chat.subscribe(cid, lambda: None) for cid in seen}

    async def post(cid: str, n: int):
        return await chat.post(
            cid, kind="message", sender="agent", author=f"a{n % 3}", text=f"{n}", visibility="all", client_id=f"k{n}"
        )

    results = await asyncio.gather(*(post(f"c{n % 5}", n) for n in range(200)))
    # the same client_id posted concurrently: one entry, everybody gets its seq
    dups = await asyncio.gather(*(post("c0", 0) for _ in range(5)))
    assert all(e == results[0][0] and not created for e, created in dups)
    for cid, sub in subs.items():
        seen[cid] = [e.seq for e in sub.queue]
        assert seen[cid] == list(range(1, 41)), cid  # published in seq order, none twice
        assert await chat.head(cid) == 40
        assert [e.seq for e in await chat.log.read(cid, 0)] == list(range(1, 41))
    await chat.close()


@pytest.mark.parametrize("writer_thread", [False, True])
async def test_a_failing_write_fails_only_itself(tmp_path, writer_thread):
    log = SqliteChatLog(tmp_path / "c.sqlite3", writer_thread=writer_thread)

    def boom(conn):
        raise RuntimeError("boom")

    bad = log._submit(boom)  # type: ignore[attr-defined]
    good = log.append(  # queued right behind it, likely in the same batch
        "a", kind="message", sender="agent", author="x", text="fine", visibility="all"
    )
    entry, created = await good
    assert created and entry.seq == 1
    with pytest.raises(RuntimeError):
        bad.result(timeout=5)
    assert (await log.append("a", kind="message", sender="agent", author="x", text="next", visibility="all"))[
        0
    ].seq == 2
    await log.close()


def test_writer_thread_mode(tmp_path):
    log = SqliteChatLog(tmp_path / "c.sqlite3", writer_thread=True)
    assert log._writer is not None  # type: ignore[attr-defined]
    assert msg(log, "a", "one")[0].seq == 1
    assert msg(log, "a", "two", client_id="x")[0].seq == 2
    assert msg(log, "a", "two again", client_id="x")[0].seq == 2
    asyncio.run(log.close())


def test_wal_stays_bounded_under_steady_writes(tmp_path):
    """Checkpoints run on their own thread; when the WAL is big the writer finishes one between
    two writes, so the WAL restarts (and is truncated) instead of growing without bound."""
    limit = 256 * 1024
    log = SqliteChatLog(tmp_path / "c.sqlite3", checkpoint_interval=0.05, wal_reset_bytes=limit)
    assert log.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    for i in range(600):  # ~600 WAL pages, well over the limit
        msg(log, f"c{i % 50}", "x" * 200)
    deadline = time.monotonic() + 10
    while log.finishing_checkpoints == 0 and time.monotonic() < deadline:
        msg(log, "trickle", "x")  # steady writes: the writer finishes when asked
        time.sleep(0.01)
    assert log.finishing_checkpoints >= 1
    # Under steady writes the WAL restarts from the beginning (it does not go on at 600+
    # frames); on a loaded machine the checkpoint thread may collide with the writer's
    # finishing checkpoint a few times first.
    frames = 10**6
    while time.monotonic() < deadline + 10:
        msg(log, "after", "x")
        frames = log.db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        size = os.path.getsize(log.path + "-wal")
        if frames < 100 and size <= limit + 64 * 1024:
            break
        time.sleep(0.01)
    assert frames < 100, frames
    assert size <= limit + 64 * 1024, size
    asyncio.run(log.close())
