"""Bench of the SIP voice path at scale, with Janus AudioBridge as the anchor.

    python bench/voice_sip.py                                   # workloads a, b, c over the default sizes
    python bench/voice_sip.py --workloads a,c --sizes 64,128,256,512 --seconds 20
    python bench/voice_sip.py --workloads b --sizes 250,500,1000 --workers 2
    python bench/voice_sip.py --smoke                           # each workload at a tiny N, ~30 s in all

Workloads (one table each):

  a  phone    every conversation forked by SIPREC and monitored by a SIP phone
  b  record   record-everything: every conversation forked by SIPREC, 10 % monitored by a phone
  c  janus    the same RTP on Janus AudioBridge: a room per call, two plain-RTP PCMU participants,
              the room's mix forwarded as PCMU (rtp_forward) to the same sink

The gateway runs as its own process (``python -m gateway serve``, settings as ``GATEWAY_*``) and
is driven only through its public surfaces: the SIP address (SIPREC INVITEs; a 302 is
followed, a forwarded 200 taken as is), the control API (a platform PUTs each conversation, a
supervisor starts each monitor with a SIP phone) and ``/metrics``. Janus runs on loopback with a
configuration generated into a temporary directory (``bench/janus_bridge.py``).

The RTP load is ``bench/rtpbench.c`` (built with ``cc`` into ``bench/.build/``): one process
sends every leg's 20 ms PCMU packet from one timer, each leg from its own socket on the port its
offer named; every 500 ms one packet per conversation carries a loud 1 kHz burst instead of
silence (conversations staggered). Another process sinks every monitored conversation's mix on
a port of its own, with kernel receive timestamps (SO_TIMESTAMPNS). Every port the bench
chooses (its legs, the sink, the gateway's ``rtp_port_base`` range, Janus's RTP range) lies
outside the kernel's ephemeral port range.

Per step: lost = sequence gaps in the mix at the sink; late = a packet more than 40 ms behind
the 20 ms schedule its stream's first packet set; added latency = burst sent -> first loud packet
of the mix at the sink. CPU over the measured window from /proc (all threads): the system under
test (gateway: main process + workers; Janus: its process) per conversation, in % of one core.
A step "holds" when setup succeeded, lost + late < 0.1 % and >= 99 % of the bursts were heard;
a workload's sweep stops at its first step that does not hold (``--keep-going`` not) or when
``--budget`` is used up. Steps run in increasing N, workloads interleaved; rows go to stderr as
they come, the tables (one per workload) and the ratio at the end. No asserts. Columns:
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devtools.siprec_source (recording metadata)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from janus_bridge import JanusApi, JanusServer, janus_binary, janus_version  # noqa: E402
from rtpload import (  # noqa: E402
    CpuWindow,
    Generator,
    PortPlan,
    Sink,
    build,
    cpu_seconds,
    descendants,
    die_with_parent,
    media_quality,
    rss_mb,
    udp_drops,
)
from sipua import Conversation, PhoneBank, PlatformCall  # noqa: E402

NCPU = os.cpu_count() or 1
WORKLOADS = {"a": "phone", "b": "record", "c": "janus"}
TITLES = {
    "a": "(a) every conversation forked ({ingress}) and monitored by a SIP phone (gateway)",
    "b": "(b) record-everything: every conversation forked ({ingress}), 10 % monitored by a SIP phone (gateway)",
    "c": "(c) the same RTP on Janus AudioBridge: room per call, 2 plain-RTP PCMU legs, mix rtp_forward'ed as PCMU",
}
DEFAULT_SIZES = {
    "a": [4, 8, 16, 32, 64, 128, 256, 512],
    "b": [10, 50, 100, 250, 500, 1000],
    "c": [4, 8, 16, 32, 64, 128, 256, 512],
}
TARGET_P99_MS = 40.0  # issue 9's latency target, reported beside "held"
SMOKE_SIZES = {"a": [2], "b": [4], "c": [2]}
PLATFORM = {"grant_type": "client_credentials", "client_id": "cx-platform", "client_secret": "dev-secret"}
SUPERVISOR = {"grant_type": "password", "client_id": "gateway-console", "username": "sam", "password": "demo"}


@dataclass(frozen=True)
class GatewayDefaults:
    """The settings of the gateway under test that size a step, read from that gateway itself."""

    workers: int
    calls_per_worker: int
    reserve_phone_slot: bool
    pjsip: str  # pjproject version of the pjsua2 the gateway's Python imports


@dataclass(frozen=True)
class Options:
    python: str
    root: Path
    defaults: GatewayDefaults
    seconds: float
    idle_seconds: float
    workers: int
    calls_per_worker: int
    ingress: str
    prebuffer: int | None
    janus_legs_hear: bool


def monitored_indices(workload: str, n: int) -> list[int]:
    return list(range(n)) if workload != "b" else [i for i in range(n) if i % 10 == 0]


def tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- measurement


async def measure(
    row: dict[str, Any], sut: list[int], main: int | None, gen: Generator, sink: Sink, seconds: float, n: int
) -> None:
    """The measured window: CPU of the system under test (``sut`` pids) and of the bench's own
    processes, then the media quality of what the sink received in that window."""
    rss_idle = row.pop("_rss_idle")
    cpu = CpuWindow(sut + [gen.pid, sink.pid])
    gen.window()
    cpu.start()
    t0 = time.time()
    await asyncio.sleep(seconds)
    t1 = time.time()
    row["gen_lag_ms"], row["gen_lag_pct"] = await gen.stats()
    row["cpu_per_conv"] = cpu.percent_of_core(sut) / n
    row["main_cpu"] = cpu.percent_of_core([main]) if main else float("nan")
    row["gen_cpu"] = cpu.percent_of_core([gen.pid])
    row["sink_cpu"] = cpu.percent_of_core([sink.pid])
    row["machine"] = cpu.machine_percent()
    rss = sum(rss_mb(p) for p in sut)
    row["mb_per_conv"] = rss / n
    row["mb_added_per_conv"] = (rss - rss_idle) / n
    await asyncio.sleep(0.6)  # the last bursts reach the sink
    await sink.flush()
    bursts = {k: [b for b in v if t0 <= b <= t1] for k, v in gen.bursts().items()}
    row.update(media_quality(sink.arrivals(t0, t1 + 0.5), bursts, sink.count, seconds))
    row["sink_drops"] = udp_drops(sink.ports())


async def idle_cost(row: dict[str, Any], pids: list[int], seconds: float) -> None:
    """CPU (% of one core) and RSS of the system under test before any call."""
    c0 = {p: cpu_seconds(p) for p in pids}
    await asyncio.sleep(seconds)
    row["idle_cpu"] = 100 * sum(cpu_seconds(p) - c0[p] for p in pids) / seconds
    row["_rss_idle"] = sum(rss_mb(p) for p in pids)


# --------------------------------------------------------------------------- gateway (a, b)


class ControlApi:
    """The platform's and a supervisor's side of the gateway's HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32))
        self.tokens: dict[str, str] = {}

    async def login(self) -> None:
        for name, form in (("platform", PLATFORM), ("supervisor", SUPERVISOR)):
            async with self.http.post(f"{self.base}/realms/cx/protocol/openid-connect/token", data=form) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"token for {name}: {r.status} {body}")
                self.tokens[name] = body["access_token"]

    async def call(self, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with self.http.request(method, self.base + path, json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def ready(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}")
            try:
                async with self.http.get(f"{self.base}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
        raise RuntimeError(f"gateway not ready within {timeout:.0f} s")

    async def restarts(self) -> float:
        """SIP worker restarts and hung kills, as /metrics reports them (nan if it does not)."""
        async with self.http.get(f"{self.base}/metrics") as r:
            text = await r.text()
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_plane_stat{") and ('"worker_restarts"' in line or '"worker_hung_kills"' in line)
        ]
        return sum(found) if found else float("nan")


def gateway_defaults(python: str, root: Path) -> GatewayDefaults:
    code = (
        "from gateway.config import Settings as S\n"
        "s = S.from_env()\n"
        "try:\n    import pjsua2; v = pjsua2.Endpoint().libVersion().full\n"
        "except Exception:\n    v = '?'\n"
        "try:\n    import pjsua2; built = getattr(pjsua2, 'MAX_CALLS', 4)\n"
        "except Exception:\n    built = 4\n"
        # calls_per_worker 0 means: as many as the worker's pjsua2 build holds
        "print(s.sip_workers, s.calls_per_worker or built, s.sip_reserve_phone_slot, v)"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([python, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench: can not read the gateway's settings with {python} in {root}: {out.stderr[-300:]}")
    workers, calls, reserve, pjsip = out.stdout.split()[-4:]
    return GatewayDefaults(int(workers), int(calls), reserve == "True", pjsip)


def gateway_workers(n: int, opts: Options) -> int:
    """The gateway's own ``sip_workers``, raised to what its call slots need for N (each
    conversation and its phone fit in one worker; with ``sip_reserve_phone_slot`` every
    conversation counts its phone)."""
    if opts.workers:
        return opts.workers
    per_worker = opts.calls_per_worker or opts.defaults.calls_per_worker
    footprint = (1 if opts.ingress == "siprec" else 2) + (1 if opts.defaults.reserve_phone_slot else 0)
    return max(1, opts.defaults.workers, math.ceil(n / max(1, per_worker // footprint)))


async def gateway_step(workload: str, n: int, opts: Options, tmp: Path) -> dict[str, Any]:
    workers = gateway_workers(n, opts)
    watched = monitored_indices(workload, n)
    row: dict[str, Any] = {"n": n, "monitored": len(watched), "procs": workers + 1, "error": ""}
    plan = PortPlan()
    http_port = tcp_port()
    sip_port = plan.block(workers + 1)
    legs_base = plan.block(2 * n, step=2)
    sink_base = plan.block(len(watched), step=2)
    # Last: the gateway lays its workers' RTP ranges out from rtp_port_base upwards however it
    # likes, so it gets everything above the bench's blocks, checked free for what it needs today
    # (40 per worker) or per conversation (two streams and a phone, RTP + RTCP: 6, so 8).
    rtp_base = plan.block(max(40 * workers, 8 * n) + 64)
    sink_index = {i: k for k, i in enumerate(watched)}
    env = {
        **os.environ,
        "PYTHONPATH": str(opts.root),
        "GATEWAY_DEV": "true",
        "GATEWAY_DATA_DIR": str(tmp / "var"),
        "GATEWAY_SIP_WORKERS": str(workers),
        "GATEWAY_RTP_PORT_BASE": str(rtp_base),
        "GATEWAY_SIP_WORKER_READY_TIMEOUT": "300",
        "GATEWAY_SIP_MEDIA_TIMEOUT": "120",
        # One bench process plays every platform and one supervisor: the per-source INVITE
        # limit is off and the supervisor may open every monitor at once.
        "GATEWAY_SIP_INVITE_RATE": "0",
        "GATEWAY_MONITOR_START_BURST": "100000",
        "GATEWAY_DRAIN_SECONDS": "2",
        "GATEWAY_LOG_LEVEL": "WARNING",
    }
    if opts.calls_per_worker:
        env["GATEWAY_CALLS_PER_WORKER"] = str(opts.calls_per_worker)
    log = open(tmp / "gateway.log", "wb")
    gw = await asyncio.create_subprocess_exec(
        opts.python, "-m", "gateway", "serve", "--port", str(http_port), "--sip-port", str(sip_port),
        env=env, cwd=opts.root, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip
    api = ControlApi(f"http://127.0.0.1:{http_port}")
    gen: Generator | None = None
    sink: Sink | None = None
    phones: PhoneBank | None = None
    convs = [Conversation(i, f"bench-{i}", i in sink_index) for i in range(n)]
    try:
        t = time.monotonic()
        await api.ready(gw, 360)
        row["startup_s"] = time.monotonic() - t
        pids = descendants(gw.pid)
        row["procs"] = len(pids)
        await idle_cost(row, pids, opts.idle_seconds)
        gen = await Generator.start(tmp)
        sink = await Sink.start(tmp, sink_base, len(watched))
        by_cid = {c.cid: sink.port(sink_index[c.index]) for c in convs if c.monitored}
        phones = PhoneBank(by_cid.get)
        phones.start()
        await api.login()
        t = time.monotonic()
        sem = asyncio.Semaphore(16)

        async def open_conversation(c: Conversation) -> None:
            async with sem:
                body = {
                    "direction": "inbound",
                    "transferred": False,
                    "agent": "alice",
                    "customer": {"id": f"cust-{c.index}", "name": "Bench"},
                    "sessions": ["voice"],
                }
                status, answer = await api.call("platform", "PUT", f"/v1/conversations/{c.cid}", body)
                if status not in (200, 201):
                    raise RuntimeError(f"PUT conversation: {status} {answer}")
                ports = [legs_base + 4 * c.index, legs_base + 4 * c.index + 2]
                if opts.ingress == "siprec":
                    c.calls = [PlatformCall(c.cid, ["agent", "customer"], ports, ("127.0.0.1", sip_port), True)]
                else:
                    c.calls = [
                        PlatformCall(c.cid, [leg], [port], ("127.0.0.1", sip_port), False)
                        for leg, port in zip(("agent", "customer"), ports)
                    ]
                for call in c.calls:
                    await call.connect()
                    assert gen is not None
                    for leg, port, dest in zip(call.legs, call.ports, call.dests):
                        mark = sink_index[c.index] if c.monitored and leg == "agent" else -1
                        gen.add(port, dest, c.index, mark)

        await asyncio.gather(*(open_conversation(c) for c in convs))
        await gen.sync()
        row["setup_s"] = time.monotonic() - t
        deadline = time.monotonic() + 30 + 0.05 * n
        while True:  # both legs up (RTP flowing) for every conversation
            status, listing = await api.call("platform", "GET", "/v1/conversations")
            up = sum(1 for c in listing if set(c.get("voice_legs", [])) >= {"agent", "customer"})
            if up >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"conversations with both legs up: {up}/{n}")
            await asyncio.sleep(0.3)

        async def monitor(c: Conversation) -> None:
            async with sem:
                assert phones is not None
                status, answer = await api.call(
                    "supervisor",
                    "POST",
                    f"/v1/conversations/{c.cid}/monitors",
                    {"voice": {"kind": "sip", "uri": phones.uri(c.cid)}},
                )
                if status != 201 or "voice" not in answer.get("channels", []):
                    raise RuntimeError(f"monitor {c.cid}: {status} {answer}")

        await asyncio.gather(*(monitor(c) for c in convs if c.monitored))
        await sink.wait_all(30 + 0.05 * n)
        row["setup_s"] = time.monotonic() - t
        await asyncio.sleep(1.0)
        pids = descendants(gw.pid)
        row["procs"] = len(pids)
        await measure(row, pids, gw.pid, gen, sink, opts.seconds, n)
        row["restarts"] = await api.restarts()
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:240]
    finally:
        await asyncio.gather(*(call.bye() for c in convs for call in c.calls), return_exceptions=True)
        if phones is not None:
            phones.close()
        for helper in (gen, sink):
            if helper is not None:
                await helper.close()
        await api.http.close()
        if gw.returncode is None:
            gw.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(gw.wait(), 15)
            except TimeoutError:
                for pid in descendants(gw.pid):
                    os.kill(pid, signal.SIGKILL)
                await gw.wait()
        log.close()
    if row["error"]:
        row["error"] += "  | gateway log: " + (tmp / "gateway.log").read_text(errors="replace")[-300:].replace(
            "\n", " "
        )
    return row


# --------------------------------------------------------------------------- Janus (c)


async def janus_step(n: int, opts: Options, tmp: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "monitored": n, "procs": 1, "error": ""}
    plan = PortPlan()
    rtp_lo = plan.block(2 * n + 16, step=2)
    server = JanusServer(tmp, tcp_port(), (rtp_lo, rtp_lo + 2 * (2 * n + 16)))
    legs_base = plan.block(2 * n, step=2)
    api: JanusApi | None = None
    gen: Generator | None = None
    sink: Sink | None = None
    try:
        t = time.monotonic()
        await server.start()
        row["startup_s"] = time.monotonic() - t
        await idle_cost(row, [server.pid], opts.idle_seconds)
        gen = await Generator.start(tmp)
        sink = await Sink.start(tmp, plan.block(n, step=2), n)
        api = JanusApi(server.url)
        await api.open()
        t = time.monotonic()
        sem = asyncio.Semaphore(16)

        async def bridge(i: int) -> None:
            assert api is not None and gen is not None and sink is not None
            agent, customer = legs_base + 4 * i, legs_base + 4 * i + 2
            async with sem:
                to_agent, to_customer = await api.bridge_call(
                    agent, customer, sink.port(i), opts.prebuffer, opts.janus_legs_hear
                )
            gen.add(agent, ("127.0.0.1", to_agent), i, i)
            gen.add(customer, ("127.0.0.1", to_customer), i, -1)

        await asyncio.gather(*(bridge(i) for i in range(n)))
        await gen.sync()
        await sink.wait_all(30 + 0.05 * n)
        row["setup_s"] = time.monotonic() - t
        await asyncio.sleep(1.0)
        await measure(row, [server.pid], None, gen, sink, opts.seconds, n)
        row["restarts"] = 0.0 if server.proc and server.proc.returncode is None else 1.0
    except Exception as exc:
        row["error"] = (
            f"{type(exc).__name__}: {exc}"[:240] + "  | janus log: " + server.log_tail()[-300:].replace("\n", " ")
        )
    finally:
        if api is not None:
            await api.close()
        for helper in (gen, sink):
            if helper is not None:
                await helper.close()
        await server.stop()
    return row


# --------------------------------------------------------------------------- tables


def holds(r: dict[str, Any]) -> bool:
    return not r["error"] and r["lost_pct"] + r["late_pct"] < 0.1 and r["bursts"] >= 0.99 * max(1, r["bursts_sent"])


HEAD = (
    f"{'conv':>5} {'mon':>5} {'procs':>5} {'lost%':>6} {'late%':>6} {'lat p50':>8} {'lat p99':>8} "
    f"{'CPU%/conv':>9} {'main%':>6} {'idle%':>6} {'MB/conv':>8} {'+MB/conv':>8} {'mach%':>6} "
    f"{'gen%':>5} {'sink%':>5} {'gen lag':>8} {'start':>6} {'setup':>6} {'rst':>4} holds"
)


def fmt(r: dict[str, Any]) -> str:
    if "frames" not in r:
        return f"{r['n']:>5} {r['monitored']:>5} {r['procs']:>5}  FAILED: {r['error']}"
    main = "-" if math.isnan(r["main_cpu"]) else f"{r['main_cpu']:.1f}"  # Janus has no main process
    return (
        f"{r['n']:>5} {r['monitored']:>5} {r['procs']:>5} {r['lost_pct']:>6.2f} {r['late_pct']:>6.2f} "
        f"{r['lat_p50']:>6.1f}ms {r['lat_p99']:>6.1f}ms {r['cpu_per_conv']:>9.3f} {main:>6} "
        f"{r['idle_cpu']:>6.1f} {r['mb_per_conv']:>8.2f} {r['mb_added_per_conv']:>8.2f} {r['machine']:>6.0f} "
        f"{r['gen_cpu']:>5.1f} {r['sink_cpu']:>5.1f} {r['gen_lag_ms']:>6.1f}ms {r['startup_s']:>5.1f}s "
        f"{r['setup_s']:>5.1f}s {r['restarts']:>4.0f} {'yes' if holds(r) else 'NO'}"
        + (f"  {r['error']}" if r["error"] else "")
        + (f"  (sink kernel drops {r['sink_drops']})" if r.get("sink_drops") else "")
        + (f"  (generator ticks > 20 ms late: {r['gen_lag_pct']:.1f} %)" if r.get("gen_lag_pct") else "")
    )


def print_ratios(rows: dict[str, list[dict[str, Any]]]) -> None:
    a = {r["n"]: r for r in rows.get("a", []) if "frames" in r}
    c = {r["n"]: r for r in rows.get("c", []) if "frames" in r}
    common = sorted(set(a) & set(c))
    if not common:
        return
    print("\ngateway (a) / Janus (c) at the same N")
    print(
        f"{'conv':>5} {'gw CPU%/conv':>12} {'janus CPU%/conv':>15} {'CPU ratio':>9} {'gw MB/conv':>10} {'janus MB/conv':>13} {'MB ratio':>8}"
    )
    for n in common:
        ga, jc = a[n], c[n]
        print(
            f"{n:>5} {ga['cpu_per_conv']:>12.3f} {jc['cpu_per_conv']:>15.3f} "
            f"{ga['cpu_per_conv'] / max(1e-9, jc['cpu_per_conv']):>9.2f} {ga['mb_per_conv']:>10.2f} "
            f"{jc['mb_per_conv']:>13.2f} {ga['mb_per_conv'] / max(1e-9, jc['mb_per_conv']):>8.2f}"
        )


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="a,b,c", help="comma-separated among a (phone), b (record), c (janus)")
    ap.add_argument("--sizes", type=parse_sizes, help="conversations per step, e.g. 64,128,256,512 (every workload)")
    ap.add_argument("--sizes-a", type=parse_sizes, help="sizes for workload a only")
    ap.add_argument("--sizes-b", type=parse_sizes, help="sizes for workload b only")
    ap.add_argument("--sizes-c", type=parse_sizes, help="sizes for workload c only")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step")
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="gateway worker processes (0: its sip_workers, raised to what its call slots need)",
    )
    ap.add_argument(
        "--calls-per-worker", type=int, default=0, help="GATEWAY_CALLS_PER_WORKER (0: the gateway's default)"
    )
    ap.add_argument(
        "--ingress",
        "--mode",
        choices=("siprec", "perleg"),
        default="siprec",
        help="a/b: one SIPREC INVITE or one per leg",
    )
    ap.add_argument(
        "--janus-prebuffer", type=int, help="AudioBridge default_prebuffering in packets (default: Janus's, 6)"
    )
    ap.add_argument(
        "--janus-legs-hear",
        action="store_true",
        help="Janus sends each leg the mix minus itself (a conference) instead of nothing (a fork)",
    )
    ap.add_argument("--gateway-root", default=str(ROOT), help="checkout whose gateway is measured (default: this one)")
    ap.add_argument("--gateway-python", help="Python that runs it, e.g. a venv with another pjsua2 (default: this one)")
    ap.add_argument("--budget", type=float, default=1800.0, help="stop a workload's sweep after this many seconds")
    ap.add_argument(
        "--keep-going", action="store_true", help="do not stop a sweep at the first step that does not hold"
    )
    ap.add_argument("--json", help="also write every row (all fields) to this file as JSON")
    ap.add_argument("--smoke", action="store_true", help="each workload at a tiny N for 2 s (CI: make bench-smoke)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}: choose among a, b, c")
    build()
    if "c" in workloads:
        janus_binary()
    root = Path(args.gateway_root).resolve()
    python = args.gateway_python or sys.executable
    opts = Options(
        python=python,
        root=root,
        defaults=gateway_defaults(python, root) if set(workloads) & {"a", "b"} else GatewayDefaults(0, 0, True, "-"),
        seconds=2.0 if args.smoke else args.seconds,
        idle_seconds=1.0 if args.smoke else 3.0,
        workers=args.workers,
        calls_per_worker=args.calls_per_worker,
        ingress=args.ingress,
        prebuffer=args.janus_prebuffer,
        janus_legs_hear=args.janus_legs_hear,
    )
    print(
        f"{NCPU} cores, {opts.seconds:.0f} s measured per step; gateway: ingress {opts.ingress}, "
        f"{opts.calls_per_worker or opts.defaults.calls_per_worker} calls per worker, pjsip {opts.defaults.pjsip} "
        f"({opts.root}, {opts.python})" + (f"; Janus {janus_version()}" if "c" in workloads else "")
    )
    sizes = {
        w: SMOKE_SIZES[w] if args.smoke else (getattr(args, f"sizes_{w}") or args.sizes or DEFAULT_SIZES[w])
        for w in workloads
    }
    # Step by step in increasing N, the workloads interleaved: a and c at the same N run minutes
    # apart, not a whole sweep apart, so a neighbour's load skews their ratio less.
    rows: dict[str, list[dict[str, Any]]] = {w: [] for w in workloads}
    spent = dict.fromkeys(workloads, 0.0)
    stopped: dict[str, str] = {}
    for n in sorted({n for w in workloads for n in sizes[w]}):
        for w in workloads:
            if n not in sizes[w] or w in stopped:
                continue
            if spent[w] > args.budget:
                stopped[w] = f"(time budget of {args.budget:.0f} s used up before N={n})"
                continue
            t = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="bench-sip-") as tmp:
                step = janus_step(n, opts, Path(tmp)) if w == "c" else gateway_step(w, n, opts, Path(tmp))
                try:
                    r = asyncio.run(step)
                except Exception as exc:  # before the step could start (e.g. no room for its ports)
                    r = {"n": n, "monitored": 0, "procs": 0, "error": f"{type(exc).__name__}: {exc}"[:240]}
            spent[w] += time.monotonic() - t
            rows[w].append(r)
            print(f"[{w}] {fmt(r)}", file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"options": vars(args), "rows": rows}, indent=1, default=str))
            if not args.keep_going and not args.smoke and ("frames" not in r or not holds(r)):
                stopped[w] = f"(stopped after N={n}: it did not hold)"
    for w in workloads:
        print("\n" + TITLES[w].format(ingress="SIPREC" if opts.ingress == "siprec" else "one INVITE per leg"))
        print(HEAD)
        print("-" * len(HEAD))
        for r in rows[w]:
            print(fmt(r))
        held = [r for r in rows[w] if "frames" in r and holds(r)]
        fast = [r["n"] for r in held if r["lat_p99"] <= TARGET_P99_MS]
        print(
            f"largest N held: {max((r['n'] for r in held), default=0)}, with added latency p99 <= "
            f"{TARGET_P99_MS:.0f} ms: {max(fast, default=0)} {stopped.get(w, '')}".rstrip()
        )
    print_ratios(rows)
    print(
        "\nlat: burst sent -> first loud packet of the mix at the sink (kernel timestamps); CPU%/conv: the system"
        " under test (gateway: main + workers; Janus) over the window / N, % of one core; main%: the gateway's main"
        " process, % of one core; idle%: the system under test before any call, % of one core; MB/conv: its RSS / N;"
        f" +MB/conv: (RSS - idle RSS) / N; mach%: whole machine, % of all {NCPU} cores; gen%, sink%: the bench's RTP"
        " sender and sink, % of one core; gen lag: worst lateness of the sender's tick; start: start-up until ready;"
        " setup: conversations, calls and monitors until every monitored mix reached the sink; rst: worker restarts"
    )


if __name__ == "__main__":
    main()
