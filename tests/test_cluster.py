"""Several gateway processes on one Redis are one gateway (issue 10): real Redis, two real
``python -m gateway serve`` processes on loopback (B uses A's embedded identity provider),
sipp legs, a pjsua2 SIPREC client and phone, and Kamailio as the cluster's one SIP address."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.cluster import GatewayProcess, instance_settings
from devtools.redis_server import RedisServer, start_redis
from gateway.shared.cluster import Cluster

from .sip_support import (
    AUDIO,
    RawSip,
    free_udp_block,
    read_wav,
    require_pjsua2,
    require_tool,
    sdp,
    start_phone,
    start_sipp_leg,
    start_siprec,
    tone_levels,
)
from .support import GatewayClient, events_of, free_port

pytestmark = [pytest.mark.sip, pytest.mark.api]
#: TTL of the voice slot, the media-owner lease and the registry card (short: the crash test waits it out).
LEASE = 1.5


@dataclass
class Instance:
    """One gateway process (``devtools.cluster.GatewayProcess``) and a client of its API."""

    name: str
    process: GatewayProcess
    client: GatewayClient

    @property
    def url(self) -> str:
        return self.client.base_url

    @property
    def sip_port(self) -> int:
        return self.process.sip_port

    @property
    def sip_uri(self) -> str:
        return self.process.sip_uri

    @property
    def returncode(self) -> int | None:
        return None if self.process.process is None else self.process.process.poll()

    def kill(self) -> None:
        """kill -9 of the instance and its SIP workers (its process group): a crash."""
        self.process.kill()

    async def exited(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.returncode) is None:
            assert time.monotonic() < deadline, f"{self.name} still running after {timeout}s"
            await asyncio.sleep(0.1)
        return code

    def tail(self) -> str:
        return self.process.log_tail()


async def start_instance(
    tmp: Path,
    name: str,
    redis: RedisServer,
    prefix: str,
    http: aiohttp.ClientSession,
    idp: str | None = None,
    **extra: str,
) -> Instance:
    """``python -m gateway serve`` on free loopback ports, sharing ``redis``; ``extra``: more
    settings by name (``sip_workers="2"``)."""
    settings = instance_settings(
        calls_per_worker=0,  # as many as the worker's pjsua2 build holds
        rtp_port_base=free_udp_block(40, 30000, 39000),
        redis_url=redis.url,
        keycloak_url=idp or "",
        instance_id=name,
        extra={
            "GATEWAY_REDIS_PREFIX": prefix,
            "GATEWAY_VOICE_LEASE_SECONDS": str(LEASE),
            "GATEWAY_DRAIN_SECONDS": "30",
            "GATEWAY_LOG_LEVEL": "INFO",
            **{f"GATEWAY_{key.upper()}": value for key, value in extra.items()},
        },
    )
    process = GatewayProcess(name, tmp / name, free_port(), free_udp_block(4), settings)
    process.start()
    client = GatewayClient(process.base_url, idp or process.base_url, http)
    instance = Instance(name, process, client)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if instance.returncode is not None:
            raise AssertionError(f"{name} exited with {instance.returncode}:\n{instance.tail()}")
        try:
            if (await client.call("GET", "/readyz")).status == 200:
                return instance
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} not ready:\n{instance.tail()}")


async def stop_instance(instance: Instance) -> None:
    """Stop the instance and whatever it started (its process group) at once."""
    await asyncio.to_thread(instance.process.stop, 0.0)


@asynccontextmanager
async def cluster(tmp: Path, redis: RedisServer, prefix: str, **extra: str) -> AsyncIterator[tuple[Instance, Instance]]:
    """Two instances on ``redis``: A with the embedded identity provider, B using A's."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        a = await start_instance(tmp, "gw-a", redis, prefix, http, **extra)
        stack.push_async_callback(stop_instance, a)
        b = await start_instance(tmp, "gw-b", redis, prefix, http, idp=a.url, **extra)
        stack.push_async_callback(stop_instance, b)
        yield a, b


