"""The WebRTC media processes, seen from the main process.

``Settings.webrtc_processes`` processes (``python -m gateway.media.process``; default one per
core) each answer the WHEP offers handed to them and send their listeners' audio. The main
process keeps the control: the WHEP route, the monitor's lifecycle, levels on the event bus and
the audit. Per offer :meth:`MediaProcesses.answer` picks the least-loaded process (a second
listener of a conversation goes where the first is, so its worker sends each frame once per
process), relays the offer over the control socket (:mod:`.ipc`) and has the SIP plane tell the
worker holding the conversation to send the LegFrames straight to that process's socket
(``forward(cid, path, on)``: ``SipPlane.forward_frames``). It returns a
:class:`RemoteListener`, the ``Listener`` the API keeps (``gateway/planes.py``).

A media process that dies ends its listeners (``media_failure``) and is started again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..config import Settings
from ..sip.protocol import ProtocolError
from . import ipc
from .levels import LevelsCallback
from .whep import InboundRtpCallback, WhepError

log = logging.getLogger(__name__)

#: forward(cid, path, on): the SIP plane's ``forward_frames``.
Forward = Callable[[str, str, bool], None]
PROJECT_DIR = Path(__file__).resolve().parents[2]
#: Seconds a media process may take to come up, and to answer an offer.
READY_TIMEOUT = 30.0
ANSWER_TIMEOUT = 10.0
RESTART_DELAY = 0.5


class RemoteListener:
    """One browser listening through a media process (the API's ``Listener``)."""

    def __init__(self, pool: MediaProcesses, proc: MediaProcess, cid: str, session_id: str) -> None:
        self.id = session_id
        self.conversation = cid
        self.close_reason: str | None = None
        self.inbound_rtp_packets = 0
        self._pool = pool
        self._proc = proc
        self._callbacks: list[Callable[[str], Any]] = []
        self.on_levels: LevelsCallback | None = None
        self.on_inbound_rtp: InboundRtpCallback | None = None
        self._transit: tuple[float, int] = (0.0, 0)

    def transit(self) -> tuple[float, int]:
        """As :meth:`gateway.media.whep.WhepSession.transit`, reported by its media process each second."""
        return self._transit

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    def on_closed(self, callback: Callable[[str], Any]) -> None:
        if self.close_reason is not None:
            callback(self.close_reason)
        else:
            self._callbacks.append(callback)

    async def close(self, reason: str = "deleted") -> None:
        """Close it in its media process (without waiting for it) and here; idempotent."""
        if self.close_reason is None:
            self._proc.send(ipc.Close(session=self.id, reason=reason))
        await self._ended(reason)

    async def _ended(self, reason: str) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._pool._release(self)
        for cb in self._callbacks:
            try:
                res = cb(reason)
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("on_closed callback failed")
        self._callbacks.clear()


class MediaProcess:
    """One media process slot (its process is replaced when it dies)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frame_path = ""
        self.listeners: dict[str, RemoteListener] = {}
        #: conversation -> listeners of it here (frames are forwarded while > 0)
        self.conversations: dict[str, int] = {}
        self.replies: dict[int, asyncio.Future[ipc.Reply]] = {}
        self.stats: ipc.Stats | None = None
        self.restarts = 0

    @property
    def up(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def send(self, command: ipc.Command) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(ipc.encode(command))


class MediaProcesses:
    """``settings.webrtc_processes`` media processes and the listeners they serve (see the
    module docstring); ``forward`` is the SIP plane's ``forward_frames``."""

    def __init__(self, settings: Settings, forward: Forward) -> None:
        self.settings = settings
        self._forward = forward
        self.processes = [MediaProcess(i) for i in range(max(0, settings.webrtc_processes))]
        # mode 0700: only the gateway's own user can connect to the frame sockets in it
        self._dir = tempfile.mkdtemp(prefix="gateway-media-")
        self._re = itertools.count(1)
        self._generation = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every media process; raises ``RuntimeError`` if one is not up in time."""
        ready = [asyncio.get_running_loop().create_future() for _ in self.processes]
        for proc, fut in zip(self.processes, ready, strict=True):
            await self._spawn(proc, fut)
        try:
            await asyncio.wait_for(asyncio.gather(*ready), READY_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise RuntimeError("the WebRTC media processes did not come up") from None

    async def stop(self) -> None:
        self._stopping = True
        for proc in self.processes:
            proc.send(ipc.Quit())
        for proc in self.processes:
            if proc.proc is not None:
                try:
                    await asyncio.wait_for(proc.proc.wait(), 5)
                except TimeoutError:
                    proc.proc.kill()
                    await proc.proc.wait()
        for task in list(self._tasks):
            task.cancel()
        for proc in self.processes:
            for listener in list(proc.listeners.values()):
                await listener._ended("shutdown")
        shutil.rmtree(self._dir, ignore_errors=True)  # a killed process leaves its socket

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for f in fields(Settings):
            if f.name.startswith(("webrtc_", "ice_")) or f.name == "log_level":
                value = getattr(self.settings, f.name)
                env[f"GATEWAY_{f.name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    async def _spawn(self, proc: MediaProcess, ready: asyncio.Future[None] | None = None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(self._dir, f"m{proc.index}-{next(self._generation)}.sock")
        try:
            proc.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.media.process", "--ctl-fd", str(child.fileno()), "--frame-path", path,
                pass_fds=(child.fileno(),), env=self._env(), stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            child.close()
        reader, proc.writer = await asyncio.open_unix_connection(sock=parent)
        task = asyncio.create_task(self._read(proc, reader, ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, proc: MediaProcess, reader: asyncio.StreamReader, ready: asyncio.Future[None] | None) -> None:
        try:
            while line := await reader.readline():
                try:
                    event = ipc.decode(line)
                except ProtocolError:
                    log.exception("bad line from media process %d", proc.index)
                    continue
                if isinstance(event, ipc.Ready):
                    proc.frame_path = event.frame_path
                    if ready is not None and not ready.done():
                        ready.set_result(None)
                elif isinstance(event, ipc.Event):
                    await self._event(proc, event)
        finally:
            await self._gone(proc)

    async def _event(self, proc: MediaProcess, event: ipc.Event) -> None:
        match event:
            case ipc.Reply():
                fut = proc.replies.pop(event.re, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            case ipc.Levels():
                for sid, agent, customer in event.items:
                    listener = proc.listeners.get(sid)
                    if listener is not None and listener.on_levels is not None:
                        listener.on_levels(agent, customer)
            case ipc.InboundRtp():
                listener = proc.listeners.get(event.session)
                if listener is not None and event.total > listener.inbound_rtp_packets:
                    before, listener.inbound_rtp_packets = listener.inbound_rtp_packets, event.total
                    if listener.on_inbound_rtp is not None:
                        # once per packet, as in-process: a counter and the first one's audit
                        for total in range(before + 1, event.total + 1):
                            listener.on_inbound_rtp(total)
            case ipc.Ended():
                listener = proc.listeners.get(event.session)
                if listener is not None:
                    await listener._ended(event.reason)
            case ipc.Stats():
                proc.stats = event
            case ipc.Transit():
                for sid, seconds, frames in event.items:
                    listener = proc.listeners.get(sid)
                    if listener is not None:
                        listener._transit = (float(seconds), int(frames))

    async def _gone(self, proc: MediaProcess) -> None:
        """The process exited (or its control socket broke): its listeners end; start another."""
        if proc.writer is not None:
            proc.writer.close()
        proc.writer = None
        for fut in proc.replies.values():
            if not fut.done():
                fut.set_exception(ConnectionError("media process gone"))
        proc.replies.clear()
        for listener in list(proc.listeners.values()):
            await listener._ended("media_failure")
        proc.frame_path = ""  # not picked again before the new process is Ready
        if self._stopping:  # stop() waits for it to exit
            return
        if proc.proc is not None and proc.proc.returncode is None:
            proc.proc.kill()
            await proc.proc.wait()
        log.error("media process %d exited (%s); restarting", proc.index, proc.proc and proc.proc.returncode)
        proc.restarts += 1
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(proc)

    # --- listeners -------------------------------------------------------------------------
    def _pick(self, cid: str) -> MediaProcess:
        live = [p for p in self.processes if p.up and p.frame_path]
        if not live:
            raise ConnectionError("no media process is up")
        for p in live:
            if cid in p.conversations:
                return p
        return min(live, key=lambda p: len(p.listeners))

    async def answer(
        self,
        offer_sdp: str,
        cid: str,
        *,
        stereo: bool,
        on_levels: LevelsCallback | None = None,
        on_inbound_rtp: InboundRtpCallback | None = None,
        codec: str | None = None,
    ) -> tuple[str, RemoteListener]:
        """Answer a WHEP offer in a media process; raises :class:`WhepError` as ``answer_whep`` does."""
        proc = self._pick(cid)
        listener = RemoteListener(self, proc, cid, uuid.uuid4().hex)
        listener.on_levels, listener.on_inbound_rtp = on_levels, on_inbound_rtp
        # Counted (and forwarded) before the offer goes out: the frames are flowing by the
        # time the listener connects.
        proc.listeners[listener.id] = listener
        if proc.conversations.get(cid, 0) == 0:
            self._forward(cid, proc.frame_path, True)
        proc.conversations[cid] = proc.conversations.get(cid, 0) + 1
        re = next(self._re)
        fut: asyncio.Future[ipc.Reply] = asyncio.get_running_loop().create_future()
        proc.replies[re] = fut
        proc.send(ipc.Offer(re=re, session=listener.id, cid=cid, sdp=offer_sdp, stereo=stereo, codec=codec or ""))
        try:
            reply = await asyncio.wait_for(fut, ANSWER_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            proc.replies.pop(re, None)
            await listener.close("failed")
            raise ConnectionError(f"media process {proc.index} did not answer the offer") from exc
        if not reply.ok:
            await listener._ended("rejected")
            raise WhepError(reply.code or "invalid_sdp", reply.error)
        return reply.sdp, listener

    def _release(self, listener: RemoteListener) -> None:
        proc = listener._proc
        if proc.listeners.pop(listener.id, None) is None:
            return
        cid = listener.conversation
        left = proc.conversations.get(cid, 0) - 1
        if left > 0:
            proc.conversations[cid] = left
            return
        proc.conversations.pop(cid, None)
        if proc.frame_path:
            self._forward(cid, proc.frame_path, False)

    def stats(self) -> dict[str, float]:
        """Gauges for Prometheus: listeners, media process restarts, late ticks."""
        stats = [p.stats for p in self.processes if p.stats is not None]
        return {
            "media_processes": float(sum(p.up for p in self.processes)),
            "media_process_restarts": float(sum(p.restarts for p in self.processes)),
            "webrtc_listeners": float(sum(len(p.listeners) for p in self.processes)),
            "webrtc_ticks_lagged": float(sum(s.lagged_ticks for s in stats)),
            "webrtc_underruns": float(sum(s.underruns for s in stats)),
            "webrtc_frames_dropped": float(sum(s.dropped for s in stats)),
        }
