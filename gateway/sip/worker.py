"""A pjsua2 media worker process: ``python -m gateway.sip.worker --ctl-fd N --frame-fd M ...``.

Only this module (and :mod:`devtools.sip_phone`) imports pjsua2, and only inside a child
process. One thread owns the Endpoint and every pj object (``threadCnt=0``,
``mainThreadOnly``): it loops ``libHandleEvents`` and applies commands that a reader thread
puts on a queue. The reader thread never touches pj objects.

Interface with the main process: :mod:`gateway.sip.protocol` (command line, typed control
messages as JSON lines on ``--ctl-fd``, one LegFrame datagram per 20 ms per tapped
conversation on ``--frame-fd``, sent from pj's clock thread).

The worker holds no policy: it reports each incoming INVITE (whole message) and waits for the
main process to answer or reject it. The one thing it decides alone is to refuse at once (403)
an INVITE whose Request-URI carries no placement token minted under its key
(:func:`~gateway.sip.protocol.token_valid`): a flood straight at a worker's port never reaches
the main process and holds no call slot.

pjsua2 build: the project's own (``scripts/build-pjsua2.sh``: ``pjsua2.MAX_CALLS`` = 512 calls,
epoll ioqueue of 4096 sockets, SIPREC support) or, as a fallback, the PyPI wheel (4 calls per
process: a warning, and the plane's capacity follows what this worker reports in Ready).
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import queue
import random
import resource
import socket
import sys
import threading
import time
from typing import Any

import pjsua2 as pj

from .protocol import (
    PLACEMENT_HEADER,
    WIDEBAND_CODECS,
    Answer,
    CallEnded,
    CallPhone,
    Command,
    Event,
    Fatal,
    HangUpPhone,
    Incoming,
    LegQuality,
    LegUp,
    PhoneEnded,
    ProtocolError,
    Quit,
    Ready,
    Reject,
    Reply,
    SetTap,
    Stats,
    WorkerArgs,
    decode,
    encode,
    encode_leg_frame,
    token_valid,
)
from .routing import tls_hop_uri

#: The conference bridge's clock: 16 kHz, the rate of G.722 and of the workers' Opus, so
#: wideband legs reach a wideband phone or tap without resampling; G.711 ports are resampled
#: by the bridge (bench/bridge_cost.py --codec measures what that costs per conversation).
CLOCK_RATE = 16000
#: The rate of a conversation's tap while one of its legs is narrowband (G.711): its frames
#: carry nothing above 4 kHz, so they cross at 8 kHz (half the bytes, and the WebRTC side
#: keeps its batched G.711 path).
NARROW_RATE = 8000
#: The bridge's frame length (ptime), ms.
FRAME_MS = 20
#: pjsua's media quality (``medConfig.quality``), which picks the bridge's resampler for ports
#: whose rate is not the bridge's (G.711 legs and phones, 8 kHz taps): below 3 is
#: ``PJMEDIA_CONF_USE_LINEAR``, i.e. with the speex backend of this build speex quality 3
#: (speexdsp's "VoIP" quality, a 48-tap filter). pjsua's default (8: speex quality 10, 256
#: taps) delays each 8 <-> 16 kHz conversion by 16 ms, 32 ms from a G.711 leg to a G.711 phone
#: or 8 kHz tap (measured: tests/test_quality.py, docs/DESIGN.md §4c); quality 3 delays it by
#: 3 ms and costs a fifth of the filter work.
MEDIA_QUALITY = 2
#: Half the taps of that resampler's filter at the lower of its two rates: the delay of one
#: conversion, in samples of that rate (speex's ``get_input_latency``: 24 at 8 kHz in, 48 at
#: 16 kHz in, the same 3 ms).
_RESAMPLER_HALF_TAPS = 24
#: The once-a-second statistics read happens at a random moment within this many seconds of
#: the second (see Worker.run).
_STATS_SPREAD = 0.1
#: Reads a second, at random moments, of the jitter-buffer level of each stream someone hears,
#: besides the once-a-second read: their mean is the reported level (one reading of a bursty
#: stream's buffer is off by up to a burst).
_LEVEL_SAMPLES = 3
#: Decoders that hold a frame: pjmedia's Opus decoder (pjmedia-codec/opus.c ``codec_decode``)
#: keeps each frame it is given and decodes the one before, so that a lost frame can be rebuilt
#: from the in-band FEC of the next: an Opus leg reaches the bridge one codec frame late, after
#: its jitter buffer (which therefore does not show it).
_HOLDING_DECODERS = frozenset({"opus"})
#: An incoming call the main process neither answers nor rejects in this long gets 500.
_DECIDE_TIMEOUT = 5.0
#: Calls one process holds with this pjsua2: the project's build says (PJSUA_MAX_CALLS); the
#: PyPI wheel has no such attribute and its pjsua clamps every process to 4.
BUILD_MAX_CALLS: int = getattr(pj, "MAX_CALLS", 4)
PJSUA2_VERSION: str = getattr(pj, "__version__", "")
#: Descriptors a full worker needs: the build's ioqueue (4096 sockets) plus files and pipes.
_WANTED_FDS = 8192
#: Opus encoder complexity (0-10; pjmedia's default 5) of a phone call that takes Opus:
#: bench/bridge_cost.py measured 0.69 % of a core per Opus conversation at 5, 0.51 % at 3,
#: 0.35 % at 1 (the encoder toward the phone is most of it; the legs are only decoded).
OPUS_COMPLEXITY = 1
#: Codecs offered and accepted, by priority: wideband first (what the gateway offers a
#: supervisor's phone), then G.711. An ingress answer follows the platform's order (pjmedia
#: prefers the offerer's), so a platform's G.711 stays G.711.
_CODEC_PRIORITY = {"G722/": 255, "opus/": 254, "PCMU/": 253, "PCMA/": 252}


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_long)]


_SIPREC_TAG = _PjStr(b"siprec", 6)  # kept alive for the life of the process


def _allow_siprec_on_wheel() -> None:
    """The PyPI wheel (pjsua2 2.15, no ``siprecUse``): make pjsip accept ``Require: siprec``
    (RFC 7866 §6.1.1) instead of answering 420 by adding the option tag to the endpoint's
    Supported capability through ctypes (same loaded library, pj thread). 2.17 checks the
    account's ``siprecUse`` instead, which the project's build sets.
    """
    lib = ctypes.CDLL(pj._pjsua2.__file__)
    lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
    lib.pjsip_endpt_add_capability.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.POINTER(_PjStr),
    ]  # fmt: skip
    lib.pjsip_endpt_add_capability.restype = ctypes.c_int
    endpt = lib.pjsua_get_pjsip_endpt()
    status = lib.pjsip_endpt_add_capability(endpt, None, pj.PJSIP_H_SUPPORTED, None, 1, ctypes.byref(_SIPREC_TAG))
    if status != 0:
        raise RuntimeError(f"pjsip_endpt_add_capability(siprec) failed: {status}")


def _raise_fd_limit() -> None:
    """Every call's streams are sockets: lift the soft descriptor limit (often 1024) so the
    build's 4096-socket ioqueue can be used."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _WANTED_FDS if hard == resource.RLIM_INFINITY else min(_WANTED_FDS, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _audio_only(opt: Any, audio_streams: int) -> None:
    """A call's media: ``audio_streams`` audio streams, no video, and no real-time-text stream
    (pjsua >= 2.16 adds one to every call unless told: 2 more sockets per call)."""
    opt.audioCount = audio_streams
    opt.videoCount = 0
    if hasattr(opt, "textCount"):
        opt.textCount = 0


