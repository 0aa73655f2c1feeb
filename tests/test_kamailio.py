"""Kamailio as the cluster's one SIP address (``deploy/kamailio/kamailio.cfg``), real peers only:
a real Kamailio (``devtools/kamailio.py``) in front of two real gateway processes
(``python -m gateway serve``, SQLite each: SIP distribution needs no shared state), sipp and
hand-made SIP as the platform.

What it checks: INVITEs through Kamailio are answered 200 by the instance the hash picks (the
X-Conversation-ID, else the Call-ID), both legs of a conversation meet there, ACK and BYE
follow the dialog through Kamailio and the instance's front; a 503 or a 3xx from an instance
sends the INVITE to the next one (the platform never sees a redirect); a draining instance
(SIGTERM) and a killed one (SIGKILL) get no new INVITE once a probe noticed, and an INVITE
sent to a dead one meanwhile fails over after the fr_timer; a ~60 KB SIPREC INVITE passes
over TCP.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devtools.cluster import GatewayProcess, free_block, instance_settings
from devtools.kamailio import KamailioServer, start_kamailio
from tests.sip_support import (
    AUDIO,
    RawSip,
    in_dialog_request,
    metadata,
    multipart,
    require_tool,
    response_header,
    sdp,
    start_sipp_leg,
    start_sipp_siprec,
)
from tests.support import GatewayClient, free_port
from tests.tls_support import make_pki

pytestmark = [pytest.mark.sip, pytest.mark.slow]


@dataclass(eq=False)
class Instance:
    process: GatewayProcess
    api: GatewayClient

    @property
    def uri(self) -> str:
        return self.process.sip_uri

    async def legs(self, cid: str) -> list[str]:
        answer = await self.api.call("GET", f"/v1/conversations/{cid}", await self.api.platform())
        assert answer.status == 200, answer.body
        return sorted(answer.body["voice_legs"])

    async def invites(self) -> float:
        return await asyncio.to_thread(self.process.metric, "front_invites")


@dataclass
class Cluster:
    kamailio: KamailioServer
    instances: list[Instance]

    def by_uri(self, uri: str) -> Instance:
        return next(i for i in self.instances if i.uri == uri)

    def other(self, instance: Instance) -> Instance:
        return next(i for i in self.instances if i is not instance)

    async def conversation(self, cid: str) -> None:
        """The platform announces the conversation to every instance (each has its own SQLite store)."""
        for instance in self.instances:
            answer = await instance.api.conversation(cid, sessions=["voice"])
            assert answer.status == 201, answer.body

    def cid_for(self, instance: Instance, prefix: str) -> str:
        """A conversation id whose hash picks ``instance`` while every instance is up."""
        for n in range(200):
            cid = f"{prefix}-{n}"
            if self.kamailio.destination_for(cid) == instance.uri:
                return cid
        raise AssertionError(f"no id hashes to {instance.uri}")

    async def where(self, cid: str, legs: list[str], timeout: float = 10.0) -> Instance:
        """The one instance holding ``legs`` of ``cid`` (the other holds none)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            held = [(i, await i.legs(cid)) for i in self.instances]
            found = [i for i, got in held if got == legs]
            if found and all(got == [] for i, got in held if i is not found[0]):
                return found[0]
            assert asyncio.get_running_loop().time() < deadline, f"{cid}: legs {[g for _, g in held]}"
            await asyncio.sleep(0.1)


@asynccontextmanager
async def running_cluster(tmp_path: Path, *, ping_interval: int = 1) -> AsyncIterator[Cluster]:
    processes = []
    for n in (1, 2):
        settings = instance_settings(
            rtp_port_base=free_block(64, 30000, 39000),
            extra={"GATEWAY_SIP_MEDIA_TIMEOUT": "0", "GATEWAY_DRAIN_SECONDS": "30", "GATEWAY_LOG_LEVEL": "WARNING"},
        )
        processes.append(GatewayProcess(f"gw{n}", tmp_path / f"gw{n}", free_port(), free_block(3), settings))
    try:
        for process in processes:
            process.start()
        for process in processes:
            await asyncio.to_thread(process.wait_ready)
        with start_kamailio(
            tmp_path / "kamailio", destinations=[p.sip_uri for p in processes], ping_interval=ping_interval
        ) as kamailio:
            async with aiohttp.ClientSession() as http:
                instances = [Instance(p, GatewayClient(p.base_url, p.base_url, http)) for p in processes]
                for uri in kamailio.states():
                    await asyncio.to_thread(kamailio.wait_state, uri, "A")
                yield Cluster(kamailio, instances)
    finally:
        for process in processes:
            await asyncio.to_thread(process.stop, 5.0)


