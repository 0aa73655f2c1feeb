"""Supervision of the SIP media worker processes: start, restart with backoff, kill when hung,
and the command/reply plumbing of the control socket (:mod:`gateway.sip.protocol`).

Each worker is a child process (``python -m gateway.sip.worker``) with two socketpairs: control
(JSON lines) and frames (datagrams). It reports :class:`~gateway.sip.protocol.Ready`, then
:class:`~gateway.sip.protocol.Stats` every second. A worker that exits is restarted (backoff
0.2 s doubling to 5 s, back to 0.2 s after a run of 30 s); one silent for
``settings.sip_hung_seconds`` (stuck in C) is killed, and so restarted. The supervisor knows
nothing of calls: it hands the other events, and each worker's exit, to its owner (the plane).
If the main process dies, workers see EOF on the control socket and exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..config import PROJECT_DIR, Settings
from ..errors import ErrorCode, GatewayError
from .front import front_route
from .protocol import (
    Command,
    Event,
    Fatal,
    ProtocolError,
    Quit,
    Ready,
    Reply,
    Stats,
    WorkerArgs,
    decode,
    encode,
    mint_token,
    new_token_key,
)

log = logging.getLogger("gateway.sip.supervisor")

#: Calls per worker of the project's pjsua2 build (PJSUA_MAX_CALLS in scripts/pjsua2/config_site.h),
#: which sizes RTP port blocks when ``calls_per_worker`` leaves the limit to the build.
BUILD_MAX_CALLS = 512
#: Worst case per call: a SIPREC session's two streams, RTP + RTCP each.
_RTP_PORTS_PER_CALL = 4


def rtp_ports_per_worker(settings: Settings) -> int:
    """Size of each worker's RTP port block (``rtp_port_base + index * this``)."""
    return _RTP_PORTS_PER_CALL * (settings.calls_per_worker or BUILD_MAX_CALLS) + 16


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux); other processes' sockets land there."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = f.read().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


_FIRST_BACKOFF = 0.2
_MAX_BACKOFF = 5.0
_HEALTHY_RUN = 30.0  # a worker that ran this long restarts after the first backoff again


