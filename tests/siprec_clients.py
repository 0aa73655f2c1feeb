"""SIPREC recording clients as real SBCs and platforms send them, for the tests (issue 13).

Each :class:`Scenario` is written for these tests from the RFCs and the vendors' public SIPREC
guides (RFC 7866 §6 and RFC 8068 §3 call flows, RFC 7865 metadata, Oracle/Acme, Avaya UCID
extension data, Cisco CUBE with an ``application/gtd`` part, Ribbon ``callData``,
BroadWorks' pre-RFC ``recording_metadata``): the header names, XML shapes and content types
of each dialect, with made-up identifiers and addresses. Nothing here is a captured message.

:func:`send_rtp` is the raw RTP sender that plays one tone into one stream (sipp's
``rtp_stream`` only feeds the first audio stream of an offer).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from dataclasses import dataclass, field

import numpy as np

from gateway.media.g711 import G711PacketEncoder

AGENT_HZ, CUSTOMER_HZ = 600.0, 1000.0
CRLF = "\r\n"


@dataclass(frozen=True)
class Stream:
    """One m-line of the offer: ``tone`` is what the client plays into it (None: nothing)."""

    media: str  # 'audio' or 'video'
    label: str
    tone: float | None
    payloads: str = "0 8"


@dataclass(frozen=True)
class Scenario:
    name: str
    #: headers of the SIPREC INVITE besides the dialog ones
    headers: dict[str, str]
    streams: list[Stream]
    metadata_type: str
    metadata: str
    #: what the platform said in PUT /v1/conversations (recording_keys, participants)
    recording_keys: list[str]
    agent_addresses: list[str] = field(default_factory=list)
    customer_addresses: list[str] = field(default_factory=list)
    #: further multipart parts (content type, extra part headers, body)
    extra_parts: list[tuple[str, str, bytes]] = field(default_factory=list)
    #: label → the leg it must become
    expected: dict[str, str] = field(default_factory=dict)


def offer_sdp(streams: list[Stream], rtp_port: int) -> bytes:
    lines = ["v=0", "o=SRC 2890844526 2890844526 IN IP4 127.0.0.1", "s=SIP Recording", "c=IN IP4 127.0.0.1", "t=0 0"]
    for i, s in enumerate(streams):
        if s.media == "video":
            lines += [f"m=video {rtp_port + 2 * i} RTP/AVP 96", "a=rtpmap:96 H264/90000"]
        else:
            lines.append(f"m=audio {rtp_port + 2 * i} RTP/AVP {s.payloads} 101")
            for pt in s.payloads.split():
                lines.append({"0": "a=rtpmap:0 PCMU/8000", "8": "a=rtpmap:8 PCMA/8000"}[pt])
            lines += ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=ptime:20"]
        lines += ["a=sendonly", f"a=label:{s.label}"]
    return (CRLF.join(lines) + CRLF).encode()


def siprec_body(sc: Scenario, rtp_port: int, boundary: str = "uniqueBoundary") -> tuple[bytes, str]:
    parts: list[tuple[str, str, bytes]] = [
        ("application/sdp", "", offer_sdp(sc.streams, rtp_port)),
        (sc.metadata_type, "Content-Disposition: recording-session" + CRLF, sc.metadata.encode()),
        *sc.extra_parts,
    ]
    out = b""
    for ctype, extra, body in parts:
        out += f"--{boundary}{CRLF}Content-Type: {ctype}{CRLF}{extra}{CRLF}".encode() + body + CRLF.encode()
    out += f"--{boundary}--{CRLF}".encode()
    return out, f"multipart/mixed;boundary={boundary}"


def siprec_invite(sc: Scenario, gw_port: int, local_port: int, rtp_port: int, transport: str) -> bytes:
    """The whole INVITE of ``sc`` from ``127.0.0.1:local_port`` over ``transport`` (UDP/TCP)."""
    body, ctype = siprec_body(sc, rtp_port)
    t = transport.upper()
    param = ";transport=tcp" if t == "TCP" else ""
    lines = [
        f"INVITE sip:recorder@127.0.0.1:{gw_port}{param} SIP/2.0",
        f"Via: SIP/2.0/{t} 127.0.0.1:{local_port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport",
        "Max-Forwards: 70",
        f"From: <sip:src@127.0.0.1:{local_port}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <sip:recorder@127.0.0.1:{gw_port}>",
        f"Call-ID: {uuid.uuid4().hex}@127.0.0.1",
        "CSeq: 101 INVITE",
        f"Contact: <sip:src@127.0.0.1:{local_port}{param}>;+sip.src",
        "Require: siprec",
        "Accept: application/sdp, application/rs-metadata+xml, application/rs-metadata",
        "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, UPDATE",
        *[f"{k}: {v}" for k, v in sc.headers.items()],
        f"Content-Type: {ctype}",
        "MIME-Version: 1.0",
        f"Content-Length: {len(body)}",
    ]
    return (CRLF.join(lines) + CRLF + CRLF).encode() + body


# --- the six clients -------------------------------------------------------------------------

_RFC = "urn:ietf:params:xml:ns:recording:1"
_DRAFT = "urn:ietf:params:xml:ns:recording"


def rfc8068_basic_call() -> Scenario:
    """RFC 8068 §3-style: a recorded audio+video call; RFC 7865 metadata sent as
    ``application/rs-metadata`` (the RFC's examples); the recorded call's Session-ID in
    ``<sipSessionID>``. The agent is matched by username (``alice``)."""
    cs_session = "ab30317f1a784dc48ff824d0d3715d86"
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="{_RFC}">
  <datamode>complete</datamode>
  <group group_id="7+OTCyoxTmqmqyA/1weDAg==">
    <associate-time>2026-12-02T06:00:00Z</associate-time>
  </group>
  <session session_id="hVpd7YQgRW2nD22h7q60JQ==">
    <sipSessionID>{cs_session};remote=47755a9de7794ba387653f2099600ef2</sipSessionID>
    <group-ref>7+OTCyoxTmqmqyA/1weDAg==</group-ref>
  </session>
  <participant participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <nameID aor="sip:alice@atlanta.example.com"><name xml:lang="en">Alice</name></nameID>
  </participant>
  <participant participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <nameID aor="sip:bob@biloxi.example.com"><name xml:lang="en">Bob</name></nameID>
  </participant>
  <stream stream_id="UAAMm5GRQKSCMVvLyl4rFw==" session_id="hVpd7YQgRW2nD22h7q60JQ=="><label>96</label></stream>
  <stream stream_id="i1Pz3to5hGk8fuXl+PbwCw==" session_id="hVpd7YQgRW2nD22h7q60JQ=="><label>97</label></stream>
  <stream stream_id="8zc6e0lYTlWIINA6GR+3ag==" session_id="hVpd7YQgRW2nD22h7q60JQ=="><label>98</label></stream>
  <participantstreamassoc participant_id="srfBElmCRp2QB23b7Mpk0w==">
    <send>UAAMm5GRQKSCMVvLyl4rFw==</send><send>i1Pz3to5hGk8fuXl+PbwCw==</send>
    <recv>8zc6e0lYTlWIINA6GR+3ag==</recv>
  </participantstreamassoc>
  <participantstreamassoc participant_id="zSfPoSvdSDCmU3A3TRDxAw==">
    <send>8zc6e0lYTlWIINA6GR+3ag==</send>
    <recv>UAAMm5GRQKSCMVvLyl4rFw==</recv><recv>i1Pz3to5hGk8fuXl+PbwCw==</recv>
  </participantstreamassoc>
</recording>
"""
    return Scenario(
        "rfc8068",
        {"Session-ID": "9e5f6c52d8f44dbe8ae54e55b8e7a2c1;remote=00000000000000000000000000000000"},
        [Stream("audio", "96", AGENT_HZ), Stream("video", "97", None), Stream("audio", "98", CUSTOMER_HZ)],
        "application/rs-metadata",
        meta,
        recording_keys=[cs_session],
        expected={"96": "agent", "98": "customer"},
    )


def oracle_acme() -> Scenario:
    """Oracle (Acme Packet) SBC: the draft namespace without ``:1``, participants' ``<send>``
    inside ``<participant>``, ``apkt:`` extension data; the agent is an extension, the
    customer an E.164 number; the recorded call's Call-ID in an ``X-`` header the SBC adds."""
    meta = f"""<?xml version='1.0' encoding='UTF-8'?>
<recording xmlns='{_DRAFT}'>
  <datamode>complete</datamode>
  <session id="dGVzdHNlc3Npb24xMjM=">
    <start-time>2026-12-02T06:00:00</start-time>
  </session>
  <participant id="cGFydGljaXBhbnQx" session="dGVzdHNlc3Npb24xMjM=">
    <nameID aor="sip:+15550100199@carrier.example"><name>+15550100199</name></nameID>
    <send>c3RyZWFtMQ==</send>
    <recv>c3RyZWFtMg==</recv>
  </participant>
  <participant id="cGFydGljaXBhbnQy" session="dGVzdHNlc3Npb24xMjM=">
    <nameID aor="sip:4001@10.20.0.5"><name>4001</name></nameID>
    <send>c3RyZWFtMg==</send>
    <recv>c3RyZWFtMQ==</recv>
  </participant>
  <stream id="c3RyZWFtMQ==" session="dGVzdHNlc3Npb24xMjM="><label>1</label><mode>separate</mode></stream>
  <stream id="c3RyZWFtMg==" session="dGVzdHNlc3Npb24xMjM="><label>2</label><mode>separate</mode></stream>
  <extensiondata xmlns:apkt="http://acmepacket.com/siprec/extensiondata">
    <apkt:callerOrig>true</apkt:callerOrig>
    <apkt:in-realm>carrier</apkt:in-realm>
    <apkt:out-realm>core</apkt:out-realm>
  </extensiondata>
</recording>
"""
    return Scenario(
        "oracle",
        {"X-Recorded-Call-ID": "4f1c9e7a-2b3d-4e5f@carrier.example", "User-Agent": "Oracle ESBC"},
        [Stream("audio", "1", CUSTOMER_HZ), Stream("audio", "2", AGENT_HZ)],
        "application/rs-metadata+xml",
        meta,
        recording_keys=["4f1c9e7a-2b3d-4e5f@carrier.example"],
        agent_addresses=["4001"],
        customer_addresses=["+1 555 010 0199"],
        expected={"1": "customer", "2": "agent"},
    )


def oracle_avaya_ucid() -> Scenario:
    """Oracle SBC in an Avaya contact centre: the UCID as ``apkt:ucid`` extension data of the
    session (Avaya's User-to-User hex, with ``;encoding=hex``) while the platform knows it in
    Avaya's 20-digit decimal form; the agent by a ``tel:`` URI; PCMA offered first."""
    ucid = "00FA08001A2C5E61F3D7B9"  # User-to-User form: 00 FA 08 + node 0x001A, seq 0x2C5E, time 0x61F3D7B9
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="{_DRAFT}">
  <datamode>complete</datamode>
  <session id="QXZheWFTZXNzaW9uMQ==">
    <start-time>2026-12-02T06:00:00</start-time>
    <extensiondata xmlns:apkt="http://acmepacket.com/siprec/extensiondata">
      <apkt:ucid>{ucid};encoding=hex</apkt:ucid>
      <apkt:callerOrig>false</apkt:callerOrig>
    </extensiondata>
  </session>
  <participant id="QWdlbnQ=" session="QXZheWFTZXNzaW9uMQ==">
    <nameID aor="tel:+442071234567"><name>Agent 2071234567</name></nameID>
    <send>U3RyZWFtQQ==</send>
  </participant>
  <participant id="Q3VzdG9tZXI=" session="QXZheWFTZXNzaW9uMQ==">
    <nameID aor="sip:07700900123@pstn.example"/>
    <send>U3RyZWFtQg==</send>
  </participant>
  <stream id="U3RyZWFtQQ==" session="QXZheWFTZXNzaW9uMQ=="><label>1</label></stream>
  <stream id="U3RyZWFtQg==" session="QXZheWFTZXNzaW9uMQ=="><label>2</label></stream>
</recording>
"""
    return Scenario(
        "oracle-avaya",
        {},
        [Stream("audio", "1", AGENT_HZ, "8 0"), Stream("audio", "2", CUSTOMER_HZ, "8 0")],
        "application/rs-metadata+xml",
        meta,
        recording_keys=["00026113581643370425"],  # the UCID as Avaya's CTI gives it: 20 decimal digits
        agent_addresses=["+44 20 7123 4567"],
        expected={"1": "agent", "2": "customer"},
    )


def oracle_avaya_full() -> Scenario:
    """The Oracle/Avaya client with everything such an SBC adds (group and association times,
    every header it copies as ``apkt:hdr`` extension data, Avaya's ``User-to-User`` with the
    UCID): about 4.3 KB, over TCP, past the 4000 bytes a stock pjsua2 reads."""
    ucid = "00FA08001A3B5C7D9E1F20"
    uui = "00FA08001A3B5C7D9E1F2065B2D4C3;encoding=hex"
    hdrs = {
        "User-to-User": uui,
        "P-Asserted-Identity": "&lt;sip:+442071234567@avaya.example;user=phone&gt;",
        "Diversion": "&lt;sip:+442070000000@avaya.example&gt;;reason=unconditional;counter=1",
        "History-Info": "&lt;sip:+442070000000@avaya.example&gt;;index=1,&lt;sip:4711@cm.avaya.example&gt;;index=1.1",
        "P-Av-Message-Id": "1_2",
        "Av-Global-Session-ID": "6f0c2e4a-1b3d-11ef-8a2b-0050569a3c11",
        "P-Location": "SM;origlocname=&quot;London&quot;;origlocid=1",
        "Alert-Info": "&lt;cid:internal@avaya.example&gt;;avaya-cm-alert-type=internal",
        "P-Charging-Vector": "icid-value=AAS:1234-56789abcdef0123;icid-generated-at=10.40.0.12",
        "Supported": "100rel, histinfo, join, replaces, sdp-anat, timer",
    }
    hdr_xml = "\n".join(
        f'      <apkt:hdr name="{name}"><apkt:value>{value}</apkt:value></apkt:hdr>' for name, value in hdrs.items()
    )
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="{_DRAFT}">
  <datamode>complete</datamode>
  <group id="QXZheWFHcm91cDFMb25kb24=">
    <associate-time>2026-12-02T06:00:00.120Z</associate-time>
  </group>
  <session id="QXZheWFTZXNzaW9uRnVsbA==">
    <group-ref>QXZheWFHcm91cDFMb25kb24=</group-ref>
    <associate-time>2026-12-02T06:00:00.120Z</associate-time>
    <start-time>2026-12-02T06:00:00.118Z</start-time>
    <extensiondata xmlns:apkt="http://acmepacket.com/siprec/extensiondata">
      <apkt:ucid>{ucid};encoding=hex</apkt:ucid>
      <apkt:callerOrig>false</apkt:callerOrig>
      <apkt:in-realm>avaya-core</apkt:in-realm>
      <apkt:out-realm>carrier-uk</apkt:out-realm>
{hdr_xml}
    </extensiondata>
  </session>
  <participant id="QWdlbnRGdWxs" session="QXZheWFTZXNzaW9uRnVsbA==">
    <nameID aor="sip:+442071234567@avaya.example;user=phone"><name>Agent Desk 4711</name></nameID>
    <associate-time>2026-12-02T06:00:00.120Z</associate-time>
    <send>U3RyZWFtQUZ1bGw=</send>
    <recv>U3RyZWFtQkZ1bGw=</recv>
  </participant>
  <participant id="Q3VzdG9tZXJGdWxs" session="QXZheWFTZXNzaW9uRnVsbA==">
    <nameID aor="sip:07700900123@carrier-uk.example"><name>07700900123</name></nameID>
    <associate-time>2026-12-02T06:00:00.120Z</associate-time>
    <send>U3RyZWFtQkZ1bGw=</send>
    <recv>U3RyZWFtQUZ1bGw=</recv>
  </participant>
  <stream id="U3RyZWFtQUZ1bGw=" session="QXZheWFTZXNzaW9uRnVsbA==">
    <label>1</label><mode>separate</mode><associate-time>2026-12-02T06:00:00.120Z</associate-time>
  </stream>
  <stream id="U3RyZWFtQkZ1bGw=" session="QXZheWFTZXNzaW9uRnVsbA==">
    <label>2</label><mode>separate</mode><associate-time>2026-12-02T06:00:00.120Z</associate-time>
  </stream>
</recording>
"""
    return Scenario(
        "oracle-avaya-full",
        {"User-to-User": uui, "P-Asserted-Identity": "<sip:oracle-sbc@sbc.example>"},
        [Stream("audio", "1", AGENT_HZ, "8 0"), Stream("audio", "2", CUSTOMER_HZ, "8 0")],
        "application/rs-metadata+xml",
        meta,
        recording_keys=["00026151962107514656"],  # the UCID in Avaya's decimal form
        agent_addresses=["+44 20 7123 4567"],
        expected={"1": "agent", "2": "customer"},
    )


def cisco_cube() -> Scenario:
    """Cisco CUBE: RFC 7865 metadata with a ``ccn:`` prefix, the recorded call's GUID in the
    session's extension data and in ``Cisco-Guid``, and an ``application/gtd`` part."""
    guid = "A1B2C3D4-0000-0001-0000-00AB12CD34EF"
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<ccn:recording xmlns:ccn="{_RFC}">
  <ccn:datamode>complete</ccn:datamode>
  <ccn:session session_id="Y3ViZXNlc3Npb24=">
    <ccn:sipSessionID>5b6c1f0e8d2a4b39a7c6d5e4f3a2b1c0</ccn:sipSessionID>
    <ccn:start-time>2026-12-02T06:00:00.000Z</ccn:start-time>
    <ccn:extensiondata xmlns:cisco="http://cisco.com/siprec">
      <cisco:callguid>{guid}</cisco:callguid>
    </ccn:extensiondata>
  </ccn:session>
  <ccn:participant participant_id="cGFydHlB">
    <ccn:nameID aor="sip:8005@cucm.example"/>
  </ccn:participant>
  <ccn:participant participant_id="cGFydHlC">
    <ccn:nameID aor="sip:+13125550123@itsp.example"/>
  </ccn:participant>
  <ccn:stream stream_id="c3RyMQ==" session_id="Y3ViZXNlc3Npb24="><ccn:label>1</ccn:label></ccn:stream>
  <ccn:stream stream_id="c3RyMg==" session_id="Y3ViZXNlc3Npb24="><ccn:label>2</ccn:label></ccn:stream>
  <ccn:participantstreamassoc participant_id="cGFydHlB"><ccn:send>c3RyMg==</ccn:send></ccn:participantstreamassoc>
  <ccn:participantstreamassoc participant_id="cGFydHlC"><ccn:send>c3RyMQ==</ccn:send></ccn:participantstreamassoc>
</ccn:recording>
"""
    gtd = b"IAM,\r\nPRN,isdn*,,NET5*,\r\nUSI,rate,c,s,c,1\r\nUSI,lay1,alaw\r\nTMR,00\r\nCPN,00,,1,3125550123\r\n"
    return Scenario(
        "cisco-cube",
        {"Cisco-Guid": "2891148800-0000065536-0000000123-0315887808", "Session-ID": "5b6c1f0e8d2a4b39a7c6d5e4f3a2b1c0"},
        [Stream("audio", "1", CUSTOMER_HZ), Stream("audio", "2", AGENT_HZ)],
        "application/rs-metadata+xml",
        meta,
        recording_keys=[guid.lower()],
        agent_addresses=["8005"],
        extra_parts=[("application/gtd", "Content-Disposition: signal;handling=optional\r\n", gtd)],
        expected={"1": "customer", "2": "agent"},
    )


def ribbon() -> Scenario:
    """Sonus/Ribbon SBC: a ``tns:``-prefixed RFC 7865 document, AoRs without ``sip:``, and the
    recorded call's ``callData`` (Call-ID, GCID) as extension data."""
    gcid = "1593829401"
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<tns:recording xmlns:tns="{_RFC}">
  <tns:datamode>complete</tns:datamode>
  <tns:session session_id="UmliYm9uU2Vzcw==">
    <tns:start-time>2026-12-02T06:00:00</tns:start-time>
  </tns:session>
  <tns:extensiondata>
    <callData xmlns="http://ribbon.example/siprec/callData">
      <callid>8a7b6c5d4e3f@10.1.1.20</callid>
      <gcid>{gcid}</gcid>
      <from>&lt;sip:+16135550142@10.1.1.20&gt;;tag=gK0a1b2c3d</from>
    </callData>
  </tns:extensiondata>
  <tns:participant participant_id="UGFydGljaXBhbnRB">
    <tns:nameID aor="+16135550142@10.1.1.20"/>
  </tns:participant>
  <tns:participant participant_id="UGFydGljaXBhbnRC">
    <tns:nameID aor="2210@10.1.1.30"/>
  </tns:participant>
  <tns:stream stream_id="U3RyZWFtMQ==" session_id="UmliYm9uU2Vzcw=="><tns:label>1</tns:label></tns:stream>
  <tns:stream stream_id="U3RyZWFtMg==" session_id="UmliYm9uU2Vzcw=="><tns:label>2</tns:label></tns:stream>
  <tns:participantstreamassoc participant_id="UGFydGljaXBhbnRB"><tns:send>U3RyZWFtMQ==</tns:send></tns:participantstreamassoc>
  <tns:participantstreamassoc participant_id="UGFydGljaXBhbnRC"><tns:send>U3RyZWFtMg==</tns:send></tns:participantstreamassoc>
</tns:recording>
"""
    return Scenario(
        "ribbon",
        {},
        [Stream("audio", "1", CUSTOMER_HZ), Stream("audio", "2", AGENT_HZ)],
        "application/rs-metadata+xml",
        meta,
        recording_keys=[gcid],
        agent_addresses=["sip:2210@pbx.example"],
        customer_addresses=["tel:+1-613-555-0142"],
        expected={"1": "customer", "2": "agent"},
    )


def broadworks() -> Scenario:
    """Cisco Webex Calling / BroadWorks: the pre-RFC ``recording_metadata`` document, its
    tracking id (``extTrackingID``) known to the platform, participants by ``<address>`` and the
    labels of the streams they send."""
    tracking = "48:1-2B3C4D5E6F"
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording_metadata xmlns="http://schema.broadsoft.com/callrecording" version="1.0">
  <session>
    <callID>BW0612003001202261-1877@10.30.0.8</callID>
    <extTrackingID>{tracking}</extTrackingID>
    <serviceProviderID>sp-example</serviceProviderID>
  </session>
  <participant role="recorded">
    <address>sip:+31201234567@bw.example;user=phone</address>
    <userID>agent.jansen@bw.example</userID>
    <send>1</send>
  </participant>
  <participant role="remote">
    <address>tel:+31612345678</address>
    <send>2</send>
  </participant>
</recording_metadata>
"""
    return Scenario(
        "broadworks",
        {"X-BroadWorks-Correlation-Info": "e0b3c7a2-5d4f-4c1b-9a8e-7f6d5c4b3a21"},
        [Stream("audio", "1", AGENT_HZ), Stream("audio", "2", CUSTOMER_HZ)],
        "application/rs-metadata+xml",
        meta,
        recording_keys=[tracking],
        agent_addresses=["+31 20 123 4567"],
        expected={"1": "agent", "2": "customer"},
    )


def avaya_sbce_mixed() -> Scenario:
    """Avaya SBCE sending one mixed stream (both parties in one m-line): the ``mixed`` leg."""
    meta = f"""<?xml version="1.0" encoding="UTF-8"?>
<recording xmlns="{_RFC}">
  <datamode>mixed</datamode>
  <session session_id="bWl4ZWQ="><sipSessionID>0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f</sipSessionID></session>
  <participant participant_id="YQ=="><nameID aor="sip:3001@avaya.example"/></participant>
  <participant participant_id="Yg=="><nameID aor="sip:+15550177@pstn.example"/></participant>
  <stream stream_id="cw==" session_id="bWl4ZWQ="><label>1</label></stream>
  <participantstreamassoc participant_id="YQ=="><send>cw==</send></participantstreamassoc>
  <participantstreamassoc participant_id="Yg=="><send>cw==</send></participantstreamassoc>
</recording>
"""
    return Scenario(
        "avaya-sbce-mixed",
        {},
        [Stream("audio", "1", AGENT_HZ)],
        "application/rs-metadata+xml",
        meta,
        recording_keys=["0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f"],
        expected={"1": "mixed"},
    )


SCENARIOS = [
    rfc8068_basic_call,
    oracle_acme,
    oracle_avaya_ucid,
    oracle_avaya_full,
    cisco_cube,
    ribbon,
    broadworks,
    avaya_sbce_mixed,
]


# --- media -----------------------------------------------------------------------------------


def _rtp_packets(freq: float, codec: str, count: int) -> list[bytes]:
    encoder = G711PacketEncoder(codec)
    pt = 0 if codec == "pcmu" else 8
    ssrc = uuid.uuid4().int & 0xFFFFFFFF
    t = np.arange(160 * count) / 8000.0
    pcm = (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    out = []
    for i in range(count):
        header = struct.pack("!BBHII", 0x80, pt | (0x80 if i == 0 else 0), i & 0xFFFF, (160 * i) & 0xFFFFFFFF, ssrc)
        out.append(header + encoder.payload(pcm[160 * i : 160 * (i + 1)], i))
    return out


async def send_rtp(dest: tuple[str, int], src_port: int, freq: float, codec: str, seconds: float) -> None:
    """Play a ``freq`` Hz tone as G.711 ``codec`` ('pcmu'/'pcma') RTP to ``dest`` for ``seconds``."""
    packets = _rtp_packets(freq, codec, int(seconds * 50))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", src_port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        for i, packet in enumerate(packets):
            try:
                sock.sendto(packet, dest)
            except OSError:
                pass
            delay = start + (i + 1) * 0.02 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        sock.close()
