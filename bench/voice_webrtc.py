"""How many WebRTC voice monitors can the gateway's media path carry?

N fake conversations, each monitored by one aiortc receiver in *other* processes, over
loopback with real ICE/DTLS-SRTP.

Gateway side, as shipped (``--media-processes``, default ``settings.webrtc_processes``, one per
core): an aiohttp server standing for the API process hands each WHEP offer to
:class:`gateway.media.pool.MediaProcesses` as ``whep_routes.py`` does (batched PCMU, mono, an
``on_levels`` callback); the media processes answer and send. A separate *source* process
stands in for the SIP workers: when the pool forwards a conversation to a media process it
connects to that process's frame socket (seqpacket, 1 MiB send buffer, as the worker does) and
sends one time-stamped LegFrame per 20 ms per conversation in the SIP protocol's wire format.
Gateway CPU = the media processes + the API process (the source is not counted).

``--media-processes 0`` is the path before media processes (``--senders`` processes each
answering in-process): an aiohttp server answering WHEP offers with
:func:`gateway.media.whep.answer_whep` called the way ``gateway/api/whep_routes.py`` calls it
(settings defaults: batched PCMU, mono; an ``on_levels`` callback; the tap is the SIP plane's
own :class:`gateway.sip.plane.Tap`, which has no ``next_frame_nowait()``, so the track runs a
pump task per listener as in production; ``--tap nowait`` gives the bench tap with the fast
path instead). ``--codec``/``--no-batch`` override the codec/batching for comparison.
Every process has one 20 ms ticker standing in for the SIP plane: each tick it builds one
``LegFrame`` (600 Hz agent, 1000 Hz customer) and puts it into every tap. The first 5 samples of
each frame carry a **time stamp**: customer 0, agent = G.711 mu-law levels encoding a sync code
and the tick's ``time.monotonic()`` (0.1 ms units, mod 2^24, 6 bits per sample). Mixing adds 0,
and the PCMU table maps those levels back to exactly the same bytes, so the stamp survives the
gateway's real encode bit-exactly (Opus is lossy: frames go unstamped, no added latency).

Receiver side (``--receivers`` processes, default 2): per monitor a stock aiortc
``RTCPeerConnection`` (recvonly transceiver, createOffer, WHEP POST, setRemoteDescription):
ICE, DTLS handshake, SRTP key derivation and RTCP stay aiortc's own. Only the per-packet RTP
path is replaced, per instance: the ICE connection's ``data_received`` (called straight from
the UDP socket's ``datagram_received``) takes every SRTP packet (first byte 128-191, not an
RTCP payload type) before aiortc's queue and DTLS task would, and

1. time-stamps it (``time.monotonic()``),
2. SRTP-unprotects it with aiortc's own receive context (``RTCDtlsTransport._rx_srtp``, read
   through ``gateway.media.aiortc_compat``; libsrtp: authentication tag checked, replay
   checked, payload decrypted); a packet that
   arrives before aiortc has processed the last DTLS flight waits (with its arrival time) for
   the context; one that fails to unprotect counts as ``bad`` and is lost,
3. parses the RTP header (CSRCs, header extension): sequence number, RTP timestamp,
4. PCMU: reads the 5-byte time stamp from the clear payload -> added latency = arrival - the
   tick's time the frame went into the tap (no stamp: the gateway sent silence),
5. every 50th packet of a stream (and its first) is decoded and checked: PCMU: the whole
   payload through the G.711 mu-law formula, >= 80 % of the energy at 600 + 1000 Hz and
   >= 30 % at each; Opus: a fresh libopus decoder (PyAV) takes that packet and the next two,
   the third's audio must have >= 60 % at 600 + 1000 Hz, >= 20 % at each; both: RMS above
   -30 dBFS. A failed check counts as ``bad audio`` and fails the size (a PCMU payload of
   all-zero-level bytes -- the gateway's underrun filler, counted as an underrun -- is
   reported as silence instead),

then drops the packet (no jitter buffer, no decoder thread work, no ``RtpPacket`` objects).
After a stream's first packet its socket leaves the receiver's event loop: one task per
receiver process polls all such sockets every 10 ms with ``recvmsg()`` and takes the arrival
time from the kernel's receive time stamp (``SO_TIMESTAMPNS``), so no packet wakes a receiver
(a sleeping receiver woken by every ``sendto()`` costs the gateway's send path several us per
packet on loopback) and arrival times stay exact; STUN, DTLS and RTCP still go to
aioice/aiortc. ``--rx-events`` gives the old receivers (a wake-up per packet).
DTLS and RTCP datagrams go on to aiortc as usual (the receivers' RTCP RR report zero packets:
the gateway does not use them).

Per size N, over a fixed window after a warm-up, it reports:

* late %: packets arriving more than ``--late-ms`` (40) after their slot -- the stream's RTP
  timestamp on the best (earliest) path seen in the window -- plus lost (sequence gaps,
  never arrived, failed SRTP) plus gateway underruns (ticks that sent silence) plus frames the
  gateway dropped (track buffer or tap overflow: audio that never went out), over expected
  (packets by RTP sequence number); lost % is the sequence-gap part alone;
* added latency p50/p99 (PCMU): tap frame in -> SRTP packet at the receiver's socket (includes
  the phase between the SIP ticker and the gateway's send tick, up to 20 ms);
* slot lateness p99 (median over streams) and RFC 3550 interarrival jitter (mean over streams);
* join -> first audio p50/p99: createOffer -> first packet that decrypted;
* gateway CPU (% of one core, all media processes) and per monitor, RSS per monitor (growth
  from an empty media process), gateway ticks > 20 ms late;
* receiver CPU (% of one core, all receiver processes).

It stops at the first size whose late rate is >= 0.1 % (``--keep-going`` to continue).
Receivers run on the same cores, so the gateway's numbers are measured under their
competition: read them as an upper bound of its cost.

    python bench/voice_webrtc.py --smoke            # 4 monitors, 3 s: does it work at all
    python bench/voice_webrtc.py --sizes 50,100,200,300,400 --duration 10 --keep-going
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
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LATE_MS = 40.0
VERIFY_EVERY = 50
STAMP_SAMPLES = 5
STAMP_MOD = 1 << 24  # 0.1 ms units: wraps every ~28 min, latencies are taken modulo it
STAMP_UNITS_PER_S = 10_000


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ================================================================== the time stamp in the audio
@lru_cache(maxsize=1)
def stamp_codes() -> tuple[int, int, list[int], bytes]:
    """(sync byte, sync level, 64 data levels, byte -> 6-bit value table (255 = not data)).

    Levels are int16 values in the middle of a mu-law code's input range, taken from the
    gateway's own PCMU table, so the gateway's encoder maps them to known bytes exactly."""
    import numpy as np

    from gateway.media.g711 import table

    lut = table("pcmu")
    rep: dict[int, int] = {}
    for code in range(256):
        idx = np.flatnonzero(lut == code)
        if idx.size:
            rep[code] = int(idx[idx.size // 2]) - 32768
    codes = sorted(rep)
    data = codes[64:128]
    sync = codes[200]
    dec = bytearray([255] * 256)
    for v, c in enumerate(data):
        dec[c] = v
    return sync, rep[sync], [rep[c] for c in data], bytes(dec)


def write_stamp(agent: Any, customer: Any, now: float) -> None:
    _, sync_level, levels, _ = stamp_codes()
    v = int(now * STAMP_UNITS_PER_S) % STAMP_MOD
    customer[:STAMP_SAMPLES] = 0
    agent[0] = sync_level
    agent[1] = levels[(v >> 18) & 63]
    agent[2] = levels[(v >> 12) & 63]
    agent[3] = levels[(v >> 6) & 63]
    agent[4] = levels[v & 63]


def read_stamp(payload: bytes) -> int:
    """The stamp (0.1 ms units mod 2^24) in a PCMU payload, or -1."""
    sync, _, _, dec = stamp_codes()
    if len(payload) < STAMP_SAMPLES or payload[0] != sync:
        return -1
    a, b, c, d = dec[payload[1]], dec[payload[2]], dec[payload[3]], dec[payload[4]]
    if a == 255 or b == 255 or c == 255 or d == 255:
        return -1
    return (a << 18) | (b << 12) | (c << 6) | d


@lru_cache(maxsize=1)
def ulaw_decode_table() -> Any:
    """ITU-T G.711 mu-law expansion, 256 entries (int16)."""
    import numpy as np

    out = np.zeros(256, dtype=np.int16)
    for code in range(256):
        u = ~code & 0xFF
        x = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
        out[code] = -(x - 0x84) if u & 0x80 else x - 0x84
    return out


@lru_cache(maxsize=4)
def _tone_basis(n: int, rate: int) -> Any:
    import numpy as np

    t = np.arange(n) / rate
    return np.stack([np.exp(-2j * np.pi * f * t) for f in (600.0, 1000.0)])


def tone_check(x: Any, rate: int) -> tuple[float, float, float]:
    """(share of the energy at 600 Hz, at 1000 Hz, RMS dBFS) of samples in int16 scale."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    total = float(np.dot(x, x))
    if total <= 0.0:
        return 0.0, 0.0, -96.0
    share = (np.abs(_tone_basis(x.shape[0], rate) @ x) ** 2) * 2.0 / x.shape[0] / total
    return float(share[0]), float(share[1]), 10.0 * np.log10(total / x.shape[0] / 32768.0**2)


