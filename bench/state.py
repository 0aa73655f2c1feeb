"""The shared state's price: the SQLite store and log (one process) against Redis (several
instances), side by side.

* **voice-slot claims per second**: what ``POST .../monitors`` with voice does to the store
  (claim the slot, save the monitor, wait until it is where every instance sees it) and what
  leaving does (release), ``--workers`` at once on distinct conversations; and contended: 50
  claims at once on one conversation, of which exactly one may win (checked);
* **chat mirror latency**: bench/chat.py's server side (ingest -> durable append -> fan-out ->
  monitor websocket -> client parse, the client in a child process) at ``--rate`` msg/s in
  total, on the SQLite log and on the Redis Streams log.

Redis is a real ``redis-server`` this bench starts on loopback with ``appendonly yes`` and
``appendfsync always`` (what the gateway requires: an acknowledged entry is fsynced), and again
with ``appendfsync everysec`` (the SQLite store's own guarantee: survives a crash of the
process, not of the host). The load average is printed: on a shared machine, read the numbers
with it.

    .venv/bin/python bench/state.py            # 1000 conversations x 1 msg/s, 20 s per log
    .venv/bin/python bench/state.py --smoke    # ~30 s in all (make bench-smoke)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat as chat_bench

from devtools.redis_server import start_redis
from gateway.domain import Monitor
from gateway.shared.connection import SharedState
from gateway.shared.store import RedisStore
from gateway.store import SqliteStore, Store

#: The Redis persistence settings compared (README, "Shared state in Redis").
FSYNC_MODES = ("always", "everysec")


async def claims_per_second(store: Store, seconds: float, workers: int) -> tuple[float, float]:
    """(claim + save + flush + release cycles per second, p99 of one cycle in ms)."""
    done = 0
    cycle_times: list[float] = []
    end = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < end:
            cid = f"bench-{w}-{i}"
            monitor = Monitor(id=f"m-{w}-{i}", conversation=cid, supervisor="sam", channels=["chat", "voice"])
            t0 = time.perf_counter()
            if not await store.claim_voice(cid, monitor):
                raise AssertionError(f"{cid} was free")
            store.put_monitor(monitor)
            await store.flush()
            store.release_voice(cid, monitor.id)
            await store.flush()
            cycle_times.append(time.perf_counter() - t0)
            done += 1
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / (time.perf_counter() - started), chat_bench.pct(cycle_times, 0.99) * 1000


async def contended(stores: list[Store], rounds: int) -> tuple[float, int]:
    """50 claims at once on one conversation, spread over ``stores``: (mean ms per round, winners seen)."""
    times: list[float] = []
    winners = 0
    for r in range(rounds):
        cid = f"contended-{r}"
        t0 = time.perf_counter()

        async def attempt(i: int, cid: str = cid, r: int = r) -> bool:
            store = stores[i % len(stores)]
            monitor = Monitor(id=f"c{r}-{i}", conversation=cid, supervisor=f"s{i}", channels=["chat", "voice"])
            if not await store.claim_voice(cid, monitor):
                return False
            store.put_monitor(monitor)  # as the service does, before its next await
            return True

        results = await asyncio.gather(*(attempt(i) for i in range(50)))
        times.append(time.perf_counter() - t0)
        won = [i for i, ok in enumerate(results) if ok]
        assert len(won) == 1, f"round {r}: {len(won)} winners"
        winners += 1
        stores[won[0] % len(stores)].release_voice(cid, f"c{r}-{won[0]}")
    return statistics.mean(times) * 1000, winners


async def sqlite_claims(tmp: Path, seconds: float, workers: int, rounds: int) -> tuple[float, ...]:
    sqlite = SqliteStore(tmp / "state.sqlite3")
    try:
        return (*await claims_per_second(sqlite, seconds, workers), *await contended([sqlite], rounds))
    finally:
        sqlite.close()


async def redis_claims(redis_url: str, seconds: float, workers: int, rounds: int) -> tuple[float, ...]:
    """On two instances' stores (the contended claims are spread over both)."""
    shared = [SharedState(redis_url, prefix="statebench:") for _ in range(2)]
    stores = [RedisStore(s) for s in shared]
    for s, store in zip(shared, stores):
        await s.start()
        await store.start()
    try:
        return (*await claims_per_second(stores[0], seconds, workers), *await contended(stores, rounds))
    finally:
        for s, store in zip(shared, stores):
            await store.close()
            await s.close()


