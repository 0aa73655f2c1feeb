"""SIPREC as real recording clients send it, parsed (issue 13): every dialect's metadata, the
recording keys that find the conversation, the participant that decides each leg. Fast, no
network; tests/test_siprec_clients.py sends the same INVITEs to real workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sip.message import SipParseError, classify_invite, header_keys, parse_message, parse_sdp, split_body
from gateway.sip.parties import Parties, address_key, matching
from gateway.sip.siprec_metadata import MetadataError, parse_metadata, recording_key_forms

from .siprec_clients import (
    SCENARIOS,
    Scenario,
    broadworks,
    cisco_cube,
    oracle_acme,
    oracle_avaya_ucid,
    rfc8068_basic_call,
    ribbon,
    siprec_invite,
)

pytestmark = [pytest.mark.unit]


class Directory:
    """The domain's answers: conversation ``c-9`` of agent ``alice`` with ``sc``'s registration."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.asked: list[list[str]] = []

    def conversation_parties(self, cid: str) -> Parties | None:
        if cid != "c-9":
            return None
        return Parties("alice", tuple(self.sc.agent_addresses), tuple(self.sc.customer_addresses))

    def recording_conversation(self, keys: Sequence[str]) -> str | None:
        self.asked.append(list(keys))
        wanted = {k.lower() for k in self.sc.recording_keys}
        return "c-9" if any(k.lower() in wanted for k in keys) else None