def verify_pcmu(payload: bytes) -> bool:
    """Decode a whole PCMU payload and check the two tones (past the stamp)."""
    import numpy as np

    x = ulaw_decode_table()[np.frombuffer(payload, dtype=np.uint8)][STAMP_SAMPLES:]
    s600, s1000, dbfs = tone_check(x, 8000)
    return s600 >= 0.3 and s1000 >= 0.3 and s600 + s1000 >= 0.8 and dbfs > -30.0


def new_opus_decoder() -> Any:
    import av

    dec = av.CodecContext.create("opus", "r")
    dec.sample_rate = 48000
    dec.layout = "mono"
    return dec


def verify_opus(frames: list[Any]) -> bool:
    """Check the two tones in what a fresh decoder made of the third consecutive packet."""
    import numpy as np

    if not frames:
        return False
    x = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float64)
    if frames[0].format.name.startswith("flt"):
        x *= 32768.0
    s600, s1000, dbfs = tone_check(x, 48000)
    return s600 >= 0.2 and s1000 >= 0.2 and s600 + s1000 >= 0.6 and dbfs > -30.0


# ================================================================== gateway media process
class Ticker:
    """The SIP plane's stand-in: one 20 ms tick per process puts a fresh, time-stamped
    LegFrame (the same one) into every tap."""

    def __init__(self, stamp: bool = True) -> None:
        from devtools.fake_taps import tone

        self._stamp = stamp
        self._agent = tone(600, 160, 8000)
        self._customer = tone(1000, 160, 8000)
        self.puts: dict[Any, Any] = {}
        self.late_ticks = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        from gateway.media.frames import LegFrame

        t0 = time.monotonic()
        n = 0
        while True:
            agent, customer = self._agent.copy(), self._customer.copy()
            now = time.monotonic()
            if self._stamp:
                write_stamp(agent, customer, now)
            frame = LegFrame("bench", n, 8000, agent, customer)
            for put in list(self.puts.values()):
                put(frame)
            n += 1
            delay = t0 + n * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.02:
                self.late_ticks += 1

    def new_tap(self, kind: str, name: str) -> Any:
        if kind == "plane":
            from gateway.sip.plane import Tap

            tap = Tap(self, name, 50)  # type: ignore[arg-type]  # self stands in for SipPlane
            self.puts[tap] = tap._put
        else:
            tap = _NowaitTap(self)
            self.puts[tap] = tap.push
        return tap

    # what gateway.sip.plane.Tap calls on its plane
    _tap_drops = 0

    def _tap_closed(self, tap: Any) -> None:
        self.puts.pop(tap, None)