async def monitor_event(ws: aiohttp.ClientWebSocketResponse, mid: str, timeout: float) -> dict[str, Any]:
    """The next monitor_updated / monitor_ended of monitor ``mid``."""
    deadline = time.monotonic() + timeout
    while True:
        event = await ws.receive_json(timeout=max(0.1, deadline - time.monotonic()))
        if event["type"] in ("monitor_updated", "monitor_ended") and event["monitor"]["id"] == mid:
            return dict(event)


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def voice_legs(gw: GatewayClient, cid: str) -> set[str]:
    answer = await gw.call("GET", f"/v1/conversations/{cid}", await gw.platform())
    return set(answer.body["voice_legs"]) if answer.status == 200 else set()


async def whep_offer() -> str:
    """A browser-like WHEP offer (receive-only audio, DTLS fingerprint) from aiortc."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    offer = pc.localDescription.sdp
    await pc.close()
    return offer


async def reap(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


# ---------------------------------------------------------------------------- API on any instance


async def test_fifty_voice_monitors_over_both_instances_one_wins_and_chat_resumes_elsewhere(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    async with cluster(tmp_path, redis_server, redis_prefix) as (a, b):
        assert (await a.client.conversation("c50")).status == 201
        sam, tom = await a.client.login("sam"), await a.client.login("tom")

        async def attempt(i: int) -> Any:
            via = (a, b)[i % 2].client
            return await via.call(
                "POST", "/v1/conversations/c50/monitors", sam if i % 4 < 2 else tom, {"voice": {"kind": "webrtc"}}
            )

        answers = await asyncio.gather(*(attempt(i) for i in range(50)))
        created = [x for x in answers if x.status == 201]
        assert len(created) == 1, [(x.status, x.code) for x in answers]
        refusals = {(x.status, x.code) for x in answers if x.status != 201}
        assert refusals <= {(409, "already_monitoring"), (409, "voice_monitor_busy")}, refusals
        monitor = created[0].body
        assert monitor["channels"] == ["chat", "voice"]
        holder = sam if monitor["supervisor"] == "sam" else tom
        # the monitor is known on both instances at once (the forwarding instance waits for it)
        for gw in (a, b):
            assert (await gw.client.call("GET", f"/v1/monitors/{monitor['id']}", holder)).status == 200

        # WHEP: the instance that does not hold the media answers 307 to the one that does; a
        # browser (Origin) gets the answer forwarded instead (it drops Authorization on a
        # cross-origin redirect), with a Location it can DELETE through the same instance
        bearer = {"Authorization": f"Bearer {holder}", "Content-Type": "application/sdp"}
        whep = f"/v1/monitors/{monitor['id']}/whep"
        first: dict[str, tuple[int, str]] = {}
        for gw in (a, b):
            async with gw.client.http.post(
                gw.url + whep, data=await whep_offer(), headers=bearer, allow_redirects=False
            ) as answer:
                first[gw.name] = (answer.status, answer.headers.get("Location", ""))
        owner, other = (a, b) if first["gw-b"][0] == 307 else (b, a)
        assert first[other.name] == (307, owner.url + whep), first
        assert first[owner.name][0] == 201 and first[owner.name][1].startswith(whep + "/"), first
        async with other.client.http.post(
            first[other.name][1], data=await whep_offer(), headers=bearer, allow_redirects=False
        ) as followed:
            assert followed.status == 201 and "a=sendonly" in await followed.text()
        async with other.client.http.post(
            other.url + whep, data=await whep_offer(), headers={**bearer, "Origin": other.url}
        ) as proxied:
            assert proxied.status == 201 and "a=sendonly" in await proxied.text()
            location = proxied.headers["Location"]
        assert location.startswith(whep + "/")
        assert (await other.client.call("DELETE", location, holder)).status == 204

        # chat: a monitor's mirror read on A, resumed on B after the last seq it saw: every
        # message exactly once, whichever instance ingested it
        platform = await a.client.platform()
        sent: list[int] = []

        async def post(gw: Instance, i: int) -> None:
            body = {"from": "customer" if i % 2 else "agent", "text": f"m{i}", "client_id": f"k{i}"}
            answer = await gw.client.call("POST", "/v1/conversations/c50/messages", platform, body)
            assert answer.status == 201, answer.body
            sent.append(answer.body["seq"])

        token = holder
        stream = await a.client.http.ws_connect(
            a.client.ws_url(f"/v1/monitors/{monitor['id']}/chat?after=0"), headers={"Authorization": f"Bearer {token}"}
        )
        for i in range(10):
            await post((a, b)[i % 2], i)
        seen: list[int] = []
        texts: list[str] = []
        while len([t for t in texts if t.startswith("m")]) < 5:
            frame = await stream.receive_json(timeout=5)
            if frame["type"] == "entry":
                seen.append(frame["seq"])
                texts.append(frame["text"])
        await stream.close()
        for i in range(10, 20):  # more arrive while nobody reads
            await post((a, b)[i % 2], i)
        resumed = await b.client.http.ws_connect(
            b.client.ws_url(f"/v1/monitors/{monitor['id']}/chat?after={seen[-1]}"),
            headers={"Authorization": f"Bearer {token}"},
        )
        while not set(sent) <= set(seen):
            frame = await resumed.receive_json(timeout=5)
            if frame["type"] == "entry":
                seen.append(frame["seq"])
                texts.append(frame["text"])
        await resumed.close()
        assert seen == sorted(seen) and len(seen) == len(set(seen)), seen
        assert [t for t in texts if t.startswith("m")] == [f"m{i}" for i in range(20)]


# ---------------------------------------------------------------------------- SIP across instances


async def media_owner(redis: RedisServer, prefix: str, cid: str) -> str | None:
    """The instance id the media lease of ``cid`` names (what the gateways route by)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis.url)
    try:
        value = await client.get(f"{prefix}media:{cid}")
    finally:
        await client.aclose()
    return value.decode() if value is not None else None


