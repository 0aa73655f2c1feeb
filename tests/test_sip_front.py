"""The SIP front on real loopback sockets (UDP and TCP), without pjsua2: a hand-driven
"worker" socket stands where a pjsua2 worker is, so every hop of the proxying is seen.

Real workers and real calls through the front: ``tests/test_sip_front_calls.py``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from gateway.config import Settings
from gateway.sip.front import Decision, Forward, Peer, SipConnection, SipFront
from gateway.sip.message import SipMessage, classify_invite, parse_message
from gateway.sip.ratelimit import RateLimit

from .sip_support import RawSip, free_udp_block, in_dialog_request, metadata, multipart, response_header, sdp
from .tls_support import make_pki

pytestmark = [pytest.mark.unit]

AGENTS = {"c-1": "alice"}
CRLF = "\r\n"


@dataclass
class Rig:
    front: SipFront
    port: int
    worker: RawSip  # where the front forwards to: a bare socket playing the pjsua2 worker
    platform: RawSip
    decided: list[str]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    worker, platform = RawSip(), RawSip()
    decided: list[str] = []

    def decide(msg: SipMessage) -> Decision:
        info = classify_invite(msg, AGENTS.get)  # raises SipParseError → the front answers it
        decided.append(info.conversation)
        return Forward(("127.0.0.1", worker.port), f"t-{len(decided)}")

    port = free_udp_block(1)
    front = SipFront(
        Settings(sip_port=port, sip_invite_rate=50.0, sip_invite_burst=20),
        decide,
        lambda: True,
        lambda: {("127.0.0.1", worker.port)},
    )
    await front.start()
    try:
        yield Rig(front, port, worker, platform, decided)
    finally:
        front.close()
        worker.close()
        platform.close()


def leg_invite(rig: Rig, sender: RawSip | None = None, **headers: str) -> bytes:
    sender = sender or rig.platform
    hdr = {"X-Conversation-ID": "c-1", "X-Leg": "agent", **headers}
    return sender.invite(rig.port, body=sdp(), headers=hdr)[0]


async def worker_gets(rig: Rig, timeout: float = 2.0) -> tuple[SipMessage, tuple[str, int]]:
    got = await rig.worker.recv_from(timeout)
    assert got is not None, "nothing reached the worker"
    return parse_message(got[0]), got[1]


def answer(req: SipMessage, status: int, reason: str, *, to_tag: str = "w1", contact: int = 0) -> bytes:
    """What a UAS (the worker, or a phone) answers: Via, Record-Route copied, To tagged."""
    lines = [f"SIP/2.0 {status} {reason}"]
    lines += [f"Via: {v}" for v in req.get_all("via")]
    lines += [f"Record-Route: {v}" for v in req.get_all("record-route")]
    to = req.get("to") or ""
    lines += [f"From: {req.get('from')}", f"To: {to}" + ("" if ";tag=" in to else f";tag={to_tag}")]
    lines += [f"Call-ID: {req.call_id}", f"CSeq: {req.get('cseq')}"]
    if contact:
        lines.append(f"Contact: <sip:gateway@127.0.0.1:{contact}>")
    lines.append("Content-Length: 0")
    return (CRLF.join(lines) + CRLF + CRLF).encode()


# --- rate limit ----------------------------------------------------------------------------------


def test_rate_limit_per_source() -> None:
    limit = RateLimit(rate=10.0, burst=3)
    assert [limit.wait("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limit.wait("a", 0.0)
    assert 0.09 < wait <= 0.1 and RateLimit.retry_after(wait) == "1"
    assert limit.wait("b", 0.0) == 0.0  # another source has its own bucket
    assert limit.wait("a", 0.1) == 0.0  # refilled at 10/s
    limit.sweep(10.0)
    assert len(limit) == 0  # full buckets are forgotten
    assert RateLimit(0, 1).wait("a", 0.0) == 0.0  # 0 turns it off


def worker_bye(rig: Any, transport: str, platform_port: int, rr: list[str], ok: bytes, fwd: Any) -> bytes:
    """The BYE a worker sends toward the platform of the dialog ``fwd``/``ok`` set up, along its
    route set (both of the front's Record-Route entries)."""
    lines = [
        f"BYE sip:platform@127.0.0.1:{platform_port};transport={transport} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{rig.worker.port};rport;branch=z9hG4bKw{uuid.uuid4().hex[:8]}",
        f"Route: {rr[0]}, {rr[1]}",
        f"From: {response_header(ok.decode(), 'to')[0]}",
        f"To: {fwd.get('from')}",
        f"Call-ID: {fwd.call_id}",
        "CSeq: 5 BYE",
        "Content-Length: 0",
    ]
    return (CRLF.join(lines) + CRLF + CRLF).encode()


async def answer_then_worker_bye(rig: Any, conn: Any, transport: str, rr: list[str], fwd: Any, front_port: int) -> Any:
    """The worker answers ``fwd`` 200, which reaches the platform on ``conn``; then the worker's
    BYE along the route set comes out on that same connection, with the front's Via on
    ``front_port`` (the listener of that transport). Returns the BYE as the platform got it."""
    rig.worker.send(answer(fwd, 200, "OK", contact=rig.worker.port), rig.port)
    ok = await conn.recv()
    assert ok is not None and ok.startswith(b"SIP/2.0 200")
    rig.worker.send(worker_bye(rig, transport, conn.port, rr, ok, fwd), rig.port)
    got = await conn.recv()
    assert got is not None
    bye = parse_message(got)
    via = f"SIP/2.0/{transport.upper()} 127.0.0.1:{front_port};"
    assert bye.method == "BYE" and (bye.get("via") or "").startswith(via), got
    return bye


async def test_an_invite_flood_from_one_source_is_limited_others_get_through(rig: Rig) -> None:
    t0 = time.monotonic()
    for i in range(300):
        rig.platform.send(leg_invite(rig, **{"X-Leg": "boss"}), rig.port)  # 400 after the decision
        if i % 10 == 9:
            await asyncio.sleep(0.002)  # the front shares this loop: let it read
    assert time.monotonic() - t0 < 1.0
    answers: list[bytes] = []
    while (data := await rig.platform.recv(0.5)) is not None:
        answers.append(data)
    limited = [a for a in answers if a.startswith(b"SIP/2.0 503 Rate Limited")]
    # the 400s are retransmitted until ACKed (timer G): count transactions
    decided = list({response_header(a.decode(), "call-id")[0]: a for a in answers if a.startswith(b"SIP/2.0 400")})
    assert len(decided) + len(limited) == 300
    assert 20 <= len(decided) <= 80, len(decided)  # the burst, and what refilled at 50/s meanwhile
    assert all(b"\r\nRetry-After: " in a for a in limited)
    assert rig.front.counts["rate_limited"] == len(limited)
    # Another source is not held back: its INVITE is decided and forwarded.
    other = RawSip("127.0.0.2")
    try:
        other.send(leg_invite(rig, other), rig.port)
        fwd, _ = await worker_gets(rig)
        assert fwd.method == "INVITE" and rig.decided == ["c-1"]
    finally:
        other.close()


# --- proxying --------------------------------------------------------------------------------------


async def test_a_call_through_the_front_over_udp(rig: Rig) -> None:
    """INVITE → worker, answers back, ACK/BYE along Record-Route, the worker's BYE out, CANCEL."""
    invite = leg_invite(rig, **{"X-Gateway-Placement": "t-forged"})
    rig.platform.send(invite, rig.port)
    fwd, src = await worker_gets(rig)
    assert src == ("127.0.0.1", rig.port)
    assert fwd.get_all("x-gateway-placement") == ["t-1"], "a placement header from outside is removed"
    assert fwd.get("record-route") == f"<sip:127.0.0.1:{rig.port};lr>"
    vias = [v for line in fwd.get_all("via") for v in line.split(",")]
    assert len(vias) == 2 and vias[0].startswith(f"SIP/2.0/UDP 127.0.0.1:{rig.port};branch=z9hG4bK-gwf-")
    assert fwd.body == sdp()
    # The retransmitted INVITE goes to the same worker, identical, without a second decision.
    rig.platform.send(invite, rig.port)
    again, _ = await worker_gets(rig)
    assert again.to_bytes() == fwd.to_bytes() and rig.decided == ["c-1"]

    rig.worker.send(answer(fwd, 100, "Trying"), rig.port)
    rig.worker.send(answer(fwd, 200, "OK", contact=rig.worker.port), rig.port)
    seen = [await rig.platform.recv(2.0) for _ in range(2)]
    assert seen[0] is not None and seen[0].startswith(b"SIP/2.0 100")
    assert seen[1] is not None and seen[1].startswith(b"SIP/2.0 200")
    ok = seen[1].decode()
    assert len(response_header(ok, "via")) == 1 and "z9hG4bK-gwf" not in ok, "our Via is removed"
    assert response_header(ok, "record-route") == [f"<sip:127.0.0.1:{rig.port};lr>"]

    # ACK and BYE from the platform: along the route set, to the worker.
    rig.platform.send(in_dialog_request("ACK", invite, ok, 1), rig.port)
    ack, _ = await worker_gets(rig)
    assert ack.method == "ACK" and not ack.get("route") and ack.uri == f"sip:gateway@127.0.0.1:{rig.worker.port}"

    # The worker's BYE goes through the front (its outbound proxy) to the platform.
    bye_lines = [
        f"BYE sip:platform@127.0.0.1:{rig.platform.port} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{rig.worker.port};rport;branch=z9hG4bKw{uuid.uuid4().hex[:8]}",
        f"Route: <sip:127.0.0.1:{rig.port};lr>",
        "Max-Forwards: 70",
        f"From: {response_header(ok, 'to')[0]}",
        f"To: {fwd.get('from')}",
        f"Call-ID: {fwd.call_id}",
        "CSeq: 5 BYE",
        "Content-Length: 0",
    ]
    rig.worker.send((CRLF.join(bye_lines) + CRLF + CRLF).encode(), rig.port)
    got = await rig.platform.recv(2.0)
    assert got is not None
    bye = parse_message(got)
    assert bye.method == "BYE" and not bye.get("route") and bye.get("max-forwards") == "69"
    rig.platform.send(answer(bye, 200, "OK"), rig.port)
    bye_ok, _ = await worker_gets(rig)
    assert bye_ok.status == 200 and len(bye_ok.get_all("via")) == 1

    # A request from outside may only reach a worker: no open relay.
    relay = in_dialog_request("BYE", invite, ok, 3).replace(
        f"BYE sip:gateway@127.0.0.1:{rig.worker.port}".encode(), b"BYE sip:victim@127.0.0.1:9"
    )
    code, _ = await rig.platform.request(relay, rig.port)
    assert code == 481
    assert await rig.worker.recv(0.3) is None


async def test_cancel_follows_the_invite_and_unknown_ones_get_481(rig: Rig) -> None:
    invite, call_id, branch = rig.platform.invite(
        rig.port, body=sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "agent"}
    )
    rig.platform.send(invite, rig.port)
    fwd, _ = await worker_gets(rig)
    cancel = rig.platform.invite(rig.port, method="CANCEL", call_id=call_id, branch=branch)[0]
    rig.platform.send(cancel, rig.port)
    got, _ = await worker_gets(rig)
    assert got.method == "CANCEL" and got.branch == fwd.branch, "the worker matches it to its INVITE"
    # A CANCEL nobody knows: 481. One for an INVITE the front refused: 200, no effect.
    unknown = rig.platform.invite(rig.port, method="CANCEL")[0]
    assert (await rig.platform.request(unknown, rig.port))[0] == 481
    refused, call_id, branch = rig.platform.invite(rig.port, body=sdp(), headers={"X-Conversation-ID": "nope"})
    assert (await rig.platform.request(refused, rig.port))[0] == 404
    late = rig.platform.invite(rig.port, method="CANCEL", call_id=call_id, branch=branch)[0]
    assert (await rig.platform.request(late, rig.port))[0] == 200


