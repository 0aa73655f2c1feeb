"""The JSON bodies of the control API as pydantic models.

The request models validate what comes in (:func:`gateway.api.validation.read_body`) and, with
the response models, generate the schemas of the OpenAPI document (:mod:`gateway.api.openapi`),
so the document and the checks can not drift apart. Every request model is strict: JSON
`true` is never a number, `1` never a flag, `"yes"` never a boolean.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.domain import Channel, Direction, ForkPolicy, Leg, MonitorMode, PlatformEventType, VoiceKind
from gateway.errors import ErrorCode

#: Conversation ids travel in SIP headers and logs: printable and short.
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
ConversationId = Annotated[str, StringConstraints(pattern=CONVERSATION_ID_PATTERN)]

#: A chat sequence number (`?after=`): what SQLite stores in a signed 64-bit integer.
MAX_SEQ = 2**63 - 1

#: What a supervisor's phone URI may hold: `sip:`/`sips:` and RFC 3261 URI characters.
SIP_URI_PATTERN = r"^sips?:[A-Za-z0-9\-_.!~*'()%;:@&=+$,/?\[\]]*$"
SIP_URI_MAX_LENGTH = 256
_SIP_URI = re.compile(SIP_URI_PATTERN)


class RequestBody(BaseModel):
    """A JSON object sent to the API. Unknown fields are ignored; `null` for a field that has a
    default means the default (as the API always answered)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # the model answers "not an object" itself
        defaulted = {info.alias or name for name, info in cls.model_fields.items() if not info.is_required()}
        return {key: value for key, value in data.items() if value is not None or key not in defaulted}


# ---------------------------------------------------------------------------- platform side


#: An identifier of the recorded call or an address of a party (Session-ID, UCID, SIP URI, E.164...).
RecordingKey = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_MAX_KEYS = 32


class ParticipantsIn(RequestBody):
    """The parties' addresses as SIP recording metadata may name them: SIP URIs, extensions,
    E.164 numbers (compared by user part, ``sip:``/``tel:``, ``+`` and separators ignored)."""

    agent: list[RecordingKey] = Field(default_factory=list, max_length=_MAX_KEYS)
    customer: list[RecordingKey] = Field(default_factory=list, max_length=_MAX_KEYS)


class ConversationIn(RequestBody):
    """`PUT /v1/conversations/{cid}`: create or update a conversation."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "direction": "inbound",
                    "transferred": False,
                    "agent": "alice",
                    "customer": {"id": "c-1", "name": "Ann"},
                    "sessions": ["chat", "voice"],
                    "recording_keys": ["ab30317f1a784dc48ff824d0d3715d86", "00FA080018803B69810C4E"],
                    "participants": {"agent": ["sip:4001@pbx.example"], "customer": ["+15550100"]},
                }
            ]
        }
    )

    # Field order is the order errors are reported in: the first one is answered.
    direction: Direction = Direction.INBOUND
    transferred: bool = False
    agent: str = Field(min_length=1, max_length=256, description="the agent's username")
    customer: dict[str, Any] = Field(default_factory=dict, description="opaque to the gateway; `id` names the author")
    sessions: list[Channel] = Field(default_factory=list, description="the sessions active now")
    team: str | None = Field(default=None, description="default: the agent's Keycloak group")
    recording_keys: list[RecordingKey] = Field(
        default_factory=list,
        max_length=_MAX_KEYS,
        description="identifiers of the recorded call (Session-ID, Call-ID, UCID, GCID, GUID...): "
        "a SIPREC session that carries one in its headers or metadata belongs to this conversation",
    )
    participants: ParticipantsIn | None = Field(
        default=None, description="the parties' addresses: which SIPREC stream is the agent's, which the customer's"
    )
    fork: ForkPolicy = Field(
        default="always",
        description="`always`: the platform forks the voice whenever it is active; `on_demand`: only when the "
        "gateway asks (`voice_fork_requested` on /v1/events and the webhook), until `voice_fork_released`",
    )

    @field_validator("agent")
    @classmethod
    def _agent_is_a_username(cls, agent: str) -> str:
        if not agent.strip():
            raise PydanticCustomError(ErrorCode.INVALID_FIELD.value, "field 'agent' must be a username")
        return agent

    @field_validator("sessions")
    @classmethod
    def _each_session_once(cls, sessions: list[Channel]) -> list[Channel]:
        return list(dict.fromkeys(sessions))


class PlatformEventIn(RequestBody):
    """`POST /v1/conversations/{cid}/events`: a fact about the conversation."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"type": "chat_started"}]})

    type: PlatformEventType


