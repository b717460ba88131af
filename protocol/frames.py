"""Builders of server frames as plain dicts: the relay's hot path.

Validating every outbound frame with pydantic would cost more than the relay's whole
per-frame budget (see GUIDE: LiteLLM already spends ~600 µs a chunk), so the relay builds
dicts here and ``encode_frame`` serialises them. The shapes match ``protocol.messages``;
``tests/protocol`` checks each builder against its model.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "error", "finish", "pong", "reasoning", "resumed", "started", "token", "tool_call_chunk",
    "tool_call_complete", "usage", "welcome",
]


def welcome(session_id: str, models: list[str], limits: dict[str, Any], protocol: str) -> dict:
    return {"type": "welcome", "protocol": protocol, "session_id": session_id,
            "models": models, "limits": limits}


def started(id: str, model: str, stream_key: str | None = None) -> dict:
    frame = {"type": "started", "id": id, "seq": 0, "model": model}
    if stream_key is not None:
        frame["stream_key"] = stream_key
    return frame


def resumed(id: str, stream_key: str, after_seq: int) -> dict:
    return {"type": "resumed", "id": id, "stream_key": stream_key, "after_seq": after_seq}


def token(id: str, seq: int, text: str) -> dict:
    return {"type": "token", "id": id, "seq": seq, "text": text}


def reasoning(id: str, seq: int, text: str) -> dict:
    return {"type": "reasoning", "id": id, "seq": seq, "text": text}


def tool_call_chunk(
    id: str, seq: int, index: int, call_id: str, name: str | None, arguments_delta: str
) -> dict:
    frame = {"type": "tool_call_chunk", "id": id, "seq": seq, "index": index,
             "call_id": call_id, "arguments_delta": arguments_delta}
    if name is not None:
        frame["name"] = name
    return frame


def tool_call_complete(id: str, seq: int, index: int, call_id: str, name: str, arguments: str) -> dict:
    return {"type": "tool_call_complete", "id": id, "seq": seq, "index": index,
            "call_id": call_id, "name": name, "arguments": arguments}


def usage(prompt_tokens: int, completion_tokens: int, estimated: bool) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "estimated": estimated}


def finish(
    id: str, seq: int, status: str, reason: str | None, usage: dict,
    error: dict | None = None,
) -> dict:
    frame = {"type": "finish", "id": id, "seq": seq, "status": status, "usage": usage}
    if reason is not None:
        frame["reason"] = reason
    if error is not None:
        frame["error"] = error
    return frame


def error(
    code: str, message: str, *, ref: str | None = None, id: str | None = None,
    retry_after: float | None = None,
) -> dict:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if ref is not None:
        frame["ref"] = ref
    if id is not None:
        frame["id"] = id
    if retry_after is not None:
        frame["retry_after"] = retry_after
    return frame


def pong(data: Any = None) -> dict:
    frame: dict[str, Any] = {"type": "pong"}
    if data is not None:
        frame["data"] = data
    return frame
