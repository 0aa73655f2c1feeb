"""A pjsua2 SIPREC recording client (SRC): plays fixture audio into the gateway's SIP front.

    python -m devtools.siprec_source --front 127.0.0.1:5060 --port 5200 \\
        --conv demo-a1:alice --conv demo-b1:bob \\
        --agent-wav fixtures/audio/agent_speech.wav --customer-wav fixtures/audio/customer_speech.wav \\
        [--duration 0] [--redial 1] [--swap] [--cid-header] [--record-prefix out]
        [--tls-port 5201 --tls-ca ca.pem] [--srtp mandatory]

``--codecs G722`` (or ``opus``, or a list, first preferred) offers wideband legs; the
process's clock is then 16 kHz, so 16 kHz WAVs keep what is above 4 kHz.

One SIPREC call per conversation (``multipart/mixed``: SDP with two ``a=sendonly`` audio
m-lines labelled 1 and 2, plus ``rs-metadata+xml`` naming the agent as a participant), so one
process carries up to 4 conversations (pjsua2's per-process call cap). Each stream plays its
WAV in a loop. ``--duration S`` hangs each call up S seconds after its media is up (0: never).
``--redial S``: a call that ends (the gateway hung up, the INVITE failed) is dialled again
after S seconds, doubling up to 10 s while it keeps failing; without it the process exits
once every call has ended.

``--tls-port`` sends the INVITE over TLS (``sip:srs@FRONT;transport=tls``, FRONT naming the
gateway's TLS port) from a TLS transport on that local port; ``--tls-ca`` verifies the
gateway's certificate. ``--srtp mandatory`` offers RTP/SAVP with SDES keys only, ``optional``
RTP/AVP with keys.

``--on-demand`` (a platform that forks only when the gateway asks, ``gateway.fork``): nothing
is dialled at start; the parent writes commands on stdin, one a line: ``DIAL <cid> [<agent>]``
(a conversation not given with ``--conv`` needs its agent) dials that conversation's SIPREC
call (re-dialled with ``--redial`` until told otherwise), ``HANGUP <cid>`` sends BYE and
stops re-dialling it. A closed stdin ends the process like SIGTERM.

It prints one line per event on stdout, the conversation id last: ``READY``,
``REDIRECTED <uri> <cid>``, ``CONNECTED <streams> <cid>``, ``DISCONNECTED <code> <cid>``,
``BYEBYE``. SIGTERM/SIGINT hang every call up (BYE) and exit; so does the death of the process
given by ``--parent-pid`` (no orphan keeps sending RTP). Runs in its own process: pjsua2 is
a per-process singleton, and a C assert kills the whole process.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from devtools import pj_secure

MAX_CONVERSATIONS = 4  # pjsua2: 4 calls per process, SIPREC: 1 call per conversation
REDIAL_MAX_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 4.0


def metadata(agent_aor: str, customer_aor: str, cid: str | None = None, agent_label: str = "1") -> str:
    """RFC 7865 recording metadata: agent and customer participants, one stream each."""
    cust_label = "2" if agent_label == "1" else "1"
    ext = (
        f"<extensiondata xmlns:cx='urn:x-cx'><cx:conversation-id>{cid}</cx:conversation-id></extensiondata>"
        if cid
        else ""
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="urn:ietf:params:xml:ns:recording:1">
  <datamode>complete</datamode>
  <session session_id="sess1">{ext}</session>
  <participant participant_id="pa"><nameID aor="{agent_aor}"><name>Agent</name></nameID></participant>
  <participant participant_id="pc"><nameID aor="{customer_aor}"/></participant>
  <stream stream_id="sa" session_id="sess1"><label>{agent_label}</label></stream>
  <stream stream_id="sc" session_id="sess1"><label>{cust_label}</label></stream>
  <participantstreamassoc participant_id="pa"><send>sa</send><recv>sc</recv></participantstreamassoc>
  <participantstreamassoc participant_id="pc"><send>sc</send><recv>sa</recv></participantstreamassoc>
</recording>
"""


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class Conv:
    cid: str
    agent: str
    call: Any = None
    connected_at: float | None = None
    hangup_sent: bool = False
    next_dial: float = 0.0
    backoff: float = 0.0
    keep: list[Any] = field(default_factory=list)  # players/recorders of the current call
    probe_sent: float = 0.0  # in-dialog OPTIONS out, no answer yet (0: none pending)
    probe_ok: float = 0.0  # last 2xx to a probe (or media up)
    dead: str = ""  # why the gateway side is gone (hang up and re-dial)
    wanted: bool = True  # dial (and re-dial) this call; --on-demand: only after DIAL


