"""Prove the installed pjsua2 holds many calls in one process (the PyPI wheel stops at 4).

One Endpoint configured like a SIP worker (null audio device, no pj threads, PCMU only, no
text stream) calls itself on loopback from account ``a`` to account ``b``, so every call takes
two call slots. Each leg is fed silence through the conference bridge; the check passes when
every leg is CONFIRMED with active media and has received RTP, and all calls hang up cleanly,
and (on the project's own build) the legs' codecs are all there: PCMU, PCMA, G722, opus.

    python scripts/check-pjsua2.py [--calls 64] [--sip-port 45060] [--rtp-port 40000]

SIP and RTP ports stay above 40000, away from the gateway tests' 20000 range.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from typing import Any

import pjsua2 as pj

CLOCK_RATE = 8000


class Leg(pj.Call):  # type: ignore[misc]
    """One call slot; records its state for the polling loop."""

    def __init__(self, acc: pj.Account, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(acc, call_id)
        self.state = pj.PJSIP_INV_STATE_NULL
        self.media_active = False
        self.last_status = 0

    def onCallState(self, prm: Any) -> None:
        info = self.getInfo()
        self.state = info.state
        self.last_status = info.lastStatusCode

    def onCallMediaState(self, prm: Any) -> None:
        info = self.getInfo()
        for i, media in enumerate(info.media):
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                # Silence from the bridge's master port (the null device), so the stream sends RTP.
                pj.Endpoint.instance().audDevManager().getCaptureDevMedia().startTransmit(self.getAudioMedia(i))
                self.media_active = True

    def rx_packets(self) -> int:
        return int(self.getStreamStat(0).rtcp.rxStat.pkt)


def call_setting(opt: Any) -> None:
    """Audio only: no video, and no real-time-text stream (pjsip >= 2.16 adds one per call)."""
    opt.audioCount = 1
    opt.videoCount = 0
    if hasattr(opt, "textCount"):
        opt.textCount = 0


class Callee(pj.Account):  # type: ignore[misc]
    """Account ``b``: answers every call with 200."""

    def __init__(self) -> None:
        super().__init__()
        self.legs: list[Leg] = []

    def onIncomingCall(self, prm: Any) -> None:
        leg = Leg(self, prm.callId)
        self.legs.append(leg)
        answer = pj.CallOpParam(True)
        answer.statusCode = 200
        call_setting(answer.opt)
        leg.answer(answer)


def account_config(user: str, sip_port: int, rtp_port: int) -> pj.AccountConfig:
    cfg = pj.AccountConfig()
    cfg.idUri = f"sip:{user}@127.0.0.1:{sip_port}"
    cfg.mediaConfig.transportConfig.port = rtp_port
    cfg.mediaConfig.transportConfig.portRange = 4000
    cfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    return cfg


def place_calls(ep: pj.Endpoint, caller: pj.Account, uri: str, count: int) -> list[Leg]:
    outgoing: list[Leg] = []
    for _ in range(count):
        leg = Leg(caller)
        prm = pj.CallOpParam(True)
        call_setting(prm.opt)
        try:
            leg.makeCall(uri, prm)
        except pj.Error as exc:
            print(f"call {len(outgoing) + 1} refused locally: {exc.info()}")
            break
        outgoing.append(leg)
        ep.libHandleEvents(0)
    return outgoing


def pump(ep: pj.Endpoint, seconds: float, done: Any) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ep.libHandleEvents(10)
        if done():
            return True
    return bool(done())


def start_endpoint(max_calls: int, sip_port: int) -> pj.Endpoint:
    """An Endpoint set up like a SIP worker's: no pj threads, null audio device, PCMU only."""
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = max_calls  # pjsua clamps this to the build's PJSUA_MAX_CALLS
    cfg.logConfig.level = 1
    cfg.logConfig.consoleLevel = 1
    cfg.medConfig.clockRate = CLOCK_RATE
    cfg.medConfig.sndClockRate = CLOCK_RATE
    cfg.medConfig.channelCount = 1
    cfg.medConfig.noVad = True
    cfg.medConfig.ecTailLen = 0
    cfg.medConfig.threadCnt = 0
    ep.libInit(cfg)
    tcfg = pj.TransportConfig()
    tcfg.port = sip_port
    tcfg.boundAddress = "127.0.0.1"
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()
    for codec in ep.codecEnum2():
        ep.codecSetPriority(codec.codecId, 255 if codec.codecId.startswith("PCMU/") else 0)
    return ep


