"""Prometheus metrics. No per-conversation labels: cardinality stays flat with traffic."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram("gateway_http_request_seconds", "HTTP request latency", ["route"], registry=r)
        self.refusals = Counter("gateway_refusals_total", "Refused requests by error code", ["code"], registry=r)
        self.token_rejections = Counter("gateway_token_rejections_total", "Access tokens rejected", registry=r)
        self.monitors_started = Counter("gateway_monitors_started_total", "Monitors started", ["voice"], registry=r)
        self.monitors_ended = Counter(
            "gateway_monitors_ended_total", "Monitors ended by reason", ["reason"], registry=r
        )
        self.active_conversations = Gauge("gateway_conversations_active", "Ongoing conversations", registry=r)
        self.active_monitors = Gauge("gateway_monitors_active", "Active monitors", registry=r)
        self.jwks_fetches = Gauge("gateway_jwks_fetches", "JWKS fetches since start", registry=r)
        self.events_clients = Gauge("gateway_events_clients", "Connected /v1/events websockets", registry=r)
        self.inbound_rtp_dropped = Counter(
            "gateway_webrtc_inbound_rtp_dropped_total",
            "RTP packets a WebRTC monitor sent and the gateway dropped",
            registry=r,
        )
        self.plane_stats = Gauge(
            "gateway_plane_stat", "Counters reported by the media planes", ["plane", "stat"], registry=r
        )
        # Voice quality, one observation per voice monitor (loss, jitter: per leg) per second;
        # labelled only by the listener's path, never by conversation (gateway.quality).
        self.voice_added_latency = Histogram(
            "gateway_voice_added_latency_seconds",
            "Latency the gateway adds from a leg's RTP in to the monitor's audio out",
            ["path"],
            buckets=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0),
            registry=r,
        )
        self.voice_leg_loss = Histogram(
            "gateway_voice_leg_loss_ratio",
            "Share of a monitored leg's RTP packets lost, per second",
            ["path"],
            buckets=(0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.voice_leg_jitter = Histogram(
            "gateway_voice_leg_jitter_seconds",
            "RFC 3550 interarrival jitter of a monitored leg",
            ["path"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32),
            registry=r,
        )
        self._collectors: list[Callable[[], None]] = []

    def on_scrape(self, collect: Callable[[], None]) -> None:
        """Run ``collect`` before each scrape (to copy gauges from planes)."""
        self._collectors.append(collect)

    def render(self) -> bytes:
        for collect in self._collectors:
            collect()
        return generate_latest(self.registry)
