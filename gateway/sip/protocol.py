"""The process protocol between the main process and a SIP media worker (:mod:`gateway.sip.worker`).

Three channels per worker:

* **command line**: :class:`WorkerArgs`, the worker's ``argv`` (``python -m gateway.sip.worker ...``);
* **control**: a unix stream socket carrying one JSON object per line. The main process sends
  commands (:data:`COMMANDS`), the worker sends events (:data:`EVENTS`); each message is a small
  frozen dataclass, tagged on the wire by its ``TYPE``. A command with ``re`` set is a request:
  the worker answers it with a :class:`Reply` carrying the same ``re``.
* **audio**: a unix datagram socket carrying one LegFrame datagram per 20 ms per tapped
  conversation (:func:`encode_leg_frame` in the worker, :func:`decode_leg_frame` in the main
  process).

The worker imports this module, so it stays light: no asyncio, no aiohttp, no numpy at import
time (numpy costs each worker ~17 MB of RSS and ~0.2 s of start-up; only the main process,
which decodes frames, needs it).

LegFrame wire format (version 2, little-endian)::

    u8   version (=2)
    u8   length of the conversation id (N)
    u16  sample rate / 100 (80 for 8 kHz, 160 for 16 kHz)
    u32  frame sequence number (wraps)
    u16  samples per leg (S)
    u64  the worker's CLOCK_MONOTONIC in ns when the bridge tick took the frame out of the
         legs' jitter buffers (0: unknown). Every process on the host reads the same clock, so
         a media process subtracts it from its own send time: the added latency it measures.
    N    conversation id, UTF-8
    2*S  agent samples, int16
    2*S  customer samples, int16
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import struct
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TypeAlias

from ..media.frames import LegFrame

# --- LegFrame codec ----------------------------------------------------------------------------

LEG_FRAME_VERSION = 2
_HEADER = struct.Struct("<BBHIHQ")


def encode_leg_frame(cid: bytes, seq: int, sample_rate: int, agent: bytes, customer: bytes, stamp_ns: int = 0) -> bytes:
    """One datagram from both legs' int16 PCM (same length). Runs per frame on pj's clock
    thread in the worker: one struct pack and one concatenation. ``stamp_ns``:
    ``time.monotonic_ns()`` when the frame left the legs' jitter buffers."""
    header = _HEADER.pack(LEG_FRAME_VERSION, len(cid), sample_rate // 100, seq, len(agent) // 2, stamp_ns)
    return header + cid + agent + customer


def leg_frame_conversation(data: bytes) -> str | None:
    """The conversation id of a datagram without decoding its audio (``None`` if malformed):
    the main process routes by it and decodes only frames someone listens to."""
    if len(data) < _HEADER.size or data[0] != LEG_FRAME_VERSION:
        return None
    end = _HEADER.size + data[1]
    if len(data) < end:
        return None
    try:
        return data[_HEADER.size : end].decode()
    except UnicodeDecodeError:
        return None


def decode_leg_frame(data: bytes) -> LegFrame:
    """Parse one datagram; raises ``ValueError`` on anything malformed."""
    import numpy as np  # main process only (see the module docstring); cached in sys.modules

    if len(data) < _HEADER.size:
        raise ValueError("short frame")
    version, cid_len, rate, seq, samples, stamp_ns = _HEADER.unpack_from(data)
    if version != LEG_FRAME_VERSION:
        raise ValueError(f"unknown frame version {version}")
    end_cid = _HEADER.size + cid_len
    expected = end_cid + 4 * samples
    if len(data) != expected:
        raise ValueError(f"frame length {len(data)} != {expected}")
    cid = data[_HEADER.size : end_cid].decode()
    pcm = np.frombuffer(data, dtype="<i2", offset=end_cid, count=2 * samples)
    return LegFrame(cid, seq, rate * 100, pcm[:samples], pcm[samples:], stamp_ns / 1e9)


# --- placement tokens --------------------------------------------------------------------------
#
# The plane sends each ingress INVITE to a worker with a one-time token in the Request-URI's user
# part (``sip:<token>@worker``). The token is ``t`` + a random nonce + an HMAC of it under the
# worker's key, so the worker checks it by itself and refuses a forged or missing one at once
# (403), before the main process hears of it: a flood of INVITEs straight to a worker costs the
# worker one HMAC each and never reaches the plane. The plane still checks that the token was
# issued, is unused and unexpired (the HMAC only proves it came from the plane).

#: The header carrying a placement token from the front to the worker (compared lower-case).
PLACEMENT_HEADER = "x-gateway-placement"

_NONCE_BYTES = 8
_MAC_BYTES = 8
TOKEN_LENGTH = 1 + 2 * (_NONCE_BYTES + _MAC_BYTES)


def new_token_key() -> str:
    """A random HMAC key for one worker's placement tokens (hex)."""
    return secrets.token_hex(32)


def _mac(key: str, nonce: str) -> str:
    return hmac.new(bytes.fromhex(key), nonce.encode(), hashlib.sha256).hexdigest()[: 2 * _MAC_BYTES]


def mint_token(key: str) -> str:
    """A fresh placement token that :func:`token_valid` accepts under ``key``."""
    nonce = secrets.token_hex(_NONCE_BYTES)
    return "t" + nonce + _mac(key, nonce)


def token_valid(key: str, token: str) -> bool:
    """Was ``token`` minted under ``key``? (Constant time; any malformed token is invalid.)"""
    if len(token) != TOKEN_LENGTH or token[0] != "t":
        return False
    nonce, mac = token[1 : 1 + 2 * _NONCE_BYTES], token[1 + 2 * _NONCE_BYTES :]
    return hmac.compare_digest(_mac(key, nonce), mac)


# --- the worker's command line -----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker process is started with; field ``foo_bar`` is the option ``--foo-bar``,
    except :data:`TOKEN_KEY_ENV`, passed in the environment (a command line is readable by every
    local user in ``/proc``)."""

    ctl_fd: int
    frame_fd: int
    sip_port: int
    #: The worker's SIP address: loopback, reachable only through the front.
    host: str = "127.0.0.1"
    #: Outbound proxy every request of the worker goes through (the front: ``sip:h:p;lr``).
    proxy: str = ""
    media_host: str = "127.0.0.1"
    rtp_port: int = 20000
    rtp_range: int = 100
    #: Calls this worker may hold; 0: as many as its pjsua2 build allows (reported in Ready).
    max_calls: int = 0
    #: HMAC key of its placement tokens (:func:`mint_token`); empty: every INVITE is refused.
    token_key: str = ""
    #: Longest ``libHandleEvents`` wait; a command wakes the worker at once anyway.
    poll_ms: int = 100
    #: Seconds a supervisor phone may ring before it is ``phone_unreachable``.
    ring_timeout: float = 30.0
    #: Hang up an ingress call after this long without RTP (0: never).
    media_timeout: float = 20.0
    #: SRTP (SDES) use on every call: ``off``, ``optional``, ``mandatory`` (settings' ``sip_srtp``).
    srtp: str = "optional"
    log_level: int = 1

    def argv(self) -> list[str]:
        return [
            arg for f in fields(self) if f.name != "token_key" for arg in (_option(f.name), str(getattr(self, f.name)))
        ]

    def env(self) -> dict[str, str]:
        """What the worker's environment must carry besides :meth:`argv`."""
        return {TOKEN_KEY_ENV: self.token_key}

    @classmethod
    def parse(cls, argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerArgs:
        parser = argparse.ArgumentParser(description="A pjsua2 SIP media worker (started by the SIP plane).")
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name == "token_key":
                continue
            required = f.default is MISSING
            parser.add_argument(_option(f.name), type=hints[f.name], required=required, default=f.default)
        env = os.environ if environ is None else environ
        return cls(**vars(parser.parse_args(argv)), token_key=env.get(TOKEN_KEY_ENV, ""))


#: The environment variable carrying :attr:`WorkerArgs.token_key` to a worker.
TOKEN_KEY_ENV = "GATEWAY_SIP_WORKER_TOKEN_KEY"


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- control messages --------------------------------------------------------------------------


class ProtocolError(ValueError):
    """A control line that is not a known, well-formed message."""


@dataclass(frozen=True, kw_only=True)
class Command:
    """Main process → worker. ``re`` ≠ 0 asks for a :class:`Reply` with the same ``re``."""

    TYPE: ClassVar[str]
    re: int = 0


@dataclass(frozen=True, kw_only=True)
class Answer(Command):
    """Answer the pending incoming call ``call`` (200, ``a=recvonly``): its streams are ``legs``."""

    TYPE: ClassVar[str] = "answer"
    call: int
    cid: str
    legs: list[str | None]


@dataclass(frozen=True, kw_only=True)
class Reject(Command):
    """Refuse the pending incoming call ``call`` with SIP status ``code``."""

    TYPE: ClassVar[str] = "reject"
    call: int
    code: int = 403


@dataclass(frozen=True, kw_only=True)
class CallPhone(Command):
    """Call a supervisor phone (``a=sendonly``) and send it the mix of conversation ``cid``."""

    TYPE: ClassVar[str] = "phone"
    cid: str
    mid: str
    uri: str


@dataclass(frozen=True, kw_only=True)
class HangUpPhone(Command):
    """Hang up monitor ``mid``'s phone (BYE, or CANCEL while ringing)."""

    TYPE: ClassVar[str] = "phone_hangup"
    mid: str


@dataclass(frozen=True, kw_only=True)
class SetTap(Command):
    """Start (``on``) or stop sending conversation ``cid``'s LegFrames to ``to``: the path of a
    media process's unix datagram socket, or ``""`` for the worker's own frame socket (the
    main process). A conversation's frames go to every destination switched on."""

    TYPE: ClassVar[str] = "tap"
    cid: str
    on: bool
    to: str = ""


@dataclass(frozen=True, kw_only=True)
class Quit(Command):
    """Hang up every call and exit."""

    TYPE: ClassVar[str] = "quit"


@dataclass(frozen=True, kw_only=True)
class Event:
    """Worker → main process."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, kw_only=True)
class Ready(Event):
    """The worker listens on its SIP port; sent once, after start-up. ``max_calls`` is how many
    calls it holds (its pjsua2 build's limit, or less if asked), ``pjsua2`` that build's version:
    ``+gw.`` marks the project's own build, anything else is the PyPI wheel (4 calls)."""

    TYPE: ClassVar[str] = "ready"
    pid: int
    sip_port: int
    max_calls: int
    pjsua2: str = ""


@dataclass(frozen=True, kw_only=True)
class Fatal(Event):
    """Start-up failed; the worker exits."""

    TYPE: ClassVar[str] = "fatal"
    error: str


@dataclass(frozen=True, kw_only=True)
class Reply(Event):
    """Outcome of the command whose ``re`` this is."""

    TYPE: ClassVar[str] = "reply"
    re: int
    ok: bool
    error: str = ""


@dataclass(frozen=True, kw_only=True)
class Incoming(Event):
    """An INVITE reached the worker (``msg``: the whole message); it waits for Answer or Reject."""

    TYPE: ClassVar[str] = "incoming"
    call: int
    msg: str


#: Leg codecs (:attr:`LegUp.codec`) that carry wideband audio (16 kHz).
WIDEBAND_CODECS = frozenset({"g722", "opus"})


@dataclass(frozen=True, kw_only=True)
class LegUp(Event):
    """Media of leg ``leg`` of conversation ``cid`` is up on call ``call``."""

    TYPE: ClassVar[str] = "leg_up"
    call: int
    cid: str
    leg: str
    #: the leg's negotiated codec, lower case (``pcmu``, ``pcma``, ``g722``, ``opus``; "" unknown)
    codec: str = ""


@dataclass(frozen=True, kw_only=True)
class CallEnded(Event):
    """Ingress call ``call`` ended: ``bye``, ``media_timeout``, ``shutdown`` (hung up by us)."""

    TYPE: ClassVar[str] = "call_ended"
    call: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class PhoneEnded(Event):
    """Monitor ``mid``'s phone call ended: ``left`` (the phone hung up), ``phone_unreachable``,
    ``voice_ended`` (no leg left to hear), ``hung_up`` (asked for with :class:`HangUpPhone`)."""

    TYPE: ClassVar[str] = "phone_ended"
    mid: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class Stats(Event):
    """Counters, sent every second; its silence is how a hung worker is noticed."""

    TYPE: ClassVar[str] = "stats"
    frames: int
    drops: int
    #: INVITEs refused at once for a missing or forged placement token (a flood shows here).
    refused: int = 0
    #: Microseconds the worker spent reading its streams' statistics in the last second (the
    #: once-a-second pass: media timeout and :class:`LegQuality`; and the jitter-buffer level
    #: samples of the monitored streams between): what measuring quality costs this worker.
    stats_us: int = 0


@dataclass(frozen=True, kw_only=True)
class LegQuality(Event):
    """Once a second for each conversation someone hears (a phone, or LegFrames sent): how each
    leg arrives, from pjmedia's statistics of its stream (one ``getStreamStat`` per stream).

    ``legs`` maps the leg (``agent``, ``customer``, ``mixed``) to
    ``{"packets": int, "lost": int, "jitter_us": int, "jbuf_ms": int, "resample_ms": {path: float},
    "codec_ms": int}``:
    RTP packets received and lost (sequence gaps) since the previous report, the RFC 3550
    interarrival jitter (RTCP receiver statistics, last value), the jitter buffer's level in ms
    at the last bridge tick, i.e. how long a frame waits in it between arriving and being
    mixed, and the delay the bridge's resamplers add on the leg's way to this worker's phone
    (``sip``, present while one is connected) and to the tap (``webrtc``), from the ports' rates,
    and ``codec_ms``: the frame its decoder holds after the jitter buffer (Opus: one frame).
    ``phone``: a supervisor phone of this worker hears the conversation.
    """

    TYPE: ClassVar[str] = "leg_quality"
    cid: str
    legs: dict[str, Any]
    phone: bool = False


Message: TypeAlias = Command | Event

#: Every message that crosses the control socket, by wire tag.
COMMANDS: tuple[type[Command], ...] = (Answer, Reject, CallPhone, HangUpPhone, SetTap, Quit)
EVENTS: tuple[type[Event], ...] = (Ready, Fatal, Reply, Incoming, LegUp, CallEnded, PhoneEnded, Stats, LegQuality)
MESSAGES: dict[str, type[Message]] = {**{c.TYPE: c for c in COMMANDS}, **{e.TYPE: e for e in EVENTS}}


@dataclass(frozen=True)
class _Field:
    name: str
    kind: type  # what isinstance() checks after JSON decoding
    required: bool


def _schema(cls: type) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        kind = typing.get_origin(hint) or hint
        required = f.default is MISSING and f.default_factory is MISSING
        out.append(_Field(f.name, kind if isinstance(kind, type) else object, required))
    return tuple(out)


class JsonLineCodec:
    """One JSON line per message for a table of small frozen dataclasses tagged by ``TYPE``
    (this module's control messages; :mod:`gateway.media.ipc` uses it for the media processes)."""

    def __init__(self, messages: dict[str, type[Any]]) -> None:
        self.messages = messages
        self._schemas = {tag: _schema(cls) for tag, cls in messages.items()}

    def encode(self, message: Any) -> bytes:
        """One line (JSON, ``\\n``-terminated)."""
        payload: dict[str, Any] = {"type": message.TYPE}
        for f in self._schemas[message.TYPE]:
            payload[f.name] = getattr(message, f.name)
        return (json.dumps(payload, separators=(",", ":")) + "\n").encode()

    def decode(self, line: bytes | str) -> Any:
        """Parse one line; raises :class:`ProtocolError` on anything but a known, well-typed message."""
        try:
            payload = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ProtocolError("not a JSON object")
        tag = payload.get("type")
        cls = self.messages.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {tag!r}")
        values: dict[str, Any] = {}
        for f in self._schemas[cls.TYPE]:
            if f.name not in payload:
                if f.required:
                    raise ProtocolError(f"{cls.TYPE}: missing {f.name}")
                continue
            value = payload[f.name]
            if not isinstance(value, f.kind) or (f.kind is int and isinstance(value, bool)):
                raise ProtocolError(f"{cls.TYPE}: {f.name} is not {f.kind.__name__}")
            values[f.name] = value
        return cls(**values)


_CODEC = JsonLineCodec(MESSAGES)


def encode(message: Message) -> bytes:
    """One control line (JSON, ``\\n``-terminated)."""
    return _CODEC.encode(message)


def decode(line: bytes | str) -> Message:
    """Parse one control line; raises :class:`ProtocolError` on anything but a known, well-typed message."""
    message: Message = _CODEC.decode(line)
    return message
