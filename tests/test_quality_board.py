"""The quality figures' arithmetic (gateway/quality.py) and who may see them; fast, no peers.

The measurements themselves are checked against real receivers in tests/test_quality.py."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from gateway.domain import DomainEvent, EventType, Principal
from gateway.policy import rules
from gateway.quality import PHONE_SEND_MS, IngressQuality, LegReport, QualityBoard

pytestmark = pytest.mark.unit


def ingress(agent_jbuf: float, customer_jbuf: float, *, phone: bool = True, lost: int = 0) -> IngressQuality:
    return IngressQuality(
        {"agent": LegReport(45, lost, 1.5, agent_jbuf), "customer": LegReport(50, 0, 12.25, customer_jbuf)},
        phone,
        time.monotonic(),
    )


def test_leg_report_parses_the_worker_event_and_refuses_junk() -> None:
    report = LegReport.parse({"packets": 45, "lost": 5, "jitter_us": 1250, "jbuf_ms": 40})
    assert report == LegReport(45, 5, 1.25, 40.0)
    assert report.to_json() == {"loss_pct": 10.0, "jitter_ms": 1.2, "packets": 45}  # 1.25 rounds to even
    assert LegReport(0, 0, 0.0, 0.0).to_json()["loss_pct"] == 0.0  # nothing expected: no loss
    with_resample = LegReport.parse(
        {"packets": 45, "lost": 5, "jitter_us": 1250, "jbuf_ms": 40, "resample_ms": {"sip": 6.0, "webrtc": 3.0}}
    )
    assert with_resample == LegReport(45, 5, 1.25, 40.0, {"sip": 6.0, "webrtc": 3.0})
    held = LegReport.parse({"packets": 1, "lost": 0, "jitter_us": 0, "jbuf_ms": 20, "codec_ms": 20})
    assert held is not None and held.codec_ms == 20.0
    assert with_resample.to_json() == report.to_json()  # an input to the latency, not a leg figure
    for junk in (
        None,
        [],
        {"packets": 1},
        {"packets": "x", "lost": 0, "jitter_us": 0, "jbuf_ms": 0},
        {"packets": 1, "lost": 0, "jitter_us": 0, "jbuf_ms": 0, "resample_ms": [1]},
        {"packets": 1, "lost": 0, "jitter_us": 0, "jbuf_ms": 0, "resample_ms": {"sip": "x"}},
    ):
        assert LegReport.parse(junk) is None


def test_phone_latency_is_the_slower_legs_smoothed_wait() -> None:
    board = QualityBoard()
    first = board.measure("m", ingress(20, 60), "sip", None)
    assert first.added_ms == 60 + PHONE_SEND_MS
    # a reading of 0 moves the smoothed wait by 30 %, not all the way (one reading is noisy)
    second = board.measure("m", ingress(20, 0), "sip", None)
    assert second.added_ms == pytest.approx(0.7 * 60 + 0.3 * 0 + PHONE_SEND_MS)
    # a phone still ringing hears nothing yet: legs, but no latency
    assert board.measure("m", ingress(20, 0, phone=False), "sip", None).added_ms is None


def test_the_resamplers_delay_is_added_per_leg_and_path() -> None:
    """A G.711 agent (8 -> 16 -> 8 kHz toward a G.711 phone: 6 ms) and a G.722 customer (no
    resampler toward a G.722 phone): the slower leg is the agent once its 6 ms count."""
    board = QualityBoard()
    legs = {
        "agent": LegReport(50, 0, 1.0, 20.0, {"sip": 6.0, "webrtc": 6.0}),
        "customer": LegReport(50, 0, 1.0, 22.0, {"sip": 0.0, "webrtc": 3.0}),
    }
    opus = {"customer": LegReport(50, 0, 1.0, 22.0, {"sip": 3.0}, codec_ms=20.0)}
    assert QualityBoard().measure(
        "o", IngressQuality(opus, True, time.monotonic()), "sip", None
    ).added_ms == pytest.approx(45.0 + PHONE_SEND_MS)  # an Opus decoder's held frame counts too
    assert board.measure("m", IngressQuality(legs, True, time.monotonic()), "sip", None).added_ms == pytest.approx(
        26.0 + PHONE_SEND_MS
    )
    board.measure("w", IngressQuality(legs, False, time.monotonic()), "webrtc", (0.1, 10))
    second = board.measure("w", IngressQuality(legs, False, time.monotonic()), "webrtc", (0.6, 60))
    assert second.added_ms == pytest.approx(26.0 + 10.0)


def test_webrtc_latency_adds_the_transit_of_the_last_second() -> None:
    board = QualityBoard()
    assert board.measure("m", ingress(10, 10), "webrtc", (0.5, 50)).added_ms is None  # first: the baseline
    # 50 more frames took 0.75 s more in all: 15 ms each
    assert board.measure("m", ingress(10, 10), "webrtc", (1.25, 100)).added_ms == pytest.approx(25.0)
    # a new listener (counters restart) gives no figure for that second, then a new baseline
    assert board.measure("m", ingress(10, 10), "webrtc", (0.1, 10)).added_ms is None
    assert board.measure("m", ingress(10, 10), "webrtc", (0.6, 60)).added_ms == pytest.approx(20.0)


def test_the_answer_shape_and_forgetting() -> None:
    board = QualityBoard()
    assert board.get("m") is None
    board.measure("m", ingress(20, 40, lost=5), "sip", None)
    got = board.get("m")
    assert got is not None and set(got) == {"added_latency_ms", "legs", "updated_at"}
    assert got["legs"]["agent"] == {"loss_pct": 10.0, "jitter_ms": 1.5, "packets": 45}
    assert (
        got["updated_at"].endswith("Z") and abs(datetime.fromisoformat(got["updated_at"]).timestamp() - time.time()) < 2
    )
    board.measure("other", ingress(0, 0), "sip", None)
    board.retain({"other"})
    assert board.get("m") is None and board.get("other") is not None


def test_quality_events_go_to_the_monitors_own_supervisor_only() -> None:
    def principal(name: str, *roles: str) -> Principal:
        return Principal(name, name, frozenset(roles), "s", time.time() + 60, "c", frozenset({"team-a"}))

    event = DomainEvent(EventType.MONITOR_QUALITY, "c", "team-a", {"monitor": "m", "supervisor": "sam", "quality": {}})
    assert rules.may_see_event(principal("sam", "supervisor"), event)
    assert not rules.may_see_event(principal("tom", "supervisor"), event)  # same team, not his monitor
    assert not rules.may_see_event(principal("platform", "platform"), event)
    assert event.to_json()["type"] == "monitor_quality"
