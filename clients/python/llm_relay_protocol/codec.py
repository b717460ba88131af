"""Text <-> message conversion with precise errors. Pure functions, no I/O.

``decode_client_frame`` is what a server calls on every inbound frame: it returns a validated
client message or raises ``FrameError`` carrying the ``error`` frame to answer with
(``code`` bad_request, a message naming the problem, ``ref`` and ``id`` when known).

Its cost is bounded by ``DecodeLimits``, checked cheapest first, each *before* the work it
bounds, so an absurd frame is refused for the price of a scan or a parse, never a full
validation (measured on 2 cores: a 1 MiB frame of 55,000 messages took 0.3-0.8 s to validate):

1. On the text: the number of ``[`` and ``{`` characters (an upper bound on the arrays and
   objects the parse would build; ``max_json_containers``). Building containers is what a
   JSON parse spends its time on.
2. The parse itself refuses nesting deeper than ``max_json_depth`` (orjson's own depth
   limit, moved down to ours by wrapping the text; no Python walk over the values).
3. On the parsed but unvalidated ``start``: the JSON size of ``messages`` + ``tools``
   (``max_messages_bytes``), then the counts pydantic would iterate one by one: messages,
   tools, content parts, and the keys of the objects validated key by key
   (``check_request_shape``; llm_relay_protocol.aisdk applies the same function to its requests).
4. Only then pydantic validation.

The cyclic garbage collector is paused while a frame is decoded: a frame is acyclic JSON
freed by reference counting, but the containers it allocates would otherwise trigger full
collections of the whole heap (with LiteLLM loaded, a 1 MiB frame parsed in 12 ms took
210 ms with the collector running).

``encode_frame`` serialises an outbound frame (a dict built by ``llm_relay_protocol.frames`` or a model)
to UTF-8 JSON bytes, ready to be sent as a *text* frame.

``decode_server_frame`` is for clients: it returns ``None`` for frame types it does not know,
because receivers must ignore them (forward compatibility).

``decode_relay_message`` parses a relay -> relay control message (``{"op": ...}``) into its
model, raising ``ValueError`` for anything else; ``RelayCancel(...).encode()`` (any
``RelayMessage``) is the other direction.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .codes import ErrorCode
from .frames import Frame
from .frames import error as _error_frame
from .messages import (
    ADDRESSED_CLIENT_FRAME_TYPES, ALLOWED_PARAMS, CLIENT_FRAME_TYPES, RELAY_OPS,
    SERVER_FRAME_TYPES, ClientMessage, RelayMessage, ServerMessage, Start,
)

__all__ = [
    "DecodeLimits", "FrameError", "check_request_shape", "decode_client_frame",
    "decode_relay_message", "decode_server_frame", "encode_frame", "parse_json_within",
    "validate_client_object", "validate_start",
]

_CLIENT_ADAPTER: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_SERVER_ADAPTER: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)
_RELAY_ADAPTER: TypeAdapter[RelayMessage] = TypeAdapter(RelayMessage)

# ``Any`` below stands for parsed JSON (``orjson.loads``): any shape until validated. The
# checks that run before validation read it with ``type(...) is`` tests.
_SERVER_TYPES = frozenset(SERVER_FRAME_TYPES)


@dataclass(frozen=True)
class DecodeLimits:
    """What one client frame may hold; each is checked before the work it bounds. The relay
    builds this from its settings (the flag names are in the refusal messages); the defaults
    are the relay's defaults. At these defaults the costliest frame of 1 MiB took 6-9 ms of
    CPU to decode (a valid ``start`` at every limit; refusals cost less), measured on the
    project's 2-core machine with LiteLLM loaded."""

    #: JSON size (bytes, compact UTF-8) of a start's ``messages`` + ``tools``.
    max_messages_bytes: int = 512 * 1024
    #: Entries of ``start.messages``.
    max_messages: int = 2000
    #: Entries of ``start.tools``.
    max_tools: int = 128
    #: Content parts (``messages[].content`` arrays) of one start, all messages together.
    max_content_parts: int = 4000
    #: Keys of the objects a start validates key by key, together: messages, content parts,
    #: tools, their ``function`` and its ``parameters``, ``tool_choice``, ``params`` and its
    #: ``response_format``.
    max_start_keys: int = 20_000
    #: Nesting of arrays and objects; the frame object itself is level 1.
    max_json_depth: int = 32
    #: ``[`` and ``{`` characters in the frame's text, strings included: an upper bound on
    #: the arrays and objects parsing would build, known before parsing.
    max_json_containers: int = 32_768

    def __post_init__(self) -> None:
        if not 1 <= self.max_json_depth < _ORJSON_MAX_DEPTH:
            raise ValueError(f"max_json_depth must be between 1 and {_ORJSON_MAX_DEPTH - 1}")


#: orjson.loads refuses documents nested deeper than this (a test pins it); the depth check
#: wraps the frame's text in ``_ORJSON_MAX_DEPTH - max_json_depth`` arrays so that the
#: parser's own check refuses exactly what is deeper than ``max_json_depth``.
_ORJSON_MAX_DEPTH = 1024
_OPEN = "[" * _ORJSON_MAX_DEPTH
_CLOSE = "]" * _ORJSON_MAX_DEPTH
_DEFAULT_LIMITS = DecodeLimits()


