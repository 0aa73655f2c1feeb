"""Cost of a SIP worker's conference bridge per 20 ms tick as its ports grow, per codec.

    python bench/bridge_cost.py                          # 0, 16, 64, 128, 256 conversations
    python bench/bridge_cost.py --conversations 32 256 --seconds 5
    python bench/bridge_cost.py --variants pcmu@8000 pcmu@16000 g722@16000 opus@16000 \
        --conversations 0 64 128                          # HD voice: codec @ bridge clock rate
    python bench/bridge_cost.py --conversations 0 64 --media-quality 8   # pjsua's default resampler

Two pjsua2 processes on loopback, configured like a gateway worker (null audio device, no pj
threads, no text stream) with, per variant ``codec@rate``, only that codec enabled (legs and
phone alike) and the conference bridge at that clock rate (default ``pcmu@16000``, what the
workers run since HD voice: 16 kHz bridge; ``pcmu@8000`` is the bridge before it). Opus runs
mono at the bridge's rate, as in the workers:

* the **gateway** side answers every call; a conversation is a SIPREC-shaped call (two audio
  streams: the agent and customer legs) and a phone call (one stream) that the bridge feeds
  with the mix of both legs, as :mod:`gateway.sip.worker` wires them: 3 bridge ports and 2
  connections per conversation;
* the **platform** side (one process per 150 conversations, pjsua's 512 calls per process)
  places those calls, sends a tone on every leg (``a=sendonly``: the gateway side answers
  recvonly, as a worker does) and receives the phone's mix (``a=recvonly``: the gateway side
  only sends to it, as a worker calls a phone ``a=sendonly``).

Only the gateway process is measured (utime + stime from /proc over ``--seconds``): CPU per
tick (50 ticks a second), per bridge port, per conversation. That is the bridge and what it
drives each tick: its mixing, and each port's stream (jitter buffer, G.711, RTP send/receive).
Prints one table; no asserts.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK = os.sysconf("SC_CLK_TCK")
TICKS_PER_SECOND = 50
#: The workers' medConfig.quality (gateway.sip.worker.MEDIA_QUALITY; not imported: that module
#: loads pjsua2, which only the bench's child processes do): the bridge's resampler.
MEDIA_QUALITY = 2
PER_PLATFORM = 150  # conversations per platform process: 2 calls each, 512 calls per process


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --- both sides: an Endpoint set up like a SIP worker ------------------------------------------


def endpoint(
    pj: Any,
    sip_port: int,
    conf_threads: int = 0,
    codec: str = "pcmu",
    clock_rate: int = 8000,
    opus_complexity: int = 1,
    media_quality: int = MEDIA_QUALITY,
) -> Any:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = getattr(pj, "MAX_CALLS", 4)
    cfg.logConfig.level = 0
    cfg.logConfig.consoleLevel = 0
    cfg.medConfig.clockRate = clock_rate
    cfg.medConfig.sndClockRate = clock_rate
    cfg.medConfig.channelCount = 1
    cfg.medConfig.quality = media_quality  # the bridge's resampler for G.711 ports
    cfg.medConfig.noVad = True
    cfg.medConfig.ecTailLen = 0
    cfg.medConfig.threadCnt = 0
    if conf_threads:
        cfg.medConfig.confThreads = conf_threads  # > 1 needs a build with the parallel bridge backend
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.port = sip_port
    tcfg.boundAddress = "127.0.0.1"
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()
    ids = [c.codecId for c in ep.codecEnum2()]
    if not any(i.lower().startswith(codec + "/") for i in ids):
        raise SystemExit(f"this pjsua2 has no {codec} codec ({', '.join(ids)}): scripts/setup.sh builds it")
    for codec_id in ids:
        ep.codecSetPriority(codec_id, 255 if codec_id.lower().startswith(codec + "/") else 0)
    if codec == "opus":
        opus = ep.getCodecOpusConfig()
        opus.sample_rate = clock_rate
        opus.channel_cnt = 1
        opus.complexity = opus_complexity
        ep.setCodecOpusConfig(opus)
    return ep


def account(pj: Any, cls: Any, user: str, sip_port: int, rtp_port: int, *args: Any) -> Any:
    cfg = pj.AccountConfig()
    cfg.idUri = f"sip:{user}@127.0.0.1:{sip_port}"
    cfg.mediaConfig.transportConfig.port = rtp_port
    cfg.mediaConfig.transportConfig.portRange = 2200
    cfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc = cls(*args)
    acc.create(cfg)
    return acc


def call_setting(opt: Any, streams: int) -> None:
    opt.audioCount = streams
    opt.videoCount = 0
    if hasattr(opt, "textCount"):
        opt.textCount = 0


def pump(ep: Any, stop: list[bool]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    while not stop:
        ep.libHandleEvents(20)


# --- the gateway side ----------------------------------------------------------------------


def run_gateway(
    sip_port: int, rtp_port: int, conf_threads: int, codec: str, clock_rate: int, opus_complexity: int, quality: int
) -> None:
    import pjsua2 as pj

    ep = endpoint(pj, sip_port, conf_threads, codec, clock_rate, opus_complexity, quality)
    legs: dict[str, list[Any]] = {}  # conversation → leg medias
    phones: dict[str, Any] = {}  # conversation → phone media
    calls: list[Any] = []

    class Leg(pj.Call):  # type: ignore[misc]
        def onCallMediaState(self, prm: Any) -> None:
            # The To user names the conversation and the call's role: c12-rec or c12-phone.
            conv, role = self.getInfo().localUri.split("sip:", 1)[1].split("@", 1)[0].rsplit("-", 1)
            medias = [
                self.getAudioMedia(m.index)
                for m in self.getInfo().media
                if m.type == pj.PJMEDIA_TYPE_AUDIO and m.status != pj.PJSUA_CALL_MEDIA_NONE
            ]
            if not medias:
                return
            if role == "phone":
                phones[conv] = medias[0]
            else:
                legs[conv] = medias
            if conv in phones and conv in legs:
                for leg in legs[conv]:
                    leg.startTransmit(phones[conv])

    class Gateway(pj.Account):  # type: ignore[misc]
        def onIncomingCall(self, prm: Any) -> None:
            call = Leg(self, prm.callId)
            calls.append(call)
            answer = pj.CallOpParam(True)
            answer.statusCode = 200
            streams = 2 if "-rec@" in prm.rdata.wholeMsg.split("\r\n", 1)[0] else 1
            call_setting(answer.opt, streams)
            call.answer(answer)

    acc = account(pj, Gateway, "gateway", sip_port, rtp_port)  # kept alive: pjsua holds no reference
    say(f"READY account {acc.getId()}")
    stop: list[bool] = []
    pump(ep, stop)
    os._exit(0)


# --- the platform side ---------------------------------------------------------------------


def run_platform(
    gateway_port: int, sip_port: int, rtp_port: int, first: int, count: int, codec: str, clock_rate: int
) -> None:
    import pjsua2 as pj

    ep = endpoint(pj, sip_port, 0, codec, clock_rate)
    calls: list[Any] = []
    tone = pj.ToneGenerator()
    tone.createToneGenerator(clock_rate, 1)
    desc = pj.ToneDesc()
    desc.freq1, desc.freq2, desc.on_msec, desc.off_msec, desc.volume = 600, 1000, 1000, 0, 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)
    connected: set[str] = set()

    class Src(pj.Call):  # type: ignore[misc]
        def onCallMediaState(self, prm: Any) -> None:
            info = self.getInfo()
            for m in info.media:
                # one-way media shows as LOCAL_HOLD/REMOTE_HOLD: anything but NONE is up
                if m.type == pj.PJMEDIA_TYPE_AUDIO and m.status != pj.PJSUA_CALL_MEDIA_NONE:
                    if "-rec@" in info.remoteUri:
                        tone.startTransmit(self.getAudioMedia(m.index))
                    connected.add(f"{info.remoteUri}/{m.index}")

    acc = account(pj, pj.Account, "platform", sip_port, rtp_port)
    for n in range(first, first + count):
        for role, streams in (("rec", 2), ("phone", 1)):
            call = Src(acc)
            prm = pj.CallOpParam(True)
            call_setting(prm.opt, streams)
            # As in production: the legs only send to the gateway (it answers recvonly) and the
            # phone only receives (the gateway calls it sendonly), so the measured side decodes
            # two streams and encodes one per conversation.
            prm.opt.flag |= pj.PJSUA_CALL_SET_MEDIA_DIR
            direction = pj.PJMEDIA_DIR_ENCODING if role == "rec" else pj.PJMEDIA_DIR_DECODING
            prm.opt.mediaDir = pj.IntVector([direction] * streams)
            call.makeCall(f"sip:c{n}-{role}@127.0.0.1:{gateway_port}", prm)
            calls.append(call)
            ep.libHandleEvents(0)
    deadline = time.monotonic() + 30
    while len(connected) < 3 * count and time.monotonic() < deadline:
        ep.libHandleEvents(10)
    say(f"CONNECTED {len(connected) // 3}")
    stop: list[bool] = []
    pump(ep, stop)
    ep.hangupAllCalls()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        ep.libHandleEvents(10)
    os._exit(0)


# --- the bench -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=str(ROOT), start_new_session=True
    )


def wait_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"child exited before {prefix!r}")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, nargs="+", default=[0, 16, 64, 128, 256])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--sip-port", type=int, default=46060)
    p.add_argument("--rtp-port", type=int, default=24000, help="gateway RTP ports from here, platforms' above")
    p.add_argument(
        "--conf-threads",
        type=int,
        default=0,
        help="medConfig.confThreads of the measured side (0: the build's default)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["pcmu@16000"],
        help="codec@bridge-rate per run, e.g. pcmu@8000 g722@16000 opus@16000 (codecs: pcmu, pcma, g722, opus)",
    )
    p.add_argument(
        "--opus-complexity", type=int, default=1, help="Opus encoder complexity of the measured side (workers: 1)"
    )
    p.add_argument(
        "--media-quality",
        type=int,
        default=MEDIA_QUALITY,
        help=f"medConfig.quality of the measured side: its resampler (workers: {MEDIA_QUALITY}; pjsua's default 8)",
    )
    p.add_argument("--codec", default="pcmu", help=argparse.SUPPRESS)
    p.add_argument("--clock-rate", type=int, default=16000, help=argparse.SUPPRESS)
    p.add_argument("--role", choices=["gateway", "platform"], help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--gateway-port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "gateway":
        run_gateway(
            args.sip_port,
            args.rtp_port,
            args.conf_threads,
            args.codec,
            args.clock_rate,
            args.opus_complexity,
            args.media_quality,
        )
        return 0
    if args.role == "platform":
        run_platform(
            args.gateway_port, args.sip_port, args.rtp_port, args.first, args.count, args.codec, args.clock_rate
        )
        return 0

    import pjsua2

    build = f"pjsua2 {getattr(pjsua2, '__version__', '?')}, {getattr(pjsua2, 'MAX_CALLS', 4)} calls per process"
    rows = []
    for variant in args.variants:
        codec, _, rate = variant.lower().partition("@")
        rows += run_variant(args, codec, int(rate or 16000))

    threads = f", confThreads={args.conf_threads}" if args.conf_threads else ""
    threads += f", medConfig.quality {args.media_quality}"
    if any(v.lower().startswith("opus") for v in args.variants):
        threads += f", Opus complexity {args.opus_complexity}"
    print(f"\nConference bridge of one worker-shaped process ({build}{threads}); {args.seconds:.0f} s per row")
    print(
        f"{'codec':>6} {'bridge Hz':>9} {'conversations':>13} {'held':>5} {'bridge ports':>12} {'CPU % core':>10} "
        f"{'ms/tick':>8} {'µs/port/tick':>12} {'above idle':>10} {'% core/conv':>11}"
    )
    idle_ms = 0.0
    for codec, rate, n, held, ports, pct, ms, us in rows:
        if held == 0:
            idle_ms = ms  # each variant's first row at 0 conversations is its idle
        above = f"{1000 * (ms - idle_ms) / (ports - 1):.1f}" if held else "-"
        per_conv = f"{(ms - idle_ms) * TICKS_PER_SECOND / 10 / held:.3f}" if held else "-"
        print(
            f"{codec:>6} {rate:>9} {n:>13} {held:>5} {ports:>12} {pct:>10.1f} {ms:>8.3f} {us:>12.1f} "
            f"{above:>10} {per_conv:>11}"
        )
    return 0


def run_variant(
    args: argparse.Namespace, codec: str, rate: int
) -> list[tuple[str, int, int, int, int, float, float, float]]:
    """One gateway-shaped process with ``codec`` and a ``rate`` bridge; one row per size."""
    shape = ["--codec", codec, "--clock-rate", str(rate)]
    gateway = child(
        "--role", "gateway", "--sip-port", str(args.sip_port), "--rtp-port", str(args.rtp_port),
        "--conf-threads", str(args.conf_threads), "--opus-complexity", str(args.opus_complexity),
        "--media-quality", str(args.media_quality), *shape,
    )  # fmt: skip
    wait_line(gateway, "READY")
    rows = []
    try:
        for n in args.conversations:
            platforms = []
            for i, first in enumerate(range(0, n, PER_PLATFORM)):
                count = min(PER_PLATFORM, n - first)
                argv = [
                    "--role", "platform", "--gateway-port", str(args.sip_port), "--first", str(first),
                    "--count", str(count), "--sip-port", str(args.sip_port + 1 + i),
                    "--rtp-port", str(args.rtp_port + 2400 * (1 + i)), *shape,
                ]  # fmt: skip
                platforms.append(child(*argv))
            held = sum(int(wait_line(pl, "CONNECTED").split()[1]) for pl in platforms)
            time.sleep(1.0)
            c0, t0 = cpu_seconds(gateway.pid), time.monotonic()
            time.sleep(args.seconds)
            cpu, wall = cpu_seconds(gateway.pid) - c0, time.monotonic() - t0
            ports = 1 + 3 * held  # the master port and three streams per conversation
            per_tick_ms = 1000 * cpu / (wall * TICKS_PER_SECOND)
            rows.append((codec, rate, n, held, ports, 100 * cpu / wall, per_tick_ms, 1000 * per_tick_ms / ports))
            for pl in platforms:
                stop(pl)
            time.sleep(2.0)  # the gateway side sees the BYEs
    finally:
        stop(gateway)
    return rows


if __name__ == "__main__":
    sys.exit(main())
