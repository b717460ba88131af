"""Every frame of llm-relay.v1 as a frozen pydantic model, discriminated on ``type``.

Client -> server frames are validated strictly on the way in (the relay answers a bad one
with an ``error`` frame). Unknown *fields* are ignored everywhere, for forward
compatibility; ``params`` is the one exception: it is an allowlist, so a client can never
steer where or with which credentials the relay calls a provider.

Server -> client frames are modelled here for the JSON Schema, the docs and the Python
client; the relay builds them as plain dicts on its hot path (see ``llm_relay_protocol.frames``).

Relay -> relay messages (``{"op": ...}`` on the Redis control channel of relays sharing a
store) are modelled here too, discriminated on ``op``; they never reach a client.

Every list of frame types (``CLIENT_FRAME_TYPES``, ``SERVER_FRAME_TYPES``, ...) is derived
from the discriminated unions below, so adding a member is the one change that updates them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

import orjson
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
    field_validator,
)

from .codes import FinishStatus

__all__ = [
    "ADDRESSED_CLIENT_FRAME_TYPES",
    "ALLOWED_PARAMS",
    "CLIENT_FRAME_TYPES",
    "RELAY_OPS",
    "SERVER_FRAME_TYPES",
    "STREAM_FRAME_TYPES",
    "MAX_PING_DATA_BYTES",
    "ChatMessage",
    "ClientInfo",
    "ClientMessage",
    "Cancel",
    "Error",
    "ErrorInfo",
    "Finish",
    "FunctionDef",
    "Hello",
    "Limits",
    "Params",
    "Ping",
    "Pong",
    "Reasoning",
    "Refusal",
    "RelayCancel",
    "RelayMessage",
    "RelayTakeover",
    "Resume",
    "Resumed",
    "ServerMessage",
    "Start",
    "Started",
    "Token",
    "Tool",
    "ToolCallChunk",
    "ToolCallComplete",
    "Usage",
    "Welcome",
    "model_tag",
    "union_members",
    "union_tags",
]

#: Control characters (C0, DEL, C1) and the Unicode line/paragraph separators: never in an id,
#: so a client-chosen id cannot break a log line or a terminal.
_CONTROL = frozenset(map(chr, [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]))
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"


def _no_control_characters(value: str) -> str:
    if not _CONTROL.isdisjoint(value):
        raise ValueError("must not contain control characters or line separators")
    return value


StreamId = Annotated[
    StrictStr,
    Field(min_length=1, max_length=128, json_schema_extra={"pattern": _NO_CONTROL_PATTERN}),
    AfterValidator(_no_control_characters),
]
Seq = Annotated[StrictInt, Field(ge=0)]


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


# ---------------------------------------------------------------- client -> server


class ClientInfo(_Frame):
    name: StrictStr
    version: StrictStr


class Hello(_Frame):
    """First frame of every connection. ``token`` authenticates (checked when auth is on)."""

    type: Literal["hello"]
    token: StrictStr | None = None
    client: ClientInfo | None = None


# ``Any`` in the models below: JSON the relay passes to the provider as given (content
# parts, a tool's JSON Schema, ``response_format``, a ``tool_choice`` object) or echoes
# (``ping.data``); its shape is the provider's to judge, its size is bounded by the codec.


class ChatMessage(BaseModel):
    """One OpenAI-format chat message. Extra keys (name, tool_calls, tool_call_id...) pass through."""

    model_config = ConfigDict(frozen=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[dict[str, Any]] | None = None


class FunctionDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    name: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """An OpenAI tool schema entry."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: Literal["function"]
    function: FunctionDef


#: The only keys ``start.params`` accepts; anything else is ``bad_request`` naming the key.
ALLOWED_PARAMS: tuple[str, ...] = (
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
    "parallel_tool_calls",
)


