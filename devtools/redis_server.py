"""Start a real ``redis-server`` on a free loopback port, in a temporary directory, for tests
and benchmarks.

    from devtools.redis_server import start_redis

    with start_redis(tmp_dir) as server:
        server.url        # redis://127.0.0.1:<port>/0
        server.restart()  # stop (SIGTERM, or kill=True for SIGKILL) and start again on the same port

The server runs with the persistence the gateway's Redis mode needs (``appendonly yes``,
``appendfsync always``: an acknowledged write is fsynced, see README "Redis"). A missing
``redis-server`` is an error naming the package to install, never a skip.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "redis-server is not installed: apt-get install -y redis-server (or scripts/setup.sh test)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    directory: Path
    port: int = field(default_factory=_free_port)
    appendfsync: str = "always"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            if self._pong():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, *, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop and start again on the same port and directory (the AOF is reloaded)."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()


@contextmanager
def start_redis(directory: Path, *, appendfsync: str = "always") -> Iterator[RedisServer]:
    server = RedisServer(directory, appendfsync=appendfsync)
    server.start()
    try:
        yield server
    finally:
        server.stop()
