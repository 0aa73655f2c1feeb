"""A local cluster on this machine without Docker: Redis + N gateway instances + Kamailio in
front of their SIP fronts, all on loopback (``make cluster``).

    python -m devtools.cluster [--instances 2] [--dir var/cluster] [--http-port 8080] [--sip-port 5060]

Instance 1 (``http://127.0.0.1:8080``) runs the embedded identity provider and the demo
platform, whose voice legs go to Kamailio (the cluster's one SIP address, ``127.0.0.1:5060``);
instance n listens on HTTP port 8080+n-1 and SIP port 5070+10·(n-1) and uses instance 1's
identity provider as its ``GATEWAY_KEYCLOAK_URL``. Every instance shares Redis (AOF,
``appendfsync always``). Ctrl-C stops everything; logs are under ``--dir``.

:class:`GatewayProcess` (``python -m gateway serve`` as a child process, settings as
``GATEWAY_*`` variables) is also what the Kamailio tests start.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devtools.kamailio import KamailioServer
from devtools.redis_server import RedisServer

PROJECT_DIR = Path(__file__).resolve().parent.parent


def port_free(port: int, kinds: tuple[int, ...] = (socket.SOCK_DGRAM, socket.SOCK_STREAM)) -> bool:
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:  # as servers bind: a port in TIME_WAIT is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_block(n: int, lo: int = 21000, hi: int = 32000) -> int:
    """First of ``n`` consecutive loopback ports free for UDP and TCP (by default below the
    kernel's ephemeral range, 32768 and up, where outgoing sockets could take them first)."""
    import random

    for _ in range(200):
        base = random.randrange(lo, hi - n)
        if all(port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports")


@dataclass
class GatewayProcess:
    """One gateway instance, ``python -m gateway serve``, in its own process group (its SIP
    workers die with it on :meth:`kill`, as on a crashed host)."""

    name: str
    directory: Path
    port: int
    sip_port: int
    settings: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sip_uri(self) -> str:
        return f"sip:127.0.0.1:{self.sip_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "gateway.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.update(
            {
                "GATEWAY_PORT": str(self.port),
                "GATEWAY_SIP_PORT": str(self.sip_port),
                "GATEWAY_DATA_DIR": str(self.directory / "var"),
            }
        )
        env.update(self.settings)
        return env

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                cwd=str(PROJECT_DIR),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"gateway {self.name} exited ({code}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def metric(self, stat: str, plane: str = "sip") -> float:
        """One ``gateway_plane_stat`` value from ``/metrics`` (e.g. ``front_invites``)."""
        with urllib.request.urlopen(f"{self.base_url}/metrics", timeout=2) as answer:
            text = answer.read().decode()
        needle = f'gateway_plane_stat{{plane="{plane}",stat="{stat}"}} '
        for line in text.splitlines():
            if line.startswith(needle):
                return float(line[len(needle) :])
        raise KeyError(stat)

    def terminate(self) -> None:
        """SIGTERM: the instance drains (SIP answers 503, OPTIONS too) and stops when idle."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the whole process group (the instance and its SIP workers): a crash."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
        except ProcessLookupError:
            pass
        process.wait()


def instance_settings(
    *,
    sip_workers: int = 1,
    calls_per_worker: int = 16,
    webrtc_processes: int = 0,
    rtp_port_base: int,
    redis_url: str = "",
    keycloak_url: str = "",
    instance_id: str = "",
    public_url: str = "",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``GATEWAY_*`` settings of one development instance behind Kamailio."""
    settings = {
        "GATEWAY_DEV": "true",
        "GATEWAY_SIP_WORKERS": str(sip_workers),
        "GATEWAY_CALLS_PER_WORKER": str(calls_per_worker),
        "GATEWAY_RTP_PORT_BASE": str(rtp_port_base),
        "GATEWAY_WEBRTC_PROCESSES": str(webrtc_processes),
        # Behind Kamailio every INVITE comes from Kamailio's address: it limits each platform (pike).
        "GATEWAY_SIP_INVITE_RATE": "0",
    }
    if redis_url:
        settings["GATEWAY_REDIS_URL"] = redis_url
    if keycloak_url:
        settings["GATEWAY_KEYCLOAK_URL"] = keycloak_url
    if instance_id:
        settings["GATEWAY_INSTANCE_ID"] = instance_id
    if public_url:
        settings["GATEWAY_PUBLIC_URL"] = public_url
    settings.update(extra or {})
    return settings


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=2, help="gateway instances (default 2)")
    parser.add_argument("--dir", type=Path, default=PROJECT_DIR / "var" / "cluster", help="data and logs")
    parser.add_argument("--http-port", type=int, default=8080, help="instance 1's HTTP port (n: +n-1)")
    parser.add_argument("--sip-port", type=int, default=5060, help="Kamailio's SIP port, the cluster's address")
    parser.add_argument("--no-demo", action="store_true", help="no demo platform on instance 1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    directory: Path = args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(directory / "redis")
    kamailio: KamailioServer | None = None
    gateways: list[GatewayProcess] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        redis.start()
        first = f"http://127.0.0.1:{args.http_port}"
        for n in range(1, args.instances + 1):
            port, sip_port = args.http_port + n - 1, args.sip_port + 10 * n
            busy = [p for p in (port, sip_port, sip_port + 1) if not port_free(p)]
            if busy:
                raise RuntimeError(f"ports {busy} are in use: pick others with --http-port / --sip-port")
            extra = {"GATEWAY_LOG_LEVEL": "INFO"}
            if n == 1 and not args.no_demo:
                # The demo platform's SIPREC legs go to the cluster's address, not to this instance.
                extra.update({"GATEWAY_DEMO": "true", "DEMO_SIP_TARGET": f"127.0.0.1:{args.sip_port}"})
            settings = instance_settings(
                rtp_port_base=20000 + 4000 * (n - 1),
                calls_per_worker=64,
                webrtc_processes=1,
                redis_url=redis.url,
                keycloak_url="" if n == 1 else first,  # instance 1's embedded identity provider
                instance_id=f"gw{n}",
                public_url=f"http://127.0.0.1:{port}",
                extra=extra,
            )
            gateways.append(GatewayProcess(f"gw{n}", directory / f"gw{n}", port, sip_port, settings))
        gateways[0].start()
        gateways[0].wait_ready()  # the others need its identity provider
        for gw in gateways[1:]:
            gw.start()
        for gw in gateways[1:]:
            gw.wait_ready()
        kamailio = KamailioServer(
            directory / "kamailio",
            [gw.sip_uri for gw in gateways],
            port=args.sip_port,
            ping_interval=2,
            fr_timer_ms=2000,
            pike_density=400,
            log_level=1,
        )
        kamailio.start()
        print(f"redis     {redis.url} (AOF, appendfsync always)")
        for gw in gateways:
            print(f"{gw.name:9} {gw.base_url}  SIP {gw.sip_uri}  log {gw.log_path}")
        print(f"kamailio  {kamailio.uri} (UDP and TCP): the cluster's SIP address  log {kamailio.log_path}")
        print(f"console   {gateways[0].base_url}/  (sam / demo); Ctrl-C stops the cluster")
        sys.stdout.flush()
        while not stop:
            for gw in gateways:
                if gw.process is not None and gw.process.poll() is not None:
                    print(f"{gw.name} exited ({gw.process.returncode}); see {gw.log_path}", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
        return 0
    except RuntimeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        # Every instance drains at once (the demo's BYEs still go through Kamailio), then the rest.
        for gw in gateways:
            gw.terminate()
        for gw in gateways:
            gw.stop(timeout=12)
        if kamailio is not None:
            kamailio.stop()
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
