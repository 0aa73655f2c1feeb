"""Helpers for the SIP tests: real peers (sipp, pjsua2 phone, pjsua2 SIPREC client), raw SIP, audio checks.

The test process itself never imports pjsua2 (like the gateway's main process): the SIPREC
client runs as ``python -m devtools.siprec_source ...`` in a child process.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import sys
import time
import uuid
import wave
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

from devtools.siprec_source import metadata as source_metadata  # no pjsua2 at import time
from gateway.config import Settings
from gateway.sip.parties import Parties
from gateway.sip.plane import SipPlane

from .support import make_settings

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "fixtures" / "audio"
SIPP_DIR = ROOT / "fixtures" / "sipp"
PYTHON = sys.executable

INSTALL_HINTS = {
    "sipp": "apt-get install sip-tester",
    "sox": "apt-get install sox",
    "espeak-ng": "apt-get install espeak-ng",
}


def require_tool(name: str) -> str:
    """Path of an external tool; a missing tool FAILS the test (never skips)."""
    path = shutil.which(name)
    if path is None:
        import pytest

        pytest.fail(f"{name} is not installed: {INSTALL_HINTS.get(name, 'install it')}", pytrace=False)
    return path


def require_pjsua2() -> None:
    import importlib.util

    if importlib.util.find_spec("pjsua2") is None:
        import pytest

        pytest.fail(
            "pjsua2 is not installed: scripts/setup.sh test builds and installs it (Python 3.11/3.12)", pytrace=False
        )


# --- ports -----------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    """Free for UDP and for TCP (the SIP address listens on both)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_udp_block(n: int, lo: int = 21000, hi: int = 59000) -> int:
    """First port of ``n`` consecutive ports free on loopback, UDP and TCP (random, so parallel
    runs rarely clash)."""
    for _ in range(200):
        base = random.randrange(lo, hi - n)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free UDP port block")


def sip_gateway_settings(tmp_path: Path, sip_port: int, **overrides: Any) -> Settings:
    """Settings of a whole gateway (tests/support.py ``running_gateway``) with its SIP plane on
    ``sip_port``: one worker, 40 RTP ports of their own; ``overrides`` as for ``make_settings``."""
    values: dict[str, Any] = {"enable_sip": True, "sip_port": sip_port, "sip_workers": 1}
    values.update(overrides)
    if "rtp_port_base" not in values:  # pick the block only when the caller does not
        values["rtp_port_base"] = free_udp_block(40, 30000, 39000)
    return make_settings(tmp_path, **values)


@asynccontextmanager
async def started_plane(tmp_path: Path, hooks: Any, **overrides: Any) -> AsyncIterator[SipPlane]:
    """A started SIP plane alone (no HTTP API) on free ports, its data in ``tmp_path``, stopped on
    exit; ``overrides``: more settings (``sip_workers=2``, ``rtp_port_base=...``)."""
    values: dict[str, Any] = {"sip_workers": 1, "data_dir": str(tmp_path)}
    values.update(overrides)
    if "sip_port" not in values:
        values["sip_port"] = free_udp_block(3)
    if "rtp_port_base" not in values:
        values["rtp_port_base"] = free_udp_block(40, 30000, 39000)
    plane = SipPlane(Settings(**values), hooks)
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


async def stop_processes(procs: Sequence[asyncio.subprocess.Process], grace: float = 5.0) -> None:
    """SIGTERM to every process still running (sipp sends its BYE), then wait up to ``grace``
    seconds each; whatever is left is killed."""
    for p in procs:
        if p.returncode is None:
            p.terminate()
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), grace)
        except TimeoutError:
            p.kill()
            await p.wait()


# --- hooks -----------------------------------------------------------------------------------


