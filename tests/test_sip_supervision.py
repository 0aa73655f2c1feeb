"""The SIP plane's placement and supervision against in-process fake workers (no pjsua2).

The fakes speak the real process protocol over the real socketpairs (``tests/fake_sip_worker.py``);
the SIP front's decisions are called directly. The same behaviours against real pjsua2 workers
and real peers: ``tests/test_sip_plane.py``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.sip.front import Refuse
from gateway.sip.message import parse_message
from gateway.sip.plane import SipPlane
from gateway.sip.protocol import Answer, Reject, SetTap, decode_leg_frame

from .fake_sip_worker import FakeWorker, FakeWorkers
from .sip_support import FakeHooks, sdp, wait_until

pytestmark = [pytest.mark.unit]


def invite(cid: str, leg: str, token: str = "") -> bytes:
    """A per-leg ingress INVITE as a platform sends it (with ``token``: as the front forwards it)."""
    lines = [
        "INVITE sip:gateway@127.0.0.1:5060 SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{uuid.uuid4().hex[:12]};rport",
        "From: <sip:platform@127.0.0.1:5070>;tag=abc",
        "To: <sip:gateway@127.0.0.1:5060>",
        f"Call-ID: {uuid.uuid4().hex}",
        "CSeq: 1 INVITE",
        "Contact: <sip:platform@127.0.0.1:5070>",
        f"X-Conversation-ID: {cid}",
        f"X-Leg: {leg}",
        "Content-Type: application/sdp",
    ]
    if token:
        lines.append(f"X-Gateway-Placement: {token}")
    body = sdp()
    return ("\r\n".join([*lines, f"Content-Length: {len(body)}"]) + "\r\n\r\n").encode() + body


@dataclass
class Placed:
    status: int  # 0: forwarded to ``worker`` with ``token``; else the front's own answer
    token: str = ""
    worker: int = -1


def place(plane: SipPlane, cid: str, leg: str) -> Placed:
    """What the front does with this INVITE (the plane's decision, without the UDP round trip)."""
    assert plane.front is not None
    decision = plane.front.decide(parse_message(invite(cid, leg)))
    if isinstance(decision, Refuse):
        return Placed(decision.status)
    port = decision.worker[1]
    return Placed(0, decision.token, next(w.index for w in plane.workers if w.sip_port == port))


async def connect_leg(
    plane: SipPlane, fakes: FakeWorkers, hooks: FakeHooks, cid: str, leg: str
) -> tuple[FakeWorker, int]:
    """A leg forwarded by the front to its worker, answered, media up; (its worker, its call key)."""
    r = place(plane, cid, leg)
    assert r.status == 0, r
    fake = fakes.on_port(plane.workers[r.worker].sip_port)
    call = fake.invite(invite(cid, leg, r.token))
    await hooks.wait_for("leg_started", cid, leg, timeout=2)
    return fake, call


@pytest.fixture
async def plane(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[SipPlane, FakeWorkers, FakeHooks]]:
    """A started plane on 2 fake workers; ``parametrize("plane", [{setting: value}], indirect=True)``
    overrides settings."""
    fakes = FakeWorkers()
    hooks = FakeHooks({f"c-{i}": "alice" for i in range(1, 6)})
    values: dict[str, Any] = {"sip_port": 0, "sip_workers": 2, "data_dir": str(tmp_path)}
    values.update(getattr(request, "param", {}))
    p = SipPlane(Settings(**values), hooks, spawn=fakes)
    await p.start()
    try:
        yield p, fakes, hooks
    finally:
        await p.stop()


@pytest.mark.parametrize("plane", [{"calls_per_worker": 4}], indirect=True)
async def test_a_conversation_lands_on_one_worker(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    assert p.ready and "pjsua2" not in sys.modules
    assert p.front is not None and p.front.options_ok()
    w_agent, _ = await connect_leg(p, fakes, hooks, "c-1", "agent")
    w_customer, _ = await connect_leg(p, fakes, hooks, "c-1", "customer")
    assert w_agent is w_customer and p.legs("c-1") == {"agent", "customer"}
    assert place(p, "c-1", "agent").status == 486  # that leg is connected
    # Footprint 3 of 4 calls (2 legs + the phone slot): the next conversation needs the other worker.
    other = place(p, "c-2", "agent")
    assert other.status == 0 and other.worker != p.worker_of("c-1")
    assert place(p, "c-2", "customer").worker == other.worker  # its second leg follows it
    assert place(p, "c-3", "agent").status == 503  # both workers hold a conversation
    assert not p.front.options_ok()
    s = p.stats()
    assert (s["conversations"], s["legs"], s["calls"], s["reservations"]) == (2, 2, 2, 2)


async def test_capacity_is_what_the_workers_report_and_load_spreads(
    plane: tuple[SipPlane, FakeWorkers, FakeHooks],
) -> None:
    p, fakes, hooks = plane
    s = p.stats()
    assert (s["calls_per_worker_limit"], s["capacity_calls"]) == (512, 1024)
    assert all(fakes.on_port(w.sip_port).args.max_calls == 0 for w in p.workers)  # the build decides
    hooks.convs.update({f"x-{i}": "alice" for i in range(40)})
    for i in range(40):
        await connect_leg(p, fakes, hooks, f"x-{i}", "agent")
    per_worker = [sum(p.worker_of(f"x-{i}") == w.index for i in range(40)) for w in p.workers]
    assert per_worker == [20, 20], per_worker


async def test_workers_on_the_pypi_wheel_warn_and_hold_four_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fakes = FakeWorkers()
    fakes.build_calls, fakes.pjsua2 = 4, "2.15.1"
    hooks = FakeHooks({f"c-{i}": "alice" for i in range(1, 4)})
    p = SipPlane(Settings(sip_port=0, sip_workers=2, data_dir=str(tmp_path)), hooks, spawn=fakes)
    with caplog.at_level("WARNING", logger="gateway.sip.supervisor"):
        await p.start()
    try:
        assert [r.getMessage() for r in caplog.records if "holds only 4 calls" in r.getMessage()], caplog.text
        s = p.stats()
        assert (s["calls_per_worker_limit"], s["capacity_calls"]) == (4, 8)
        assert place(p, "c-1", "agent").status == 0 and place(p, "c-2", "agent").status == 0
        assert place(p, "c-3", "agent").status == 503  # one per-leg conversation per 4-call worker
    finally:
        await p.stop()


@pytest.mark.parametrize("plane", [{"calls_per_worker": 4}], indirect=True)
async def test_a_worker_capped_at_four_calls_shows_in_metrics(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    s = p.stats()
    assert (s["calls_per_worker_limit"], s["capacity_calls"]) == (4, 8)
    assert [fakes.on_port(w.sip_port).args.max_calls for w in p.workers] == [4, 4]


@pytest.mark.parametrize("plane", [{"sip_reservation_seconds": 0.3}], indirect=True)
async def test_a_reservation_expires_and_its_token_dies(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, _hooks = plane
    r = place(p, "c-1", "agent")
    assert r.status == 0 and p.stats()["reservations"] == 1
    await wait_until(lambda: p.stats()["reservations"] == 0 and p.stats()["conversations"] == 0, 3, "expiry")
    fake = fakes.on_port(p.workers[r.worker].sip_port)
    late = fake.invite(invite("c-1", "agent", r.token))
    await wait_until(lambda: any(isinstance(c, Reject) and c.call == late for c in fake.commands), 2, "reject")
    assert [c.code for c in fake.commands if isinstance(c, Reject)] == [403]


async def test_an_invite_without_the_fronts_token_is_refused(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    fake = fakes.on_port(p.workers[0].sip_port)
    call = fake.invite(invite("c-1", "agent"))
    await wait_until(lambda: any(isinstance(c, Reject) and c.call == call for c in fake.commands), 2, "reject")
    # A placed INVITE that changed its leg on the way is refused too.
    r = place(p, "c-1", "agent")
    fake = fakes.on_port(p.workers[r.worker].sip_port)
    forged = fake.invite(invite("c-1", "customer", r.token))
    await wait_until(lambda: any(isinstance(c, Reject) and c.call == forged for c in fake.commands), 2, "reject")
    assert not hooks.events and p.stats()["calls"] == 0


async def test_a_latin1_display_name_is_answered_at_once(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    """pjsua hands the INVITE over with its Latin-1 byte surrogate-escaped: the plane answers it
    (it used to fail re-encoding it, and the worker held the call 5 s, then 500)."""
    p, fakes, hooks = plane
    r = place(p, "c-1", "agent")
    fake = fakes.on_port(p.workers[r.worker].sip_port)
    raw = invite("c-1", "agent", r.token).replace(b"From: <sip:", b'From: "Jos\xe9" <sip:', 1)
    call = fake.invite(raw)
    await wait_until(lambda: any(isinstance(c, Answer) and c.call == call for c in fake.commands), 2, "answer")
    await hooks.wait_for("leg_started", "c-1", "agent", timeout=2)


async def test_a_dead_worker_ends_its_calls_and_restarts_with_backoff(
    plane: tuple[SipPlane, FakeWorkers, FakeHooks],
) -> None:
    p, fakes, hooks = plane
    victim, _ = await connect_leg(p, fakes, hooks, "c-1", "agent")
    survivor, _ = await connect_leg(p, fakes, hooks, "c-2", "agent")
    assert victim is not survivor
    await p.call_phone("c-1", "m-1", "sip:sam@127.0.0.1:5090")
    tap = p.open_tap("c-1")
    index = p.worker_of("c-1")
    assert index is not None
    port = p.workers[index].sip_port
    victim.crash()
    await hooks.wait_for("phone_ended", "m-1", "media_failure", timeout=2)
    await hooks.wait_for("leg_ended", "c-1", "agent", "media_failure", timeout=2)
    with pytest.raises(EOFError):
        while True:
            await asyncio.wait_for(tap.next_frame(), 2)
    assert p.legs("c-2") == {"agent"} and not [e for e in hooks.events if e[0] == "leg_ended" and e[1] == "c-2"]
    await wait_until(lambda: p.ready and fakes.on_port(port) is not victim, 3, "restart")
    assert p.stats()["worker_restarts"] == 1 and p.worker_pids()[index] == fakes.on_port(port).pid
    assert p.stats()["conversations"] == 1 and p.stats()["phones"] == 0
    # It dies again at once: the next start waits twice as long (0.2 s, then 0.4 s).
    fakes.on_port(port).crash()
    await wait_until(lambda: p.ready and len(fakes.spawn_times(port)) == 3, 3, "second restart")
    first, second, third = fakes.spawn_times(port)
    assert second - first >= 0.2 and third - second >= 0.4
    # The restarted worker takes new conversations.
    again, _ = await connect_leg(p, fakes, hooks, "c-3", "agent")
    assert again is fakes.on_port(port)


@pytest.mark.parametrize("plane", [{"sip_hung_seconds": 0.5}], indirect=True)
async def test_a_hung_worker_is_killed_and_restarted(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    stuck, _ = await connect_leg(p, fakes, hooks, "c-1", "agent")
    stuck.freeze()
    await hooks.wait_for("leg_ended", "c-1", "agent", "media_failure", timeout=4)
    assert stuck.returncode == -9
    await wait_until(lambda: p.ready, 3, "restart")
    s = p.stats()
    assert (s["worker_hung_kills"], s["worker_restarts"], s["workers_ready"]) == (1, 1, 2)


async def test_phone_requests_and_their_endings(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    fake, agent_call = await connect_leg(p, fakes, hooks, "c-1", "agent")
    await p.call_phone("c-1", "m-1", "sip:sam@127.0.0.1:5090")
    with pytest.raises(GatewayError) as busy:
        await p.call_phone("c-1", "m-2", "sip:tom@127.0.0.1:5090")
    assert busy.value.code == "voice_monitor_busy"
    await p.hang_up_phone("m-1")
    await wait_until(lambda: p.stats()["phones"] == 0, 2, "phone gone")
    assert not [e for e in hooks.events if e[0] == "phone_ended"], "our own hang-up is not reported"
    fake.phone_refusal = "486 Busy Here"
    with pytest.raises(GatewayError) as refused:
        await p.call_phone("c-1", "m-3", "sip:sam@127.0.0.1:5090")
    assert refused.value.code == "phone_unreachable" and p.stats()["phones"] == 0
    fake.phone_refusal = ""
    await p.call_phone("c-1", "m-4", "sip:sam@127.0.0.1:5090")
    fake.phone_hangs_up("m-4")
    await hooks.wait_for("phone_ended", "m-4", "left", timeout=2)
    # The last leg ends: the conversation's slots come back.
    fake.bye(agent_call)
    await hooks.wait_for("leg_ended", "c-1", "agent", "bye", timeout=2)
    await wait_until(lambda: p.stats()["conversations"] == 0, 2, "release")


async def test_taps_switch_the_worker_and_get_its_frames(plane: tuple[SipPlane, FakeWorkers, FakeHooks]) -> None:
    p, fakes, hooks = plane
    tap = p.open_tap("c-1")  # before the legs: the worker is told once the conversation is placed
    fake, call = await connect_leg(p, fakes, hooks, "c-1", "agent")
    await wait_until(lambda: "c-1" in fake.tapped, 2, "tap on")
    frames = [await asyncio.wait_for(tap.next_frame(), 2) for _ in range(5)]
    assert all(f.conversation == "c-1" and f.sample_rate == 8000 and f.samples == 160 for f in frames)
    assert all(np.all(f.agent == f.seq) and np.all(f.customer == -f.seq) for f in frames)
    second = p.open_tap("c-1")
    tap.close()
    assert "c-1" in fake.tapped and p.stats()["taps"] == 1
    second.close()
    await wait_until(lambda: "c-1" not in fake.tapped, 2, "tap off")
    assert [c.on for c in fake.commands if isinstance(c, SetTap)] == [True, False]
    assert p.stats()["frames_received"] >= 5
    fake.bye(call)


async def test_frames_forwarded_straight_to_a_media_process_socket(
    plane: tuple[SipPlane, FakeWorkers, FakeHooks], tmp_path: Path
) -> None:
    p, fakes, hooks = plane
    path = str(tmp_path / "media.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(4)
    server.settimeout(2)
    try:
        p.forward_frames("c-1", path, True)  # before the legs: sent once the conversation is placed
        fake, call = await connect_leg(p, fakes, hooks, "c-1", "agent")
        loop = asyncio.get_running_loop()
        conn = (await loop.run_in_executor(None, server.accept))[0]
        conn.setblocking(False)
        frames = [decode_leg_frame(await asyncio.wait_for(loop.sock_recv(conn, 4096), 2)) for _ in range(3)]
        assert all(f.conversation == "c-1" and np.all(f.agent == f.seq) for f in frames)
        assert p.stats()["frames_received"] == 0  # the main process never saw them
        p.forward_frames("c-1", path, True)  # idempotent: one SetTap per change
        p.forward_frames("c-1", path, False)
        await wait_until(lambda: "c-1" not in fake.tapped, 2, "forward off")
        assert [(c.on, c.to) for c in fake.commands if isinstance(c, SetTap)] == [(True, path), (False, path)]
        fake.bye(call)
        conn.close()
    finally:
        server.close()


async def test_start_reports_a_worker_that_cannot_start(tmp_path: Path) -> None:
    fakes = FakeWorkers()
    fakes.fatal = "pj: address in use"
    settings = Settings(sip_port=0, sip_workers=1, data_dir=str(tmp_path), sip_worker_ready_timeout=0.5)
    p = SipPlane(settings, FakeHooks(), spawn=fakes)
    with pytest.raises(RuntimeError, match="address in use"):
        await p.start()
    assert not p.ready


@pytest.mark.parametrize("plane", [{"sip_command_timeout": 0.3, "sip_hung_seconds": 60.0}], indirect=True)
async def test_a_command_without_reply_times_out_and_holds_nothing(
    plane: tuple[SipPlane, FakeWorkers, FakeHooks],
) -> None:
    p, fakes, hooks = plane
    fake, _ = await connect_leg(p, fakes, hooks, "c-1", "agent")
    fake.freeze()
    with pytest.raises(TimeoutError):
        await p.call_phone("c-1", "m-1", "sip:sam@127.0.0.1:5090")
    assert p.stats()["phones"] == 0 and p.stats()["calls"] == 1


async def test_stop_hangs_up_every_call_as_shutdown(tmp_path: Path) -> None:
    fakes = FakeWorkers()
    hooks = FakeHooks({"c-1": "alice"})
    p = SipPlane(Settings(sip_port=0, sip_workers=1, data_dir=str(tmp_path)), hooks, spawn=fakes)
    await p.start()
    fake, _ = await connect_leg(p, fakes, hooks, "c-1", "agent")
    await p.stop()
    assert ("leg_ended", "c-1", "agent", "shutdown") in hooks.events
    assert fake.returncode == 0 and not p.ready
    assert p.stats()["worker_restarts"] == 0
