"""Typed settings, read from ``GATEWAY_*`` environment variables with embedded defaults.

Defaults are safe rather than convenient: loopback addresses, SQLite files under ``./var``, and
no identity provider and no secret at all. A real deployment names its Keycloak
(``GATEWAY_KEYCLOAK_URL``) and the confidential client that reads its groups
(``GATEWAY_ADMIN_CLIENT_ID`` / ``GATEWAY_ADMIN_CLIENT_SECRET``). ``GATEWAY_DEV=true`` (``make run``,
the tests) turns on the development conveniences: the embedded identity provider serving the
demo realm, and the demo realm's client secrets as defaults.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def _default_realm_file() -> str:
    return str(PROJECT_DIR / "fixtures" / "realm-cx-dev.json")


#: The demo realm's client that reads groups, used only in dev mode when none is set.
DEV_ADMIN_CLIENT = ("cx-platform", "dev-secret")


#: Values of ``fork_mode``: one SIPREC INVITE carrying both legs, or one INVITE per leg.
FORK_MODES = ("siprec", "per-leg")

#: Values of ``sip_srtp``.
SRTP_MODES = ("off", "optional", "mandatory")


class ConfigurationError(ValueError):
    """The settings must not serve (see :meth:`Settings.startup_problem`)."""


@dataclass(frozen=True)
class Settings:
    """All knobs of one gateway instance. Field ``foo_bar`` is read from ``GATEWAY_FOO_BAR``."""

    host: str = "127.0.0.1"
    port: int = 8080
    sip_host: str = "127.0.0.1"
    sip_port: int = 5060
    #: Public base URL of the HTTP API, used as the embedded identity provider's issuer.
    #: Empty means ``http://{host}:{port}``.
    public_url: str = ""

    #: Development mode: the embedded identity provider with the demo realm (when no Keycloak URL
    #: is set) and the demo realm's secrets as defaults. Never in production.
    dev: bool = False

    # --- identity -------------------------------------------------------------------------
    #: Base URL of a real Keycloak (``http://127.0.0.1:8081``). Empty: the embedded provider,
    #: which needs ``dev``.
    keycloak_url: str = ""
    realm: str = "cx"
    #: Audience that access tokens must carry in ``aud`` or ``azp`` (any of, comma-separated).
    audience: str = "gateway-console,cx-platform,gateway"
    #: The confidential client whose service account reads groups (client-credentials grant).
    #: Required with a Keycloak URL outside dev mode; dev mode defaults to the demo realm's.
    admin_client_id: str = ""
    admin_client_secret: str = ""
    #: Realm export served by the embedded provider (dev mode).
    realm_file: str = field(default_factory=_default_realm_file)
    #: Seconds a lookup that needs the identity provider may take before 503.
    identity_timeout: float = 2.0
    #: Minimum seconds between two JWKS fetches triggered by an unknown ``kid``.
    jwks_refetch_interval: float = 10.0
    token_leeway: int = 5

    # --- storage --------------------------------------------------------------------------
    data_dir: str = "var"
    audit_db: str = ""  # empty: {data_dir}/audit.sqlite3
    chat_db: str = ""  # empty: {data_dir}/chat.sqlite3

    # --- shared state (several instances) -------------------------------------------------
    #: ``redis://host:port/db``: conversations, monitors, the voice slot, login-session rights,
    #: the chat log and the events live in Redis, shared by every instance. Empty: SQLite files.
    redis_url: str = ""
    #: Seconds a Redis operation may take before the request gets 503 ``state_unavailable``.
    redis_timeout: float = 1.0
    #: Refuse to start unless Redis fsyncs each write before answering (AOF, ``appendfsync always``).
    redis_require_fsync: bool = True
    #: A chat entry is acknowledged once this many Redis replicas also have it (``WAIT``).
    redis_wait_replicas: int = 0
    #: Key prefix, so several gateways (or tests) can share one Redis.
    redis_prefix: str = "gw:"
    #: TTL of the voice slot's lease (R8); the owning instance renews it every third of it, so a
    #: crashed instance's slot frees itself within this time.
    voice_lease_seconds: float = 6.0
    #: How long a login session's rights are kept in Redis (Keycloak's "SSO Session Max").
    session_max_seconds: float = 36000.0
    #: Redis chat log: a conversation's entries expire this long after its last one (0: kept).
    chat_retention_seconds: float = 0.0

    # --- limits ---------------------------------------------------------------------------
    max_body_bytes: int = 64 * 1024
    max_message_chars: int = 4000
    chat_rate_per_second: float = 20.0
    chat_reader_cap: int = 256
    #: Monitors one supervisor may open: ``monitor_start_burst`` at once, then this many a minute
    #: (429 ``monitor_rate_limited`` beyond; a refused attempt costs nothing; 0: no limit).
    #: Leaving is never limited (R12).
    monitor_starts_per_minute: float = 30.0
    monitor_start_burst: int = 10

    # --- SIP media workers ----------------------------------------------------------------
    #: Worker processes: one per core by default, each holding hundreds of calls (a worker's
    #: conference bridge runs on one thread, so more workers than cores only adds idle cost).
    sip_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: Calls one worker may hold; 0: as many as its pjsua2 build allows (512 with the project's
    #: build, 4 with the PyPI wheel). Sizes each worker's RTP port block (4 ports per call).
    calls_per_worker: int = 0
    sip_worker_base_port: int = 0  # 0: sip_port + 1 ...
    rtp_port_base: int = 20000
    media_host: str = "127.0.0.1"
    enable_sip: bool = True
    #: Count a supervisor-phone call in every conversation's footprint, so that ``call_phone``
    #: never finds the worker full (off: twice the per-leg density, 503 ``voice_capacity`` when full).
    sip_reserve_phone_slot: bool = True
    #: Seconds a placement token waits for its forwarded INVITE to reach the worker.
    sip_reservation_seconds: float = 8.0
    #: An ingress call that receives no RTP for this long is hung up (``media_timeout``; 0: never).
    sip_media_timeout: float = 20.0
    #: A supervisor phone that does not answer within this long is ``phone_unreachable``.
    sip_ring_timeout: float = 30.0
    #: Seconds ``start()`` waits for every worker to report ready (at least 0.2 s per worker).
    sip_worker_ready_timeout: float = 15.0
    #: Seconds a command to a worker (phone, hang-up) may take to be answered.
    sip_command_timeout: float = 5.0
    #: A ready worker that sends nothing for this long (it reports every second) is killed.
    sip_hung_seconds: float = 6.0
    #: New INVITEs one source address may send the SIP address per second (503 + Retry-After
    #: beyond; 0: no limit), and the burst it may send at once.
    sip_invite_rate: float = 20.0
    sip_invite_burst: int = 40
    #: SIP over TLS at the SIP address: the front's TLS listener port (0: none). Needs
    #: ``sip_tls_cert`` and ``sip_tls_key`` (PEM files; the certificate file may hold the chain).
    sip_tls_port: int = 0
    sip_tls_cert: str = ""
    sip_tls_key: str = ""
    #: CA certificates (PEM file) the front trusts when it opens TLS toward a platform or a
    #: ``sips:`` phone; empty: the system's. Peers are verified (certificate and host name).
    sip_tls_ca: str = ""
    #: SRTP (SDES, RFC 4568) on ingress legs and supervisor phones: ``off``, ``optional``
    #: (used when the peer offers or accepts it), ``mandatory`` (plain RTP refused with 488,
    #: phones offered RTP/SAVP only).
    sip_srtp: str = "optional"

    # --- fork on demand (conversations PUT with "fork": "on_demand", gateway.fork) ----------
    #: The SIP URI platforms send a requested fork to (``sip_uri`` of ``voice_fork_requested``):
    #: the gateway's SIP address as platforms reach it, e.g. a Kamailio in front. Empty:
    #: ``sip:{sip_host}:{sip_port}``.
    fork_sip_uri: str = ""
    #: What the gateway asks for: ``siprec`` (one INVITE, both legs) or ``per-leg`` (one INVITE
    #: per leg with ``X-Conversation-ID`` / ``X-Leg``).
    fork_mode: str = "siprec"
    #: Seconds a granted voice waits for the platform's fork; then it ends (``fork_timeout``).
    fork_timeout: float = 10.0
    #: Also POST the fork events here (HMAC-SHA256 signed with ``fork_webhook_secret``). Empty: only
    #: ``/v1/events``.
    fork_webhook_url: str = ""
    fork_webhook_secret: str = ""
    #: Attempts per event (first one included, backoff 0.5 s doubling to 8 s) and seconds per attempt.
    fork_webhook_attempts: int = 6
    fork_webhook_timeout: float = 2.0

    # --- WebRTC ---------------------------------------------------------------------------
    #: Comma-separated ICE server URLs (``stun:host:port``). Default none: never a public host.
    ice_servers: str = ""
    #: Comma-separated addresses the gateway advertises as host candidates. Empty: all.
    ice_host_addresses: str = ""
    webrtc_stereo: bool = False
    #: Codec preferred toward browsers for mono: ``pcmu`` carries the G.711 legs without loss
    #: at a third of Opus's CPU; ``opus`` when bandwidth matters more. Stereo always uses Opus.
    webrtc_codec: str = "pcmu"
    #: One 20 ms tick per process sends every listener's packet (bench: ~4x the listeners per
    #: core of aiortc's own sender). Uses aiortc internals; turn off to fall back to the stock sender.
    webrtc_batch: bool = True
    #: WebRTC media processes (``gateway.media.process``), each answering its share of the
    #: listeners and sending their audio, fed straight by the SIP workers. 0: the listeners run
    #: in the API process (the pre-issue-9 path; the only one without SIP).
    webrtc_processes: int = field(default_factory=lambda: os.cpu_count() or 1)

    # --- operations -----------------------------------------------------------------------
    log_level: str = "INFO"
    drain_seconds: float = 10.0
    #: Run the demo platform inside the process (``make run``).
    demo: bool = False

    def __post_init__(self) -> None:
        if self.dev and not self.admin_client_id and not self.admin_client_secret:
            object.__setattr__(self, "admin_client_id", DEV_ADMIN_CLIENT[0])
            object.__setattr__(self, "admin_client_secret", DEV_ADMIN_CLIENT[1])

    def startup_problem(self) -> str | None:
        """Why these settings must not serve, in one line saying what to set; None when they may."""
        if not self.keycloak_url and not self.dev:
            return (
                "no identity provider: set GATEWAY_KEYCLOAK_URL (with GATEWAY_ADMIN_CLIENT_ID and "
                "GATEWAY_ADMIN_CLIENT_SECRET), or GATEWAY_DEV=true for the embedded demo provider (development only)"
            )
        if self.keycloak_url and not (self.admin_client_id and self.admin_client_secret):
            return (
                "GATEWAY_KEYCLOAK_URL is set but GATEWAY_ADMIN_CLIENT_ID / GATEWAY_ADMIN_CLIENT_SECRET are not: "
                "set the confidential client whose service account reads the realm's groups"
            )
        if self.demo and not self.dev:
            return "GATEWAY_DEMO needs GATEWAY_DEV=true (the demo platform uses the demo realm's clients)"
        if self.sip_srtp not in SRTP_MODES:
            return f"GATEWAY_SIP_SRTP={self.sip_srtp!r}: use one of {', '.join(SRTP_MODES)}"
        if self.fork_mode not in FORK_MODES:
            return f"GATEWAY_FORK_MODE={self.fork_mode!r}: use one of {', '.join(FORK_MODES)}"
        if self.fork_webhook_url and not self.fork_webhook_secret:
            return "GATEWAY_FORK_WEBHOOK_URL is set: set GATEWAY_FORK_WEBHOOK_SECRET (the webhook's HMAC key)"
        if self.sip_tls_port:
            return _tls_problem(self.sip_tls_cert, self.sip_tls_key, self.sip_tls_ca)
        return None

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def fork_uri(self) -> str:
        """``sip_uri`` of the fork events."""
        return self.fork_sip_uri or f"sip:{self.sip_host}:{self.sip_port}"

    @property
    def embedded_idp(self) -> bool:
        return not self.keycloak_url

    @property
    def issuer(self) -> str:
        base = self.keycloak_url or self.base_url
        return f"{base.rstrip('/')}/realms/{self.realm}"

    @property
    def audiences(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.audience.split(",") if a.strip())

    def data_path(self, name: str, override: str = "") -> Path:
        path = Path(override) if override else Path(self.data_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def audit_path(self) -> Path:
        return self.data_path("audit.sqlite3", self.audit_db)

    @property
    def state_path(self) -> Path:
        return self.data_path("state.sqlite3")

    @property
    def chat_path(self) -> Path:
        return self.data_path("chat.sqlite3", self.chat_db)

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``GATEWAY_*`` variables; unknown variables are ignored."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"GATEWAY_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(raw, f.type, f.name)
        return cls(**values)


def _tls_problem(cert: str, key: str, ca: str) -> str | None:
    """Why the SIP TLS files can not be used, or None (loaded once here so a bad file stops
    the start with one line instead of failing the SIP plane later)."""
    if not (cert and key):
        return "GATEWAY_SIP_TLS_PORT is set: set GATEWAY_SIP_TLS_CERT and GATEWAY_SIP_TLS_KEY (PEM files)"
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        return f"GATEWAY_SIP_TLS_CERT / GATEWAY_SIP_TLS_KEY can not be loaded: {exc}"
    try:
        ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        return f"GATEWAY_SIP_TLS_CA can not be loaded: {exc}"
    return None


def _parse(raw: str, type_name: Any, name: str) -> Any:
    kind = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            if raw.lower() in {"1", "true", "yes", "on"}:
                return True
            if raw.lower() in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
    except ValueError as exc:
        raise SystemExit(f"GATEWAY_{name.upper()}={raw!r} is not a valid {kind}") from exc
    return raw