def kamailio_for(tmp: Path, *instances: Instance) -> Any:
    """Kamailio (the cluster's one SIP address) in front of ``instances``."""
    from devtools.kamailio import start_kamailio

    return start_kamailio(tmp / "kamailio", destinations=[instance.sip_uri for instance in instances])


def hashed_to(k: Any, instance: Instance, stem: str) -> str:
    """A conversation id Kamailio's hash sends to ``instance`` while every instance is up."""
    for i in range(200):
        cid = f"{stem}{i}"
        if k.destination_for(cid) == instance.sip_uri:
            return cid
    raise AssertionError(f"no conversation id hashes to {instance.name}")


async def start_legs(tmp: Path, port: int, cid: str, seconds: int) -> list[asyncio.subprocess.Process]:
    """The platform's two per-leg calls (600 Hz agent, 1000 Hz customer) to SIP ``port``."""
    return [
        await start_sipp_leg(tmp, port, cid, leg, AUDIO / audio, seconds * 1000)
        for leg, audio in (("agent", "agent_600.ulaw"), ("customer", "customer_1000.ulaw"))
    ]


async def sip_stat(gw: GatewayClient, stat: str) -> float:
    text = (await gw.call("GET", "/metrics")).body
    line = next(x for x in text.splitlines() if x.startswith(f'gateway_plane_stat{{plane="sip",stat="{stat}"}}'))
    return float(line.rsplit(" ", 1)[1])


async def _both(gw: GatewayClient, cid: str) -> bool:
    return await voice_legs(gw, cid) == {"agent", "customer"}


def assert_heard_both_legs(record: Path) -> None:
    heard, rate = read_wav(record)
    levels = tone_levels(heard[-8000:], rate, [600.0, 1000.0])
    assert levels[600.0] > 0.3 and levels[1000.0] > 0.3, levels