class FakeHooks:
    """A recording :class:`SipHooks`: conversations known by a dict cid → agent; ``parties``
    adds addresses, ``recording_keys`` maps a recording key to its conversation."""

    def __init__(self, convs: dict[str, str] | None = None) -> None:
        self.convs = dict(convs or {})
        self.parties: dict[str, Parties] = {}
        self.recording_keys: dict[str, str] = {}
        self.streams: dict[str, list[dict[str, str]]] = {}
        self.is_accepting = True
        self.events: list[tuple[Any, ...]] = []
        self.changed = asyncio.Event()

    def _note(self, *ev: Any) -> None:
        self.events.append(ev)
        self.changed.set()

    def conversation_parties(self, cid: str) -> Parties | None:
        if cid in self.parties:
            return self.parties[cid]
        agent = self.convs.get(cid)
        return Parties(agent) if agent is not None else None

    def recording_conversation(self, keys: Sequence[str]) -> str | None:
        known = {k.lower(): cid for k, cid in self.recording_keys.items()}  # as the store: case-insensitive
        return next((known[k.lower()] for k in keys if k.lower() in known), None)

    def on_streams_attributed(self, cid: str, streams: list[dict[str, str]]) -> None:
        self.streams[cid] = streams

    def accepting(self) -> bool:
        return self.is_accepting

    def on_leg_started(self, cid: str, leg: str) -> None:
        self._note("leg_started", cid, leg)

    def on_leg_ended(self, cid: str, leg: str, reason: str) -> None:
        self._note("leg_ended", cid, leg, reason)

    def on_phone_ended(self, monitor_id: str, reason: str) -> None:
        self._note("phone_ended", monitor_id, reason)

    async def wait_for(self, *ev: Any, timeout: float = 10.0) -> float:
        """Wait until ``ev`` was recorded; returns the seconds waited."""
        t0 = time.monotonic()
        while ev not in self.events:
            self.changed.clear()
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise AssertionError(f"{ev} not seen in {timeout}s; events: {self.events}")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return time.monotonic() - t0


async def wait_until(pred: Any, timeout: float = 10.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def collect(tap: Any, seconds: float) -> list[Any]:
    """The LegFrames a tap delivers within ``seconds`` (fewer if it ends)."""
    frames = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            frames.append(await asyncio.wait_for(tap.next_frame(), max(0.01, end - time.monotonic())))
    except (TimeoutError, EOFError):
        pass
    return frames


# --- peers -----------------------------------------------------------------------------------


class Proc:
    """A child process whose stdout lines are collected (phone, SIPREC client)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").strip()
            if text and text.split()[0].isupper() and text.split()[0].isalpha():
                self.lines.append((time.monotonic(), text))
                self._new.set()
        self._new.set()

    async def wait_line(self, prefix: str, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        while True:
            for t, text in self.lines:
                if text.startswith(prefix):
                    return t
            left = timeout - (time.monotonic() - t0)
            if left <= 0 or (self._task.done() and not any(x.startswith(prefix) for _, x in self.lines)):
                raise AssertionError(f"{prefix!r} not printed; got {[x for _, x in self.lines]}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), left)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(self._task, return_exceptions=True)


async def start_phone(port: int, record: Path, *extra: str) -> Proc:
    """Start ``python -m devtools.sip_phone`` and wait for READY."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "devtools.sip_phone", "--port", str(port), "--rtp-port", str(port + 2),
        "--record", str(record), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=env, cwd=str(ROOT),
    )  # fmt: skip
    p = Proc(proc)
    await p.wait_line("READY", 10)
    return p


def render_leg_scenario(tmp: Path, rtp_file: Path, name: str = "leg_uac.xml") -> Path:
    text = (SIPP_DIR / name).read_text()
    text = text.replace("fixtures/audio/agent_600.ulaw", str(rtp_file))
    out = tmp / f"leg_{rtp_file.stem}_{uuid.uuid4().hex[:6]}.xml"
    out.write_text(text)
    return out