class _NowaitTap:
    """A tap with ``next_frame_nowait()`` (the tracks' fast path; the SIP plane's has none)."""

    def __init__(self, owner: Ticker) -> None:
        import collections

        self.owner = owner
        self.queue: collections.deque[Any] = collections.deque(maxlen=50)
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
        self.owner._tap_closed(self)
        self.ready.set()


def _batch_stats() -> dict[str, Any]:
    from gateway.media.batch import BatchSender

    b = BatchSender.instance()
    stats = {
        "batch_ticks": b.ticks,
        "batch_lagged": b.lagged_ticks,
        "batch_max_lag_ms": 1000 * b.max_lag,
        "phase_shifts": b.phase_shifts,
        "batch_resyncs": b.late_ticks,
    }
    b.max_lag = 0.0  # per window
    return stats


def _proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and RSS bytes of another process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    return (int(parts[11]) + int(parts[12])) / CLK_TCK, int(parts[21]) * PAGE


def source_main(ctl: Any, stats_q: mp.Queue[Any]) -> None:
    """The SIP workers' stand-in for the media processes: every 20 ms one time-stamped
    LegFrame per forwarded conversation, sent over a seqpacket connection to the media
    process's frame socket in the SIP protocol's wire format (what a worker does after
    ``SetTap(to=path)``). Forwards arrive as ``(cid, path, on)`` on ``ctl``."""
    import socket

    from devtools.fake_taps import tone
    from gateway.sip.protocol import encode_leg_frame

    agent0, customer0 = tone(600, 160, 8000), tone(1000, 160, 8000)
    socks: dict[str, socket.socket] = {}
    conns: dict[str, socket.socket] = {}  # cid -> its media process's connection
    late = drops = 0
    t0 = time.monotonic()
    n = 0
    while True:
        while ctl.poll():
            msg = ctl.recv()
            if msg == "stats":
                stats_q.put({"late_ticks": late, "drops": drops, "conversations": len(conns), "cpu": _cpu_seconds()})
                continue
            cid, path, on = msg
            if on:
                if path not in socks:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # as the SIP worker does
                    s.connect(path)
                    s.setblocking(False)
                    socks[path] = s
                conns[cid] = socks[path]
            else:
                conns.pop(cid, None)
        agent, customer = agent0.copy(), customer0.copy()
        write_stamp(agent, customer, time.monotonic())
        a, c = agent.tobytes(), customer.tobytes()
        for cid, s in conns.items():
            try:
                s.send(encode_leg_frame(cid.encode(), n, 8000, a, c))
            except OSError:  # the media process's socket is full: counted as dropped
                drops += 1
        n += 1
        delay = t0 + n * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -0.02:
            late += 1


def sender_main(
    port_q: mp.Queue[int],
    index: int,
    codec: str | None,
    batch: bool | None,
    tap_kind: str,
    processes: int,
    source: tuple[Any, Any] | None,
) -> None:
    if processes and source is not None:
        asyncio.run(_pool_gateway(port_q, codec, processes, *source))
    else:
        asyncio.run(_sender(port_q, index, codec, batch, tap_kind))


