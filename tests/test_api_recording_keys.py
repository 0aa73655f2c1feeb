"""Recording keys and participants (issue 13) through the API and the SIP hooks, without SIP
media: the PUT fields and their checks, the store's index, what the SIP plane is told, and
``voice_streams``. The real SIPREC calls run in tests/test_siprec_clients.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from gateway.api.context import RUNTIME, SERVICE
from gateway.api.whep_routes import _stereo
from gateway.domain import Conversation, Direction
from gateway.sip.parties import Parties
from gateway.store import SqliteStore
from gateway.wiring import DomainSipHooks

from .support import make_settings, running_gateway

pytestmark = [pytest.mark.api]

PARTICIPANTS = {"agent": ["sip:4001@pbx.example"], "customer": ["+1 555 010 0199"]}


async def test_recording_keys_find_the_conversation_and_voice_streams_show(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        put = await gw.conversation("rk-1", recording_keys=["UCID-00FA08", "sess-1"], participants=PARTICIPANTS)
        assert put.status == 201 and put.body["voice_streams"] == [], put.body
        hooks = DomainSipHooks(gw.app[SERVICE], gw.app[RUNTIME])
        assert hooks.recording_conversation(["nothing", "ucid-00fa08"]) == "rk-1"  # case-insensitive
        assert hooks.conversation_parties("rk-1") == Parties("alice", ("sip:4001@pbx.example",), ("+1 555 010 0199",))
        streams = [
            {"leg": "agent", "label": "2", "participant": "sip:4001@10.0.0.5"},
            {"leg": "customer", "label": "1", "participant": "tel:+15550100199"},
        ]
        hooks.on_streams_attributed("rk-1", streams)
        sam = await gw.login("sam")
        got = await gw.call("GET", "/v1/conversations/rk-1", sam)
        assert got.body["voice_streams"] == [], "no stream before its media is up"
        hooks.on_leg_started("rk-1", "agent")
        hooks.on_leg_started("rk-1", "customer")
        got = await gw.call("GET", "/v1/conversations/rk-1", sam)
        assert got.body["voice_streams"] == streams and got.body["voice_legs"] == ["agent", "customer"]
        hooks.on_leg_ended("rk-1", "customer", "bye")
        got = await gw.call("GET", "/v1/conversations/rk-1", sam)
        assert got.body["voice_streams"] == streams[:1]
        # A PUT without the keys takes them away; another conversation may claim them.
        assert (await gw.conversation("rk-1", participants=PARTICIPANTS)).status == 200
        assert hooks.recording_conversation(["sess-1"]) is None
        assert (await gw.conversation("rk-2", recording_keys=["sess-1"])).status == 201
        assert hooks.recording_conversation(["sess-1"]) == "rk-2"
        assert hooks.conversation_parties("rk-2") == Parties("alice")
        # A key names one conversation: the latest PUT naming it wins.
        assert (await gw.conversation("rk-3", recording_keys=["UCID-00FA08"])).status == 201
        assert hooks.recording_conversation(["UCID-00FA08"]) == "rk-3"
        assert (await gw.event("rk-2", "ended")).status == 202
        assert hooks.recording_conversation(["sess-1"]) is None and hooks.conversation_parties("rk-2") is None


BAD_BODIES: list[dict[str, Any]] = [
    {"recording_keys": "sess-1"},
    {"recording_keys": [5]},
    {"recording_keys": [""]},
    {"recording_keys": ["x" * 257]},
    {"recording_keys": [f"k{i}" for i in range(33)]},
    {"participants": ["4001"]},
    {"participants": {"agent": "4001"}},
    {"participants": {"customer": [1555]}},
]


async def test_bad_recording_keys_and_participants_are_422_and_hold_nothing(tmp_path: Path) -> None:
    async with running_gateway(make_settings(tmp_path)) as gw:
        sam = await gw.login("sam")
        for body in BAD_BODIES:
            answer = await gw.conversation("rk-bad", **body)
            assert (answer.status, answer.code) == (422, "invalid_field"), (body, answer.body)
            assert (await gw.call("GET", "/v1/conversations/rk-bad", sam)).status == 404


def test_sqlite_store_keeps_recording_keys_and_drops_voice_streams(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    conversation = Conversation("rk-3", Direction.INBOUND, "alice", "team-a", recording_keys=["GCID-1"])
    conversation.participants = {"agent": ["2210"]}
    conversation.voice_streams = [{"leg": "mixed", "label": "1", "participant": "sip:3001@x"}]
    store.put_conversation(conversation)
    store.close()
    again = SqliteStore(tmp_path / "s.db")
    found = again.conversation_by_recording_key("gcid-1")
    assert found is not None and found.participants == {"agent": ["2210"]} and found.voice_streams == []
    again.forget_conversation("rk-3")
    assert again.conversation_by_recording_key("GCID-1") is None
    again.close()


@pytest.mark.parametrize(
    "query,legs,stereo",
    [
        ("?stereo=1", {"agent", "customer"}, True),
        ("?stereo=1", {"mixed"}, False),
        ("", {"mixed"}, False),
        ("", {"agent"}, True),
        ("?stereo=0", {"agent", "customer"}, False),
    ],
)
def test_a_mixed_stream_is_never_offered_in_stereo(query: str, legs: set[str], stereo: bool) -> None:
    request = make_mocked_request("POST", f"/v1/monitors/m-1/whep{query}")
    assert _stereo(request, True, legs) is stereo
