"""Pure parsing of the SIP front: SIP messages, SDP, multipart, SIPREC metadata. Also fuzzed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Settings
from gateway.sip.front import Decision, Forward, Peer, SipFront
from gateway.sip.message import (
    SipMessage,
    SipParseError,
    classify_invite,
    parse_message,
    parse_metadata,
    parse_sdp,
    uri_user,
    valid_sip_uri,
)

from .sip_support import RawSip, metadata, multipart, sdp

pytestmark = [pytest.mark.unit]

AGENTS = {"c-1": "alice"}


def invite(body: bytes = b"", ctype: str = "application/sdp", headers: dict[str, str] | None = None) -> bytes:
    raw = RawSip()
    try:
        return raw.invite(5060, body=body, ctype=ctype, headers=headers)[0]
    finally:
        raw.close()


def test_per_leg_invite_is_classified() -> None:
    info = classify_invite(
        parse_message(invite(sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "Customer"})), AGENTS.get
    )
    assert (info.conversation, info.kind, info.streams, info.leg) == ("c-1", "leg", ["customer"], "customer")


@pytest.mark.parametrize("agent_label", ["1", "2"])
def test_siprec_metadata_names_the_agent_stream(agent_label: str) -> None:
    body, ct = multipart(
        [
            ("application/sdp", sdp(streams=2, labels=True)),
            ("application/rs-metadata+xml", metadata("sip:Alice@pbx", "sip:+1555@pstn", "c-1", agent_label)),
        ]
    )
    info = classify_invite(parse_message(invite(body, ct)), AGENTS.get)
    assert info.kind == "siprec" and info.conversation == "c-1"
    assert info.streams == (["agent", "customer"] if agent_label == "1" else ["customer", "agent"])


def test_siprec_conversation_from_header_wins() -> None:
    body, ct = multipart(
        [
            ("application/sdp", sdp(streams=2, labels=True)),
            ("application/rs-metadata+xml", metadata("sip:alice@pbx", "sip:c@x", None)),
        ]
    )
    info = classify_invite(parse_message(invite(body, ct, {"X-Conversation-ID": "c-1"})), AGENTS.get)
    assert info.conversation == "c-1"


@pytest.mark.parametrize(
    "body,ctype,headers,status",
    [
        (sdp(audio=False), "application/sdp", None, 488),
        (sdp("0 128"), "application/sdp", None, 400),
        (sdp("96"), "application/sdp", None, 488),
        (b"", "", None, 488),
        (b"x", "application/sdp", None, 400),
        (sdp(), "application/json", None, 415),
        (sdp(), "application/sdp", {"X-Conversation-ID": "zzz", "X-Leg": "agent"}, 404),
        (sdp(), "application/sdp", {"X-Conversation-ID": "c-1"}, 400),
    ],
)
def test_bad_invites(body: bytes, ctype: str, headers: dict[str, str] | None, status: int) -> None:
    msg = parse_message(
        invite(body, ctype, headers if headers is not None else {"X-Conversation-ID": "c-1", "X-Leg": "agent"})
    )
    with pytest.raises(SipParseError) as e:
        classify_invite(msg, AGENTS.get)
    assert e.value.status == status


def test_metadata_refuses_entities_and_garbage() -> None:
    for xml in (
        b"<recording",
        b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><recording>&e;</recording>",
        b"<other/>",
    ):
        with pytest.raises(SipParseError):
            parse_metadata(xml)


def test_sdp_labels_and_directions() -> None:
    streams = parse_sdp(sdp(streams=2, labels=True))
    assert [(s.label, s.direction, s.audio_ok) for s in streams] == [("1", "sendonly", True), ("2", "sendonly", True)]


@pytest.mark.parametrize(
    "pts,rtpmap,ok",
    [
        ("0", "", True),  # PCMU, static
        ("8", "", True),  # PCMA, static
        ("9", "", True),  # G.722, static (its rtpmap says 8000: RFC 3551's historical clock)
        ("96", "a=rtpmap:96 opus/48000/2", True),
        ("97", "a=rtpmap:97 G722/8000", True),
        ("18", "", False),  # G.729
        ("96", "a=rtpmap:96 AMR-WB/16000", False),
        ("96", "", False),  # dynamic without rtpmap: unknown
    ],
)
def test_sdp_ingress_codecs(pts: str, rtpmap: str, ok: bool) -> None:
    body = sdp(pts).decode()
    if rtpmap:
        body += rtpmap + "\r\n"
    (stream,) = parse_sdp(body.encode())
    assert stream.audio_ok is ok


def test_uris() -> None:
    assert uri_user("<sip:t-abc@127.0.0.1:5061;transport=udp>") == "t-abc"
    assert (
        valid_sip_uri("sip:sam@10.0.0.1:5090")
        and valid_sip_uri("sips:sam@example.com")
        and valid_sip_uri("sip:pbx.example")
    )
    for bad in ("tel:1", "sip:a b@c", "sip:x@h:0", "http://x", "sip:x@h\r\nVia: y"):
        assert not valid_sip_uri(bad)


class _Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def close(self) -> None:
        pass


WORKER = ("127.0.0.1", 5061)


def _front() -> tuple[SipFront, _Transport]:
    def decide(msg: SipMessage) -> Decision:
        classify_invite(msg, AGENTS.get)
        return Forward(WORKER, "t-token")

    front = SipFront(Settings(sip_port=5060), decide, lambda: True, lambda: {WORKER})
    t = _Transport()
    front.udp = t  # type: ignore[assignment]
    return front, t


VALID = invite(sdp(), headers={"X-Conversation-ID": "c-1", "X-Leg": "agent"})


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.tuples(st.integers(0, len(VALID)), st.binary(max_size=40)).map(
            lambda t: VALID[: t[0]] + t[1] + VALID[t[0] :]
        ),
    )
)
async def test_front_survives_any_datagram(data: bytes) -> None:
    front, t = _front()
    front._received(data, Peer(("127.0.0.1", 5999)))  # the unguarded path: must not raise
    for sent, addr in t.sent:
        # Answers go back to the sender; only a forwarded request goes to the worker.
        assert sent.startswith(b"SIP/2.0 ") or (addr == WORKER and sent.startswith(b"INVITE "))
    front.close()


async def test_front_forwards_retransmissions_to_the_same_worker_once_decided() -> None:
    front, t = _front()
    front._received(VALID, Peer(("127.0.0.1", 5999)))
    front._received(VALID, Peer(("127.0.0.1", 5999)))
    assert [addr for _, addr in t.sent] == [WORKER, WORKER]
    assert t.sent[0][0] == t.sent[1][0]
    assert front.counts["invites"] == 1
    fwd = parse_message(t.sent[0][0])
    assert fwd.get("x-gateway-placement") == "t-token"
    assert fwd.branch.startswith("z9hG4bK-gwf-") and len(fwd.get_all("via")) == 2
    assert fwd.get("record-route") == "<sip:127.0.0.1:5060;lr>"
    assert fwd.get("max-forwards") == "69"
    front.close()


def test_srtp_setting_decides_which_offers_are_refused_488() -> None:
    """Issue 11, item 5: the plane refuses at once (488) what the workers' SRTP setting would refuse."""
    headers = {"X-Conversation-ID": "c-1", "X-Leg": "agent"}
    plain = sdp()
    keyed = plain.replace(b"RTP/AVP", b"RTP/SAVP") + b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + b"A" * 40 + b"\r\n"
    optional_keys = plain + b"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + b"A" * 40 + b"\r\n"  # RTP/AVP with a key
    dtls = plain.replace(b"RTP/AVP", b"UDP/TLS/RTP/SAVP") + b"a=fingerprint:sha-256 AB:CD\r\n"

    def status(body: bytes, mode: str) -> int:
        try:
            classify_invite(parse_message(invite(body, headers=headers)), AGENTS.get, mode)
        except SipParseError as exc:
            return exc.status
        return 200

    assert [status(b, "optional") for b in (plain, keyed, optional_keys, dtls)] == [200, 200, 200, 488]
    assert [status(b, "mandatory") for b in (plain, keyed, optional_keys, dtls)] == [488, 200, 488, 488]
    assert [status(b, "off") for b in (plain, keyed, optional_keys, dtls)] == [200, 488, 200, 488]
    with pytest.raises(SipParseError, match="SRTP is required") as exc:
        classify_invite(parse_message(invite(plain, headers=headers)), AGENTS.get, "mandatory")
    assert exc.value.conversation == "c-1"  # the refusal is logged with its conversation