class _Commands:
    """``--on-demand``: lines from stdin, read without blocking the pjsua2 loop."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""

    def read(self) -> list[tuple[str, str, str] | None]:
        """Complete commands so far as ``(verb, cid, agent)``; ``None`` once stdin is closed."""
        try:
            chunk = os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        if not chunk:
            return [None]
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        out: list[tuple[str, str, str] | None] = []
        for line in lines:
            words = line.decode(errors="replace").split()
            if len(words) >= 2 and words[0] in ("DIAL", "HANGUP"):
                out.append((words[0], words[1], words[2] if len(words) > 2 else ""))
        return out


def parse_conv(text: str) -> tuple[str, str]:
    cid, sep, agent = text.partition(":")
    if not sep or not cid or not agent:
        raise argparse.ArgumentTypeError(f"--conv wants CID:AGENT, got {text!r}")
    return cid, agent


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - runs in a child process
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--front", required=True, help="HOST:PORT of the gateway's SIP front")
    ap.add_argument("--host", default="127.0.0.1", help="local address for SIP and RTP")
    ap.add_argument("--port", type=int, required=True, help="local SIP port; RTP uses port+2 ... port+2+8*calls")
    ap.add_argument("--conv", type=parse_conv, action="append", default=[], metavar="CID:AGENT")
    ap.add_argument("--cid", help="one conversation (with --agent); the older spelling of --conv")
    ap.add_argument("--agent", help="agent username of --cid")
    ap.add_argument("--cid-header", action="store_true", help="send the conversation id as X-Conversation-ID only")
    ap.add_argument("--codecs", default="PCMU", help="codecs to offer, first preferred (PCMU, PCMA, G722, opus)")
    ap.add_argument("--agent-wav", required=True)
    ap.add_argument("--customer-wav", required=True)
    ap.add_argument("--duration", type=float, default=0.0, help="hang up S seconds after media is up (0: never)")
    ap.add_argument("--redial", type=float, default=0.0, help="dial again S seconds after a call ended (0: no)")
    ap.add_argument(
        "--probe", type=float, default=0.0, help="send an in-dialog OPTIONS every S s; hang up on 481/408/no answer"
    )
    ap.add_argument("--swap", action="store_true", help="customer on the first m-line")
    ap.add_argument("--record-prefix", help="record what the gateway sends back, per leg (single conversation)")
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    ap.add_argument("--log-level", type=int, default=1)
    ap.add_argument(
        "--on-demand", action="store_true", help="dial on DIAL <cid> [agent], hang up on HANGUP <cid> (stdin)"
    )
    pj_secure.add_arguments(ap)
    a = ap.parse_args(argv)
    convs = [Conv(cid, agent) for cid, agent in a.conv]
    if a.agent and (a.cid or not convs):
        convs.append(Conv(a.cid or "", a.agent))
    for conv in convs:
        conv.wanted = not a.on_demand
    if (not convs and not a.on_demand) or len(convs) > MAX_CONVERSATIONS:
        ap.error(f"1 to {MAX_CONVERSATIONS} conversations (--conv CID:AGENT)")

    import pjsua2 as pj

    from devtools.sip_phone import clock_rate, set_codecs  # imports pjsua2 too

    stop = {"now": False}

    def on_signal(*_: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.uaConfig.maxCalls = MAX_CONVERSATIONS
    cfg.logConfig.level = a.log_level
    cfg.logConfig.consoleLevel = a.log_level
    cfg.medConfig.clockRate = clock_rate(a.codecs)
    cfg.medConfig.sndClockRate = cfg.medConfig.clockRate
    cfg.medConfig.noVad = True
    cfg.medConfig.ecTailLen = 0
    ep.libInit(cfg)
    t = pj.TransportConfig()
    t.port = a.port
    t.boundAddress = a.host
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, t)
    if a.tls_port:
        pj_secure.create_tls_transport(pj, ep, a.host, a)
    ep.libStart()
    ep.audDevManager().setNullDev()
    set_codecs(pj, ep, a.codecs)
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:src@{a.host}:{a.port}"
    acfg.mediaConfig.transportConfig.port = a.port + 2
    acfg.mediaConfig.transportConfig.portRange = 8 * MAX_CONVERSATIONS
    acfg.mediaConfig.transportConfig.boundAddress = a.host
    pj_secure.apply_srtp(pj, acfg.mediaConfig, a.srtp)
    acc = pj.Account()
    acc.create(acfg, True)
    graveyard: list[Any] = []  # pj objects released outside their callbacks
    first, second = ("customer", "agent") if a.swap else ("agent", "customer")
    agent_label = "2" if a.swap else "1"

    def tag(conv: Conv) -> str:
        return f" {conv.cid}" if conv.cid else ""

    class SrcCall(pj.Call):
        def __init__(self, conv: Conv) -> None:
            super().__init__(acc)
            self.conv = conv
            self.media_up = False

        def onCallRedirected(self, prm: Any) -> int:
            say(f"REDIRECTED {prm.targetUri}{tag(self.conv)}")
            return pj.PJSIP_REDIRECT_ACCEPT

        def onCallSdpCreated(self, prm: Any) -> None:
            # pjsua writes no a=label; SIPREC needs one per stream.
            if not prm.sdp.wholeSdp:
                say("SDP too long for pjsua2 to hand over (1 KB): no a=label added")
                return
            out, n = [], 0
            for line in prm.sdp.wholeSdp.replace("\r\n", "\n").split("\n"):
                out.append(line)
                if line.startswith("m=audio"):
                    n += 1
                    out.append(f"a=label:{n}")
            prm.sdp.wholeSdp = "\r\n".join(out)

        def onCallState(self, prm: Any) -> None:
            ci = self.getInfo()
            if ci.state != pj.PJSIP_INV_STATE_DISCONNECTED:
                return
            conv = self.conv
            say(f"DISCONNECTED {ci.lastStatusCode}{tag(conv)}")
            if conv.call is self:
                graveyard.append(self)
                graveyard.extend(conv.keep)
                conv.keep = []
                conv.call = None
                if conv.connected_at is not None:
                    conv.backoff = a.redial  # it worked: redial at the base pace
                else:
                    conv.backoff = min(max(conv.backoff * 2, a.redial), REDIAL_MAX_SECONDS)
                conv.connected_at = None
                conv.next_dial = time.monotonic() + conv.backoff

        def onCallTsxState(self, prm: Any) -> None:
            # Answers to our liveness probes (in-dialog OPTIONS). The gateway never sends RTP
            # to a SIPREC client, so a worker that died or restarted shows only here: 481
            # (dialog unknown), 408 or no answer within PROBE_TIMEOUT_SECONDS.
            conv = self.conv
            if conv.call is not self:
                return
            try:
                tsx = prm.e.body.tsxState.tsx
            except AttributeError:
                return
            if tsx.method != "OPTIONS" or tsx.role != pj.PJSIP_ROLE_UAC or tsx.statusCode < 200:
                return
            conv.probe_sent = 0.0
            # pjsua answers an in-dialog OPTIONS it has no handler for with 500: any answer but
            # 481/408 proves the far end still knows the dialog.
            if tsx.statusCode not in (408, 481):
                conv.probe_ok = time.monotonic()
            elif not conv.dead:
                conv.dead = f"probe {tsx.statusCode}"

        def onCallMediaState(self, prm: Any) -> None:
            if self.media_up:
                return
            ci = self.getInfo()
            audio = [
                mi for mi in ci.media if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status != pj.PJSUA_CALL_MEDIA_NONE
            ]
            if len(audio) < 2:
                return
            self.media_up = True
            conv = self.conv
            for mi, leg in zip(audio, (first, second)):
                media = self.getAudioMedia(mi.index)
                player = pj.AudioMediaPlayer()
                player.createPlayer(a.agent_wav if leg == "agent" else a.customer_wav, 0)  # 0: loop
                player.startTransmit(media)
                conv.keep.append(player)
                if a.record_prefix:
                    rec = pj.AudioMediaRecorder()
                    rec.createRecorder(f"{a.record_prefix}-{leg}.wav")
                    media.startTransmit(rec)
                    conv.keep.append(rec)
            conv.connected_at = conv.probe_ok = time.monotonic()
            say(f"CONNECTED {len(audio)}{tag(conv)}")

    def dial(conv: Conv) -> None:
        call = SrcCall(conv)
        prm = pj.CallOpParam(True)
        prm.opt.audioCount = 2
        prm.opt.videoCount = 0
        if hasattr(prm.opt, "textCount"):
            prm.opt.textCount = 0  # pjsua >= 2.16 adds a real-time-text stream unless told
        prm.opt.flag |= pj.PJSUA_CALL_SET_MEDIA_DIR
        prm.opt.mediaDir = pj.IntVector([pj.PJMEDIA_DIR_ENCODING, pj.PJMEDIA_DIR_ENCODING])
        mt = pj.SipMediaType()
        mt.type = "multipart"
        mt.subType = "mixed"
        prm.txOption.multipartContentType = mt
        part = pj.SipMultipartPart()
        ct = pj.SipMediaType()
        ct.type = "application"
        ct.subType = "rs-metadata+xml"
        part.contentType = ct
        part.body = metadata(
            f"sip:{conv.agent}@pbx.example",
            "sip:+15551234@pstn.example",
            conv.cid if conv.cid and not a.cid_header else None,
            agent_label,
        )
        hdr = pj.SipHeader()
        hdr.hName = "Content-Disposition"
        hdr.hValue = "recording-session"
        part.headers.append(hdr)
        prm.txOption.multipartParts.append(part)
        req = pj.SipHeader()
        req.hName = "Require"
        req.hValue = "siprec"  # as RFC 7866 SRCs send it
        prm.txOption.headers.append(req)
        if conv.cid and a.cid_header:
            h = pj.SipHeader()
            h.hName = "X-Conversation-ID"
            h.hValue = conv.cid
            prm.txOption.headers.append(h)
        conv.call = call
        conv.connected_at = None
        conv.hangup_sent = False
        conv.probe_sent = conv.probe_ok = 0.0
        conv.dead = ""
        try:
            call.makeCall(f"sip:srs@{a.front}" + (";transport=tls" if a.tls_port else ""), prm)
        except pj.Error as exc:
            say(f"FAILED {exc.info().splitlines()[0] if exc.info() else 'makeCall'}{tag(conv)}")
            conv.call = None
            graveyard.append(call)
            conv.backoff = min(max(conv.backoff * 2, a.redial or 1.0), REDIAL_MAX_SECONDS)
            conv.next_dial = time.monotonic() + conv.backoff

    commands = _Commands() if a.on_demand else None
    say("READY")
    for conv in convs:
        if conv.wanted:
            dial(conv)
    while not stop["now"]:
        ep.libHandleEvents(20)
        graveyard.clear()
        for command in commands.read() if commands is not None else ():
            if command is None:  # stdin closed: the parent is gone
                stop["now"] = True
                break
            verb, cid, agent = command
            conv = next((c for c in convs if c.cid == cid), None)
            if verb == "DIAL":
                if conv is None and agent and len(convs) < MAX_CONVERSATIONS:
                    conv = Conv(cid, agent, wanted=False)
                    convs.append(conv)
                if conv is None:
                    say(f"UNKNOWN {cid}")
                elif not conv.wanted:
                    conv.wanted = True
                    conv.backoff = 0.0
                    if conv.call is None:
                        dial(conv)
            elif verb == "HANGUP" and conv is not None and conv.wanted:
                conv.wanted = False
                if conv.call is not None and not conv.hangup_sent:
                    conv.hangup_sent = True
                    try:
                        conv.call.hangup(pj.CallOpParam())
                    except pj.Error:
                        pass
        now = time.monotonic()
        if a.parent_pid and os.getppid() != a.parent_pid:
            break  # the parent died: we were re-parented
        for conv in convs:
            if conv.call is None:
                if a.redial and conv.wanted and now >= conv.next_dial:
                    dial(conv)
            elif (
                a.probe
                and conv.connected_at is not None
                and not conv.hangup_sent
                and (conv.dead or (conv.probe_sent and now - conv.probe_sent > PROBE_TIMEOUT_SECONDS))
            ):
                conv.hangup_sent = True
                say(f"GONE {conv.dead or 'probe timeout'}{tag(conv)}")
                try:
                    conv.call.hangup(pj.CallOpParam())
                except pj.Error:
                    pass
            elif a.probe and conv.connected_at is not None and not conv.probe_sent and now - conv.probe_ok > a.probe:
                conv.probe_sent = now
                try:
                    req = pj.CallSendRequestParam()
                    req.method = "OPTIONS"
                    conv.call.sendRequest(req)
                except pj.Error:
                    conv.dead = "probe not sent"
            elif (
                a.duration
                and conv.connected_at is not None
                and not conv.hangup_sent
                and now - conv.connected_at > a.duration
            ):
                conv.hangup_sent = True
                try:
                    conv.call.hangup(pj.CallOpParam())
                except pj.Error:
                    pass
        if not a.redial and not a.on_demand and all(c.call is None for c in convs):
            break
    for conv in convs:
        if conv.call is not None:
            try:
                conv.call.hangup(pj.CallOpParam())
            except pj.Error:
                pass
    end = time.monotonic() + 0.5
    while time.monotonic() < end and any(c.call is not None for c in convs):
        ep.libHandleEvents(20)
    end = time.monotonic() + 0.1
    while time.monotonic() < end:
        ep.libHandleEvents(20)
    for conv in convs:
        conv.keep.clear()
        conv.call = None
    graveyard.clear()
    gc.collect()  # every pj object must die before libDestroy
    ep.libDestroy(pj.PJSUA_DESTROY_NO_RX_MSG)
    say("BYEBYE")
    os._exit(0)  # no SWIG destructors after libDestroy


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
