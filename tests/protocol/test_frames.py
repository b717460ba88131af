"""The builders of ``llm_relay_protocol.frames`` (server -> client, client -> server, relay -> relay)
produce exactly what the models of ``llm_relay_protocol.messages`` and the committed
``clients/python/llm_relay_protocol/schema.json`` describe; ``encode_frame``, ``decode_server_frame``,
``decode_client_frame`` and ``decode_relay_message`` agree with them. The type lists derived
from the discriminated unions are exactly the unions' members."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pydantic
import pytest

import llm_relay_protocol
from llm_relay_protocol import (
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
    Refusal,
    Start,
    Started,
    Token,
    ToolCallChunk,
    ToolCallComplete,
    Usage,
    Welcome,
    Resumed,
    Cancel,
    RelayCancel,
    RelayTakeover,
    Resume,
    decode_client_frame,
    decode_relay_message,
    decode_server_frame,
    encode_frame,
    frames,
)
from llm_relay_protocol import messages
from llm_relay_protocol.client_policy import frame_tables, local_cancel_finish
from llm_relay_protocol.schema import SCHEMA_PATH

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))

USAGE = frames.usage(12, 30, False)
LIMITS = frames.limits(8, 1 << 20, 15.0)

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
    ("refusal", frames.refusal("q1", 4, "I can't help with that."), Refusal),
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


CLIENT_CASES: list[tuple[str, dict[str, Any], type[pydantic.BaseModel]]] = [
    ("hello", frames.hello(), Hello),
    ("hello-full", frames.hello("tok", frames.client_info("py", "1.0")), Hello),
    ("start", frames.start("q1", "demo", [{"role": "user", "content": "hi"}]), Start),
    ("start-full", frames.start(
        "q1", "demo", [{"role": "user", "content": "hi"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto", params={"temperature": 0.5, "max_tokens": 9}), Start),
    ("cancel", frames.cancel("q1"), Cancel),
    ("ping", frames.ping(), Ping),
    ("ping-data", frames.ping({"n": 1}), Ping),
    ("ping-falsy-data", frames.ping(0), Ping),
    ("resume", frames.resume("k" * 22, 0), Resume),
    ("resume-id", frames.resume("k" * 22, 41, "q2"), Resume),
]

RELAY_CASES: list[tuple[str, dict[str, Any], type[pydantic.BaseModel]]] = [
    ("cancel", frames.relay_cancel("k" * 22), RelayCancel),
    ("takeover", frames.relay_takeover("k" * 22, "host-12-ab"), RelayTakeover),
]


def _schema_errors(direction: str, frame: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA[direction])
    return [e.message for e in validator.iter_errors(frame)]


@pytest.mark.parametrize("name, frame, model", CASES, ids=[c[0] for c in CASES])
def test_server_builder_output_matches_the_json_schema(name, frame, model):
    assert _schema_errors("server_to_client", frame) == []


@pytest.mark.parametrize("name, frame, model", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES])
def test_client_builder_output_is_what_the_relay_accepts(name, frame, model):
    assert _schema_errors("client_to_server", frame) == []
    msg = decode_client_frame(encode_frame(frame).decode())
    assert type(msg) is model and msg == model.model_validate(frame)
    # Re-encoding the model gives the built frame back (absent optionals stay absent; only
    # ``start.params`` and ``resume.takeover`` have a default other than None: no
    # parameters, ``{}``; a viewer, ``false``).
    default = ({"params": {}} if model is Start
               else {"takeover": False} if model is Resume else {})
    assert orjson.loads(encode_frame(msg)) == {**default, **frame}


@pytest.mark.parametrize("name, frame, model", RELAY_CASES, ids=[c[0] for c in RELAY_CASES])
def test_relay_messages_roundtrip(name, frame, model):
    assert _schema_errors("relay_to_relay", frame) == []
    msg = decode_relay_message(orjson.dumps(frame))
    assert type(msg) is model
    assert decode_relay_message(frame) == msg
    assert decode_relay_message(msg.encode().decode()) == msg
    assert orjson.loads(msg.encode()) == frame


@pytest.mark.parametrize("raw, problem", [
    (b"not json", "relay message is not valid JSON"),
    (b"[1]", "must be a JSON object, got an array"),
    (b'{"key": "k"}', "unknown relay message op 'None'"),
    (b'{"op": "explode", "key": "k"}', "unknown relay message op 'explode'"),
    (b'{"op": "cancel"}', "field 'key'"),
    (b'{"op": "cancel", "key": 7}', "field 'key'"),
    (b'{"op": "cancel", "key": ""}', "field 'key'"),
    (b'{"op": "takeover", "key": "k"}', "field 'node'"),
    (b'{"type": "cancel", "key": "k"}', "unknown relay message op"),
])
def test_malformed_relay_messages_are_refused(raw, problem):
    with pytest.raises(ValueError) as info:
        decode_relay_message(raw)
    assert problem in str(info.value)


def test_relay_messages_ignore_unknown_fields():
    # A newer relay may add fields during a rolling restart.
    assert decode_relay_message({"op": "cancel", "key": "k", "reason": "x"}) == \
        RelayCancel(op="cancel", key="k")


def test_relay_message_models_are_frozen():
    msg = RelayCancel(op="cancel", key="k")
    with pytest.raises(pydantic.ValidationError):
        msg.key = "other"


def test_error_info_and_local_cancel_finish_are_valid():
    info = frames.error_info(ErrorCode.UPSTREAM_RATE_LIMITED, "slow down", 2.0)
    assert info == {"code": "upstream_rate_limited", "message": "slow down", "retry_after": 2.0}
    finish = frames.finish("q", 1, "failed", None, USAGE, frames.error_info("x", "m"))
    assert Finish.model_validate(finish).error.retry_after is None
    assert _schema_errors("server_to_client", local_cancel_finish("q")) == []


def test_limits_are_the_welcome_limits():
    assert LIMITS == {"max_streams": 8, "max_frame_bytes": 1 << 20, "detach_grace": 15.0}


def test_readdressed_changes_only_the_id():
    frame = frames.tool_call_chunk("old", 3, 0, "c", "f", "{")
    assert frames.readdressed(frame, "new") == {**frame, "id": "new"}
    assert frame["id"] == "old"


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


def test_every_builder_and_frame_type_is_covered():
    server_types = {"welcome", "started", "resumed", "token", "reasoning", "refusal", "tool_call_chunk",
                    "tool_call_complete", "finish", "error", "pong"}
    client_types = {"hello", "start", "cancel", "ping", "resume"}
    assert {c[1]["type"] for c in CASES} == server_types
    assert {c[1]["type"] for c in CLIENT_CASES} == client_types
    assert {c[1]["op"] for c in RELAY_CASES} == {"cancel", "takeover"}
    helpers = {"usage", "error_info", "readdressed", "client_info", "limits"}
    assert set(frames.__all__) == (server_types | client_types | helpers
                                   | {"relay_cancel", "relay_takeover"})


# ------------------------------------------------------------------ derived type lists


def _tags(union: Any, field: str = "type") -> list[str]:
    """The union's members' discriminator Literals, read without protocol's helpers."""
    return [m.model_fields[field].annotation.__args__[0]
            for m in union.__origin__.__args__]