async def test_conformance_answers(rig: Rig) -> None:
    """RFC 3261 answers of the front (issue 11): 505, 416, 420, 400 for a broken request line."""
    p = rig.platform

    async def status(data: bytes) -> tuple[int, str]:
        return await p.request(data, rig.port)

    def options() -> bytes:  # a new transaction each time (answers are cached per transaction)
        return p.invite(rig.port, method="OPTIONS")[0]

    assert (await status(options().replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1)))[0] == 505
    assert (await status(options().replace(b"OPTIONS sip:", b"OPTIONS tel:", 1)))[0] == 416
    assert (await status(options().replace(b"OPTIONS sip:", b"OPTIONS sips:", 1)))[0] == 416  # sips: over UDP
    code, text = await status(leg_invite(rig, Require="siprec, x-teleport"))
    assert code == 420 and response_header(text, "unsupported") == ["x-teleport"]
    code, text = await status(options()[:-2] + b"Proxy-Require: x-warp\r\n\r\n")
    assert code == 420 and response_header(text, "unsupported") == ["x-warp"]
    assert (await status(options().replace(b"OPTIONS sip:", b"OPTIONS  sip:", 1)))[0] == 400
    assert (await status(options().replace(b"sip:gateway@127.0.0.1", b"<sip:gateway@127.0.0.1>", 1)))[0] == 400
    # What pjsua would answer 500 (issue 11) is refused here: a non-SIP Contact, a CSeq of another method.
    assert (await status(leg_invite(rig).replace(b"Contact: <sip:", b"Contact: <mailto:", 1)))[0] == 400
    assert (await status(leg_invite(rig).replace(b"CSeq: 1 INVITE", b"CSeq: 1 INV\x01TE", 1)))[0] == 400
    # Require: siprec is ours: the INVITE is forwarded.
    p.send(leg_invite(rig, Require="siprec"), rig.port)
    assert (await worker_gets(rig))[0].method == "INVITE"
    code, text = await status(options())
    assert code == 200 and "siprec" in response_header(text, "supported")[0]