async def sipp_ok(proc: asyncio.subprocess.Process, tmp_path: Path, timeout: float = 30.0) -> None:
    """sipp ran its whole scenario: 200 (a 3xx is an error in the scenario), ACK, BYE answered 200."""
    code = await asyncio.wait_for(proc.wait(), timeout)
    errors = "".join(p.read_text(errors="replace")[-1500:] for p in tmp_path.glob("sipp_*err.log"))
    assert code == 0, f"sipp exited {code}: {errors}"


async def test_legs_meet_on_the_hashed_instance_and_bye_goes_through(tmp_path: Path) -> None:
    require_tool("sipp")
    async with running_cluster(tmp_path) as cluster:
        k, (one, two) = cluster.kamailio, cluster.instances
        cids = {one: cluster.cid_for(one, "meet"), two: cluster.cid_for(two, "meet")}
        sipps = []
        for cid in cids.values():
            await cluster.conversation(cid)
            sipps.append(await start_sipp_leg(tmp_path, k.port, cid, "agent", AUDIO / "agent_600.ulaw", 3000))
            sipps.append(await start_sipp_leg(tmp_path, k.port, cid, "customer", AUDIO / "customer_1000.ulaw", 3000))
        for instance, cid in cids.items():
            assert await cluster.where(cid, ["agent", "customer"]) is instance
        for proc in sipps:
            await sipp_ok(proc, tmp_path)
        for cid in cids.values():  # the BYEs reached the instances through Kamailio and the front
            await cluster.where(cid, [])
        assert [await i.invites() for i in cluster.instances] == [2.0, 2.0]


async def test_siprec_invite_lands_whole_and_its_bye_goes_through(tmp_path: Path) -> None:
    require_tool("sipp")
    async with running_cluster(tmp_path) as cluster:
        await cluster.conversation("rec-1")
        sipp = await start_sipp_siprec(tmp_path, cluster.kamailio.port, "rec-1", "alice", AUDIO / "agent_600.ulaw")
        held = await cluster.where("rec-1", ["agent", "customer"])  # both streams of the one INVITE
        await sipp_ok(sipp, tmp_path)
        assert await cluster.where("rec-1", []) is not None
        assert await held.invites() == 1.0 and await cluster.other(held).invites() == 0.0


