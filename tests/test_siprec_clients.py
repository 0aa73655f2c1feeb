"""SIPREC clients shaped like six real ones (tests/siprec_clients.py) against real pjsua2
workers (issue 13): one plain INVITE to the gateway's SIP address (no redirect to follow), over
TCP when it is over 1300 bytes (RFC 3261 §18.1.1), a tone per leg (600 Hz agent, 1000 Hz
customer) sent as raw RTP into each audio stream, and the monitor's tap hearing the right tone
on the right leg. The conversation is found by what the platform registered (recording keys,
participants), never by an ``X-Conversation-ID``.

Needs pjsua2; a missing tool fails, never skips. An INVITE over 4000 bytes also needs a pjsua2
that reads large messages (the gate of tests/test_sip_front_calls.py says what to build).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.api.context import SIP
from gateway.sip.message import parse_message, parse_sdp
from gateway.sip.parties import Parties
from gateway.sip.plane import SipPlane

from .sip_support import (
    FakeHooks,
    RawSip,
    free_udp_block,
    in_dialog_request,
    read_wav,
    require_pjsua2,
    sip_gateway_settings,
    start_phone,
    started_plane,
    tone_levels,
    wait_until,
)
from .siprec_clients import AGENT_HZ, CUSTOMER_HZ, SCENARIOS, Scenario, ribbon, send_rtp, siprec_invite
from .support import running_gateway
from .test_sip_front import TcpSip
from .test_sip_front_calls import require_pjsua2_large_messages

pytestmark = [pytest.mark.sip]

#: RFC 3261 §18.1.1: a request within 200 bytes of the path MTU (1500) goes over TCP.
UDP_LIMIT = 1300
CID = "conv-siprec"


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[tuple[SipPlane, FakeHooks]]:
    require_pjsua2()
    hooks = FakeHooks({})
    async with started_plane(tmp_path, hooks, calls_per_worker=4) as plane:
        yield plane, hooks


class Signalling:
    """The SIPREC client's SIP: UDP or TCP to the gateway's one address."""

    def __init__(self, port: int, transport: str) -> None:
        self.port, self.transport = port, transport
        self.udp: RawSip | None = None
        self.tcp: TcpSip | None = None

    async def open(self) -> int:
        if self.transport == "TCP":
            self.tcp = await TcpSip.connect(self.port)
            return self.tcp.port
        self.udp = RawSip()
        return self.udp.port

    def send(self, data: bytes) -> None:
        if self.tcp is not None:
            self.tcp.send(data)
        elif self.udp is not None:
            self.udp.send(data, self.port)

    async def final(self, timeout: float = 8.0) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            got = await (self.tcp.recv(left) if self.tcp is not None else self.udp.recv(left))  # type: ignore[union-attr]
            if got is None:
                break
            if int(got.split(b" ", 2)[1]) >= 200:
                return got.decode("utf-8", "surrogateescape")
        raise AssertionError("no final answer to the INVITE")

    def in_dialog(self, method: str, invite: bytes, ok: str, cseq: int) -> None:
        data = in_dialog_request(method, invite, ok, cseq)
        if self.transport == "TCP":
            data = data.replace(b"SIP/2.0/UDP", b"SIP/2.0/TCP", 1)
        self.send(data)

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        if self.udp is not None:
            self.udp.close()


async def record_tap(plane: SipPlane, cid: str, seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """What a monitor's tap receives for ``seconds``: agent and customer samples."""
    tap = plane.open_tap(cid, maxsize=500)
    agent: list[np.ndarray] = []
    customer: list[np.ndarray] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    try:
        while loop.time() < end:
            try:
                frame = await asyncio.wait_for(tap.next_frame(), max(0.01, end - loop.time()))
            except TimeoutError:
                break
            agent.append(frame.agent)
            customer.append(frame.customer)
    finally:
        tap.close()
    assert agent, "the tap received nothing"
    return np.concatenate(agent).astype("float64"), np.concatenate(customer).astype("float64")


def heard(x: np.ndarray) -> dict[float, float]:
    """Tone levels of the last second; both 0 when the leg is silent."""
    x = x[-8000:]
    if float(np.abs(x).max()) < 200:
        return {AGENT_HZ: 0.0, CUSTOMER_HZ: 0.0}
    return tone_levels(x, 8000, [AGENT_HZ, CUSTOMER_HZ])