def test_derived_type_lists_are_the_unions_members():
    assert list(messages.CLIENT_FRAME_TYPES) == _tags(messages.ClientMessage) == [
        "hello", "start", "cancel", "ping", "resume"]
    assert list(messages.SERVER_FRAME_TYPES) == _tags(messages.ServerMessage)
    assert set(messages.SERVER_FRAME_TYPES) == {
        "welcome", "started", "resumed", "token", "reasoning", "refusal", "tool_call_chunk",
        "tool_call_complete", "finish", "error", "pong"}
    assert list(messages.RELAY_OPS) == _tags(messages.RelayMessage, "op") == [
        "cancel", "takeover"]
    assert set(messages.STREAM_FRAME_TYPES) == {
        "started", "token", "reasoning", "refusal", "tool_call_chunk", "tool_call_complete", "finish"}
    assert set(messages.ADDRESSED_CLIENT_FRAME_TYPES) == {"start", "cancel", "resume"}


def test_derived_lists_match_the_schema():
    for direction, types in (("client_to_server", messages.CLIENT_FRAME_TYPES),
                             ("server_to_client", messages.SERVER_FRAME_TYPES),
                             ("relay_to_relay", messages.RELAY_OPS)):
        assert set(SCHEMA[direction]["discriminator"]["mapping"]) == set(types), direction


