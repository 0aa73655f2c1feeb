"""Start a real Kamailio (the cluster's SIP address, ``deploy/kamailio/kamailio.cfg``) on a free
loopback port in front of some gateway instances, for tests and the local cluster.

    from devtools.kamailio import start_kamailio

    with start_kamailio(tmp_dir, destinations=["sip:127.0.0.1:5071", "sip:127.0.0.1:5072"]) as k:
        k.port                      # Kamailio's SIP port on 127.0.0.1 (UDP and TCP)
        k.uri                       # "sip:127.0.0.1:<port>"
        k.states()                  # {"sip:127.0.0.1:5071": "AP", ...}: A active, I inactive, P probed
        k.destination_for("conv-1") # the instance a new INVITE with X-Conversation-ID conv-1 goes to
        k.wait_state("sip:127.0.0.1:5071", "I")   # until the probes took it out

    start_kamailio(tmp_dir, destinations=[...], tls_cert=cert_pem, tls_key=key_pem)  # + k.tls_port

It runs the repository's configuration itself (not a copy), parametrised by the
``KAMAILIO_*`` environment variables that the configuration documents, in the foreground
(``-DD -E``) as a child process; its log goes to ``<dir>/kamailio.log``. A missing
``kamailio`` is an error naming the package to install, never a skip.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "kamailio" / "kamailio.cfg"
INSTALL_HINT = "kamailio is not installed: apt-get install -y kamailio (or scripts/setup.sh test)"
TLS_HINT = "Kamailio's tls module is not installed: apt-get install -y kamailio-tls-modules (or scripts/setup.sh test)"
MODULES = Path("/usr/lib/x86_64-linux-gnu/kamailio/modules")
#: The dispatcher set of the gateway instances in kamailio.cfg.
GATEWAYS_SET = 1


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if os.access(p, os.X_OK)), None)
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def _has_module(name: str) -> bool:
    """Whether Kamailio's module ``name`` is installed (Debian ships some in other packages)."""
    info = subprocess.run([_tool("kamailio"), "-I"], capture_output=True, text=True, timeout=10, check=False).stdout
    match = re.search(r"Default paths to modules:\s*(\S+)", info)
    return any((Path(d) / f"{name}.so").is_file() for d in (match.group(1) if match else str(MODULES)).split(":"))


def _port_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_sip_port() -> int:
    """A loopback port free for both UDP and TCP."""
    # Below the kernel's ephemeral range (32768 and up), where bind(0) would pick: an outgoing
    # socket could take such a port before Kamailio binds it.
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if _port_free(port):
            return port
    raise RuntimeError("no loopback port free for UDP and TCP")


