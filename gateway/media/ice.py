"""ICE configuration for the gateway's WebRTC legs: servers and host-candidate addresses.

* ``Settings.ice_servers`` (comma-separated ``stun:``/``turn:`` URLs) becomes
  ``RTCConfiguration(iceServers=...)``; the default is an explicit empty list, because
  aiortc's own default reaches a public STUN host.
* ``Settings.ice_host_addresses`` (comma-separated IPs) chooses the addresses the gateway
  binds and advertises as host candidates. aioice's ``Connection`` has no option for it and
  aiortc passes only servers/policy/credentials to it, while aioice's
  ``get_host_addresses()`` always leaves ``127.0.0.1`` out. So this module has aioice ask,
  once per process (:func:`.aiortc_compat.override_host_addresses`), for the addresses held
  in a :class:`contextvars.ContextVar` when one is set, and keep its own choice otherwise.
  :func:`host_addresses` sets the variable around ``setLocalDescription`` (where aiortc
  gathers, in tasks that inherit the context), so only the peer connections that ask for it
  are affected -- other aiortc users in the process keep aioice's behaviour.
* :func:`filter_offer_candidates` drops the remote candidates a loopback-only gateway can
  never reach (Chromium's mDNS ``.local`` names and its LAN addresses); ICE then pairs with
  the browser's peer-reflexive loopback address when its checks arrive.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
from collections.abc import Iterator

from aiortc import RTCConfiguration, RTCIceServer

from ..config import Settings
from .aiortc_compat import override_host_addresses

_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "gateway_ice_host_addresses", default=None
)


def split_csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def rtc_configuration(settings: Settings) -> RTCConfiguration:
    """``RTCConfiguration`` from settings: the configured ICE servers, else none at all."""
    servers = [RTCIceServer(urls=url) for url in split_csv(settings.ice_servers)]
    return RTCConfiguration(iceServers=servers)


def _chosen_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str] | None:
    """The addresses of the enclosing :func:`host_addresses` block of this family, if any."""
    chosen = _addresses.get()
    if chosen is None:
        return None
    return [a for a in chosen if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


@contextlib.contextmanager
def host_addresses(addresses: list[str] | tuple[str, ...] | str | None) -> Iterator[None]:
    """Within this block, ICE gathering binds exactly ``addresses`` (empty/None: aioice's default)."""
    if isinstance(addresses, str):
        addresses = split_csv(addresses)
    if not addresses:
        yield
        return
    override_host_addresses(_chosen_addresses)
    token = _addresses.set(tuple(addresses))
    try:
        yield
    finally:
        _addresses.reset(token)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an mDNS name such as 0b5c...local


def loopback_only(addresses: list[str] | str) -> bool:
    if isinstance(addresses, str):
        addresses = split_csv(addresses)
    return bool(addresses) and all(_is_loopback(a) for a in addresses)


def filter_offer_candidates(sdp: str, *, keep_loopback_only: bool) -> str:
    """Drop ``a=candidate`` lines whose address is not loopback (when asked to).

    A gateway bound to 127.0.0.1 can not reach the browser's LAN or ``.local`` candidates;
    leaving them in only makes aioice try (and wait for) pairs that cannot work.
    """
    if not keep_loopback_only:
        return sdp
    out = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) > 4 and not _is_loopback(parts[4]):
                continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"