def chat_args(args: argparse.Namespace, redis_url: str | None) -> argparse.Namespace:
    conversations = args.conversations
    return argparse.Namespace(
        conversations=conversations,
        rate=args.rate / conversations,
        seconds=args.seconds,
        writer_thread=False,
        switch_interval=0.0,
        gc_freeze=False,
        smoke=True,  # skips bench/chat.py's extra append-cost section
        redis_url=redis_url,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1000.0, help="chat messages per second in total")
    ap.add_argument("--seconds", type=float, default=20.0, help="chat seconds per log")
    ap.add_argument("--claim-seconds", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=16, help="claims in flight at once")
    ap.add_argument("--smoke", action="store_true", help="~30 s in all: 200 conversations, 5 s per log")
    args = ap.parse_args()
    if args.smoke:
        args.conversations, args.seconds, args.claim_seconds = 200, 4.0, 1.5
    load_before = os.getloadavg()[0]
    claims: dict[str, tuple[float, ...]] = {}
    chats: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="statebench-") as tmp:
        claims["sqlite"] = asyncio.run(sqlite_claims(Path(tmp), args.claim_seconds, args.workers, 20))
        chats["sqlite"] = asyncio.run(chat_bench.server_main(chat_args(args, None)))
        for fsync in FSYNC_MODES:
            with start_redis(Path(tmp) / f"redis-{fsync}", appendfsync=fsync) as redis:
                claims[fsync] = asyncio.run(redis_claims(redis.url, args.claim_seconds, args.workers, 20))
                chats[fsync] = asyncio.run(chat_bench.server_main(chat_args(args, redis.url)))
    rows = [
        ("voice-slot claims/s (claim+save+release, flushed)", "{:.0f}", lambda k: claims[k][0]),
        ("  one claim cycle p99 (ms)", "{:.2f}", lambda k: claims[k][1]),
        ("50 claims at once on one call: ms per round", "{:.2f}", lambda k: claims[k][2]),
        ("  rounds with exactly one winner", "{:.0f}/20", lambda k: claims[k][3]),
        ("chat rate achieved (msg/s)", "{:.0f}", lambda k: chats[k]["rate"]),
        ("chat received / sent", "{}", lambda k: f"{chats[k]['received']}/{chats[k]['sent']}"),
        ("chat order/dup/early-close problems", "{:.0f}", lambda k: chats[k]["problems"]),
        ("chat mirror p50 (ms)", "{:.2f}", lambda k: chats[k]["p50_ms"]),
        ("chat mirror p99 (ms)", "{:.2f}", lambda k: chats[k]["p99_ms"]),
        ("chat mirror max (ms)", "{:.2f}", lambda k: chats[k]["max_ms"]),
        ("chat post() p99 (ms)", "{:.2f}", lambda k: chats[k]["post_p99_ms"]),
        ("gateway CPU (% of a core)", "{:.0f}", lambda k: chats[k]["server_cpu"]),
    ]
    columns = ["sqlite", *FSYNC_MODES]
    width = max(len(r[0]) for r in rows)
    print(
        f"\nshared-state bench ({'smoke' if args.smoke else 'full'}): {args.conversations} conversations, "
        f"{args.rate:g} msg/s for {args.seconds:g} s per log; claims {args.workers} in flight for "
        f"{args.claim_seconds:g} s; {os.cpu_count()} CPUs, load {load_before:.2f} before / "
        f"{os.getloadavg()[0]:.2f} after"
    )
    print("-" * (width + 44))
    print(f"{'':<{width}}  {'SQLite':>12}  {'Redis always':>13}  {'Redis everysec':>14}")
    for name, fmt, value in rows:
        cells = [fmt.format(value(c)) for c in columns]
        print(f"{name:<{width}}  {cells[0]:>12}  {cells[1]:>13}  {cells[2]:>14}")
    print("-" * (width + 44))
    print(
        "Redis always: fsync before every answer (what the gateway requires); everysec: written to the OS\n"
        "before the answer, fsynced each second (the guarantee of the SQLite store's synchronous=NORMAL)"
    )
    p99 = chats["always"]["p99_ms"]
    print(f"target: chat mirror p99 <= 15 ms through Redis: {'met' if p99 <= 15 else 'NOT met'} ({p99:.2f} ms)")


if __name__ == "__main__":
    main()