_SRTP_USE = {"off": "PJMEDIA_SRTP_DISABLED", "optional": "PJMEDIA_SRTP_OPTIONAL", "mandatory": "PJMEDIA_SRTP_MANDATORY"}


def _srtp(media: Any, mode: str) -> None:
    """SRTP with SDES keys (RFC 4568) per ``mode``; DTLS-SRTP is not offered.

    ``srtpSecureSignaling = 0``: pjsua's default (1) demands TLS on the hop the worker itself
    sees, and that hop is always the front over loopback UDP, so every SRTP call would be
    refused. The keys travel in the SDP; the front terminates TLS toward the platform and the
    phones, and the loopback hop never leaves the host. Which transports may carry keys is the
    deployment's choice (``sip_tls_port``), not the worker's.
    """
    media.srtpUse = getattr(pj, _SRTP_USE[mode])
    media.srtpSecureSignaling = 0
    media.srtpOpt.keyings = pj.IntVector([pj.PJMEDIA_SRTP_KEYING_SDES])


def _opus_at_bridge_rate(ep: Any) -> None:
    """Opus (when the build has it) decodes and encodes mono at the bridge's rate: no resampler
    per stream, and the SDP says so (``maxplaybackrate``/``sprop-maxcapturerate``)."""
    opus = next((c.codecId for c in ep.codecEnum2() if c.codecId.lower().startswith("opus/")), None)
    if opus is None:
        return
    cfg = ep.getCodecOpusConfig()
    cfg.sample_rate = CLOCK_RATE
    cfg.channel_cnt = 1
    cfg.complexity = OPUS_COMPLEXITY
    ep.setCodecOpusConfig(cfg)


def resample_ms(rate_in: int, rate_out: int) -> float:
    """The delay the bridge's resampler adds between a port at ``rate_in`` and one at
    ``rate_out`` (0 at the same rate: no resampler)."""
    if not rate_in or not rate_out or rate_in == rate_out:
        return 0.0
    return 1000 * _RESAMPLER_HALF_TAPS / min(rate_in, rate_out)


def port_rate(media: Any) -> int:
    """The clock rate of ``media``'s bridge port (a G.711 stream 8000, G.722 and the workers'
    Opus 16000); 0 if pj no longer knows the port."""
    try:
        return int(media.getPortInfo().format.clockRate)
    except pj.Error:
        return 0


def _placement_token(msg: str) -> str:
    """The value of the front's placement header in a request's head, or ""."""
    head = msg.split("\r\n\r\n", 1)[0]
    for line in head.split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == PLACEMENT_HEADER:
            return value.strip()
    return ""