async def _pool_gateway(port_q: mp.Queue[int], codec: str | None, processes: int, ctl: Any, stats_q: Any) -> None:
    """The gateway as shipped with media processes: the API process relays each offer to
    :class:`gateway.media.pool.MediaProcesses` the way ``whep_routes.py`` does; the frames
    come from the source process (the SIP workers' stand-in) straight to the media processes."""
    import logging

    from aiohttp import web

    from gateway.config import Settings
    from gateway.media.pool import MediaProcesses

    logging.disable(logging.WARNING)
    pool = MediaProcesses(
        Settings(ice_host_addresses="127.0.0.1", webrtc_processes=processes, log_level="WARNING"),
        lambda cid, path, on: ctl.send((cid, path, on)),
    )
    await pool.start()
    listeners: list[Any] = []
    levels = {"n": 0}

    def on_levels(agent_dbfs: float, customer_dbfs: float) -> None:
        levels["n"] += 1

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        sdp, listener = await pool.answer(offer, f"c-{len(listeners)}", stereo=False, on_levels=on_levels, codec=codec)
        listeners.append(listener)
        return web.Response(status=201, text=sdp, content_type="application/sdp")

    async def stats(request: web.Request) -> web.Response:
        ctl.send("stats")
        src = await asyncio.get_running_loop().run_in_executor(None, stats_q.get)
        cpu, rss = _cpu_seconds(), _rss_bytes()
        media_cpu = 0.0
        for p in pool.processes:
            if p.proc is not None:
                c, r = _proc_cpu_rss(p.proc.pid)
                media_cpu += c
                rss += r
        st = [p.stats for p in pool.processes if p.stats is not None]
        return web.json_response(
            {
                "cpu": cpu + media_cpu,
                "api_cpu": cpu,
                "source_cpu": src["cpu"],
                "rss": rss,
                "sessions": len(listeners),
                "connected": sum(s.connected for s in st),
                "modes": [f"media processes x{processes}"],
                "underruns": sum(s.underruns for s in st),
                "dropped": sum(s.dropped for s in st),
                "resyncs": sum(s.resyncs for s in st),
                "frames_out": sum(s.frames_out for s in st),
                "late_ticks": src["late_ticks"],
                "tap_drops": src["drops"],
                "levels": levels["n"],
                "batch_ticks": sum(s.ticks for s in st),
                "batch_lagged": sum(s.lagged_ticks for s in st),
                "batch_max_lag_ms": max((s.max_lag_ms for s in st), default=0.0),
                "phase_shifts": sum(s.phase_shifts for s in st),
                "batch_resyncs": 0,
            }
        )

    app = web.Application()
    app.router.add_post("/whep", whep)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port_q.put(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    await asyncio.Event().wait()


async def _sender(port_q: mp.Queue[int], index: int, codec: str | None, batch: bool | None, tap_kind: str) -> None:
    import logging

    from aiohttp import web

    from gateway.config import Settings
    from gateway.media.whep import answer_whep

    logging.disable(logging.WARNING)
    settings = Settings(ice_host_addresses="127.0.0.1")
    # Opus is lossy: the stamp would not survive, and its clicks would spoil the tone check
    ticker = Ticker(stamp=(codec or ("opus" if settings.webrtc_stereo else settings.webrtc_codec)) != "opus")
    sessions: list[Any] = []
    levels = {"n": 0}

    def on_levels(agent_dbfs: float, customer_dbfs: float) -> None:
        levels["n"] += 1

    def on_inbound_rtp(total: int) -> None:
        pass

    async def whep(request: web.Request) -> web.Response:
        offer = await request.text()
        # as gateway/api/whep_routes.py calls it; codec/batch only when overridden
        sdp, session = await answer_whep(
            offer,
            ticker.new_tap(tap_kind, f"c-{len(sessions)}"),
            settings=settings,
            stereo=settings.webrtc_stereo,
            on_levels=on_levels,
            on_inbound_rtp=on_inbound_rtp,
            codec=codec,
            batch=batch,
        )
        sessions.append(session)
        return web.Response(
            status=201, text=sdp, content_type="application/sdp", headers={"Location": f"/whep/{session.id}"}
        )

    async def stats(request: web.Request) -> web.Response:
        st = [s.track.stats for s in sessions]
        return web.json_response(
            {
                "cpu": _cpu_seconds(),
                "rss": _rss_bytes(),
                "sessions": len(sessions),
                "connected": sum(1 for s in sessions if s.state == "connected"),
                "modes": sorted({f"{s.track.mode}/{s.track.codec}" for s in sessions}),
                "underruns": sum(x.underruns for x in st),
                "dropped": sum(x.dropped for x in st),
                "resyncs": sum(x.resyncs for x in st),
                "frames_out": sum(x.frames_out for x in st),
                "late_ticks": ticker.late_ticks,
                "tap_drops": ticker._tap_drops,
                "levels": levels["n"],
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
    codec: str = ""
    clock: int = 8000
    arrivals: list[tuple[float, int, int, int]] = field(default_factory=list)  # (monotonic, seq, rtp ts, stamp or -1)
    early: list[tuple[bytes, float]] = field(default_factory=list)
    packets: int = 0
    bad_srtp: int = 0
    verified: int = 0
    bad_audio: int = 0
    silent: int = 0
    opus_dec: Any = None
    opus_left: int = 0


def _answer_codec(sdp: str) -> tuple[str, int]:
    """(codec name lower-case, clock rate) of the first payload type of the audio m-line."""
    pt = None
    for line in sdp.splitlines():
        if line.startswith("m=audio"):
            pt = line.split()[3]
        elif pt is not None and line.startswith(f"a=rtpmap:{pt} "):
            name, rate = line.split()[1].split("/")[:2]
            return name.lower(), int(rate)
    return "?", 8000


def receiver_main(jobs: list[tuple[int, str]], join_rate: float, ctl: Any, out_q: mp.Queue[Any], polling: bool) -> None:
    asyncio.run(_receiver(jobs, join_rate, ctl, out_q, polling))


async def _receiver(
    jobs: list[tuple[int, str]], join_rate: float, ctl: Any, out_q: mp.Queue[Any], polling: bool
) -> None:
    import logging
    import socket

    import aiohttp
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from gateway.media.aiortc_compat import ice_connection, srtp_receive_context, srtp_route
    from gateway.media.ice import host_addresses

    logging.disable(logging.WARNING)
    stamp_codes(), ulaw_decode_table()  # built before the clock starts
    listens: list[Listen] = []
    pcs: list[Any] = []
    recording = {"on": True}
    monotonic = time.monotonic
    unpack = struct.unpack_from

    def handle(rec: Listen, srtp: Any, data: bytes, now: float) -> None:
        try:
            clear = srtp.unprotect(data)
        except Exception:
            rec.bad_srtp += 1
            return
        b0 = clear[0]
        off = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10:
            off += 4 + 4 * unpack("!H", clear, off + 2)[0]
        end = len(clear) - (clear[-1] if b0 & 0x20 else 0)
        payload = clear[off:end]
        seq, ts = unpack("!HI", clear, 2)
        if rec.first_audio is None:
            rec.first_audio = now
        rec.packets += 1
        if rec.codec == "pcmu":
            if rec.packets % VERIFY_EVERY == 1:
                if verify_pcmu(payload):
                    rec.verified += 1
                elif payload.count(0xFF) == len(payload):
                    rec.silent += 1  # the gateway's underrun filler (counted there as underrun)
                else:
                    rec.bad_audio += 1
        elif rec.codec == "opus":
            # a fresh decoder takes 3 consecutive packets; the third's audio is checked
            if rec.packets % VERIFY_EVERY == 1:
                rec.opus_dec, rec.opus_left = new_opus_decoder(), 3
            if rec.opus_left:
                try:
                    frames = rec.opus_dec.decode(av.Packet(payload))
                except Exception:
                    frames, rec.opus_left = [], 1
                rec.opus_left -= 1
                if not rec.opus_left:
                    rec.opus_dec = None
                    if verify_opus(frames):
                        rec.verified += 1
                    else:
                        rec.bad_audio += 1
        else:
            rec.bad_audio += 1
        if recording["on"]:
            rec.arrivals.append((now, seq, ts, read_stamp(payload) if rec.codec == "pcmu" else -1))

    # Once a stream's first packet decrypted, its socket leaves the event loop: a 10 ms poller
    # reads every such socket with recvmsg() and the kernel's receive time stamp. No wake-up
    # per packet on either side (a sleeping receiver woken by each sendto() costs the
    # gateway's send path too), and arrival times stay exact.
    polled: list[tuple[socket.socket, Any, Listen, Any]] = []
    loop = asyncio.get_running_loop()
    SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)

    def poll_socket(rec: Listen, dtls: Any) -> None:
        route = srtp_route(dtls)
        if route is None:
            return
        transport = route.transport
        fd = transport.get_extra_info("socket").fileno()
        raw = socket.socket(fileno=os.dup(fd))
        raw.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        raw.setblocking(False)
        loop._remove_reader(fd)  # type: ignore[attr-defined]  # the transport's own reader
        polled.append((raw, transport.get_protocol(), rec, dtls))

    async def poller() -> None:
        while True:
            await asyncio.sleep(0.01)
            offset = time.time() - monotonic()  # kernel stamps are CLOCK_REALTIME
            for raw, proto, rec, dtls in polled:
                while True:
                    try:
                        data, anc, _flags, addr = raw.recvmsg(2048, 64)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    if len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                        now = monotonic()
                        for level, kind, value in anc:
                            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                                sec, nsec = struct.unpack("qq", value[:16])
                                now = sec + nsec / 1e9 - offset
                        handle(rec, srtp_receive_context(dtls), data, now)
                    else:  # STUN consent checks, RTCP, DTLS: to aioice/aiortc as before
                        proto.datagram_received(data, addr)

    poll_task = loop.create_task(poller())

    async def join(http: aiohttp.ClientSession, port: int, name: str) -> None:
        rec = Listen(name, join_start=monotonic())
        listens.append(rec)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.append(pc)
        pc.addTransceiver("audio", direction="recvonly")
        offer = await pc.createOffer()
        with host_addresses(["127.0.0.1"]):
            await pc.setLocalDescription(offer)
        dtls = pc.getTransceivers()[0].receiver.transport
        conn = ice_connection(dtls)
        deliver = conn.data_received

        def on_data(data: bytes, component: int) -> None:
            # SRTP (not SRTCP): handled here, straight off the socket; the rest goes to aiortc.
            if len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
                now = monotonic()
                srtp = srtp_receive_context(dtls)
                if srtp is None:  # aiortc has not processed the last DTLS flight yet
                    if len(rec.early) < 50:
                        rec.early.append((data, now))
                    return
                if rec.early:
                    early, rec.early = rec.early, []
                    for d, t in early:
                        handle(rec, srtp, d, t)
                handle(rec, srtp, data, now)
                if rec.packets == 1 and polling:
                    loop.call_soon(poll_socket, rec, dtls)
                return
            deliver(data, component)

        conn.data_received = on_data
        async with http.post(
            f"http://127.0.0.1:{port}/whep", data=pc.localDescription.sdp, headers={"Content-Type": "application/sdp"}
        ) as res:
            answer = await res.text()
            if res.status != 201:
                raise RuntimeError(f"whep {res.status}: {answer[:200]}")
        rec.codec, rec.clock = _answer_codec(answer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async with aiohttp.ClientSession() as http:
        tasks = []
        for port, name in jobs:
            tasks.append(asyncio.create_task(join(http, port, name)))
            await asyncio.sleep(1.0 / join_rate)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        out_q.put(("joined", len(jobs) - len(errors), errors[:3]))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ctl.recv)  # "mark": the window starts
        cpu0 = _cpu_seconds()
        t0, t1 = await loop.run_in_executor(None, ctl.recv)
        recording["on"] = False
        cpu = _cpu_seconds() - cpu0
        poll_task.cancel()
        summary = [_analyse(rec, t0, t1) for rec in listens]
        out_q.put(("done", summary, cpu, _rss_bytes()))
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)


def _analyse(rec: Listen, t0: float, t1: float) -> dict[str, Any]:
    pts = [a for a in rec.arrivals if t0 <= a[0] <= t1]
    join = None if rec.first_audio is None else rec.first_audio - rec.join_start
    base = {
        "join": join,
        "codec": rec.codec,
        "bad_srtp": rec.bad_srtp,
        "verified": rec.verified,
        "bad_audio": rec.bad_audio,
        "silent": rec.silent,
        "added": [],
    }
    if len(pts) < 2:
        n = int((t1 - t0) * 50)
        return {**base, "expected": n, "late": n, "lost": 0, "stamped": 0, "unstamped": 0}
    clock = rec.clock
    base_ts, base_seq = pts[0][2], pts[0][1]
    offs, seqs = [], set()
    added: list[int] = []
    unstamped = 0
    jitter, prev = 0.0, None
    for now, seq, ts, stamp in pts:
        dts = (ts - base_ts) & 0xFFFFFFFF
        seqs.add((seq - base_seq) & 0xFFFF)
        off = now - dts / clock
        offs.append(off)
        if prev is not None:  # RFC 3550 interarrival jitter, in seconds
            jitter += (abs(off - prev) - jitter) / 16.0
        prev = off
        if stamp >= 0:
            added.append((int(now * STAMP_UNITS_PER_S) - stamp) % STAMP_MOD)
        else:
            unstamped += 1
    best = min(offs)
    lateness = sorted((o - best) * 1000.0 for o in offs)
    late = sum(1 for x in lateness if x > LATE_MS)
    expected = max(seqs) + 1
    p99 = lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))]
    return {
        **base,
        "expected": expected,
        "late": late,
        "lost": expected - len(seqs),
        "p99_ms": p99,
        "max_ms": lateness[-1],
        "jitter_ms": jitter * 1000.0,
        "added": added,
        "stamped": len(added),
        "unstamped": unstamped,
    }


