"""Every frame of llm-relay.v1 as a frozen pydantic model, discriminated on ``type``.

Client -> server frames are validated strictly on the way in (the relay answers a bad one
with an ``error`` frame). Unknown *fields* are ignored everywhere, for forward
compatibility; ``params`` is the one exception: it is an allowlist, so a client can never
steer where or with which credentials the relay calls a provider.

Server -> client frames are modelled here for the JSON Schema, the docs and the Python
client; the relay builds them as plain dicts on its hot path (see ``protocol.frames``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import orjson
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
    field_validator,
)

from .codes import FinishStatus

__all__ = [
    "ALLOWED_PARAMS",
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
    """Re-attach stream ``stream_key`` (from its ``started``) to this connection under ``id``
    (default: its original id) and replay every frame with ``seq > after_seq``."""

    type: Literal["resume"]
    stream_key: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    after_seq: Annotated[StrictInt, Field(ge=0)]
    id: StreamId | None = None


ClientMessage = Annotated[
    Union[Hello, Start, Cancel, Ping, Resume], Field(discriminator="type")
]


# ---------------------------------------------------------------- server -> client


class Limits(_Frame):
    max_streams: int
    max_frame_bytes: int
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
        Welcome, Started, Resumed, Token, Reasoning, ToolCallChunk, ToolCallComplete, Finish,
        Error, Pong,
    ],
    Field(discriminator="type"),
]