class ChatMessageIn(RequestBody):
    """`POST /v1/conversations/{cid}/messages`: chat ingest, idempotent on `client_id`.

    `from` is required with the `platform` role; an agent's own token may leave it out
    (`agent`)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"from": "customer", "text": "My parcel is late", "client_id": "u-1"}]}
    )

    sender: Literal["customer", "agent"] = Field(default="agent", alias="from")
    text: str = Field(description="emptiness and length are the chat plane's to judge")
    client_id: str | None = Field(default=None, description="1-200 characters; a retry with it is answered once")


class PlatformChatMessageIn(ChatMessageIn):
    """A chat message posted with the `platform` role: it must say who wrote it."""

    sender: Literal["customer", "agent"] = Field(alias="from")


# ---------------------------------------------------------------------------- supervisor side


class WebRtcVoice(RequestBody):
    """Listen in the browser (then `POST /v1/monitors/{mid}/whep`)."""

    kind: Literal["webrtc"]


def _sip_uri(uri: str, field: str = "voice.uri") -> str:
    if len(uri) > SIP_URI_MAX_LENGTH or not _SIP_URI.fullmatch(uri):
        raise PydanticCustomError(ErrorCode.INVALID_SIP_URI.value, f"{field} must be a sip: URI")
    return uri


def _phone_uri(uri: str) -> str:
    return _sip_uri(uri, "uri")


class SipVoice(RequestBody):
    """Listen on a SIP phone: the gateway calls `uri`."""

    kind: Literal["sip"]
    uri: Annotated[str, AfterValidator(_sip_uri)] = Field(
        json_schema_extra={"pattern": SIP_URI_PATTERN, "maxLength": SIP_URI_MAX_LENGTH}
    )


Voice = Annotated[WebRtcVoice | SipVoice, Field(discriminator="kind")]


class MonitorStartIn(RequestBody):
    """`POST /v1/conversations/{cid}/monitors`: `voice` null (or no body) monitors the chat only."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"voice": {"kind": "webrtc"}}, {"voice": None}]})

    voice: Voice | None = None


class PhoneIn(RequestBody):
    """`PUT /v1/me/phone`: the SIP phone the console offers to ring when this supervisor monitors."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"uri": "sip:sam@phones.example.com"}]})

    uri: Annotated[str, AfterValidator(_phone_uri)] = Field(
        json_schema_extra={"pattern": SIP_URI_PATTERN, "maxLength": SIP_URI_MAX_LENGTH}
    )


class ChatTextIn(RequestBody):
    """A supervisor's whisper to the agent, or message to the customer after barging in."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"text": "Offer the refund", "client_id": "w-1"}]})

    text: str
    client_id: str | None = Field(default=None, description="1-200 characters; a retry with it is answered once")


# ---------------------------------------------------------------------------- answers


class MonitorBrief(BaseModel):
    """A monitor as a conversation lists it (R11)."""

    id: str
    supervisor: str
    channels: list[Channel]
    mode: MonitorMode


class VoiceOut(BaseModel):
    kind: VoiceKind
    uri: str | None


class MonitorOut(MonitorBrief):
    """One monitor: what it holds, and how it ended."""

    conversation: str
    voice_blocked_reason: str | None = Field(description="why voice was not granted or was taken away")
    voice: VoiceOut | None
    voice_pending: bool = Field(
        description="the voice is granted and waits for the platform's fork (`on_demand` conversations)"
    )
    started_at: float
    ended_at: float | None
    end_reason: str | None


class LegQualityOut(BaseModel):
    """One leg's reception in the last second, as the SIP worker holding it measured it."""

    loss_pct: float = Field(description="RTP packets lost (sequence gaps), % of those expected")
    jitter_ms: float = Field(description="RFC 3550 interarrival jitter")
    packets: int = Field(description="RTP packets received")


class QualityOut(BaseModel):
    """How good the voice the supervisor hears is (about once a second; docs/DESIGN.md, Quality)."""

    added_latency_ms: float | None = Field(
        description="latency the gateway adds from a leg's RTP in to the monitor's audio out; "
        "null until measured (a WebRTC listener's first second)"
    )
    legs: dict[Leg, LegQualityOut] = Field(description="per leg: agent and customer, or mixed for one mixed stream")
    updated_at: str = Field(description="when it was measured, ISO 8601 UTC")


class MonitorStateOut(MonitorOut):
    """One monitor, with the quality of its voice."""

    quality: QualityOut | None = Field(description="null: no voice, or nothing measured yet")


class SessionsOut(BaseModel):
    chat: bool
    voice: bool


class VoiceStreamOut(BaseModel):
    leg: Leg
    label: str = Field(description="the stream's SDP label (empty without one)")
    participant: str = Field(description="the AoR(s) of the participant sending on it, as the metadata names them")


class ConversationOut(BaseModel):
    """A conversation with its monitoring status (R11)."""

    id: str
    agent: str
    team: str | None
    direction: Direction
    transferred: bool
    customer: dict[str, Any]
    sessions: SessionsOut
    session_started: dict[Channel, float] = Field(description="start time (epoch seconds) of each active session")
    voice_legs: list[Leg]
    voice_streams: list[VoiceStreamOut] = Field(description="which SIP stream became which leg, per connected leg")
    monitored: bool
    monitors: list[MonitorBrief]
    fork: ForkPolicy = Field(description="how the platform forks the voice (`always` or `on_demand`)")
    fork_requested: str | None = Field(
        description="`on_demand`: the id of the `voice_fork_requested` not released yet (a platform that "
        "reconnects forks exactly the conversations where this is set)"
    )


class MeOut(BaseModel):
    """`GET /v1/me`: who the caller is, and what the gateway remembers for it (per username)."""

    username: str
    teams: list[str] = Field(description="the teams it supervises")
    phone_uri: str | None = Field(
        description="the SIP phone last chosen (`PUT /v1/me/phone` or a `kind: sip` monitor); null: none"
    )


class EventAcceptedOut(BaseModel):
    accepted: PlatformEventType


class SeqOut(BaseModel):
    """Where a chat entry was stored."""

    seq: int


class ChatPostedOut(SeqOut):
    duplicate: bool = Field(description="true when this client_id was posted before: the same seq again")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: ErrorCode
    message: str


class ErrorOut(BaseModel):
    """Every refusal: a stable code, a human message, and sometimes more fields (`field`, ...)."""

    error: ErrorDetail


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, bool]


class ConsoleConfigOut(BaseModel):
    idp_url: str = Field(description="empty: the same origin (the embedded identity provider)")
    realm: str
    client_id: str
    embedded_idp: bool