def _buf_bytes(frame: Any) -> bytes:
    """Read a pj ``ByteVector`` through its std::vector pointers (~2 µs instead of ~160 µs)."""
    vec = frame.buf
    beg, end = (ctypes.c_void_p * 2).from_address(int(vec.this))
    if not beg or not end:
        return b""
    return ctypes.string_at(beg, end - beg)


class Worker:
    def __init__(self, args: WorkerArgs) -> None:
        self.args = args
        self.ctl = socket.socket(fileno=args.ctl_fd)
        self.ctl.setblocking(True)
        self.frames = socket.socket(fileno=args.frame_fd)
        self.frames.setblocking(False)
        #: LegFrames for a media process go over a unix seqpacket connection to its socket
        #: (SetTap.to): connected, so no 10-datagram receive queue limit as for sendto().
        self.media: dict[str, socket.socket] = {}
        self.commands: queue.Queue[Command | None] = queue.Queue()
        self.send_lock = threading.Lock()
        self.running = True
        self.ep: Any = None
        self.acc: Any = None
        self.next_key = 1
        self.calls: dict[int, GwCall] = {}  # key → call
        self.graveyard: list[Any] = []
        self.convs: dict[str, Conv] = {}
        self.frames_sent = 0
        self.frames_dropped = 0
        self.invites_refused = 0
        self.stats_us = 0
        #: "PCMU/8000" -> the codec's frame length in ms (the unit of a stream's jitter buffer)
        self.frame_ms: dict[str, int] = {}
        self.max_calls = min(args.max_calls, BUILD_MAX_CALLS) if args.max_calls > 0 else BUILD_MAX_CALLS

    # --- plumbing --------------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        data = encode(event)
        with self.send_lock:
            try:
                self.ctl.sendall(data)
            except OSError:
                self.running = False

    def _reader(self) -> None:
        # A CRLF keep-alive to our own SIP port wakes libHandleEvents() at once (pjsip drops
        # it), so a command waits for no poll timeout and the poll can stay long and cheap.
        waker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wake_to = (self.args.host, self.args.sip_port)
        buf = b""
        try:
            while True:
                chunk = self.ctl.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        try:
                            message = decode(line)
                        except ProtocolError as exc:
                            print(f"sip worker: {exc}", file=sys.stderr, flush=True)
                            continue
                        if not isinstance(message, Command):
                            continue
                        self.commands.put(message)
                        try:
                            waker.sendto(b"\r\n\r\n", wake_to)
                        except OSError:
                            pass
        except OSError:
            pass
        self.commands.put(None)  # main process gone: quit
        try:
            waker.sendto(b"\r\n\r\n", wake_to)
        except OSError:
            pass

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        a = self.args
        if "+gw." not in PJSUA2_VERSION:
            print(
                f"WARNING: pjsua2 {PJSUA2_VERSION or '?'} is not the project's build: {BUILD_MAX_CALLS} calls per "
                "worker (scripts/setup.sh builds it)",
                file=sys.stderr,
                flush=True,
            )
        _raise_fd_limit()
        ep = self.ep = pj.Endpoint()
        ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = self.max_calls
        cfg.uaConfig.userAgent = "silent-monitor-gateway"
        cfg.logConfig.level = a.log_level
        cfg.logConfig.consoleLevel = a.log_level
        # The conference bridge ticks at the wideband legs' rate (CLOCK_RATE).
        cfg.medConfig.clockRate = CLOCK_RATE
        cfg.medConfig.sndClockRate = CLOCK_RATE
        cfg.medConfig.channelCount = 1
        cfg.medConfig.audioFramePtime = 20
        cfg.medConfig.ptime = 20
        cfg.medConfig.quality = MEDIA_QUALITY  # the resampler's delay: see MEDIA_QUALITY
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0
        cfg.medConfig.threadCnt = 0
        ep.libInit(cfg)
        siprec_use = getattr(pj, "PJSUA_SIP_SIPREC_OPTIONAL", None)
        if siprec_use is None:
            _allow_siprec_on_wheel()
        tcfg = pj.TransportConfig()
        tcfg.port = a.sip_port
        tcfg.boundAddress = a.host
        tcfg.publicAddress = a.host
        ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        ep.libStart()
        ep.audDevManager().setNullDev()
        for c in ep.codecEnum2():
            ep.codecSetPriority(
                c.codecId, next((p for name, p in _CODEC_PRIORITY.items() if c.codecId.startswith(name)), 0)
            )
        _opus_at_bridge_rate(ep)
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:gateway@{a.host}:{a.sip_port}"
        acfg.mediaConfig.transportConfig.port = a.rtp_port
        acfg.mediaConfig.transportConfig.portRange = a.rtp_range
        acfg.mediaConfig.transportConfig.boundAddress = a.media_host
        acfg.mediaConfig.transportConfig.publicAddress = a.media_host
        acfg.natConfig.sdpNatRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.contactRewriteUse = 0
        _srtp(acfg.mediaConfig, a.srtp)
        if a.proxy:  # every request (BYE to the platform, INVITE to a phone) goes through the front
            acfg.sipConfig.proxies = pj.StringVector([a.proxy])
        if siprec_use is not None:
            # pjsip's own SIPREC (RFC 7866) support: accepts `Require: siprec` and checks the
            # offer (a=label on every stream, rs-metadata); plain INVITEs stay welcome.
            acfg.callConfig.siprecUse = siprec_use
        self.acc = GwAccount(self)
        self.acc.create(acfg, True)
        threading.Thread(target=self._reader, name="ctl-reader", daemon=True).start()
        self.emit(Ready(pid=os.getpid(), sip_port=a.sip_port, max_calls=self.max_calls, pjsua2=PJSUA2_VERSION))

    def run(self) -> None:
        next_stats = next_level = 0.0
        level_us = 0
        while self.running:
            # Wake for the stats read by the poll's own timeout, not after a packet: a jitter
            # buffer read right after its stream's packet (or burst) arrived shows it at its
            # fullest. Read at a random moment instead (±100 ms around each second: random
            # against any arrival pattern of a period up to 200 ms), its level is on average
            # how long a frame waits in it (Little's law). Likewise the level samples between.
            wait = min(self.args.poll_ms, max(0, math.ceil((min(next_stats, next_level) - time.monotonic()) * 1000)))
            self.ep.libHandleEvents(wait)
            self.graveyard.clear()
            while True:
                try:
                    cmd = self.commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is None:
                    self.running = False
                    break
                try:
                    self.handle(cmd)
                except pj.Error as exc:
                    self.reply(cmd, False, f"pj: {exc.info()}")
                except Exception as exc:
                    self.reply(cmd, False, f"{type(exc).__name__}: {exc}")
            now = time.monotonic()
            self.check_timers(now)  # a method of its own: no pj object may outlive it in this frame
            if now >= next_level:
                next_level = now + random.uniform(0, 2 / _LEVEL_SAMPLES)
                t0 = time.perf_counter_ns()
                self.sample_levels()
                level_us += (time.perf_counter_ns() - t0) // 1000
            if now >= next_stats:
                next_stats = now + random.uniform(1.0 - _STATS_SPREAD, 1.0 + _STATS_SPREAD)
                t0 = time.perf_counter_ns()
                self.read_streams(now)
                self.stats_us = (time.perf_counter_ns() - t0) // 1000 + level_us
                level_us = 0
                self.emit(
                    Stats(
                        frames=self.frames_sent,
                        drops=self.frames_dropped,
                        refused=self.invites_refused,
                        stats_us=self.stats_us,
                    )
                )

    def check_timers(self, now: float) -> None:
        """Reject calls the main process did not decide on; give up on phones that keep ringing."""
        for call in list(self.calls.values()):
            if call.pending_since and now - call.pending_since > _DECIDE_TIMEOUT:
                call.pending_since = 0.0
                call.reject(500)
            elif call.ringing_since and now - call.ringing_since > self.args.ring_timeout:
                call.ringing_since = 0.0  # a phone that never answers is unreachable
                call.end_reason = "phone_unreachable"
                call.local_hangup()

    def hang_up_all(self) -> None:
        """A method of its own: no call may stay bound to a local of ``shutdown`` past libDestroy
        (its destructor would then assert in pjsua)."""
        for call in list(self.calls.values()):
            call.local_hangup()

    def shutdown(self) -> None:
        self.hang_up_all()
        deadline = time.monotonic() + 1.0
        while self.calls and time.monotonic() < deadline:
            self.ep.libHandleEvents(20)
        for conv in self.convs.values():
            conv.drop_tap()
        self.convs.clear()
        self.calls.clear()
        self.graveyard.clear()
        gc.collect()  # every pj object must die before libDestroy (C asserts otherwise)
        try:
            # Calls are already hung up above: skip pjsua's fixed 1 s wait for late messages.
            self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)
        except Exception:
            pass

    def read_streams(self, now: float) -> None:
        """Once a second, one ``getStreamStat`` per ingress stream, for two uses: hang up calls
        whose RTP stopped (a platform that vanished without BYE; all calls, if
        ``media_timeout``), and report each leg of a conversation someone hears
        (:class:`LegQuality`; nobody hears most conversations, and their streams are not read
        for it)."""
        limit = self.args.media_timeout
        reports: dict[str, dict[str, Any]] = {}
        for call in list(self.calls.values()):
            if call.phone_mid is not None or not call.media_idx or call.ended:
                continue
            conv = self.convs.get(call.conv_id or "")
            heard = conv is not None and (conv.phone is not None or bool(conv.frame_to))
            if not heard:
                call.rx_seen.clear()  # a later report starts from a fresh baseline
                call.levels.clear()
                if limit <= 0:
                    continue
            total = 0
            for idx in call.media_idx:
                try:
                    stat = call.getStreamStat(idx)
                except pj.Error:
                    continue
                rx = stat.rtcp.rxStat
                total += rx.pkt
                leg = call.legs[idx] if heard and idx < len(call.legs) else None
                if conv is not None and leg:
                    before = call.rx_seen.get(idx)
                    call.rx_seen[idx] = (rx.pkt, rx.loss)
                    if before is not None:  # the first read is the baseline
                        reports.setdefault(conv.cid, {})[leg] = {
                            "packets": rx.pkt - before[0],
                            "lost": rx.loss - before[1],
                            "jitter_us": int(rx.jitterUsec.last),
                            "jbuf_ms": call.mean_level(idx, int(stat.jbuf.size) * self.codec_frame_ms(call, idx)),
                            "resample_ms": conv.resample_ms(leg),
                            "codec_ms": self.codec_frame_ms(call, idx)
                            if conv.leg_codec.get(leg) in _HOLDING_DECODERS
                            else 0,
                        }
            if limit <= 0:
                continue
            if total != call.rx_pkts:
                call.rx_pkts, call.rx_changed = total, now
            elif now - call.rx_changed > limit:
                call.end_reason = "media_timeout"
                call.local_hangup()
        for cid, legs in reports.items():
            heard_conv = self.convs.get(cid)  # a hang-up above may have ended it
            phone = heard_conv.phone if heard_conv is not None else None
            self.emit(LegQuality(cid=cid, legs=legs, phone=phone is not None and phone.connected))

    def sample_levels(self) -> None:
        """One jitter-buffer level reading of each stream someone hears (a baseline is kept for
        it: :meth:`read_streams`), added up until the next report."""
        for call in list(self.calls.values()):
            for idx in list(call.rx_seen):
                try:
                    size = int(call.getStreamStat(idx).jbuf.size)
                except pj.Error:
                    continue
                total, n = call.levels.get(idx, (0, 0))
                call.levels[idx] = (total + size * self.codec_frame_ms(call, idx), n + 1)

    def codec_frame_ms(self, call: GwCall, idx: int) -> int:
        """The frame length of stream ``idx``'s codec: a jitter buffer counts codec frames, not
        packets (G.711 and G.722 frames are 10 ms: a 20 ms packet is two of them)."""
        frame_ms = call.jb_frame_ms.get(idx)
        if frame_ms is None:
            try:
                info = call.getStreamInfo(idx)
                key = f"{info.codecName}/{info.codecClockRate}"
            except pj.Error:
                return FRAME_MS // 2  # not kept: asked again next second
            frame_ms = self.frame_ms.get(key)
            if frame_ms is None:
                ids = [c.codecId for c in self.ep.codecEnum2() if c.codecId.lower().startswith(key.lower())]
                frame_ms = int(self.ep.codecGetParam(ids[0]).info.frameLen) if ids else FRAME_MS // 2
                self.frame_ms[key] = frame_ms
            call.jb_frame_ms[idx] = frame_ms
        return frame_ms

    # --- commands --------------------------------------------------------------------------
    def reply(self, cmd: Command, ok: bool, error: str = "") -> None:
        if cmd.re:
            self.emit(Reply(re=cmd.re, ok=ok, error=error))

    def handle(self, cmd: Command) -> None:
        match cmd:
            case Answer():
                call = self.calls.get(cmd.call)
                if call is None or not call.pending_since:
                    self.reply(cmd, False, "no such pending call")
                    return
                call.pending_since = 0.0
                call.conv_id = cmd.cid
                call.legs = list(cmd.legs)
                # Register first: answer() negotiates SDP and fires onCallMediaState synchronously.
                self.conv(call.conv_id).calls.add(call.key)
                try:
                    call.accept(len(call.legs))
                except pj.Error as exc:
                    call.reject(488)  # never leave a call half-answered: it would hold a slot
                    self.reply(cmd, False, f"pj: {exc.info()}")
                    return
                self.reply(cmd, True)
            case Reject():
                call = self.calls.get(cmd.call)
                if call is not None and call.pending_since:
                    call.pending_since = 0.0
                    call.reject(cmd.code)
                self.reply(cmd, True)
            case CallPhone():
                conv = self.conv(cmd.cid)
                if conv.phone is not None:
                    self.reply(cmd, False, "phone already in call")
                    return
                call = GwCall(self, self.acc)
                call.conv_id = cmd.cid
                call.phone_mid = cmd.mid
                prm = pj.CallOpParam(True)
                _audio_only(prm.opt, 1)
                prm.opt.flag |= pj.PJSUA_CALL_SET_MEDIA_DIR
                prm.opt.mediaDir = pj.IntVector([pj.PJMEDIA_DIR_ENCODING])
                call.makeCall(tls_hop_uri(cmd.uri), prm)  # raises pj.Error for a URI pj refuses
                call.ringing_since = time.monotonic()
                self.calls[call.key] = call
                conv.phone = call
                conv.calls.add(call.key)
                self.reply(cmd, True)
            case HangUpPhone():
                for call in list(self.calls.values()):
                    if call.phone_mid == cmd.mid:
                        call.local_hangup()
                self.reply(cmd, True)
            case SetTap():
                conv = self.conv(cmd.cid)
                if cmd.on and cmd.to and not self.connect_media(cmd.to):
                    self.reply(cmd, False, f"can not connect to {cmd.to}")
                    return
                # Replaced, not mutated: the clock thread may be iterating the old one.
                conv.frame_to = conv.frame_to | {cmd.to} if cmd.on else conv.frame_to - {cmd.to}
                if not cmd.on and cmd.to and all(cmd.to not in c.frame_to for c in self.convs.values()):
                    gone = self.media.pop(cmd.to, None)
                    if gone is not None:
                        gone.close()  # a send racing this raises OSError: counted as dropped
                if conv.want_tap:
                    conv.wire_tap()
                else:
                    conv.drop_tap()
                self.reply(cmd, True)
            case Quit():
                self.reply(cmd, True)
                self.running = False
            case _:
                self.reply(cmd, False, f"unknown command {cmd.TYPE!r}")

    def connect_media(self, path: str) -> bool:
        """The connection to a media process's frame socket (made once per path)."""
        if path in self.media:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The media process reads once per 20 ms tick: room for a tick's burst of hundreds
        # of frames (~1600 at 1 MiB; the kernel caps it at net.core.wmem_max).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.settimeout(1.0)  # a media process too busy to accept must not hold the worker
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            print(f"sip worker: media process socket {path}: {exc}", file=sys.stderr, flush=True)
            return False
        sock.setblocking(False)
        self.media[path] = sock
        return True

    def conv(self, cid: str) -> Conv:
        conv = self.convs.get(cid)
        if conv is None:
            conv = self.convs[cid] = Conv(self, cid)
        return conv

    def call_gone(self, call: GwCall) -> None:
        self.calls.pop(call.key, None)
        self.graveyard.append(call)  # pj objects die outside their own callbacks
        conv = self.convs.get(call.conv_id or "")
        if conv is None:
            return
        conv.calls.discard(call.key)
        if conv.phone is call:
            conv.phone = None
            conv.phone_media = None
            conv.phone_rate = 0
        for leg, owner in list(conv.leg_owner.items()):
            if owner is call:
                del conv.leg_owner[leg]
                conv.legs.pop(leg, None)
                conv.leg_codec.pop(leg, None)
                conv.leg_rate.pop(leg, None)
        if not conv.legs:
            # No leg left: the phone has nothing to hear. Hang it up; the plane reports why.
            if conv.phone is not None:
                conv.phone.end_reason = "voice_ended"
                conv.phone.local_hangup()
            conv.drop_tap()
        elif conv.want_tap and any(port.rate != conv.tap_rate for port in conv.tap_ports.values()):
            conv.wire_tap()  # the narrowband leg left: the rest is wideband
        if not conv.calls:
            conv.drop_tap()
            self.convs.pop(conv.cid, None)


class Conv:
    """One conversation's pj objects in this worker: leg medias, the phone call, the tap."""

    def __init__(self, worker: Worker, cid: str) -> None:
        self.w = worker
        self.cid = cid
        self.cid_b = cid.encode()
        self.calls: set[int] = set()
        self.legs: dict[str, Any] = {}  # 'agent'/'customer' → AudioMedia
        self.leg_codec: dict[str, str] = {}  # leg → its negotiated codec (lower case)
        self.leg_rate: dict[str, int] = {}  # leg → its bridge port's clock rate
        self.leg_owner: dict[str, GwCall] = {}
        self.phone: GwCall | None = None
        self.phone_media: Any = None
        self.phone_rate = 0
        #: where the LegFrames go: "" is the frame socket to the main process, else a media
        #: process's socket path (SetTap.to)
        self.frame_to: frozenset[str] = frozenset()
        self.tap_ports: dict[str, TapPort] = {}
        self.pending: dict[str, bytes] = {}
        self.seq = 0

    @property
    def want_tap(self) -> bool:
        return bool(self.frame_to)

    @property
    def tap_rate(self) -> int:
        """The rate of this conversation's LegFrames: the bridge's while every leg up is
        wideband (G.722, Opus), else 8 kHz (a G.711 leg carries nothing above 4 kHz)."""
        wide = self.leg_codec and all(self.leg_codec.get(leg) in WIDEBAND_CODECS for leg in self.legs)
        return CLOCK_RATE if wide else NARROW_RATE

    def resample_ms(self, leg: str) -> dict[str, float]:
        """What the bridge's resamplers add to ``leg``'s way out, per path: to this worker's
        phone (``sip``) and to the tap (``webrtc``): 8 -> 16 kHz for a G.711 leg, 16 -> 8 kHz
        toward a G.711 phone or an 8 kHz tap (each :func:`resample_ms`)."""
        into = resample_ms(self.leg_rate.get(leg, 0), CLOCK_RATE)
        out: dict[str, float] = {"webrtc": into + resample_ms(CLOCK_RATE, self.tap_rate)}
        if self.phone_rate:
            out["sip"] = into + resample_ms(CLOCK_RATE, self.phone_rate)
        return out

    def leg_up(self, leg: str, media: Any, owner: GwCall, codec: str = "") -> None:
        self.legs[leg] = media
        self.leg_owner[leg] = owner
        self.leg_codec[leg] = codec
        self.leg_rate[leg] = port_rate(media)
        if self.phone_media is not None:
            media.startTransmit(self.phone_media)
        if self.want_tap:
            self.wire_tap()

    def phone_up(self, media: Any) -> None:
        self.phone_media = media
        self.phone_rate = port_rate(media)
        # The conference bridge mixes both legs into the phone call in C. Nothing is ever
        # transmitted *from* the phone's media: what the supervisor sends goes nowhere.
        for m in self.legs.values():
            m.startTransmit(media)

    def wire_tap(self) -> None:
        rate = self.tap_rate
        if any(port.rate != rate for port in self.tap_ports.values()):
            self.drop_tap()  # a leg came or went that changes the rate: new ports (the bridge resamples)
        for leg, media in self.legs.items():
            port = self.tap_ports.get(leg)
            if port is None:
                port = TapPort(self, leg, rate)
                fmt = pj.MediaFormatAudio()
                fmt.type = pj.PJMEDIA_TYPE_AUDIO
                fmt.clockRate = rate
                fmt.channelCount = 1
                fmt.bitsPerSample = 16
                fmt.frameTimeUsec = 20000
                port.createPort(f"tap-{leg[0]}-{self.w.next_key}", fmt)
                self.w.next_key += 1
                self.tap_ports[leg] = port
            media.startTransmit(port)

    def drop_tap(self) -> None:
        ports, self.tap_ports = self.tap_ports, {}
        self.pending = {}
        # Destroying a port removes it from the bridge; keep the objects until the next loop
        # turn so a clock-thread callback in flight never sees a freed object.
        self.w.graveyard.extend(ports.values())

    def on_leg_frame(self, leg: str, data: bytes, rate: int) -> None:
        """Runs on pj's clock thread, once per tapped leg per 20 ms: pair the legs and send."""
        if leg == "mixed":
            self.send_mixed(data, rate)
            return
        pending = self.pending
        other = "customer" if leg == "agent" else "agent"
        if other in pending and other in self.legs:
            mine, theirs = data, pending.pop(other)
        elif leg in pending or other not in self.legs:
            # The other leg gives no frame this tick (absent): send with silence for it.
            mine = pending.pop(leg, data)
            if mine is not data:
                pending[leg] = data
            theirs = b"\0" * len(mine)
        else:
            pending[leg] = data
            return
        agent, customer = (mine, theirs) if leg == "agent" else (theirs, mine)
        if len(agent) != len(customer):
            return
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.send_frame(encode_leg_frame(self.cid_b, self.seq, rate, agent, customer, time.monotonic_ns()))

    def send_frame(self, data: bytes) -> None:
        """One encoded LegFrame to every destination switched on (pj's clock thread)."""
        for to in self.frame_to:
            try:
                if to:
                    self.w.media[to].send(data)
                else:
                    self.w.frames.send(data)
                self.w.frames_sent += 1
            except (OSError, KeyError):  # BlockingIOError included: the reader is behind, drop
                self.w.frames_dropped += 1

    def send_mixed(self, data: bytes, rate: int) -> None:
        """A mixed leg (both parties in one stream) goes out as it is, on the agent side with
        silence beside it: a mono mix of the two is the stream itself, never doubled."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        self.send_frame(encode_leg_frame(self.cid_b, self.seq, rate, data, b"\0" * len(data), time.monotonic_ns()))


class TapPort(pj.AudioMediaPort):  # type: ignore[misc]  # pjsua2 has no type information
    def __init__(self, conv: Conv, leg: str, rate: int) -> None:
        super().__init__()
        self.conv = conv
        self.leg = leg
        self.rate = rate
        self.silence = b"\0" * (2 * rate // 50)

    def onFrameReceived(self, frame: Any) -> None:
        # The bridge calls every port once per tick, with a NONE frame when the mix is digital
        # silence: count those as silence so the two legs stay paired tick by tick.
        data = _buf_bytes(frame) if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO else b""
        self.conv.on_leg_frame(self.leg, data or self.silence, self.rate)


class GwAccount(pj.Account):  # type: ignore[misc]  # pjsua2 has no type information
    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.w = worker

    def onIncomingCall(self, prm: Any) -> None:
        call = GwCall(self.w, self, prm.callId)
        self.w.calls[call.key] = call
        msg = prm.rdata.wholeMsg
        if not token_valid(self.w.args.token_key, _placement_token(msg)):
            # Not sent by the plane (a scan, a flood, a stale dialog): refuse it here and now,
            # so it holds neither a call slot nor the main process's attention.
            self.w.invites_refused += 1
            call.silent = True
            call.reject(403)
            return
        call.pending_since = time.monotonic()
        self.w.emit(Incoming(call=call.key, msg=msg))


class GwCall(pj.Call):  # type: ignore[misc]  # pjsua2 has no type information
    def __init__(self, worker: Worker, acc: Any, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(acc, call_id)
        self.w = worker
        self.key = worker.next_key
        worker.next_key += 1
        self.pending_since = 0.0
        self.ringing_since = 0.0
        self.media_idx: list[int] = []  # ingress stream indexes with media up
        self.rx_pkts = 0
        self.rx_changed = 0.0
        #: stream index -> (packets, lost) at the last quality read (LegQuality reports deltas)
        self.rx_seen: dict[int, tuple[int, int]] = {}
        #: stream index -> its codec's frame length, ms (Worker.codec_frame_ms)
        self.jb_frame_ms: dict[int, int] = {}
        #: stream index -> (sum of jitter-buffer level readings in ms, readings) since the last report
        self.levels: dict[int, tuple[int, int]] = {}
        self.conv_id: str | None = None
        self.legs: list[str | None] = []
        self.phone_mid: str | None = None
        self.local = False
        self.end_reason: str | None = None
        self.connected = False
        self.ended = False
        self.silent = False  # refused by the worker itself: the main process never heard of it

    def mean_level(self, idx: int, now_ms: int) -> int:
        """The mean of stream ``idx``'s level readings since the last report and ``now_ms``;
        starts the next period."""
        total, n = self.levels.pop(idx, (0, 0))
        return round((total + now_ms) / (n + 1))

    def accept(self, n_streams: int) -> None:
        prm = pj.CallOpParam(True)
        prm.statusCode = 200
        _audio_only(prm.opt, max(1, n_streams))
        self.answer(prm)

    def reject(self, code: int) -> None:
        prm = pj.CallOpParam()
        prm.statusCode = code
        self.local = True
        try:
            self.answer(prm) if code < 300 else self.hangup(prm)
        except pj.Error:
            pass

    def local_hangup(self) -> None:
        if self.ended:
            return
        self.local = True
        prm = pj.CallOpParam()
        try:
            self.hangup(prm)
        except pj.Error:
            pass

    def onCallState(self, prm: Any) -> None:
        ci = self.getInfo()
        if ci.state != pj.PJSIP_INV_STATE_DISCONNECTED or self.ended:
            return
        self.ended = True
        if self.phone_mid is not None:
            if self.end_reason:
                reason = self.end_reason
            elif self.local:
                reason = "hung_up"
            elif not self.connected:
                reason = "phone_unreachable"
            else:
                reason = "left"
            self.w.emit(PhoneEnded(mid=self.phone_mid, reason=reason))
        elif not self.silent:
            reason = self.end_reason or ("shutdown" if self.local else "bye")
            self.w.emit(CallEnded(call=self.key, reason=reason))
        self.w.call_gone(self)

    def onCallMediaState(self, prm: Any) -> None:
        ci = self.getInfo()
        conv = self.w.convs.get(self.conv_id or "")
        if conv is None:
            return
        for index, media in audio_medias(self, ci):
            leg = self.legs[index] if index < len(self.legs) else None
            if self.phone_mid is not None:
                if not self.connected:
                    self.connected = True
                    self.ringing_since = 0.0
                    conv.phone_up(media)
                else:
                    conv.phone_rate = port_rate(media)  # a re-INVITE may change its codec
            elif leg:
                if index not in self.media_idx:
                    self.media_idx.append(index)
                    self.rx_changed = time.monotonic()
                codec = self.codec_of(index)
                old = conv.legs.get(leg)
                if old is None:
                    conv.leg_up(leg, media, self, codec)
                    self.w.emit(LegUp(call=self.key, cid=conv.cid, leg=leg, codec=codec))
                elif conv.leg_owner.get(leg) is self and (
                    old.getPortId() != media.getPortId() or conv.leg_codec.get(leg) != codec
                ):
                    # A re-INVITE recreated the stream on a new bridge slot (or changed its
                    # codec): wire it again, and tell the plane the codec (wideband or not).
                    if conv.leg_codec.get(leg) != codec:
                        self.w.emit(LegUp(call=self.key, cid=conv.cid, leg=leg, codec=codec))
                    conv.leg_up(leg, media, self, codec)

    def codec_of(self, index: int) -> str:
        """The negotiated codec of stream ``index``, lower case (``pcmu``, ``g722``, ``opus``...)."""
        try:
            return str(self.getStreamInfo(index).codecName).lower()
        except pj.Error:
            return ""


def audio_medias(call: Any, ci: Any) -> list[tuple[int, Any]]:
    """``(m-line index, AudioMedia)`` of each audio stream of ``call`` with media up.

    ``Call.getAudioMedia()`` takes the position in ``CallInfo.media``, not the SDP m-line
    index: the two differ once an offer has a video m-line before an audio one (RFC 8068's
    audio, video, audio), and the m-line index there is "invalid media index". pjsua reports
    one-way media as LOCAL_HOLD/REMOTE_HOLD: anything but NONE is up.
    """
    return [
        (mi.index, call.getAudioMedia(position))
        for position, mi in enumerate(ci.media)
        if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status != pj.PJSUA_CALL_MEDIA_NONE
    ]


def main(argv: list[str] | None = None) -> int:
    args = WorkerArgs.parse(argv)
    w = Worker(args)
    try:
        w.start()
    except pj.Error as exc:
        w.emit(Fatal(error=str(exc.info())))
        return 2
    w.run()
    w.shutdown()
    # Destructors of SWIG proxies after libDestroy hit C asserts: leave without running them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
