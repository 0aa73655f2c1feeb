"""Bench of fork on demand (``"fork": "on_demand"``): how fast a listener hears a call the
platform forks only when asked, and how much ingress CPU the gateway saves when few calls are
monitored.

    python bench/fork.py                       # 50 joins; 200 conversations, 10 % monitored
    python bench/fork.py --trials 100 --n 500 --seconds 20
    python bench/fork.py --smoke               # 5 joins; 20 conversations, ~40 s in all

The gateway runs as its own process (``python -m gateway serve``, ``GATEWAY_*`` settings) and
is driven only through its public surfaces, as ``bench/voice_sip.py`` drives it: the control API
(the platform's client PUTs, a supervisor starts monitors with a SIP phone), ``/v1/events``
opened with the platform's token (the bench's platform follows it and sends its SIPREC INVITE
when asked, BYE when released: ``bench/sipua.py``), the SIP address, and ``/proc``. RTP comes
from ``bench/rtpbench.c`` (PCMU every 20 ms per leg, one timer); the phones are one light UAS
(``PhoneBank``) whose answers point the mix at an ``rtpbench sink`` port per conversation
(kernel receive time stamps).

Table 1, **join -> first audio** (on demand), one join at a time, each on a fresh conversation
PUT with ``"fork": "on_demand"`` and ``"sessions": ["voice"]`` (no legs): t0 just before the
supervisor's ``POST /monitors`` (phone); the platform hears ``voice_fork_requested``, sends its
SIPREC INVITE (answered 200 through the SIP address) and starts its RTP; the gateway calls the
phone once the first leg is up; the end is the first packet of the mix at the phone's port
(kernel time). Columns: p50/p99/max of that, and p50 of its parts (t0 -> request event at the
platform; -> INVITE answered). The target (issue 12): p99 <= 500 ms on loopback.

Table 2, **ingress CPU at 10 % monitored**: N conversations, every 10th monitored by a phone.
``always``: every conversation forked (a SIPREC call with RTP on both legs), as platforms that
record everything do. ``on_demand``: only the monitored ones, forked when their monitor starts.
CPU of the gateway (main process and workers, from /proc, all threads) over ``--seconds``,
after every monitored mix reached its phone and every forked call has both legs up (``legs up``);
``saved`` = 1 - on_demand / always.
No asserts: the numbers are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devtools.siprec_source (recording metadata)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rtpload import ARRIVAL_REC, CpuWindow, Generator, PortPlan, Sink, descendants, die_with_parent, rss_mb  # noqa: E402
from sipua import PhoneBank, PlatformCall  # noqa: E402

PLATFORM = {"grant_type": "client_credentials", "client_id": "cx-platform", "client_secret": "dev-secret"}
SUPERVISOR = {"grant_type": "password", "client_id": "gateway-console", "username": "sam", "password": "demo"}
TARGET_P99_MS = 500.0


def tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Gateway:
    """One ``python -m gateway serve`` and the API clients the bench needs."""

    def __init__(self, tmp: Path, workers: int, n: int, plan: PortPlan) -> None:
        self.tmp, self.workers = tmp, workers
        self.http_port = tcp_port()
        self.sip_port = plan.block(workers + 1)
        self.rtp_base = plan.block(max(40 * workers, 8 * n) + 64)
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.tokens: dict[str, str] = {}
        self.proc: asyncio.subprocess.Process | None = None
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))

    async def start(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GATEWAY_DEV": "true",
            "GATEWAY_DATA_DIR": str(self.tmp / "var"),
            "GATEWAY_SIP_WORKERS": str(self.workers),
            "GATEWAY_RTP_PORT_BASE": str(self.rtp_base),
            "GATEWAY_SIP_WORKER_READY_TIMEOUT": "120",
            "GATEWAY_SIP_INVITE_RATE": "0",  # one bench process plays every platform
            "GATEWAY_MONITOR_START_BURST": "100000",  # and one supervisor opens every monitor
            "GATEWAY_DRAIN_SECONDS": "1",
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        self.log = open(self.tmp / "gateway.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--port", str(self.http_port), "--sip-port", str(self.sip_port),
            env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            try:
                async with self.http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway not ready")
            await asyncio.sleep(0.25)
        for name, form in (("platform", PLATFORM), ("supervisor", SUPERVISOR)):
            async with self.http.post(f"{self.base}/realms/cx/protocol/openid-connect/token", data=form) as r:
                self.tokens[name] = (await r.json())["access_token"]

    async def call(self, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def put(self, cid: str, fork: str) -> None:
        body = {"agent": "alice", "customer": {"id": cid}, "sessions": ["voice"], "fork": fork}
        status, answer = await self.call("platform", "PUT", f"/v1/conversations/{cid}", body)
        if status not in (200, 201):
            raise RuntimeError(f"PUT {cid}: {status} {answer}")

    def pids(self) -> list[int]:
        assert self.proc is not None
        return descendants(self.proc.pid)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                for pid in descendants(self.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                await self.proc.wait()
        await self.http.close()
        self.log.close()


class BenchPlatform:
    """The platform: follows ``/v1/events`` with its token; on ``voice_fork_requested`` sends
    a SIPREC INVITE for the conversation and starts its RTP, on ``voice_fork_released`` BYE."""

    def __init__(self, gw: Gateway, gen: Generator, ports: dict[str, list[int]]) -> None:
        self.gw, self.gen, self.ports = gw, gen, ports
        self.calls: dict[str, PlatformCall] = {}
        self.requested: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._follow(ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def _follow(self, ready: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.gw.tokens['platform']}"}
        async with self.gw.http.ws_connect(self.gw.base.replace("http", "ws") + "/v1/events", headers=headers) as ws:
            ready.set()
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                cid = event.get("conversation", "")
                if event["type"] == "voice_fork_requested":
                    self.requested[cid] = time.time()
                    self._spawn(self._fork(cid, event["sip_uri"]))
                elif event["type"] == "voice_fork_released" and cid in self.calls:
                    self._spawn(self.calls.pop(cid).bye())

    def _spawn(self, job: Any) -> None:
        task = asyncio.ensure_future(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _fork(self, cid: str, sip_uri: str) -> None:
        host, port = sip_uri.split(":", 1)[1].rsplit(":", 1)
        call = PlatformCall(cid, ["agent", "customer"], self.ports[cid], (host, int(port)), True)
        try:
            await call.connect()
        except Exception as exc:
            self.errors.append(f"{cid}: {exc}")
            return
        self.answered[cid] = time.time()
        self.calls[cid] = call
        for local, dest in zip(call.ports, call.dests):
            self.gen.add(local, dest, 0, -1)

    async def always(self, cid: str) -> None:
        """A platform that forks everything: the call goes out without being asked."""
        await self._fork(cid, f"sip:127.0.0.1:{self.gw.sip_port}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await asyncio.gather(*(c.bye() for c in self.calls.values()), return_exceptions=True)


async def first_arrival(sink: Sink, index: int, since: float, timeout: float) -> float:
    """Kernel time of the first packet at sink stream ``index`` after ``since`` (epoch s)."""
    deadline = time.monotonic() + timeout
    assert sink.proc.stdout is not None
    while index not in sink.seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no audio at the phone of join {index} within {timeout:.0f} s")
        try:
            raw = await asyncio.wait_for(sink.proc.stdout.readline(), left)
        except TimeoutError:
            continue
        sink._other(raw.decode().strip())
    await sink.flush()
    data = sink.path.read_bytes()
    times = [
        ns / 1e9
        for i, _, _, _, ns in ARRIVAL_REC.iter_unpack(data[: len(data) - len(data) % ARRIVAL_REC.size])
        if i == index and ns / 1e9 >= since
    ]
    return min(times)


async def monitor_phone(gw: Gateway, phones: PhoneBank, cid: str) -> Any:
    """The supervisor's SIP-phone monitor of ``cid`` (its phone in ``phones``); it must have voice."""
    status, answer = await gw.call(
        "supervisor", "POST", f"/v1/conversations/{cid}/monitors", {"voice": {"kind": "sip", "uri": phones.uri(cid)}}
    )
    if status != 201 or "voice" not in answer.get("channels", []):
        raise RuntimeError(f"monitor {cid}: {status} {answer}")
    return answer


