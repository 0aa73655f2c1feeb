"""The SIP bench's RTP load and measurement, shared by every workload of ``voice_sip.py``.

``rtpbench`` (``bench/rtpbench.c``, compiled here with the system ``cc`` into ``bench/.build/``)
sends PCMU for every stream on one 20 ms timer and sinks what comes back with kernel receive
timestamps; this module drives it, plans the bench's ports outside the kernel's ephemeral range,
reads /proc for CPU and memory, and turns the arrival log into loss, lateness and latency.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "rtpbench.c"
BINARY = HERE / ".build" / "rtpbench"

CLK = os.sysconf("SC_CLK_TCK")
LATE_S = 0.040  # a packet more than this behind its 20 ms schedule is late
CYCLE = 25  # a burst every 25 ticks (500 ms) per stream
BURST_REC = struct.Struct("<IIq")  # index, pad, CLOCK_REALTIME ns
ARRIVAL_REC = struct.Struct("<IHBBq")  # index, seq, loud, pad, kernel ns


def build() -> Path:
    """Compile rtpbench when missing or older than its source; fail with the install hint."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    BINARY.parent.mkdir(exist_ok=True)
    fresh = BINARY.with_name(f"{BINARY.name}.{os.getpid()}")
    try:
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(fresh), str(SOURCE)], check=True)
    except FileNotFoundError:
        raise SystemExit("bench: no C compiler; install one: apt-get install -y gcc libc6-dev") from None
    fresh.replace(BINARY)  # atomically: another bench may be running the old one
    return BINARY


# --------------------------------------------------------------------------- ports


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