def test_the_js_frame_table_is_derived_from_the_models():
    table = frame_tables()
    assert table["client_types"] == list(messages.CLIENT_FRAME_TYPES)
    assert table["server_types"] == list(messages.SERVER_FRAME_TYPES)
    assert table["stream_types"] == list(messages.STREAM_FRAME_TYPES)
    assert list(table["client"]) == list(messages.CLIENT_FRAME_TYPES)
    for model in messages.union_members(messages.ClientMessage):
        fields = table["client"][messages.model_tag(model)]
        assert fields["required"] + fields["optional"] == [
            name for name in model.model_fields if name != "type"]
        required = {n for n, info in model.model_fields.items() if info.is_required()}
        assert set(fields["required"]) == required - {"type"}
    assert table["client"]["start"]["required"] == ["id", "model", "messages"]


def test_the_unknown_type_error_lists_the_derived_client_types():
    with pytest.raises(llm_relay_protocol.FrameError) as info:
        decode_client_frame('{"type": "nope"}')
    assert f"(expected one of: {', '.join(messages.CLIENT_FRAME_TYPES)})" in str(info.value)


# Where frames used to be assembled by hand. A dict literal with a "type" key naming a
# llm-relay.v1 frame, or an "op" key, is a frame built outside llm_relay_protocol.frames.
_BUILDER_MODULES = {"clients/python/llm_relay_protocol/frames.py"}
_SCANNED = ["clients/python/llm_relay_protocol/", "relay/", "clients/python/llm_relay_client/"]


def _hand_built_frames(source: str, name: str) -> list[str]:
    known = set(messages.CLIENT_FRAME_TYPES) | set(messages.SERVER_FRAME_TYPES)
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(value, ast.Constant)):
                continue
            if (key.value == "type" and value.value in known) or key.value == "op":
                found.append(f"{name}:{node.lineno} {value.value!r}")
    return found


def test_no_frame_is_assembled_outside_the_builders():
    offenders = []
    for package in _SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel in _BUILDER_MODULES or rel in _OTHER_WIRES:
                continue
            offenders += _hand_built_frames(path.read_text(encoding="utf-8"), rel)
    assert offenders == []


#: Modules whose dicts are another wire's, not llm-relay.v1 frames: the AI SDK's
#: UIMessageChunk protocol, the OpenAI Responses events, and TokenStreamer's
#: seed-compatible event dicts.
_OTHER_WIRES = {"clients/python/llm_relay_protocol/aisdk.py", "clients/python/llm_relay_protocol/responses.py", "relay/token_streamer.py"}


def test_the_scan_finds_a_hand_built_frame():
    # The scan above must be able to fail; a tool schema's "type": "function" is no frame.
    sample = ('x = {"type": "token", "id": "q"}\ny = {"op": "cancel", "key": k}\n'
              'z = {"type": "function", "function": {}}\n')
    assert _hand_built_frames(sample, "sample.py") == ["sample.py:1 'token'",
                                                       "sample.py:2 'cancel'"]


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


def test_relay_client_js_builds_no_client_frame_by_hand():
    """relay-client.js builds its frames with clientFrame() from the generated table and
    routes stream frames by the generated list (tests/browser checks what it builds)."""
    js = (ROOT / "clients" / "js" / "relay-client.js").read_text(encoding="utf-8")
    literal = re.compile(r"""type\s*:\s*["'](\w+)["']""")
    assert [t for t in literal.findall(js) if t in messages.CLIENT_FRAME_TYPES] == []
    # A list of types spelled out as fall-through cases (``case "a": case "b": ...``).
    fallthrough = re.findall(r"""(?:case\s+["']\w+["']\s*:\s*){3,}""", js)
    assert fallthrough == []
    for ftype in messages.CLIENT_FRAME_TYPES:
        assert f'clientFrame("{ftype}"' in js, ftype