async def test_a_latin1_display_name_is_answered_and_forwarded_byte_for_byte(rig: Rig) -> None:
    latin1 = 'From: "Jos\xe9 M\xfcller" <sip:platform@127.0.0.1>;tag=l1'.encode("latin-1")
    invite = leg_invite(rig).replace(
        b"From: <sip:platform@127.0.0.1:" + str(rig.platform.port).encode() + b">;tag=abc", latin1
    )
    assert latin1 in invite
    rig.platform.send(invite, rig.port)
    fwd, _ = await worker_gets(rig)
    assert latin1 in fwd.to_bytes()
    options = rig.platform.invite(rig.port, method="OPTIONS")[0]
    options = options.replace(
        b"From: <sip:platform@127.0.0.1:" + str(rig.platform.port).encode() + b">;tag=abc", latin1
    )
    code, text = await rig.platform.request(options, rig.port)
    assert code == 200


class TcpSip:
    """A SIP-over-TCP client: writes messages, reads them framed by Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def connect(cls, port: int) -> TcpSip:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, timeout: float = 2.0) -> bytes | None:
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        clen = int(response_header(head.decode("utf-8", "surrogateescape"), "content-length")[0])
        return head + await self.reader.readexactly(clen)

    def close(self) -> None:
        self.writer.close()


def tcp_invite(port: int, local: int, body: bytes, ctype: str, **headers: str) -> bytes:
    lines = [
        f"INVITE sip:gateway@127.0.0.1:{port};transport=tcp SIP/2.0",
        f"Via: SIP/2.0/TCP 127.0.0.1:{local};branch=z9hG4bK{uuid.uuid4().hex[:12]}",
        f"From: <sip:platform@127.0.0.1:{local}>;tag=tcp1",
        f"To: <sip:gateway@127.0.0.1:{port}>",
        f"Call-ID: {uuid.uuid4().hex}",
        "CSeq: 1 INVITE",
        f"Contact: <sip:platform@127.0.0.1:{local};transport=tcp>",
        "Max-Forwards: 70",
        *[f"{k.replace('_', '-')}: {v}" for k, v in headers.items()],
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
    ]
    return (CRLF.join(lines) + CRLF + CRLF).encode() + body


async def test_a_call_through_the_front_over_tcp(rig: Rig) -> None:
    tcp = await TcpSip.connect(rig.port)
    try:
        tcp.send(b"\r\n\r\n")  # RFC 5626 keep-alive ping
        assert await tcp.reader.readexactly(2) == b"\r\n"
        # A SIPREC INVITE of ~4.3 KB (real SBCs send 2.3-4.3 KB), sent in two pieces.
        meta = metadata("sip:alice@pbx.example", "sip:+15550100@pstn.example", "c-1")
        meta = meta.replace(b"</recording>", b"<!--" + b"x" * 3000 + b"--></recording>")
        body, ctype = multipart(
            [("application/sdp", sdp(streams=2, labels=True)), ("application/rs-metadata+xml", meta)]
        )
        invite = tcp_invite(rig.port, tcp.port, body, ctype, Require="siprec")
        assert 4200 < len(invite) < 4600
        tcp.send(invite[:1000])
        await asyncio.sleep(0.05)
        tcp.send(invite[1000:])
        fwd, _ = await worker_gets(rig)
        assert fwd.body == body, "the whole INVITE reaches the worker, over UDP on loopback"
        rr = [v for line in fwd.get_all("record-route") for v in line.split(",")]
        assert rr == [f"<sip:127.0.0.1:{rig.port};lr>", f"<sip:127.0.0.1:{rig.port};lr;transport=tcp>"]
        assert fwd.get("via", "").startswith(f"SIP/2.0/UDP 127.0.0.1:{rig.port};")  # type: ignore[union-attr]
        # The answer comes back on the connection the INVITE came on.
        # The worker's BYE, along its route set (both of our entries), goes out on that connection.
        bye = await answer_then_worker_bye(rig, tcp, "tcp", rr, fwd, rig.port)
        tcp.send(answer(bye, 200, "OK"))
        bye_ok, _ = await worker_gets(rig)
        assert bye_ok.status == 200
        # Over 64 KB: 413, and the connection is closed.
        tcp.send(tcp_invite(rig.port, tcp.port, b"v=0\r\n" + b"a" * 70000, "application/sdp"))
        too_big = await tcp.recv()
        assert too_big is not None and too_big.startswith(b"SIP/2.0 413")
        assert await tcp.reader.read() == b""
    finally:
        tcp.close()


# --- RFC 4475 torture messages ---------------------------------------------------------------------
# Written from the RFC's descriptions (§3.1.1 valid, §3.1.2 invalid, §3.2, §3.3, §3.4); each with
# the answers a sensible element gives (None: ignored, as the RFC allows for responses and for
# requests without a usable Via). The front stays up and keeps answering afterwards.

SDP = "v=0\r\no=a 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\n"


def msg(*lines: str, body: str = "", clen: int | None = None, own_length: bool = False) -> bytes:
    """A message from its lines; Content-Length is the body's (or ``clen``) unless ``own_length``."""
    head = list(lines)
    if not own_length:
        head.append(f"Content-Length: {len(body.encode('utf-8', 'surrogateescape')) if clen is None else clen}")
    return (CRLF.join(head) + CRLF + CRLF + body).encode("utf-8", "surrogateescape")


