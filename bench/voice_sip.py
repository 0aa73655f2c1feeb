"""Bench of the SIP voice path: N per-leg conversations held through SipPlane, taps read.

    python bench/voice_sip.py [--conversations 4] [--seconds 10]

The bench is the platform itself: a tiny asyncio SIP UAC per leg (INVITE → 302 → INVITE the
worker → ACK → RTP → BYE) sends G.711 RTP paced at 20 ms. Every 500 ms one packet carries a
loud 1 kHz burst instead of silence; the time from sending that packet to the first tap frame
that carries it is the "added latency" (RTP in → pjsua jitter buffer → conference bridge → tap
port → datagram → main process asyncio). Lost = tap sequence gaps, late = a frame more than
40 ms behind its 20 ms schedule. CPU is read from /proc for the worker processes and this
process (which also runs the RTP senders, so its share is an upper bound for the main process).
Prints one table; no asserts.
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import Settings  # noqa: E402
from gateway.sip.message import parse_message, parse_sdp  # noqa: E402
from gateway.sip.plane import SipPlane  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
SILENCE = b"\xff" * 160
BURST = (b"\x80\x80\x80\x80\x00\x00\x00\x00" * 20)  # 1 kHz square wave near full scale


def free_port_block(n: int) -> int:
    for _ in range(200):
        base = random.randrange(21000, 59000 - n)
        ok = True
        for p in range(base, base + n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                s.close()
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no free ports")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Hooks:
    def __init__(self, convs: set[str]) -> None:
        self.convs = convs

    def conversation_agent(self, cid: str) -> str | None:
        return "alice" if cid in self.convs else None

    def accepting(self) -> bool:
        return True

    def on_leg_started(self, cid: str, leg: str) -> None:
        pass

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None:
        pass

    def on_phone_ended(self, monitor_id: str, reason: str) -> None:
        pass


class SipUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)


class Leg:
    """One platform leg: SIP signalling over its own UDP socket and an RTP sender."""

    def __init__(self, cid: str, leg: str, front: tuple[str, int]) -> None:
        self.cid, self.leg, self.front = cid, leg, front
        self.call_id = uuid.uuid4().hex
        self.tag = uuid.uuid4().hex[:8]
        self.bursts: list[float] = []

    async def _final(self, proto: SipUdp, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        while True:
            msg = parse_message(await asyncio.wait_for(proto.queue.get(), timeout))
            if msg.status and msg.status >= 200:
                return msg

    def _req(self, method: str, uri: str, cseq: int, to_tag: str = "", body: bytes = b"") -> bytes:
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.sip_port};branch=z9hG4bK{uuid.uuid4().hex[:10]};rport",
            f"From: <sip:platform@127.0.0.1:{self.sip_port}>;tag={self.tag}",
            f"To: <sip:gateway@{self.front[0]}:{self.front[1]}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:platform@127.0.0.1:{self.sip_port}>",
            f"X-Conversation-ID: {self.cid}",
            f"X-Leg: {self.leg}",
            "Max-Forwards: 70",
        ]
        if body:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        base = free_port_block(2)
        self.sip_port, self.rtp_port = base, base + 1
        self.sip_t, self.proto = await loop.create_datagram_endpoint(SipUdp, local_addr=("127.0.0.1", self.sip_port))
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", self.rtp_port))
        self.rtp.setblocking(False)
        offer = (
            "v=0\r\no=p 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {self.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendonly\r\n"
        ).encode()
        self.sip_t.sendto(self._req("INVITE", f"sip:gw@{self.front[0]}:{self.front[1]}", 1, body=offer), self.front)
        r = await self._final(self.proto)
        assert r.status == 302, f"front answered {r.status} {r.reason}"
        ack = self._req("ACK", f"sip:gw@{self.front[0]}:{self.front[1]}", 1, (r.get("to") or "").split("tag=")[-1])
        self.sip_t.sendto(ack, self.front)
        contact = (r.get("contact") or "").strip("<>")
        host, port = contact.split("@", 1)[1].split(":")
        self.worker = (host, int(port))
        self.uri = contact
        self.sip_t.sendto(self._req("INVITE", self.uri, 2, body=offer), self.worker)
        r = await self._final(self.proto)
        assert r.status == 200, f"worker answered {r.status} {r.reason}"
        self.to_tag = (r.get("to") or "").split("tag=")[-1]
        self.sip_t.sendto(self._req("ACK", self.uri, 2, self.to_tag), self.worker)
        stream = parse_sdp(r.body)[0]
        chost = next(ln[9:].strip() for ln in r.body.decode().splitlines() if ln.startswith("c=IN IP4"))
        self.media = (chost, stream.port)

    async def send_rtp(self, seconds: float) -> None:
        ssrc = random.getrandbits(32)
        seq = random.getrandbits(16)
        ts = random.getrandbits(32)
        t0 = time.monotonic()
        n = int(seconds / 0.02)
        for i in range(n):
            target = t0 + i * 0.02
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            burst = i % 25 == 10
            hdr = struct.pack("!BBHII", 0x80, 0, (seq + i) & 0xFFFF, (ts + 160 * i) & 0xFFFFFFFF, ssrc)
            if burst:
                self.bursts.append(time.monotonic())
            self.rtp.sendto(hdr + (BURST if burst else SILENCE), self.media)

    async def bye(self) -> None:
        self.sip_t.sendto(self._req("BYE", self.uri, 3, self.to_tag), self.worker)
        try:
            await self._final(self.proto, 3.0)
        except asyncio.TimeoutError:
            pass
        self.sip_t.close()
        self.rtp.close()


async def read_tap(tap, out: dict) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    arrivals: list[tuple[float, int]] = []
    loud_prev = {"agent": False, "customer": False}
    onsets: dict[str, list[float]] = {"agent": [], "customer": []}
    try:
        while True:
            f = await tap.next_frame()
            now = time.monotonic()
            arrivals.append((now, f.seq))
            for leg, pcm in (("agent", f.agent), ("customer", f.customer)):
                loud = int(np.abs(pcm).max()) > 8000
                if loud and not loud_prev[leg]:
                    onsets[leg].append(now)
                loud_prev[leg] = loud
    except (EOFError, asyncio.CancelledError):
        pass
    out["arrivals"] = arrivals
    out["onsets"] = onsets
    out["dropped"] = tap.dropped


async def run(n: int, seconds: float, workers: int, with_phone: bool) -> dict[str, float]:
    base = free_port_block(workers + 1)
    rtp = free_port_block(40 * workers)
    cids = {f"bench-{i}" for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(sip_port=base, sip_workers=workers, calls_per_worker=4, rtp_port_base=rtp, data_dir=tmp)
        plane = SipPlane(settings, Hooks(cids))
        await plane.start()
        try:
            pids = plane.worker_pids()
            # idle cost of the workers
            c0 = {p: cpu_seconds(p) for p in pids}
            await asyncio.sleep(3.0)
            idle = sum(cpu_seconds(p) - c0[p] for p in pids) / 3.0 / len(pids)
            legs = [Leg(cid, leg, ("127.0.0.1", base)) for cid in sorted(cids) for leg in ("agent", "customer")]
            for lg in legs:
                await lg.connect()
            phone = None
            if with_phone:
                # One pjsua2 phone process answers every conversation's supervisor call (4 max).
                phone_port = free_port_block(24)
                phone = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway.sip.phone", "--port", str(phone_port), "--rtp-port", str(phone_port + 2),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=str(ROOT),
                    env=dict(os.environ, PYTHONPATH=str(ROOT)),
                )  # fmt: skip
                assert phone.stdout is not None
                while not (await asyncio.wait_for(phone.stdout.readline(), 10)).startswith(b"READY"):
                    pass  # pjsua's start-up log lines
                for i, cid in enumerate(sorted(cids)):
                    await plane.call_phone(cid, f"m-{i}", f"sip:sup@127.0.0.1:{phone_port}")
                connected = 0
                while connected < len(cids):
                    line = await asyncio.wait_for(phone.stdout.readline(), 10)
                    connected += line.startswith(b"CONNECTED")
            taps = {cid: plane.open_tap(cid, maxsize=200) for cid in cids}
            results: dict[str, dict] = {cid: {} for cid in cids}
            readers = [asyncio.create_task(read_tap(taps[cid], results[cid])) for cid in cids]
            await asyncio.sleep(0.5)
            me = os.getpid()
            w0 = {p: cpu_seconds(p) for p in pids}
            m0 = cpu_seconds(me)
            t0 = time.monotonic()
            await asyncio.gather(*(lg.send_rtp(seconds) for lg in legs))
            elapsed = time.monotonic() - t0
            wcpu = sum(cpu_seconds(p) - w0[p] for p in pids) / elapsed
            mcpu = (cpu_seconds(me) - m0) / elapsed
            rss_workers = sum(rss_mb(p) for p in pids)
            rss_main = rss_mb(me)
            stats = plane.stats()
            await asyncio.sleep(0.3)
            for t in taps.values():
                t.close()
            await asyncio.gather(*readers)
            for lg in legs:
                await lg.bye()
            if phone is not None:
                phone.terminate()
                await phone.wait()
        finally:
            await plane.stop()
    frames = lost = late = 0
    lat: list[float] = []
    for cid in cids:
        arr = results[cid]["arrivals"]
        if not arr:
            continue
        seqs = [s for _, s in arr]
        frames += len(arr)
        lost += (seqs[-1] - seqs[0] + 1) - len(seqs)
        offsets = [t - 0.02 * (s - seqs[0]) for t, s in arr]
        base_off = min(offsets)
        late += sum(1 for o in offsets if o - base_off > 0.04)
        for lg in legs:
            if lg.cid != cid:
                continue
            onsets = results[cid]["onsets"][lg.leg]
            for sent in lg.bursts:
                after = [o - sent for o in onsets if 0 <= o - sent < 0.5]
                if after:
                    lat.append(min(after))
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {
        "n": n,
        "workers": workers,
        "frames": frames,
        "lost_pct": 100 * lost / max(1, frames + lost),
        "late_pct": 100 * late / max(1, frames),
        "lat_p50": pct(0.5),
        "lat_p99": pct(0.99),
        "bursts": len(lat),
        "worker_cpu_per_conv": 100 * wcpu / n,
        "main_cpu_per_conv": 100 * mcpu / n,
        "rss_per_conv": (rss_workers) / n,
        "rss_main": rss_main,
        "idle_worker_cpu": 100 * idle,
        "tap_drops": stats["frames_dropped_tap"],
        "worker_drops": stats["frames_dropped_worker"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--phone", action="store_true", help="also send each conversation's mix to a SIP phone (<= 4 conversations)")
    args = ap.parse_args()
    rows = []
    for n in args.conversations:
        # per-leg footprint is 3 calls (2 legs + reserved phone): one conversation per worker
        rows.append(asyncio.run(run(n, args.seconds, workers=n, with_phone=args.phone)))
    head = (
        f"{'conv':>4} {'workers':>7} {'frames':>7} {'lost%':>6} {'late%':>6} {'lat p50':>8} {'lat p99':>8} "
        f"{'wrk CPU%/conv':>13} {'main CPU%/conv':>14} {'wrk RSS MB/conv':>15} {'idle CPU%/wrk':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['n']:>4} {r['workers']:>7} {r['frames']:>7} {r['lost_pct']:>6.2f} {r['late_pct']:>6.2f} "
            f"{r['lat_p50']:>6.1f}ms {r['lat_p99']:>6.1f}ms {r['worker_cpu_per_conv']:>13.2f} "
            f"{r['main_cpu_per_conv']:>14.2f} {r['rss_per_conv']:>15.1f} {r['idle_worker_cpu']:>13.2f}"
        )
    print(
        ("\nwith a supervisor SIP phone per conversation (bridge mix in C; the phone process's own CPU is not counted)" if args.phone else "\nno supervisor phone (taps only)")
        + "\nlatency: RTP packet sent -> first tap frame carrying it (n=%s bursts); main CPU includes the"
        " bench's own RTP senders and tap readers; main RSS %.0f MB; tap drops %s, worker drops %s"
        % (",".join(str(r["bursts"]) for r in rows), rows[-1]["rss_main"], rows[-1]["tap_drops"], rows[-1]["worker_drops"])
    )


if __name__ == "__main__":
    main()
