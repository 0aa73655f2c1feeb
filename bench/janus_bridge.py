"""Janus AudioBridge on loopback, as the bench's anchor (Debian ``janus``).

``JanusServer`` writes a configuration into a temporary directory (HTTP API on 127.0.0.1 at a
port of its own, only the AudioBridge plugin and the HTTP transport loaded, no STUN, plain-RTP
ports in a range the bench chose) and runs ``janus`` with it. ``JanusApi`` speaks its HTTP API:
one session, long-polled for asynchronous plugin events. Per call the bench makes a room
(8 kHz mixing, plain-RTP participants allowed), joins two plain-RTP PCMU participants (agent and
customer, sending from the ports the generator binds) and forwards the room's mix as PCMU to the
conversation's sink port: the same two legs in and one mixed stream out as the gateway's
SIPREC call with a supervisor phone.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from rtpload import die_with_parent

JANUS_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")
INSTALL_HINT = "Janus is not installed: apt-get install -y janus (or scripts/setup.sh bench)"


def janus_binary() -> str:
    path = shutil.which("janus")
    if path is None:
        raise SystemExit(INSTALL_HINT)
    return path


def janus_version() -> str:
    out = subprocess.run([janus_binary(), "--version"], capture_output=True, text=True).stdout
    return next((line.split("(")[-1].rstrip(")") for line in out.splitlines() if "version" in line), "?")


def _lib_dir() -> Path:
    """Where Debian put the plugins (multiarch path, found from the package's file list)."""
    if (JANUS_LIB / "plugins").is_dir():
        return JANUS_LIB
    out = subprocess.run(["dpkg", "-L", "janus"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.endswith("/janus/plugins"):
            return Path(line).parent
    raise SystemExit(INSTALL_HINT)


class JanusServer:
    def __init__(self, workdir: Path, http_port: int, rtp_range: tuple[int, int]) -> None:
        self.dir = workdir / "janus"
        self.http_port = http_port
        self.rtp_range = rtp_range
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/janus"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        lib = _lib_dir()

        def others(kind: str, keep: str) -> str:
            return ",".join(sorted(p.name for p in (lib / kind).glob("*.so") if p.name != keep))

        (self.dir / "janus.jcfg").write_text(
            f"""general: {{
    configs_folder = "{self.dir}"
    plugins_folder = "{lib / "plugins"}"
    transports_folder = "{lib / "transports"}"
    events_folder = "{lib / "events"}"
    loggers_folder = "{lib / "loggers"}"
    debug_level = 2
    session_timeout = 0
}}
media: {{
    rtp_port_range = "{self.rtp_range[0]}-{self.rtp_range[1]}"
}}
nat: {{
    ice_enforce_list = "lo"
}}
plugins: {{
    disable = "{others("plugins", "libjanus_audiobridge.so")}"
}}
transports: {{
    disable = "{others("transports", "libjanus_http.so")}"
}}
events: {{
    broadcast = false
}}
loggers: {{
    disable = "{others("loggers", "")}"
}}
"""
        )
        (self.dir / "janus.transport.http.jcfg").write_text(
            f"""general: {{
    json = "plain"
    base_path = "/janus"
    http = true
    port = {self.http_port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
"""
        )
        (self.dir / "janus.plugin.audiobridge.jcfg").write_text(
            f"""general: {{
    rtp_port_range = "{self.rtp_range[0]}-{self.rtp_range[1]}"
    local_ip = "127.0.0.1"
    events = false
}}
"""
        )

    async def start(self, timeout: float = 30.0) -> None:
        self._write_config()
        log = open(self.dir / "janus.log", "wb")
        self.proc = await asyncio.create_subprocess_exec(
            janus_binary(),
            "-C",
            str(self.dir / "janus.jcfg"),
            "-F",
            str(self.dir),
            "-o",
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"janus exited: {self.log_tail()}")
                try:
                    async with http.get(f"{self.url}/info") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if loop.time() > deadline:
                    raise RuntimeError(f"janus not answering on {self.url}: {self.log_tail()}")
                await asyncio.sleep(0.2)

    def log_tail(self) -> str:
        try:
            return (self.dir / "janus.log").read_text(errors="replace")[-600:]
        except OSError:
            return ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 5.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class JanusApi:
    """One Janus session over HTTP; plugin events arrive through a long poll."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        self.session = 0
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._poll: asyncio.Task[None] | None = None
        self._rooms = itertools.count(1000)

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": body.get("transaction") or uuid.uuid4().hex}
        async with self.http.post(self.url + path, json=body) as r:
            answer: dict[str, Any] = await r.json(content_type=None)
        if answer.get("janus") == "error":
            raise RuntimeError(f"janus: {answer['error']}")
        return answer

    async def open(self) -> None:
        self.session = (await self._post("", {"janus": "create"}))["data"]["id"]
        self._poll = asyncio.create_task(self._long_poll())

    async def _long_poll(self) -> None:
        while True:
            try:
                async with self.http.get(f"{self.url}/{self.session}?maxev=50") as r:
                    events = await r.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            for event in events if isinstance(events, list) else [events]:
                future = self.waiting.pop(event.get("transaction", ""), None)
                if future is not None and not future.done():
                    future.set_result(event)

    async def attach(self) -> int:
        answer = await self._post(f"/{self.session}", {"janus": "attach", "plugin": "janus.plugin.audiobridge"})
        return int(answer["data"]["id"])

    async def request(self, handle: int, body: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """A plugin request; waits for its asynchronous event when Janus only acknowledges it."""
        transaction = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[transaction] = future
        answer = await self._post(
            f"/{self.session}/{handle}", {"janus": "message", "body": body, "transaction": transaction}
        )
        if answer.get("janus") == "ack":
            answer = await asyncio.wait_for(future, timeout)
        else:
            self.waiting.pop(transaction, None)
        data: dict[str, Any] = answer.get("plugindata", {}).get("data", {})
        if "error" in data:
            raise RuntimeError(f"audiobridge {body['request']}: {data['error']}")
        return data

    async def bridge_call(
        self, agent_port: int, customer_port: int, sink_port: int, prebuffer: int | None, legs_hear: bool
    ) -> tuple[int, int]:
        """A room mixing two plain-RTP PCMU participants sending from ``agent_port`` and
        ``customer_port``, its mix forwarded as PCMU to ``sink_port``. Returns the ports Janus
        receives each participant's RTP on.

        A forked leg only sends (SIPREC streams are ``a=sendonly``), so by default a participant
        joins without an address and Janus sends it nothing; ``legs_hear`` gives each its
        address, and Janus sends it the mix minus itself as in a conference."""
        room = next(self._rooms)
        agent, customer = await asyncio.gather(self.attach(), self.attach())
        create: dict[str, Any] = {
            "request": "create",
            "room": room,
            "sampling_rate": 8000,
            "audiolevel_ext": False,
            "allow_rtp_participants": True,
        }
        if prebuffer is not None:
            create["default_prebuffering"] = prebuffer
        await self.request(agent, create)
        ports = []
        for handle, port, name in ((agent, agent_port, "agent"), (customer, customer_port, "customer")):
            joined = await self.request(
                handle,
                {
                    "request": "join",
                    "room": room,
                    "display": name,
                    "codec": "pcmu",
                    "rtp": {"ip": "127.0.0.1", "port": port, "payload_type": 0} if legs_hear else {"payload_type": 0},
                },
            )
            ports.append(int(joined["rtp"]["port"]))
        await self.request(
            agent,
            {
                "request": "rtp_forward",
                "room": room,
                "host": "127.0.0.1",
                "port": sink_port,
                "codec": "pcmu",
                "ptype": 0,
            },
        )
        return ports[0], ports[1]

    async def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            await asyncio.gather(self._poll, return_exceptions=True)
        await self.http.close()
