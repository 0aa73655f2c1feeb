"""The gateway's one SIP address: a small asyncio front, UDP and TCP on the same port.

It never carries media. It answers OPTIONS itself, decides each new INVITE with the plane
(4xx/5xx answered here, or forwarded to the worker that will hold the call), and otherwise
is a stateless proxy (RFC 3261 §16.11) between the platforms and phones outside and the
pjsua2 workers on loopback:

* a forwarded request gets our Via (branch hashed from the incoming one, so retransmissions,
  CANCEL and the ACK of a non-2xx answer follow the INVITE) and, when it starts a dialog,
  ``Record-Route`` so every later request of the dialog comes through the front too;
* the initial INVITE carries the plane's one-time placement token in ``X-Gateway-Placement``
  (the same header arriving from outside is removed);
* responses come back with our Via on top: it is removed and the response goes on to the next
  Via (its ``received``/``rport``, or the TCP connection the request came on);
* requests from outside may only reach a worker; requests from a worker (its BYE, its INVITE
  to a supervisor's phone) may only go outside.

Answers of our own to INVITE (non-2xx) are retransmitted (timer G) until the ACK arrives or
timer H (32 s) fires; a retransmitted INVITE gets the same answer or is forwarded to the same
worker again and never reserves a second slot. New INVITEs are rate-limited per source
address (503 + ``Retry-After``). Malformed input never raises out of :meth:`SipFront.received`.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field

from ..config import Settings
from .message import (
    MAX_MESSAGE_BYTES,
    SUPPORTED_OPTIONS,
    SipMessage,
    SipParseError,
    build_response,
    parse_message,
    uri_scheme,
)
from .protocol import PLACEMENT_HEADER
from .ratelimit import RateLimit
from .routing import (
    BRANCH_PREFIX,
    Uri,
    parse_uri,
    parse_via,
    pop_header,
    push_header,
    remove_header,
    set_param,
    stateless_branch,
    top_via,
    values,
)

log = logging.getLogger("gateway.sip.front")


_T1 = 0.5
_T2 = 4.0
_TIMER_H = 32.0
_ALLOW = "INVITE, ACK, CANCEL, OPTIONS, BYE"
_KNOWN = {"REGISTER", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH", "INFO", "UPDATE", "PRACK"}
_ANSWERED_CAP = 20000  # cached answers kept for retransmissions, at most
MAX_CONNECTIONS = 1000  # TCP connections at once; more are closed at once (file descriptors)
_PARTIAL_SECONDS = 30.0  # a TCP message must arrive whole within this long
_WILDCARD = {"", "0.0.0.0", "::"}
_TLS_HANDSHAKE_SECONDS = 10.0
_LOOSE_VIA = re.compile(r"^\s*SIP\s*/\s*2\.0\s*/\s*\S+\s+\S")
_ACCEPT = ("Accept", "application/sdp, multipart/mixed")
#: One refusal log line per source address per this many seconds (a flood costs a dict lookup).
_REFUSAL_LOG_SECONDS = 1.0
_LOGGED_CHARS = 200  # of any value taken from a message into a log line
_CLEN = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*(\S*)[ \t]*$", re.I | re.M)


@dataclass(frozen=True)
class Refuse:
    """The front answers the INVITE itself with ``status``."""

    status: int
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Forward:
    """The INVITE goes to the worker at ``worker`` carrying the placement ``token``."""

    worker: tuple[str, int]
    token: str


@dataclass(frozen=True)
class Relay:
    """The INVITE goes to another gateway instance (``instance``: its SIP address), which holds
    the conversation's media and places it itself; ``marker`` tells it not to relay it again."""

    instance: tuple[str, int]
    marker: str


Decision = Refuse | Forward | Relay
#: decide(msg) → what to do with a new INVITE (called once per INVITE transaction), or an
#: awaitable of it (a cluster asks Redis which instance holds the conversation first).
Decider = Callable[[SipMessage], Decision | Awaitable[Decision]]
#: The header a relayed INVITE carries (the cluster's secret: see ``gateway.shared.cluster``).
RELAY_HEADER = "x-gateway-relay"


def loopback_host(sip_host: str) -> str:
    """The front's address as the workers reach it."""
    return "127.0.0.1" if sip_host in _WILDCARD else sip_host


