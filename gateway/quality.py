"""How good a monitor's voice is, as its supervisor sees it (issue 12): per-leg loss and jitter,
and the latency the gateway adds between a leg's RTP arriving and the monitor's audio leaving.

Where each figure comes from (``docs/DESIGN.md`` §"Quality"):

* **Per leg, measured by pjmedia** in the SIP worker holding the leg, once a second
  (:class:`gateway.sip.protocol.LegQuality`): RTP packets received and lost (sequence gaps) in
  that second, the RFC 3550 interarrival jitter, and the jitter buffer's level (frames in it
  times the ptime) read at that moment. Read at a random moment between two bridge ticks, the
  level is on average how long a frame waits in the buffer between arriving and being mixed;
  one reading is off by up to a frame, so the levels are smoothed here (:data:`SMOOTHING`).
* **The bridge's resamplers**: a port whose rate is not the bridge's 16 kHz (a G.711 leg, a
  G.711 phone, an 8 kHz tap) is resampled, and each conversion delays the audio by half its
  filter (3 ms with the workers' setting, ``gateway.sip.worker.MEDIA_QUALITY``). The worker
  computes that per leg and path from the ports' rates (``resample_ms``) and it is added to
  the leg's wait below: it happens inside a bridge tick, so neither the jitter buffer nor the
  transit sees it. Likewise an Opus leg's decoder holds one frame (pjmedia decodes each frame
  when the next arrives, for in-band FEC): ``codec_ms``.
* **Added latency, WebRTC listener** = the legs' jitter-buffer wait (the larger of the two, as
  above) + the transit **measured for every frame**: the worker stamps each LegFrame with its
  CLOCK_MONOTONIC at the bridge tick that took it out of the jitter buffers, and the media
  process subtracts that from its own CLOCK_MONOTONIC when it takes the frame to encode and send
  it (the same clock across processes on Linux). The mean over the last second is used.
* **Added latency, SIP phone** = the jitter-buffer wait + :data:`PHONE_SEND_MS`: the conference
  bridge mixes the legs into the phone's stream in the same tick that took them out of the
  jitter buffers, and the stream encodes and sends at once (no buffer on that side), so the
  only part not measured is that in-tick processing, estimated.

Not counted: the network toward the listener and the listener's own jitter buffer (the
browser's, the phone's): they are the receiver's, not the gateway's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Path = Literal["sip", "webrtc"]

#: Estimate of the phone path after the jitter buffer: mix, encode and send in the bridge tick
#: that took the frame out of the jitter buffer (no queue on the way: < 1 ms measured as
#: CPU per tick in bench/bridge_cost.py).
PHONE_SEND_MS = 1.0
#: Weight of a new jitter-buffer reading (an exponential average: one reading is off by up to
#: a frame, ±20 ms; the average follows a real change within a few seconds).
SMOOTHING = 0.3
#: A leg report older than this is no measurement any more (the worker reports every second).
STALE_SECONDS = 3.0


@dataclass(frozen=True)
class LegReport:
    """One leg's second, as the worker measured it."""

    packets: int
    lost: int
    jitter_ms: float
    jbuf_ms: float
    #: per path ("sip", "webrtc"): the delay of the bridge's resamplers on the leg's way out
    #: (computed by the worker from the ports' rates; none between ports at the bridge's rate)
    resample_ms: Mapping[str, float] = field(default_factory=dict)
    #: the leg's decoder holding a frame after the jitter buffer (pjmedia's Opus: one frame)
    codec_ms: float = 0.0

    @classmethod
    def parse(cls, raw: Any) -> LegReport | None:
        """From :class:`gateway.sip.protocol.LegQuality`'s ``legs`` values (``None`` if malformed)."""
        if not isinstance(raw, Mapping):
            return None
        try:
            resample = raw.get("resample_ms") or {}
            return cls(
                max(0, int(raw["packets"])),
                max(0, int(raw["lost"])),
                max(0.0, float(raw["jitter_us"]) / 1000),
                max(0.0, float(raw["jbuf_ms"])),
                {str(path): max(0.0, float(ms)) for path, ms in resample.items()},
                max(0.0, float(raw.get("codec_ms", 0))),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    @property
    def loss_ratio(self) -> float:
        expected = self.packets + self.lost
        return self.lost / expected if expected else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "loss_pct": round(100 * self.loss_ratio, 1),
            "jitter_ms": round(self.jitter_ms, 1),
            "packets": self.packets,
        }