def std(method: str, uri: str = "sip:user@example.com", cseq: str = "", *extra: str) -> list[str]:
    return [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK{uuid.uuid4().hex[:10]}",
        "Max-Forwards: 70",
        "From: <sip:caller@example.net>;tag=2234923",
        "To: <sip:user@example.com>",
        f"Call-ID: {uuid.uuid4().hex}@192.0.2.10",
        f"CSeq: {cseq or '1 ' + method}",
        *([] if any(e.startswith("Contact") for e in extra) else ["Contact: <sip:caller@192.0.2.10>"]),
        *extra,
    ]


TORTURE: list[tuple[str, bytes, set[int] | None]] = [
    # 3.1.1.1 a short tortuous INVITE: folding, compact forms, odd white space; it has a To tag
    # we never gave, so there is no such dialog.
    ("wsinv", msg(
        "INVITE sip:vivekg@chair-dnrc.example.com;unknownparam SIP/2.0",
        "TO :", " sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n",
        'from   : "J Rosenberg \\\\\\""       <sip:jdrosen@example.com>', "  ;", "  tag = 98asjd8",
        "MaX-fOrWaRdS: 0068", "Call-ID: wsinv.ndaksdj@192.0.2.1", "Content-Length   : 150",
        "cseq: 0009", "  INVITE", "Via  : SIP  /   2.0", " /UDP", "    192.0.2.2;branch=390skdjuw",
        "s :", "NewFangledHeader:   newfangled value", " continued newfangled value",
        "UnknownHeaderWithUnusualValue: ;;,,;;,;", "Content-Type: application/sdp",
        "v:  SIP  / 2.0  / TCP     spindle.example.com   ;", "  branch  =   z9hG4bK9ikj8  ,",
        " SIP  /    2.0   / UDP  192.168.255.111   ; branch=", " z9hG4bK30239",
        'm:"Quoted string \\"\\"" <sip:jdrosen@example.com> ; newparam =', "      newvalue ;",
        "  secondparam ; q = 0.33", body=SDP + "a=pad:" + "x" * (150 - len(SDP) - 8) + "\r\n", own_length=True,
    ), {481}),
    # 3.1.1.2 an unknown method made of every token character
    ("intmeth", msg(*std(
        "!interesting-Method0123456789_*+`.%indeed'~",
        "sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com",
        "139122385 !interesting-Method0123456789_*+`.%indeed'~",
    )), {501}),
    # 3.1.1.3 escaped characters in URIs: an INVITE the gateway has no conversation for
    ("esc01", msg(*std("INVITE", "sip:sips%3Auser%40example.com@example.net", "",
                       "Contact: <sip:cal%6Cer@host5.example.net;%6C%72;n%61me=v%61lue%25%34%31>",
                       "Content-Type: application/sdp"), body=SDP), {404}),
    ("escnull", msg(*std("REGISTER", "sip:example.com", "", "Contact: <sip:%00@host5.example.com>")), {405}),
    ("esc02", msg(*std("RE%47IST%45R", "sip:registrar.example.com", "1 RE%47IST%45R")), {501}),
    ("lwsdisp", msg(*[ln if not ln.startswith("From") else "From: caller<sip:caller@example.com>;tag=323"
                      for ln in std("OPTIONS")]), {200}),
    ("longreq", msg(*std("INVITE", "sip:user@example.com", "",
                         *[f"Via: SIP/2.0/TCP sip{i}.example.com;branch=z9hG4bK{'x' * 60}{i}" for i in range(40)],
                         'X-Long: "' + "l" * 3000 + '"', "Content-Type: application/sdp"), body=SDP), {404}),
    # 3.1.1.8 a REGISTER with an INVITE after it in the same datagram: only the first counts
    ("dblreq", msg(*std("REGISTER", "sip:example.com"))
     + msg(*std("INVITE", "sip:user@example.com", "", "Content-Type: application/sdp"), body=SDP), {405}),
    ("semiuri", msg(*std("OPTIONS", "sip:user;par=u%40example.net@example.com")), {200}),
    ("transports", msg(*std("OPTIONS", "sip:user@example.com", "",
                            "Via: SIP/2.0/SCTP t2.example.com;branch=z9hG4bKkdjuw2395",
                            "Via: SIP/2.0/TLS t3.example.com;branch=z9hG4bKkdjuw2395",
                            "Via: SIP/2.0/UNKNOWN t4.example.com;branch=z9hG4bKkdjuw2395")), {200}),
    ("mpart01", msg(*std("INVITE", "sip:user@example.com", "",
                         "Content-Type: multipart/mixed;boundary=7a9cbec02ceef655"),
                    body="--7a9cbec02ceef655\r\nContent-Type: application/sdp\r\n\r\n" + SDP
                    + "\r\n--7a9cbec02ceef655\r\nContent-Type: application/octet-stream\r\n\r\n\x00\udc80\udcff"
                    + "\r\n--7a9cbec02ceef655--\r\n"), {404}),
    ("unreason", b"SIP/2.0 200 = 2**3 * 5**2 \xd0\xbd\xd0\xbe\r\nVia: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1\r\n"
                 b"Call-ID: unreason.1234\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                 b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n", None),
    ("noreason", b"SIP/2.0 100 \r\nVia: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2\r\nCall-ID: noreason.1\r\n"
                 b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCSeq: 1 INVITE\r\n"
                 b"Content-Length: 0\r\n\r\n", None),
    # 3.1.2 invalid messages
    ("badinv01", msg(*std("INVITE", "sip:user@example.com", "", "Via: SIP/2.0/UDP 192.0.2.15;;,;,,",
                          'Contact: "Joe" <sip:joe@example.org>;;;;', "Content-Type: application/sdp"), body=SDP),
     {400}),
    ("clerr", msg(*std("INVITE", "sip:user@example.com", "", "Content-Type: application/sdp"), body=SDP, clen=9999),
     {400}),
    ("ncl", msg(*std("INVITE", "sip:user@example.com", "", "Content-Type: application/sdp"), body=SDP, clen=-999),
     {400}),
    ("scalar02", msg(*[ln.replace("Max-Forwards: 70", "Max-Forwards: 300") for ln in
                       std("REGISTER", "sip:example.com", "36893488147419103232 REGISTER")]), {400}),
    ("scalarlg", b"SIP/2.0 503 Service Unavailable\r\nVia: SIP/2.0/TCP host129.example.com;branch=z9hG4bKzzxdiwo34s"
                 b"\r\nCall-ID: scalarlg.1\r\nCSeq: 36893488147419103232 INVITE\r\nRetry-After: 18446744073709551616"
                 b"\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\nContent-Length: 0\r\n\r\n",
     None),
    ("quotbal", msg(*[ln if not ln.startswith("To") else 'To: "Mr. J. User <sip:j.user@example.com>'
                      for ln in std("INVITE")]), {400}),
    ("ltgtruri", msg(*std("INVITE", "<sip:user@example.com>")), {400}),
    ("lwsruri", msg(*std("INVITE", "sip:user@example.com; lr")), {400}),
    ("lwsstart", msg(*[("INVITE  sip:user@example.com  SIP/2.0" if ln.startswith("INVITE") else ln)
                       for ln in std("INVITE")]), {400}),
    ("trws", msg(*[(ln + "  " if ln.startswith("OPTIONS") else ln) for ln in std("OPTIONS")]), {200, 400}),
    ("escruri", msg(*std("INVITE", "sip:user@example.com?Route=%3Csip:example.com%3E")), {400}),
    ("baddate", msg(*std("INVITE", "sip:user@example.com", "", "Date: Fri, 01 Jan 2010 16:00:00 EST",
                         "Content-Type: application/sdp"), body=SDP), {400, 404}),
    ("regbadct", msg(*std("REGISTER", "sip:example.com", "",
                          "Contact: sip:user@example.com?Route=%3Csip:sip.example.com%3E")), {400, 405}),
    ("badaspec", msg(*[ln if not ln.startswith("To") else 'To: "Watson, Thomas" < sip:t.watson@example.org >'
                       for ln in std("OPTIONS")]), {400}),
    ("baddn", msg(*[ln if not ln.startswith("From") else "From: Bell, Alexander <sip:a.g.bell@example.com>;tag=43"
                    for ln in std("OPTIONS")]), {400}),
    ("badvers", msg(*[ln.replace("SIP/2.0", "SIP/7.0") if ln.startswith("OPTIONS") else ln for ln in std("OPTIONS")]),
     {505}),
    ("mismatch01", msg(*std("OPTIONS", "sip:user@example.com", "8 INVITE")), {400}),
    ("mismatch02", msg(*std("NEWMETHOD", "sip:user@example.com", "8 INVITE")), {400}),
    ("bigcode", b"SIP/2.0 4294967301 better not break the receiver\r\nVia: SIP/2.0/UDP 192.0.2.105;branch=z9hG4bK2"
                b"\r\nCall-ID: bigcode.1\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
                b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n", None),
    # 3.2 transaction layer: an RFC 2543 branch (no magic cookie)
    ("badbranch", msg(*[ln if not ln.startswith("Via") else "Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK"
                        for ln in std("OPTIONS")]), {200}),
    # 3.3 application layer
    ("insuf", msg(*[ln for ln in std("INVITE") if not ln.startswith(("Call-ID", "From", "To"))]), {400}),
    ("unkscm", msg(*std("OPTIONS", "nobodyknowsthisscheme:totallyopaquecontent")), {416}),
    ("novelsc", msg(*std("OPTIONS", "soap.beep://192.0.2.103:3002")), {416}),
    ("unksm2", msg(*[ln if not ln.startswith("To") else "To: isbn:2983792873" for ln in std("REGISTER", "sip:example.com")]),
     {405}),
    ("bext01", msg(*std("OPTIONS", "sip:user@example.com", "", "Require: nothingSupportsThis, nothingSupportsThisEither",
                        "Proxy-Require: noProxiesSupportThis, norDoAnyProxiesSupportThis")), {420}),
    ("invut", msg(*std("INVITE", "sip:user@example.com", "", "Content-Type: application/unknownformat"),
                  body="<audio> <pcmu port=\"443\"/> </audio>\r\n"), {415}),
    ("regaut01", msg(*std("REGISTER", "sip:example.com", "", "Authorization: NoOneKnowsThisScheme opaque-data=here")),
     {405}),
    ("multi01", msg(*std("INVITE", "sip:user@example.com", "", "Call-ID: another@192.0.2.10",
                         "To: <sip:other@example.com>", "CSeq: 2 INVITE")), {400}),
    ("mcl01", msg(*std("OPTIONS", "sip:user@example.com", "", "Content-Length: 0", "l: 1")), {400}),
    ("bcast", b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1\r\nVia: SIP/2.0/UDP 255.255.255.255;"
              b"branch=z9hG4bK1saa\r\nCall-ID: bcast.1\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>"
              b";tag=2\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n", None),
    ("zeromf", msg(*[ln.replace("Max-Forwards: 70", "Max-Forwards: 0") for ln in std("OPTIONS")]), {200}),
    ("zeromf-invite", msg(*[ln.replace("Max-Forwards: 70", "Max-Forwards: 0") for ln in
                            std("INVITE", "sip:user@example.com", "", "X-Conversation-ID: c-1", "X-Leg: agent",
                                "Content-Type: application/sdp")], body=SDP), {483}),
    ("cparam01", msg(*std("REGISTER", "sip:example.com", "", "Contact: <sip:c@192.0.2.4>;expires=0;q=0.1")), {405}),
    ("sdp01", msg(*std("INVITE", "sip:user@example.com", "", "Accept: text/nobodyKnowsThis",
                       "Content-Type: application/sdp"), body=SDP), {404}),
    # 3.4 an RFC 2543 INVITE: no branch, no From tag
    ("inv2543", msg("INVITE sip:UserB@example.com SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.15", "From: <sip:UserA@example.com>",
                    "To: <sip:UserB@example.com>", "Call-ID: 31415@c.example.com", "CSeq: 1 INVITE",
                    "Content-Type: application/sdp", body=SDP), {404}),
    # not in the RFC, found by trying: a Latin-1 display name, NUL bytes, no Via at all
    ("latin1", msg(*[ln if not ln.startswith("From") else 'From: "Jos\udce9" <sip:caller@example.net>;tag=1'
                     for ln in std("OPTIONS")]), {200}),
    ("nul", msg(*std("OPTIONS", "sip:user@example.com", "", "X-Nul: a\x00b")), {200}),
    ("novia", msg(*[ln for ln in std("OPTIONS") if not ln.startswith("Via")]), None),
]  # fmt: skip


@pytest.mark.parametrize("name,data,expected", TORTURE, ids=[t[0] for t in TORTURE])
async def test_rfc4475_torture_messages(rig: Rig, name: str, data: bytes, expected: set[int] | None) -> None:
    rig.platform.send(data, rig.port)
    got = await rig.platform.recv(0.4 if expected is None else 2.0)
    if expected is None:
        assert got is None, f"{name}: answered {got[:40]!r}"  # type: ignore[index]
    else:
        assert got is not None, f"{name}: no answer"
        code = int(got.split(b" ", 2)[1])
        assert code in expected, f"{name}: {got[:60]!r}"
        if code == 420:
            assert b"\r\nUnsupported: " in got
    assert await rig.worker.recv(0.05) is None, f"{name} reached the worker"
    # Still up: an OPTIONS is answered.
    code, _ = await rig.platform.request(rig.platform.invite(rig.port, method="OPTIONS")[0], rig.port)
    assert code == 200


async def test_a_failing_decision_is_answered_500_at_once() -> None:
    def decide(msg: SipMessage) -> Decision:
        raise RuntimeError("boom")

    front = SipFront(Settings(), decide, lambda: True, set)
    sent: list[bytes] = []
    front._send = lambda data, peer: sent.append(data)  # type: ignore[method-assign]
    raw = RawSip()
    try:
        invite = raw.invite(5060, body=sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "agent"})[0]
    finally:
        raw.close()
    front.received(invite, Peer(("127.0.0.1", 5999)))
    assert sent and sent[0].startswith(b"SIP/2.0 500")
    assert front.counts["malformed"] == 0, "handled, not an unexpected error"
    front.close()