class FrameError(ValueError):
    """An inbound frame that cannot be accepted; ``frame()`` is the ``error`` frame to send."""

    def __init__(
        self, message: str, *, code: str = ErrorCode.BAD_REQUEST, ref: str | None = None,
        id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message
        self.ref = ref
        self.id = id

    def frame(self) -> Frame:
        return _error_frame(self.code, self.message, ref=self.ref, id=self.id)


def decode_client_frame(data: str | bytes,
                        limits: DecodeLimits = _DEFAULT_LIMITS) -> ClientMessage:
    """Parse and validate one client frame within ``limits``. Raises ``FrameError`` for every
    bad input; a frame beyond a limit is refused before validation, naming the limit."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("binary frames are not accepted; send one JSON object per text frame")
    with _collector_paused():
        return validate_client_object(_parse_within(data, limits), limits)


def parse_json_within(data: str, limits: DecodeLimits = _DEFAULT_LIMITS) -> Any:
    """Parse one JSON text frame within ``limits`` (its count of ``[``/``{`` first, then its
    nesting depth in the same pass as the parse). Raises ``FrameError``. For other protocols
    on the relay's sockets (llm_relay_protocol.aisdk), which then validate what they parsed."""
    with _collector_paused():
        return _parse_within(data, limits)


def _parse_within(data: str, limits: DecodeLimits) -> Any:
    containers = data.count("[") + data.count("{")
    if containers > limits.max_json_containers:
        raise FrameError(
            f"frame has {containers} '[' and '{{' characters (strings included); the limit "
            f"is {limits.max_json_containers} (max_json_containers)")
    depth = limits.max_json_depth
    # A frame with no more brackets than max_json_depth cannot be nested deeper.
    return _parse(data, depth) if containers > depth else _loads(data, depth)


def validate_client_object(obj: object,
                           limits: DecodeLimits = _DEFAULT_LIMITS) -> ClientMessage:
    """Validate a parsed client frame: its type, then (for ``start``) its size and counts
    before the models validate it. Raises ``FrameError``."""
    if not isinstance(obj, dict):
        raise FrameError(f"frame must be a JSON object, got {_json_kind(obj)}")
    ftype = obj.get("type")
    if not isinstance(ftype, str):
        raise FrameError("frame has no string field 'type'")
    raw_id = obj.get("id")
    sid = raw_id if isinstance(raw_id, str) and ftype in ADDRESSED_CLIENT_FRAME_TYPES else None
    if ftype not in CLIENT_FRAME_TYPES:
        raise FrameError(
            f"unknown frame type {ftype[:64]!r} "
            f"(expected one of: {', '.join(CLIENT_FRAME_TYPES)})",
            ref=ftype[:64],
        )
    if ftype == "start":
        _check_start(obj, limits, sid)
    try:
        return _CLIENT_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise FrameError(_describe(exc), ref=ftype, id=sid) from None


def validate_start(obj: object, limits: DecodeLimits = _DEFAULT_LIMITS) -> Start:
    """``validate_client_object`` for a ``start`` built from another dialect's request (its
    size and counts, then the models): the ``Start``, or ``FrameError``."""
    msg = validate_client_object(obj, limits)
    if not isinstance(msg, Start):
        raise FrameError(f"expected a start frame, got {msg.type!r}")
    return msg


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) for one decode. Parsed JSON has no
    reference cycles, so reference counting frees whatever a refused frame allocated."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _loads(data: str, max_json_depth: int) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):          # deeper than orjson's own limit
            raise FrameError(_too_deep_message(max_json_depth)) from None
        raise FrameError(f"frame is not valid JSON: {exc.msg}") from None


def _too_deep_message(max_json_depth: int) -> str:
    return f"frame is nested deeper than {max_json_depth} levels (max_json_depth)"


def _parse(data: str, max_json_depth: int) -> Any:
    """``orjson.loads(data)``, refusing nesting deeper than ``max_json_depth`` in the same
    pass: inside ``wrap`` extra arrays, orjson's fixed limit is reached exactly by what nests
    deeper than ``max_json_depth``."""
    wrap = _ORJSON_MAX_DEPTH - max_json_depth
    try:
        value = orjson.loads(_OPEN[:wrap] + data + _CLOSE[:wrap])
    except orjson.JSONDecodeError as exc:
        if exc.msg.startswith("depth limit"):
            raise FrameError(_too_deep_message(max_json_depth)) from None
        # Invalid JSON: parse it alone for the parser's own words (a BOM, content after the
        # document...); at most one more parse of a frame within max_json_containers.
        _loads(data, max_json_depth)
        raise FrameError("frame is not valid JSON") from None
    for _ in range(wrap):
        if type(value) is not list or len(value) != 1:
            # ``data`` closed a wrapping array itself (or is empty): not one JSON document.
            _loads(data, max_json_depth)
            raise FrameError("frame is not valid JSON: not a single document")
        value = value[0]
    return value


def _check_start(obj: dict[str, Any], limits: DecodeLimits, sid: str | None) -> None:
    """The size and counts of a parsed, unvalidated ``start``, each before the work it bounds.
    Fields of the wrong type are left to validation (which then fails at once)."""
    params = obj.get("params")
    options = [obj.get("tool_choice"), params]
    if type(params) is dict:
        options.append(params.get("response_format"))

    def refuse(message: str) -> FrameError:
        return FrameError(message, ref="start", id=sid)

    check_request_shape(obj.get("messages"), obj.get("tools"), limits, parts_key="content",
                        options=options, refuse=refuse)


def check_request_shape(messages: Any, tools: Any, limits: DecodeLimits, *, parts_key: str,
                        options: list[Any], refuse: Callable[[str], Exception]) -> None:
    """The size and counts of a request's parsed, unvalidated ``messages`` and ``tools``, each
    before the work it bounds, in this order: their JSON size (``max_messages_bytes``), the
    message count (``max_messages``), the tool count (``max_tools``), the parts of all
    messages together (each message's ``parts_key`` list; ``max_content_parts``), then the
    keys of every object validated key by key (``max_start_keys``): the messages, their
    parts, the tools, their ``function`` and its ``parameters``, and each of ``options``
    (objects of the request besides its messages and tools). A v1 ``start`` and every other
    protocol of the relay (llm_relay_protocol.aisdk) use this one check. Fields of the wrong type are
    left to validation. Raises ``refuse(message)``; the message names the limit."""
    size = len(orjson.dumps({"m": messages, "t": tools or None}))
    if size > limits.max_messages_bytes:
        raise refuse(f"messages and tools are {size} bytes; the limit is "
                     f"{limits.max_messages_bytes} (max_messages_bytes)")
    messages = messages if type(messages) is list else []
    tools = tools if type(tools) is list else []
    if len(messages) > limits.max_messages:
        raise refuse(f"{len(messages)} messages; the limit is {limits.max_messages} "
                     "(max_messages)")
    if len(tools) > limits.max_tools:
        raise refuse(f"{len(tools)} tools; the limit is {limits.max_tools} (max_tools)")
    objects: list[Any] = list(options)
    parts = 0
    for message in messages:
        if type(message) is dict:
            objects.append(message)
            content = message.get(parts_key)
            if type(content) is list:
                parts += len(content)
                objects.append(content)
    if parts > limits.max_content_parts:
        raise refuse(f"{parts} content parts; the limit is {limits.max_content_parts} "
                     "(max_content_parts)")
    for tool in tools:
        objects.append(tool)
        function = tool.get("function") if type(tool) is dict else None
        objects.append(function)
        if type(function) is dict:
            objects.append(function.get("parameters"))
    keys = 0
    for item in objects:
        if type(item) is dict:
            keys += len(item)
        elif type(item) is list:                           # a message's parts
            keys += sum(len(part) for part in item if type(part) is dict)
    if keys > limits.max_start_keys:
        raise refuse(f"{keys} keys in messages, content parts and tools; the limit is "
                     f"{limits.max_start_keys} (max_start_keys)")


def decode_server_frame(data: str | bytes) -> ServerMessage | None:
    """Parse one server frame for a client. Unknown frame types give ``None`` (ignore them)."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict) or obj.get("type") not in _SERVER_TYPES:
        return None
    return _SERVER_ADAPTER.validate_python(obj)


def decode_relay_message(data: str | bytes | dict[str, Any]) -> RelayMessage:
    """A relay -> relay control message (JSON text or an already parsed object) as its
    ``RelayMessage`` model. Raises ``ValueError`` naming the problem for anything else: not
    JSON, not an object, an unknown ``op`` (a receiver drops those: a newer relay may send
    ops an older one does not know), a missing or mistyped field."""
    if isinstance(data, dict):
        obj: object = data
    else:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"relay message is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"relay message must be a JSON object, got {_json_kind(obj)}")
    op = obj.get("op")
    if op not in RELAY_OPS:
        raise ValueError(f"unknown relay message op {str(op)[:64]!r} "
                         f"(expected one of: {', '.join(RELAY_OPS)})")
    try:
        return _RELAY_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise ValueError(f"relay message {op!r}: {_describe(exc)}") from None


def encode_frame(frame: Frame | BaseModel) -> bytes:
    """UTF-8 JSON of one frame. Models drop ``None`` fields, so optional fields are absent."""
    if isinstance(frame, BaseModel):
        frame = frame.model_dump(mode="json", exclude_none=True)
    return orjson.dumps(frame)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _describe(exc: ValidationError) -> str:
    """The first validation problem, as ``field 'a.b': what is wrong``."""
    err = exc.errors(include_url=False)[0]
    # Drop the union tag (e.g. 'start') pydantic puts first in the location.
    loc = [str(p) for p in err["loc"][1:]]
    if err["type"] == "extra_forbidden" and loc[:1] == ["params"]:
        return (
            f"params: key {loc[-1]!r} is not allowed (allowed: {', '.join(ALLOWED_PARAMS)})"
        )
    where = ".".join(loc) if loc else "frame"
    return f"field {where!r}: {err['msg']}"
