"""How many WebRTC voice monitors can the gateway's media path carry?

N fake-tap conversations, each monitored by one aiortc receiver in *other* processes, over
loopback with real ICE/DTLS/SRTP:

* gateway side: ``--senders`` media processes, each an aiohttp server answering WHEP offers
  with :func:`gateway.media.whep.answer_whep` (pre-encoded mono Opus). Every process has one
  20 ms ticker feeding all its conversations' taps (a stand-in for the SIP plane's frames);
* listener side: ``--receivers`` processes of aiortc peer connections (recvonly) that do not
  decrypt or decode: they time-stamp each SRTP packet's clear RTP header (sequence number,
  RTP timestamp) as it comes off the socket and drop it; ICE/DTLS/RTCP stay real.

Per size N it reports: late frames (a packet arriving more than ``--late-ms`` after its slot
on the best-case path of that stream, or never, or a tick where the gateway had no frame in
time and sent silence), join -> first audio (from the receiver's createOffer to the first
RTP packet) p50/p99, gateway CPU per monitor (% of one core) and RSS per monitor. It stops at
the first size whose late-frame rate is >= 0.1 %. Receivers run on the same cores, so the
gateway's numbers are measured under that competition: read them as an upper bound of cost.

    python bench/voice_webrtc.py --smoke            # 4 monitors, 3 s: does it work at all
    python bench/voice_webrtc.py --sizes 25,50,100,150,200,300 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ================================================================== gateway media process
class TickerTaps:
    """One 20 ms ticker per process pushing the same precomputed LegFrame into every tap."""

    def __init__(self) -> None:
        import numpy as np

        from gateway.media.fake import tone
        from gateway.media.frames import LegFrame

        self._frames = [LegFrame("bench", i, 8000, tone(600, 160, 8000, i * 160), tone(1000, 160, 8000, i * 160)) for i in range(10)]
        self._np = np
        self.taps: set[_Tap] = set()
        self.late_ticks = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while True:
            frame = self._frames[n % len(self._frames)]
            for tap in self.taps:
                tap.push(frame)
            n += 1
            delay = t0 + n * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.02:
                self.late_ticks += 1

    def new_tap(self) -> "_Tap":
        tap = _Tap(self)
        self.taps.add(tap)
        return tap


class _Tap:
    def __init__(self, owner: TickerTaps) -> None:
        import collections

        self.owner = owner
        self.queue: collections.deque[Any] = collections.deque(maxlen=10)
        self.ready = asyncio.Event()
        self.closed = False

    def push(self, frame: Any) -> None:
        self.queue.append(frame)
        self.ready.set()

    def next_frame_nowait(self) -> Any:
        if self.queue:
            return self.queue.popleft()
        if self.closed:
            raise EOFError
        return None

    async def next_frame(self) -> Any:
        while not self.queue:
            if self.closed:
                raise EOFError
            self.ready.clear()
            await self.ready.wait()
        return self.queue.popleft()

    def close(self) -> None:
        self.closed = True
        self.owner.taps.discard(self)
        self.ready.set()


def _batch_stats() -> dict[str, Any]:
    from gateway.media.batch import BatchSender

    b = BatchSender.instance()
    stats = {"batch_ticks": b.ticks, "batch_lagged": b.lagged_ticks, "batch_max_lag_ms": 1000 * b.max_lag}
    b.max_lag = 0.0  # per window
    return stats


def sender_main(port_q: "mp.Queue[int]", index: int, codec: str = "opus", batch: bool = False) -> None:
    asyncio.run(_sender(port_q, index, codec, batch))


async def _sender(port_q: "mp.Queue[int]", index: int, codec: str = "opus", batch: bool = False) -> None:
    import logging

    from aiohttp import web

    from gateway.config import Settings
    from gateway.media.whep import answer_whep

    logging.disable(logging.WARNING)
    settings = Settings(ice_host_addresses="127.0.0.1")
    ticker = TickerTaps()
    sessions: list[Any] = []

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        sdp, session = await answer_whep(offer, ticker.new_tap(), settings=settings, stereo=False, codec=codec, batch=batch)
        sessions.append(session)
        return web.Response(status=201, text=sdp, content_type="application/sdp", headers={"Location": f"/whep/{session.id}"})

    async def stats(request: web.Request) -> web.Response:
        st = [s.track.stats for s in sessions]
        return web.json_response(
            {
                "cpu": _cpu_seconds(),
                "rss": _rss_bytes(),
                "sessions": len(sessions),
                "connected": sum(1 for s in sessions if s.state == "connected"),
                "underruns": sum(x.underruns for x in st),
                "dropped": sum(x.dropped for x in st),
                "resyncs": sum(x.resyncs for x in st),
                "frames_out": sum(x.frames_out for x in st),
                "late_ticks": ticker.late_ticks,
                **_batch_stats(),
            }
        )

    app = web.Application()
    app.router.add_post("/whep", whep)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    port_q.put(port)
    await asyncio.Event().wait()


# ================================================================== listener process
@dataclass
class Listen:
    name: str
    join_start: float = 0.0
    first_audio: float | None = None
    arrivals: list[tuple[float, int, int]] | None = None  # (monotonic, seq, rtp ts)


def receiver_main(jobs: list[tuple[int, str]], join_rate: float, ctl: Any, out_q: "mp.Queue[Any]", clock: int = 48000) -> None:
    asyncio.run(_receiver(jobs, join_rate, ctl, out_q, clock))


async def _receiver(jobs: list[tuple[int, str]], join_rate: float, ctl: Any, out_q: "mp.Queue[Any]", clock: int = 48000) -> None:
    import logging

    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from gateway.media.ice import host_addresses

    logging.disable(logging.WARNING)
    listens: list[Listen] = []
    pcs: list[Any] = []
    recording = {"on": True}

    async def join(http: aiohttp.ClientSession, port: int, name: str) -> None:
        rec = Listen(name, join_start=time.monotonic(), arrivals=[])
        listens.append(rec)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.append(pc)
        pc.addTransceiver("audio", direction="recvonly")
        offer = await pc.createOffer()
        with host_addresses(["127.0.0.1"]):
            await pc.setLocalDescription(offer)
        conn = pc.getTransceivers()[0].receiver.transport.transport._connection
        deliver = conn.data_received

        def on_data(data: bytes, component: int) -> None:
            # SRTP leaves the RTP header in clear: time-stamp sequence number and timestamp
            # straight off the socket and drop the packet -- no queue, no DTLS, no decrypt,
            # so the listeners cost little next to the gateway they measure. DTLS and RTCP
            # (payload types 200-204 with the marker bit) go on to aiortc as usual.
            if len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                now = time.monotonic()
                if rec.first_audio is None:
                    rec.first_audio = now
                if recording["on"]:
                    seq, ts = struct.unpack_from("!HI", data, 2)
                    rec.arrivals.append((now, seq, ts))  # type: ignore[union-attr]
                return
            deliver(data, component)

        conn.data_received = on_data  # time-stamp, never decode
        async with http.post(f"http://127.0.0.1:{port}/whep", data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}) as res:
            answer = await res.text()
            if res.status != 201:
                raise RuntimeError(f"whep {res.status}: {answer[:200]}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async with aiohttp.ClientSession() as http:
        tasks = []
        for port, name in jobs:
            tasks.append(asyncio.create_task(join(http, port, name)))
            await asyncio.sleep(1.0 / join_rate)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        out_q.put(("joined", len(jobs) - len(errors), errors[:3]))
        # wait for the measurement window (t0, t1) from the orchestrator
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ctl.recv)  # "mark": the window starts
        cpu0 = _cpu_seconds()
        t0, t1 = await loop.run_in_executor(None, ctl.recv)
        recording["on"] = False
        cpu = _cpu_seconds() - cpu0
        summary = [_analyse(rec, t0, t1, clock) for rec in listens]
        out_q.put(("done", summary, cpu))
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)


LATE_MS = 40.0


def _analyse(rec: Listen, t0: float, t1: float, clock: int = 48000) -> dict[str, Any]:
    pts = [a for a in (rec.arrivals or []) if t0 <= a[0] <= t1]
    join = None if rec.first_audio is None else rec.first_audio - rec.join_start
    if len(pts) < 2:
        return {"join": join, "expected": int((t1 - t0) * 50), "late": int((t1 - t0) * 50), "lost": 0}
    # unwrap RTP timestamps and sequence numbers
    base_ts, base_seq = pts[0][2], pts[0][1]
    offs, seqs = [], set()
    for now, seq, ts in pts:
        dts = (ts - base_ts) & 0xFFFFFFFF
        dseq = (seq - base_seq) & 0xFFFF
        seqs.add(dseq)
        offs.append(now - dts / clock)
    best = min(offs)
    lateness = sorted((o - best) * 1000.0 for o in offs)
    late = sum(1 for x in lateness if x > LATE_MS)
    expected = max(seqs) + 1
    lost = expected - len(seqs)
    p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
    return {"join": join, "expected": expected, "late": late, "lost": lost, "p99_ms": p99, "max_ms": lateness[-1]}


# ================================================================== floor
def transport_floor(streams: int = 200, seconds: float = 1.0) -> dict[str, float]:
    """CPU per packet of the irreducible part -- RTP header, SRTP protect, one UDP send --
    done in one tight loop over many streams (what a batched sender would cost), next to a
    G.711 lookup and a mono Opus encode of one frame."""
    import socket

    import numpy as np
    from pylibsrtp import Policy, Session

    from gateway.media.fake import tone
    from gateway.media.g711 import G711PacketEncoder
    from gateway.media.mixer import mix_mono
    from gateway.media.opus import OpusPacketEncoder

    key = bytes(range(30))
    sessions = []
    for i in range(streams):
        pol = Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND)
        sessions.append(Session(pol))
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = rx.getsockname()
    payload = bytes(160)
    hdr = struct.Struct("!BBHII")
    n = 0
    t0 = _cpu_seconds()
    while _cpu_seconds() - t0 < seconds:
        for i, sess in enumerate(sessions):
            pkt = sess.protect(hdr.pack(0x80, 0, n & 0xFFFF, (n * 160) & 0xFFFFFFFF, i + 1) + payload)
            tx.sendto(pkt, dest)
            try:
                rx.recv(2048)  # keep the socket buffer from filling (counted: ~half of the syscalls)
            except BlockingIOError:
                pass
        n += 1
    per_packet = (_cpu_seconds() - t0) / (n * streams)
    a, c = tone(600, 160, 8000), tone(1000, 160, 8000)
    g = G711PacketEncoder("pcmu")
    o = OpusPacketEncoder(8000)
    t0 = _cpu_seconds()
    for i in range(500):
        g.encode(mix_mono(a, c), i)
    g711 = (_cpu_seconds() - t0) / 500
    t0 = _cpu_seconds()
    for i in range(500):
        o.encode(mix_mono(a, c), i)
    opus = (_cpu_seconds() - t0) / 500
    del np
    return {"srtp_udp_us": per_packet * 1e6, "g711_us": g711 * 1e6, "opus_us": opus * 1e6}


# ================================================================== orchestration
async def _get_json(port: int) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/stats") as res:
            return await res.json()


def run_size(n: int, *, senders: int, receivers: int, duration: float, warmup: float, join_rate: float, codec: str = "opus", batch: bool = False) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port_q: "mp.Queue[int]" = ctx.Queue()
    sprocs = [ctx.Process(target=sender_main, args=(port_q, i, codec, batch), daemon=True) for i in range(senders)]
    for p in sprocs:
        p.start()
    ports = [port_q.get(timeout=60) for _ in sprocs]
    base = [asyncio.run(_get_json(p)) for p in ports]

    jobs: list[list[tuple[int, str]]] = [[] for _ in range(receivers)]
    for i in range(n):
        jobs[i % receivers].append((ports[i % senders], f"c-{i}"))
    out_q: "mp.Queue[Any]" = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(receivers)]
    rprocs = [ctx.Process(target=receiver_main, args=(jobs[i], join_rate / receivers, pipes[i][1], out_q, 8000 if codec in ("pcmu", "pcma") else 48000), daemon=True) for i in range(receivers)]
    for p in rprocs:
        p.start()
    joined, errors = 0, []
    for _ in rprocs:
        kind, count, errs = out_q.get(timeout=120 + n / join_rate * 3)
        joined += count
        errors += errs
    time.sleep(warmup)
    s0 = [asyncio.run(_get_json(p)) for p in ports]
    t0 = time.monotonic()
    for a, _b in pipes:
        a.send("mark")
    time.sleep(duration)
    t1 = time.monotonic()
    s1 = [asyncio.run(_get_json(p)) for p in ports]
    for a, _b in pipes:
        a.send((t0, t1))
    per: list[dict[str, Any]] = []
    rcpu = 0.0
    for _ in rprocs:
        kind, summary, cpu = out_q.get(timeout=120)
        per += summary
        rcpu += cpu
    for p in rprocs + sprocs:
        p.terminate()
    for p in rprocs + sprocs:
        p.join(5)

    wall = t1 - t0
    expected = sum(x["expected"] for x in per)
    late_rx = sum(x["late"] for x in per)
    lost = sum(x["lost"] for x in per)
    underruns = sum(b["underruns"] - a["underruns"] for a, b in zip(s0, s1))
    dropped = sum(b["dropped"] - a["dropped"] for a, b in zip(s0, s1))
    frames_out = sum(b["frames_out"] - a["frames_out"] for a, b in zip(s0, s1))
    late_total = late_rx + lost + underruns
    joins = sorted(x["join"] for x in per if x["join"] is not None)
    p99s = sorted(x.get("p99_ms", 0.0) for x in per)
    gw_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(s0, s1)) / wall
    rss = sum(b["rss"] - a["rss"] for a, b in zip(base, s1))
    return {
        "n": n,
        "joined": joined,
        "connected": sum(b["connected"] for b in s1),
        "errors": errors,
        "expected": expected,
        "late_rx": late_rx,
        "lost": lost,
        "underruns": underruns,
        "dropped": dropped,
        "frames_out": frames_out,
        "jitter_p99_ms": statistics.median(p99s) if p99s else None,
        "jitter_max_ms": max((x.get("max_ms", 0.0) for x in per), default=None),
        "late_pct": min(100.0, 100.0 * late_total / max(1, expected)),
        "join_p50_ms": 1000 * statistics.median(joins) if joins else None,
        "join_p99_ms": 1000 * joins[min(len(joins) - 1, int(len(joins) * 0.99))] if joins else None,
        "gw_cpu_pct": 100 * gw_cpu,
        "gw_cpu_per_monitor_pct": 100 * gw_cpu / max(1, n),
        "rss_per_monitor_kb": rss / max(1, n) / 1024,
        "rx_cpu_pct": 100 * rcpu / wall,
        "late_ticks": sum(b["late_ticks"] - a["late_ticks"] for a, b in zip(s0, s1)),
        "gw_lagged_ticks": sum(b["batch_lagged"] - a["batch_lagged"] for a, b in zip(s0, s1)),
        "gw_max_lag_ms": max(b["batch_max_lag_ms"] for b in s1),
        "wall": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25,50,100,150,200,300")
    ap.add_argument("--senders", type=int, default=2, help="gateway media processes")
    ap.add_argument("--receivers", type=int, default=2, help="listener processes")
    ap.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--join-rate", type=float, default=40.0, help="joins per second (all receivers)")
    ap.add_argument("--codec", default="opus", choices=["opus", "pcmu"], help="what the gateway sends")
    ap.add_argument("--batch", action="store_true", help="gateway sends with gateway.media.batch (one tick for all listeners)")
    ap.add_argument("--late-ms", type=float, default=LATE_MS)
    ap.add_argument("--smoke", action="store_true", help="4 monitors, 3 s, one of each process")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first failing size")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    globals()["LATE_MS"] = args.late_ms
    if args.smoke:
        sizes, args.senders, args.receivers, args.duration, args.warmup = [4], 1, 1, 3.0, 1.0
    else:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    print(f"codec={args.codec} batch={args.batch} cores={os.cpu_count()} senders={args.senders} receivers={args.receivers} window={args.duration}s late>{args.late_ms}ms  load={os.getloadavg()[0]:.2f}")
    hdr = f"{'N':>5} {'ok':>5} {'late%':>7} {'lateRx':>6} {'lost':>5} {'under':>6} {'join p50':>9} {'join p99':>9} {'jit99':>6} {'jitmax':>6} {'gwCPU%':>7} {'%/mon':>6} {'RSS kB/mon':>10} {'rxCPU%':>7}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    best = 0
    for n in sizes:
        row = run_size(n, senders=args.senders, receivers=args.receivers, duration=args.duration, warmup=args.warmup, join_rate=args.join_rate, codec=args.codec, batch=args.batch)
        rows.append(row)
        ok = row["late_pct"] < 0.1 and row["joined"] == n
        fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        print(
            f"{n:>5} {'yes' if ok else 'NO':>5} {row['late_pct']:>7.3f} {row['late_rx']:>6} {row['lost']:>5} {row['underruns']:>6} "
            f"{fmt(row['join_p50_ms']):>9} {fmt(row['join_p99_ms']):>9} {fmt(row['jitter_p99_ms']):>6} {fmt(row['jitter_max_ms']):>6} {row['gw_cpu_pct']:>7.1f} {row['gw_cpu_per_monitor_pct']:>6.2f} {row['rss_per_monitor_kb']:>10.0f} {row['rx_cpu_pct']:>7.1f}",
            flush=True,
        )
        if args.batch:
            print(f"      gateway ticks >20 ms late: {row['gw_lagged_ticks']}, worst {row['gw_max_lag_ms']:.0f} ms")
        if row["errors"]:
            print("   errors:", row["errors"])
        if ok:
            best = n
        elif not args.keep_going:
            break
    print(f"\nlargest N with <0.1% late frames: {best}  (load now {os.getloadavg()[0]:.2f})")
    floor = transport_floor(seconds=0.5 if args.smoke else 2.0)
    per_frame = floor["srtp_udp_us"] + floor["opus_us" if args.codec == "opus" else "g711_us"]
    print(
        f"floor without aiortc's per-packet path: RTP+SRTP+UDP send {floor['srtp_udp_us']:.0f} us/packet, "
        f"mix+G.711 {floor['g711_us']:.0f} us, mix+Opus {floor['opus_us']:.0f} us per frame "
        f"-> {per_frame * 50 / 1e4:.2f} % of a core per monitor ({args.codec})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