def write_dispatcher_list(path: Path, destinations: Sequence[str]) -> None:
    """The dispatcher list file: every destination in set 1 (the gateway instances)."""
    lines = ["# setid destination (kamailio.cfg: set 1 = the gateway instances)"]
    lines += [f"{GATEWAYS_SET} {uri}" for uri in destinations]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class KamailioServer:
    directory: Path
    destinations: list[str]
    port: int = field(default_factory=free_sip_port)
    #: Seconds between two OPTIONS probes of an instance (deploy default 5).
    ping_interval: int = 1
    #: Milliseconds an instance has to answer (anything) before the next one is tried.
    fr_timer_ms: int = 1500
    #: Requests per 2 s one source address may send (tests send everything from 127.0.0.1).
    pike_density: int = 10000
    children: int = 2
    log_level: int = 0
    #: SIP over TLS for platforms: certificate (chain) and key, PEM; ``tls_port`` is then a free port.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "kamailio.log"

    @property
    def ctl(self) -> str:
        return f"unix:{self.directory / 'ctl.sock'}"

    def env(self) -> dict[str, str]:
        """The settings kamailio.cfg reads (see its header)."""
        return {
            "KAMAILIO_LISTEN": "127.0.0.1",
            "KAMAILIO_SIP_PORT": str(self.port),
            "KAMAILIO_DISPATCHER_LIST": str(self.directory / "dispatcher.list"),
            "KAMAILIO_PING_INTERVAL": str(self.ping_interval),
            "KAMAILIO_FR_TIMER": str(self.fr_timer_ms),
            "KAMAILIO_PIKE_DENSITY": str(self.pike_density),
            "KAMAILIO_CHILDREN": str(self.children),
            "KAMAILIO_LOG_LEVEL": str(self.log_level),
            "KAMAILIO_CTL": self.ctl,
        } | (
            {
                "KAMAILIO_TLS_PORT": str(self.tls_port),
                "KAMAILIO_TLS_CERT": str(self.tls_cert),
                "KAMAILIO_TLS_KEY": str(self.tls_key),
            }
            if self.tls_port
            else {}
        )

    def start(self, timeout: float = 10.0) -> None:
        binary = _tool("kamailio")
        if self.tls_cert is not None:
            if not _has_module("tls"):
                raise RuntimeError(TLS_HINT)
            self.tls_port = self.tls_port or free_sip_port()
        self.directory.mkdir(parents=True, exist_ok=True)
        write_dispatcher_list(self.directory / "dispatcher.list", self.destinations)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAMAILIO_")}
        env.update(self.env())
        args = [binary, "-f", str(CONFIG), "-DD", "-E", "-Y", str(self.directory), "-m", "64", "-M", "8"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kamailio exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.options() and (self.directory / "ctl.sock").exists():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"kamailio did not answer OPTIONS on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def options(self, timeout: float = 0.5) -> int:
        """Status of Kamailio's own answer to an OPTIONS over UDP (0: none): 200 while some
        instance is up, 503 while none is."""
        call_id = uuid.uuid4().hex
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(timeout)
            local = sock.getsockname()[1]
            request = (
                f"OPTIONS {self.uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{local};branch=z9hG4bK{call_id[:12]};rport\r\n"
                f"From: <sip:probe@127.0.0.1:{local}>;tag={call_id[:8]}\r\n"
                f"To: <{self.uri}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
                "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            )
            try:
                sock.sendto(request.encode(), ("127.0.0.1", self.port))
                data = sock.recv(65535)
            except OSError:
                return 0
        match = re.match(rb"SIP/2\.0 (\d{3})", data)
        return int(match.group(1)) if match else 0

    def rpc(self, *args: str, timeout: float = 5.0) -> str:
        """A control command (``kamcmd``) on this Kamailio's socket; its text output."""
        out = subprocess.run(
            [_tool("kamcmd"), "-s", self.ctl, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"kamcmd {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def _listed(self) -> list[tuple[str, str]]:
        """The gateway set's destinations in dispatcher order (the order hashing indexes)."""
        text = self.rpc("dispatcher.list")
        return re.findall(r"URI:\s*(\S+)\s*\n\s*FLAGS:\s*(\S+)", text)

    def states(self) -> dict[str, str]:
        """Each destination's dispatcher flags: ``AP`` active and probed, ``IP`` inactive
        (a probe failed or it timed out), ``TP`` trying."""
        return dict(self._listed())

    def wait_state(self, uri: str, state: str, timeout: float = 10.0) -> None:
        """Wait until ``uri``'s flags start with ``state`` (``"A"`` or ``"I"``)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.states().get(uri, "")
            if now.startswith(state):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{uri} is {now!r}, not {state!r}, after {timeout}s: {self.states()}")
            time.sleep(0.1)

    def destination_for(self, key: str) -> str:
        """The destination the hash of ``key`` (an X-Conversation-ID, else a Call-ID) picks when
        every destination is up (an inactive one passes its INVITEs to the next in this order)."""
        listed = self._listed()
        text = self.rpc("dispatcher.hash", str(len(listed)), key)
        match = re.search(r"slot:\s*(\d+)", text)
        if match is None:
            raise RuntimeError(f"dispatcher.hash answered {text!r}")
        return listed[int(match.group(1))][0]

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def start_kamailio(
    directory: Path,
    *,
    destinations: Sequence[str],
    port: int = 0,
    ping_interval: int = 1,
    fr_timer_ms: int = 1500,
    pike_density: int = 10000,
    log_level: int = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> Iterator[KamailioServer]:
    """Kamailio on 127.0.0.1 (``port``, or a free one), dispatching to ``destinations``; with
    ``tls_cert`` and ``tls_key`` also SIP over TLS on ``k.tls_port``."""
    server = KamailioServer(
        directory,
        list(destinations),
        ping_interval=ping_interval,
        fr_timer_ms=fr_timer_ms,
        pike_density=pike_density,
        log_level=log_level,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    if port:
        server.port = port
    server.start()
    try:
        yield server
    finally:
        server.stop()