async def close_all(
    gw: Gateway,
    platform: BenchPlatform | None,
    gen: Generator | None,
    sink: Sink | None,
    phones: PhoneBank | None,
) -> None:
    """Stop what a run started (each may not have started) and then the gateway."""
    for helper in (platform, gen, sink):
        if helper is not None:
            await helper.close()
    if phones is not None:
        phones.close()
    await gw.stop()


async def join_latency(trials: int, workers: int, tmp: Path) -> dict[str, Any]:
    plan = PortPlan()
    gw = Gateway(tmp, workers, trials, plan)
    legs = plan.block(4 * trials, step=2)
    sink_base = plan.block(trials, step=2)
    cids = [f"join-{i}" for i in range(trials)]
    ports = {cid: [legs + 4 * i, legs + 4 * i + 2] for i, cid in enumerate(cids)}
    row: dict[str, Any] = {"trials": trials, "error": ""}
    gen = sink = platform = phones = None
    try:
        await gw.start()
        gen = await Generator.start(tmp)
        sink = await Sink.start(tmp, sink_base, trials)
        phones = PhoneBank({cid: sink.port(i) for i, cid in enumerate(cids)}.get)
        phones.start()
        platform = BenchPlatform(gw, gen, ports)
        await platform.start()
        total, to_event, to_answer = [], [], []
        for i, cid in enumerate(cids):
            await gw.put(cid, "on_demand")
            await asyncio.sleep(0.1)
            t0 = time.time()
            answer = await monitor_phone(gw, phones, cid)
            heard = await first_arrival(sink, i, t0, 10)
            total.append(1000 * (heard - t0))
            to_event.append(1000 * (platform.requested[cid] - t0))
            to_answer.append(1000 * (platform.answered[cid] - t0))
            await gw.call("supervisor", "DELETE", f"/v1/monitors/{answer['id']}")
            await asyncio.sleep(0.2)  # the release and its BYE
        row.update(
            p50=pct(total, 50), p99=pct(total, 99), max=max(total), event_p50=pct(to_event, 50),
            answer_p50=pct(to_answer, 50),
        )  # fmt: skip
        if platform.errors:
            row["error"] = "; ".join(platform.errors)[:200]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:240]
    finally:
        await close_all(gw, platform, gen, sink, phones)
    return row