class WorkerProcess(Protocol):
    """The part of ``asyncio.subprocess.Process`` the supervisor uses (the fake worker has it too)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdout(self) -> asyncio.StreamReader | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


#: spawn(args, control, frames): start a worker on the child ends of both socketpairs (it owns them).
Spawn = Callable[[WorkerArgs, socket.socket, socket.socket], Awaitable[WorkerProcess]]


async def spawn_subprocess(args: WorkerArgs, control: socket.socket, frames: socket.socket) -> WorkerProcess:
    """Start ``python -m gateway.sip.worker`` (the default :data:`Spawn`)."""
    env = dict(os.environ, **args.env())
    env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.sip.worker", *args.argv(),
            pass_fds=(control.fileno(), frames.fileno()), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches the gateway, which stops workers in order.
            start_new_session=True,
        )  # fmt: skip
    finally:
        control.close()
        frames.close()


class Worker:
    """One supervised worker slot (its process is replaced on restart; the slot stays)."""

    def __init__(self, index: int, sip_port: int, rtp_port: int) -> None:
        self.index = index
        self.sip_port = sip_port
        self.rtp_port = rtp_port
        #: HMAC key of this slot's placement tokens (kept across restarts: a token issued just
        #: before a crash is refused by the plane anyway, its conversation being gone).
        self.token_key = new_token_key()
        #: Calls the running process holds, and its pjsua2 build (from its Ready event).
        self.max_calls = 0
        self.pjsua2 = ""
        self.proc: WorkerProcess | None = None
        self.pid = 0
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.ready_event = asyncio.Event()
        self.replies: dict[int, asyncio.Future[Reply]] = {}
        self.next_re = 1
        self.task: asyncio.Task[None] | None = None
        self.last_error = ""
        self.last_seen = 0.0
        # counters
        self.frames = 0
        self.drops = 0
        self.restarts = 0
        self.hung_kills = 0
        self.refused = 0
        #: microseconds its last once-a-second stream statistics pass took (Stats.stats_us)
        self.stats_us = 0

    def mint_token(self) -> str:
        """A placement token this worker accepts (see :func:`gateway.sip.protocol.mint_token`)."""
        return mint_token(self.token_key)


class Supervisor:
    """The worker processes of one SIP plane."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_event: Callable[[int, Event], None],
        on_exit: Callable[[int], None],
        frame_receiver: Callable[[], asyncio.DatagramProtocol],
        spawn: Spawn = spawn_subprocess,
    ) -> None:
        self.settings = settings
        self._on_event = on_event
        self._on_exit = on_exit
        self._frame_receiver = frame_receiver
        self._spawn = spawn
        base = settings.sip_worker_base_port or settings.sip_port + 1
        self.rtp_ports = rtp_ports_per_worker(settings)
        count = settings.sip_workers or os.cpu_count() or 1
        self.workers = [Worker(i, base + i, settings.rtp_port_base + i * self.rtp_ports) for i in range(count)]
        self.stopping = False
        rtp_end = settings.rtp_port_base + count * self.rtp_ports
        lo, hi = ephemeral_ports()
        if settings.rtp_port_base <= hi and rtp_end > lo:
            log.warning(
                "RTP ports %d-%d overlap the kernel's ephemeral ports %d-%d: other sockets may take a "
                "worker's RTP ports (lower GATEWAY_RTP_PORT_BASE or GATEWAY_CALLS_PER_WORKER)",
                settings.rtp_port_base, rtp_end - 1, lo, hi,
            )  # fmt: skip

    @property
    def ready(self) -> bool:
        return all(w.ready for w in self.workers)

    def ready_workers(self) -> set[int]:
        return {w.index for w in self.workers if w.ready}

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker; raises ``RuntimeError`` if one is not ready in time (the caller stops)."""
        for w in self.workers:
            w.task = asyncio.create_task(self._supervise(w), name=f"sip-worker-{w.index}")
        try:
            await asyncio.wait_for(
                asyncio.gather(*(w.ready_event.wait() for w in self.workers)),
                max(self.settings.sip_worker_ready_timeout, 0.2 * len(self.workers)),
            )
        except TimeoutError:
            errors = "; ".join(f"worker {w.index}: {w.last_error or 'not ready'}" for w in self.workers if not w.ready)
            raise RuntimeError(f"SIP workers did not start: {errors}") from None

    async def stop(self) -> None:
        """Ask every worker to quit (each hangs up its calls), kill the ones that linger."""
        self.stopping = True
        for w in self.workers:
            if w.ready:
                self.send(w.index, Quit())
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    await asyncio.wait_for(w.proc.wait(), 3.0)
                except TimeoutError:
                    w.proc.kill()
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
                try:
                    await w.task
                except (asyncio.CancelledError, Exception):
                    pass

    def kill_hung(self, now: float) -> None:
        """Kill ready workers silent for ``sip_hung_seconds`` (they report stats every second):
        stuck in C. Supervision restarts them; their calls end with ``media_failure``."""
        for w in self.workers:
            proc = w.proc
            silent = now - w.last_seen
            if w.ready and proc is not None and proc.returncode is None and silent > self.settings.sip_hung_seconds:
                log.error("sip worker %d silent for %.0fs: killing it", w.index, silent)
                w.hung_kills += 1
                w.last_seen = now
                proc.kill()

    # --- one worker's life -----------------------------------------------------------------
    async def _supervise(self, w: Worker) -> None:
        backoff = _FIRST_BACKOFF
        while not self.stopping:
            started = time.monotonic()
            try:
                await self._run(w)
            except asyncio.CancelledError:
                if w.proc is not None and w.proc.returncode is None:
                    w.proc.kill()
                raise
            except Exception as exc:
                w.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("sip worker %d failed", w.index)
            self._exited(w)
            if self.stopping:
                return
            w.restarts += 1
            backoff = _FIRST_BACKOFF if time.monotonic() - started > _HEALTHY_RUN else min(backoff * 2, _MAX_BACKOFF)
            log.warning("sip worker %d exited; restarting in %.1fs", w.index, backoff)
            await asyncio.sleep(backoff)

    async def _run(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        frm_parent, frm_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        frm_parent.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s = self.settings
        args = WorkerArgs(
            ctl_fd=ctl_child.fileno(), frame_fd=frm_child.fileno(), host="127.0.0.1", proxy=front_route(s), sip_port=w.sip_port,
            media_host=s.media_host, rtp_port=w.rtp_port, rtp_range=self.rtp_ports, max_calls=s.calls_per_worker,
            token_key=w.token_key, media_timeout=s.sip_media_timeout, ring_timeout=s.sip_ring_timeout,
            srtp=s.sip_srtp,
        )  # fmt: skip
        try:
            proc = w.proc = await self._spawn(args, ctl_child, frm_child)
        except BaseException:
            ctl_parent.close()
            frm_parent.close()
            raise
        w.pid = proc.pid
        w.last_seen = time.monotonic()
        log_task = asyncio.create_task(self._log(w, proc.stdout)) if proc.stdout is not None else None
        reader, writer = await asyncio.open_unix_connection(sock=ctl_parent, limit=1 << 20)
        w.writer = writer
        frames, _ = await loop.create_datagram_endpoint(self._frame_receiver, sock=frm_parent)
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, OSError):
                    break  # a worker exiting with unread input resets the socket: same as EOF
                if not line:
                    break
                try:
                    event = decode(line)
                    if not isinstance(event, Event):
                        raise ProtocolError(f"a command from a worker: {event.TYPE}")
                except ProtocolError as exc:
                    log.warning("sip worker %d: %s", w.index, exc)
                    continue
                try:
                    self._event(w, event)
                except Exception:
                    log.exception("sip worker %d: bad event %r", w.index, event)
        finally:
            writer.close()
            frames.close()
            if log_task is not None:
                log_task.cancel()
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 2.0)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    async def _log(self, w: Worker, stream: asyncio.StreamReader) -> None:
        """pjsua logs (errors only after start-up) go to our logger, not to a terminal."""
        while True:
            line = await stream.readline()
            if not line:
                return
            log.debug("sip worker %d: %s", w.index, line.decode(errors="replace").rstrip())

    def _event(self, w: Worker, event: Event) -> None:
        w.last_seen = time.monotonic()
        match event:
            case Ready():
                w.max_calls, w.pjsua2 = event.max_calls, event.pjsua2
                self._on_event(w.index, event)  # the owner sizes the worker before routing to it
                w.ready = True
                w.last_error = ""
                w.ready_event.set()
                log.info(
                    "sip worker %d ready (pid %s, port %s, %d calls, pjsua2 %s)",
                    w.index, event.pid, event.sip_port, event.max_calls, event.pjsua2 or "?",
                )  # fmt: skip
                if event.max_calls < BUILD_MAX_CALLS and not self.settings.calls_per_worker:
                    log.warning(
                        "sip worker %d holds only %d calls: pjsua2 %s is not the project's build "
                        "(scripts/setup.sh builds it; GATEWAY_PJSUA2=wheel keeps the PyPI wheel)",
                        w.index, event.max_calls, event.pjsua2 or "?",
                    )  # fmt: skip
            case Fatal():
                w.last_error = event.error
                log.error("sip worker %d fatal: %s", w.index, w.last_error)
            case Reply():
                fut = w.replies.pop(event.re, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            case Stats():
                w.frames, w.drops, w.refused = event.frames, event.drops, event.refused
                w.stats_us = event.stats_us
            case _:
                self._on_event(w.index, event)

    def _exited(self, w: Worker) -> None:
        was_ready, w.ready = w.ready, False
        w.ready_event = asyncio.Event() if was_ready else w.ready_event
        w.writer = None
        for fut in w.replies.values():
            if not fut.done():
                fut.set_exception(GatewayError(ErrorCode.MEDIA_FAILURE, "SIP media worker died"))
        w.replies.clear()
        self._on_exit(w.index)

    # --- commands --------------------------------------------------------------------------
    def send(self, index: int, command: Command) -> None:
        """Send without waiting (dropped if the worker is down: its exit is reported anyway)."""
        writer = self.workers[index].writer
        if writer is None:
            return
        try:
            writer.write(encode(command))
        except (ConnectionError, RuntimeError):
            pass

    async def request(self, index: int, command: Command) -> Reply:
        """Send and wait for the reply (``sip_command_timeout``; ``TimeoutError`` after that)."""
        w = self.workers[index]
        if w.writer is None or not w.ready:
            raise GatewayError(ErrorCode.MEDIA_FAILURE, "SIP media worker not ready")
        re = w.next_re
        w.next_re += 1
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        w.replies[re] = fut
        self.send(index, dataclasses.replace(command, re=re))
        try:
            return await asyncio.wait_for(fut, self.settings.sip_command_timeout)
        finally:
            w.replies.pop(re, None)