@pytest.mark.parametrize("make", SCENARIOS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_each_client_finds_its_conversation_and_legs(make: Callable[[], Scenario], transport: str) -> None:
    sc = make()
    msg = parse_message(siprec_invite(sc, 5060, 5070, 40000, transport))
    info = classify_invite(msg, Directory(sc))
    assert info.conversation == "c-9" and info.kind == "siprec"
    assert info.identified_by.startswith("recording key")
    streams = parse_sdp(split_body(msg)[0] or b"")
    got = {streams[i].label: leg for i, leg in enumerate(info.streams) if leg}
    assert got == sc.expected
    for i, s in enumerate(streams):  # video, and audio beyond the legs, get no leg
        if s.media != "audio":
            assert info.streams[i] is None
    assert {a.leg for a in info.attribution} == set(sc.expected.values())
    assert all(a.reason for a in info.attribution)


@pytest.mark.parametrize("make", SCENARIOS, ids=lambda f: f.__name__)
def test_an_unknown_recording_is_404_and_says_so(make: Callable[[], Scenario]) -> None:
    sc = make()
    other = Scenario(sc.name, sc.headers, sc.streams, sc.metadata_type, sc.metadata, ["nothing-known"])
    with pytest.raises(SipParseError) as e:
        classify_invite(parse_message(siprec_invite(other, 5060, 5070, 40000, "TCP")), Directory(other))
    assert e.value.status == 404 and "recording key" in str(e.value)


def test_x_conversation_id_and_username_match_still_work() -> None:
    sc = rfc8068_basic_call()  # RFC 8068: the agent's AoR user part is the username "alice"
    sc.headers["X-Conversation-ID"] = "c-9"
    info = classify_invite(parse_message(siprec_invite(sc, 5060, 5070, 40000, "UDP")), {"c-9": "alice"}.get)
    assert info.identified_by == "X-Conversation-ID header"
    assert [leg for leg in info.streams] == ["agent", None, "customer"]


def test_the_agent_not_among_the_participants_is_404() -> None:
    sc = oracle_acme()  # Oracle: agent "4001" and customer by number
    sc = Scenario(sc.name, sc.headers, sc.streams, sc.metadata_type, sc.metadata, sc.recording_keys, ["4002"])
    with pytest.raises(SipParseError) as e:
        classify_invite(parse_message(siprec_invite(sc, 5060, 5070, 40000, "UDP")), Directory(sc))
    assert e.value.status == 404 and e.value.conversation == "c-9"


def test_the_customer_decides_the_agent_by_elimination() -> None:
    sc = oracle_acme()
    sc = Scenario(
        sc.name, sc.headers, sc.streams, sc.metadata_type, sc.metadata, sc.recording_keys, [], ["15550100199"]
    )
    info = classify_invite(parse_message(siprec_invite(sc, 5060, 5070, 40000, "UDP")), Directory(sc))
    assert info.streams == ["customer", "agent"]
    assert "not the customer" in next(a.reason for a in info.attribution if a.leg == "agent")


def test_header_keys_are_asked_after_metadata_keys() -> None:
    sc = oracle_acme()  # Oracle: the key is in an X- header only
    d = Directory(sc)
    classify_invite(parse_message(siprec_invite(sc, 5060, 5070, 40000, "UDP")), d)
    assert len(d.asked) == 2 and "4f1c9e7a-2b3d-4e5f@carrier.example" in d.asked[1]


@pytest.mark.parametrize(
    "make,keys",
    [
        (rfc8068_basic_call, {"ab30317f1a784dc48ff824d0d3715d86"}),
        (oracle_avaya_ucid, {"00FA08001A2C5E61F3D7B9", "001A2C5E61F3D7B9", "00026113581643370425"}),
        (cisco_cube, {"A1B2C3D4-0000-0001-0000-00AB12CD34EF", "5b6c1f0e8d2a4b39a7c6d5e4f3a2b1c0"}),
        (ribbon, {"8a7b6c5d4e3f@10.1.1.20", "1593829401"}),
        (broadworks, {"48:1-2B3C4D5E6F", "BW0612003001202261-1877@10.30.0.8"}),
    ],
    ids=["sipSessionID", "apkt-ucid", "cisco-guid", "ribbon-callData", "broadworks-tracking"],
)
def test_metadata_keys_per_dialect(make: Callable[[], Scenario], keys: set[str]) -> None:
    meta = parse_metadata(make().metadata.encode())
    assert keys <= set(meta.keys), meta.keys


def test_dialect_names_and_label_senders() -> None:
    dialects = {sc().name: parse_metadata(sc().metadata.encode()) for sc in SCENARIOS}
    assert dialects["rfc8068"].dialect == "rfc7865"
    assert dialects["oracle"].dialect == "rfc7865-draft"
    assert dialects["broadworks"].dialect == "broadworks"
    assert dialects["ribbon"].label_aors == {"1": ["+16135550142@10.1.1.20"], "2": ["2210@10.1.1.30"]}
    assert dialects["rfc8068"].label_aors["97"] == ["sip:alice@atlanta.example.com"]
    assert dialects["avaya-sbce-mixed"].label_aors["1"] == ["sip:3001@avaya.example", "sip:+15550177@pstn.example"]


def test_metadata_refuses_entities_and_unknown_roots() -> None:
    for xml in (
        b"<recording",
        b"<?xml version='1.0'?><!DOCTYPE r [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><recording>&e;</recording>",
        b"<!DOCTYPE recording [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;&a;'>]><recording>&b;</recording>",
        b"<other/>",
    ):
        with pytest.raises(MetadataError):
            parse_metadata(xml)


def test_cisco_gtd_part_does_not_break_the_multipart() -> None:
    sc = cisco_cube()
    sdp, meta = split_body(parse_message(siprec_invite(sc, 5060, 5070, 40000, "TCP")))
    assert (
        sdp is not None and sdp.startswith(b"v=0") and meta is not None and meta.rstrip().endswith(b"</ccn:recording>")
    )


def test_both_metadata_content_types() -> None:
    for ctype in ("application/rs-metadata", "application/rs-metadata+xml"):
        sc = rfc8068_basic_call()
        sc = Scenario(sc.name, sc.headers, sc.streams, ctype, sc.metadata, sc.recording_keys)
        assert split_body(parse_message(siprec_invite(sc, 5060, 5070, 40000, "TCP")))[1] is not None


def test_header_keys() -> None:
    sc = cisco_cube()
    keys = header_keys(parse_message(siprec_invite(sc, 5060, 5070, 40000, "TCP")))
    assert "2891148800-0000065536-0000000123-0315887808" in keys and "5b6c1f0e8d2a4b39a7c6d5e4f3a2b1c0" in keys


@pytest.mark.parametrize(
    "a,b",
    [
        ("sip:+1-555-010-0199@carrier.example;user=phone", "+1 (555) 010 0199"),
        ("tel:+15550100199", "15550100199"),
        ("4001", "sip:4001@10.20.0.5"),
        ('"Agent" <sips:Alice@pbx.example:5061;transport=tls>', "alice"),
        ("+16135550142@10.1.1.20", "tel:+1-613-555-0142"),
    ],
)
def test_addresses_compare_sensibly(a: str, b: str) -> None:
    assert address_key(a) == address_key(b)
    assert matching([a], [b]) == a


def test_different_addresses_do_not_match() -> None:
    assert matching(["sip:4001@pbx"], ["4002", "sip:40011@pbx", ""]) is None
    assert address_key("sip:pbx.example") == "pbx.example"


_PIECES = [
    "<recording xmlns='urn:ietf:params:xml:ns:recording:1'>", "</recording>", "<recording_metadata>",
    "</recording_metadata>", "<participant participant_id='p'>", "</participant>", "<nameID aor='sip:4001@x'/>",
    "<stream stream_id='s'>", "</stream>", "<label>1</label>", "<send>s</send>", "<send>1</send>",
    "<participantstreamassoc participant_id='p'>", "</participantstreamassoc>", "<extensiondata>",
    "</extensiondata>", "<ucid>00FA;encoding=hex</ucid>", "<callData><callid>c@h</callid></callData>",
    "<!DOCTYPE r [<!ENTITY e 'x'>]>", "&e;", "<![CDATA[x]]>", "<tns:a xmlns:tns='urn:x'>", "</tns:a>", "\x00", "é",
]  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES) | st.text(max_size=20), max_size=30))
@settings(max_examples=300, deadline=None)
def test_metadata_parser_never_raises_anything_else(parts: list[str]) -> None:
    try:
        meta = parse_metadata("".join(parts).encode("utf-8", "surrogatepass"))
    except MetadataError:
        return
    assert all(isinstance(k, str) and 0 < len(k) <= 256 for k in meta.keys)
    assert all(isinstance(v, list) for v in meta.label_aors.values())


