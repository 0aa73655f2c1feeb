"""What measuring voice quality costs a SIP worker: one ``getStreamStat`` per monitored stream per second.

    python bench/quality_stats.py                    # 16 and 64 per-leg conversations (smoke)
    python bench/quality_stats.py --conversations 64 256 --seconds 10

A real SIP plane with one real worker (``gateway.sip.worker``); the bench places N per-leg
conversations (2 calls each: agent and customer) through the front by hand and sends RTP on
every leg (20 ms PCMU). Every conversation is "heard" (a tap is open on it), so the worker
reads each stream's statistics once a second, its jitter-buffer level 3 more times, and reports
a ``LegQuality`` per conversation: the worst case, where every call of the worker is monitored.
The worker times those reads itself (``Stats.stats_us``: reading the statistics, building and
sending the reports) and the bench
reports the median over ``--seconds``, per stream, and as a share of one core. Compare with the
same worker's whole CPU over the window (``/proc``: utime + stime), which includes its media.

Prints one table; no asserts. Needs the project's pjsua2 build (512 calls per worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import Settings  # noqa: E402
from gateway.sip.plane import SipPlane  # noqa: E402
from tests.sip_support import FakeHooks, RawSip, free_udp_block, raw_leg_call  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def send_rtp(sock: socket.socket, ports: list[int], seconds: float) -> None:
    """20 ms PCMU silence-free packets to every leg's port, one burst per tick."""
    payload = bytes(random.getrandbits(8) | 0x10 for _ in range(160))
    ssrcs = [random.getrandbits(32) for _ in ports]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for n in range(int(seconds * 50)):
        for port, ssrc in zip(ports, ssrcs, strict=True):
            header = struct.pack("!BBHII", 0x80, 0, n & 0xFFFF, (n * 160) & 0xFFFFFFFF, ssrc)
            try:
                sock.sendto(header + payload, ("127.0.0.1", port))
            except BlockingIOError:
                pass
        await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.02 - loop.time()))


async def run(n: int, seconds: float) -> dict[str, float]:
    cids = [f"q-{i}" for i in range(n)]
    hooks = FakeHooks({cid: "alice" for cid in cids})
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            sip_port=free_udp_block(2),
            sip_workers=1,
            rtp_port_base=free_udp_block(8 * n + 40, 22000, 50000),
            data_dir=tmp,
            sip_media_timeout=0,
            sip_invite_rate=0,
        )
        plane = SipPlane(settings, hooks)
        await plane.start()
        sip = RawSip()
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp.setblocking(False)
        try:
            ports = []
            for cid in cids:
                for leg in ("agent", "customer"):
                    ports.append((await raw_leg_call(sip, settings.sip_port, cid, leg)).media_port)
            taps = [plane.open_tap(cid, maxsize=5) for cid in cids]
            sender = asyncio.create_task(send_rtp(rtp, ports, seconds + 3))
            await asyncio.sleep(3)  # baselines, then steady reports
            worker = plane.workers[0]
            samples: list[int] = []
            reported = 0
            t0, c0 = time.monotonic(), cpu_seconds(worker.pid)
            end = t0 + seconds
            seen = -1
            while time.monotonic() < end:
                await asyncio.sleep(0.1)
                if worker.last_seen != seen:
                    seen = worker.last_seen
                    samples.append(worker.stats_us)
                    reported = sum(1 for cid in cids if plane.leg_quality(cid) is not None)
                for tap in taps:  # keep the taps drained (their frames are not what is measured)
                    while tap.next_frame_nowait() is not None:
                        pass
            wall, cpu = time.monotonic() - t0, cpu_seconds(worker.pid) - c0
            sender.cancel()
            for tap in taps:
                tap.close()
        finally:
            rtp.close()
            sip.close()
            await plane.stop()
    pass_us = statistics.median(samples) if samples else float("nan")
    return {
        "streams": 2 * n,
        "reported": reported,
        "pass_us": pass_us,
        "per_stream_us": pass_us / (2 * n),
        "pass_core_pct": pass_us / 1e6 * 100,
        "worker_core_pct": 100 * cpu / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    print(
        f"load average {os.getloadavg()[0]:.1f}; one worker, every conversation monitored, {args.seconds:.0f} s windows"
    )
    print(
        "| conversations | streams | reports/s | stats pass µs (median) | µs per stream | pass % of a core | worker % of a core |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.conversations:
        r = asyncio.run(run(n, args.seconds))
        print(
            f"| {n} | {r['streams']:.0f} | {r['reported']:.0f} | {r['pass_us']:.0f} | {r['per_stream_us']:.1f} | "
            f"{r['pass_core_pct']:.2f} | {r['worker_core_pct']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
