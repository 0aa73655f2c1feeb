"""What the SIP front needs to forward a message (RFC 3261 §16 and §18): Via and URI parsing,
the stateless branch (§16.11), and edits of the Via / Route / Record-Route stacks.

Pure functions on :class:`~gateway.sip.message.SipMessage`: no sockets, no state.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .message import SipMessage, split_values

#: RFC 3261 magic cookie; our own branches add a mark so a response's top Via is recognised.
BRANCH_PREFIX = "z9hG4bK-gwf-"

_VIA = re.compile(r"^SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9.!%*_+`'~-]+)\s+([^;\s]+)\s*(;.*)?$", re.S)
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class Via:
    transport: str  # upper-case: UDP, TCP, TLS...
    host: str
    port: int | None
    params: dict[str, str]

    @property
    def reply_to(self) -> tuple[str, int]:
        """Where a response goes over UDP (RFC 3261 §18.2.2 with RFC 3581 ``rport``)."""
        host = self.params.get("received") or self.host
        rport = self.params.get("rport")
        port = int(rport) if rport and rport.isdigit() else (self.port or (5061 if self.transport == "TLS" else 5060))
        return host.strip("[]"), port


def parse_via(value: str) -> Via | None:
    """One Via value (``SIP/2.0/UDP host:port;branch=...``), or None if unreadable."""
    m = _VIA.match(value.strip())
    if not m:
        return None
    hp = _HOSTPORT.match(m.group(2))
    if not hp:
        return None
    params: dict[str, str] = {}
    for part in (m.group(3) or "").split(";")[1:]:
        k, _, v = part.partition("=")
        if not k.strip():
            return None  # ";;": RFC 4475 §3.1.2.1
        params[k.strip().lower()] = v.strip()
    port = int(hp.group(2)) if hp.group(2) else None
    if port is not None and not 0 < port < 65536:
        return None
    return Via(m.group(1).upper(), hp.group(1), port, params)


@dataclass(frozen=True)
class Uri:
    scheme: str
    host: str
    port: int | None
    params: dict[str, str]

    @property
    def transport(self) -> str:
        return (self.params.get("transport") or "udp").lower()

    def address(self, default_port: int = 0) -> tuple[str, int]:
        """Host and port; without a port, 5061 for ``sips:`` or ``transport=tls``, else 5060."""
        default = default_port or (5061 if self.scheme == "sips" or self.transport == "tls" else 5060)
        return self.host.strip("[]"), self.port or default


def parse_uri(value: str) -> Uri | None:
    """A ``sip:``/``sips:`` URI, bare or in ``<>`` (display name allowed), or None."""
    value = value.strip()
    if "<" in value:
        value = value.split("<", 1)[1].split(">", 1)[0]
    scheme, colon, rest = value.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips"):
        return None
    rest = rest.split("?", 1)[0]
    hostport, *params = rest.rsplit("@", 1)[-1].split(";")
    m = _HOSTPORT.match(hostport)
    if not m:
        return None
    port = int(m.group(2)) if m.group(2) else None
    if port is not None and not 0 < port < 65536:
        return None
    parsed: dict[str, str] = {}
    for p in params:
        k, _, v = p.partition("=")
        parsed[k.strip().lower()] = v.strip()
    return Uri(scheme.lower(), m.group(1).lower(), port, parsed)


def top_via(msg: SipMessage) -> Via | None:
    values = split_values(msg.get("via") or "")
    return parse_via(values[0]) if values else None


def stateless_branch(msg: SipMessage) -> str:
    """Our branch for forwarding ``msg`` (RFC 3261 §16.11): a hash of what identifies its
    transaction, so a retransmission, its CANCEL and the ACK of a non-2xx answer get the same
    branch as the INVITE (the method is left out), and a new transaction a new one."""
    values = split_values(msg.get("via") or "")
    top = values[0] if values else ""
    key = "\0".join([top, msg.call_id, (msg.get("cseq") or "").split(" ", 1)[0]])
    if "z9hG4bK" not in top:  # RFC 2543 peer: its branch need not be unique, add From and Request-URI
        key += "\0" + (msg.get("from") or "") + "\0" + (msg.uri or "")
    return BRANCH_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def push_header(msg: SipMessage, name: str, value: str) -> None:
    """Add ``value`` on top of the ``name`` stack (before the first such header)."""
    for i, (k, _v) in enumerate(msg.headers):
        if k == name:
            msg.headers.insert(i, (name, value))
            return
    msg.headers.insert(0, (name, value))


def pop_header(msg: SipMessage, name: str) -> str | None:
    """Remove and return the top value of the ``name`` stack (values may share one line)."""
    for i, (k, v) in enumerate(msg.headers):
        if k == name:
            values = split_values(v)
            if len(values) > 1:
                msg.headers[i] = (k, ", ".join(values[1:]))
            else:
                del msg.headers[i]
            return values[0] if values else None
    return None


def values(msg: SipMessage, name: str) -> list[str]:
    """Every value of the ``name`` stack, top first."""
    return [v for line in msg.get_all(name) for v in split_values(line)]


def remove_header(msg: SipMessage, name: str) -> None:
    msg.headers = [(k, v) for k, v in msg.headers if k != name]


def set_param(value: str, name: str, param: str) -> str:
    """``value`` with the header parameter ``name=param`` added (or replaced)."""
    parts = [p for p in value.split(";") if p.split("=", 1)[0].strip().lower() != name]
    return ";".join([*parts, f"{name}={param}" if param else name])


def tls_hop_uri(uri: str) -> str:
    """A ``sips:`` phone URI as ``sip:...;transport=tls``: pjsua refuses a ``sips:`` target from
    an endpoint without a TLS transport of its own, and the worker has none (its only hop is
    the front, over loopback). The front opens TLS toward the phone for either spelling and
    verifies its certificate."""
    if not uri[:5].lower() == "sips:":
        return uri
    head, sep, headers = uri[5:].partition("?")
    if ";transport=" not in head.lower():
        head += ";transport=tls"
    return "sip:" + head + sep + headers