class _Stream:
    """The part of an asyncio transport a SipConnection uses."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", 5999) if name == "peername" else ("127.0.0.1", 5060)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


PING_OPTIONS = msg(*std("OPTIONS"))


@hyp_settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(1, 400), max_size=8))
async def test_tcp_framing_survives_any_stream(junk: bytes, cuts: list[int]) -> None:
    """Any bytes, cut anywhere, never raise out of the TCP framing; a valid message after
    keep-alives and cut in pieces is answered once."""
    front = SipFront(Settings(), lambda m: Forward(("127.0.0.1", 1), "t"), lambda: True, set)
    for data in (junk, b"\r\n\r\n\r\n" + PING_OPTIONS):
        conn = SipConnection(front)
        stream = _Stream()
        conn.connection_made(stream)  # type: ignore[arg-type]
        pos = 0
        for cut in [*cuts, len(data)]:
            conn.data_received(data[pos : pos + cut])
            pos += cut
        conn.data_received(data[pos:])
        if data is not junk:
            answers = [w for w in stream.written if w.startswith(b"SIP/2.0 ")]
            assert len(answers) == 1 and answers[0].startswith(b"SIP/2.0 200"), stream.written
    front.close()


async def test_a_worker_calls_a_tcp_phone_on_a_new_connection(rig: Rig) -> None:
    """The worker's INVITE to a supervisor phone at a ``;transport=tcp`` URI: the front opens a
    connection, Record-Routes itself for TCP, and the phone's answer returns to the worker."""
    got: asyncio.Queue[tuple[bytes, asyncio.StreamWriter]] = asyncio.Queue()

    async def phone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            clen = int(response_header(head.decode(), "content-length")[0])
            await got.put((head + await reader.readexactly(clen), writer))

    server = await asyncio.start_server(phone, "127.0.0.1", 0)
    phone_port = server.sockets[0].getsockname()[1]
    try:
        invite_lines = [
            f"INVITE sip:sam@127.0.0.1:{phone_port};transport=tcp SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{rig.worker.port};rport;branch=z9hG4bKw{uuid.uuid4().hex[:8]}",
            f"Route: <sip:127.0.0.1:{rig.port};lr>",
            "Max-Forwards: 70",
            f"From: <sip:gateway@127.0.0.1:{rig.worker.port}>;tag=w9",
            f"To: <sip:sam@127.0.0.1:{phone_port}>",
            f"Call-ID: {uuid.uuid4().hex}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:gateway@127.0.0.1:{rig.worker.port}>",
            "Content-Length: 0",
        ]
        rig.worker.send((CRLF.join(invite_lines) + CRLF + CRLF).encode(), rig.port)
        data, writer = await asyncio.wait_for(got.get(), 3.0)
        inv = parse_message(data)
        assert inv.method == "INVITE" and not inv.get("route")
        assert inv.get("via", "").startswith(f"SIP/2.0/TCP 127.0.0.1:{rig.port};")  # type: ignore[union-attr]
        rr = [v for line in inv.get_all("record-route") for v in line.split(",")]
        assert rr == [f"<sip:127.0.0.1:{rig.port};lr;transport=tcp>", f"<sip:127.0.0.1:{rig.port};lr>"]
        writer.write(answer(inv, 200, "OK", to_tag="p1"))
        ok, _ = await worker_gets(rig)
        assert ok.status == 200 and ok.get("record-route") is not None and len(ok.get_all("via")) == 1
    finally:
        server.close()