class TcpSip:
    """A platform's SIP connection over TCP: requests out, messages in (framed by Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.local_port = writer.get_extra_info("sockname")[1]

    @classmethod
    async def connect(cls, port: int, ssl: Any = None) -> TcpSip:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20, ssl=ssl)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def final(self, timeout: float = 10.0) -> tuple[int, str]:
        """The next final response (provisional ones skipped)."""
        while True:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            text = head.decode("utf-8", "surrogateescape")
            length = int((response_header(text, "content-length") or ["0"])[0])
            body = await self.reader.readexactly(length) if length else b""
            status = int(text.split(" ", 2)[1])
            if status >= 200:
                return status, text + body.decode("utf-8", "surrogateescape")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def tcp_invite(
    port: int, local_port: int, call_id: str, body: bytes, ctype: str, transport: str = "tcp", headers: Any = ()
) -> bytes:
    lines = [
        f"INVITE sip:gateway@127.0.0.1:{port};transport={transport} SIP/2.0",
        f"Via: SIP/2.0/{transport.upper()} 127.0.0.1:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport",
        f"From: <sip:src@127.0.0.1:{local_port};transport={transport}>;tag=tcp1",
        f"To: <sip:gateway@127.0.0.1:{port}>",
        f"Call-ID: {call_id}",
        "CSeq: 1 INVITE",
        f"Contact: <sip:src@127.0.0.1:{local_port};transport={transport}>",
        "Max-Forwards: 70",
        *headers,
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_sixty_kilobyte_siprec_invite_over_tcp(tmp_path: Path) -> None:
    """SIPREC bodies are big: SDP + metadata + a vendor part (skipped by the gateway) of ~56 KB,
    over TCP to Kamailio, which sends it on over TCP (above udp_mtu) to the instance the Call-ID
    hashes to; ACK and BYE follow over the same connection."""
    async with running_cluster(tmp_path) as cluster:
        await cluster.conversation("big-1")
        body, ctype = multipart(
            [
                ("application/sdp", sdp(streams=2, labels=True, port=free_block(4, 40000, 59000))),
                ("application/rs-metadata+xml", metadata("sip:alice@pbx.example", "sip:+15550100@pstn", "big-1")),
                ("application/gtd", b"IAM,\r\n" + b"PRN,isdn*,,ITU,,\r\n" * 3300),
            ]
        )
        sip = await TcpSip.connect(cluster.kamailio.port)
        try:
            call_id = f"{uuid.uuid4().hex}@src"
            invite = tcp_invite(
                cluster.kamailio.port, sip.local_port, call_id, body, ctype, headers=["Require: siprec"]
            )
            assert 58_000 < len(invite) < 64_000, len(invite)
            sip.send(invite)
            status, answer = await sip.final()
            assert status == 200, answer
            sip.send(in_dialog_request("ACK", invite, answer, 1))
            held = await cluster.where("big-1", ["agent", "customer"])
            assert held.uri == cluster.kamailio.destination_for(call_id)
            sip.send(in_dialog_request("BYE", invite, answer, 2))
            status, answer = await sip.final()
            assert status == 200, answer
            await cluster.where("big-1", [])
        finally:
            await sip.close()


@contextmanager
def refusing_instance(status: int, reason: str, extra: str = "") -> Iterator[tuple[str, list[int]]]:
    """A SIP peer in the dispatcher list that answers OPTIONS 200 (so it looks up) and every
    INVITE ``status``; yields its URI and the number of INVITEs it got."""
    import socket
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", free_block(1, 40000, 59000)))
    sock.settimeout(0.2)
    got = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            text = data.decode("utf-8", "surrogateescape")
            method = text.split(" ", 1)[0]
            if method not in ("INVITE", "OPTIONS"):
                continue  # the ACK of our answer
            head = text.split("\r\n\r\n", 1)[0].split("\r\n")
            keep = [ln for ln in head[1:] if ln.lower().startswith(("via:", "from:", "call-id:", "cseq:"))]
            to = next(ln for ln in head if ln.lower().startswith("to:"))
            if method == "INVITE":
                got[0] += 1
                line, to = f"SIP/2.0 {status} {reason}", to + ";tag=refuser"
            else:
                line = "SIP/2.0 200 OK"
            answer = [line, *keep, to, *([extra] if extra and method == "INVITE" else []), "Content-Length: 0"]
            sock.sendto(("\r\n".join(answer) + "\r\n\r\n").encode(), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"sip:127.0.0.1:{sock.getsockname()[1]}", got
    finally:
        stop.set()
        thread.join()
        sock.close()


@pytest.mark.parametrize(
    ("status", "reason", "extra"),
    [(503, "Service Unavailable", "Retry-After: 5"), (302, "Moved Temporarily", "Contact: <sip:elsewhere@10.9.9.9>")],
)
async def test_a_refusing_instance_passes_the_invite_on_never_a_redirect(
    tmp_path: Path, status: int, reason: str, extra: str
) -> None:
    """An instance answering 503 (full, draining) or, wrongly, a redirect: Kamailio tries the
    next instance; the platform gets the 200, never the 503 or the 3xx."""
    process = GatewayProcess(
        "gw", tmp_path / "gw", free_port(), free_block(3), instance_settings(rtp_port_base=free_block(64, 30000, 39000))
    )
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready)
        with refusing_instance(status, reason, extra) as (refuser, got):
            with start_kamailio(tmp_path / "kamailio", destinations=[refuser, process.sip_uri]) as k:
                async with aiohttp.ClientSession() as http:
                    api = GatewayClient(process.base_url, process.base_url, http)
                    cid = next(c for c in (f"refused-{n}" for n in range(200)) if k.destination_for(c) == refuser)
                    assert (await api.conversation(cid, sessions=["voice"])).status == 201
                    sip = RawSip()
                    try:
                        data, _, _ = sip.invite(
                            k.port, body=sdp(), headers={"X-Conversation-ID": cid, "X-Leg": "agent"}
                        )
                        code, text = await sip.request(data, k.port, timeout=8)
                        assert code == 200, text
                        assert got[0] == 1  # it was asked first, as the hash said
                        sip.send(in_dialog_request("BYE", data, text, 2), k.port)
                        bye = await sip.recv(5)
                        assert bye is not None and bye.startswith(b"SIP/2.0 200"), bye
                    finally:
                        sip.close()
    finally:
        await asyncio.to_thread(process.stop)


async def test_draining_instance_gets_no_new_invite_and_keeps_its_calls(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as cluster:
        k, (one, two) = cluster.kamailio, cluster.instances
        held_cid, new_cid = cluster.cid_for(one, "held"), cluster.cid_for(one, "after-drain")
        await cluster.conversation(held_cid)
        await cluster.conversation(new_cid)
        sip = RawSip()
        try:
            data, _, _ = sip.invite(k.port, body=sdp(), headers={"X-Conversation-ID": held_cid, "X-Leg": "agent"})
            code, held = await sip.request(data, k.port)
            assert code == 200, held
            assert await cluster.where(held_cid, ["agent"]) is one

            one.process.terminate()  # drains: OPTIONS and new INVITEs 503, stays up for its call
            await asyncio.to_thread(k.wait_state, one.uri, "I")
            before = await one.invites()
            invite, _, _ = sip.invite(k.port, body=sdp(), headers={"X-Conversation-ID": new_cid, "X-Leg": "agent"})
            code, text = await sip.request(invite, k.port)
            assert code == 200, text
            assert await cluster.where(new_cid, ["agent"]) is two
            assert await one.invites() == before  # the draining instance was not even asked
            sip.send(in_dialog_request("BYE", invite, text, 2), k.port)
            bye = await sip.recv(5)
            assert bye is not None and bye.startswith(b"SIP/2.0 200"), bye

            # The call it kept still works through Kamailio and its front: a re-INVITE (the
            # platform refreshing the session) is answered, its BYE ends it, then the instance stops.
            reinvite = in_dialog_request("INVITE", data, held, 2)
            contact = next(ln for ln in data.decode().split("\r\n") if ln.startswith("Contact:"))
            offer = sdp()
            reinvite = reinvite.replace(
                b"Content-Length: 0\r\n\r\n",
                f"{contact}\r\nContent-Type: application/sdp\r\nContent-Length: {len(offer)}\r\n\r\n".encode() + offer,
            )
            code, refreshed = await sip.request(reinvite, k.port, ack=False)
            assert code == 200 and "m=audio" in refreshed, refreshed
            ack = in_dialog_request("ACK", data, held, 2).replace(b"CSeq: 1 ACK", b"CSeq: 2 ACK")
            sip.send(ack, k.port)
            sip.send(in_dialog_request("BYE", data, held, 3), k.port)
            bye = await sip.recv(5)
            assert bye is not None and bye.startswith(b"SIP/2.0 200"), bye
            assert one.process.process is not None
            assert await asyncio.to_thread(one.process.process.wait, 20) == 0
        finally:
            sip.close()


async def test_killed_instance_fails_over_then_gets_nothing(tmp_path: Path) -> None:
    """Probes far apart (30 s), so the first INVITE after the kill really goes to the dead
    instance: no answer within the fr_timer, it is marked down and the next one answers."""
    async with running_cluster(tmp_path, ping_interval=30) as cluster:
        k, (one, two) = cluster.kamailio, cluster.instances
        cids = [cluster.cid_for(two, "killed"), cluster.cid_for(two, "later")]
        for cid in cids:
            await cluster.conversation(cid)
        await asyncio.to_thread(two.process.kill)
        sip = RawSip()
        try:
            for cid in cids:
                data, _, _ = sip.invite(k.port, body=sdp(), headers={"X-Conversation-ID": cid, "X-Leg": "agent"})
                code, text = await sip.request(data, k.port, timeout=10)
                assert code == 200, text
                assert response_header(text, "record-route"), text
                assert await one.legs(cid) == ["agent"]
                assert k.states()[two.uri].startswith("I")  # out until a probe gets a 200 again
                sip.send(in_dialog_request("BYE", data, text, 2), k.port)
                bye = await sip.recv(5)
                assert bye is not None and bye.startswith(b"SIP/2.0 200"), bye
            assert await asyncio.to_thread(k.options) == 200  # the cluster is up while one instance is

            # The last instance dies too: the platform gets 503 + Retry-After (never silence, never a redirect).
            await asyncio.to_thread(one.process.kill)
            data, _, _ = sip.invite(k.port, body=sdp(), headers={"X-Conversation-ID": cids[0], "X-Leg": "agent"})
            code, text = await sip.request(data, k.port, timeout=10)
            assert code == 503 and response_header(text, "retry-after"), text
            assert await asyncio.to_thread(k.options) == 503
        finally:
            sip.close()


async def test_sip_over_tls_to_kamailio(tmp_path: Path) -> None:
    """A platform that speaks SIP over TLS only: TLS to Kamailio (KAMAILIO_TLS_PORT), which
    verifies nothing of it and sends the call on to the instance over UDP; ACK and BYE come back
    over the same TLS connection and reach the instance (Kamailio Record-Routes both sides)."""
    import ssl

    pki = make_pki(tmp_path / "pki")
    process = GatewayProcess(
        "gw", tmp_path / "gw", free_port(), free_block(3), instance_settings(rtp_port_base=free_block(64, 30000, 39000))
    )
    process.start()
    try:
        await asyncio.to_thread(process.wait_ready)
        with start_kamailio(
            tmp_path / "kamailio",
            destinations=[process.sip_uri],
            tls_cert=pki["gateway.pem"],
            tls_key=pki["gateway.key"],
        ) as k:
            async with aiohttp.ClientSession() as http:
                api = GatewayClient(process.base_url, process.base_url, http)
                assert (await api.conversation("tls-1", sessions=["voice"])).status == 201
                context = ssl.create_default_context(cafile=str(pki["ca"]))  # the platform checks Kamailio
                sip = await TcpSip.connect(k.tls_port, ssl=context)
                try:
                    invite = tcp_invite(
                        k.tls_port, sip.local_port, uuid.uuid4().hex, sdp(), "application/sdp", "tls",
                        ["X-Conversation-ID: tls-1", "X-Leg: agent"],
                    )  # fmt: skip
                    sip.send(invite)
                    status, answer = await sip.final()
                    assert status == 200, answer
                    routes = ",".join(response_header(answer, "record-route"))
                    assert f":{k.tls_port};transport=tls" in routes, routes  # later requests come back over TLS
                    sip.send(in_dialog_request("ACK", invite, answer, 1))
                    for _ in range(50):
                        legs = await api.call("GET", "/v1/conversations/tls-1", await api.platform())
                        if legs.body["voice_legs"] == ["agent"]:
                            break
                        await asyncio.sleep(0.1)
                    assert legs.body["voice_legs"] == ["agent"], legs.body
                    sip.send(in_dialog_request("BYE", invite, answer, 2))
                    status, answer = await sip.final()
                    assert status == 200, answer
                finally:
                    await sip.close()
    finally:
        await asyncio.to_thread(process.stop, 5.0)


async def test_a_flooding_platform_address_is_cut_at_kamailio(tmp_path: Path) -> None:
    """Behind Kamailio the instances see one source address, so Kamailio limits each platform
    address (pike): beyond KAMAILIO_PIKE_DENSITY INVITEs per 2 s it answers 503 itself."""
    with refusing_instance(404, "Not Found") as (instance, got):
        with start_kamailio(tmp_path / "kamailio", destinations=[instance], pike_density=10) as k:
            sip = RawSip()
            try:
                for _ in range(40):
                    data, _, _ = sip.invite(k.port, body=sdp())
                    sip.send(data, k.port)
                finals: dict[str, str] = {}  # Call-ID -> final status line (Kamailio retransmits un-ACKed ones)
                while (answer := await sip.recv(2)) is not None:
                    text = answer.decode()
                    if not text.startswith("SIP/2.0 1"):
                        finals[response_header(text, "call-id")[0]] = text.split("\r\n", 1)[0]
            finally:
                sip.close()
    statuses = list(finals.values())
    assert len(statuses) == 40, statuses
    assert statuses.count("SIP/2.0 503 Rate Limited") >= 20 and got[0] <= 20, (statuses, got)
    assert statuses.count("SIP/2.0 404 Not Found") == got[0]  # the instance's own answers go back as they are
