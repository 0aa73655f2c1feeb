"""An in-process fake SIP media worker: the real process protocol (:mod:`gateway.sip.protocol`)
over the real socketpairs the supervisor made, with no pjsua2 and no process.

``SipPlane(settings, hooks, spawn=FakeWorkers())`` runs the plane's placement and supervision
against these fakes, so they get fast tests beside the real-pjsua2 ones in
``tests/test_sip_plane.py``. A test plays the platform and the phones through the fake's
methods (:meth:`FakeWorker.invite`, :meth:`FakeWorker.bye`, ...) and the worker's failures
(:meth:`FakeWorker.crash`, :meth:`FakeWorker.freeze`).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time

from gateway.sip.protocol import (
    Answer,
    CallEnded,
    CallPhone,
    Command,
    Event,
    Fatal,
    HangUpPhone,
    Incoming,
    LegUp,
    PhoneEnded,
    ProtocolError,
    Quit,
    Ready,
    Reject,
    Reply,
    SetTap,
    Stats,
    WorkerArgs,
    decode,
    encode,
    encode_leg_frame,
)

_pids = itertools.count(4_000_000)  # above any real pid: never confused with a process
#: Calls a fake worker holds unless its arguments cap it (like the project's pjsua2 build).
FAKE_BUILD_CALLS = 512


class FakeWorker:
    """One fake worker; also the ``WorkerProcess`` handle the supervisor holds."""

    def __init__(
        self,
        args: WorkerArgs,
        control: socket.socket,
        frames: socket.socket,
        *,
        fatal: str = "",
        build_calls: int = FAKE_BUILD_CALLS,
        pjsua2: str = "fake+gw.0",
    ) -> None:
        self.args = args
        self.pid = next(_pids)
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.commands: list[Command] = []
        self.pending: set[int] = set()  # incoming calls waiting for Answer/Reject
        self.calls: dict[int, Answer] = {}  # answered calls
        self.phones: dict[str, str] = {}  # monitor id → cid
        #: conversation -> where its frames go ("" the frame socket, else a media process's path)
        self.tapped: dict[str, set[str]] = {}
        self.phone_refusal = ""  # non-empty: CallPhone replies not ok with this error
        self.frozen = False
        self._frames = frames
        self._frames.setblocking(False)
        self._media: dict[str, socket.socket] = {}  # media process frame sockets, by path
        self._control = control
        self._keys = itertools.count(1)
        self._seq = 0
        self._exited = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fatal = fatal
        self._build_calls = build_calls
        self._pjsua2 = pjsua2

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self._control)
        if self._fatal:
            self.emit(Fatal(error=self._fatal))
            self._exit(2)
            return
        build = self._build_calls
        calls = min(self.args.max_calls, build) if self.args.max_calls > 0 else build
        self.emit(Ready(pid=self.pid, sip_port=self.args.sip_port, max_calls=calls, pjsua2=self._pjsua2))
        self._tasks = [
            asyncio.create_task(self._read(reader)),
            asyncio.create_task(self._stats()),
            asyncio.create_task(self._send_frames()),
        ]

    # --- the WorkerProcess surface ---------------------------------------------------------
    async def wait(self) -> int:
        await self._exited.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL: gone at once, no event."""
        self._exit(-9)

    # --- what a test makes happen ----------------------------------------------------------
    def invite(self, raw: bytes) -> int:
        """An INVITE reached this worker (from the platform, forwarded by the front); its call key."""
        key = next(self._keys)
        self.pending.add(key)
        self.emit(Incoming(call=key, msg=raw.decode("utf-8", "surrogateescape")))  # as pjsua hands it over
        return key

    def bye(self, call: int, reason: str = "bye") -> None:
        """The platform hangs up ``call`` (or the worker does: ``media_timeout``)."""
        answered = self.calls.pop(call)
        self.emit(CallEnded(call=call, reason=reason))
        if not any(a.cid == answered.cid for a in self.calls.values()):
            for mid in [m for m, cid in self.phones.items() if cid == answered.cid]:
                del self.phones[mid]  # the real worker hangs up a phone that has nothing left to hear
                self.emit(PhoneEnded(mid=mid, reason="voice_ended"))

    def phone_hangs_up(self, mid: str) -> None:
        del self.phones[mid]
        self.emit(PhoneEnded(mid=mid, reason="left"))

    def crash(self) -> None:
        """The process dies (segfault, C assert): no goodbye."""
        self._exit(-11)

    def freeze(self) -> None:
        """Stuck in C: alive, silent, deaf."""
        self.frozen = True

    def emit(self, event: Event) -> None:
        if self._writer is not None and self.returncode is None:
            self._writer.write(encode(event))

    # --- the worker's side -----------------------------------------------------------------
    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:
                self._exit(0)  # the main process is gone: exit, like the real worker
                return
            while self.frozen:
                await asyncio.sleep(0.05)
            try:
                command = decode(line)
            except ProtocolError:
                continue
            if isinstance(command, Command):
                self.commands.append(command)
                self._handle(command)

    def _handle(self, cmd: Command) -> None:
        ok, error = True, ""
        match cmd:
            case Answer():
                if cmd.call in self.pending:
                    self.pending.discard(cmd.call)
                    self.calls[cmd.call] = cmd
                    for leg in cmd.legs:
                        if leg:
                            self.emit(LegUp(call=cmd.call, cid=cmd.cid, leg=leg))
                else:
                    ok, error = False, "no such pending call"
            case Reject():
                if cmd.call in self.pending:
                    self.pending.discard(cmd.call)
                    self.emit(CallEnded(call=cmd.call, reason="shutdown"))
            case CallPhone():
                if cmd.cid in self.phones.values():
                    ok, error = False, "phone already in call"
                elif self.phone_refusal:
                    ok, error = False, self.phone_refusal
                else:
                    self.phones[cmd.mid] = cmd.cid
            case HangUpPhone():
                if self.phones.pop(cmd.mid, None) is not None:
                    self.emit(PhoneEnded(mid=cmd.mid, reason="hung_up"))
            case SetTap():
                if cmd.on and cmd.to and cmd.to not in self._media:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                    sock.connect(cmd.to)
                    sock.setblocking(False)
                    self._media[cmd.to] = sock
                dests = self.tapped.setdefault(cmd.cid, set())
                (dests.add if cmd.on else dests.discard)(cmd.to)
                if not dests:
                    del self.tapped[cmd.cid]
            case Quit():
                for call in list(self.calls):
                    self.calls.pop(call)
                    self.emit(CallEnded(call=call, reason="shutdown"))
        if cmd.re:
            self.emit(Reply(re=cmd.re, ok=ok, error=error))
        if isinstance(cmd, Quit):
            self._exit(0)

    async def _stats(self) -> None:
        while True:
            if not self.frozen:
                self.emit(Stats(frames=self._seq, drops=0))
            await asyncio.sleep(0.1)

    async def _send_frames(self) -> None:
        """20 ms of each tapped conversation with a leg up: agent samples = seq, customer = -seq."""
        while True:
            await asyncio.sleep(0.02)
            live = {a.cid for a in self.calls.values()}
            for cid in self.tapped.keys() & live:
                self._seq += 1
                agent = (self._seq & 0x7FFF).to_bytes(2, "little") * 160
                customer = (-(self._seq & 0x7FFF)).to_bytes(2, "little", signed=True) * 160
                data = encode_leg_frame(cid.encode(), self._seq, 8000, agent, customer)
                for to in self.tapped.get(cid, ()):
                    try:
                        if to:
                            self._media[to].send(data)
                        else:
                            self._frames.send(data)
                    except OSError:
                        pass

    def _exit(self, code: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = code
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._writer is not None:
            self._writer.close()
        self._control.close()
        self._frames.close()
        for sock in self._media.values():
            sock.close()
        self._exited.set()


class FakeWorkers:
    """A ``spawn`` for :class:`~gateway.sip.plane.SipPlane` that starts :class:`FakeWorker`\\ s."""

    def __init__(self) -> None:
        self.spawned: list[tuple[float, FakeWorker]] = []  # (monotonic time, worker), in spawn order
        self.fatal = ""  # non-empty: new workers fail to start with this error
        self.build_calls = FAKE_BUILD_CALLS  # what new workers' "pjsua2" holds (the PyPI wheel: 4)
        self.pjsua2 = "fake+gw.0"  # the version new workers report

    async def __call__(self, args: WorkerArgs, control: socket.socket, frames: socket.socket) -> FakeWorker:
        worker = FakeWorker(args, control, frames, fatal=self.fatal, build_calls=self.build_calls, pjsua2=self.pjsua2)
        self.spawned.append((time.monotonic(), worker))
        await worker.start()
        return worker

    def on_port(self, sip_port: int) -> FakeWorker:
        """The live worker listening on ``sip_port`` (the newest one started there)."""
        return next(w for _, w in reversed(self.spawned) if w.args.sip_port == sip_port)

    def spawn_times(self, sip_port: int) -> list[float]:
        return [t for t, w in self.spawned if w.args.sip_port == sip_port]