async def test_legs_through_kamailio_meet_on_one_instance_and_a_phone_started_through_the_other_hears_both(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    require_pjsua2()
    require_tool("sipp")
    async with cluster(tmp_path, redis_server, redis_prefix) as (a, b):
        with kamailio_for(tmp_path, a, b) as k:
            cid = hashed_to(k, a, "kc")
            assert (await b.client.conversation(cid)).status == 201
            legs = await start_legs(tmp_path, k.port, cid, 8)
            try:
                await until(lambda: _both(b.client, cid), 10, "both legs up")
                assert await media_owner(redis_server, redis_prefix, cid) == a.name
                phone_port = free_udp_block(30, 40000, 59000)
                record = tmp_path / "phone.wav"
                phone = await start_phone(phone_port, record)
                try:  # started through B's API: forwarded to A, which calls the phone
                    uri = f"sip:sam@127.0.0.1:{phone_port}"
                    answer = await b.client.monitor("sam", cid, {"kind": "sip", "uri": uri})
                    assert answer.status == 201 and answer.body["channels"] == ["chat", "voice"], answer.body
                    await phone.wait_line("CONNECTED", 5)
                    await asyncio.sleep(2.0)
                    sam = await b.client.login("sam")
                    assert (await b.client.call("DELETE", f"/v1/monitors/{answer.body['id']}", sam)).status == 204
                    await phone.wait_line("DISCONNECTED", 3)  # hung up by A, told through Redis
                finally:
                    await phone.stop()
                assert_heard_both_legs(record)
                assert await sip_stat(a.client, "legs") == 2.0 and await sip_stat(b.client, "legs") == 0.0
            finally:
                await reap(*legs)


async def test_a_monitor_first_then_legs_hashed_to_the_other_instance_are_relayed_to_it(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    """A dialect Kamailio can not keep together (or a monitor before the call): the phone monitor
    opened on B makes B the media owner; the legs Kamailio sends to A are relayed by A's SIP
    address to B (stateless, not record-routed), and B's waiting phone hears both."""
    require_pjsua2()
    require_tool("sipp")
    async with cluster(tmp_path, redis_server, redis_prefix) as (a, b):
        with kamailio_for(tmp_path, a, b) as k:
            cid = hashed_to(k, a, "kr")
            assert (await a.client.conversation(cid)).status == 201
            phone_port = free_udp_block(30, 40000, 59000)
            record = tmp_path / "phone_r.wav"
            phone = await start_phone(phone_port, record)
            legs: list[asyncio.subprocess.Process] = []
            try:
                uri = f"sip:sam@127.0.0.1:{phone_port}"
                answer = await b.client.monitor("sam", cid, {"kind": "sip", "uri": uri})
                assert answer.status == 201 and answer.body["channels"] == ["chat", "voice"], answer.body
                assert await media_owner(redis_server, redis_prefix, cid) == b.name
                legs = await start_legs(tmp_path, k.port, cid, 6)
                await phone.wait_line("CONNECTED", 8)
                await until(lambda: _both(a.client, cid), 10, "both legs up")
                await asyncio.sleep(2.0)
                assert await sip_stat(a.client, "front_relayed") == 2.0
                assert await sip_stat(b.client, "legs") == 2.0 and await sip_stat(a.client, "legs") == 0.0
                for leg in legs:  # ACK and BYE went along the route set: Kamailio, then B
                    assert await asyncio.wait_for(leg.wait(), 15) == 0
            finally:
                await phone.stop()
                await reap(*legs)
            assert_heard_both_legs(record)


def tone_wav(path: Path, hz: float, seconds: float) -> Path:
    import wave

    import numpy as np

    t = np.arange(int(8000 * seconds)) / 8000
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes((8000 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes())
    return path


async def test_a_siprec_call_found_by_its_metadata_is_relayed_to_the_instance_holding_the_media(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    """A SIPREC INVITE whose conversation is only in its metadata (Kamailio can only hash its
    Call-ID) reaches A while B holds the conversation (its phone monitor came first): A relays
    the one INVITE, both streams become B's legs, and B's phone hears both parties."""
    require_pjsua2()
    async with cluster(tmp_path, redis_server, redis_prefix) as (a, b):
        assert (await a.client.conversation("sr")).status == 201
        phone_port = free_udp_block(30, 40000, 59000)
        record = tmp_path / "phone_sr.wav"
        phone = await start_phone(phone_port, record, "--tone", "1500")  # the supervisor "speaks"
        source = None
        try:
            uri = f"sip:sam@127.0.0.1:{phone_port}"
            answer = await b.client.monitor("sam", "sr", {"kind": "sip", "uri": uri})
            assert answer.status == 201 and answer.body["channels"] == ["chat", "voice"], answer.body
            agent, customer = tone_wav(tmp_path / "a.wav", 600, 6), tone_wav(tmp_path / "c.wav", 1000, 6)
            source = await start_siprec(
                a.sip_port, "sr", "alice", agent, customer, 5.0, record_prefix=tmp_path / "platform"
            )
            await source.wait_line("CONNECTED", 8)
            await phone.wait_line("CONNECTED", 8)
            await asyncio.sleep(2.0)
            assert await sip_stat(a.client, "front_relayed") == 1.0
            assert await sip_stat(b.client, "legs") == 2.0 and await sip_stat(a.client, "legs") == 0.0
            await source.wait_line("BYEBYE", 10)  # its BYE went to B directly (A did not record-route)
        finally:
            await phone.stop()
            if source is not None:
                await source.stop()
        assert_heard_both_legs(record)
        # receive-only: nothing the supervisor's phone sent (1500 Hz) reached the agent or the
        # customer: what the platform recorded from the gateway is silence
        for leg in ("agent", "customer"):
            back, _ = read_wav(tmp_path / f"platform-{leg}.wav")
            assert len(back) > 8000 * 3 and float(abs(back.astype(float)).max()) < 100, leg


async def test_kill_9_of_the_owner_mid_call(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    """The owner dies: its phone monitor loses the voice (media_failure) within the lease TTL, as
    the surviving instance's /v1/events shows; the slot is free for another supervisor; chat
    goes on; the platform's new INVITEs through Kamailio are placed on the survivor."""
    require_pjsua2()
    require_tool("sipp")
    async with cluster(tmp_path, redis_server, redis_prefix) as (owner, survivor):
        with kamailio_for(tmp_path, owner, survivor) as k:
            cid = hashed_to(k, owner, "kk")
            assert (await survivor.client.conversation(cid)).status == 201
            legs = await start_legs(tmp_path, k.port, cid, 20)
            phone_port = free_udp_block(30, 40000, 59000)
            phone = await start_phone(phone_port, tmp_path / "phone_k.wav")
            refork: list[asyncio.subprocess.Process] = []
            try:
                await until(lambda: _both(survivor.client, cid), 10, "both legs up")
                events = await events_of(survivor.client, "tom")
                uri = f"sip:sam@127.0.0.1:{phone_port}"
                answer = await survivor.client.monitor("sam", cid, {"kind": "sip", "uri": uri})
                assert answer.status == 201 and answer.body["channels"] == ["chat", "voice"], answer.body
                await phone.wait_line("CONNECTED", 5)
                mid = answer.body["id"]
                platform = await survivor.client.platform()
                say = {"from": "customer", "text": "before", "client_id": "kb"}
                path = f"/v1/conversations/{cid}/messages"
                before = await survivor.client.call("POST", path, platform, say)
                assert before.status == 201

                killed = time.monotonic()
                owner.kill()
                event = await monitor_event(events, mid, timeout=3 * LEASE + 2)
                took = time.monotonic() - killed
                assert event["type"] == "monitor_updated", event
                assert event["monitor"]["voice_blocked_reason"] == "media_failure"
                assert took < 2 * LEASE + 1.0, took  # the lease TTL, a third of it to notice, the recheck
                # chat goes on: nothing acknowledged is lost, the seq goes on
                again = await survivor.client.call("POST", path, platform, say)
                assert again.body == {"seq": before.body["seq"], "duplicate": True}
                after = await survivor.client.call("POST", path, platform, {"from": "agent", "text": "after"})
                assert after.status == 201 and after.body["seq"] > before.body["seq"]
                # the dead instance's legs are reported gone; the platform re-forks through
                # Kamailio (which takes the dead instance out, or fails over from it) to the survivor
                await until(lambda: _no_legs(survivor.client, cid), 3 * LEASE + 2, "the dead owner's legs to end")
                refork = await start_legs(tmp_path, k.port, cid, 4)
                await until(lambda: _both(survivor.client, cid), 10, "the re-forked legs")
                assert await media_owner(redis_server, redis_prefix, cid) == survivor.name
                assert await sip_stat(survivor.client, "legs") == 2.0
                # the dead owner's slot is free: another supervisor gets the voice through the
                # survivor (asked once the re-forked legs are up: before that, the dead owner's legs
                # may already be reported gone, and a voice monitor is then chat only,
                # voice_not_active, whatever the slot)
                taken = await until(
                    lambda: _voice_monitor(survivor.client, "tom", cid), 3 * LEASE, "the voice slot to be free"
                )
                assert taken["channels"] == ["chat", "voice"], taken
                await events.close()
            finally:
                await phone.stop()
                await reap(*legs, *refork)


async def _voice_monitor(gw: GatewayClient, user: str, cid: str) -> dict[str, Any] | None:
    answer = await gw.monitor(user, cid, {"kind": "webrtc"})
    if answer.status == 201 and "voice" in answer.body["channels"]:
        return dict(answer.body)
    if answer.status == 201:  # chat only for now (the slot still held): leave, ask again
        assert answer.body["voice_blocked_reason"] in ("voice_monitor_busy", "voice_not_active"), answer.body
        await gw.call("DELETE", f"/v1/monitors/{answer.body['id']}", await gw.login(user))
        return None
    assert answer.code in ("voice_monitor_busy", "unavailable", "already_monitoring"), answer.body
    if answer.code == "already_monitoring":  # opened without voice while the slot was held: leave, retry
        await gw.call("DELETE", f"/v1/monitors/{answer.body['error']['monitor']}", await gw.login(user))
    return None


async def _no_legs(gw: GatewayClient, cid: str) -> bool:
    return not await voice_legs(gw, cid)


# ---------------------------------------------------------------------------- drain, Redis restart


async def test_drain_moves_new_calls_and_monitors_to_the_other_instance(
    tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    require_tool("sipp")
    async with cluster(tmp_path, redis_server, redis_prefix) as (a, b):
        with kamailio_for(tmp_path, a, b) as k:
            busy = hashed_to(k, a, "dbusy")
            fresh = hashed_to(k, a, "dnew")
            for cid in (busy, fresh):
                assert (await b.client.conversation(cid)).status == 201
            legs = await start_legs(tmp_path, k.port, busy, 10)
            new_legs: list[asyncio.subprocess.Process] = []
            try:
                await until(lambda: _both(b.client, busy), 10, "the busy conversation's legs on A")
                assert await media_owner(redis_server, redis_prefix, busy) == a.name
                a.process.terminate()  # SIGTERM: A drains; it still holds a call, so it stays up
                k.wait_state(a.sip_uri, "I", timeout=10)  # Kamailio's probes got 503
                # a new call Kamailio would have hashed to A goes to B
                new_legs = await start_legs(tmp_path, k.port, fresh, 4)
                await until(lambda: _both(a.client, fresh), 10, "the new conversation's legs")
                assert await media_owner(redis_server, redis_prefix, fresh) == b.name
                # A's API sends new monitors elsewhere: a voice monitor to the owner (B), a chat
                # monitor to a live instance; a voice monitor of the media A still holds: 503
                voice = await a.client.monitor("tom", fresh, {"kind": "webrtc"})
                assert voice.status == 201 and voice.body["channels"] == ["chat", "voice"], voice.body
                chat = await a.client.monitor("tom", busy)
                assert chat.status == 201 and chat.body["channels"] == ["chat"], chat.body
                held = await a.client.monitor("sam", busy, {"kind": "webrtc"})
                assert (held.status, held.code) == (503, "draining"), held.body
                assert a.returncode is None
                # the call ends (the platform hangs up), and A stops by itself: the monitors,
                # B's now, do not hold it up
                for leg in legs:
                    assert await asyncio.wait_for(leg.wait(), 15) == 0
                assert await a.exited(10) == 0, a.tail()
            finally:
                await reap(*legs, *new_legs)


async def test_redis_restart_is_503_state_unavailable_then_recovers(tmp_path: Path, redis_prefix: str) -> None:
    with start_redis(tmp_path / "redis") as redis:
        async with cluster(tmp_path, redis, redis_prefix) as (a, b):
            assert (await a.client.conversation("rr")).status == 201
            sam, tom = await a.client.login("sam"), await a.client.login("tom")
            redis.stop(kill=True)
            try:
                for gw in (a, b):
                    answer = await until(lambda gw=gw: _refused(gw.client, sam), 5, f"{gw.name} to notice")
                    assert answer.headers["Retry-After"] == "1"
                    started = time.monotonic()
                    voice = await gw.client.call(
                        "POST", "/v1/conversations/rr/monitors", tom, {"voice": {"kind": "webrtc"}}
                    )
                    assert (voice.status, voice.code) == (503, "state_unavailable")
                    assert time.monotonic() - started < 0.5
                    # a new INVITE: which instance holds the conversation can not be told: 503 at once
                    raw = RawSip()
                    try:
                        data, _, _ = raw.invite(
                            gw.sip_port, body=sdp(), headers={"X-Conversation-ID": "rr", "X-Leg": "agent"}
                        )
                        started = time.monotonic()
                        status, text = await raw.request(data, gw.sip_port)
                        assert status == 503 and "Retry-After" in text, text
                        assert time.monotonic() - started < 0.5
                    finally:
                        raw.close()
            finally:
                redis.start()
            for gw in (a, b):  # both recover by themselves
                await until(lambda gw=gw: _ready(gw.client), 10, f"{gw.name} to recover")
            voice = await b.client.call("POST", "/v1/conversations/rr/monitors", tom, {"voice": {"kind": "webrtc"}})
            assert voice.status == 201 and voice.body["channels"] == ["chat", "voice"], voice.body
            busy = await a.client.call("POST", "/v1/conversations/rr/monitors", sam, {"voice": {"kind": "webrtc"}})
            assert (busy.status, busy.code) == (409, "voice_monitor_busy")


async def _refused(gw: GatewayClient, token: str) -> Any:
    answer = await gw.call("GET", "/v1/conversations", token)
    if answer.status == 200:
        return None
    assert (answer.status, answer.code) == (503, "state_unavailable"), answer.body
    return answer


async def _ready(gw: GatewayClient) -> bool:
    return (await gw.call("GET", "/readyz")).status == 200


# ---------------------------------------------------------------------------- the leases themselves


@asynccontextmanager
async def registry(redis: RedisServer, prefix: str, *names: str, ttl: float) -> AsyncIterator[list[Cluster]]:
    """Clusters of instances ``names`` on ``redis`` (no gateway around them, no heartbeat loop)."""
    from gateway.shared.cluster import Cluster
    from gateway.shared.cluster import Instance as Card
    from gateway.shared.connection import SharedState

    states = [SharedState(redis.url, prefix=prefix, instance=name) for name in names]
    try:
        for state in states:
            await state.start()
        yield [
            Cluster(s, Card(s.instance, f"http://{s.instance}", "127.0.0.1", 5060 + i), ttl=ttl)
            for i, s in enumerate(states)
        ]
    finally:
        for state in states:
            await state.close()


async def test_media_lease_claim_takeover_release_and_orphans(redis_server: RedisServer, redis_prefix: str) -> None:
    async with registry(redis_server, redis_prefix, "a", "b", "c", ttl=0.6) as (a, b, c):
        for one in (a, b, c, a):
            await one.heartbeat()
        assert set(a.instances) == {"a", "b", "c"} and a.secret == b.secret != ""
        assert a.is_forwarded(b.secret) and not a.is_forwarded("guess") and not a.is_forwarded(None)
        # one holder; the others are told who
        assert await a.claim_media("x") is None
        assert (await b.claim_media("x")).id == "a"  # type: ignore[union-attr]
        assert (await b.media_owner("x")).sip == ("127.0.0.1", 5060)  # type: ignore[union-attr]
        assert await a.media_owner("x") is None  # its own
        # a keeps it while it wants it; b (still alive) can not take it
        a.wanted = lambda: {"x"}
        await asyncio.sleep(0.7)
        await a.heartbeat()
        await b.heartbeat()
        assert (await b.claim_media("x")).id == "a"  # type: ignore[union-attr]
        # a stops heartbeating (a crash): once its card expires, b takes the media over, and a,
        # coming back, learns it lost it
        lost: list[str] = []
        a.on_media_lost = lost.append
        await asyncio.sleep(0.7)
        assert await b.claim_media("x") is None
        await a.heartbeat()
        assert lost == ["x"] and "x" not in a.owned
        # b no longer wants it: released after the claim's grace
        await asyncio.sleep(0.7)
        await b.heartbeat()
        assert "x" not in b.owned and await c.media_owner("x") is None
        # legs up that no live instance holds: reported once (two looks in a row, one instance)
        orphaned: list[tuple[str, str]] = []
        for one in (b, c):
            one.legs_elsewhere = lambda: {"y"}
            one.on_orphaned = lambda cid, one=one: orphaned.append((one.me.id, cid))  # type: ignore[misc]
        await b.heartbeat()
        await c.heartbeat()
        assert orphaned == []
        await b.heartbeat()
        await c.heartbeat()
        assert orphaned == [("b", "y")]
