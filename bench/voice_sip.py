"""Bench of the SIP voice path at scale: N monitored conversations held through SipPlane.

    python bench/voice_sip.py                       # sweep N = 4, 8, 16, ... until it breaks
    python bench/voice_sip.py --mode perleg --conversations 4 8 --seconds 10
    python bench/voice_sip.py --monitor tap         # WebRTC-plane taps instead of SIP phones
    python bench/voice_sip.py --smoke               # 2 conversations, 3 s

The bench is the platform and the supervisors. Platform: a tiny asyncio SIP UAC per
conversation (``--mode siprec``: one INVITE with two labelled ``a=sendonly`` streams and
recording metadata; ``--mode perleg``: one INVITE per leg with ``X-Leg``), each to the SIP
front, which forwards it to its worker, then G.711 RTP paced at 20 ms by one sender loop. Every 500 ms one
packet per leg carries a loud 1 kHz burst instead of silence (conversations staggered).

Supervisor (``--monitor phone``, default): every conversation gets a supervisor SIP phone
through ``plane.call_phone`` (the worker's conference bridge mixes both legs in C and sends
RTP). The phones are one light Python UAS in this process (answers INVITE/BYE; all calls'
RTP lands on one socket, told apart by the worker's source port) instead of pjsua2 phone
processes (4 calls each; 75 of them for 300 conversations would measure the phones, not the
gateway). Arrival times are kernel receive timestamps (SO_TIMESTAMPNS), so this process
being busy does not count as gateway latency. ``--monitor tap``: a tap per conversation read
by asyncio in this process (the WebRTC plane's input), times taken on dequeue.

Per N: lost = RTP (phone) or tap sequence gaps; late = a frame more than 40 ms behind its
20 ms schedule; added latency = burst packet sent -> first loud packet at the phone (or tap
frame). CPU from /proc: worker processes (per conversation, idle included), this process
(load generator + plane + receivers), whole machine (% of all cores). RSS of the workers per
conversation. Idle CPU per worker is measured before any call. A step "holds" when setup
succeeded and lost + late < 0.1 %; the sweep stops at the first step that does not hold, or
when ``--budget`` seconds are used up. Prints one table; no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import resource
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devtools.siprec_source import metadata  # noqa: E402
from gateway.config import Settings  # noqa: E402
from gateway.sip.message import SipParseError, parse_message, parse_sdp  # noqa: E402
from gateway.sip.parties import Parties  # noqa: E402
from gateway.sip.placement import Placement  # noqa: E402
from gateway.sip.plane import SipPlane  # noqa: E402
from gateway.sip.supervisor import RTP_PORTS_PER_WORKER  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
SILENCE = b"\xff" * 160
BURST = b"\x80\x80\x80\x80\x00\x00\x00\x00" * 20  # 1 kHz square wave near full scale
LATE_S = 0.040
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def _ulaw_mag(b: int) -> int:
    u = ~b & 0xFF
    exp = (u >> 4) & 7
    return (((u & 0x0F) << 3) + 0x84 << exp) - 0x84


QUIET = bytes(b for b in range(256) if _ulaw_mag(b) < 8000)  # translate() deletes these: loud bytes remain


def free_port_block(n: int, lo: int = 21000, hi: int = 59000) -> int:
    for _ in range(400):
        base = random.randrange(lo, hi - n)
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
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Hooks:
    def __init__(self, convs: set[str]) -> None:
        self.convs = convs
        self.ended: list[tuple[str, str, str]] = []

    def conversation_parties(self, cid: str) -> Parties | None:
        return Parties("alice") if cid in self.convs else None

    def recording_conversation(self, keys: Sequence[str]) -> str | None:
        return None

    def on_streams_attributed(self, cid: str, streams: list[dict[str, str]]) -> None:
        pass

    def accepting(self) -> bool:
        return True

    def on_leg_started(self, cid: str, leg: str) -> None:
        pass

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None:
        self.ended.append((cid, leg, reason))

    def on_phone_ended(self, monitor_id: str, reason: str) -> None:
        self.ended.append((monitor_id, "phone", reason))


class SipUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.queue.put_nowait(data)


@dataclass
class Stream:
    cid: str
    leg: str
    offset: int  # burst phase, in 20 ms ticks
    sock: socket.socket
    dest: tuple[str, int] = ("", 0)
    ssrc: int = field(default_factory=lambda: random.getrandbits(32))
    seq0: int = field(default_factory=lambda: random.getrandbits(16))
    ts0: int = field(default_factory=lambda: random.getrandbits(32))
    bursts: list[float] = field(default_factory=list)  # wall-clock send times


class Call:
    """One platform INVITE (SIPREC: both streams; per-leg: one) through the front."""

    def __init__(self, cid: str, legs: list[str], front: tuple[str, int], siprec: bool, offset: int) -> None:
        self.cid, self.legs, self.front, self.siprec = cid, legs, front, siprec
        self.call_id = uuid.uuid4().hex
        self.tag = uuid.uuid4().hex[:8]
        self.offset = offset
        self.streams: list[Stream] = []
        self.routes: list[str] = []  # the dialog's route set (the front), once answered

    def _req(self, method: str, uri: str, cseq: int, to_tag: str = "", body: bytes = b"", ctype: str = "") -> bytes:
        lines = [
            f"{method} {uri} SIP/2.0",
            *[f"Route: {r}" for r in self.routes],
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.sip_port};branch=z9hG4bK{uuid.uuid4().hex[:10]};rport",
            f"From: <sip:platform@127.0.0.1:{self.sip_port}>;tag={self.tag}",
            f"To: <sip:gateway@{self.front[0]}:{self.front[1]}>" + (f";tag={to_tag}" if to_tag else ""),
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:platform@127.0.0.1:{self.sip_port}>",
            f"X-Conversation-ID: {self.cid}",
            "Max-Forwards: 70",
        ]
        if not self.siprec:
            lines.append(f"X-Leg: {self.legs[0]}")
        elif method == "INVITE":
            lines.append("Require: siprec")
        if body:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def _offer(self) -> tuple[bytes, str]:
        sdp = "v=0\r\no=p 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        for i, st in enumerate(self.streams):
            sdp += (
                f"m=audio {st.sock.getsockname()[1]} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendonly\r\n"
            )
            if self.siprec:
                sdp += f"a=label:{i + 1}\r\n"
        if not self.siprec:
            return sdp.encode(), "application/sdp"
        meta = metadata("sip:alice@pbx.example", "sip:+15551234@pstn.example", self.cid)
        b = "bench-boundary"
        body = (
            f"--{b}\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n"
            f"--{b}\r\nContent-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n\r\n{meta}\r\n--{b}--\r\n"
        )
        return body.encode(), f"multipart/mixed;boundary={b}"

    async def _final(self, timeout: float = 10.0) -> Any:
        while True:
            data = await asyncio.wait_for(self.proto.queue.get(), timeout)
            try:
                msg = parse_message(data)
            except SipParseError:
                continue  # e.g. a worker's RTCP for a neighbouring RTP port
            if msg.status and msg.status >= 200:
                return msg

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.sip_t, self.proto = await loop.create_datagram_endpoint(SipUdp, local_addr=("127.0.0.1", 0))
        self.sip_port = self.sip_t.get_extra_info("sockname")[1]
        for leg in self.legs:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            self.streams.append(Stream(self.cid, leg, self.offset, s))
        body, ctype = self._offer()
        self.sip_t.sendto(
            self._req("INVITE", f"sip:gw@{self.front[0]}:{self.front[1]}", 1, body=body, ctype=ctype), self.front
        )
        r = await self._final()
        if r.status != 200:
            raise RuntimeError(f"the gateway answered {r.status} {r.reason}")
        # In the dialog: to the worker's Contact, through the front along the Record-Route set.
        self.uri = (r.get("contact") or "").split("<", 1)[-1].split(">", 1)[0]
        self.routes = [v.strip() for line in r.get_all("record-route") for v in line.split(",")][::-1]
        self.to_tag = (r.get("to") or "").split("tag=")[-1]
        self.sip_t.sendto(self._req("ACK", self.uri, 1, self.to_tag), self.front)
        chost = next(ln[9:].strip() for ln in r.body.decode().splitlines() if ln.startswith("c=IN IP4"))
        for st, answer in zip(self.streams, parse_sdp(r.body)):
            st.dest = (chost, answer.port)

    async def bye(self) -> None:
        try:
            self.sip_t.sendto(self._req("BYE", self.uri, 3, self.to_tag), self.front)
            await self._final(2.0)
        except (TimeoutError, AttributeError):
            pass
        self.sip_t.close()
        for st in self.streams:
            st.sock.close()


LAGGED = [0]  # sender ticks more than 20 ms late


async def send_rtp(streams: list[Stream], seconds: float, record: bool) -> float:
    """One loop sends every stream's packet each 20 ms tick; returns the worst tick overrun (s)."""
    n = int(seconds / 0.02)
    t0 = time.monotonic()
    worst = 0.0
    hdr = struct.Struct("!BBHII")
    for i in range(n):
        target = t0 + i * 0.02
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            worst = max(worst, -delay)
            if -delay > 0.02:
                LAGGED[0] += 1
            await asyncio.sleep(0)  # behind schedule: still let the phones, plane and timers run
        wall = time.time()
        for st in streams:
            burst = (i + st.offset) % 25 == 10
            pkt = hdr.pack(0x80, 0, (st.seq0 + st.i0 + i) & 0xFFFF, (st.ts0 + 160 * (st.i0 + i)) & 0xFFFFFFFF, st.ssrc)  # type: ignore[attr-defined]
            if burst and record:
                st.bursts.append(wall)
            try:
                st.sock.sendto(pkt + (BURST if burst else SILENCE), st.dest)
            except (BlockingIOError, OSError):
                pass
    for st in streams:
        st.i0 += n  # type: ignore[attr-defined]
    return worst


