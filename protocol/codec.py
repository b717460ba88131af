"""Text <-> message conversion with precise errors. Pure functions, no I/O.

``decode_client_frame`` is what a server calls on every inbound frame: it returns a validated
client message or raises ``FrameError`` carrying the ``error`` frame to answer with
(``code`` bad_request, a message naming the problem, ``ref`` and ``id`` when known).

``encode_frame`` serialises an outbound frame (a dict built by ``protocol.frames`` or a model)
to UTF-8 JSON bytes, ready to be sent as a *text* frame.

``decode_server_frame`` is for clients: it returns ``None`` for frame types it does not know,
because receivers must ignore them (forward compatibility).
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .codes import ErrorCode
from .messages import ALLOWED_PARAMS, ClientMessage, ServerMessage

__all__ = ["FrameError", "decode_client_frame", "decode_server_frame", "encode_frame"]

_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)
_SERVER_ADAPTER: TypeAdapter[Any] = TypeAdapter(ServerMessage)
_CLIENT_TYPES = ("hello", "start", "cancel", "ping", "resume")
_SERVER_TYPES = frozenset(
    ("welcome", "started", "resumed", "token", "reasoning", "tool_call_chunk", "tool_call_complete",
     "finish", "error", "pong")
)


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

    def frame(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message}
        if self.ref is not None:
            out["ref"] = self.ref
        if self.id is not None:
            out["id"] = self.id
        return out


def decode_client_frame(data: str | bytes) -> Any:
    """Parse and validate one client frame. Raises ``FrameError`` for every bad input."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("binary frames are not accepted; send one JSON object per text frame")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"frame is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise FrameError(f"frame must be a JSON object, got {_json_kind(obj)}")
    ftype = obj.get("type")
    if not isinstance(ftype, str):
        raise FrameError("frame has no string field 'type'")
    raw_id = obj.get("id")
    sid = raw_id if isinstance(raw_id, str) and ftype in ("start", "cancel", "resume") else None
    if ftype not in _CLIENT_TYPES:
        raise FrameError(
            f"unknown frame type {ftype[:64]!r} (expected one of: {', '.join(_CLIENT_TYPES)})",
            ref=ftype[:64],
        )
    try:
        return _CLIENT_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise FrameError(_describe(exc), ref=ftype, id=sid) from None


def decode_server_frame(data: str | bytes) -> Any | None:
    """Parse one server frame for a client. Unknown frame types give ``None`` (ignore them)."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict) or obj.get("type") not in _SERVER_TYPES:
        return None
    return _SERVER_ADAPTER.validate_python(obj)


def encode_frame(frame: dict[str, Any] | BaseModel) -> bytes:
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
