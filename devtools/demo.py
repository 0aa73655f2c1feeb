"""A demo contact-centre platform for ``make run``: it drives the gateway through the public API
exactly as a real platform would (client-credentials token of ``cx-platform``).

It keeps a few conversations alive: team-a and team-b inbound ones with chat (a customer bot
and an agent bot talking), one outbound and one transferred (both refused for monitoring, to
show the rules), and feeds voice legs over SIP from the fixture audio when SIP is enabled.

``demo-a1`` is PUT with ``"fork": "on_demand"``: its SIPREC call is dialled only while a
supervisor listens. The platform follows ``/v1/events`` with its own token and dials on
``voice_fork_requested`` and hangs up (BYE) on ``voice_fork_released``; each time it
(re)connects it forks exactly the conversations whose ``fork_requested`` is set. The others
are forked always, as platforms that record everything do.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConversation:
    id: str
    agent: str
    customer: str
    direction: str = "inbound"
    transferred: bool = False
    sessions: tuple[str, ...] = ("chat", "voice")
    fork: str = "always"


CONVERSATIONS = (
    DemoConversation("demo-a1", "alice", "Ann Archer", fork="on_demand"),
    DemoConversation("demo-a2", "alice", "Andy Ames", sessions=("chat",)),
    DemoConversation("demo-a3", "alice", "Ada Out", direction="outbound"),
    DemoConversation("demo-a4", "alice", "Tim Transfer", transferred=True),
    DemoConversation("demo-b1", "bob", "Ben Brown"),
)

CUSTOMER_LINES = (
    "Hi, my parcel has not arrived yet.",
    "The tracking page says it was delivered yesterday.",
    "Can you check the address you have on file?",
    "It should be 12 Harbour Street, flat 3.",
    "Thanks, how long will the replacement take?",
)
AGENT_LINES = (
    "Sorry to hear that, let me look it up for you.",
    "I can see the delivery scan, one moment please.",
    "We have 12 Harbour Street, flat 8 on file.",
    "I have corrected it and ordered a replacement.",
    "It should be with you within two working days.",
)


class DemoPlatform:
    def __init__(self, settings: Settings, interval: float = 4.0) -> None:
        self.settings = settings
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._voice: Any = None
        self._on_demand: Any = None
        self.forks_requested = 0  # voice_fork_requested events heard (tests, logs)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for legs in (self._voice, self._on_demand):
            if legs is not None:
                await legs.stop()

    def banner(self) -> str:
        """What a new user needs to start looking: printed once the demo is live."""
        base = self.settings.base_url
        idp = self.settings.keycloak_url or base
        return f"""
  Silent-monitoring gateway demo is live.
    Console:   {base}/            sign in as sam / demo (team-a) or sue / demo (team-b)
    Token:     curl -s -d grant_type=password -d client_id=gateway-console -d username=sam -d password=demo \\
                 {idp}/realms/{self.settings.realm}/protocol/openid-connect/token
    API:       {base}/openapi.json    metrics: {base}/metrics    audit: {self.settings.audit_path}
    SIP:       platforms INVITE sip:{self.settings.sip_host}:{self.settings.sip_port}; a phone to listen with:
                 .venv/bin/python -m devtools.sip_phone --port 5090 --record heard.wav
               then POST /v1/conversations/demo-a1/monitors {{"voice":{{"kind":"sip","uri":"sip:sam@127.0.0.1:5090"}}}}
               (demo-a1 is forked on demand: its legs arrive when a voice monitor starts; demo-b1 always)
