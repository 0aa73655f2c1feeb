"""Live voice for the ``make run`` demo: SIPREC calls from fixture speech, looping forever.

``DemoLegs(settings, cids)`` gives each listed conversation its two legs (agent, customer)
the way a contact-centre platform would: a SIPREC recording client sends one call per
conversation to the gateway's SIP front (``settings.sip_host:settings.sip_port``), the agent
stream playing ``fixtures/audio/agent_speech.wav`` and the customer stream
``customer_speech.wav``, each in a loop. ``DEMO_SIP_TARGET=host:port`` sends them elsewhere
(the local cluster, ``devtools/cluster.py``: to Kamailio, the cluster's SIP address).

The client is ``python -m devtools.siprec_source`` (pjsua2 lives only in child processes: a
per-process singleton capped at 4 calls, and a C assert kills the whole process), one per
group of at most 4 conversations. It re-dials a call the gateway ended (a leg hung up, a
restart of the worker, a 503 while the workers come up) by itself, 1 s later, backing off
to 10 s while it keeps failing. ``DemoLegs`` supervises the processes: a process that exits
or crashes is started again (1 s, doubling to 30 s; back to 1 s after 30 s of good health).
Nothing here raises into the gateway: every failure is logged. ``stop()`` sends SIGTERM
(BYE on every call) to each process group (``start_new_session``), then SIGKILL after 3 s;
a process whose gateway vanished without ``stop()`` exits on its own (``--parent-pid``).

``on_demand=True`` plays a platform that forks only while a supervisor listens: the processes
start idle (``siprec_source --on-demand``) and :meth:`DemoLegs.fork` dials or hangs up one
conversation's call (``DIAL``/``HANGUP`` on the process's stdin); a restarted process dials
again what is wanted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from gateway.config import PROJECT_DIR, Settings
from gateway.sip.supervisor import rtp_ports_per_worker

log = logging.getLogger(__name__)

AUDIO_DIR = PROJECT_DIR / "fixtures" / "audio"
PER_PROCESS = 4  # SIPREC: one call per conversation; pjsua2: 4 calls per process
PORTS_PER_PROCESS = 40  # SIP port, then RTP from port+2 (8 per call)
REDIAL_SECONDS = 1.0
PROBE_SECONDS = 2.0  # in-dialog OPTIONS: notices a gateway worker that died without BYE
RESTART_MAX_SECONDS = 30.0
STOP_GRACE_SECONDS = 3.0


def _default_agents() -> dict[str, str]:
    from devtools.demo import CONVERSATIONS

    return {c.id: c.agent for c in CONVERSATIONS}


def _udp_block_free(host: str, base: int, n: int) -> bool:
    for port in range(base, base + n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


class DemoLegs:
    """SIPREC voice legs for demo conversations, supervised child processes."""

    def __init__(
        self,
        settings: Settings,
        cids: Iterable[str],
        agents: Mapping[str, str] | None = None,
        *,
        agent_wav: Path | None = None,
        customer_wav: Path | None = None,
        on_demand: bool = False,
    ) -> None:
        self.settings = settings
        self.cids = list(dict.fromkeys(cids))
        self._agents = dict(agents) if agents is not None else None
        self.agent_wav = agent_wav or AUDIO_DIR / "agent_speech.wav"
        self.customer_wav = customer_wav or AUDIO_DIR / "customer_speech.wav"
        self.connected: set[str] = set()  # conversations whose call has media up right now
        self.restarts = 0
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.on_demand = on_demand
        #: on_demand: conversations whose fork is wanted now, and the process index of each
        self.wanted: set[str] = set()
        self._index_of: dict[str, int] = {}

    @property
    def target(self) -> str:
        """Where the legs go: the gateway's SIP front, or ``DEMO_SIP_TARGET`` (a cluster's address)."""
        return os.environ.get("DEMO_SIP_TARGET") or f"{self.settings.sip_host}:{self.settings.sip_port}"

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Start one supervised source process per group of up to 4 conversations. Never raises."""
        try:
            if importlib.util.find_spec("pjsua2") is None:
                log.warning("demo voice: pjsua2 is not installed; the demo conversations get no audio")
                return
            agents = self._agents if self._agents is not None else _default_agents()
            convs: list[tuple[str, str]] = []
            for cid in self.cids:
                agent = agents.get(cid)
                if agent is None:
                    log.warning("demo voice: no agent known for %s; it gets no audio", cid)
                else:
                    convs.append((cid, agent))
            for i in range(0, len(convs), PER_PROCESS):
                group = convs[i : i + PER_PROCESS]
                for cid, _ in group:
                    self._index_of[cid] = i // PER_PROCESS
                self._tasks.append(
                    asyncio.create_task(self._supervise(i // PER_PROCESS, group), name=f"demo-legs-{i // PER_PROCESS}")
                )
            if convs:
                log.info("demo voice: SIPREC legs for %s -> %s", ", ".join(c for c, _ in convs), self.target)
        except Exception:
            log.exception("demo voice: could not start")

    async def stop(self) -> None:
        """BYE and end every source process (its whole process group); idempotent."""
        self._stopping = True
        procs = list(self._procs.values())
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE_SECONDS)
        for proc in procs:
            if proc.returncode is None:
                self._signal(proc, signal.SIGKILL)
                try:
                    await asyncio.wait_for(proc.wait(), 2.0)
                except TimeoutError:
                    log.warning("demo voice: source %d did not die", proc.pid)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._procs.clear()
        self.connected.clear()

    def fork(self, cid: str, on: bool) -> None:
        """on_demand: start (``on``) or stop forking ``cid``'s voice. Never raises."""
        (self.wanted.add if on else self.wanted.discard)(cid)
        index = self._index_of.get(cid)
        proc = self._procs.get(index) if index is not None else None
        if proc is None or proc.returncode is not None:
            return  # (re)started processes dial what is wanted
        self._command(proc, f"{'DIAL' if on else 'HANGUP'} {cid}")

    @staticmethod
    def _command(proc: asyncio.subprocess.Process, line: str) -> None:
        if proc.stdin is None or proc.stdin.is_closing():
            return
        try:
            proc.stdin.write(line.encode() + b"\n")
        except (ConnectionError, RuntimeError) as exc:
            log.warning("demo voice: could not send %r: %s", line, exc)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # its own session: the group is the source and nothing else of ours
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _port_block(self) -> int:
        s = self.settings
        avoid = [
            (s.sip_port, s.sip_port + s.sip_workers + 1),
            (s.sip_worker_base_port or s.sip_port + 1, (s.sip_worker_base_port or s.sip_port + 1) + s.sip_workers),
            (s.rtp_port_base, s.rtp_port_base + rtp_ports_per_worker(s) * s.sip_workers),
        ]
        for _ in range(200):
            base = random.randrange(40000, 59000 - PORTS_PER_PROCESS)
            if any(base < hi and base + PORTS_PER_PROCESS > lo for lo, hi in avoid):
                continue
            if _udp_block_free(s.sip_host, base, PORTS_PER_PROCESS):
                return base
        raise OSError("no free UDP port block for a demo voice source")

    async def _supervise(self, index: int, group: list[tuple[str, str]]) -> None:
        backoff = REDIAL_SECONDS
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run_once(index, group)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("demo voice: source %d failed: %s: %s", index, type(exc).__name__, exc)
            for cid, _ in group:
                self.connected.discard(cid)
            if self._stopping:
                return
            self.restarts += 1
            backoff = REDIAL_SECONDS if time.monotonic() - started > 30 else min(backoff * 2, RESTART_MAX_SECONDS)
            log.warning("demo voice: source %d exited; restarting in %.0fs", index, backoff)
            await asyncio.sleep(backoff)

    async def _run_once(self, index: int, group: list[tuple[str, str]]) -> None:
        s = self.settings
        port = self._port_block()
        args = [
            sys.executable, "-m", "devtools.siprec_source", "--front", self.target, "--host", s.sip_host,
            "--port", str(port), "--agent-wav", str(self.agent_wav), "--customer-wav", str(self.customer_wav),
            "--redial", str(REDIAL_SECONDS), "--probe", str(PROBE_SECONDS), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        for cid, agent in group:
            args += ["--conv", f"{cid}:{agent}"]
        if self.on_demand:
            args.append("--on-demand")
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE if self.on_demand else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env=env, cwd=str(PROJECT_DIR), start_new_session=True,
        )  # fmt: skip
        self._procs[index] = proc
        if self._stopping:  # stop() ran while we were spawning
            self._signal(proc, signal.SIGTERM)
        for cid, _ in group:
            if cid in self.wanted:
                self._command(proc, f"DIAL {cid}")
        try:
            assert proc.stdout is not None
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                words = line.decode(errors="replace").split()
                if len(words) < 2 or not words[0].isupper():
                    continue
                event, cid = words[0], words[-1]
                if event == "CONNECTED":
                    if cid not in self.connected:
                        log.info("demo voice: %s connected", cid)
                    self.connected.add(cid)
                elif event == "DISCONNECTED":
                    if cid in self.connected and self.on_demand and cid not in self.wanted:
                        log.info("demo voice: %s hung up (fork released)", cid)
                    elif cid in self.connected:
                        log.info("demo voice: %s disconnected (%s); re-dialling", cid, words[1])
                    self.connected.discard(cid)
            rc = await proc.wait()
            if not self._stopping:
                log.warning("demo voice: source %d (pid %d) exited with %s", index, proc.pid, rc)
        finally:
            if proc.returncode is None:  # cancelled: never leave it behind
                self._signal(proc, signal.SIGKILL)
                try:
                    await asyncio.wait_for(proc.wait(), 2.0)
                except (TimeoutError, asyncio.CancelledError):
                    pass