class PortPlan:
    """Hands out port blocks below the kernel's ephemeral range (then above it): the kernel never
    picks these for anyone's unbound sockets, so the bench's streams, the gateway's RTP and Janus's
    RTP never collide with an ephemeral port or with each other."""

    def __init__(self, start: int = 10000) -> None:
        self.eph_lo, self.eph_hi = ephemeral_range()
        self.next = start
        if self.eph_lo - start < 4096 and 65535 - self.eph_hi < 4096:
            # e.g. a container with 1024-65535: nowhere to go but among the ephemeral ports
            print(
                f"bench: the ephemeral port range {self.eph_lo}-{self.eph_hi} leaves no room; "
                "planning ports inside it (an unbound socket elsewhere may land among them)",
                file=sys.stderr,
            )
            self.eph_lo, self.eph_hi = 65536, 65536

    def block(self, count: int, step: int = 1) -> int:
        """``count`` ports ``base + step*i`` (and, for step 2, the RTCP port after each) all free."""
        span = count * step + 1
        while True:
            base = self.next + (self.next % 2)  # RTP on even ports
            if base + span > self.eph_lo and base < self.eph_hi:
                base = self.eph_hi + 1 + ((self.eph_hi + 1) % 2)
            if base + span > 65535:
                raise RuntimeError(f"no room for {count} ports outside the ephemeral range {self.eph_lo}-{self.eph_hi}")
            self.next = base + span + 1
            if all(_free(p) for p in range(base, base + span)):
                return base


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (the gateway's main process and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return float(sum(vals) - idle), float(sum(vals))


def udp_drops(ports: range) -> int:
    """Datagrams the kernel dropped (receive buffer full) on these local UDP ports."""
    wanted = {f"{p:04X}" for p in ports}
    drops = 0
    with open("/proc/net/udp") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 12 and parts[1].rsplit(":", 1)[-1] in wanted:
                drops += int(parts[-1])
    return drops


@dataclass
class CpuWindow:
    """CPU seconds of some processes and of the whole machine over a measured window."""

    pids: list[int]
    t0: float = 0.0
    c0: dict[int, float] = field(default_factory=dict)
    b0: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {p: cpu_seconds(p) for p in self.pids}
        self.b0 = machine_busy()

    def percent_of_core(self, pids: list[int] | None = None) -> float:
        """CPU of ``pids`` (default: all) since start, in % of one core."""
        elapsed = max(1e-6, time.monotonic() - self.t0)
        chosen = self.pids if pids is None else pids
        return 100 * sum(cpu_seconds(p) - self.c0.get(p, 0.0) for p in chosen) / elapsed

    def machine_percent(self) -> float:
        b1 = machine_busy()
        return 100 * (b1[0] - self.b0[0]) / max(1.0, b1[1] - self.b0[1])


# --------------------------------------------------------------------------- processes


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGTERM when the bench dies, even by SIGKILL (no orphan
    gateway or Janus keeps its ports)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Helper:
    """An rtpbench process spoken to over stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.errors: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())

    async def expect(self, word: str, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            if not raw:
                raise RuntimeError(f"rtpbench exited: {' '.join(self.errors)[:200]}")
            line = raw.decode().strip()
            if line.startswith(word):
                return line
            self._other(line)

    def _other(self, line: str) -> None:
        if line.startswith("error"):
            self.errors.append(line)

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                self.send("quit")
                await asyncio.wait_for(self.proc.wait(), 3.0)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                self.proc.kill()
                await self.proc.wait()


class Generator(_Helper):
    """Sends every added stream's PCMU from one 20 ms timer; logs marked streams' burst times."""

    def __init__(self, proc: asyncio.subprocess.Process, bursts_path: Path) -> None:
        super().__init__(proc)
        self.bursts_path = bursts_path

    @classmethod
    async def start(cls, workdir: Path) -> Generator:
        path = workdir / "bursts.bin"
        proc = await asyncio.create_subprocess_exec(
            str(build()), "send", str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return cls(proc, path)

    def add(self, local_port: int, dest: tuple[str, int], offset: int, mark: int) -> None:
        """One stream from 127.0.0.1:local_port to dest; ``mark`` >= 0 logs its bursts under that index."""
        self.send(f"add {local_port} {dest[0]} {dest[1]} {offset % CYCLE} {mark}")

    async def sync(self) -> None:
        self.send("sync")
        await self.expect("synced")
        if self.errors:
            raise RuntimeError(f"generator: {self.errors[0]}")

    def window(self) -> None:
        self.send("window")

    async def stats(self) -> tuple[float, float]:
        """Worst tick lateness (ms) and the % of ticks more than 20 ms late, since ``window``."""
        self.send("stats")
        _, worst, lagged, ticks = (await self.expect("stats")).split()
        return float(worst), 100 * int(lagged) / max(1, int(ticks))

    def bursts(self) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        data = self.bursts_path.read_bytes()
        for index, _, ns in BURST_REC.iter_unpack(data[: len(data) - len(data) % BURST_REC.size]):
            out.setdefault(index, []).append(ns / 1e9)
        return out


class Sink(_Helper):
    """Receives stream i on port ``base + 2*i`` and logs every packet with its kernel timestamp."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path, base: int, count: int) -> None:
        super().__init__(proc)
        self.path, self.base, self.count = path, base, count
        self.seen: set[int] = set()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, workdir: Path, base: int, count: int) -> Sink:
        path = workdir / "arrivals.bin"
        proc = await asyncio.create_subprocess_exec(
            str(build()), "sink", str(path), str(base), str(count), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        sink = cls(proc, path, base, count)
        await sink.expect("ready")
        return sink

    def port(self, index: int) -> int:
        return self.base + 2 * index

    def ports(self) -> range:
        return range(self.base, self.base + 2 * self.count, 2)

    def _other(self, line: str) -> None:
        if line.startswith("first "):
            self.seen.add(int(line.split()[1]))
        else:
            super()._other(line)

    async def wait_all(self, timeout: float) -> None:
        """Until every stream has delivered a packet (reads ``first`` lines)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while len(self.seen) < self.count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"streams with media at the sink: {len(self.seen)}/{self.count}")
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                continue
            if not raw:
                raise RuntimeError("rtpbench sink exited")
            self._other(raw.decode().strip())

    async def flush(self) -> None:
        self.send("flush")
        await self.expect("flushed")

    def arrivals(self, t0: float, t1: float) -> dict[int, list[tuple[float, int, bool]]]:
        """Per stream: (kernel time, seq, loud) of the packets that arrived in [t0, t1]."""
        out: dict[int, list[tuple[float, int, bool]]] = {}
        data = self.path.read_bytes()
        for index, seq, loud, _, ns in ARRIVAL_REC.iter_unpack(data[: len(data) - len(data) % ARRIVAL_REC.size]):
            t = ns / 1e9
            if t0 <= t <= t1:
                out.setdefault(index, []).append((t, seq, bool(loud)))
        return out


# --------------------------------------------------------------------------- analysis


def unwrap(seqs: list[int]) -> list[int]:
    out, base, prev = [], 0, None
    for s in seqs:
        if prev is not None and s < prev and prev - s > 30000:
            base += 65536
        out.append(s + base)
        prev = s
    return out


def media_quality(
    arrivals: dict[int, list[tuple[float, int, bool]]],
    bursts: dict[int, list[float]],
    streams: int,
    seconds: float,
) -> dict[str, float]:
    """Loss (sequence gaps), lateness (> 40 ms behind the 20 ms schedule the first packet set)
    and added latency (burst sent -> first loud packet at the sink) over the sink's streams."""
    frames = lost = late = 0
    lat: list[float] = []
    for index in range(streams):
        arr = arrivals.get(index, [])
        if not arr:
            lost += int(seconds / 0.02)
            continue
        seqs = unwrap([s for _, s, _ in arr])
        frames += len(arr)
        lost += max(0, (max(seqs) - min(seqs) + 1) - len(set(seqs)))
        first = min(seqs)
        offsets = [t - 0.02 * (s - first) for (t, _, _), s in zip(arr, seqs)]
        base = min(offsets)
        late += sum(1 for o in offsets if o - base > LATE_S)
        onsets, was_loud = [], False
        for t, _, loud in arr:
            if loud and not was_loud:
                onsets.append(t)
            was_loud = loud
        for sent in bursts.get(index, []):
            after = [o - sent for o in onsets if 0 <= o - sent < 0.5]
            if after:
                lat.append(min(after))
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {
        "frames": frames,
        "lost_pct": 100 * lost / max(1, frames + lost),
        "late_pct": 100 * late / max(1, frames),
        "lat_p50": pct(0.5),
        "lat_p99": pct(0.99),
        "bursts": len(lat),
        "bursts_sent": sum(len(v) for v in bursts.values()),
    }


# --------------------------------------------------------------------------- self-check


async def _self_check(streams: int, seconds: float) -> None:
    """The load's own cost: ``streams`` streams from the generator straight into the sink."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-rtp-") as tmp:
        plan = PortPlan()
        sink = await Sink.start(Path(tmp), plan.block(streams, step=2), streams)
        gen = await Generator.start(Path(tmp))
        base = plan.block(streams, step=2)
        for i in range(streams):
            gen.add(base + 2 * i, ("127.0.0.1", sink.port(i)), i, i)
        await gen.sync()
        await sink.wait_all(10)
        cpu = CpuWindow([gen.pid, sink.pid])
        gen.window()
        cpu.start()
        t0 = time.time()
        await asyncio.sleep(seconds)
        t1 = time.time()
        worst, lagged = await gen.stats()
        gen_cpu, sink_cpu = cpu.percent_of_core([gen.pid]), cpu.percent_of_core([sink.pid])
        await asyncio.sleep(0.3)
        await sink.flush()
        bursts = {k: [b for b in v if t0 <= b <= t1] for k, v in gen.bursts().items()}
        q = media_quality(sink.arrivals(t0, t1 + 0.3), bursts, streams, seconds)
        await gen.close()
        await sink.close()
    print(
        f"{streams} streams, {streams * 50} packets/s: generator {gen_cpu:.1f} % of a core "
        f"({gen_cpu / streams * 1000:.2f} per 1000 streams, worst tick {worst:.1f} ms late, {lagged:.1f} % > 20 ms), "
        f"sink {sink_cpu:.1f} %; lost {q['lost_pct']:.3f} %, late {q['late_pct']:.3f} %, "
        f"latency p50/p99 {q['lat_p50']:.2f}/{q['lat_p99']:.2f} ms"
    )


if __name__ == "__main__":
    build()
    for count in [int(x) for x in (sys.argv[1:] or ["1000"])]:
        asyncio.run(_self_check(count, 5.0))