class PhoneBank:
    """Light supervisor phones: one SIP UAS socket, one RTP socket for every call."""

    def __init__(self) -> None:
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind(("127.0.0.1", 0))
        self.sip.setblocking(False)
        self.port = self.sip.getsockname()[1]
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:  # above net.core.rmem_max (needs CAP_NET_ADMIN): a busy bench must not drop packets
            self.rtp.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 32 << 20)
        except OSError:
            self.rtp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        self.rtp.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.rtp.bind(("127.0.0.1", 0))
        self.rtp.setblocking(False)
        self.rtp_port = self.rtp.getsockname()[1]
        self.by_src: dict[tuple[str, int], str] = {}  # worker RTP address -> cid
        self.answered: dict[str, bytes] = {}  # Call-ID -> our 200 (retransmissions)
        self.recording = False
        self.seen: set[str] = set()
        self.arrivals: dict[str, list[tuple[float, int]]] = {}
        self.onsets: dict[str, list[float]] = {}
        self._loud: dict[str, bool] = {}
        self.packets = 0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sip.fileno(), self._on_sip)
        loop.add_reader(self.rtp.fileno(), self._on_rtp)

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on the phones' RTP socket (receive buffer full)."""
        port = f":{self.rtp_port:04X}"
        with open("/proc/net/udp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 12 and parts[1].endswith(port):
                    return int(parts[-1])
        return -1

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sip.fileno())
        loop.remove_reader(self.rtp.fileno())
        self.sip.close()
        self.rtp.close()

    def _on_sip(self) -> None:
        while True:
            try:
                data, addr = self.sip.recvfrom(65535)
            except BlockingIOError:
                return
            try:
                msg = parse_message(data)
            except SipParseError:
                continue
            if not msg.method or msg.method == "ACK":
                continue
            if msg.method == "INVITE" and msg.call_id in self.answered:
                self.sip.sendto(self.answered[msg.call_id], addr)
                continue
            body = b""
            if msg.method == "INVITE":
                cid = (msg.uri or "").split("sip:", 1)[-1].split("@", 1)[0]
                offer = parse_sdp(msg.body)[0]
                chost = next(ln[9:].strip() for ln in msg.body.decode().splitlines() if ln.startswith("c=IN IP4"))
                self.by_src[(chost, offer.port)] = cid
                body = (
                    "v=0\r\no=sup 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                    f"m=audio {self.rtp_port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=recvonly\r\n"
                ).encode()
            lines = ["SIP/2.0 200 OK"]
            for v in msg.get_all("via"):
                lines.append(f"Via: {v}")
            lines.append(f"From: {msg.get('from')}")
            to = msg.get("to") or ""
            lines.append(f"To: {to}" + ("" if "tag=" in to else f";tag={uuid.uuid4().hex[:8]}"))
            lines.append(f"Call-ID: {msg.call_id}")
            lines.append(f"CSeq: {msg.get('cseq')}")
            lines.append(f"Contact: <sip:sup@127.0.0.1:{self.port}>")
            lines += [f"Record-Route: {rr}" for rr in msg.get_all("record-route")]  # RFC 3261 §12.1.1
            if body:
                lines.append("Content-Type: application/sdp")
            lines.append(f"Content-Length: {len(body)}")
            resp = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            if msg.method == "INVITE":
                self.answered[msg.call_id] = resp
            self.sip.sendto(resp, addr)

    def _on_rtp(self) -> None:
        while True:
            try:
                data, anc, _, addr = self.rtp.recvmsg(2048, 64)
            except BlockingIOError:
                return
            cid = self.by_src.get(addr)
            if cid is None:
                continue
            self.seen.add(cid)
            if not self.recording:
                continue
            self.packets += 1
            ts = time.time()
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", cdata[:16])
                    ts = sec + nsec / 1e9
            seq = (data[2] << 8) | data[3]
            self.arrivals.setdefault(cid, []).append((ts, seq))
            loud = bool(data[12:].translate(None, QUIET))
            if loud and not self._loud.get(cid, False):
                self.onsets.setdefault(cid, []).append(ts)
            self._loud[cid] = loud


async def read_tap(tap: Any, cid: str, bank: dict[str, Any]) -> None:
    arrivals = bank["arrivals"].setdefault(cid, [])
    onsets = bank["onsets"].setdefault(cid, [])
    loud_prev = False
    try:
        while True:
            f = await tap.next_frame()
            if not bank["recording"]:
                continue
            now = time.time()
            arrivals.append((now, f.seq))
            loud = (
                max(
                    abs(int(f.agent.max())),
                    abs(int(f.agent.min())),
                    abs(int(f.customer.max())),
                    abs(int(f.customer.min())),
                )
                > 8000
            )
            if loud and not loud_prev:
                onsets.append(now)
            loud_prev = loud
    except (EOFError, asyncio.CancelledError):
        pass


def unwrap(seqs: list[int]) -> list[int]:
    out, base, prev = [], 0, None
    for s in seqs:
        if prev is not None and s < prev and prev - s > 30000:
            base += 65536
        out.append(s + base)
        prev = s
    return out


async def run(n: int, seconds: float, workers: int, mode: str, monitor: str) -> dict[str, Any]:
    siprec = mode == "siprec"
    base = free_port_block(workers + 1)
    rtp = free_port_block(RTP_PORTS_PER_WORKER * workers, 20000, 59000)
    cids = [f"bench-{i}" for i in range(n)]
    row: dict[str, Any] = {"n": n, "workers": workers, "mode": mode, "monitor": monitor, "error": ""}
    calls: list[Call] = []
    phones = PhoneBank() if monitor == "phone" else None
    tapbank: dict[str, Any] = {"arrivals": {}, "onsets": {}, "recording": False}
    readers: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            sip_port=base,
            sip_workers=workers,
            calls_per_worker=4,
            rtp_port_base=rtp,
            data_dir=tmp,
            # More workers than the default start-up timeout allows on a small machine: give the
            # bench room (the table reports how long start-up took; see the SIP README "Benchmark").
            sip_worker_ready_timeout=300.0,
        )
        hooks = Hooks(set(cids))
        plane = SipPlane(settings, hooks)
        t_start = time.monotonic()
        try:
            await plane.start()
        except RuntimeError as exc:
            row["error"] = f"start: {exc}"[:200]
            return row
        row["startup_s"] = time.monotonic() - t_start
        try:
            pids = plane.worker_pids()
            c0 = {p: cpu_seconds(p) for p in pids}
            await asyncio.sleep(3.0)
            row["idle_worker_cpu"] = 100 * sum(cpu_seconds(p) - c0[p] for p in pids) / 3.0 / len(pids)
            row["rss_idle_worker"] = sum(rss_mb(p) for p in pids) / len(pids)
            legs_of = [["agent", "customer"]] if siprec else [["agent"], ["customer"]]
            for i, cid in enumerate(cids):
                for legs in legs_of:
                    calls.append(Call(cid, legs, ("127.0.0.1", base), siprec, offset=i % 25))
            sem = asyncio.Semaphore(16)

            async def connect(c: Call) -> None:
                async with sem:
                    await c.connect()

            t0 = time.monotonic()
            results = await asyncio.gather(*(connect(c) for c in calls), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            row["setup_s"] = time.monotonic() - t0
            if errors:
                row["error"] = f"{len(errors)} INVITEs failed: {errors[0]!r}"[:200]
                return row
            streams = [st for c in calls for st in c.streams]
            for st in streams:
                st.i0 = 0  # type: ignore[attr-defined]
            # the legs must be up (RTP flowing) before a phone can be called
            keep = asyncio.create_task(send_rtp(streams, 3600, record=False))
            try:
                deadline = time.monotonic() + 20
                while any(plane.legs(cid) != {"agent", "customer"} for cid in cids):
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"legs not up: {sum(plane.legs(c) == {'agent', 'customer'} for c in cids)}/{n}"
                        )
                    await asyncio.sleep(0.1)
                if phones is not None:
                    phones.start()
                    for i, cid in enumerate(cids):
                        await plane.call_phone(cid, f"m-{i}", f"sip:{cid}@127.0.0.1:{phones.port}")
                    deadline = time.monotonic() + 30
                    while len(phones.seen) < n:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"phones with media: {len(phones.seen)}/{n}")
                        await asyncio.sleep(0.1)
                else:
                    taps = {cid: plane.open_tap(cid, maxsize=200) for cid in cids}
                    readers = [asyncio.create_task(read_tap(taps[cid], cid, tapbank)) for cid in cids]
                await asyncio.sleep(1.0)
            finally:
                keep.cancel()
                try:
                    await keep
                except asyncio.CancelledError:
                    pass
            stats0 = plane.stats()
            me = os.getpid()
            w0 = {p: cpu_seconds(p) for p in pids}
            m0 = cpu_seconds(me)
            b0 = machine_busy()
            if phones is not None:
                phones.recording = True
            tapbank["recording"] = True
            t0 = time.monotonic()
            LAGGED[0] = 0
            row["sender_overrun_ms"] = 1000 * await send_rtp(streams, seconds, record=True)
            row["sender_lagged_pct"] = 100 * LAGGED[0] / int(seconds / 0.02)
            elapsed = time.monotonic() - t0
            await asyncio.sleep(0.3)  # the last bursts reach the phones
            if phones is not None:
                phones.recording = False
                row["receiver_drops"] = phones.kernel_drops()
            tapbank["recording"] = False
            b1 = machine_busy()
            row["worker_cpu_per_conv"] = 100 * sum(cpu_seconds(p) - w0[p] for p in pids) / elapsed / n
            row["bench_cpu"] = 100 * (cpu_seconds(me) - m0) / elapsed
            row["machine_busy"] = 100 * (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
            row["rss_per_conv"] = sum(rss_mb(p) for p in pids) / n
            stats = plane.stats()
            row["worker_drops"] = stats["frames_dropped_worker"] - stats0["frames_dropped_worker"]
            row["tap_drops"] = stats["frames_dropped_tap"] - stats0["frames_dropped_tap"]
            row["restarts"] = stats["worker_restarts"] + stats["worker_hung_kills"]
            row["ended"] = len(hooks.ended)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            return row
        finally:
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await asyncio.gather(*(c.bye() for c in calls), return_exceptions=True)
            if phones is not None:
                phones.close()
            await plane.stop()
    arrivals = phones.arrivals if phones is not None else tapbank["arrivals"]
    onsets_of = phones.onsets if phones is not None else tapbank["onsets"]
    frames = lost = late = 0
    lat: list[float] = []
    bursts_by_cid: dict[str, list[float]] = {}
    for c in calls:
        for st in c.streams:
            if st.leg == "agent":  # both legs burst at the same tick: one send time per burst
                bursts_by_cid.setdefault(st.cid, []).extend(st.bursts)
    for cid in cids:
        arr = arrivals.get(cid, [])
        expected = int(seconds / 0.02)
        if not arr:
            lost += expected
            continue
        seqs = unwrap([s for _, s in arr])
        frames += len(arr)
        lost += max(0, (max(seqs) - min(seqs) + 1) - len(set(seqs)))
        first = min(seqs)
        offsets = [t - 0.02 * (s - first) for (t, _), s in zip(arr, seqs)]
        base_off = min(offsets)
        late += sum(1 for o in offsets if o - base_off > LATE_S)
        onsets = onsets_of.get(cid, [])
        for sent in bursts_by_cid.get(cid, []):
            after = [o - sent for o in onsets if 0 <= o - sent < 0.5]
            if after:
                lat.append(min(after))
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    row.update(
        frames=frames,
        lost_pct=100 * lost / max(1, frames + lost),
        late_pct=100 * late / max(1, frames),
        lat_p50=pct(0.5),
        lat_p99=pct(0.99),
        bursts=len(lat),
        bursts_sent=sum(len(v) for v in bursts_by_cid.values()),
    )
    return row


def holds(r: dict[str, Any]) -> bool:
    return not r["error"] and r["lost_pct"] + r["late_pct"] < 0.1 and r["bursts"] >= 0.99 * max(1, r["bursts_sent"])


def fmt(r: dict[str, Any]) -> str:
    if r["error"] and "frames" not in r:
        extra = f" (start {r['startup_s']:.1f}s)" if "startup_s" in r else ""
        return f"{r['n']:>5} {r['workers']:>5}  FAILED{extra}: {r['error']}"
    return (
        f"{r['n']:>5} {r['workers']:>5} {r['lost_pct']:>6.2f} {r['late_pct']:>6.2f} {r['lat_p50']:>6.1f}ms {r['lat_p99']:>6.1f}ms "
        f"{r['worker_cpu_per_conv']:>9.2f} {r['rss_per_conv']:>8.1f} {r['idle_worker_cpu']:>8.2f} {r['machine_busy']:>7.0f} "
        f"{r['bench_cpu']:>7.0f} {r['sender_overrun_ms']:>6.0f}ms {r['sender_lagged_pct']:>5.1f} {r['startup_s']:>6.1f}s {r['setup_s']:>6.1f}s {int(r['restarts']):>4} {'yes' if holds(r) else 'NO'}"
        + (f"  {r['error']}" if r["error"] else "")
        + (f"  (phone socket kernel drops {r['receiver_drops']})" if r.get("receiver_drops") else "")
    )


HEAD = (
    f"{'conv':>5} {'wrk':>5} {'lost%':>6} {'late%':>6} {'lat p50':>8} {'lat p99':>8} {'CPU%/conv':>9} {'MB/conv':>8} "
    f"{'idle%/w':>8} {'mach%':>7} {'bench%':>7} {'gen lag':>8} {'lag%':>5} {'start':>7} {'setup':>7} {'rst':>4} holds"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("siprec", "perleg"), default="siprec")
    ap.add_argument("--monitor", choices=("phone", "tap"), default="phone")
    ap.add_argument("--conversations", type=int, nargs="+", help="these N only (default: the sweep)")
    ap.add_argument("--sweep", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128, 256, 300])
    ap.add_argument("--workers", type=int, default=0, help="worker processes (0: as few as the slots allow)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per step")
    ap.add_argument("--budget", type=float, default=900.0, help="stop the sweep after this many seconds")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first step that does not hold")
    ap.add_argument("--smoke", action="store_true", help="2 conversations, 3 s")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ns = [2] if args.smoke else (args.conversations or args.sweep)
    seconds = 3.0 if args.smoke else args.seconds
    footprint = Placement(1, 4, reserve_phone_slot=Settings().sip_reserve_phone_slot).footprint(args.mode)
    per_worker = max(1, 4 // footprint)
    print(
        f"mode {args.mode}, monitor {args.monitor}, {seconds:.0f} s per step, {NCPU} cores, "
        f"{per_worker} conversation(s) per worker ({footprint} of 4 call slots each)"
    )
    print(HEAD)
    print("-" * len(HEAD))
    t_begin = time.monotonic()
    rows = []
    for n in ns:
        if time.monotonic() - t_begin > args.budget:
            print(f"(time budget of {args.budget:.0f} s used up before N={n})")
            break
        workers = args.workers or math.ceil(n / per_worker)
        r = asyncio.run(run(n, seconds, workers, args.mode, args.monitor))
        rows.append(r)
        print(fmt(r), flush=True)
        if not holds(r) and not args.keep_going and not args.conversations:
            break
    held = [r for r in rows if holds(r)]
    print(
        f"\nlargest N held (lost+late < 0.1 %): {max((r['n'] for r in held), default=0)}"
        "\nlat: burst RTP sent -> first loud packet at the supervisor phone (kernel timestamp) or tap frame;"
        " CPU%/conv: worker processes incl. idle polling, % of one core; idle%/w: per worker before any call;"
        f" mach%: whole machine, % of all {NCPU} cores; bench%: this process (RTP senders, phones, plane), % of one core;"
        " gen lag: worst lateness of the bench's own RTP sender tick, lag%: its ticks > 20 ms late;"
        " start: SipPlane.start(); setup: all INVITEs; rst: worker restarts + hung kills"
    )


if __name__ == "__main__":
    main()