def front_route(settings: Settings) -> str:
    """The outbound proxy URI a worker sends every request through (``sip:host:port;lr``)."""
    return f"sip:{loopback_host(settings.sip_host)}:{settings.sip_port};lr"


@dataclass(frozen=True)
class Peer:
    """Where a message came from or goes to: a UDP address, or a TCP connection."""

    addr: tuple[str, int]
    conn: SipConnection | None = None

    @property
    def transport(self) -> str:
        if self.conn is None:
            return "UDP"
        return "TLS" if self.conn.tls else "TCP"


@dataclass
class _Forwarded:
    """An INVITE forwarded to a worker: its retransmissions, CANCEL and non-2xx ACK go there too."""

    worker: tuple[str, int]
    data: bytes
    expires: float


class SipFront:
    def __init__(
        self,
        settings: Settings,
        decide: Decider,
        options_ok: Callable[[], bool],
        workers: Callable[[], set[tuple[str, int]]],
    ) -> None:
        self.decide = decide
        self.options_ok = options_ok
        self.workers = workers
        self.port = settings.sip_port
        self.tls_port = settings.sip_tls_port
        self.server_tls = server_tls_context(settings) if settings.sip_tls_port else None
        #: TLS toward platforms and ``sips:`` phones: their certificate and host name are verified.
        self.client_tls = ssl.create_default_context(cafile=settings.sip_tls_ca or None)
        self.bind_host = settings.sip_host
        self.inner_host = loopback_host(settings.sip_host)
        #: our Via host on an INVITE relayed to another instance (the address it reaches us on)
        self.relay_host = self.inner_host
        #: whether a RELAY_HEADER value is the cluster's marker (set by the plane in a cluster)
        self.relayed_by_peer: Callable[[str | None], bool] = lambda value: False
        self.my_hosts = {self.inner_host, "127.0.0.1", "localhost", settings.sip_host} - _WILDCARD
        self.limit = RateLimit(settings.sip_invite_rate, settings.sip_invite_burst)
        self.udp: asyncio.DatagramTransport | None = None
        self.server: asyncio.Server | None = None
        self.tls_server: asyncio.Server | None = None
        self.connections: set[SipConnection] = set()
        #: (call-id, branch, method) → (response, expires) for retransmitted requests
        self.answered: dict[tuple[str, str, str], tuple[bytes, float]] = {}
        #: (call-id, branch) → retransmission timer handle, until the ACK arrives
        self.awaiting_ack: dict[tuple[str, str], asyncio.TimerHandle] = {}
        #: (call-id, incoming branch) → the INVITE forwarded to a worker (or relayed to an instance)
        self.forwarded: dict[tuple[str, str], _Forwarded] = {}
        #: (call-id, incoming branch) of INVITEs whose decision is awaited: retransmissions wait too
        self.deciding: set[tuple[str, str]] = set()
        #: our branch → expiry, of requests relayed to another instance: their responses go outside
        self.relayed: dict[str, float] = {}
        #: our branch → (TCP connection the request came on, expires): its responses go back there
        self.tcp_requests: dict[str, tuple[SipConnection, float]] = {}
        #: Call-ID → TCP connection a dialog's platform uses (requests toward it go on it)
        self.dialog_connections: dict[str, SipConnection] = {}
        self._local_for: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # resolutions and outgoing connections in flight
        # the plane's front_* stats
        self.counts = {
            "malformed": 0, "invites": 0, "rejected": 0, "forwarded": 0, "relayed": 0, "rate_limited": 0, "refusal_logs_dropped": 0,
        }  # fmt: skip
        #: source address → (monotonic second of its last refusal log line, lines dropped since)
        self._refusal_logged: dict[str, tuple[float, int]] = {}
        self._last_sweep = time.monotonic()

    # --- transports ------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on UDP and TCP ``sip_host:sip_port``, and TLS on ``sip_tls_port`` when set
        (``OSError`` if any is taken)."""
        loop = asyncio.get_running_loop()
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(self.bind_host, self.port))
        sock = self.udp.get_extra_info("socket")
        if sock is not None:  # a burst of INVITEs waits in the kernel instead of being dropped
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self.server = await loop.create_server(
                lambda: SipConnection(self), self.bind_host, self.port, reuse_address=True
            )
        except OSError:
            self.udp.close()
            raise
        if self.server_tls is not None:
            try:
                self.tls_server = await loop.create_server(
                    lambda: SipConnection(self, tls=True),
                    self.bind_host,
                    self.tls_port,
                    ssl=self.server_tls,
                    ssl_handshake_timeout=_TLS_HANDSHAKE_SECONDS,
                    reuse_address=True,
                )
            except OSError:
                self.udp.close()
                self.server.close()
                raise

    def close(self) -> None:
        for h in self.awaiting_ack.values():
            h.cancel()
        self.awaiting_ack.clear()
        if self.udp is not None:
            self.udp.close()
        if self.server is not None:
            self.server.close()
        if self.tls_server is not None:
            self.tls_server.close()
        for conn in list(self.connections):
            conn.close()
        for task in self._tasks:
            task.cancel()

    def received(self, data: bytes, peer: Peer) -> None:
        """One message from ``peer`` (a datagram, or one framed TCP message)."""
        try:
            self._received(data, peer)
        except Exception:
            self.counts["malformed"] += 1
            log.exception("sip front: unexpected error on a message from %s", peer.addr)

    def _send(self, data: bytes, peer: Peer) -> None:
        if peer.conn is not None:
            peer.conn.write(data)
        elif self.udp is not None:
            self.udp.sendto(data, peer.addr)

    def _send_outside(self, data: bytes, addr: tuple[str, int], transport: str, call_id: str = "") -> None:
        """Send toward a platform or phone: UDP, or TCP/TLS on the dialog's connection, one to
        that address, or a new one. Host names are resolved (A records; no SRV)."""
        if transport not in ("TCP", "TLS"):
            if _is_ip(addr[0]):
                self._send(data, Peer(addr))
            else:
                self._spawn(self._resolve_and_send(data, addr))
            return
        tls = transport == "TLS"
        conn = self.dialog_connections.get(call_id)
        if conn is None or conn.closed or conn.peer[0] != addr[0] or conn.tls != tls:
            conn = next((c for c in self.connections if c.peer == addr and c.tls == tls and not c.closed), None)
        if conn is not None:
            conn.write(data)
        else:
            self._spawn(self._connect_and_send(data, addr, tls))

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve_and_send(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(addr[0], addr[1], type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.info("sip front: cannot resolve %s: %s", addr[0], exc)
            return
        self._send(data, Peer((str(infos[0][4][0]), addr[1])))

    async def _connect_and_send(self, data: bytes, addr: tuple[str, int], tls: bool) -> None:
        loop = asyncio.get_running_loop()
        kind = "TLS" if tls else "TCP"
        context = self.client_tls if tls else None
        try:
            _t, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: SipConnection(self, tls=tls), *addr, ssl=context, server_hostname=addr[0] if tls else None
                ),
                5.0,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.info("sip front: %s connection to %s:%s failed: %s", kind, addr[0], addr[1], exc)
            return
        conn.write(data)

    # --- who is who ------------------------------------------------------------------------
    def _is_worker(self, peer: Peer) -> bool:
        return peer.conn is None and peer.addr in self.workers()

    def _is_me(self, host: str, port: int | None) -> bool:
        return (port or 5060) in (self.port, self.tls_port) and host.strip("[]").lower() in self.my_hosts

    def _is_worker_uri(self, uri: Uri | None) -> bool:
        if uri is None:
            return False
        host, port = uri.address()
        return (host in self.my_hosts or host == "127.0.0.1") and ("127.0.0.1", port) in self.workers()

    def _outer_host(self, peer: Peer) -> str:
        """Our address as ``peer`` (outside) reaches it: the bound one, or the one the kernel
        routes toward the peer when bound to every interface."""
        if self.bind_host not in _WILDCARD:
            return self.bind_host
        if peer.conn is not None:
            host = str(peer.conn.local[0])
        else:
            host = self._local_for.get(peer.addr[0], "")
            if not host:
                try:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                        s.connect((peer.addr[0], peer.addr[1] or 5060))
                        host = s.getsockname()[0]
                except OSError:
                    host = self.inner_host
                if len(self._local_for) < 4096:
                    self._local_for[peer.addr[0]] = host
        self.my_hosts.add(host)
        return host

    # --- handling --------------------------------------------------------------------------
    def _received(self, data: bytes, peer: Peer) -> None:
        now = time.monotonic()
        if now - self._last_sweep > 5.0:
            self._sweep(now)
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            msg = parse_message(data)
        except SipParseError:
            self.counts["malformed"] += 1
            return  # nothing to route an answer with
        if not msg.is_request:
            self._response(msg, peer)
        elif not _LOOSE_VIA.match(msg.get("via") or ""):
            self.counts["malformed"] += 1  # no Via we can read: nowhere an answer could go
        elif self._is_worker(peer):
            self._from_worker(msg, peer)
        else:
            self._from_outside(msg, peer, now)

    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        self.answered = {k: v for k, v in self.answered.items() if v[1] > now}
        self.forwarded = {k: v for k, v in self.forwarded.items() if v.expires > now}
        self.relayed = {k: v for k, v in self.relayed.items() if v > now}
        self.tcp_requests = {k: v for k, v in self.tcp_requests.items() if v[1] > now and not v[0].closed}
        self.dialog_connections = {k: c for k, c in self.dialog_connections.items() if not c.closed}
        self.limit.sweep(now)
        self._refusal_logged = {k: v for k, v in self._refusal_logged.items() if now - v[0] < _REFUSAL_LOG_SECONDS}
        for conn in [c for c in self.connections if c.partial_since and now - c.partial_since > _PARTIAL_SECONDS]:
            conn.close()  # a message that never completes (slow loris) holds no connection slot

    def _from_outside(self, msg: SipMessage, peer: Peer, now: float) -> None:
        method = msg.method or ""
        remove_header(msg, PLACEMENT_HEADER)  # only the front hands out placement tokens
        if method == "ACK":
            self._ack(msg, peer)
            return
        cached = self.answered.get((msg.call_id, msg.branch, method))
        if cached is not None:
            self._send(cached[0], peer)
            return
        if msg.version != "SIP/2.0":
            self._refuse(msg, peer, 505, "unsupported SIP version")
            return
        defect = msg.defect or ("bad Via" if any(parse_via(v) is None for v in values(msg, "via")) else "")
        if defect:
            self.counts["malformed"] += 1
            self._refuse(msg, peer, 400, defect, reason_phrase=defect)
            return
        scheme = uri_scheme(msg.uri or "")
        if scheme != "sip" and not (scheme == "sips" and peer.transport == "TLS"):
            self._refuse(msg, peer, 416, "unsupported URI scheme")
            return
        unsupported = [t for t in msg.tags("proxy-require") if t not in SUPPORTED_OPTIONS]
        if method != "CANCEL" and unsupported:
            self._refuse(msg, peer, 420, "unsupported Proxy-Require", [("Unsupported", ", ".join(unsupported))])
            return
        if method == "CANCEL":
            self._cancel(msg, peer)
            return
        if msg.to_tag:
            self._in_dialog(msg, peer)
            return
        self._pop_my_routes(msg)  # an initial request may name us in a pre-loaded Route
        if values(msg, "route"):
            self._refuse(msg, peer, 403, "No Relay", reason_phrase="No Relay")
            return
        if method in ("INVITE", "OPTIONS"):
            unsupported = [t for t in msg.tags("require") if t not in SUPPORTED_OPTIONS]
            if unsupported:
                self._refuse(msg, peer, 420, "unsupported Require", [("Unsupported", ", ".join(unsupported))])
                return
        if method == "INVITE":
            self._invite(msg, peer, now)
        elif method == "OPTIONS":
            ok = self.options_ok()
            extra = [("Allow", _ALLOW), _ACCEPT]
            extra.append(("Supported", ", ".join(sorted(SUPPORTED_OPTIONS))))
            if not ok:
                extra.append(("Retry-After", "5"))
            self._final(msg, peer, 200 if ok else 503, None, extra)
        elif method == "BYE":
            self._refuse(msg, peer, 481, "BYE outside any dialog")
        elif method in _KNOWN:
            self._refuse(msg, peer, 405, "method not allowed", [("Allow", _ALLOW)])
        else:
            self._refuse(msg, peer, 501, "unknown method", [("Allow", _ALLOW)])

    def _invite(self, msg: SipMessage, peer: Peer, now: float) -> None:
        """A new INVITE from outside: forwarded again if retransmitted, else rate-limited and decided."""
        fwd = self.forwarded.get((msg.call_id, msg.branch))
        if fwd is not None:
            self._send(fwd.data, Peer(fwd.worker))
            return
        if (msg.call_id, msg.branch) in self.deciding:
            return  # its decision is on its way; the INVITE is forwarded (or answered) then
        contacts = values(msg, "contact")  # none is RFC 2543 (RFC 4475 §3.4); pjsua says 500 to a bad one
        if len(contacts) > 1 or contacts and parse_uri(contacts[0]) is None:
            self.counts["malformed"] += 1
            self._refuse(msg, peer, 400, "Contact must be one SIP URI", reason_phrase="Contact must be one SIP URI")
            return
        mf = (msg.get("max-forwards") or "70").strip()
        if mf.isdigit() and int(mf) == 0:
            self._refuse(msg, peer, 483, "Max-Forwards is 0")  # it could not go on to a worker: decide nothing
            return
        # an INVITE another instance relayed was counted there, against the platform's address
        wait = 0.0 if self.relayed_by_peer(msg.get(RELAY_HEADER)) else self.limit.wait(peer.addr[0], now)
        if wait > 0:
            # Answered once, not cached nor retransmitted: a flood must not make us work for it.
            self.counts["rate_limited"] += 1
            self._log_refusal(msg, peer, 503, "INVITE rate limit", now)
            extra = [("Retry-After", RateLimit.retry_after(wait))]
            self._send(build_response(msg, 503, "Rate Limited", extra, to_tag=uuid.uuid4().hex[:10]), peer)
            return
        self.counts["invites"] += 1
        try:
            decision = self.decide(msg)
        except SipParseError as exc:
            decision = Refuse(exc.status, str(exc))
        except Exception:
            log.exception("sip front: decide failed")
            decision = Refuse(500)
        if inspect.isawaitable(decision):
            key = (msg.call_id, msg.branch)
            self.deciding.add(key)
            self._spawn(self._decide_later(msg, peer, decision, key))
            return
        self._decided(msg, peer, decision, now)

    async def _decide_later(
        self, msg: SipMessage, peer: Peer, pending: Awaitable[Decision], key: tuple[str, str]
    ) -> None:
        try:
            decision = await pending
        except SipParseError as exc:
            decision = Refuse(exc.status, str(exc))
        except Exception:
            log.exception("sip front: decide failed")
            decision = Refuse(500)
        finally:
            self.deciding.discard(key)
        self._decided(msg, peer, decision, time.monotonic())

    def _decided(self, msg: SipMessage, peer: Peer, decision: Decision, now: float) -> None:
        if isinstance(decision, Refuse):
            self.counts["rejected"] += 1
            extra = [*decision.headers, _ACCEPT] if decision.status == 415 else decision.headers
            self._final(msg, peer, decision.status, decision.reason, extra)
            return
        self.counts["forwarded"] += 1
        in_branch = msg.branch
        remove_header(msg, RELAY_HEADER)
        if isinstance(decision, Relay):
            # Stateless (RFC 3261 §16.11) and not record-routed: the dialog is the owner's, so
            # its later requests go straight there and a crash of this instance does not end it.
            self.counts["relayed"] += 1
            push_header(msg, RELAY_HEADER, decision.marker)
            dest = decision.instance
            self.relayed[stateless_branch(msg)] = now + 2 * _TIMER_H
            data = self._forward(msg, peer, Peer(dest), record_route=False)
        else:
            if peer.conn is not None:
                self.dialog_connections[msg.call_id] = peer.conn
            push_header(msg, PLACEMENT_HEADER, decision.token)
            dest = decision.worker
            data = self._forward(msg, peer, Peer(dest), record_route=True)
        if data is not None:
            self.forwarded[(msg.call_id, in_branch)] = _Forwarded(dest, data, now + 2 * _TIMER_H)

    def _ack(self, msg: SipMessage, peer: Peer) -> None:
        key = (msg.call_id, msg.branch)
        handle = self.awaiting_ack.pop(key, None)
        if handle is not None:  # the ACK of an answer of ours
            handle.cancel()
            return
        fwd = self.forwarded.get(key)
        if fwd is not None:  # the ACK of a worker's non-2xx answer: same branch as the INVITE
            self._forward(msg, peer, Peer(fwd.worker), record_route=False)
            return
        if self._routes_to_me(msg) or self._is_worker_uri(parse_uri(msg.uri or "")):
            self._in_dialog(msg, peer)  # the ACK of a worker's 2xx
            return
        for k in [k for k in self.awaiting_ack if k[0] == msg.call_id]:  # some UAs put a new branch on it
            self.awaiting_ack.pop(k).cancel()

    def _cancel(self, msg: SipMessage, peer: Peer) -> None:
        fwd = self.forwarded.get((msg.call_id, msg.branch))
        if fwd is not None:  # the worker answers it (200, then 487 to the INVITE)
            self._forward(msg, peer, Peer(fwd.worker), record_route=False)
        elif (msg.call_id, msg.branch, "INVITE") in self.answered:
            self._final(msg, peer, 200, None, [])  # the INVITE was already answered: no effect
        else:
            self._refuse(msg, peer, 481, "CANCEL matches no transaction")

    def _routes_to_me(self, msg: SipMessage) -> bool:
        routes = values(msg, "route")
        uri = parse_uri(routes[0]) if routes else None
        return uri is not None and self._is_me(uri.host, uri.port)

    def _pop_my_routes(self, msg: SipMessage) -> str:
        """Remove the Route values naming us from the top; the transport the last one named."""
        transport = ""
        while True:
            routes = values(msg, "route")
            uri = parse_uri(routes[0]) if routes else None
            if uri is None or not self._is_me(uri.host, uri.port):
                return transport
            pop_header(msg, "route")
            transport = uri.params.get("transport", "udp").upper()

    def _in_dialog(self, msg: SipMessage, peer: Peer) -> None:
        """A request inside a dialog from outside: only ever to a worker (no open relay)."""
        self._pop_my_routes(msg)
        target = parse_uri(msg.uri or "")
        if values(msg, "route") or not self._is_worker_uri(target):
            if msg.method != "ACK":
                status = 481 if msg.to_tag else 404
                self._refuse(msg, peer, status, "in-dialog request for no dialog of a worker")
            return
        assert target is not None
        if peer.conn is not None:
            self.dialog_connections[msg.call_id] = peer.conn
        self._forward(msg, peer, Peer(("127.0.0.1", target.address()[1])), record_route=False)

    def _from_worker(self, msg: SipMessage, peer: Peer) -> None:
        """A request a worker sends (BYE to a platform, INVITE/CANCEL/ACK/BYE to a phone)."""
        hinted = self._pop_my_routes(msg)
        routes = values(msg, "route")
        target = parse_uri(routes[0] if routes else msg.uri or "")
        if target is None:
            if msg.method != "ACK":
                self._send(build_response(msg, 416), peer)
            return
        addr = target.address()
        if self._is_me(*addr) or self._is_worker_uri(target):
            if msg.method != "ACK":
                self._send(build_response(msg, 482, "Loop Detected"), peer)
            return
        named = (target.params.get("transport") or hinted).upper()
        transport = "TLS" if target.scheme == "sips" or named == "TLS" else "TCP" if named == "TCP" else "UDP"
        data = self._prepare(msg, peer, transport, addr, record_route=not msg.to_tag and msg.method == "INVITE")
        if data is not None:
            self._send_outside(data, addr, transport, msg.call_id)

    def _forward(self, msg: SipMessage, source: Peer, dest: Peer, *, record_route: bool) -> bytes | None:
        """Forward a request from outside to the worker at ``dest`` (UDP on loopback)."""
        data = self._prepare(msg, source, "UDP", dest.addr, record_route=record_route)
        if data is not None:
            self._send(data, dest)
        return data

    def _prepare(
        self, msg: SipMessage, source: Peer, transport: str, dest: tuple[str, int], *, record_route: bool
    ) -> bytes | None:
        """``msg`` with Max-Forwards decremented, our Via (and Record-Route) on top; None if it
        must not go on (483 answered)."""
        mf = msg.get("max-forwards")
        hops = int(mf) if mf is not None and mf.strip().isdigit() else 70
        if hops <= 0:
            if msg.method != "ACK":
                self._log_refusal(msg, source, 483, "Max-Forwards is 0", time.monotonic())
                self._send(build_response(msg, 483), source)
            return None
        msg.headers = [(k, v) for k, v in msg.headers if k != "max-forwards"]
        msg.headers.append(("max-forwards", str(hops - 1)))
        branch = stateless_branch(msg)
        outside = not self._is_worker(source)
        if outside:  # RFC 3261 §18.2.1 and RFC 3581: where the answer really goes
            top = values(msg, "via")[0]
            pop_header(msg, "via")
            via = top_via_value(top, source)
            push_header(msg, "via", via)
        if outside:
            out_host = self.inner_host if dest in self.workers() else self.relay_host
        else:
            out_host = self._outer_host(Peer(dest))
        out_port = self.tls_port if transport == "TLS" else self.port
        push_header(msg, "via", f"SIP/2.0/{transport} {out_host}:{out_port};branch={branch};rport")
        if record_route:
            outer_peer = source if outside else Peer(dest)
            outer_transport = source.transport if outside else transport
            outer_port = self.tls_port if outer_transport == "TLS" else self.port
            outer = f"sip:{self._outer_host(outer_peer)}:{outer_port};lr"
            if outer_transport != "UDP":
                outer = set_param(outer, "transport", outer_transport.lower())
            inner = f"sip:{self.inner_host}:{self.port};lr"
            # The side that gets the request uses the top entry first (RFC 5658 double record-route).
            first, second = (inner, outer) if outside else (outer, inner)
            if second != first:
                push_header(msg, "record-route", f"<{second}>")
            push_header(msg, "record-route", f"<{first}>")
        if source.conn is not None:
            self.tcp_requests[branch] = (source.conn, time.monotonic() + 2 * _TIMER_H)
        return msg.to_bytes()

    def _response(self, msg: SipMessage, peer: Peer) -> None:
        """A response to something we forwarded: drop our Via, pass it to the next one."""
        via = top_via(msg)
        branch = via.params.get("branch", "") if via is not None else ""
        if via is None or not branch.startswith(BRANCH_PREFIX) or not self._is_me(via.host, via.port):
            return  # not ours (or a reflection attempt): ignore, as RFC 3261 §16.7 wants
        pop_header(msg, "via")
        nxt = top_via(msg)
        if nxt is None:
            return
        data = msg.to_bytes()
        if self._is_worker(peer) or branch in self.relayed:  # toward the platform or phone
            conn = self.tcp_requests.get(branch, (None, 0.0))[0]
            if conn is not None and not conn.closed:
                conn.write(data)
            else:
                self._send_outside(data, nxt.reply_to, nxt.transport, msg.call_id)
        elif nxt.reply_to in self.workers():  # toward the worker that sent the request
            self._send(data, Peer(nxt.reply_to))

    def _refuse(
        self,
        msg: SipMessage,
        peer: Peer,
        status: int,
        why: str,
        extra: list[tuple[str, str]] | None = None,
        *,
        reason_phrase: str | None = None,
    ) -> None:
        """A refusal the front answers before the plane is asked: logged, then answered."""
        self._log_refusal(msg, peer, status, why, time.monotonic())
        self._final(msg, peer, status, reason_phrase, extra or [])

    def _log_refusal(self, msg: SipMessage, peer: Peer, status: int, why: str, now: float) -> None:
        """One JSON line per source address per second (a flood costs a dict lookup and a count;
        the next line says how many were left out). Never the whole message."""
        source = peer.addr[0]
        last, dropped = self._refusal_logged.get(source, (0.0, 0))
        if now - last < _REFUSAL_LOG_SECONDS:
            self._refusal_logged[source] = (last, dropped + 1)
            self.counts["refusal_logs_dropped"] += 1
            return
        self._refusal_logged[source] = (now, 0)
        cid = (msg.get("x-conversation-id") or "").strip()[:_LOGGED_CHARS] or None
        log.info(
            "sip front: %s refused %d: %s",
            (msg.method or "?")[:_LOGGED_CHARS],
            status,
            why[:_LOGGED_CHARS],
            extra={
                "status": status,
                "reason": why[:_LOGGED_CHARS],
                "call_id": msg.call_id[:_LOGGED_CHARS],
                "conversation": cid,
                "source": f"{source}:{peer.addr[1]}/{peer.transport}",
                "suppressed": dropped or None,
            },
        )

    def _final(
        self, msg: SipMessage, peer: Peer, status: int, reason: str | None, extra: list[tuple[str, str]]
    ) -> None:
        """An answer of our own; an INVITE's non-2xx is retransmitted (over UDP) until the ACK."""
        data = build_response(msg, status, reason, extra, to_tag=uuid.uuid4().hex[:10])
        method = msg.method or ""
        if len(self.answered) < _ANSWERED_CAP:
            self.answered[(msg.call_id, msg.branch, method)] = (data, time.monotonic() + _TIMER_H)
        self._send(data, peer)
        if method == "INVITE" and status >= 300 and peer.conn is None:
            self._retransmit((msg.call_id, msg.branch), data, peer, _T1, time.monotonic() + _TIMER_H)

    def _retransmit(self, key: tuple[str, str], data: bytes, peer: Peer, interval: float, deadline: float) -> None:
        loop = asyncio.get_running_loop()

        def fire() -> None:
            if time.monotonic() >= deadline:
                self.awaiting_ack.pop(key, None)
                return
            self._send(data, peer)
            self._retransmit(key, data, peer, min(interval * 2, _T2), deadline)

        self.awaiting_ack[key] = loop.call_later(interval, fire)

    def too_large(self, head: bytes, peer: Peer) -> None:
        """A TCP message over :data:`MAX_MESSAGE_BYTES`: 413 if its head says where to."""
        self.counts["malformed"] += 1
        try:
            msg = parse_message(head + b"\r\n\r\n")
        except SipParseError:
            return
        if msg.is_request and msg.method != "ACK":
            self._log_refusal(msg, peer, 413, "message too large", time.monotonic())
            self._send(build_response(msg, 413), peer)


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS listener's context: the system OpenSSL through :mod:`ssl`, TLS 1.2 or newer,
    the gateway's certificate (chain) and key; clients are not asked for a certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.sip_tls_cert, settings.sip_tls_key)
    return ctx


