"""Pure-Python parsing of the little SIP the front and the plane need.

Everything here is defensive: any input (garbage, truncated, hostile) either parses or
raises :class:`SipParseError`; nothing else escapes. No pjsua2 here: the main process uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .parties import Parties, matching
from .siprec_metadata import MetadataError, RecordingMetadata, recording_key_forms
from .siprec_metadata import parse_metadata as _parse_metadata

#: Largest SIP message accepted anywhere on the path (the most one UDP datagram holds); a bigger
#: one over TCP gets 413.
MAX_MESSAGE_BYTES = 65535
#: Option tags the gateway supports in ``Require`` (pjsip's own, and SIPREC, RFC 7866 §6.1.1).
SUPPORTED_OPTIONS = frozenset({"siprec", "timer", "100rel", "replaces", "norefersub"})

_COMPACT = {
    "i": "call-id",
    "f": "from",
    "t": "to",
    "v": "via",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "s": "subject",
    "e": "content-encoding",
}
_TOKEN = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+$")
_REQUEST_LINE = re.compile(r"^([A-Za-z0-9.!%*_+`'~-]+) (\S+) (SIP/\d+\.\d+)$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 (\d{3}) ?(.*)$")
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
#: Headers that may appear once only (RFC 3261 §7.3.1): two of them → 400.
_SINGLE = ("call-id", "from", "to", "cseq", "content-length", "max-forwards", "content-type")
_SIP_URI = re.compile(
    r"^(sips?):(?:([A-Za-z0-9_.!~*'()&=+$,;?/%-]+)@)?"  # optional user
    r"([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])"  # host
    r"(?::(\d{1,5}))?"  # port
    r"((?:;[A-Za-z0-9_.!~*'()%=-]+)*)$"  # params
)


class SipParseError(ValueError):
    """Malformed SIP, SDP, multipart or metadata. ``status`` is the SIP answer to give;
    ``conversation`` the conversation the refused INVITE was for, when that was known."""

    def __init__(self, message: str, status: int = 400, conversation: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.conversation = conversation


@dataclass
class SipMessage:
    """One parsed SIP request or response. Header names are lower-case, long form."""

    method: str | None  # None for a response
    uri: str | None
    status: int | None
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: str = ""
    #: Set when the message is well enough formed to answer but broken (→ 400 with this reason).
    defect: str = ""
    #: The request line's protocol version (anything but ``SIP/2.0`` → 505).
    version: str = "SIP/2.0"

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def is_request(self) -> bool:
        return self.method is not None

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def branch(self) -> str:
        via = self.get("via") or ""
        m = re.search(r";\s*branch=([^;,\s]+)", via, re.I)
        return m.group(1) if m else ""

    @property
    def content_type(self) -> str:
        return (self.get("content-type") or "").strip()

    @property
    def to_tag(self) -> str:
        """The ``tag`` of ``To`` (set on every request inside a dialog)."""
        return header_param(self.get("to") or "", "tag") or ""

    def tags(self, name: str) -> list[str]:
        """The option tags of ``Require``/``Proxy-Require``/``Supported`` (all values, lower-case)."""
        return [t.strip().lower() for v in self.get_all(name) for t in v.split(",") if t.strip()]

    def to_bytes(self) -> bytes:
        """The message as sent on the wire, with ``Content-Length`` set to the body.

        Header values keep every byte they arrived with (surrogate escapes, DESIGN.md §4b);
        compact names come out long.
        """
        if self.method is not None:
            lines = [f"{self.method} {self.uri} {self.version}"]
        else:
            lines = [f"SIP/2.0 {self.status} {self.reason}"]
        lines += [f"{header_name(k)}: {v}" for k, v in self.headers if k != "content-length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body


_NAMES = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate", "mime-version": "MIME-Version"}


def header_name(key: str) -> str:
    """The usual spelling of a lower-case header name (``record-route`` → ``Record-Route``)."""
    return _NAMES.get(key) or "-".join(part[:1].upper() + part[1:] for part in key.split("-"))


def split_values(value: str) -> list[str]:
    """The comma-separated values of one header line (``Via: a, b``), commas inside quotes or ``<>`` kept."""
    out: list[str] = []
    cur: list[str] = []
    quoted = angled = False
    i = 0
    while i < len(value):
        c = value[i]
        if quoted:
            if c == "\\" and i + 1 < len(value):
                cur.append(value[i : i + 2])
                i += 2
                continue
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "<":
            angled = True
        elif c == ">":
            angled = False
        elif c == "," and not angled:
            out.append("".join(cur).strip())
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur).strip())
    return [v for v in out if v]


def header_param(value: str, name: str) -> str | None:
    """A header parameter (after the URI's ``>`` if there is one): ``;tag=x`` → ``x``; '' if valueless."""
    rest = value.rsplit(">", 1)[1] if ">" in value else value
    for part in rest.split(";")[1:]:
        k, eq, v = part.partition("=")
        if k.strip().lower() == name:
            return v.strip() if eq else ""
    return None


def _valid_name_addr(value: str) -> bool:
    """From/To/Contact-style ``name-addr`` or ``addr-spec`` (RFC 3261 §25.1), leniently.

    Refused: unbalanced quotes, a display name of non-token characters outside quotes, a URI
    with white space or without a scheme. Non-ASCII bytes are accepted in display names.
    """
    value = value.strip()
    if value.startswith('"'):
        i = 1
        while i < len(value) and value[i] != '"':
            i += 2 if value[i] == "\\" else 1
        if i >= len(value):
            return False  # unterminated quoted string
        display, rest = "", value[i + 1 :].lstrip()
        if not rest.startswith("<"):
            return False
    else:
        display, _, rest = value.partition("<")
        if not _:
            uri = value.split(";", 1)[0].strip()
            return bool(_URI_SCHEME.match(uri)) and not re.search(r"\s|[<>\"]", uri)
        rest = "<" + rest
        if display.strip() and not re.fullmatch(r"[A-Za-z0-9.!%*_+`'~\- \t\u0080-\U0010ffff]+", display.strip()):
            return False
    end = rest.find(">")
    if end < 0:
        return False
    uri = rest[1:end]
    return bool(_URI_SCHEME.match(uri)) and not re.search(r"\s|[<\"]", uri)


def parse_message(data: bytes) -> SipMessage:
    """Parse one message into a :class:`SipMessage` (raises :class:`SipParseError` when no answer
    could be routed back; a message broken but answerable gets :attr:`SipMessage.defect` → 400).

    Header bytes that are not UTF-8 (a Latin-1 display name) are kept as surrogate escapes, so
    the message is answered and forwarded byte for byte (DESIGN.md §4b).
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipParseError("message too large", 413)
    sep = data.find(b"\r\n\r\n")
    if sep >= 0:
        head_b, body = data[:sep], data[sep + 4 :]
    else:
        sep = data.find(b"\n\n")
        if sep < 0:
            head_b, body = data, b""
        else:
            head_b, body = data[:sep], data[sep + 2 :]
    head = head_b.decode("utf-8", "surrogateescape")
    lines = head.replace("\r\n", "\n").split("\n")
    while lines and not lines[0].strip():  # keep-alive CRLFs before the message
        lines.pop(0)
    if not lines:
        raise SipParseError("empty message")
    start = lines[0].strip()
    method = uri = None
    status = None
    reason = ""
    version = "SIP/2.0"
    start_defect = ""
    m = _REQUEST_LINE.match(start)
    if m:
        method, uri, version = m.group(1), m.group(2), m.group(3)
    elif start.startswith("SIP/"):
        m = _STATUS_LINE.match(start)
        if not m:
            raise SipParseError("bad status line")  # nobody to answer a response to
        status, reason = int(m.group(1)), m.group(2)
    else:
        # A request line we cannot read (extra spaces, no version, ...): answerable with 400
        # if the headers say where the answer goes.
        first = start.split(" ", 1)[0]
        if not first or not _TOKEN.match(first):
            raise SipParseError("bad start line")
        method, uri, start_defect = first, "", "bad request line"
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":  # folded continuation
            if not headers:
                raise SipParseError("continuation before first header")
            k, v = headers[-1]
            headers[-1] = (k, v + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name or not _TOKEN.match(name):
            raise SipParseError(f"bad header line {line[:40]!r}")
        key = name.lower()
        key = _COMPACT.get(key, key)
        headers.append((key, value.strip()))
    msg = SipMessage(method, uri, status, reason, headers, body, head, start_defect, version)
    clen = msg.get("content-length")
    if clen is not None:
        if not clen.strip().isdigit():
            msg.defect = msg.defect or "bad Content-Length"
        elif int(clen) > len(body):
            msg.defect = msg.defect or "body shorter than Content-Length"
        else:
            msg.body = body[: int(clen)]
    if msg.is_request:
        # Without a Via no answer can be routed back: the caller drops the message.
        if not msg.get("via"):
            raise SipParseError("missing via")
        msg.defect = msg.defect or _request_defect(msg)
    return msg


def _request_defect(msg: SipMessage) -> str:
    """Why an otherwise answerable request is malformed (RFC 3261 §8.2, RFC 4475 §3.1.2), or ''."""
    for required in ("call-id", "cseq", "from", "to"):
        if not msg.get(required):
            return f"missing {required}"
    for single in _SINGLE:
        if len(msg.get_all(single)) > 1 or (single != "content-type" and len(split_values(msg.get(single) or "")) > 1):
            return f"more than one {single}"
    uri = msg.uri or ""
    if uri.startswith("<") or uri.lower().startswith(("sip:", "sips:")) and "?" in uri.rsplit("@", 1)[-1]:
        return "bad Request-URI"  # <> around it, or escaped headers (RFC 4475 §3.1.2.7, §3.1.2.11)
    parts = (msg.get("cseq") or "").split()
    if len(parts) != 2 or not parts[0].isdigit() or int(parts[0]) >= 2**31:
        return "bad CSeq"
    if parts[1] != msg.method:
        return "CSeq method differs from request method"
    mf = msg.get("max-forwards")
    if mf is not None and (not mf.strip().isdigit() or int(mf) > 255):
        return "bad Max-Forwards"
    for name in ("from", "to"):
        if not _valid_name_addr(msg.get(name) or ""):
            return f"bad {name}"
    return ""


def uri_scheme(uri: str) -> str:
    """The lower-case scheme of a URI (``sip``, ``sips``, ``tel``...), or ''."""
    m = _URI_SCHEME.match(uri.strip().lstrip("<"))
    return m.group(1).lower() if m else ""


def uri_user(uri: str) -> str:
    """The user part of a SIP URI (``sip:t-abc@h:p`` → ``t-abc``), or ''."""
    uri = uri.strip()
    if uri.startswith("<"):
        uri = uri[1:].split(">", 1)[0]
    if ":" not in uri:
        return ""
    rest = uri.split(":", 1)[1]
    if "@" not in rest:
        return ""
    return rest.split("@", 1)[0].split(";", 1)[0]


def valid_sip_uri(uri: str) -> bool:
    """True for a plain ``sip:``/``sips:`` URI this gateway is willing to call."""
    if not isinstance(uri, str) or len(uri) > 256 or any(c in uri for c in '<>"\r\n \t'):
        return False
    m = _SIP_URI.match(uri)
    if not m:
        return False
    if m.group(4) is not None and not (0 < int(m.group(4)) < 65536):
        return False
    return True


# --- responses -------------------------------------------------------------------------------

REASONS = {
    100: "Trying",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    481: "Call/Transaction Does Not Exist",
    483: "Too Many Hops",
    486: "Busy Here",
    488: "Not Acceptable Here",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "Version Not Supported",
}


def build_response(
    req: SipMessage,
    status: int,
    reason: str | None = None,
    extra: Iterable[tuple[str, str]] = (),
    to_tag: str | None = None,
) -> bytes:
    """A stateless response to ``req`` (Via/From/To/Call-ID/CSeq copied as RFC 3261 §8.2.6)."""
    reason = reason or REASONS.get(status, "Unknown")
    reason = reason.replace("\r", " ").replace("\n", " ")[:80]
    lines = [f"SIP/2.0 {status} {reason}"]
    for via in req.get_all("via"):
        lines.append(f"Via: {via}")
    lines.append(f"From: {req.get('from', '')}")
    to = req.get("to", "") or ""
    if to_tag and status > 100 and ";tag=" not in to.lower().replace(" ", ""):
        to = f"{to};tag={to_tag}"
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {req.get('call-id', '')}")
    lines.append(f"CSeq: {req.get('cseq', '')}")
    for k, v in extra:
        lines.append(f"{k}: {v}")
    lines.append("Server: silent-monitor-gateway")
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


# --- bodies: multipart, SDP, SIPREC metadata -------------------------------------------------


def _ct_param(content_type: str, name: str) -> str | None:
    for part in content_type.split(";")[1:]:
        k, _, v = part.partition("=")
        if k.strip().lower() == name:
            return v.strip().strip('"')
    return None


_METADATA_TYPES = ("application/rs-metadata+xml", "application/rs-metadata")


def split_body(msg: SipMessage) -> tuple[bytes | None, bytes | None]:
    """Return ``(sdp, rs_metadata)`` from a plain SDP or a multipart/mixed body.

    Metadata comes as ``application/rs-metadata+xml`` (RFC 7866) or ``application/rs-metadata``
    (the RFC's own examples, Intrado, AudioCodes); other parts (Cisco CUBE's ``application/gtd``)
    are skipped.
    """
    ctype = msg.content_type
    base = ctype.split(";", 1)[0].strip().lower()
    if not msg.body:
        if base:
            raise SipParseError("empty body")
        return None, None
    if base == "application/sdp":
        return msg.body, None
    if base.startswith("multipart/"):
        boundary = _ct_param(ctype, "boundary")
        if not boundary or len(boundary) > 70:
            raise SipParseError("multipart without boundary")
        sdp = meta = None
        delim = b"--" + boundary.encode()
        chunks = msg.body.split(delim)
        if len(chunks) < 3:
            raise SipParseError("malformed multipart body")
        for chunk in chunks[1:]:
            if chunk.startswith(b"--"):
                break  # close delimiter
            chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk.lstrip(b"\n")
            sep = chunk.find(b"\r\n\r\n")
            skip = 4
            if sep < 0:
                sep, skip = chunk.find(b"\n\n"), 2
            if sep < 0:
                raise SipParseError("multipart part without headers")
            part_head = chunk[:sep].decode("utf-8", "replace")
            part_body = chunk[sep + skip :]
            if part_body.endswith(b"\r\n"):
                part_body = part_body[:-2]
            elif part_body.endswith(b"\n"):
                part_body = part_body[:-1]
            ptype = ""
            for line in part_head.splitlines():
                k, _, v = line.partition(":")
                if k.strip().lower() in ("content-type", "c"):
                    ptype = v.split(";", 1)[0].strip().lower()
            if ptype == "application/sdp" and sdp is None:
                sdp = part_body
            elif ptype in _METADATA_TYPES and meta is None:
                meta = part_body
        if sdp is None:
            raise SipParseError("multipart body without application/sdp")
        return sdp, meta
    raise SipParseError(f"unsupported body type {base!r}", 415)


#: Codecs an ingress leg may use (SDP encoding names, lower case): G.711, and the wideband
#: G.722 and Opus (the workers' bridge runs at 16 kHz for them).
INGRESS_CODECS = frozenset({"pcmu", "pcma", "g722", "opus"})
#: RTP/AVP's static payload types of those codecs (RFC 3551); Opus is always dynamic.
_STATIC_PAYLOADS = {0: "pcmu", 8: "pcma", 9: "g722"}


@dataclass
class SdpStream:
    index: int  # m-line index (pjsua's media index)
    media: str
    port: int
    payloads: list[int]
    label: str | None = None
    direction: str = "sendrecv"
    codecs: dict[int, str] = field(default_factory=dict)
    proto: str = "RTP/AVP"
    crypto: bool = False  # carries an SDES key (a=crypto, RFC 4568)

    @property
    def srtp(self) -> str:
        """``sdes`` (RTP/SAVP with a key: what the workers take), ``plain`` (RTP/AVP, maybe
        with optional keys), or ``other`` (a secure profile without SDES, e.g. DTLS-SRTP)."""
        proto = self.proto.upper()
        if proto in ("RTP/SAVP", "RTP/SAVPF"):
            return "sdes" if self.crypto else "other"
        return "other" if proto.endswith(("/SAVP", "/SAVPF")) else "plain"

    @property
    def audio_ok(self) -> bool:
        """Offers a codec the workers take: PCMU, PCMA, G722 (static or by rtpmap) or opus."""
        if self.media != "audio" or self.port == 0:
            return False
        return any(self.codecs.get(pt, _STATIC_PAYLOADS.get(pt, "")).lower() in INGRESS_CODECS for pt in self.payloads)


def parse_sdp(sdp: bytes) -> list[SdpStream]:
    """The m-lines of an SDP offer; raises on malformed input (payload types > 127 included)."""
    try:
        text = sdp.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SipParseError("SDP is not UTF-8") from exc
    lines = [ln.strip() for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines or not lines[0].startswith("v="):
        raise SipParseError("SDP does not start with v=")
    streams: list[SdpStream] = []
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise SipParseError("bad SDP line")
        kind, value = line[0], line[2:]
        if kind == "m":
            parts = value.split()
            if len(parts) < 4:
                raise SipParseError("bad m= line")
            port_s = parts[1].split("/", 1)[0]
            if not port_s.isdigit() or int(port_s) > 65535:
                raise SipParseError("bad m= port")
            pts: list[int] = []
            if parts[2].upper().startswith("RTP/"):
                for p in parts[3:]:
                    if not p.isdigit() or int(p) > 127:
                        raise SipParseError(f"bad RTP payload type {p[:8]!r}")
                    pts.append(int(p))
            streams.append(SdpStream(len(streams), parts[0].lower(), int(port_s), pts, proto=parts[2]))
        elif kind == "a" and streams:
            attr, _, rest = value.partition(":")
            attr = attr.lower()
            cur = streams[-1]
            if attr == "label":
                cur.label = rest.strip()
            elif attr in ("sendonly", "recvonly", "sendrecv", "inactive"):
                cur.direction = attr
            elif attr == "crypto":
                cur.crypto = True
            elif attr == "rtpmap":
                pt_s, _, enc = rest.partition(" ")
                if not pt_s.isdigit() or int(pt_s) > 127:
                    raise SipParseError("bad rtpmap payload type")
                cur.codecs[int(pt_s)] = enc.split("/", 1)[0].strip()
    return streams


def parse_metadata(xml: bytes) -> RecordingMetadata:
    """SIPREC metadata of any dialect (:mod:`.siprec_metadata`); refused XML → 400."""
    try:
        return _parse_metadata(xml)
    except MetadataError as exc:
        raise SipParseError(str(exc)) from exc


#: Headers that may carry an identifier of the recorded call, besides every ``X-`` header:
#: RFC 7989's Session-ID, Cisco's GUIDs, User-to-User (Avaya's UCID).
_KEY_HEADERS = ("session-id", "cisco-guid", "cisco-gucid", "user-to-user")
_OWN_HEADERS = ("x-conversation-id", "x-leg")


def header_keys(msg: SipMessage) -> list[str]:
    """Candidate recording keys in the INVITE's headers, in every form a platform may know
    them by (:func:`~.siprec_metadata.recording_key_forms`)."""
    out: dict[str, None] = {}
    for name, value in msg.headers:
        if name in _KEY_HEADERS or (name.startswith("x-") and name not in _OWN_HEADERS):
            if len(value.strip()) <= 256:
                out.update(dict.fromkeys(recording_key_forms(value)))
    return list(out)


class PartyDirectory(Protocol):
    """What :func:`classify_invite` asks the domain (the SIP plane's hooks)."""

    def conversation_parties(self, cid: str) -> Parties | None: ...  # None: unknown or not accepting voice

    def recording_conversation(self, keys: Sequence[str]) -> str | None: ...  # the owner of any key


class _UsernamesOnly:
    """A directory from ``cid → agent username`` alone (no recording keys, no addresses)."""

    def __init__(self, agent_of: Callable[[str], str | None]) -> None:
        self._agent_of = agent_of

    def conversation_parties(self, cid: str) -> Parties | None:
        agent = self._agent_of(cid)
        return Parties(agent) if agent is not None else None

    def recording_conversation(self, keys: Sequence[str]) -> str | None:
        return None


@dataclass(frozen=True)
class StreamLeg:
    """Which leg one audio m-line became, and why (for logs and ``voice_streams``)."""

    index: int
    leg: str  # 'agent', 'customer' or 'mixed'
    label: str
    participant: str
    reason: str


@dataclass
class InviteInfo:
    """What the plane needs from an ingress INVITE."""

    conversation: str
    kind: str  # 'leg' or 'siprec'
    #: per m-line index: 'agent', 'customer', 'mixed' or None (stream to refuse or ignore)
    streams: list[str | None]
    leg: str | None = None  # per-leg mode only
    #: how the conversation was found (header, metadata, recording key)
    identified_by: str = ""
    attribution: list[StreamLeg] = field(default_factory=list)


def classify_invite(
    msg: SipMessage, directory: PartyDirectory | Callable[[str], str | None], srtp: str = "optional"
) -> InviteInfo:
    """Validate an ingress INVITE and decide which stream is which leg.

    ``directory`` answers which conversation a recording belongs to and who its parties are (a
    plain ``cid → agent username`` callable is a directory without recording keys). Raises
    :class:`SipParseError` with the SIP status to answer: 400 malformed, 404 unknown
    conversation or agent not among the participants, 415 unsupported body, 488 no usable audio
    or a leg's stream not what ``srtp`` (``off``/``optional``/``mandatory``) accepts.
    """
    d: PartyDirectory = _UsernamesOnly(directory) if callable(directory) else directory
    sdp_b, meta_b = split_body(msg)
    if sdp_b is None:
        raise SipParseError("INVITE without SDP offer", 488)
    streams = parse_sdp(sdp_b)
    meta = parse_metadata(meta_b) if meta_b is not None else None
    audio = [s for s in streams if s.audio_ok]
    if not audio:
        raise SipParseError("no PCMU, PCMA, G722 or opus audio stream", 488)
    cid, identified_by = _conversation_of(msg, meta, d)
    parties = d.conversation_parties(cid)
    if parties is None:
        raise SipParseError("unknown conversation", 404, cid)
    if meta is not None:
        info = _siprec_legs(cid, identified_by, streams, audio, meta, parties)
    else:
        leg = (msg.get("x-leg") or "").strip().lower()
        if leg not in ("agent", "customer"):
            raise SipParseError("X-Leg must be agent or customer", 400, cid)
        legs: list[str | None] = [None] * len(streams)
        legs[audio[0].index] = leg
        first = StreamLeg(audio[0].index, leg, audio[0].label or "", "", "X-Leg header")
        info = InviteInfo(cid, "leg", legs, leg, identified_by, [first])
    _check_srtp(streams, info, srtp)
    return info


def _check_srtp(streams: list[SdpStream], info: InviteInfo, mode: str) -> None:
    """488 for a leg's stream the workers' SRTP setting would refuse anyway (after the slot was
    placed): plain RTP when SRTP is mandatory, RTP/SAVP when it is off, DTLS-SRTP always."""
    for s, leg in zip(streams, info.streams, strict=True):
        if leg is None:
            continue
        kind = s.srtp
        if kind == "other":
            raise SipParseError(
                f"stream {s.index}: secure RTP without an SDES key (only SDES is supported)", 488, info.conversation
            )
        if mode == "mandatory" and kind != "sdes":
            raise SipParseError(f"stream {s.index}: plain RTP but SRTP is required", 488, info.conversation)
        if mode == "off" and kind == "sdes":
            raise SipParseError(f"stream {s.index}: SRTP offered but off", 488, info.conversation)


def _conversation_of(msg: SipMessage, meta: RecordingMetadata | None, d: PartyDirectory) -> tuple[str, str]:
    """The conversation id and how it was found: X-Conversation-ID, the metadata's own
    conversation id, or a recording key (metadata first, then headers) the platform registered."""
    cid = (msg.get("x-conversation-id") or "").strip()
    how = "X-Conversation-ID header"
    if not cid and meta is not None and meta.conversation:
        cid, how = meta.conversation, "conversation id in metadata"
    if not cid:
        for source, keys in (("metadata", meta.keys if meta else []), ("header", header_keys(msg))):
            if keys:
                found = d.recording_conversation(keys)
                if found is not None:
                    cid, how = found, f"recording key in {source}"
                    break
    if not cid:
        raise SipParseError("no conversation id and no known recording key", 404)
    if len(cid.encode()) > 255:
        raise SipParseError("conversation id too long", 404)
    return cid, how


def _siprec_legs(
    cid: str,
    identified_by: str,
    streams: list[SdpStream],
    audio: list[SdpStream],
    meta: RecordingMetadata,
    parties: Parties,
) -> InviteInfo:
    """A SIPREC offer's legs: a single audio stream is the ``mixed`` leg; of two or more, the one
    a participant matching the agent sends on is ``agent`` and the next one ``customer``
    (a stream whose sender matches the customer's addresses tells the agent's by elimination)."""
    legs: list[str | None] = [None] * len(streams)
    if len(audio) == 1:
        s = audio[0]
        senders = meta.label_aors.get(s.label or "", [])
        legs[s.index] = "mixed"
        att = StreamLeg(s.index, "mixed", s.label or "", ", ".join(senders), "the only audio stream")
        return InviteInfo(cid, "siprec", legs, None, identified_by, [att])
    agent_names = (parties.agent, *parties.agent_addresses)
    found: dict[int, tuple[str, str, str]] = {}  # m-line → (leg, participant, reason)
    for s in audio:
        senders = meta.label_aors.get(s.label or "", []) if s.label is not None else []
        if (who := matching(senders, agent_names)) is not None:
            found.setdefault(s.index, ("agent", who, "sender matches the agent"))
        elif (who := matching(senders, parties.customer_addresses)) is not None:
            found.setdefault(s.index, ("customer", who, "sender matches the customer"))
    agent_idx = next((i for i, (leg, _, _) in found.items() if leg == "agent"), None)
    cust_idx = next((i for i, (leg, _, _) in found.items() if leg == "customer" and i != agent_idx), None)
    if agent_idx is None and cust_idx is not None:
        agent_idx = next(s.index for s in audio if s.index != cust_idx)
        found[agent_idx] = ("agent", _senders(meta, streams[agent_idx]), "the stream that is not the customer's")
    if agent_idx is None:
        raise SipParseError("agent is not a participant of this recording", 404, cid)
    if cust_idx is None:
        cust_idx = next(s.index for s in audio if s.index != agent_idx)
        found[cust_idx] = ("customer", _senders(meta, streams[cust_idx]), "the stream that is not the agent's")
    attribution = []
    for idx in (agent_idx, cust_idx):
        leg, who, reason = found[idx]
        legs[idx] = leg
        attribution.append(StreamLeg(idx, leg, streams[idx].label or "", who, reason))
    return InviteInfo(cid, "siprec", legs, None, identified_by, attribution)


def _senders(meta: RecordingMetadata, stream: SdpStream) -> str:
    return ", ".join(meta.label_aors.get(stream.label or "", [])) if stream.label is not None else ""