async def _start_sipp(
    tmp: Path, front_port: int, scenario: str, rtp_file: Path, duration_ms: int, keys: dict[str, str], name: str
) -> asyncio.subprocess.Process:
    """sipp as the platform: one call of ``fixtures/sipp/<scenario>`` to the SIP address (no redirect followed)."""
    sipp = require_tool("sipp")
    scen = render_leg_scenario(tmp, rtp_file, scenario)
    base = free_udp_block(8, 40000, 59000)
    key_args = [arg for key, value in keys.items() for arg in ("-key", key, value)]
    return await asyncio.create_subprocess_exec(
        sipp, f"127.0.0.1:{front_port}", "-sf", str(scen), "-m", "1", "-i", "127.0.0.1",
        "-p", str(base), "-mi", "127.0.0.1", "-mp", str(base + 2), "-d", str(duration_ms),
        *key_args, "-nostdin", "-timeout", "30s", "-timeout_error",
        "-trace_err", "-error_file", str(tmp / f"sipp_{name}_err.log"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=str(tmp),
    )  # fmt: skip


async def start_sipp_leg(
    tmp: Path, front_port: int, cid: str, leg: str, rtp_file: Path, duration_ms: int = 4000
) -> asyncio.subprocess.Process:
    """A per-leg platform call with sipp: INVITE → 200 → ACK → rtp_stream → BYE, all through the front."""
    return await _start_sipp(
        tmp, front_port, "leg_uac.xml", rtp_file, duration_ms, {"cid": cid, "leg": leg}, f"{cid}_{leg}"
    )


async def start_sipp_siprec(
    tmp: Path, front_port: int, cid: str, agent: str, rtp_file: Path, duration_ms: int = 3000
) -> asyncio.subprocess.Process:
    """A SIPREC recording client with sipp (fixtures/sipp/siprec_uac.xml); audio on the first stream only."""
    return await _start_sipp(
        tmp, front_port, "siprec_uac.xml", rtp_file, duration_ms, {"cid": cid, "agent": agent}, f"siprec_{cid}"
    )


async def start_siprec(
    front_port: int,
    cid: str | None,
    agent: str,
    agent_wav: Path,
    customer_wav: Path,
    duration: float,
    *,
    swap: bool = False,
    cid_in_metadata: bool = True,
    record_prefix: Path | None = None,
    extra: Sequence[str] = (),
) -> Proc:
    """Start the pjsua2 SIPREC client (``python -m devtools.siprec_source``, one conversation, no
    redial: it hangs up ``duration`` s after media is up and exits); ``extra``: more options."""
    port = free_udp_block(40, 40000, 59000)
    args = [
        PYTHON, "-m", "devtools.siprec_source", "--front", f"127.0.0.1:{front_port}", "--port", str(port),
        "--agent", agent, "--agent-wav", str(agent_wav), "--customer-wav", str(customer_wav), "--duration", str(duration),
    ]  # fmt: skip
    if cid:
        args += ["--cid", cid]
    if swap:
        args.append("--swap")
    if not cid_in_metadata:
        args.append("--cid-header")
    if record_prefix is not None:
        args += ["--record-prefix", str(record_prefix)]
    args += extra
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=str(ROOT),
    )
    p = Proc(proc)
    await p.wait_line("READY", 10)
    return p


# --- raw SIP ---------------------------------------------------------------------------------


class RawSip:
    """A bare UDP socket to speak hand-made SIP to the front."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)  # floods of answers in tests
        self.sock.bind((host, 0))
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def invite(
        self,
        front_port: int,
        *,
        body: bytes = b"",
        ctype: str = "application/sdp",
        headers: dict[str, str] | None = None,
        call_id: str | None = None,
        method: str = "INVITE",
        branch: str | None = None,
    ) -> tuple[bytes, str, str]:
        call_id = call_id or uuid.uuid4().hex
        branch = branch or "z9hG4bK" + uuid.uuid4().hex[:12]
        lines = [
            f"{method} sip:gateway@127.0.0.1:{front_port} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.host}:{self.port};branch={branch};rport",
            f"From: <sip:platform@{self.host}:{self.port}>;tag=abc",
            f"To: <sip:gateway@127.0.0.1:{front_port}>",
            f"Call-ID: {call_id}",
            f"CSeq: 1 {method}",
            f"Contact: <sip:platform@{self.host}:{self.port}>",
            "Max-Forwards: 70",
        ]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method == "INVITE":
            lines.append(f"Content-Type: {ctype}")
        lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        return data, call_id, branch

    def send(self, data: bytes, front_port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", front_port))

    async def recv(self, timeout: float = 3.0) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 70000), timeout)
        except TimeoutError:
            return None

    async def recv_from(self, timeout: float = 3.0) -> tuple[bytes, tuple[str, int]] | None:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recvfrom(self.sock, 70000), timeout)
        except TimeoutError:
            return None

    async def request(self, data: bytes, front_port: int, timeout: float = 3.0, ack: bool = True) -> tuple[int, str]:
        """Send, return (status, whole response text) of the first final response.

        A final response to an INVITE is ACKed (as RFC 3261 17.1.1.3 wants) unless ``ack=False``.
        """
        self.send(data, front_port)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            resp = await self.recv(timeout)
            if resp is None:
                break
            text = resp.decode("utf-8", "surrogateescape")
            status = int(text.split(" ", 2)[1])
            if status >= 200:
                if ack and data.startswith(b"INVITE"):
                    self.send(self._ack(data, text), front_port)
                return status, text
        return 0, ""

    @staticmethod
    def _ack(invite: bytes, response: str) -> bytes:
        """The ACK of ``response``: hop by hop (same branch) for a non-2xx, and for a 2xx a new
        transaction to the Contact along the Record-Route set (RFC 3261 §13.2.2.4)."""
        head = invite.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape")
        lines = head.split("\r\n")
        status = int(response.split(" ", 2)[1])
        if status < 300:
            return in_dialog_request("ACK", invite, response, 1)
        out = ["ACK" + lines[0][len("INVITE") :]]
        to = next(ln for ln in response.split("\r\n") if ln.lower().startswith("to:"))
        for ln in lines[1:]:
            low = ln.lower()
            if low.startswith(("via:", "from:", "call-id:", "max-forwards:")):
                out.append(ln)
            elif low.startswith("cseq:"):
                out.append(ln.replace("INVITE", "ACK"))
        out.append(to)
        out.append("Content-Length: 0")
        return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def response_header(response: str, name: str) -> list[str]:
    """Every value of header ``name`` in a response's text (one per line, as the front writes them)."""
    return [ln.split(":", 1)[1].strip() for ln in response.split("\r\n") if ln.lower().startswith(name.lower() + ":")]