"""

    async def _token(self, http: aiohttp.ClientSession) -> str:
        idp = self.settings.keycloak_url or self.settings.base_url
        url = f"{idp}/realms/{self.settings.realm}/protocol/openid-connect/token"
        data = {
            "grant_type": "client_credentials",
            "client_id": "cx-platform",
            "client_secret": self.settings.admin_client_secret,
        }
        async with http.post(url, data=data) as response:
            response.raise_for_status()
            return str((await response.json())["access_token"])

    async def _run(self) -> None:
        base = self.settings.base_url
        async with aiohttp.ClientSession() as http:
            while True:  # the server listens only after the cleanup contexts ran: wait for ready
                try:
                    async with http.get(f"{base}/readyz") as ready:
                        if ready.status == 200:
                            token = await self._token(http)
                            break
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.5)
            headers = {"Authorization": f"Bearer {token}"}
            for conv in CONVERSATIONS:
                body = {
                    "direction": conv.direction,
                    "transferred": conv.transferred,
                    "agent": conv.agent,
                    "customer": {"id": conv.id + "-customer", "name": conv.customer},
                    "sessions": list(conv.sessions),
                    "fork": conv.fork,
                }
                async with http.put(f"{base}/v1/conversations/{conv.id}", json=body, headers=headers) as response:
                    if response.status >= 300:
                        log.warning("demo: could not create %s: %s", conv.id, await response.text())
            await self._start_voice()
            follow = asyncio.create_task(self._follow_forks(http), name="demo-forks")
            try:
                log.info("demo platform: %d conversations live", len(CONVERSATIONS))
                print(self.banner(), flush=True)
                lines = itertools.cycle(zip(CUSTOMER_LINES, AGENT_LINES))
                refresh = asyncio.get_running_loop().time() + 200
                while True:
                    await asyncio.sleep(self.interval)
                    if asyncio.get_running_loop().time() > refresh:  # demo tokens live 300 s
                        headers = {"Authorization": f"Bearer {await self._token(http)}"}
                        refresh = asyncio.get_running_loop().time() + 200
                    customer_line, agent_line = next(lines)
                    for conv in CONVERSATIONS:
                        if "chat" not in conv.sessions:
                            continue
                        for sender, text in (("customer", customer_line), ("agent", agent_line)):
                            await asyncio.sleep(random.uniform(0.2, 0.8))
                            async with http.post(
                                f"{base}/v1/conversations/{conv.id}/messages",
                                json={"from": sender, "text": text},
                                headers=headers,
                            ) as response:
                                if response.status >= 300:
                                    log.debug("demo message refused: %s", await response.text())
            finally:  # stopped: the event follower goes with the rest
                follow.cancel()
                await asyncio.gather(follow, return_exceptions=True)

    async def _follow_forks(self, http: aiohttp.ClientSession) -> None:
        """Dial / hang up the on-demand conversations' SIPREC calls as the gateway asks, on
        ``/v1/events`` with the platform's token (reconnecting when the token expires)."""
        base, ws_base = self.settings.base_url, self.settings.base_url.replace("http", "ws", 1)
        while True:
            try:
                headers = {"Authorization": f"Bearer {await self._token(http)}"}
                async with http.ws_connect(f"{ws_base}/v1/events", headers=headers, heartbeat=20) as ws:
                    # what was asked for while we were away
                    async with http.get(f"{base}/v1/conversations", headers=headers) as response:
                        for item in await response.json() if response.status == 200 else []:
                            if item.get("fork") == "on_demand":
                                self._fork(item["id"], item.get("fork_requested") is not None)
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            break
                        event = msg.json()
                        if event.get("type") == "voice_fork_requested":
                            self.forks_requested += 1
                            log.info("demo: fork of %s requested (%s)", event["conversation"], event["mode"])
                            self._fork(event["conversation"], True)
                        elif event.get("type") == "voice_fork_released":
                            log.info("demo: fork of %s released", event["conversation"])
                            self._fork(event["conversation"], False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the gateway restarting, a token hiccup: follow again
                log.info("demo: event stream lost (%s); reconnecting", exc)
            await asyncio.sleep(1.0)

    def _fork(self, cid: str, on: bool) -> None:
        if self._on_demand is not None and cid in self._on_demand.cids:
            self._on_demand.fork(cid, on)

    async def _start_voice(self) -> None:
        """Feed the voice legs of the voice conversations from fixture audio over SIP."""
        if not self.settings.enable_sip:
            return
        try:
            from devtools.demo_legs import DemoLegs
        except ImportError:
            log.info("demo: no SIP leg player available; conversations have chat only audio-less voice")
            return
        voiced = [c for c in CONVERSATIONS if "voice" in c.sessions and c.direction == "inbound" and not c.transferred]
        self._voice = DemoLegs(self.settings, [c.id for c in voiced if c.fork == "always"])
        self._on_demand = DemoLegs(self.settings, [c.id for c in voiced if c.fork == "on_demand"], on_demand=True)
        await self._voice.start()
        await self._on_demand.start()
