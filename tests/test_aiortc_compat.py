"""The aiortc/aioice internals the gateway uses (gateway/media/aiortc_compat.py), checked on real
objects of the installed versions: after an upgrade, this file fails first and says what moved."""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import struct

import aioice
import aioice.ice
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCRtpCodecParameters, RTCRtpSender, RTCSessionDescription
from aiortc.codecs import get_encoder

from devtools.fake_taps import tone
from gateway.media.aiortc_compat import (
    WRITTEN_FOR,
    can_send_rtp_itself,
    divert_inbound_rtp,
    ice_connection,
    override_host_addresses,
    sender_ssrc,
    srtp_receive_context,
    srtp_route,
)
from gateway.media.g711 import G711PacketEncoder
from gateway.media.ice import host_addresses
from gateway.media.opus import OpusPacketEncoder

pytestmark = pytest.mark.webrtc


def _version(package: str) -> tuple[int, ...]:
    return tuple(int(part) for part in importlib.metadata.version(package).split(".")[:2])


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_installed_version_is_the_one_the_shims_were_written_for(package: str) -> None:
    low, high = WRITTEN_FOR[package]
    assert low <= _version(package) < high, (
        f"{package} {importlib.metadata.version(package)} is outside {low}..{high}: re-check every "
        "function of gateway/media/aiortc_compat.py against its source, then widen WRITTEN_FOR"
    )


async def _connected_pair() -> tuple[RTCPeerConnection, RTCPeerConnection]:
    """A sending peer and a receiving one, connected over loopback (ICE, DTLS, SRTP keys)."""
    sender, receiver = RTCPeerConnection(), RTCPeerConnection()
    sender.addTransceiver("audio", direction="sendonly")
    offer = await sender.createOffer()
    with host_addresses(["127.0.0.1"]):
        await sender.setLocalDescription(offer)
    await receiver.setRemoteDescription(sender.localDescription)
    answer = await receiver.createAnswer()
    with host_addresses(["127.0.0.1"]):
        await receiver.setLocalDescription(answer)
    await sender.setRemoteDescription(RTCSessionDescription(sdp=receiver.localDescription.sdp, type="answer"))
    for _ in range(100):
        if sender.connectionState == receiver.connectionState == "connected":
            break
        await asyncio.sleep(0.05)
    assert sender.connectionState == receiver.connectionState == "connected"
    return sender, receiver


async def test_every_internal_exists_and_works_on_real_peers() -> None:
    sender, receiver = await _connected_pair()
    try:
        rtp_sender = sender.getTransceivers()[0].sender
        tx_dtls = rtp_sender.transport
        rx_dtls = receiver.getTransceivers()[0].receiver.transport
        # the private names themselves, so a rename shows here by name
        assert isinstance(rtp_sender._ssrc, int)
        assert tx_dtls._tx_srtp is not None and rx_dtls._rx_srtp is not None
        assert isinstance(tx_dtls.transport._connection, aioice.Connection)
        assert isinstance(tx_dtls.transport._connection._nominated, dict)
        assert list(inspect.signature(rx_dtls._handle_rtp_data).parameters) == ["data", "arrival_time_ms"]
        assert can_send_rtp_itself(rtp_sender)

        # the SSRC is the one the SDP announced
        assert f"a=ssrc:{sender_ssrc(rtp_sender)} " in sender.localDescription.sdp
        assert ice_connection(tx_dtls) is sender.getTransceivers()[0].sender.transport.transport._connection
        assert srtp_receive_context(rx_dtls) is rx_dtls._rx_srtp

        # a packet sent on the route arrives decrypted at the diverted handler, unparsed
        received: list[bytes] = []

        async def handler(data: bytes, arrival_time_ms: int) -> None:
            received.append(data)

        assert divert_inbound_rtp(rx_dtls, handler)
        route = srtp_route(tx_dtls)
        assert route is not None and not route.closed
        rtp = struct.pack("!BBHII", 0x80, 0, 1234, 5678, sender_ssrc(rtp_sender)) + bytes(range(160))
        for _ in range(50):
            route.send(rtp)
            await asyncio.sleep(0.02)
            if received:
                break
        assert received and received[0] == rtp
    finally:
        await sender.close()
        await receiver.close()
    assert srtp_route(tx_dtls) is None  # closed: no route


async def test_no_route_before_dtls_is_connected() -> None:
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        assert srtp_route(pc.getTransceivers()[0].sender.transport) is None
        assert srtp_route(None) is None
    finally:
        await pc.close()


async def test_host_address_override_reaches_aioice_gathering() -> None:
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    connection = aioice.Connection(ice_controlling=True, components=1)
    try:
        with host_addresses(["127.0.0.1"]):
            await connection.gather_candidates()
        assert connection.local_candidates
        assert {c.host for c in connection.local_candidates} == {"127.0.0.1"}
    finally:
        await connection.close()
    assert aioice.ice.get_host_addresses.__wrapped__ is not None
    with pytest.raises(RuntimeError):
        override_host_addresses(lambda use_ipv4, use_ipv6: None)


@pytest.mark.parametrize(
    "codec,clock,encoder",
    [
        ("PCMU", 8000, lambda: G711PacketEncoder("pcmu")),
        ("opus", 48000, lambda: OpusPacketEncoder(8000)),
    ],
)
def test_aiortc_sends_pre_encoded_packets_as_they_are(codec: str, clock: int, encoder) -> None:
    """track.py hands aiortc ``av.Packet``s: its encoder's ``pack`` must send the bytes as they
    are, with the packet's pts as the RTP timestamp."""
    enc = encoder()
    aiortc_encoder = get_encoder(
        RTCRtpCodecParameters(mimeType=f"audio/{codec}", clockRate=clock, channels=2 if codec == "opus" else None)
    )
    for index in range(3):
        packet = enc.encode(tone(600, 160, 8000, index * 160).astype(np.int16), index)
        payloads, timestamp = aiortc_encoder.pack(packet)
        assert payloads == [bytes(packet)]
        assert timestamp == index * enc.ticks_per_frame
    assert RTCRtpSender.getCapabilities("audio").codecs  # the codecs answer_whep picks from
