"""Chat mirroring benchmark: ingest -> monitor websocket receipt latency, CPU and RSS.

N conversations, each getting ``--rate`` messages per second (evenly spread), each watched by
one monitor websocket. The gateway side (ChatService + SQLite log + serve_chat_stream on an
aiohttp app on 127.0.0.1) runs in this process; the websocket clients run in a child process
(``--client`` mode of this same file), so client CPU does not hide in the server's numbers.

Latency = client receipt time - the time taken just before ``ChatService.post`` (both
``time.time()`` on the same host), i.e. ingest -> durable append -> fan-out -> websocket ->
client parse. Also prints the append cost on the loop vs. through the log's writer thread,
which is the measurement behind "SQLite writes run on the event loop, checkpoints on a thread".

    .venv/bin/python bench/chat.py            # 1000 conversations x 1 msg/s, 20 s
    .venv/bin/python bench/chat.py --smoke    # 100 conversations, 3 s
    .venv/bin/python bench/chat.py --redis-url redis://127.0.0.1:6379/0   # the Redis Streams log

bench/state.py runs this bench's server side on both logs and prints them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from aiohttp import WSMsgType, web

from gateway.api.chat_ws import serve_chat_stream
from gateway.chat.log import ChatLog, SqliteChatLog
from gateway.chat.service import ChatService
from gateway.config import Settings
from gateway.shared.chat_log import RedisChatLog
from gateway.shared.connection import SharedState


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- client process ------------------------------------------------------------------------


async def client_main(url: str, n: int) -> None:
    latencies: list[float] = []
    seqs: dict[int, int] = {}
    problems = {"dup_or_order": 0, "closed_early": 0}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, ready: asyncio.Event) -> None:
            ws = await session.ws_connect(f"{url}/v1/monitors/m{i}/chat?after=0")
            ready.set()
            last = 0
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    break
                now = time.time()
                frame = json.loads(msg.data)
                if frame["type"] == "entry":
                    if frame["seq"] != last + 1:
                        problems["dup_or_order"] += 1
                    last = frame["seq"]
                    latencies.append(now - float(frame["text"].split(" ", 1)[0]))
                elif frame["type"] == "end":
                    seqs[i] = frame["final_seq"]
                    break
            if i not in seqs:
                problems["closed_early"] += 1
            seqs.setdefault(i, last)

        tasks = []
        for start in range(0, n, 100):  # connect in batches, gently
            events = []
            for i in range(start, min(n, start + 100)):
                ev = asyncio.Event()
                events.append(ev)
                tasks.append(asyncio.ensure_future(one(i, ev)))
            for ev in events:
                await ev.wait()
        cpu0 = cpu_seconds()
        print("READY", flush=True)
        await asyncio.gather(*tasks)
        cpu1 = cpu_seconds()
    print(
        json.dumps(
            {
                "received": len(latencies),
                "latencies_ms": [round(x * 1000, 3) for x in latencies],
                "cpu_s": cpu1 - cpu0,
                "rss_mb": rss_mb(),
                "hwm_mb": rss_mb("VmHWM"),
                "problems": problems,
                "final_seqs_sum": sum(seqs.values()),
            }
        ),
        flush=True,
    )


# --- server side -----------------------------------------------------------------------------


async def append_cost(path: Path, count: int = 3000) -> dict[str, tuple[float, float, float]]:
    """µs per append (mean, p99, max) in bursts of 10 every 8 ms across 1000 conversations:
    inline on the caller's thread vs. through the writer thread (what the gateway uses)."""
    out: dict[str, tuple[float, float, float]] = {}
    for name, threaded in (("inline", False), ("writer thread", True)):
        log = SqliteChatLog(path.with_suffix(f".{name[0]}.sqlite3"), writer_thread=threaded)
        times: list[float] = []
        for i in range(count):
            t = time.perf_counter()
            await log.append(
                f"x{i % 1000}",
                kind="message",
                sender="agent",
                author="a",
                text="1795608176.386921 hello, I have a question about my order",
                visibility="all",
                client_id=f"i{i}",
            )
            times.append(time.perf_counter() - t)
            if i % 10 == 9:
                await asyncio.sleep(0.008)
        await log.close()
        out[name] = (statistics.mean(times) * 1e6, pct(times, 0.99) * 1e6, max(times) * 1e6)
    return out


