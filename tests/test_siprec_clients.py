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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from gateway.config import Settings
from gateway.sip.message import parse_message, parse_sdp
from gateway.sip.parties import Parties
from gateway.sip.plane import SipPlane

from .sip_support import FakeHooks, RawSip, free_udp_block, in_dialog_request, require_pjsua2, tone_levels
from .siprec_clients import AGENT_HZ, CUSTOMER_HZ, SCENARIOS, Scenario, send_rtp, siprec_invite
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
    settings = Settings(
        sip_port=free_udp_block(3),
        sip_workers=1,
        calls_per_worker=4,
        rtp_port_base=free_udp_block(40, 30000, 39000),
        data_dir=str(tmp_path),
    )
    plane = SipPlane(settings, hooks)
    await plane.start()
    try:
        yield plane, hooks
    finally:
        await plane.stop()


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


async def run_client(plane: SipPlane, hooks: FakeHooks, sc: Scenario) -> None:
    """Register the conversation as the platform would, send ``sc``'s INVITE, play its tones,
    check the answer, what each leg carries, and hang up."""
    hooks.parties[CID] = Parties("alice", tuple(sc.agent_addresses), tuple(sc.customer_addresses))
    for key in sc.recording_keys:
        hooks.recording_keys[key] = CID
    rtp = free_udp_block(2 * len(sc.streams) + 2, 40000, 59000)
    probe = siprec_invite(sc, plane.settings.sip_port, 5999, rtp, "UDP")
    transport = "TCP" if len(probe) > UDP_LIMIT else "UDP"
    if len(probe) > 4000:
        require_pjsua2_large_messages()
    sig = Signalling(plane.settings.sip_port, transport)
    local = await sig.open()
    invite = siprec_invite(sc, plane.settings.sip_port, local, rtp, transport)
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
                senders.append(asyncio.create_task(send_rtp(dest, rtp + 2 * i, stream.tone, codec, 6.0)))
        legs = set(sc.expected.values())
        for leg in legs:
            await hooks.wait_for("leg_started", CID, leg)
        assert {s["leg"]: s["label"] for s in hooks.streams[CID]} == {v: k for k, v in sc.expected.items()}
        await asyncio.sleep(0.5)
        agent, customer = await record_tap(plane, CID, 1.5)
        tone_of = {
            leg: sc.streams[[s.label for s in sc.streams].index(label)].tone for label, leg in sc.expected.items()
        }
        if "mixed" in legs:
            # A mixed stream reaches the monitor as it is (on the agent side of the tap, the
            # customer side silent: a mono mix of the two is the stream itself).
            assert heard(agent)[tone_of["mixed"] or 0] > 0.5, (sc.name, heard(agent))
            assert heard(customer) == {AGENT_HZ: 0.0, CUSTOMER_HZ: 0.0}, (sc.name, heard(customer))
        else:
            a, c = heard(agent), heard(customer)
            assert a[AGENT_HZ] > 0.5 and a[CUSTOMER_HZ] < 0.1, (sc.name, "agent leg", a)
            assert c[CUSTOMER_HZ] > 0.5 and c[AGENT_HZ] < 0.1, (sc.name, "customer leg", c)
        sig.in_dialog("BYE", invite, ok, 102)
        for leg in legs:
            await hooks.wait_for("leg_ended", CID, leg, "bye", timeout=5)
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        sig.close()


@pytest.mark.parametrize("make", SCENARIOS, ids=lambda f: f.__name__)
async def test_a_siprec_client_as_sent(
    gw: tuple[SipPlane, FakeHooks], make: Callable[[], Scenario], tmp_path: Path
) -> None:
    plane, hooks = gw
    await run_client(plane, hooks, make())
    assert plane.stats()["worker_restarts"] == 0