@contextlib.asynccontextmanager
async def siprec_call(port: int, sc: Scenario) -> AsyncIterator[None]:
    """``sc``'s client: its INVITE to the gateway's SIP address ``port`` (TCP when over 1300
    bytes), the answer checked (video refused with port 0, the offerer's codec kept), a tone
    into each audio stream while the block runs, then BYE."""
    rtp = free_udp_block(2 * len(sc.streams) + 2, 40000, 59000)
    probe = siprec_invite(sc, port, 5999, rtp, "UDP")
    transport = "TCP" if len(probe) > UDP_LIMIT else "UDP"
    if len(probe) > 4000:
        require_pjsua2_large_messages()
    sig = Signalling(port, transport)
    local = await sig.open()
    invite = siprec_invite(sc, port, local, rtp, transport)
    senders: list[asyncio.Task[None]] = []
    try:
        sig.send(invite)
        ok = await sig.final()
        assert ok.startswith("SIP/2.0 200"), ok[:300]
        sig.in_dialog("ACK", invite, ok, 101)
        answer = parse_sdp(parse_message(ok.encode("utf-8", "surrogateescape")).body)
        assert len(answer) == len(sc.streams), "one answered m-line per offered m-line (RFC 3264 §6)"
        for i, (stream, m) in enumerate(zip(sc.streams, answer, strict=True)):
            if stream.media != "audio":
                assert m.port == 0, f"{sc.name}: the {stream.media} stream must be refused with port 0"
                continue
            if stream.tone is not None:
                assert m.port != 0, f"{sc.name}: audio stream {i} refused"
                codec = {0: "pcmu", 8: "pcma"}[m.payloads[0]]
                assert m.payloads[0] == int(stream.payloads.split()[0]), "the offerer's codec order is kept"
                dest = ("127.0.0.1", m.port)
                senders.append(asyncio.create_task(send_rtp(dest, rtp + 2 * i, stream.tone, codec, 8.0)))
        yield
        sig.in_dialog("BYE", invite, ok, 102)
        await asyncio.sleep(0.2)  # the BYE leaves before the connection closes
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        sig.close()


async def phone_hears(plane: SipPlane, tmp: Path) -> dict[float, float]:
    """Call a pjsua2 phone for the conversation (as a SIP voice monitor), record 1.5 s."""
    port = free_udp_block(30, 40000, 59000)
    rec = tmp / "phone.wav"
    phone = await start_phone(port, rec)
    try:
        await plane.call_phone(CID, "m-phone", f"sip:sup@127.0.0.1:{port}")
        await phone.wait_line("CONNECTED", 5)
        await asyncio.sleep(1.5)
        await plane.hang_up_phone("m-phone")
        await phone.wait_line("DISCONNECTED", 3)
    finally:
        await phone.stop()
    samples, rate = read_wav(rec)
    return tone_levels(samples[-6000:], rate, [AGENT_HZ, CUSTOMER_HZ])


async def run_client(plane: SipPlane, hooks: FakeHooks, sc: Scenario, tmp: Path) -> None:
    """Register the conversation as the platform would, run ``sc``'s call, and check what
    each leg carries on the monitor's tap."""
    hooks.parties[CID] = Parties("alice", tuple(sc.agent_addresses), tuple(sc.customer_addresses))
    for key in sc.recording_keys:
        hooks.recording_keys[key] = CID
    legs = set(sc.expected.values())
    async with siprec_call(plane.settings.sip_port, sc):
        for leg in legs:
            await hooks.wait_for("leg_started", CID, leg)
        assert {s["leg"]: s["label"] for s in hooks.streams[CID]} == {v: k for k, v in sc.expected.items()}
        await asyncio.sleep(0.5)
        agent, customer = await record_tap(plane, CID, 1.5)
        phone_heard = await phone_hears(plane, tmp) if "mixed" in legs else {}
    label_tone = {s.label: s.tone for s in sc.streams}
    if "mixed" in legs:
        # A mixed stream reaches the monitor as it is (on the agent side of the tap, the
        # customer side silent: a mono mix of the two is the stream itself); a phone hears it.
        mixed_tone = label_tone[next(label for label, leg in sc.expected.items() if leg == "mixed")] or 0.0
        assert heard(agent)[mixed_tone] > 0.5, (sc.name, heard(agent))
        assert heard(customer) == {AGENT_HZ: 0.0, CUSTOMER_HZ: 0.0}, (sc.name, heard(customer))
        assert phone_heard[mixed_tone] > 0.5, (sc.name, "phone", phone_heard)
    else:
        a, c = heard(agent), heard(customer)
        assert a[AGENT_HZ] > 0.5 and a[CUSTOMER_HZ] < 0.1, (sc.name, "agent leg", a)
        assert c[CUSTOMER_HZ] > 0.5 and c[AGENT_HZ] < 0.1, (sc.name, "customer leg", c)
    for leg in legs:
        await hooks.wait_for("leg_ended", CID, leg, "bye", timeout=5)