@dataclass(frozen=True)
class IngressQuality:
    """A conversation's legs as its worker last reported them (``at``: ``time.monotonic()``)."""

    legs: dict[str, LegReport]
    phone: bool
    at: float

    @property
    def fresh(self) -> bool:
        return time.monotonic() - self.at < STALE_SECONDS


def iso_utc(epoch: float) -> str:
    """``2026-12-02T09:30:00.123Z``."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Measured:
    """One monitor's quality this second, and what the histograms observe."""

    path: Path | None
    legs: dict[str, LegReport]
    added_ms: float | None
    at: float

    def to_json(self) -> dict[str, Any]:
        """The ``quality`` object of ``GET /v1/monitors/{mid}`` and of ``monitor_quality``."""
        return {
            "added_latency_ms": None if self.added_ms is None else round(self.added_ms, 1),
            "legs": {leg: r.to_json() for leg, r in sorted(self.legs.items())},
            "updated_at": iso_utc(self.at),
        }


class QualityBoard:
    """Per monitor: the smoothed jitter-buffer wait, the transit seen so far, the last figures."""

    def __init__(self) -> None:
        self.latest: dict[str, Measured] = {}
        self._jbuf: dict[str, dict[str, float]] = {}
        self._transit: dict[str, tuple[float, int]] = {}

    def measure(
        self, mid: str, ingress: IngressQuality, path: Path | None, transit: tuple[float, int] | None
    ) -> Measured:
        """This second's figures of monitor ``mid`` from its legs' report and, for a WebRTC
        listener, its cumulative transit (seconds, frames)."""
        added: float | None = None
        # Smoothed per leg, then the slower leg: the max of two noisy readings would be high.
        waits = self._jbuf.setdefault(mid, {})
        for leg, report in ingress.legs.items():
            before = waits.get(leg)
            waits[leg] = report.jbuf_ms if before is None else before + SMOOTHING * (report.jbuf_ms - before)
        # Then, per leg, what the ports' rates and the codec fix: the resamplers' delay on this
        # path and a decoder's held frame.
        smoothed = max(
            (waits[leg] + r.resample_ms.get(path or "", 0.0) + r.codec_ms for leg, r in ingress.legs.items()),
            default=0.0,
        )
        if path == "sip" and ingress.phone:
            added = smoothed + PHONE_SEND_MS
        elif path == "webrtc" and transit is not None:
            seconds, frames = transit
            seen = self._transit.get(mid)
            self._transit[mid] = transit
            if seen is not None and frames > seen[1] and seconds >= seen[0]:
                added = smoothed + 1000 * (seconds - seen[0]) / (frames - seen[1])
        measured = Measured(path, dict(ingress.legs), added, time.time())
        self.latest[mid] = measured
        return measured

    def get(self, mid: str) -> dict[str, Any] | None:
        """The last figures of ``mid`` (``None``: no voice, or nothing measured yet)."""
        measured = self.latest.get(mid)
        return measured.to_json() if measured is not None else None

    def retain(self, mids: set[str]) -> None:
        """Forget every monitor but ``mids`` (those still holding voice)."""
        for mid in set(self.latest) | set(self._jbuf) | set(self._transit):
            if mid not in mids:
                self.forget(mid)

    def forget(self, mid: str) -> None:
        """``mid`` no longer hears anything: its figures go."""
        self.latest.pop(mid, None)
        self._jbuf.pop(mid, None)
        self._transit.pop(mid, None)