def check_calls(ep: pj.Endpoint, calls: int, sip_port: int, rtp_port: int) -> bool:
    """Place ``calls`` calls from account a to account b; True when all of them worked.

    Every Account and Call lives in this function's scope, so all are gone before libDestroy
    (a pj object destroyed after the library asserts).
    """
    caller = pj.Account()
    caller.create(account_config("a", sip_port, rtp_port))
    callee = Callee()
    callee.create(account_config("b", sip_port, rtp_port + 4000))

    started = time.monotonic()
    outgoing = place_calls(ep, caller, f"sip:b@127.0.0.1:{sip_port}", calls)

    def legs() -> list[Leg]:
        return outgoing + callee.legs

    def settled() -> bool:
        if all(leg.state == pj.PJSIP_INV_STATE_DISCONNECTED for leg in outgoing):
            return True
        return len(callee.legs) == len(outgoing) and all(
            leg.state == pj.PJSIP_INV_STATE_CONFIRMED and leg.media_active for leg in legs()
        )

    pump(ep, 30, settled)
    confirmed = sum(leg.state == pj.PJSIP_INV_STATE_CONFIRMED and leg.media_active for leg in outgoing)
    setup_s = time.monotonic() - started
    print(f"{confirmed}/{calls} calls confirmed with active media ({2 * confirmed} call slots) in {setup_s:.1f} s")
    refused = {leg.last_status for leg in outgoing if leg.state == pj.PJSIP_INV_STATE_DISCONNECTED}
    if refused:
        print(f"ended calls' last status codes: {sorted(refused)}")

    pump(ep, 1.0, lambda: False)  # let RTP flow for a second
    live = [leg for leg in legs() if leg.state == pj.PJSIP_INV_STATE_CONFIRMED]
    with_rtp = sum(leg.rx_packets() > 0 for leg in live)
    print(f"{with_rtp}/{len(live)} confirmed legs received RTP")

    ep.hangupAllCalls()
    hung_up = pump(ep, 15, lambda: all(leg.state == pj.PJSIP_INV_STATE_DISCONNECTED for leg in legs()))
    print("all calls hung up" if hung_up else "some calls did not end")
    return confirmed == calls and with_rtp == len(live) == 2 * calls and hung_up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=64, help="calls to place (each takes two call slots)")
    parser.add_argument("--sip-port", type=int, default=45060)
    parser.add_argument("--rtp-port", type=int, default=40000)
    args = parser.parse_args()

    # Every leg needs RTP and RTCP sockets; a worker raises its descriptor limit the same way.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    ep = start_endpoint(2 * args.calls, args.sip_port)
    max_calls = getattr(pj, "MAX_CALLS", None)
    build = f"self-built, MAX_CALLS={max_calls}" if max_calls else "PyPI wheel: 4 calls per process"
    print(f"pjsua2 {ep.libVersion().full} ({pj.__version__}, {build}) from {pj.__file__}")
    codecs = sorted(c.codecId.split("/", 1)[0].lower() for c in ep.codecEnum2())
    print(f"codecs: {', '.join(codecs)}")
    # HD voice needs G.722 and Opus; the project's build has both (libopus), the PyPI wheel may not.
    missing = [c for c in ("pcmu", "pcma", "g722", "opus") if c not in codecs] if max_calls else []
    if missing:
        print(
            f"missing codecs for the gateway's legs: {', '.join(missing)} (scripts/build-pjsua2.sh needs libopus-dev)"
        )
    ok = check_calls(ep, args.calls, args.sip_port, args.rtp_port) and not missing
    ep.libDestroy()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
