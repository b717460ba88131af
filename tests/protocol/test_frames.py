"""The hot-path dict builders of ``protocol.frames`` produce exactly what the models of
``protocol.messages`` describe; ``encode_frame`` and ``decode_server_frame`` agree with both."""

from __future__ import annotations

from typing import Any

import orjson
import pydantic
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Finish,
    FinishReason,
    FinishStatus,
    Hello,
    Ping,
    Pong,
    Reasoning,
    Start,
    Started,
    Token,
    ToolCallChunk,
    ToolCallComplete,
    Usage,
    Welcome,
    Resumed,
    decode_server_frame,
    encode_frame,
    frames,
)

USAGE = frames.usage(12, 30, False)
LIMITS = {"max_streams": 8, "max_frame_bytes": 1 << 20, "detach_grace": 15.0}

# (builder output, the model that must accept it)
CASES: list[tuple[str, dict[str, Any], type[pydantic.BaseModel]]] = [
    ("welcome", frames.welcome("s_abc", ["demo", "gpt"], LIMITS, PROTOCOL_VERSION), Welcome),
    ("welcome-no-models", frames.welcome("s_abc", [], LIMITS, PROTOCOL_VERSION), Welcome),
    ("started", frames.started("q1", "demo"), Started),
    ("started-key", frames.started("q1", "demo", "k" * 22), Started),
    ("resumed", frames.resumed("q1", "k" * 22, 7), Resumed),
    ("token", frames.token("q1", 1, "Hello"), Token),
    ("token-empty", frames.token("q1", 2, ""), Token),
    ("token-unicode", frames.token("q1", 3, "héllo \U0001f600 \u2028"), Token),
    ("reasoning", frames.reasoning("q1", 4, "thinking..."), Reasoning),
    ("tool_call_chunk", frames.tool_call_chunk("q1", 5, 0, "call_1", "get_weather", ""),
     ToolCallChunk),
    ("tool_call_chunk-no-name", frames.tool_call_chunk("q1", 6, 1, "call_2", None, '{"a"'),
     ToolCallChunk),
    ("tool_call_complete",
     frames.tool_call_complete("q1", 7, 0, "call_1", "get_weather", '{"city": "Paris"}'),
     ToolCallComplete),
    ("finish-completed", frames.finish("q1", 8, FinishStatus.COMPLETED, FinishReason.STOP, USAGE),
     Finish),
    ("finish-no-reason", frames.finish("q1", 8, "completed", None, USAGE), Finish),
    ("finish-cancelled",
     frames.finish("q1", 3, "cancelled", "client_cancel", frames.usage(5, 2, True)), Finish),
    ("finish-timeout",
     frames.finish("q1", 1, "timeout", "first_token_timeout", frames.usage(5, 0, True),
                   {"code": "upstream_timeout", "message": "the provider exceeded ..."}),
     Finish),
    ("finish-failed-retry-after",
     frames.finish("q1", 1, "failed", "upstream_rate_limited", frames.usage(5, 0, True),
                   {"code": "upstream_rate_limited", "message": "retry later",
                    "retry_after": 2.5}),
     Finish),
    ("error-minimal", frames.error("bad_request", "frame is not valid JSON: x"), Error),
    ("error-full", frames.error(ErrorCode.DUPLICATE_ID, "dup", ref="start", id="q1",
                                retry_after=1.0), Error),
    ("pong", frames.pong(), Pong),
    ("pong-data", frames.pong({"t": [1, None, "x"]}), Pong),
    ("pong-falsy-data", frames.pong(0), Pong),
]


@pytest.mark.parametrize("name, frame, model", CASES, ids=[c[0] for c in CASES])
def test_builder_output_is_valid_and_roundtrips(name, frame, model):
    msg = model.model_validate(frame)
    # Same JSON whether the relay sends the dict or a client re-encodes the model.
    assert orjson.loads(encode_frame(msg)) == frame
    assert orjson.loads(encode_frame(frame)) == frame
    # A client decoding the bytes gets the same model back.
    decoded = decode_server_frame(encode_frame(frame))
    assert type(decoded) is model and decoded == msg
    decoded_text = decode_server_frame(encode_frame(frame).decode())
    assert decoded_text == msg


def test_every_builder_and_server_frame_type_is_covered():
    covered = {c[1]["type"] for c in CASES}
    server_types = {"welcome", "started", "resumed", "token", "reasoning", "tool_call_chunk",
                    "tool_call_complete", "finish", "error", "pong"}
    assert covered == server_types
    assert set(frames.__all__) == server_types | {"usage"}


def test_started_has_seq_zero():
    assert frames.started("q1", "demo") == {"type": "started", "id": "q1", "seq": 0,
                                            "model": "demo"}