async def server_main(args: argparse.Namespace) -> dict[str, float]:
    """Run the bench, print its table; returns the headline numbers (for bench/state.py)."""
    tmp = Path(tempfile.mkdtemp(prefix="chatbench-"))
    redis_url = getattr(args, "redis_url", None)
    costs = await append_cost(tmp / "cost.sqlite3") if not args.smoke and not redis_url else {}
    settings = Settings(data_dir=str(tmp), chat_rate_per_second=0)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval / 1000)
    shared = None
    log: ChatLog
    if redis_url:
        shared = SharedState(redis_url, prefix=f"chatbench{os.getpid()}:")
        log = RedisChatLog(shared)
    else:
        log = SqliteChatLog(settings.chat_path, writer_thread=args.writer_thread)
    chat = ChatService(settings, log, heartbeat_interval=15.0)
    app = web.Application()

    async def monitor(request: web.Request) -> web.StreamResponse:
        cid = request.match_info["mid"]
        return await serve_chat_stream(
            request, chat, cid, "monitor", int(request.query.get("after", "0")), expires_at=time.time() + 3600
        )

    app.router.add_get("/v1/monitors/{mid}/chat", monitor)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rss_idle = rss_mb()
    n = args.conversations
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        "--url",
        f"http://127.0.0.1:{port}",
        "--conversations",
        str(n),
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    line = await child.stdout.readline()
    assert line.strip() == b"READY", line
    connect_deadline = time.monotonic() + 120
    while chat.hub.subscribers() < n:
        if time.monotonic() > connect_deadline:
            raise SystemExit(f"only {chat.hub.subscribers()} of {n} monitor streams subscribed after 120 s")
        await asyncio.sleep(0.05)
    rss_connected = rss_mb()
    if args.gc_freeze:
        gc.freeze()  # long-lived objects (connections, app) out of the collector's scans
    gc_pauses: list[tuple[int, float]] = []
    gc_started = [0.0]

    def gc_cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_started[0] = time.perf_counter()
        else:
            gc_pauses.append((info["generation"], time.perf_counter() - gc_started[0]))

    gc.callbacks.append(gc_cb)

    loop = asyncio.get_running_loop()
    tick = 0.01
    per_tick = n * args.rate * tick
    post_times: list[float] = []
    lags: list[float] = []
    buffered_peak = 0
    inflight: set[asyncio.Future[None]] = set()

    async def post(cid: str) -> None:
        t0 = time.time()
        p0 = time.perf_counter()
        await chat.post(
            cid,
            kind="message",
            sender="customer",
            author=None,
            text=f"{t0:.6f} hello, I have a question about my order",
            visibility="all",
        )
        post_times.append(time.perf_counter() - p0)
        inflight.discard(asyncio.current_task())  # type: ignore[arg-type]

    cpu0 = cpu_seconds()
    start = loop.time()
    owed = 0.0
    cursor = 0
    k = 0
    while loop.time() - start < args.seconds:
        k += 1
        target = start + k * tick
        delay = target - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, loop.time() - target))
        owed += per_tick
        while owed >= 1:
            owed -= 1
            cid = f"m{cursor % n}"
            cursor += 1
            # posts arrive concurrently (as HTTP requests would): one task each
            inflight.add(asyncio.ensure_future(post(cid)))
        if k % 10 == 0:  # buffered() walks every subscriber: sample it, do not pay it per tick
            buffered_peak = max(buffered_peak, chat.hub.buffered())
    elapsed = loop.time() - start
    if inflight:
        await asyncio.wait(inflight)
    gc.callbacks.remove(gc_cb)
    await asyncio.sleep(0.5)  # let the last messages arrive
    cpu1 = cpu_seconds()
    rss_end = rss_mb()
    for i in range(n):
        chat.end_conversation(f"m{i}", "ended")
    out, _ = await child.communicate()
    res = json.loads(out.decode().strip().splitlines()[-1])
    await runner.cleanup()
    await chat.close()
    if shared is not None:
        await shared.close()

    lat = res["latencies_ms"]
    sent = cursor
    rows = [
        ("conversations / monitor websockets", f"{n}"),
        ("messages posted (rate)", f"{sent} ({sent / elapsed:.0f} msg/s over {elapsed:.1f} s)"),
        ("messages received by monitors", f"{res['received']}  problems={res['problems']}"),
        (
            "mirror latency p50 / p90 / p99 / max (ms)",
            f"{pct(lat, 0.5):.2f} / {pct(lat, 0.9):.2f} / {pct(lat, 0.99):.2f} / {max(lat) if lat else float('nan'):.2f}",
        ),
        (
            f"post() incl. {'Redis' if redis_url else 'SQLite'} commit p50 / p99 / max (µs)",
            f"{pct(post_times, 0.5) * 1e6:.0f} / {pct(post_times, 0.99) * 1e6:.0f} / {max(post_times) * 1e6:.0f}",
        ),
        ("posts slower than 2 ms", f"{sum(1 for t in post_times if t > 0.002)}"),
        *[
            (f"append {name} mean / p99 / max (µs)", f"{a:.0f} / {b:.0f} / {c:.0f}")
            for name, (a, b, c) in costs.items()
        ],
        (
            "driver tick lag p50 / p99 / max (ms)",
            f"{pct(lags, 0.5) * 1000:.2f} / {pct(lags, 0.99) * 1000:.2f} / {max(lags) * 1000:.2f}",
        ),
        (
            "GC runs gen0/1/2; max pause (ms)",
            "/".join(str(sum(1 for g, _ in gc_pauses if g == gen)) for gen in (0, 1, 2))
            + f"; {max((p for _, p in gc_pauses), default=0) * 1000:.2f}",
        ),
        ("server CPU (% of one core, incl. driver)", f"{(cpu1 - cpu0) / (elapsed + 0.5) * 100:.1f}"),
        ("client CPU (% of one core)", f"{res['cpu_s'] / (elapsed + 0.5) * 100:.1f}"),
        (
            "server RSS idle / connected / end / peak (MB)",
            f"{rss_idle:.1f} / {rss_connected:.1f} / {rss_end:.1f} / {rss_mb('VmHWM'):.1f}",
        ),
        ("client RSS end / peak (MB)", f"{res['rss_mb']:.1f} / {res['hwm_mb']:.1f}"),
        ("hub buffered entries peak (all subscribers)", f"{buffered_peak}"),
    ]
    width = max(len(r[0]) for r in rows)
    mode = "Redis Streams log" if redis_url else "writer thread" if args.writer_thread else "writes on the loop"
    print(
        f"\nchat mirroring bench ({'smoke' if args.smoke else 'full'}; {mode}; "
        f"switchinterval {sys.getswitchinterval() * 1000:g} ms), python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 40))
    return {
        "sent": sent,
        "received": res["received"],
        "problems": sum(res["problems"].values()),
        "rate": sent / elapsed,
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "post_p99_ms": pct(post_times, 0.99) * 1000,
        "server_cpu": (cpu1 - cpu0) / (elapsed + 0.5) * 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=1.0, help="messages per second per conversation")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--writer-thread", action="store_true", help="SQLite writes on the log's writer thread")
    ap.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval in ms")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after connecting")
    ap.add_argument("--smoke", action="store_true", help="100 conversations for 3 s")
    ap.add_argument("--redis-url", help="the Redis Streams chat log on this Redis (appendfsync always)")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(client_main(args.url, args.conversations))
        return
    if args.smoke:
        args.conversations, args.seconds = 100, 3.0
    asyncio.run(server_main(args))


if __name__ == "__main__":
    main()