@pytest.mark.parametrize(
    "value,forms",
    [
        ("abc;remote=000", ["abc;remote=000", "abc"]),
        ("00FA080019001038F725B3;encoding=hex", ["0019001038F725B3", "00025000160955721139"]),
        ("FA080019001038F725B3", ["0019001038F725B3", "00025000160955721139"]),  # AudioCodes' AvayaUCID
        ("00FA080019001038F725B3C1080102", ["00025000160955721139"]),  # more shared UUI after the UCID
        ("00FA07001900", ["00FA07001900"]),  # not a UCID item: as sent only
        ("2891148800-0000065536-0000000123-0315887808", ["AC536E00000100000000007B12D410C0"]),  # Cisco-Guid
    ],
)
def test_recording_key_forms(value: str, forms: list[str]) -> None:
    got = recording_key_forms(value)
    assert set(forms) <= set(got) and got[0] == value


def test_a_ucid_in_user_to_user_finds_the_conversation_by_its_decimal_form() -> None:
    sc = ribbon()
    sc = Scenario(sc.name, {"User-to-User": "00FA080019001038F725B3;encoding=hex"}, sc.streams,
                  sc.metadata_type, sc.metadata, ["00025000160955721139"], sc.agent_addresses)  # fmt: skip
    info = classify_invite(parse_message(siprec_invite(sc, 5060, 5070, 40000, "TCP")), Directory(sc))
    assert info.identified_by == "recording key in header"
