"""Helpers shared by the pure protocol tests (no I/O)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from llm_relay_protocol import Error, FrameError, decode_client_frame

HI = [{"role": "user", "content": "hi"}]


def text(obj: Any) -> str:
    """``obj`` as the text of one WebSocket text frame."""
    return orjson.dumps(obj).decode()


def start(**fields: Any) -> dict[str, Any]:
    """A minimal valid ``start`` frame, with ``fields`` overriding or added."""
    frame: dict[str, Any] = {"type": "start", "id": "s1", "model": "demo", "messages": HI}
    frame.update(fields)
    return frame


def rejected(data: str | bytes) -> dict[str, Any]:
    """The error frame ``decode_client_frame`` answers ``data`` with (it must reject it)."""
    with pytest.raises(FrameError) as info:
        decode_client_frame(data)
    frame = info.value.frame()
    # Whatever the problem, the answer is a well-formed server ``error`` frame.
    assert Error.model_validate(frame).model_dump(exclude_none=True) == frame
    assert frame["code"] == "bad_request" == info.value.code
    assert str(info.value) == frame["message"] == info.value.message
    return frame