def in_dialog_request(method: str, invite: bytes, ok: str, cseq: int) -> bytes:
    """A request inside the dialog the 2xx ``ok`` set up: to its Contact, along its
    Record-Route set reversed (the UAC's route set), with a new branch."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode("utf-8", "surrogateescape").split("\r\n")
    contact = response_header(ok, "contact")[0]
    target = contact.split("<", 1)[1].split(">", 1)[0] if "<" in contact else contact.split(";", 1)[0]
    routes = [r.strip() for line in response_header(ok, "record-route") for r in line.split(",")][::-1]
    via = next(ln for ln in head if ln.lower().startswith("via:"))
    via = via.split(";branch=", 1)[0] + f";branch=z9hG4bK{uuid.uuid4().hex[:12]};rport"
    out = [f"{method} {target} SIP/2.0", via]
    out += [ln for ln in head if ln.lower().startswith(("from:", "call-id:"))]
    out.append("To: " + response_header(ok, "to")[0])
    out.append(f"CSeq: {cseq if method != 'ACK' else 1} {method}")
    out.append("Max-Forwards: 70")
    out += [f"Route: {r}" for r in routes]
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode("utf-8", "surrogateescape")


class RawLeg(NamedTuple):
    """A call made by :func:`raw_leg_call`: its INVITE and the 200's text (for :func:`in_dialog_request`)."""

    invite: bytes
    answer: str

    @property
    def media_port(self) -> int:
        """The gateway's RTP port for this leg (the answer's first ``m=audio`` line)."""
        line = next(ln for ln in self.answer.split("\r\n") if ln.startswith("m=audio "))
        return int(line.split()[1])


async def raw_leg_call(sip: RawSip, front_port: int, cid: str, leg: str, rtp_port: int = 0) -> RawLeg:
    """A per-leg call by hand through the front (INVITE → 200 → ACK) that never sends RTP by itself;
    its SDP offers ``rtp_port`` (default: some free port nobody listens on)."""
    rtp_port = rtp_port or free_udp_block(2, 40000, 59000)
    data, _, _ = sip.invite(front_port, body=sdp(port=rtp_port), headers={"X-Conversation-ID": cid, "X-Leg": leg})
    code, text = await sip.request(data, front_port)
    assert code == 200, text
    return RawLeg(data, text)


def sdp(
    audio_pts: str = "0 8", *, audio: bool = True, streams: int = 1, labels: bool = False, port: int = 49170
) -> bytes:
    lines = ["v=0", "o=p 1 1 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1", "t=0 0"]
    for i in range(streams):
        if audio:
            lines.append(f"m=audio {port + 2 * i} RTP/AVP {audio_pts}")
        else:
            lines.append(f"m=video {port + 2 * i} RTP/AVP 96")
        lines.append("a=sendonly")
        if labels:
            lines.append(f"a=label:{i + 1}")
    return ("\r\n".join(lines) + "\r\n").encode()


def metadata(agent_aor: str, customer_aor: str, cid: str | None = None, agent_label: str = "1") -> bytes:
    """The SIPREC source's RFC 7865 metadata, as bytes for hand-made INVITEs."""
    return source_metadata(agent_aor, customer_aor, cid, agent_label).encode()


