"""The process protocol between the main process and a SIP worker (gateway/sip/protocol.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.sip.protocol import (
    COMMANDS,
    EVENTS,
    MESSAGES,
    Answer,
    CallEnded,
    LegQuality,
    PhoneEnded,
    ProtocolError,
    Quit,
    Stats,
    WorkerArgs,
    decode,
    decode_leg_frame,
    encode,
    encode_leg_frame,
    leg_frame_conversation,
)

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parent.parent


def test_every_message_has_one_wire_tag() -> None:
    assert len(MESSAGES) == len(COMMANDS) + len(EVENTS)
    assert {cls.TYPE for cls in COMMANDS}.isdisjoint({cls.TYPE for cls in EVENTS})


@pytest.mark.parametrize(
    "message",
    [
        Answer(call=3, cid="c-1", legs=["customer", None, "agent"]),
        Answer(call=3, cid="c-1", legs=["agent"], re=9),
        Quit(),
        CallEnded(call=2, reason="media_timeout"),
        PhoneEnded(mid="m-1", reason="left"),
        Stats(frames=10, drops=1),
        Stats(frames=10, drops=1, refused=2, stats_us=1830),
        LegQuality(
            cid="c-1",
            legs={"agent": {"packets": 45, "lost": 5, "jitter_us": 1250, "jbuf_ms": 40}},
            phone=True,
        ),
    ],
)
def test_messages_round_trip_as_one_json_line(message: object) -> None:
    line = encode(message)  # type: ignore[arg-type]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == message


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"type": "nope"}',
        b'{"call": 1}',
        b'{"type": "answer", "cid": "c-1", "legs": []}',  # no call
        b'{"type": "answer", "call": "1", "cid": "c-1", "legs": []}',  # call is not an int
        b'{"type": "answer", "call": true, "cid": "c-1", "legs": []}',
        b'{"type": "stats", "frames": 1.5, "drops": 0}',
        b'{"type": "leg_quality", "cid": "c-1"}',  # no legs
        b'{"type": "leg_quality", "cid": "c-1", "legs": []}',  # legs is not an object
    ],
)
def test_malformed_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(line)


def test_unknown_fields_are_ignored() -> None:
    assert decode(b'{"type": "quit", "later": 1}') == Quit()
    assert json.loads(encode(Quit())) == {"type": "quit", "re": 0}


def test_leg_frame_codec() -> None:
    agent = np.arange(160, dtype=np.int16)
    customer = -agent
    stamp_ns = time.monotonic_ns()
    data = encode_leg_frame("c-é".encode(), 7, 8000, agent.tobytes(), customer.tobytes(), stamp_ns)
    assert leg_frame_conversation(data) == "c-é"
    frame = decode_leg_frame(data)
    assert (frame.conversation, frame.seq, frame.sample_rate, frame.samples) == ("c-é", 7, 8000, 160)
    assert np.array_equal(frame.agent, agent) and np.array_equal(frame.customer, customer)
    # the worker's CLOCK_MONOTONIC stamp arrives as time.monotonic() seconds (same clock here)
    assert abs(frame.stamp - stamp_ns / 1e9) < 1e-6 and 0 <= time.monotonic() - frame.stamp < 1
    assert decode_leg_frame(encode_leg_frame(b"c", 1, 8000, b"\0\0", b"\0\0")).stamp == 0.0  # unknown
    for bad in (data[:9], data[:-1], b"\x01" + data[1:], data + b"\0\0"):
        with pytest.raises(ValueError):
            decode_leg_frame(bad)
    assert leg_frame_conversation(b"\x01" + data[1:]) is None  # version 1 frames had no stamp
    assert leg_frame_conversation(data[:20]) is None  # the id cut short
    assert leg_frame_conversation(data[:18] + b"\xff\xfe\xfd\xfc") is None  # not UTF-8


def test_worker_args_round_trip_through_argv() -> None:
    args = WorkerArgs(ctl_fd=5, frame_fd=6, sip_port=5061, media_timeout=2.5, max_calls=3)
    assert WorkerArgs.parse(args.argv()) == args


def test_the_worker_side_of_the_protocol_imports_no_numpy() -> None:
    """Each worker process imports the protocol; numpy would cost it ~17 MB and ~0.2 s."""
    code = "import sys, gateway.sip.protocol; assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
