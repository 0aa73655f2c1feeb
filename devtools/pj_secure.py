"""SIP over TLS and SRTP options shared by the pjsua2 dev tools (:mod:`devtools.sip_phone`,
:mod:`devtools.siprec_source`), so they can stand for a platform or a phone that secures both.

Imported only inside their child processes (pjsua2 is passed in, never imported here).
"""

from __future__ import annotations

import argparse
from typing import Any

SRTP_MODES = ("off", "optional", "mandatory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-port", type=int, default=0, help="also listen for SIP over TLS on this port (0: no)")
    parser.add_argument("--tls-cert", default="", help="PEM certificate (chain) of the TLS transport")
    parser.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", default="", help="PEM CA file: TLS peers must present a certificate it signed")
    parser.add_argument("--srtp", choices=SRTP_MODES, default="off", help="SRTP (SDES) use on calls")


def create_tls_transport(pj: Any, ep: Any, host: str, args: argparse.Namespace) -> None:
    """A TLS transport on ``host:--tls-port`` (pjsip's default protocol set, the system
    OpenSSL); with ``--tls-ca`` the server it connects to is verified (chain and name)."""
    t = pj.TransportConfig()
    t.port = args.tls_port
    t.boundAddress = host
    tls = t.tlsConfig
    tls.certFile = args.tls_cert
    tls.privKeyFile = args.tls_key
    if args.tls_ca:
        tls.CaListFile = args.tls_ca
        tls.verifyServer = True
    ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, t)


def apply_srtp(pj: Any, media_config: Any, mode: str) -> None:
    """SRTP with SDES keys only, whatever the signalling transport (the tools may talk plain UDP
    to a gateway to show what it refuses)."""
    media_config.srtpUse = {
        "off": pj.PJMEDIA_SRTP_DISABLED,
        "optional": pj.PJMEDIA_SRTP_OPTIONAL,
        "mandatory": pj.PJMEDIA_SRTP_MANDATORY,
    }[mode]
    media_config.srtpSecureSignaling = 0
    media_config.srtpOpt.keyings = pj.IntVector([pj.PJMEDIA_SRTP_KEYING_SDES])
    # One suite, RFC 4568's mandatory one: pjsua2 hands onCallSdpCreated an empty SDP once it
    # is over 1 KB, and four suites on each of a SIPREC offer's two streams pass that.
    suite = pj.SrtpCrypto()
    suite.name = "AES_CM_128_HMAC_SHA1_80"
    media_config.srtpOpt.cryptos.append(suite)
