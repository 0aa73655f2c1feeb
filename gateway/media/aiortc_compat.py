"""Every use of aiortc's and aioice's internals, in one place.

The WebRTC plane keeps aiortc for SDP, ICE, DTLS and RTCP, and does three things neither
library has a public API for:

* the batched sender (:mod:`.batch`) sends SRTP itself: it needs the sender's SSRC
  (``RTCRtpSender._ssrc``), the DTLS transport's outbound SRTP context
  (``RTCDtlsTransport._tx_srtp``) and the nominated pair of the ICE connection
  (``RTCIceTransport._connection``, aioice's ``Connection._nominated``);
* a WHEP session counts and drops the RTP a browser sends anyway, before aiortc parses it:
  it replaces ``RTCDtlsTransport._handle_rtp_data`` on its own transport instance;
* :mod:`.ice` chooses the addresses aioice gathers host candidates on: aiortc passes aioice
  no option for it, so :func:`override_host_addresses` wraps ``aioice.ice.get_host_addresses``,
  the module function ``Connection.gather_candidates`` calls.

Written against the versions in :data:`WRITTEN_FOR`; ``tests/test_aiortc_compat.py`` checks
the installed versions and every name used here on real objects, so an upgrade fails there
first. (``recv()`` returning an ``av.Packet``, which :mod:`.track` relies on, is aiortc's
public pre-encoded path: the encoder's ``pack()``; that test pins it too.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aioice.ice
from aiortc import RTCDtlsTransport, RTCRtpSender

#: ``package: (lowest version, first version not checked)`` the functions below were written for.
WRITTEN_FOR = {"aiortc": ((1, 16), (1, 17)), "aioice": ((0, 13), (0, 14))}
#: The ICE component that carries RTP (RTCP is multiplexed on it: aiortc always uses rtcp-mux).
RTP_COMPONENT = 1

InboundRtpHandler = Callable[[bytes, int], Coroutine[Any, Any, None]]
HostAddressChooser = Callable[[bool, bool], list[str] | None]


def sender_ssrc(sender: RTCRtpSender) -> int:
    """The SSRC aiortc announced in the SDP for this sender (and uses in its RTCP)."""
    return int(sender._ssrc)


@dataclass(frozen=True)
class SrtpRoute:
    """How one sender's RTP leaves: aiortc's outbound SRTP context and the nominated ICE pair."""

    srtp: Any  # pylibsrtp.Session
    transport: asyncio.DatagramTransport
    address: tuple[str, int]

    @property
    def closed(self) -> bool:
        return self.transport.is_closing()

    def send(self, rtp: bytes) -> None:
        """Protect one RTP packet and send it to the peer."""
        self.transport.sendto(self.srtp.protect(rtp), self.address)


def ice_connection(dtls: RTCDtlsTransport) -> aioice.Connection:
    """The aioice connection under a DTLS transport."""
    return dtls.transport._connection


def srtp_route(dtls: RTCDtlsTransport | None) -> SrtpRoute | None:
    """The route for a sender's RTP once DTLS is connected; ``None`` before that."""
    if dtls is None or dtls.state != "connected" or dtls._tx_srtp is None:
        return None
    pair = ice_connection(dtls)._nominated.get(RTP_COMPONENT)
    if pair is None or pair.protocol.transport is None:
        return None
    return SrtpRoute(dtls._tx_srtp, pair.protocol.transport, pair.remote_addr)


def srtp_receive_context(dtls: RTCDtlsTransport) -> Any:
    """aiortc's inbound SRTP context (a ``pylibsrtp.Session``; ``None`` until DTLS is done).

    The gateway never reads it; ``bench/voice_webrtc.py``'s receivers decrypt with it."""
    return dtls._rx_srtp


def can_send_rtp_itself(sender: RTCRtpSender) -> bool:
    """Whether this aiortc has what :func:`sender_ssrc` and :func:`srtp_route` read."""
    dtls = sender.transport
    return (
        dtls is not None
        and hasattr(sender, "_ssrc")
        and hasattr(dtls, "_tx_srtp")
        and hasattr(dtls.transport, "_connection")
    )


def divert_inbound_rtp(dtls: RTCDtlsTransport, handler: InboundRtpHandler) -> bool:
    """Hand every decrypted inbound RTP packet of this transport to ``handler(data,
    arrival_time_ms)`` instead of aiortc's parser and router (RTCP still goes to aiortc).

    Returns ``False`` (nothing changed) if this aiortc has no such hook."""
    if not hasattr(dtls, "_handle_rtp_data"):
        return False
    dtls._handle_rtp_data = handler  # type: ignore[method-assign,assignment]
    return True


_host_address_chooser: HostAddressChooser | None = None


def override_host_addresses(choose: HostAddressChooser) -> None:
    """Have aioice gather host candidates on ``choose(use_ipv4, use_ipv6)`` whenever it returns
    a list (``None``: aioice's own choice). Process-wide, once: installing the same chooser
    again is a no-op, another one is an error."""
    global _host_address_chooser
    if _host_address_chooser is choose:
        return
    if _host_address_chooser is not None:
        raise RuntimeError("aioice's host addresses are already chosen by another function")
    _host_address_chooser = choose
    original = aioice.ice.get_host_addresses

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        chosen = choose(use_ipv4, use_ipv6)
        return original(use_ipv4=use_ipv4, use_ipv6=use_ipv6) if chosen is None else chosen

    get_host_addresses.__wrapped__ = original  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses
