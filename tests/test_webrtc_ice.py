"""ICE settings of the WebRTC plane: no public STUN by default, loopback host candidates on
request (without touching other peer connections), offer candidate filtering."""

from __future__ import annotations

import aioice.ice
import pytest

from gateway.config import Settings
from gateway.media.ice import filter_offer_candidates, host_addresses, loopback_only, rtc_configuration
from gateway.media.whep import _munge_stereo

pytestmark = pytest.mark.unit

OFFER = "\r\n".join(
    [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111 0",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "a=rtpmap:0 PCMU/8000",
        "a=candidate:1 1 udp 2113937151 0b5c1e8e-1f8e-4a3c-9d7e-2c1a.local 50000 typ host",
        "a=candidate:2 1 udp 2113937151 192.0.2.2 50001 typ host",
        "a=candidate:3 1 udp 2113937151 127.0.0.1 50002 typ host",
        "a=candidate:4 1 udp 2113937151 ::1 50003 typ host",
        "",
    ]
)


def test_no_ice_servers_unless_configured() -> None:
    assert rtc_configuration(Settings()).iceServers == []
    servers = rtc_configuration(Settings(ice_servers="stun:127.0.0.1:3478, turn:127.0.0.1:3479")).iceServers
    assert [s.urls for s in servers] == ["stun:127.0.0.1:3478", "turn:127.0.0.1:3479"]


def test_host_addresses_only_inside_the_block() -> None:
    default = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    assert "127.0.0.1" not in default  # aioice's own behaviour
    with host_addresses("127.0.0.1, ::1"):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == default
    with host_addresses(""):  # empty setting: aioice decides
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == default


def test_offer_filter_keeps_loopback_only_when_bound_to_loopback() -> None:
    assert loopback_only("127.0.0.1") and not loopback_only("") and not loopback_only("127.0.0.1,192.0.2.2")
    kept = filter_offer_candidates(OFFER, keep_loopback_only=True)
    cands = [ln for ln in kept.splitlines() if ln.startswith("a=candidate")]
    assert [c.split()[4] for c in cands] == ["127.0.0.1", "::1"]
    assert filter_offer_candidates(OFFER, keep_loopback_only=False) == OFFER


def test_stereo_answer_munging() -> None:
    out = _munge_stereo(OFFER)
    assert "a=fmtp:111 minptime=10;useinbandfec=1;stereo=1;sprop-stereo=1" in out
    bare = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 opus/48000/2\r\n"
    assert "a=fmtp:96 stereo=1;sprop-stereo=1" in _munge_stereo(bare)
