"""Property: whatever a client sends, ``decode_client_frame`` either returns a valid client
message or raises ``FrameError`` whose ``frame()`` is a ``bad_request`` error frame. No other
exception ever escapes (a server relies on this to answer every frame and stay open)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_relay_protocol import (
    ADDRESSED_CLIENT_FRAME_TYPES,
    ALLOWED_PARAMS,
    CLIENT_FRAME_TYPES,
    ClientMessage,
    Error,
    FrameError,
    Start,
    decode_client_frame,
    union_members,
)

# Every client frame, derived from the union (these lists had left out resume).
CLIENT_MESSAGES = union_members(ClientMessage)
CLIENT_TYPES = CLIENT_FRAME_TYPES

FAST = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Any text, including lone surrogates (which are not valid UTF-8 and must not crash either).
any_text = st.text() | st.text(alphabet=st.characters(codec=None, categories=["Cs", "Lu", "Nd"]))

json_scalars = (st.none() | st.booleans() | st.integers()
                | st.floats(allow_nan=False, allow_infinity=False) | st.text())
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

# Values shaped like our frames, so validation (not only JSON parsing) is exercised deeply.
FIELD_NAMES = ["type", "id", "model", "messages", "tools", "tool_choice", "params", "token",
               "client", "data", "role", "content", "function", "name", "version",
               "stream_key", "after_seq",
               *ALLOWED_PARAMS, "api_key", "api_base", "n", "stream_options"]
field_value = st.deferred(lambda: (
    json_scalars
    | st.sampled_from(["hello", "start", "cancel", "ping", "user", "assistant", "function",
                       "auto", "demo", "", "x" * 129])
    | st.lists(field_value, max_size=3)
    | st.dictionaries(st.sampled_from(FIELD_NAMES), field_value, max_size=4)
))
frame_like = st.builds(
    lambda ftype, fields: {**fields, "type": ftype} if ftype is not None else fields,
    st.sampled_from(CLIENT_TYPES) | st.none() | st.text(max_size=5) | st.integers(),
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_value, max_size=6),
)

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"])},
    optional={"content": st.none() | st.text(max_size=10) | st.just([{"type": "text"}]) | st.integers(),
              "tool_call_id": st.text(max_size=5)},
)
start_like = st.fixed_dictionaries(
    {"type": st.just("start"), "id": st.text(max_size=130), "model": st.text(max_size=5),
     "messages": st.lists(message, max_size=3)},
    optional={
        "params": st.dictionaries(st.sampled_from([*ALLOWED_PARAMS, "api_key", "n"]),
                                  json_scalars | st.lists(st.text(max_size=3), max_size=6),
                                  max_size=4),
        "tools": st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["function", "other"]),
             "function": st.fixed_dictionaries({"name": st.text(max_size=4)},
                                               optional={"parameters": json_values})}),
            max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required", "any"]) | json_values,
    },
)


def check(data: str | bytes) -> Any:
    """Decode ``data``: a client message, or a FrameError with a bad_request error frame."""
    try:
        msg = decode_client_frame(data)
    except FrameError as exc:
        frame = exc.frame()
        assert frame["type"] == "error" and frame["code"] == "bad_request"
        assert isinstance(frame["message"], str) and frame["message"]
        assert Error.model_validate(frame).model_dump(exclude_none=True) == frame
        assert set(frame) <= {"type", "code", "message", "ref", "id"}
        if "ref" in frame:
            assert isinstance(frame["ref"], str) and len(frame["ref"]) <= 64
        if "id" in frame:
            assert frame.get("ref") in ADDRESSED_CLIENT_FRAME_TYPES and isinstance(frame["id"], str)
        orjson.dumps(frame)  # the answer itself is always serialisable
        return None
    assert isinstance(msg, CLIENT_MESSAGES)
    assert isinstance(data, str)  # binary frames are never accepted
    return msg


@FAST
@given(any_text)
def test_arbitrary_text(data):
    check(data)


@FAST
@given(st.binary())
def test_arbitrary_bytes(data):
    assert check(data) is None


@FAST
@given(json_values, st.booleans())
def test_arbitrary_json(value, ascii_only):
    msg = check(json.dumps(value, ensure_ascii=ascii_only))
    if msg is not None:
        assert isinstance(value, dict) and value["type"] == msg.type


@FAST
@given(frame_like)
def test_frame_like_objects(value):
    msg = check(json.dumps(value))
    if msg is not None:
        assert value["type"] == msg.type


@FAST
@given(start_like)
def test_start_like_objects(value):
    msg = check(json.dumps(value))
    if msg is not None:
        assert isinstance(msg, Start) and msg.id == value["id"]
        assert 1 <= len(msg.id) <= 128 and msg.messages
        # Whatever got through, params only ever holds allowlisted keys.
        assert set(msg.params.model_dump(exclude_none=True)) <= set(ALLOWED_PARAMS)