async def test_a_tcp_message_that_never_completes_loses_its_connection(rig: Rig) -> None:
    tcp = await TcpSip.connect(rig.port)
    try:
        tcp.send(b"INVITE sip:gateway@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKs")
        await wait_for_connections(rig, 1)
        conn = next(iter(rig.front.connections))
        conn.partial_since -= 60  # as if it had trickled for a minute
        rig.front._sweep(time.monotonic())
        assert await asyncio.wait_for(tcp.reader.read(), 2.0) == b""
    finally:
        tcp.close()


async def wait_for_connections(rig: Rig, n: int) -> None:
    for _ in range(100):
        if len(rig.front.connections) == n and all(c.partial_since for c in rig.front.connections):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the front did not see the connection")


async def test_refusals_of_the_front_are_logged_once_per_source_per_second(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 13 (visibility): a refusal the front answers itself is one JSON line with the reason,
    status, Call-ID and conversation id; a flood from one source logs one line a second and counts
    the rest; the whole message is never logged."""
    caplog.set_level("INFO", logger="gateway.sip.front")
    p = rig.platform
    bad = p.invite(rig.port, method="OPTIONS", headers={"X-Conversation-ID": "c-log"})[0]
    bad = bad.replace(b"OPTIONS sip:", b"OPTIONS tel:", 1)
    call_id = response_header(bad.decode(), "call-id")[0]
    assert (await p.request(bad, rig.port))[0] == 416
    [rec] = [r for r in caplog.records if getattr(r, "status", None) == 416]
    assert rec.levelname == "INFO" and rec.call_id == call_id and rec.conversation == "c-log"  # type: ignore[attr-defined]
    assert rec.reason == "unsupported URI scheme"  # type: ignore[attr-defined]
    from gateway.logs import JsonFormatter

    line = JsonFormatter().format(rec)
    assert '"status": 416' in line and "c-log" in line and "Content-Length" not in line and "v=0" not in line
    caplog.clear()
    await asyncio.sleep(1.05)  # the 416's line opened this source's second
    # A flood of refusals from one source (each a new transaction, so none is a cached answer).
    for _ in range(200):
        p.send(p.invite(rig.port, method="BYE")[0], rig.port)  # 481: BYE outside any dialog
    while await p.recv(0.3) is not None:
        pass
    lines = [r for r in caplog.records if getattr(r, "status", None) == 481]
    assert 1 <= len(lines) <= 2, len(lines)  # the flood took well under two seconds
    assert rig.front.counts["refusal_logs_dropped"] >= 198 - len(lines)
    # Another source is logged at once, even during the flood.
    other = RawSip("127.0.0.2")
    try:
        assert (await other.request(other.invite(rig.port, method="BYE")[0], rig.port))[0] == 481
    finally:
        other.close()
    sources = {getattr(r, "source", "").split(":")[0] for r in caplog.records if getattr(r, "status", None) == 481}
    assert sources == {"127.0.0.1", "127.0.0.2"}


# --- SIP over TLS (issue 11, item 5) ------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


@pytest.fixture
async def tls_rig(pki: dict[str, Path]) -> AsyncIterator[Rig]:
    """The rig's front with a TLS listener on ``port + 1`` (certificate of the test CA, which it
    also trusts toward phones)."""
    worker, platform = RawSip(), RawSip()

    def decide(msg: SipMessage) -> Decision:
        classify_invite(msg, AGENTS.get)
        return Forward(("127.0.0.1", worker.port), "t-1")

    port = free_udp_block(2)
    settings = Settings(
        sip_port=port,
        sip_tls_port=port + 1,
        sip_tls_cert=str(pki["gateway.pem"]),
        sip_tls_key=str(pki["gateway.key"]),
        sip_tls_ca=str(pki["ca"]),
    )
    front = SipFront(settings, decide, lambda: True, lambda: {("127.0.0.1", worker.port)})
    await front.start()
    try:
        yield Rig(front, port, worker, platform, [])
    finally:
        front.close()
        worker.close()
        platform.close()


async def tls_client(port: int, ca: Path) -> TcpSip:
    ctx = ssl.create_default_context(cafile=str(ca))
    return TcpSip(*await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"))


async def test_a_call_through_the_front_over_tls(tls_rig: Rig, pki: dict[str, Path]) -> None:
    """A platform over TLS (``sips:`` Request-URI): the INVITE reaches the worker over loopback
    UDP, the front Record-Routes itself for TLS, the answer and the worker's BYE go back on the
    TLS connection. ``sips:`` over UDP stays 416."""
    rig = tls_rig
    tls = await tls_client(rig.port + 1, pki["ca"])
    try:
        body = sdp()
        invite = tcp_invite(rig.port + 1, tls.port, body, "application/sdp", X_Conversation_ID="c-1", X_Leg="agent")
        invite = invite.replace(b"INVITE sip:", b"INVITE sips:", 1).replace(b";transport=tcp", b"", 1)
        invite = invite.replace(b"SIP/2.0/TCP", b"SIP/2.0/TLS", 1).replace(b";transport=tcp>", b";transport=tls>", 1)
        tls.send(invite)
        fwd, _ = await worker_gets(rig)
        assert fwd.body == body and fwd.uri is not None and fwd.uri.startswith("sips:")
        rr = [v for line in fwd.get_all("record-route") for v in line.split(",")]
        assert rr == [f"<sip:127.0.0.1:{rig.port};lr>", f"<sip:127.0.0.1:{rig.port + 1};lr;transport=tls>"]
        assert fwd.get("via", "").startswith(f"SIP/2.0/UDP 127.0.0.1:{rig.port};")  # type: ignore[union-attr]
        await answer_then_worker_bye(rig, tls, "tls", rr, fwd, rig.port + 1)
        # An OPTIONS to the front over TLS is answered there.
        opts = rig.platform.invite(rig.port, method="OPTIONS")[0].replace(b"OPTIONS sip:", b"OPTIONS sips:", 1)
        tls.send(opts.replace(b"SIP/2.0/UDP", b"SIP/2.0/TLS", 1))
        pong = await tls.recv()
        assert pong is not None and pong.startswith(b"SIP/2.0 200")
    finally:
        tls.close()
    opts = rig.platform.invite(rig.port, method="OPTIONS")[0].replace(b"OPTIONS sip:", b"OPTIONS sips:", 1)
    assert (await rig.platform.request(opts, rig.port))[0] == 416  # sips: needs TLS


async def test_a_worker_calls_a_sips_phone_over_verified_tls(
    tls_rig: Rig, pki: dict[str, Path], tmp_path: Path
) -> None:
    """The worker's INVITE to ``sip:...;transport=tls`` (how it spells a ``sips:`` phone) leaves
    the front over TLS, to a phone whose certificate the configured CA signed; a phone with a
    certificate of another CA never gets the INVITE."""
    rig = tls_rig
    got: asyncio.Queue[tuple[bytes, asyncio.StreamWriter]] = asyncio.Queue()

    async def phone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            clen = int(response_header(head.decode(), "content-length")[0])
            await got.put((head + await reader.readexactly(clen), writer))

    def invite_to(phone_port: int) -> bytes:
        lines = [
            f"INVITE sip:sam@127.0.0.1:{phone_port};transport=tls SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{rig.worker.port};rport;branch=z9hG4bKw{uuid.uuid4().hex[:8]}",
            f"Route: <sip:127.0.0.1:{rig.port};lr>",
            "Max-Forwards: 70",
            f"From: <sip:gateway@127.0.0.1:{rig.worker.port}>;tag=w9",
            f"To: <sip:sam@127.0.0.1:{phone_port}>",
            f"Call-ID: {uuid.uuid4().hex}",
            "CSeq: 1 INVITE",
            f"Contact: <sip:gateway@127.0.0.1:{rig.worker.port}>",
            "Content-Length: 0",
        ]
        return (CRLF.join(lines) + CRLF + CRLF).encode()

    good = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    good.load_cert_chain(pki["phone.pem"], pki["phone.key"])
    other = make_pki(tmp_path / "other")  # another CA
    rogue = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    rogue.load_cert_chain(other["phone.pem"], other["phone.key"])
    server = await asyncio.start_server(phone, "127.0.0.1", 0, ssl=good)
    rogue_server = await asyncio.start_server(phone, "127.0.0.1", 0, ssl=rogue)
    try:
        rig.worker.send(invite_to(server.sockets[0].getsockname()[1]), rig.port)
        data, writer = await asyncio.wait_for(got.get(), 3.0)
        inv = parse_message(data)
        assert inv.method == "INVITE" and inv.get("via", "").startswith(f"SIP/2.0/TLS 127.0.0.1:{rig.port + 1};")  # type: ignore[union-attr]
        rr = [v for line in inv.get_all("record-route") for v in line.split(",")]
        assert rr == [f"<sip:127.0.0.1:{rig.port + 1};lr;transport=tls>", f"<sip:127.0.0.1:{rig.port};lr>"]
        writer.write(answer(inv, 200, "OK", to_tag="p1"))
        ok, _ = await worker_gets(rig)
        assert ok.status == 200
        # The phone whose certificate our CA did not sign: the handshake fails, nothing is sent.
        rig.worker.send(invite_to(rogue_server.sockets[0].getsockname()[1]), rig.port)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(got.get(), 1.5)
    finally:
        server.close()
        rogue_server.close()


def test_a_sips_phone_uri_is_called_as_sip_over_tls() -> None:
    from gateway.sip.routing import tls_hop_uri

    assert tls_hop_uri("sips:tom@10.0.0.5:5061") == "sip:tom@10.0.0.5:5061;transport=tls"
    assert tls_hop_uri("SIPS:tom@h?X-A=1") == "sip:tom@h;transport=tls?X-A=1"
    assert tls_hop_uri("sips:tom@h;transport=tls") == "sip:tom@h;transport=tls"
    assert tls_hop_uri("sip:tom@h") == "sip:tom@h"