async def ingress_cpu(mode: str, n: int, seconds: float, workers: int, tmp: Path) -> dict[str, Any]:
    plan = PortPlan()
    gw = Gateway(tmp, workers, n, plan)
    watched = list(range(0, n, 10))
    legs = plan.block(4 * n, step=2)
    sink_base = plan.block(len(watched), step=2)
    cids = [f"cpu-{i}" for i in range(n)]
    ports = {cid: [legs + 4 * i, legs + 4 * i + 2] for i, cid in enumerate(cids)}
    row: dict[str, Any] = {"mode": mode, "n": n, "monitored": len(watched), "error": ""}
    gen = sink = platform = phones = None
    try:
        await gw.start()
        gen = await Generator.start(tmp)
        sink = await Sink.start(tmp, sink_base, len(watched))
        phones = PhoneBank({cids[i]: sink.port(k) for k, i in enumerate(watched)}.get)
        phones.start()
        platform = BenchPlatform(gw, gen, ports)
        await platform.start()
        sem = asyncio.Semaphore(16)

        async def open_conversation(cid: str) -> None:
            async with sem:
                await gw.put(cid, mode)
                if mode == "always":
                    await platform.always(cid)

        await asyncio.gather(*(open_conversation(cid) for cid in cids))
        await gen.sync()

        async def monitor(cid: str) -> None:
            async with sem:
                await monitor_phone(gw, phones, cid)

        await asyncio.gather(*(monitor(cids[i]) for i in watched))
        await sink.wait_all(30 + 0.05 * n)
        row["forked"] = len(platform.calls)
        deadline = time.monotonic() + 30 + 0.05 * n
        while True:  # every forked call has both legs up (its RTP reached the gateway)
            _, listing = await gw.call("platform", "GET", "/v1/conversations")
            row["legs_up"] = sum(1 for c in listing if set(c.get("voice_legs", [])) >= {"agent", "customer"})
            if row["legs_up"] >= row["forked"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"conversations with both legs up: {row['legs_up']}/{row['forked']}")
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)
        pids = gw.pids()
        cpu = CpuWindow(pids)
        cpu.start()
        await asyncio.sleep(seconds)
        row["cpu"] = cpu.percent_of_core(pids)
        row["cpu_per_conv"] = row["cpu"] / n
        row["rss_mb"] = sum(rss_mb(p) for p in pids)
        if platform.errors:
            row["error"] = "; ".join(platform.errors)[:200]
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:240]
    finally:
        await close_all(gw, platform, gen, sink, phones)
    return row


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fork-") as tmp_dir:
        tmp = Path(tmp_dir)
        lat = await join_latency(args.trials, args.workers, tmp)
        print(
            f"\njoin -> first audio, fork on demand (SIPREC INVITE after the request; SIP phone), {args.trials} joins"
        )
        print(f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'->event p50':>12} {'->200 p50':>10}  target p99 <= 500 ms")
        if lat["error"]:
            print(f"  error: {lat['error']}")
        if "p50" in lat:
            met = "met" if lat["p99"] <= TARGET_P99_MS else "NOT met"
            print(
                f"{lat['p50']:8.1f} {lat['p99']:8.1f} {lat['max']:8.1f} {lat['event_p50']:12.1f} "
                f"{lat['answer_p50']:10.1f}  {met}"
            )
        rows = [await ingress_cpu(mode, args.n, args.seconds, args.workers, tmp) for mode in ("always", "on_demand")]
        print(
            f"\ningress CPU of the gateway, {args.n} conversations, 10 % monitored by a SIP phone, {args.seconds:g} s"
        )
        print(
            f"{'mode':<10} {'convs':>6} {'monitored':>9} {'forked':>7} {'legs up':>7} {'CPU %':>7} {'%/conv':>7} "
            f"{'RSS MB':>7}  error"
        )
        for r in rows:
            print(
                f"{r['mode']:<10} {r['n']:>6} {r['monitored']:>9} {r.get('forked', 0):>7} {r.get('legs_up', 0):>7} "
                f"{r.get('cpu', float('nan')):7.1f} "
                f"{r.get('cpu_per_conv', float('nan')):7.3f} {r.get('rss_mb', float('nan')):7.0f}  {r['error']}"
            )
        if all("cpu" in r for r in rows) and rows[0]["cpu"] > 0:
            print(f"saved by on_demand: {100 * (1 - rows[1]['cpu'] / rows[0]['cpu']):.0f} % of the gateway's CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=50, help="joins measured one after the other")
    ap.add_argument("--n", type=int, default=200, help="conversations for the CPU table (every 10th monitored)")
    ap.add_argument("--seconds", type=float, default=10.0, help="CPU window")
    ap.add_argument("--workers", type=int, default=1, help="GATEWAY_SIP_WORKERS")
    ap.add_argument("--smoke", action="store_true", help="5 joins; 20 conversations, 3 s")
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.n, args.seconds = 5, 20, 3.0
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
