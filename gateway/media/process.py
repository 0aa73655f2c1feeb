"""A WebRTC media process: ``python -m gateway.media.process --ctl-fd N --frame-path P``.

Started by :mod:`gateway.media.pool` (one per core by default). It answers the WHEP offers the
main process relays (:class:`~.ipc.Offer`) with :func:`~.whep.answer_whep` -- aiortc does SDP,
ICE and DTLS here -- and sends every listener's audio from one 20 ms tick
(:class:`~.batch.BatchSender`). The audio comes straight from the SIP workers: each worker
holding a conversation served here connects to the seqpacket socket at ``--frame-path`` and
sends its LegFrames (:class:`gateway.sip.protocol.SetTap` with ``to``); they are fanned out to
the listeners' taps by the SIP plane's own :class:`~gateway.sip.taps.TapFanout`. Levels, RTP a
browser sends anyway, sessions that end on their own and counters go back as
:mod:`~.ipc` events. Settings come from the ``GATEWAY_*`` environment the pool sets.

The process exits when its control socket closes (the main process is gone) or on
:class:`~.ipc.Quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import time

from ..config import Settings
from ..sip.protocol import ProtocolError
from ..sip.taps import TapFanout
from . import ipc
from .batch import BatchSender
from .track import FRAME_SECONDS
from .whep import WhepError, WhepSession, answer_whep

log = logging.getLogger("gateway.media.process")
#: Largest LegFrame datagram read (a 16 kHz frame with a long conversation id fits).
MAX_FRAME = 8192
#: How often levels and inbound-RTP counts are sent to the main process.
REPORT_SECONDS = 0.05


class MediaProcess:
    def __init__(self, settings: Settings, ctl: socket.socket, frame_path: str) -> None:
        self.settings = settings
        self.ctl = ctl
        self.frame_path = frame_path
        self.fanout = TapFanout(lambda cid, on: None)  # the main process switches the workers
        self.sessions: dict[str, WhepSession] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._levels: list[list[object]] = []
        self._inbound: dict[str, int] = {}
        self._connections: set[socket.socket] = set()
        self._read_at = 0.0
        self._done = asyncio.Event()

    # --- events to the main process ---------------------------------------------------------
    def emit(self, event: ipc.Event) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(ipc.encode(event))

    # --- LegFrames from the SIP workers ----------------------------------------------------
    def _listen(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        try:
            os.unlink(self.frame_path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(self.frame_path)
        server.listen(64)
        server.setblocking(False)
        loop.add_reader(server, self._accept, server)
        return server

    def _accept(self, server: socket.socket) -> None:
        """A worker connects (once per media process it sends to); it is read on the tick."""
        while True:
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self._connections.add(conn)

    def _read_frames(self) -> None:
        """Everything the workers sent since the last read. Runs at the start of each pass of
        the batched tick (and from :meth:`_read_loop` when that has not run for a while):
        the frames of a tick arrive in a burst, and one read of them costs less than a
        wake-up of the event loop per datagram."""
        self._read_at = time.monotonic()
        received = self.fanout.frame_received
        for conn in list(self._connections):
            while True:
                try:
                    data = conn.recv(MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError:
                    data = b""
                if not data:  # the worker closed it (no conversation of ours left, or it died)
                    self._connections.discard(conn)
                    conn.close()
                    break
                received(data)

    async def _read_loop(self) -> None:
        """Reads the frames when no batched tick does (no listener connected yet, or only
        listeners on aiortc's own sender: G.722, ``webrtc_batch`` off)."""
        while True:
            await asyncio.sleep(FRAME_SECONDS / 2)
            if time.monotonic() - self._read_at > FRAME_SECONDS / 2:
                self._read_frames()

    # --- commands --------------------------------------------------------------------------
    async def _offer(self, cmd: ipc.Offer) -> None:
        tap = self.fanout.open(cmd.cid, 50)
        sid = cmd.session

        def on_levels(agent: float, customer: float) -> None:
            self._levels.append([sid, agent, customer])

        def on_inbound_rtp(total: int) -> None:
            first = sid not in self._inbound and total == 1
            self._inbound[sid] = total
            if first:  # audited at once; later counts go with the next report
                self._report()

        try:
            sdp, session = await answer_whep(
                cmd.sdp,
                tap,
                settings=self.settings,
                stereo=cmd.stereo,
                codec=cmd.codec or None,
                on_levels=on_levels,
                on_inbound_rtp=on_inbound_rtp,
            )
        except WhepError as exc:
            self.emit(ipc.Reply(re=cmd.re, ok=False, code=exc.code, error=exc.message))
            return
        except Exception as exc:
            log.exception("answering an offer failed")
            tap.close()
            self.emit(ipc.Reply(re=cmd.re, ok=False, code="invalid_sdp", error=str(exc)))
            return
        session.id = sid
        self.sessions[sid] = session

        def ended(reason: str) -> None:
            if self.sessions.pop(sid, None) is not None:
                self.emit(ipc.Ended(session=sid, reason=reason))

        session.on_closed(ended)
        self.emit(ipc.Reply(re=cmd.re, ok=True, sdp=sdp))

    async def _close(self, sid: str, reason: str) -> None:
        session = self.sessions.pop(sid, None)  # popped first: no Ended for a close we were asked for
        if session is not None:
            await session.close(reason)

    async def _commands(self, reader: asyncio.StreamReader) -> None:
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: object) -> None:
            task = asyncio.ensure_future(coro)  # type: ignore[call-overload]
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        while True:
            try:
                line = await reader.readline()
            except ConnectionError:
                line = b""
            if not line:  # the main process is gone (or asked us to quit below)
                break
            try:
                cmd = ipc.decode(line)
            except ProtocolError:
                log.exception("bad control line")
                continue
            match cmd:
                case ipc.Offer():
                    spawn(self._offer(cmd))
                case ipc.Close():
                    spawn(self._close(cmd.session, cmd.reason))
                case ipc.Quit():
                    break
        for sid in list(self.sessions):
            await self._close(sid, "shutdown")

    # --- reports ---------------------------------------------------------------------------
    def _report(self) -> None:
        if self._levels:
            self.emit(ipc.Levels(items=self._levels))
            self._levels = []
        if self._inbound:
            for sid, total in self._inbound.items():
                self.emit(ipc.InboundRtp(session=sid, total=total))
            self._inbound = {}

    async def _reports(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(REPORT_SECONDS)
            self._report()
            n += 1
            if n % int(1 / REPORT_SECONDS) == 0:
                self.emit(self._stats())
                if self.sessions:
                    transit = [[sid, *s.transit()] for sid, s in self.sessions.items()]
                    self.emit(ipc.Transit(items=transit))

    def _stats(self) -> ipc.Stats:
        sender = BatchSender.instance()
        stats = [s.stats for s in self.sessions.values()]
        return ipc.Stats(
            listeners=len(self.sessions),
            connected=sum(s.state == "connected" for s in self.sessions.values()),
            ticks=sender.ticks,
            lagged_ticks=sender.lagged_ticks,
            max_lag_ms=round(sender.max_lag * 1000, 1),
            phase_shifts=sender.phase_shifts,
            frames_in=sum(s.frames_in for s in stats),
            frames_out=sum(s.frames_out for s in stats),
            underruns=sum(s.underruns for s in stats),
            dropped=sum(s.dropped for s in stats),
            resyncs=sum(s.resyncs for s in stats),
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        server = self._listen(loop)
        reader, self._writer = await asyncio.open_unix_connection(sock=self.ctl)
        self.emit(ipc.Ready(pid=os.getpid(), frame_path=self.frame_path))
        reports = asyncio.create_task(self._reports())
        reads = asyncio.create_task(self._read_loop())
        BatchSender.instance().before_tick.append(self._read_frames)
        try:
            await self._commands(reader)
        finally:
            reports.cancel()
            reads.cancel()
            loop.remove_reader(server)
            server.close()
            for conn in self._connections:
                conn.close()
            try:
                os.unlink(self.frame_path)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A WebRTC media process (started by the gateway).")
    parser.add_argument("--ctl-fd", type=int, required=True)
    parser.add_argument("--frame-path", required=True)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr, format="media %(process)d %(message)s")
    ctl = socket.socket(fileno=args.ctl_fd)
    try:
        asyncio.run(MediaProcess(settings, ctl, args.frame_path).run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
