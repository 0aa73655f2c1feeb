"""The bench's SIP endpoints, speaking to the gateway only through its SIP address.

``PlatformCall``: the telephony platform's UAC (a SIPREC INVITE with two labelled ``a=sendonly``
streams and recording metadata, or one INVITE per leg with ``X-Leg``). It follows a 302 from the
SIP address to the worker it names, or takes a 200 answered by (or forwarded through) the
address itself; in-dialog requests follow the Record-Route set, so it keeps working whichever
the gateway does. ``PhoneBank``: every supervisor phone in one light UAS (answers INVITE/BYE);
each phone's answer points its RTP at that conversation's port on the sink.

Deliberately tiny parsers of its own: the bench must not depend on the gateway's internals.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from devtools.siprec_source import metadata

COMPACT = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
}


@dataclass
class SipMessage:
    first: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status(self) -> int:
        parts = self.first.split(" ", 2)
        return int(parts[1]) if self.first.startswith("SIP/2.0 ") and len(parts) > 1 else 0

    @property
    def method(self) -> str:
        return "" if self.first.startswith("SIP/2.0") else self.first.split(" ", 1)[0]

    @property
    def uri(self) -> str:
        return self.first.split(" ")[1] if not self.status else ""

    def get(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


def parse(data: bytes) -> SipMessage | None:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    try:
        lines = head.decode().split("\r\n")
    except UnicodeDecodeError:
        return None
    if not (lines[0].startswith("SIP/2.0 ") or lines[0].endswith(" SIP/2.0")):
        return None  # e.g. a stray RTCP packet
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers.append((COMPACT.get(key, key), value.strip()))
    return SipMessage(lines[0], headers, body)


def sdp_of(msg: SipMessage) -> str:
    """The SDP of a message (plain, or the application/sdp part of a multipart body)."""
    text = msg.body.decode(errors="replace")
    if "multipart" in msg.get("content-type"):
        for part in text.split("--"):
            head, _, rest = part.partition("\r\n\r\n")
            if "application/sdp" in head.lower():
                return rest
    return text


def sdp_media(sdp: str) -> tuple[str, list[int]]:
    """(connection address, audio ports in m-line order)."""
    host, ports = "", []
    for line in sdp.splitlines():
        if line.startswith("c=IN IP4 ") and not host:
            host = line[9:].strip()
        elif line.startswith("m=audio "):
            ports.append(int(line.split()[1]))
    return host, ports


def tag_of(header: str) -> str:
    return header.split("tag=")[-1].split(";")[0] if "tag=" in header else ""


def hostport(uri: str) -> tuple[str, int]:
    """Address of a SIP URI (``<sip:u@h:p;lr>`` or ``sip:h:p``)."""
    u = uri.strip().strip("<>").split(">")[0].split(";")[0]
    u = u.split(":", 1)[1] if u.startswith("sip:") else u
    u = u.split("@", 1)[-1]
    host, _, port = u.partition(":")
    return host, int(port or 5060)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[SipMessage] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: object) -> None:
        msg = parse(data)
        if msg is not None and msg.status:
            self.queue.put_nowait(msg)


class PlatformCall:
    """One platform INVITE: SIPREC (both legs) or per-leg (one), offering ``ports`` for its streams."""

    def __init__(self, cid: str, legs: list[str], ports: list[int], address: tuple[str, int], siprec: bool) -> None:
        self.cid, self.legs, self.ports, self.address, self.siprec = cid, legs, ports, address, siprec
        self.call_id = uuid.uuid4().hex
        self.tag = uuid.uuid4().hex[:8]
        self.to_tag = ""
        self.target = f"sip:gateway@{address[0]}:{address[1]}"
        self.routes: list[str] = []
        self.dests: list[tuple[str, int]] = []  # where each stream's RTP goes (the answer's ports)
        self.redirected = False

    def _next_hop(self) -> tuple[str, int]:
        return hostport(self.routes[0]) if self.routes else hostport(self.target)

    def _request(self, method: str, cseq: int, body: bytes = b"", ctype: str = "", branch: str = "") -> bytes:
        """A request; ``branch`` reuses a transaction's (the ACK of a non-2xx answer)."""
        if not branch:
            self.branch = branch = f"z9hG4bK{uuid.uuid4().hex[:12]}"
        lines = [
            f"{method} {self.target} SIP/2.0",
            f"Via: SIP/2.0/UDP 127.0.0.1:{self.sip_port};branch={branch};rport",
            f"From: <sip:platform@127.0.0.1:{self.sip_port}>;tag={self.tag}",
            f"To: <sip:gateway@{self.address[0]}:{self.address[1]}>" + (f";tag={self.to_tag}" if self.to_tag else ""),
            f"Call-ID: {self.call_id}",
            f"CSeq: {cseq} {method}",
            f"Contact: <sip:platform@127.0.0.1:{self.sip_port}>",
            f"X-Conversation-ID: {self.cid}",
            "Max-Forwards: 70",
        ]
        lines += [f"Route: {r}" for r in self.routes]
        if not self.siprec:
            lines.append(f"X-Leg: {self.legs[0]}")
        elif method == "INVITE":
            lines.append("Require: siprec")
        if body:
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def _offer(self) -> tuple[bytes, str]:
        sdp = "v=0\r\no=platform 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        for i, port in enumerate(self.ports):
            sdp += f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=sendonly\r\n"
            if self.siprec:
                sdp += f"a=label:{i + 1}\r\n"
        if not self.siprec:
            return sdp.encode(), "application/sdp"
        meta = metadata("sip:alice@pbx.example", "sip:+15551234@pstn.example", self.cid)
        b = "bench-boundary"
        body = (
            f"--{b}\r\nContent-Type: application/sdp\r\n\r\n{sdp}\r\n--{b}\r\n"
            "Content-Type: application/rs-metadata+xml\r\nContent-Disposition: recording-session\r\n\r\n"
            f"{meta}\r\n--{b}--\r\n"
        )
        return body.encode(), f"multipart/mixed;boundary={b}"

    async def _transaction(self, request: bytes, cseq: int, timeout: float) -> SipMessage:
        """Send a request and return its final response, retransmitting it (500 ms doubling to
        4 s, as over UDP) until any response arrives; a busy host may drop a datagram."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval, provisional = 0.5, False
        method = request.split(b" ", 1)[0].decode()
        self.sip_t.sendto(request, self._next_hop())
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no final answer to {method} within {timeout:.0f} s")
            try:
                msg = await asyncio.wait_for(self.proto.queue.get(), left if provisional else min(interval, left))
            except TimeoutError:
                if not provisional:
                    self.sip_t.sendto(request, self._next_hop())
                    interval = min(2 * interval, 4.0)
                continue
            if msg.get("call-id") != self.call_id or msg.get("cseq") != f"{cseq} {method}":
                continue  # a late retransmission of an earlier answer
            if msg.status < 200:
                provisional = True
                continue
            return msg

    async def connect(self, timeout: float = 15.0) -> None:
        """INVITE until answered (following at most one redirect); ACK; learn the RTP destinations."""
        loop = asyncio.get_running_loop()
        self.sip_t, self.proto = await loop.create_datagram_endpoint(_Udp, local_addr=("127.0.0.1", 0))
        self.sip_port = self.sip_t.get_extra_info("sockname")[1]
        body, ctype = self._offer()
        cseq = 1
        while True:
            answer = await self._transaction(self._request("INVITE", cseq, body, ctype), cseq, timeout)
            if 300 <= answer.status < 400 and not self.redirected:
                # ACK of a failure goes to where the INVITE went, in the same transaction
                self.to_tag = tag_of(answer.get("to"))
                self.sip_t.sendto(self._request("ACK", cseq, branch=self.branch), self._next_hop())
                self.target = answer.get("contact").strip().strip("<>").split(">")[0]
                self.to_tag, self.redirected, cseq = "", True, cseq + 1
                continue
            if answer.status != 200:
                raise RuntimeError(f"INVITE answered {answer.first}")
            break
        self.to_tag = tag_of(answer.get("to"))
        self.routes = [r.strip() for h in reversed(answer.get_all("record-route")) for r in reversed(h.split(","))]
        contact = answer.get("contact")
        if contact:
            self.target = contact.strip().strip("<>").split(">")[0]
        self.cseq = cseq
        self.sip_t.sendto(self._request("ACK", cseq), self._next_hop())
        host, ports = sdp_media(sdp_of(answer))
        if len(ports) != len(self.ports):
            raise RuntimeError(f"answer has {len(ports)} audio streams, offered {len(self.ports)}")
        self.dests = [(host, p) for p in ports]

    async def bye(self) -> None:
        try:
            await self._transaction(self._request("BYE", self.cseq + 1), self.cseq + 1, 2.0)
        except (TimeoutError, AttributeError):
            pass
        if hasattr(self, "sip_t"):
            self.sip_t.close()


class PhoneBank:
    """Every supervisor phone in one UAS socket. A phone is ``sip:<cid>@127.0.0.1:<port>``; its
    answer sends the conversation's mix to ``rtp_port(cid)`` (a sink port)."""

    def __init__(self, rtp_port: Callable[[str], int | None]) -> None:
        self.rtp_port = rtp_port
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind(("127.0.0.1", 0))
        self.sip.setblocking(False)
        self.port = self.sip.getsockname()[1]
        self.answered: dict[str, bytes] = {}  # Call-ID -> our 200 (INVITE retransmissions)

    def uri(self, cid: str) -> str:
        return f"sip:{cid}@127.0.0.1:{self.port}"

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sip.fileno(), self._on_sip)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sip.fileno())
        self.sip.close()

    def _on_sip(self) -> None:
        while True:
            try:
                data, addr = self.sip.recvfrom(65535)
            except BlockingIOError:
                return
            msg = parse(data)
            if msg is None or not msg.method or msg.method == "ACK":
                continue
            call_id = msg.get("call-id")
            if msg.method == "INVITE" and call_id in self.answered:
                self.sip.sendto(self.answered[call_id], addr)
                continue
            status, body = "200 OK", b""
            if msg.method == "INVITE":
                cid = msg.uri.split("sip:", 1)[-1].split("@", 1)[0]
                port = self.rtp_port(cid)
                if port is None:
                    status = "404 Not Found"
                else:
                    body = (
                        "v=0\r\no=phone 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\na=recvonly\r\n"
                    ).encode()
            lines = [f"SIP/2.0 {status}"] + [f"Via: {v}" for v in msg.get_all("via")]
            lines.append(f"From: {msg.get('from')}")
            to = msg.get("to")
            lines.append(f"To: {to}" + ("" if "tag=" in to else f";tag={uuid.uuid4().hex[:8]}"))
            lines += [f"Call-ID: {call_id}", f"CSeq: {msg.get('cseq')}", f"Contact: <sip:phone@127.0.0.1:{self.port}>"]
            lines += [f"Record-Route: {r}" for r in msg.get_all("record-route")]
            if body:
                lines.append("Content-Type: application/sdp")
            lines.append(f"Content-Length: {len(body)}")
            response = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
            if msg.method == "INVITE":
                self.answered[call_id] = response
            self.sip.sendto(response, addr)


@dataclass
class Conversation:
    """One bench conversation: its index, id, SIP calls and whether a phone monitors it."""

    index: int
    cid: str
    monitored: bool
    calls: list[PlatformCall] = field(default_factory=list)
