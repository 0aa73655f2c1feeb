"""A pjsua2 SIP phone that plays the supervisor: answers calls and records what it hears.

    python -m devtools.sip_phone --port 5090 --record out.wav [--tone 1500] [--hangup-after 5]
        [--tls-port 5091 --tls-cert phone.pem --tls-key phone.key] [--srtp mandatory]

It prints one line per event on stdout (``READY``, ``INCOMING <from>``,
``CONNECTED dir=<n> status=<n> remote=<the caller's RTP host:port>``, ``DISCONNECTED <code>``)
so scripts and tests can follow it. The recording is a mono WAV at the phone's clock rate:
8 kHz, or 16 kHz when ``--codecs`` puts a wideband codec first (``--codecs G722,PCMU``: a
wideband desk phone; default ``PCMU,PCMA``; ``opus`` works too). ``CONNECTED`` names the
codec the call got (``codec=G722``). A second call in the same run records to ``out-2.wav`` and so on. ``--tone`` sends a sine
tone toward the caller: the gateway must drop it (a silent monitor is receive-only).
``--tls-port`` adds a SIP-over-TLS listener (call it as ``sips:supervisor@host:tls-port`` or
``sip:...;transport=tls``); ``--srtp mandatory`` accepts only SRTP (SDES) calls (``CONNECTED``
then carries ``srtp=1``).
Runs in its own process (pjsua2 is a per-process singleton); stop it with SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pjsua2 as pj

from devtools import pj_secure

WIDEBAND = ("G722", "OPUS")


def clock_rate(codecs: str) -> int:
    """16 kHz when the first of ``codecs`` is wideband (G722, opus), else 8 kHz."""
    return 16000 if codecs.split(",")[0].strip().upper() in WIDEBAND else 8000


def set_codecs(pj: Any, ep: Any, codecs: str) -> None:
    """Enable ``codecs`` (comma-separated names, first preferred), disable every other; Opus
    runs mono at the clock rate."""
    names = [c.strip().lower() for c in codecs.split(",") if c.strip()]
    for c in ep.codecEnum2():
        name = c.codecId.split("/", 1)[0].lower()
        ep.codecSetPriority(c.codecId, 255 - names.index(name) if name in names else 0)
    if "opus" in names:
        cfg = ep.getCodecOpusConfig()
        cfg.sample_rate = clock_rate(codecs)
        cfg.channel_cnt = 1
        ep.setCodecOpusConfig(cfg)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Phone:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.calls: list[PhoneCall] = []
        self.keep: list[Any] = []
        self.n = 0
        self.stop = False
        self.connected_at: float | None = None

    def start(self) -> None:
        a = self.args
        self.ep = pj.Endpoint()
        self.ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.mainThreadOnly = True
        cfg.uaConfig.maxCalls = 4
        cfg.logConfig.level = a.log_level
        cfg.logConfig.consoleLevel = a.log_level
        cfg.medConfig.clockRate = clock_rate(a.codecs)
        cfg.medConfig.sndClockRate = cfg.medConfig.clockRate
        cfg.medConfig.channelCount = 1
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0
        cfg.medConfig.threadCnt = 0
        self.ep.libInit(cfg)
        t = pj.TransportConfig()
        t.port = a.port
        t.boundAddress = a.host
        self.ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, t)
        if a.tls_port:
            pj_secure.create_tls_transport(pj, self.ep, a.host, a)
        self.ep.libStart()
        self.ep.audDevManager().setNullDev()
        set_codecs(pj, self.ep, a.codecs)
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:supervisor@{a.host}:{a.port}"
        acfg.mediaConfig.transportConfig.port = a.rtp_port
        acfg.mediaConfig.transportConfig.portRange = 20
        acfg.mediaConfig.transportConfig.boundAddress = a.host
        pj_secure.apply_srtp(pj, acfg.mediaConfig, a.srtp)
        self.acc = PhoneAccount(self)
        self.acc.create(acfg, True)
        say("READY")

    def hang_up_all(self) -> None:
        """A method of its own: no call may stay bound to a local of ``run`` past libDestroy
        (its destructor would then assert in pjsua)."""
        for call in self.calls:
            if call.isActive():
                try:
                    call.hangup(pj.CallOpParam())
                except pj.Error:
                    pass

    def run(self) -> None:
        while not self.stop:
            self.ep.libHandleEvents(20)
            if (
                self.args.hangup_after
                and self.connected_at is not None
                and time.monotonic() - self.connected_at > self.args.hangup_after
            ):
                self.connected_at = None
                self.hang_up_all()
        self.hang_up_all()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            self.ep.libHandleEvents(20)
        self.keep.clear()
        self.calls.clear()
        gc.collect()
        self.ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)


class PhoneAccount(pj.Account):
    def __init__(self, phone: Phone) -> None:
        super().__init__()
        self.phone = phone

    def onIncomingCall(self, prm: Any) -> None:
        call = PhoneCall(self.phone, self, prm.callId)
        self.phone.calls.append(call)
        say(f"INCOMING {call.getInfo().remoteUri}")
        op = pj.CallOpParam(True)
        op.opt.audioCount = 1
        op.opt.videoCount = 0
        if hasattr(op.opt, "textCount"):
            op.opt.textCount = 0  # pjsua >= 2.16 adds a real-time-text stream unless told
        op.statusCode = self.phone.args.reject or 200
        if op.statusCode >= 300:
            call.hangup(op)
        else:
            call.answer(op)


class PhoneCall(pj.Call):
    def __init__(self, phone: Phone, acc: Any, call_id: int) -> None:
        super().__init__(acc, call_id)
        self.phone = phone
        self.wired = False
        self.srtp = False  # our answer keyed SRTP (RTP/SAVP with a=crypto)

    def onCallSdpCreated(self, prm: Any) -> None:
        sdp = prm.sdp.wholeSdp
        self.srtp = "RTP/SAVP" in sdp and "a=crypto:" in sdp

    def onCallState(self, prm: Any) -> None:
        ci = self.getInfo()
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            say(f"DISCONNECTED {ci.lastStatusCode}")
            if self.phone.args.once:
                self.phone.stop = True

    def onCallMediaState(self, prm: Any) -> None:
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO or mi.status == pj.PJSUA_CALL_MEDIA_NONE or self.wired:
                continue
            self.wired = True
            media = self.getAudioMedia(mi.index)
            ph = self.phone
            ph.n += 1
            if ph.args.record:
                path = Path(ph.args.record)
                if ph.n > 1:
                    path = path.with_name(f"{path.stem}-{ph.n}{path.suffix}")
                rec = pj.AudioMediaRecorder()
                rec.createRecorder(str(path))
                media.startTransmit(rec)
                ph.keep.append(rec)
            if ph.args.tone:
                tg = pj.ToneGenerator()
                tg.createToneGenerator(clock_rate(ph.args.codecs), 1)
                td = pj.ToneDesc()
                td.freq1 = ph.args.tone
                td.freq2 = 0
                td.on_msec = 1000
                td.off_msec = 0
                td.volume = 0
                tv = pj.ToneDescVector()
                tv.append(td)
                tg.play(tv, True)
                tg.startTransmit(media)
                ph.keep.append(tg)
            ph.connected_at = time.monotonic()
            # The caller's media address as its SDP gave it (the gateway's RTP port for this call).
            remote = self.getStreamInfo(mi.index).remoteRtpAddress
            srtp = int(self.srtp)
            codec = self.getStreamInfo(mi.index).codecName
            say(f"CONNECTED dir={mi.dir} status={mi.status} remote={remote} srtp={srtp} codec={codec}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5090)
    p.add_argument("--rtp-port", type=int, default=0, help="first RTP port (0: any)")
    p.add_argument("--record", default="", help="WAV file to record what the phone hears")
    p.add_argument("--tone", type=int, default=0, help="send a sine tone of this many Hz")
    p.add_argument("--hangup-after", type=float, default=0.0, help="hang up N seconds after media starts")
    p.add_argument("--reject", type=int, default=0, help="answer calls with this status instead of 200")
    p.add_argument("--once", action="store_true", help="exit after the first call ends")
    p.add_argument("--codecs", default="PCMU,PCMA", help="codecs, first preferred (G722, opus, PCMU, PCMA)")
    p.add_argument("--log-level", type=int, default=1)
    pj_secure.add_arguments(p)
    args = p.parse_args(argv)
    phone = Phone(args)

    def on_signal(*_: Any) -> None:
        phone.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    phone.start()
    phone.run()
    say("BYEBYE")
    sys.stdout.flush()
    os._exit(0)  # no SWIG destructors after libDestroy


if __name__ == "__main__":
    sys.exit(main())
