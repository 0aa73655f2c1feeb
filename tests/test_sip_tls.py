"""SIP over TLS and SRTP (SDES) end to end (issue 11, deliverable 5): the pjsua2 SIPREC source
calls the front over TLS with SRTP, the gateway calls a pjsua2 phone at a ``sips:`` URI with
SRTP, and the phone hears each leg's tone; plain RTP is refused with 488 when SRTP is required.

Certificates are made here (a CA, the gateway's, the phone's and the source's, for 127.0.0.1).
"""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.sip.plane import SipPlane

from .sip_support import (
    FakeHooks,
    Proc,
    RawSip,
    free_udp_block,
    read_wav,
    require_pjsua2,
    sdp,
    start_phone,
    start_siprec,
    started_plane,
    tone_levels,
    wait_until,
)
from .tls_support import make_pki

pytestmark = [pytest.mark.sip]

AGENT_HZ, CUSTOMER_HZ = 600.0, 1000.0
RATE = 8000


def tone_wav(path: Path, hz: float, seconds: float = 4.0) -> Path:
    t = np.arange(int(RATE * seconds)) / RATE
    pcm = (8000 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


def tls_args(pki: dict[str, Path], who: str, port: int, srtp: str) -> list[str]:
    return [
        "--tls-port", str(port), "--tls-cert", str(pki[f"{who}.pem"]), "--tls-key", str(pki[f"{who}.key"]),
        "--tls-ca", str(pki["ca"]), "--srtp", srtp,
    ]  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path)


@pytest.fixture
async def secure_gw(tmp_path: Path, pki: dict[str, Path]) -> AsyncIterator[tuple[SipPlane, FakeHooks]]:
    """A plane with a TLS listener (certificate of the CA above) and SRTP required."""
    require_pjsua2()
    hooks = FakeHooks({"c-1": "alice", "c-2": "alice"})
    base = free_udp_block(4)
    async with started_plane(
        tmp_path,
        hooks,
        sip_port=base,
        sip_tls_port=base + 3,
        sip_tls_cert=str(pki["gateway.pem"]),
        sip_tls_key=str(pki["gateway.key"]),
        sip_tls_ca=str(pki["ca"]),
        sip_srtp="mandatory",
        calls_per_worker=8,
        rtp_port_base=free_udp_block(60, 30000, 39000),
    ) as plane:
        assert plane.ready
        yield plane, hooks


async def start_tls_source(
    plane: SipPlane, pki: dict[str, Path], tmp_path: Path, cid: str, seconds: float, srtp: str
) -> Proc:
    """The pjsua2 SIPREC source calling the plane's TLS port for ``cid`` (agent and customer
    tones), with SRTP ``srtp`` (mandatory / optional / off) on its side."""
    src_port = free_udp_block(40, 40000, 59000)
    agent, customer = tone_wav(tmp_path / "a.wav", AGENT_HZ), tone_wav(tmp_path / "c.wav", CUSTOMER_HZ)
    extra = tls_args(pki, "source", src_port + 1, srtp)
    return await start_siprec(plane.settings.sip_tls_port, cid, "alice", agent, customer, seconds, extra=extra)


async def test_siprec_over_tls_and_srtp_to_a_sips_phone_hears_each_leg(
    secure_gw: tuple[SipPlane, FakeHooks], pki: dict[str, Path], tmp_path: Path
) -> None:
    plane, hooks = secure_gw
    src = await start_tls_source(plane, pki, tmp_path, "c-1", 12.0, "mandatory")
    try:
        await src.wait_line("CONNECTED", 8)
        await hooks.wait_for("leg_started", "c-1", "agent")
        await hooks.wait_for("leg_started", "c-1", "customer")
        # The INVITE came over TLS: the front holds a TLS connection from the source.
        assert any(c.tls and c.peer[0] == "127.0.0.1" for c in plane.front.connections)  # type: ignore[union-attr]
        phone_port = free_udp_block(30, 40000, 59000)
        rec = tmp_path / "phone.wav"
        phone = await start_phone(phone_port, rec, *tls_args(pki, "phone", phone_port + 1, "mandatory"))
        try:
            await plane.call_phone("c-1", "m-1", f"sips:tom@127.0.0.1:{phone_port + 1}")
            await phone.wait_line("CONNECTED", 8)
            line = next(x for _, x in phone.lines if x.startswith("CONNECTED"))
            assert "srtp=1" in line, line  # the phone answered RTP/SAVP with an SDES key
            await wait_until(lambda: rec.exists() and rec.stat().st_size > 2 * RATE * 3, 10, "3 s recorded")
        finally:
            await phone.stop()  # it hangs up: its BYE comes over TLS, through the front, to the worker
        await hooks.wait_for("phone_ended", "m-1", "left", timeout=5)
    finally:
        await src.stop()  # its BYE, over TLS too, ends both legs
    await hooks.wait_for("leg_ended", "c-1", "agent", "bye", timeout=5)
    heard, rate = read_wav(rec)
    heard = heard[rate // 2 :]  # past the first jitter-buffer fill
    assert np.abs(heard).max(initial=0) > 500, "the phone heard nothing"
    for start in range(0, len(heard) - rate // 2, rate // 2):
        levels = tone_levels(heard[start : start + rate // 2], rate, [AGENT_HZ, CUSTOMER_HZ])
        assert levels[AGENT_HZ] > 0.3 and levels[CUSTOMER_HZ] > 0.3, (start / rate, levels)


async def test_plain_rtp_is_refused_488_when_srtp_is_required(
    secure_gw: tuple[SipPlane, FakeHooks], pki: dict[str, Path], tmp_path: Path
) -> None:
    plane, hooks = secure_gw
    s = plane.settings
    # The pjsua2 source over TLS, offering plain RTP.
    src = await start_tls_source(plane, pki, tmp_path, "c-2", 2.0, "off")
    try:
        await src.wait_line("DISCONNECTED", 8)
        line = next(x for _, x in src.lines if x.startswith("DISCONNECTED"))
        assert line.startswith("DISCONNECTED 488"), line
    finally:
        await src.stop()
    # A hand-made per-leg INVITE over UDP with RTP/AVP: 488 at once, and nothing holds a slot.
    raw = RawSip()
    try:
        invite = raw.invite(s.sip_port, body=sdp(), headers={"X-Conversation-ID": "c-2", "X-Leg": "agent"})[0]
        code, text = await raw.request(invite, s.sip_port)
        assert code == 488, text
    finally:
        raw.close()
    assert not [e for e in hooks.events if e[0] == "leg_started"]
    assert plane.stats()["conversations"] == 0 and plane.stats()["reservations"] == 0