def multipart(parts: list[tuple[str, bytes]], boundary: str = "OSS-unique-boundary-42") -> tuple[bytes, str]:
    out = b""
    for ctype, body in parts:
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + body + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/mixed;boundary={boundary}"


# --- audio analysis --------------------------------------------------------------------------


def read_wav(path: Path) -> tuple[Any, int]:
    import numpy as np

    with wave.open(str(path), "rb") as w:
        rate = w.getframerate()
        data = w.readframes(w.getnframes())
        width = w.getsampwidth()
    assert width == 2, f"{path}: {width}-byte samples"
    return np.frombuffer(data, dtype="<i2").astype("float64"), rate


def read_ulaw(path: Path) -> Any:
    import numpy as np

    u = ~np.frombuffer(path.read_bytes(), dtype=np.uint8)
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = ((mantissa.astype(np.int32) << 3) + 0x84) << exponent
    pcm = np.where(sign != 0, 0x84 - mag, mag - 0x84)
    return pcm.astype("float64")


def tone_levels(x: Any, rate: int, freqs: list[float]) -> dict[float, float]:
    """Energy near each frequency relative to the strongest bin (0..1), Hann-windowed FFT."""
    import numpy as np

    if len(x) < rate // 10:
        return {f: 0.0 for f in freqs}
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    hz = np.fft.rfftfreq(len(x), 1 / rate)
    peak = spec.max() or 1.0
    out = {}
    for f in freqs:
        band = (hz > f - 15) & (hz < f + 15)
        out[f] = float(spec[band].max() / peak) if band.any() else 0.0
    return out


def assert_phone_heard(record: Path, heard: Sequence[float], absent: Sequence[float]) -> None:
    """A phone's 8 kHz recording (``start_phone``): its last second carries each ``heard`` tone
    and nothing of the ``absent`` ones (the phone's own tone, which must never come back)."""
    x, rate = read_wav(record)
    assert rate == 8000 and len(x) > 8000, f"recording too short: {len(x)} samples"
    levels = tone_levels(x[-8000:], rate, [*heard, *absent])
    assert all(levels[hz] > 0.3 for hz in heard), levels
    assert all(levels[hz] < 0.01 for hz in absent), levels


def median_correlation(signal: Any, reference: Any, window: int = 4000) -> float:
    """Median over the non-silent ``window``-sample pieces of ``signal`` of their best
    normalised correlation with ``reference``: one scheduling hiccup on a loaded machine
    (jitter-buffer concealment in one piece) does not decide the result."""
    import numpy as np

    pieces = [signal[s : s + window] for s in range(0, len(signal) - window + 1, window)]
    if not pieces:
        return 0.0
    loudest = max(float(np.abs(p).max()) for p in pieces)
    scores = [best_correlation(p, reference, window) for p in pieces if float(np.abs(p).max()) > 0.2 * loudest]
    return float(np.median(scores)) if scores else 0.0


def best_correlation(signal: Any, reference: Any, window: int = 8000) -> float:
    """Highest normalised correlation of a ``window``-sample piece of ``signal`` with ``reference``.

    The piece is taken where ``signal`` is loudest; ``reference`` is scanned at every lag
    (FFT cross-correlation), so any delay and any loop position match.
    """
    import numpy as np

    if len(signal) < window:
        return 0.0
    step = window // 2
    best_start, best_e = 0, -1.0
    for s in range(0, len(signal) - window, step):
        e = float(np.dot(signal[s : s + window], signal[s : s + window]))
        if e > best_e:
            best_start, best_e = s, e
    piece = signal[best_start : best_start + window]
    piece = piece - piece.mean()
    ref = np.concatenate([reference, reference])  # looped playback wraps around
    n = len(ref) + window
    nfft = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(ref, nfft) * np.conj(np.fft.rfft(piece, nfft)), nfft)[: len(ref) - window]
    # energy of every reference window, for normalisation
    c = np.concatenate([[0.0], np.cumsum(ref * ref)])
    csum = np.concatenate([[0.0], np.cumsum(ref)])
    energies = c[window:] - c[:-window]
    sums = csum[window:] - csum[:-window]
    var = energies[: len(xc)] - sums[: len(xc)] ** 2 / window
    denom = np.sqrt(np.maximum(var, 1e-9) * float(np.dot(piece, piece)))
    return float(np.max(xc / denom))