def test_usage_total_is_the_sum():
    usage = frames.usage(7, 5, True)
    assert usage == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12,
                     "estimated": True}
    assert Usage.model_validate(usage).estimated is True


def test_usage_estimated_must_be_a_real_bool():
    with pytest.raises(pydantic.ValidationError):
        Usage.model_validate({**USAGE, "estimated": "false"})


def test_builders_omit_absent_optionals():
    assert "name" not in frames.tool_call_chunk("q", 1, 0, "c", None, "")
    assert set(frames.finish("q", 1, "completed", None, USAGE)) == {
        "type", "id", "seq", "status", "usage"}
    assert frames.error("x", "m") == {"type": "error", "code": "x", "message": "m"}
    assert frames.pong() == {"type": "pong"}


def test_finish_status_is_validated():
    with pytest.raises(pydantic.ValidationError):
        Finish.model_validate(frames.finish("q", 1, "done", None, USAGE))


def test_seq_must_not_be_negative():
    with pytest.raises(pydantic.ValidationError):
        Token.model_validate(frames.token("q", -1, "x"))


# ------------------------------------------------------------------ encode_frame


def test_encode_frame_of_a_model_drops_none_fields():
    assert encode_frame(Error(type="error", code="bad_request", message="m")) == \
        b'{"type":"error","code":"bad_request","message":"m"}'
    assert encode_frame(Pong(type="pong")) == b'{"type":"pong"}'
    assert encode_frame(ToolCallChunk(type="tool_call_chunk", id="q", seq=1, index=0,
                                      call_id="c", arguments_delta="")) == \
        b'{"type":"tool_call_chunk","id":"q","seq":1,"index":0,"call_id":"c","arguments_delta":""}'
    finish = Finish(type="finish", id="q", seq=2, status="completed",
                    usage=Usage(**USAGE))
    assert orjson.loads(encode_frame(finish)) == {
        "type": "finish", "id": "q", "seq": 2, "status": "completed", "usage": USAGE}


def test_encode_frame_keeps_null_inside_data():
    # Only absent *fields* are dropped; a ping/pong payload is echoed as given.
    assert encode_frame(Pong(type="pong", data={"a": None, "b": [None]})) == \
        b'{"type":"pong","data":{"a":null,"b":[null]}}'


def test_encode_frame_of_client_models():
    assert encode_frame(Hello(type="hello")) == b'{"type":"hello"}'
    assert encode_frame(Ping(type="ping", data=[1])) == b'{"type":"ping","data":[1]}'
    start = Start(type="start", id="q", model="demo",
                  messages=[{"role": "user", "content": "hi"}],
                  params={"temperature": 0.5})
    assert orjson.loads(encode_frame(start)) == {
        "type": "start", "id": "q", "model": "demo",
        "messages": [{"role": "user", "content": "hi"}], "params": {"temperature": 0.5}}


def test_encode_frame_is_utf8_json_bytes():
    out = encode_frame(frames.token("q", 1, "é\U0001f600"))
    assert isinstance(out, bytes)
    assert out.decode("utf-8") == '{"type":"token","id":"q","seq":1,"text":"é\U0001f600"}'


# ------------------------------------------------------------------ decode_server_frame


@pytest.mark.parametrize("raw", [
    '{"type":"session_resumed","id":"q"}',  # a frame type from a newer server
    '{"type":"TOKEN","id":"q","seq":1,"text":"x"}',
    '{"type":"hello"}',                     # a client frame is not a server frame
    '{"type":null}',
    '{"no_type":1}',
    '[1,2]',
    '"welcome"',
    'null',
])
def test_decode_server_frame_ignores_unknown_types(raw):
    assert decode_server_frame(raw) is None
    assert decode_server_frame(raw.encode()) is None


def test_decode_server_frame_ignores_unknown_fields():
    msg = decode_server_frame(b'{"type":"token","id":"q","seq":1,"text":"x","lang":"en"}')
    assert msg == Token(type="token", id="q", seq=1, text="x")


def test_decode_server_frame_welcome_with_extra_limits():
    raw = orjson.dumps({**frames.welcome("s", ["demo"], {**LIMITS, "max_queue": 64},
                                         PROTOCOL_VERSION), "server": "llm-relay/0.1"})
    msg = decode_server_frame(raw)
    assert isinstance(msg, Welcome)
    assert msg.limits.max_streams == 8 and msg.protocol == PROTOCOL_VERSION


def test_decode_server_frame_rejects_a_malformed_known_frame():
    with pytest.raises(pydantic.ValidationError):
        decode_server_frame(b'{"type":"token","id":"q","seq":1}')