@pytest.mark.parametrize("make", SCENARIOS, ids=lambda f: f.__name__)
async def test_a_siprec_client_as_sent(
    gw: tuple[SipPlane, FakeHooks], make: Callable[[], Scenario], tmp_path: Path
) -> None:
    plane, hooks = gw
    await run_client(plane, hooks, make(), tmp_path)
    assert plane.stats()["worker_restarts"] == 0


async def test_an_unknown_recording_is_refused_404_and_logged(
    gw: tuple[SipPlane, FakeHooks], caplog: pytest.LogCaptureFixture
) -> None:
    """No X-Conversation-ID and no registered key: 404 at once, one log line saying why."""
    plane, hooks = gw
    sc = ribbon()  # Ribbon
    sig = Signalling(plane.settings.sip_port, "TCP")
    local = await sig.open()
    try:
        with caplog.at_level(logging.INFO, logger="gateway.sip.plane"):
            sig.send(siprec_invite(sc, plane.settings.sip_port, local, free_udp_block(4, 40000, 59000), "TCP"))
            assert (await sig.final()).startswith("SIP/2.0 404")
    finally:
        sig.close()
    refusals = [r for r in caplog.records if r.getMessage().startswith("sip: INVITE refused")]
    assert len(refusals) == 1 and getattr(refusals[0], "status", None) == 404
    assert "recording key" in getattr(refusals[0], "reason", "")
    # Registered, but the agent is nobody in the metadata: 404 with the conversation id.
    hooks.parties[CID] = Parties("alice", ("4999",))
    hooks.recording_keys["1593829401"] = CID
    caplog.clear()
    sig = Signalling(plane.settings.sip_port, "TCP")
    local = await sig.open()
    try:
        with caplog.at_level(logging.INFO, logger="gateway.sip.plane"):
            sig.send(siprec_invite(sc, plane.settings.sip_port, local, free_udp_block(4, 40000, 59000), "TCP"))
            assert (await sig.final()).startswith("SIP/2.0 404")
    finally:
        sig.close()
    refusal = next(r for r in caplog.records if r.getMessage().startswith("sip: INVITE refused"))
    assert getattr(refusal, "conversation", None) == CID and "agent" in getattr(refusal, "reason", "")


@pytest.mark.api
async def test_through_the_api_recording_keys_participants_voice_streams_and_a_phone(tmp_path: Path) -> None:
    """The platform PUTs the conversation with the Ribbon call's GCID and the parties'
    addresses; the SBC's INVITE (no X-Conversation-ID) finds it; GET shows which stream became
    which leg; a supervisor's SIP phone hears both tones; after BYE the streams are gone."""
    require_pjsua2()
    sc = ribbon()
    sip_port = free_udp_block(3)
    settings = sip_gateway_settings(tmp_path, sip_port)
    async with running_gateway(settings) as gw:
        put = await gw.conversation(
            "conv-ribbon",
            recording_keys=sc.recording_keys,
            participants={"agent": sc.agent_addresses, "customer": sc.customer_addresses},
        )
        assert put.status == 201, put.body
        sam = await gw.login("sam")
        async with siprec_call(sip_port, sc):
            await wait_until(lambda: gw.app[SIP].legs("conv-ribbon") == {"agent", "customer"}, 10, "both legs")
            got = await gw.call("GET", "/v1/conversations/conv-ribbon", sam)
            streams = sorted(got.body["voice_streams"], key=lambda s: s["leg"])
            assert streams == [
                {"leg": "agent", "label": "2", "participant": "2210@10.1.1.30"},
                {"leg": "customer", "label": "1", "participant": "+16135550142@10.1.1.20"},
            ], got.body
            phone_port = free_udp_block(30, 40000, 59000)
            rec = tmp_path / "ribbon_phone.wav"
            phone = await start_phone(phone_port, rec)
            try:
                ans = await gw.monitor("sam", "conv-ribbon", {"kind": "sip", "uri": f"sip:sam@127.0.0.1:{phone_port}"})
                assert ans.status == 201 and "voice" in ans.body["channels"], ans.body
                await phone.wait_line("CONNECTED", 5)
                await asyncio.sleep(1.5)
                assert (await gw.call("DELETE", f"/v1/monitors/{ans.body['id']}", sam)).status == 204
                await phone.wait_line("DISCONNECTED", 3)
            finally:
                await phone.stop()
        await wait_until(lambda: not gw.app[SIP].legs("conv-ribbon"), 5, "legs ended")
        got = await gw.call("GET", "/v1/conversations/conv-ribbon", sam)
        assert got.body["voice_streams"] == [] and got.body["voice_legs"] == []
    samples, rate = read_wav(rec)
    levels = tone_levels(samples[-6000:], rate, [AGENT_HZ, CUSTOMER_HZ])
    assert levels[AGENT_HZ] > 0.3 and levels[CUSTOMER_HZ] > 0.3, levels
