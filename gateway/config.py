"""Typed settings, read from ``GATEWAY_*`` environment variables with embedded defaults.

Every setting has a default that makes ``python -m gateway serve`` work on a laptop with
nothing else installed: the embedded identity provider, SQLite files under ``./var``,
loopback addresses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent


def _default_realm_file() -> str:
    return str(PROJECT_DIR / "fixtures" / "realm-cx.json")


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

    # --- identity -------------------------------------------------------------------------
    #: Base URL of a real Keycloak (``http://127.0.0.1:8081``). Empty: the embedded provider.
    keycloak_url: str = ""
    realm: str = "cx"
    #: Audience that access tokens must carry in ``aud`` or ``azp`` (any of, comma-separated).
    audience: str = "gateway-console,cx-platform,gateway"
    #: Admin credentials used to read groups (client-credentials of a confidential client).
    admin_client_id: str = "cx-platform"
    admin_client_secret: str = "dev-secret"
    #: Realm export served by the embedded provider.
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

    # --- SIP media workers ----------------------------------------------------------------
    sip_workers: int = 2
    calls_per_worker: int = 4
    sip_worker_base_port: int = 0  # 0: sip_port + 1 ...
    rtp_port_base: int = 20000
    media_host: str = "127.0.0.1"
    enable_sip: bool = True
    #: Count a supervisor-phone call in every conversation's footprint, so that ``call_phone``
    #: never finds the worker full (off: twice the per-leg density, 503 ``voice_capacity`` when full).
    sip_reserve_phone_slot: bool = True
    #: Seconds a 302 reservation waits for the redirected INVITE at the worker.
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

    # --- operations -----------------------------------------------------------------------
    log_level: str = "INFO"
    drain_seconds: float = 10.0
    #: Run the demo platform inside the process (``make run``).
    demo: bool = False

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

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