class Params(BaseModel):
    """Sampling parameters a client may set. Strict allowlist (``extra="forbid"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    response_format: dict[str, Any] | None = None
    #: How hard a reasoning model thinks (LiteLLM maps it to each provider's own setting).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    #: Whether the model may call several tools in one turn (meaningful with ``tools``).
    parallel_tool_calls: StrictBool | None = None


class Start(_Frame):
    """Begin a stream named ``id`` (unique among the connection's running streams)."""

    type: Literal["start"]
    id: StreamId
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    params: Params = Params()


class Cancel(_Frame):
    """Stop stream ``id``; the upstream request is closed at once. Idempotent."""

    type: Literal["cancel"]
    id: StreamId


#: Most bytes ``ping.data`` may take as JSON. The pong echoes it, so it is queued for the
#: client: a bound keeps what a client can make the relay hold per frame small.
MAX_PING_DATA_BYTES = 1024


class Ping(_Frame):
    """Application-level ping (browsers cannot send protocol pings). Answered by ``pong``,
    which echoes ``data``: at most 1024 bytes as JSON (``MAX_PING_DATA_BYTES``), larger is
    ``bad_request``."""

    type: Literal["ping"]
    data: Any = None

    @field_validator("data")
    @classmethod
    def _small_enough_to_echo(cls, value: Any) -> Any:
        try:
            size = len(orjson.dumps(value))
        except orjson.JSONEncodeError:
            raise ValueError("ping data cannot be echoed as JSON (nested too deeply)") from None
        if size > MAX_PING_DATA_BYTES:
            raise ValueError(f"ping data is {size} bytes as JSON; "
                             f"at most {MAX_PING_DATA_BYTES} are echoed")
        return value


class Resume(_Frame):
    """Attach stream ``stream_key`` (from its ``started``) to this connection under ``id``
    (default: its original id) and replay every frame with ``seq > after_seq``, then the
    live ones. It joins the stream as a viewer beside its other attachments; ``takeover``:
    it replaces the stream's owner attachment instead (which ends ``stream_taken_over``)."""

    type: Literal["resume"]
    stream_key: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    after_seq: Annotated[StrictInt, Field(ge=0)]
    id: StreamId | None = None
    takeover: StrictBool = False


ClientMessage = Annotated[
    Union[Hello, Start, Cancel, Ping, Resume], Field(discriminator="type")
]


# ---------------------------------------------------------------- server -> client


class Limits(_Frame):
    max_streams: int
    max_frame_bytes: int
    #: Largest compact UTF-8 JSON size of a ``start``'s ``messages`` + ``tools`` (above it:
    #: ``error`` ``bad_request``). Absent from relays older than this field.
    max_messages_bytes: int | None = None
    #: Seconds a stream outlives its connection, resumable; 0 = resume disabled.
    detach_grace: float = 0


class Welcome(_Frame):
    type: Literal["welcome"]
    protocol: str
    session_id: str
    models: list[str]
    limits: Limits


class Started(_Frame):
    type: Literal["started"]
    id: str
    seq: Seq
    model: str
    #: Opaque, unguessable name of the stream beyond this connection (for ``resume``).
    stream_key: str | None = None


class Resumed(_Frame):
    """Answer to ``resume``: the replay of frames with ``seq > after_seq`` follows."""

    type: Literal["resumed"]
    id: str
    stream_key: str
    after_seq: Seq


class Token(_Frame):
    type: Literal["token"]
    id: str
    seq: Seq
    text: str


class Reasoning(_Frame):
    """Reasoning/thinking text, kept apart from the answer. Same fields as ``token``."""

    type: Literal["reasoning"]
    id: str
    seq: Seq
    text: str


class Refusal(_Frame):
    """The model's refusal to answer (OpenAI's structured-output ``refusal``), streamed as
    the provider streams it and kept apart from the answer. Same fields as ``token``."""

    type: Literal["refusal"]
    id: str
    seq: Seq
    text: str


class ToolCallChunk(_Frame):
    type: Literal["tool_call_chunk"]
    id: str
    seq: Seq
    index: int
    call_id: str
    name: str | None = None
    arguments_delta: str


class ToolCallComplete(_Frame):
    type: Literal["tool_call_complete"]
    id: str
    seq: Seq
    index: int
    call_id: str
    name: str
    arguments: str


class Usage(_Frame):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: StrictBool


class ErrorInfo(_Frame):
    code: str
    message: str
    retry_after: float | None = None


class Finish(_Frame):
    """The last frame of every started stream, exactly once."""

    type: Literal["finish"]
    id: str
    seq: Seq
    status: FinishStatus
    reason: str | None = None
    usage: Usage
    error: ErrorInfo | None = None


class Error(_Frame):
    """Answer to a client frame that could not be honoured. ``ref`` names that frame's type."""

    type: Literal["error"]
    code: str
    message: str
    ref: str | None = None
    id: str | None = None
    retry_after: float | None = None


class Pong(_Frame):
    type: Literal["pong"]
    data: Any = None


ServerMessage = Annotated[
    Union[
        Welcome, Started, Resumed, Token, Reasoning, Refusal, ToolCallChunk, ToolCallComplete,
        Finish,
        Error, Pong,
    ],
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- relay -> relay


class _RelayOp(BaseModel):
    """A control message between relays sharing a Redis store (``relay.cluster.replication``).

    Relays may run different versions during a rolling restart, so unknown fields are
    ignored (``extra="ignore"``); an unknown ``op`` or a missing field is refused by
    ``llm_relay_protocol.codec.decode_relay_message`` and the receiver logs and drops it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    def encode(self) -> bytes:
        """UTF-8 JSON of this message, as published on the control channel."""
        return orjson.dumps(self.model_dump(mode="json"))


class RelayCancel(_RelayOp):
    """Cancel stream ``key``: its owner closes the upstream call (a ``cancel`` sent to a
    relay that follows the stream from Redis)."""

    op: Literal["cancel"]
    key: Annotated[StrictStr, Field(min_length=1)]


class RelayTakeover(_RelayOp):
    """A connection on relay ``node`` attached stream ``key``: every other relay detaches
    its own attachment of it (which ends with ``error`` ``stream_taken_over``)."""

    op: Literal["takeover"]
    key: Annotated[StrictStr, Field(min_length=1)]
    node: StrictStr


RelayMessage = Annotated[Union[RelayCancel, RelayTakeover], Field(discriminator="op")]


# ---------------------------------------------------------------- derived type lists


def union_members(union: object) -> tuple[type[BaseModel], ...]:
    """The models of a discriminated union declared as ``Annotated[Union[...], Field(...)]``,
    in declaration order."""
    return get_args(get_args(union)[0])


def union_tags(union: object, field: str = "type") -> tuple[str, ...]:
    """The discriminator values (``type`` or ``op``) of ``union``'s members, in order."""
    return tuple(model_tag(model, field) for model in union_members(union))


def model_tag(model: type[BaseModel], field: str = "type") -> str:
    """The discriminator value of one union member (its ``Literal`` ``type`` or ``op``)."""
    tag = get_args(model.model_fields[field].annotation)[0]
    assert isinstance(tag, str), (model, field)
    return tag


#: Every client -> server frame type, in the order the unknown-type error lists them.
CLIENT_FRAME_TYPES: tuple[str, ...] = union_tags(ClientMessage)
#: Every server -> client frame type (a client ignores any other).
SERVER_FRAME_TYPES: tuple[str, ...] = union_tags(ServerMessage)
#: Client frames that name a stream (an ``id`` field): errors answering them carry that id.
ADDRESSED_CLIENT_FRAME_TYPES: tuple[str, ...] = tuple(
    model_tag(model) for model in union_members(ClientMessage) if "id" in model.model_fields)
#: Server frames of a stream's sequence (``id`` and ``seq``): ``started`` .. ``finish``.
STREAM_FRAME_TYPES: tuple[str, ...] = tuple(
    model_tag(model) for model in union_members(ServerMessage) if "seq" in model.model_fields)
#: Every relay -> relay ``op``.
RELAY_OPS: tuple[str, ...] = union_tags(RelayMessage, "op")