# ================================================================== floor
def transport_floor(streams: int = 200, seconds: float = 1.0) -> dict[str, float]:
    """CPU per packet of the irreducible part -- RTP header, SRTP protect, one UDP send --
    done in one tight loop over many streams (what a batched sender would cost), next to a
    G.711 lookup and a mono Opus encode of one frame."""
    import socket

    import numpy as np
    from pylibsrtp import Policy, Session

    from devtools.fake_taps import tone
    from gateway.media.g711 import G711PacketEncoder
    from gateway.media.mixer import mix_mono
    from gateway.media.opus import OpusPacketEncoder

    key = bytes(range(30))
    sessions = []
    for _ in range(streams):
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


def _pct(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(len(values) * q))] if values else None


def run_size(
    n: int,
    *,
    senders: int,
    receivers: int,
    duration: float,
    warmup: float,
    join_rate: float,
    codec: str | None = None,
    batch: bool | None = None,
    tap: str = "plane",
    processes: int = 0,
    rx_poll: bool = True,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    port_q: mp.Queue[int] = ctx.Queue()
    source: tuple[Any, Any] | None = None
    extra: list[Any] = []
    if processes:
        senders = 1  # one API process; the media processes are its children
        ctl, child = ctx.Pipe()
        stats_q: mp.Queue[Any] = ctx.Queue()
        source = (ctl, stats_q)
        extra.append(ctx.Process(target=source_main, args=(child, stats_q), daemon=True))
        extra[0].start()
    sprocs = [
        ctx.Process(target=sender_main, args=(port_q, i, codec, batch, tap, processes, source), daemon=True)
        for i in range(senders)
    ]
    for p in sprocs:
        p.start()
    ports = [port_q.get(timeout=60) for _ in sprocs]
    base = [asyncio.run(_get_json(p)) for p in ports]

    jobs: list[list[tuple[int, str]]] = [[] for _ in range(receivers)]
    for i in range(n):
        jobs[i % receivers].append((ports[i % senders], f"c-{i}"))
    out_q: mp.Queue[Any] = ctx.Queue()
    pipes = [ctx.Pipe() for _ in range(receivers)]
    rprocs = [
        ctx.Process(
            target=receiver_main, args=(jobs[i], join_rate / receivers, pipes[i][1], out_q, rx_poll), daemon=True
        )
        for i in range(receivers)
    ]
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
    rcpu, rrss = 0.0, 0
    for _ in rprocs:
        kind, summary, cpu, rss_rx = out_q.get(timeout=120)
        per += summary
        rcpu += cpu
        rrss += rss_rx
    for p in rprocs + sprocs + extra:
        p.terminate()
    for p in rprocs + sprocs + extra:
        p.join(5)

    wall = t1 - t0
    expected = sum(x["expected"] for x in per)
    late_rx = sum(x["late"] for x in per)
    lost = sum(x["lost"] for x in per)
    underruns = sum(b["underruns"] - a["underruns"] for a, b in zip(s0, s1))
    dropped = sum(b["dropped"] - a["dropped"] + b["tap_drops"] - a["tap_drops"] for a, b in zip(s0, s1))
    late_total = late_rx + lost + underruns + dropped
    joins = sorted(x["join"] for x in per if x["join"] is not None)
    p99s = sorted(x.get("p99_ms", 0.0) for x in per)
    added = sorted(u / 10.0 for x in per for u in x["added"])
    jit = [x["jitter_ms"] for x in per if "jitter_ms" in x]
    gw_cpu = sum(b["cpu"] - a["cpu"] for a, b in zip(s0, s1)) / wall
    rss = sum(b["rss"] - a["rss"] for a, b in zip(base, s1))
    return {
        "n": n,
        "joined": joined,
        "connected": sum(b["connected"] for b in s1),
        "modes": sorted({m for b in s1 for m in b["modes"]}),
        "rx_codecs": sorted({x["codec"] for x in per}),
        "errors": errors,
        "expected": expected,
        "late_rx": late_rx,
        "lost": lost,
        "underruns": underruns,
        "dropped": dropped,
        "resyncs": sum(b["resyncs"] - a["resyncs"] for a, b in zip(s0, s1)),
        "frames_out": sum(b["frames_out"] - a["frames_out"] for a, b in zip(s0, s1)),
        "bad_srtp": sum(x["bad_srtp"] for x in per),
        "verified": sum(x["verified"] for x in per),
        "bad_audio": sum(x["bad_audio"] for x in per),
        "silent": sum(x["silent"] for x in per),
        "stamped": sum(x["stamped"] for x in per),
        "unstamped": sum(x["unstamped"] for x in per),
        "added_p50_ms": _pct(added, 0.5),
        "added_p99_ms": _pct(added, 0.99),
        "added_max_ms": added[-1] if added else None,
        "added_over_late_ms": sum(1 for a in added if a > LATE_MS),
        "slot_p99_ms": statistics.median(p99s) if p99s else None,
        "slot_max_ms": max((x.get("max_ms", 0.0) for x in per), default=None),
        "jitter_ms": statistics.fmean(jit) if jit else None,
        "late_pct": min(100.0, 100.0 * late_total / max(1, expected)),
        "lost_pct": 100.0 * lost / max(1, expected),
        "join_p50_ms": 1000 * statistics.median(joins) if joins else None,
        "join_p99_ms": 1000 * _pct(joins, 0.99) if joins else None,  # type: ignore[operator]
        "gw_cpu_pct": 100 * gw_cpu,
        "api_cpu_pct": 100 * sum(b.get("api_cpu", 0) - a.get("api_cpu", 0) for a, b in zip(s0, s1)) / wall,
        "source_cpu_pct": 100 * sum(b.get("source_cpu", 0) - a.get("source_cpu", 0) for a, b in zip(s0, s1)) / wall,
        "gw_cpu_per_monitor_pct": 100 * gw_cpu / max(1, n),
        "rss_per_monitor_kb": rss / max(1, n) / 1024,
        "rx_cpu_pct": 100 * rcpu / wall,
        "rx_cpu_per_monitor_pct": 100 * rcpu / wall / max(1, n),
        "rx_rss_mb": rrss / 2**20,
        "late_ticks": sum(b["late_ticks"] - a["late_ticks"] for a, b in zip(s0, s1)),
        "gw_lagged_ticks": sum(b["batch_lagged"] - a["batch_lagged"] for a, b in zip(s0, s1)),
        "gw_max_lag_ms": max(b["batch_max_lag_ms"] for b in s1),
        "phase_shifts": sum(b["phase_shifts"] - a["phase_shifts"] for a, b in zip(s0, s1)),
        "phase_shifts_total": sum(b["phase_shifts"] for b in s1),
        "wall": wall,
        "load1": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,100,200,300,400")
    ap.add_argument(
        "--media-processes",
        type=int,
        default=None,
        help="the gateway's media processes (default settings.webrtc_processes: one per core); "
        "0: listeners in the API process, the pre-issue-9 path (then --senders such processes)",
    )
    ap.add_argument("--senders", type=int, default=1, help="with --media-processes 0: gateway processes")
    ap.add_argument("--receivers", type=int, default=2, help="listener processes")
    ap.add_argument("--duration", type=float, default=10.0, help="measurement window, seconds")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--join-rate", type=float, default=40.0, help="joins per second (all receivers)")
    ap.add_argument(
        "--codec", default=None, choices=["opus", "pcmu"], help="override settings.webrtc_codec (default: as shipped)"
    )
    ap.add_argument("--batch", dest="batch", action="store_true", default=None, help="force the batched sender")
    ap.add_argument("--no-batch", dest="batch", action="store_false", help="use aiortc's own sender per listener")
    ap.add_argument(
        "--tap",
        default="plane",
        choices=["plane", "nowait"],
        help="plane: gateway.sip.plane.Tap (as shipped); nowait: a tap with next_frame_nowait()",
    )
    ap.add_argument(
        "--rx-events",
        dest="rx_poll",
        action="store_false",
        help="receivers take each packet on an event-loop wake-up (the old receivers) instead of polling every 10 ms",
    )
    ap.add_argument("--late-ms", type=float, default=LATE_MS)
    ap.add_argument(
        "--smoke", action="store_true", help="4 monitors, 3 s, one of each process; exits 1 if no audio was verified"
    )
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first failing size")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    globals()["LATE_MS"] = args.late_ms
    if args.smoke:
        sizes, args.senders, args.receivers, args.duration, args.warmup = [4], 1, 1, 3.0, 1.0
    else:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    from gateway.config import Settings

    s = Settings()
    if args.media_processes is None:
        args.media_processes = s.webrtc_processes
    codec = args.codec or ("opus" if s.webrtc_stereo else s.webrtc_codec)
    batch = s.webrtc_batch if args.batch is None else args.batch
    print(
        f"codec={codec} batch={batch} tap={args.tap} (settings: {s.webrtc_codec}/{'batch' if s.webrtc_batch else 'aiortc'}) cores={os.cpu_count()} "
        f"media_processes={args.media_processes} senders={args.senders} receivers={args.receivers} window={args.duration}s late>{args.late_ms}ms load={os.getloadavg()[0]:.2f}"
    )
    hdr = (
        f"{'N':>4} {'ok':>3} {'late%':>6} {'lost%':>6} {'lateRx':>6} {'under':>5} {'addP50':>6} {'addP99':>6} {'add>40':>6} "
        f"{'joinP50':>7} {'joinP99':>7} {'slot99':>6} {'jitr':>5} {'gwCPU%':>6} {'%/mon':>5} {'kB/mon':>6} {'rxCPU%':>6} {'rx%/mon':>7} {'load':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    rows = []
    best = 0
    broken = False
    for n in sizes:
        row = run_size(
            n,
            senders=args.senders,
            receivers=args.receivers,
            duration=args.duration,
            warmup=args.warmup,
            join_rate=args.join_rate,
            codec=args.codec,
            batch=args.batch,
            tap=args.tap,
            processes=args.media_processes,
            rx_poll=args.rx_poll,
        )
        rows.append(row)
        ok = row["late_pct"] < 0.1 and row["joined"] == n and row["bad_audio"] == 0 and row["bad_srtp"] == 0
        fmt = lambda v, p=0: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(
            f"{n:>4} {'yes' if ok else 'NO':>3} {row['late_pct']:>6.3f} {row['lost_pct']:>6.3f} {row['late_rx']:>6} {row['underruns']:>5} "
            f"{fmt(row['added_p50_ms'], 1):>6} {fmt(row['added_p99_ms'], 1):>6} {row['added_over_late_ms']:>6} "
            f"{fmt(row['join_p50_ms']):>7} {fmt(row['join_p99_ms']):>7} {fmt(row['slot_p99_ms'], 1):>6} {fmt(row['jitter_ms'], 1):>5} "
            f"{row['gw_cpu_pct']:>6.1f} {row['gw_cpu_per_monitor_pct']:>5.2f} {row['rss_per_monitor_kb']:>6.0f} "
            f"{row['rx_cpu_pct']:>6.1f} {row['rx_cpu_per_monitor_pct']:>7.3f} {row['load1']:>5.2f}",
            flush=True,
        )
        if args.media_processes:
            print(
                f"     gateway CPU = media processes + API process ({row['api_cpu_pct']:.1f} % of a core); "
                f"frame source (the SIP workers' stand-in, not counted) {row['source_cpu_pct']:.1f} %",
                flush=True,
            )
        print(
            f"     gateway {','.join(row['modes'])} (receivers saw {','.join(row['rx_codecs'])}), connected {row['connected']}/{n}; "
            f"ticks >20 ms late {row['gw_lagged_ticks']} (worst {row['gw_max_lag_ms']:.0f} ms), resyncs {row['resyncs']}, dropped {row['dropped']}, send-tick phase shifts {row['phase_shifts']} in the window ({row['phase_shifts_total']} in all); "
            f"receivers: {row['verified']} sampled packets decoded to the tones, {row['bad_audio']} did not, {row['silent']} were silence, {row['bad_srtp']} failed SRTP, "
            f"{row['stamped']} stamped / {row['unstamped']} unstamped, RSS {row['rx_rss_mb']:.0f} MB; slot max {fmt(row['slot_max_ms'])} ms, added max {fmt(row['added_max_ms'], 1)} ms",
            flush=True,
        )
        misses = [
            m
            for m, bad in (
                ("added latency p99 > 40 ms", row["added_p99_ms"] is not None and row["added_p99_ms"] > 40.0),
                ("join -> first audio p99 > 300 ms", row["join_p99_ms"] is None or row["join_p99_ms"] > 300.0),
            )
            if bad
        ]
        if misses:
            print("     target missed:", "; ".join(misses))
        if row["errors"]:
            print("   errors:", row["errors"])
        if row["verified"] == 0 or row["bad_audio"] or row["bad_srtp"] or (codec == "pcmu" and row["stamped"] == 0):
            broken = True
        if ok:
            best = n
        elif not args.keep_going:
            break
    print(f"\nlargest N with <0.1% late frames: {best}  (load now {os.getloadavg()[0]:.2f})")
    floor = transport_floor(seconds=0.5 if args.smoke else 2.0)
    per_frame = floor["srtp_udp_us"] + floor["opus_us" if codec == "opus" else "g711_us"]
    print(
        f"floor without aiortc's per-packet path: RTP+SRTP+UDP send {floor['srtp_udp_us']:.0f} us/packet, "
        f"mix+G.711 {floor['g711_us']:.0f} us, mix+Opus {floor['opus_us']:.0f} us per frame "
        f"-> {per_frame * 50 / 1e4:.2f} % of a core per monitor ({codec})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.smoke and broken:
        print("SMOKE FAILED: audio not verified at the receivers")
        sys.exit(1)


if __name__ == "__main__":
    main()