def top_via_value(value: str, source: Peer) -> str:
    """The top Via of a request from ``source`` with ``received``/``rport`` filled in."""
    via = parse_via(value)
    if via is None:
        return value
    if via.host.strip("[]") != source.addr[0]:
        value = set_param(value, "received", source.addr[0])
    if "rport" in via.params:
        value = set_param(value, "rport", str(source.addr[1]))
    return value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, front: SipFront) -> None:
        self.front = front

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.front.received(data, Peer((addr[0], addr[1])))

    def error_received(self, exc: Exception) -> None:
        log.debug("sip front: socket error %s", exc)


class SipConnection(asyncio.Protocol):
    """One SIP-over-TCP or SIP-over-TLS connection (either direction; asyncio's ssl layer
    below): messages framed by Content-Length (RFC 3261 §18.3), CRLF keep-alives answered
    (RFC 5626 §3.5.1)."""

    def __init__(self, front: SipFront, *, tls: bool = False) -> None:
        self.front = front
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.closed = False
        self.partial_since = 0.0  # monotonic time since which part of a message waits in buf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer, self.local = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
        if len(self.front.connections) >= MAX_CONNECTIONS:
            log.warning("sip front: %d TCP connections, refusing one from %s", MAX_CONNECTIONS, self.peer[0])
            self.close()
            return
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._frame()
        if not self.buf:
            self.partial_since = 0.0
        elif not self.partial_since:
            self.partial_since = time.monotonic()

    def _frame(self) -> None:
        while self.buf and not self.closed:
            if self.buf.startswith(b"\r\n\r\n"):  # ping → pong
                del self.buf[:4]
                self.write(b"\r\n")
                continue
            if self.buf.startswith(b"\r\n"):
                if len(self.buf) < 4 and b"\r\n\r\n".startswith(bytes(self.buf)):
                    return  # maybe the start of a ping
                del self.buf[:2]
                continue
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_MESSAGE_BYTES:
                    self.front.too_large(bytes(self.buf[:4096]).rsplit(b"\r\n", 1)[0], Peer(self.peer, self))
                    self.close()
                return
            m = _CLEN.search(bytes(self.buf[:end]))
            clen_s = m.group(1) if m else b"0"
            if not clen_s.isdigit():
                self.front.received(bytes(self.buf[: end + 4]), Peer(self.peer, self))  # → 400
                self.close()
                return
            total = end + 4 + int(clen_s)
            if total > MAX_MESSAGE_BYTES:
                self.front.too_large(bytes(self.buf[:end]), Peer(self.peer, self))
                self.close()
                return
            if len(self.buf) < total:
                return
            message = bytes(self.buf[:total])
            del self.buf[:total]
            self.partial_since = 0.0
            self.front.received(message, Peer(self.peer, self))
