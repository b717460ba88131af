"""``decode_client_frame``: every client frame type, and every class of bad input with the exact
``error`` frame the server answers with (PROTOCOL.md, "Bad input")."""

from __future__ import annotations

import pydantic
import pytest

from llm_relay_protocol import (
    ALLOWED_PARAMS,
    Cancel,
    ChatMessage,
    ClientInfo,
    Hello,
    Params,
    Ping,
    Start,
    Tool,
    decode_client_frame,
)

from ._util import HI, rejected, start, text

# ------------------------------------------------------------------ valid frames


def test_hello_minimal():
    msg = decode_client_frame('{"type":"hello"}')
    assert msg == Hello(type="hello")
    assert msg.token is None and msg.client is None


def test_hello_full():
    msg = decode_client_frame(
        text({"type": "hello", "token": "tok", "client": {"name": "app", "version": "1.2"}}))
    assert isinstance(msg, Hello)
    assert msg.token == "tok"
    assert msg.client == ClientInfo(name="app", version="1.2")


def test_start_minimal_defaults():
    msg = decode_client_frame(text(start()))
    assert isinstance(msg, Start)
    assert (msg.id, msg.model) == ("s1", "demo")
    assert msg.messages == [ChatMessage(role="user", content="hi")]
    assert msg.tools is None and msg.tool_choice is None
    assert msg.params == Params()
    assert msg.params.model_dump(exclude_none=True) == {}


FULL_PARAMS = {
    "temperature": 0.2, "top_p": 1, "max_tokens": 64, "stop": ["\n\n", "END"], "seed": 7,
    "presence_penalty": -0.5, "frequency_penalty": 2, "response_format": {"type": "json_object"},
    "reasoning_effort": "low", "parallel_tool_calls": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_start_full():
    messages = [
        {"role": "system", "content": "be terse"},
        {"role": "developer", "content": "no markdown"},
        {"role": "user", "content": [{"type": "text", "text": "weather?"}], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant"},
    ]
    frame = start(id="x" * 128, messages=messages, tools=[WEATHER],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  params=FULL_PARAMS)
    msg = decode_client_frame(text(frame))
    assert isinstance(msg, Start) and msg.id == "x" * 128
    # Chat messages and tools pass through to the provider unchanged (extra keys kept).
    assert [m.model_dump(exclude_unset=True) for m in msg.messages] == messages
    assert [t.model_dump(exclude_unset=True) for t in msg.tools] == [WEATHER]
    assert isinstance(msg.tools[0], Tool)
    assert msg.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert msg.params.model_dump(exclude_none=True) == FULL_PARAMS
    assert set(FULL_PARAMS) == set(ALLOWED_PARAMS)


@pytest.mark.parametrize("choice", ["auto", "none", "required", None])
def test_start_tool_choice_strings(choice):
    msg = decode_client_frame(text(start(tools=[WEATHER], tool_choice=choice)))
    assert msg.tool_choice == choice


def test_start_null_optionals_count_as_absent():
    msg = decode_client_frame(text(start(tools=None, tool_choice=None,
                                         params={k: None for k in ALLOWED_PARAMS})))
    assert msg.tools is None and msg.tool_choice is None
    assert msg.params.model_dump(exclude_none=True) == {}


def test_stop_may_be_a_string():
    assert decode_client_frame(text(start(params={"stop": "END"}))).params.stop == "END"


def test_cancel():
    assert decode_client_frame('{"type":"cancel","id":"s1"}') == Cancel(type="cancel", id="s1")


@pytest.mark.parametrize("data", [None, 0, "x", [1, {"a": None}], {"t": 1.5, "nested": [True]}])
def test_ping_carries_any_json(data):
    frame = {"type": "ping"} if data is None else {"type": "ping", "data": data}
    msg = decode_client_frame(text(frame))
    assert isinstance(msg, Ping) and msg.data == data


def test_bytes_like_text_is_not_accepted_even_if_json():
    # A binary WebSocket message arrives as bytes: rejected even when it holds valid JSON.
    for data in (b'{"type":"ping"}', bytearray(b'{"type":"ping"}'), memoryview(b"{}")):
        assert rejected(data) == {
            "type": "error", "code": "bad_request",
            "message": "binary frames are not accepted; send one JSON object per text frame"}


# ------------------------------------------------------------------ unknown fields


@pytest.mark.parametrize("frame", [
    {"type": "hello", "future": 1, "client": {"name": "a", "version": "1", "os": "linux"}},
    start(future={"x": 1}, priority=3),
    {"type": "cancel", "id": "s1", "reason": "user"},
    {"type": "ping", "data": 1, "extra": True},
])
def test_unknown_fields_are_ignored(frame):
    msg = decode_client_frame(text(frame))
    dumped = msg.model_dump()
    for key in ("future", "priority", "reason", "extra"):
        assert key not in dumped
    assert not hasattr(msg, "future")


# ------------------------------------------------------------------ frozen


@pytest.mark.parametrize("raw, attr, value", [
    ('{"type":"hello","token":"t"}', "token", "other"),
    (text(start()), "id", "other"),
    ('{"type":"cancel","id":"s1"}', "id", "other"),
    ('{"type":"ping","data":1}', "data", 2),
])
def test_messages_are_frozen(raw, attr, value):
    msg = decode_client_frame(raw)
    with pytest.raises(pydantic.ValidationError):
        setattr(msg, attr, value)
    assert getattr(msg, attr) != value


def test_nested_models_are_frozen():
    msg = decode_client_frame(text(start(params={"temperature": 1.0})))
    with pytest.raises(pydantic.ValidationError):
        msg.params.temperature = 2.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        msg.messages[0].role = "system"  # type: ignore[misc]


# ------------------------------------------------------------------ not a JSON object


@pytest.mark.parametrize("raw, kind", [
    ("[1, 2]", "an array"), ("[]", "an array"), ('"start"', "a string"), ("42", "a number"),
    ("-1.5", "a number"), ("null", "null"), ("true", "a boolean"), ("false", "a boolean"),
])
def test_json_that_is_not_an_object(raw, kind):
    assert rejected(raw) == {"type": "error", "code": "bad_request",
                             "message": f"frame must be a JSON object, got {kind}"}


@pytest.mark.parametrize("raw", [
    "", " ", "{", "not json", '{"type": "ping",}', "{'type': 'ping'}", '{"type":"ping"} {}',
    "NaN", '{"type":"ping","data":Infinity}', "1e999", "\ud800",
])
def test_not_json(raw):
    frame = rejected(raw)
    assert set(frame) == {"type", "code", "message"}  # no ref: the frame type is unknown
    assert frame["message"].startswith("frame is not valid JSON: ")


@pytest.mark.parametrize("raw", [
    "{}", '{"id": "s1"}', '{"type": null}', '{"type": 1}', '{"type": ["start"]}',
    '{"type": {"name": "start"}}', '{"type": true}',
])
def test_missing_or_non_string_type(raw):
    assert rejected(raw) == {"type": "error", "code": "bad_request",
                             "message": "frame has no string field 'type'"}


@pytest.mark.parametrize("ftype", ["welcome", "token", "finish", "error", "pong", "START", "",
                                   "subscribe"])
def test_unknown_type_names_it_in_ref(ftype):
    assert rejected(text({"type": ftype, "id": "s1"})) == {
        "type": "error", "code": "bad_request", "ref": ftype,
        "message": f"unknown frame type {ftype!r} (expected one of: hello, start, cancel, ping, resume)"}


def test_unknown_type_is_truncated_in_ref_and_message():
    frame = rejected(text({"type": "x" * 1000}))
    assert frame["ref"] == "x" * 64
    assert len(frame["message"]) < 200


# ------------------------------------------------------------------ missing / mistyped fields


def _field_error(frame: dict, ref: str, field: str, id: str | None = None) -> None:
    expected_keys = {"type", "code", "message", "ref"} | ({"id"} if id is not None else set())
    assert set(frame) == expected_keys
    assert frame["ref"] == ref
    assert frame.get("id") == id
    assert frame["message"].startswith(f"field {field!r}: "), frame["message"]


@pytest.mark.parametrize("field", ["id", "model", "messages"])
def test_start_missing_required_field(field):
    frame = start()
    del frame[field]
    _field_error(rejected(text(frame)), "start", field, None if field == "id" else "s1")
    assert rejected(text(frame))["message"].endswith("Field required")


@pytest.mark.parametrize("field, value", [
    ("model", 5), ("model", None), ("model", ""), ("model", "m" * 257),
    ("messages", "hi"), ("messages", {"role": "user"}), ("messages", None),
    ("tools", {"type": "function"}), ("tools", "all"), ("tool_choice", "maybe"),
    ("tool_choice", 1), ("params", None), ("params", []), ("params", "temperature=1"),
])
def test_start_mistyped_field(field, value):
    frame = rejected(text(start(**{field: value})))
    assert set(frame) == {"type", "code", "message", "ref", "id"}
    assert frame["ref"] == "start" and frame["id"] == "s1"
    # For union fields the location also names pydantic's failing branch, and then repr()
    # quotes it with double quotes: field "tool_choice.literal['auto','none','required']".
    assert frame["message"][:7] in ("field '", 'field "'), frame["message"]
    assert frame["message"][7:].startswith(field), frame["message"]


@pytest.mark.parametrize("value", [5, 1.0, None, True, ["s1"], {"id": "s1"}])
def test_non_string_id_is_not_echoed(value):
    for frame in (start(id=value), {"type": "cancel", "id": value}):
        _field_error(rejected(text(frame)), frame["type"], "id")


@pytest.mark.parametrize("value, problem", [("", "at least 1"), ("x" * 129, "at most 128")])
def test_id_empty_or_too_long_is_bad_request_echoing_the_id(value, problem):
    for frame in (start(id=value), {"type": "cancel", "id": value}):
        err = rejected(text(frame))
        _field_error(err, frame["type"], "id", value)
        assert problem in err["message"]


def test_cancel_missing_id():
    _field_error(rejected('{"type":"cancel"}'), "cancel", "id")


@pytest.mark.parametrize("frame, field", [
    ({"type": "hello", "token": 5}, "token"),
    ({"type": "hello", "client": "app"}, "client"),
    ({"type": "hello", "client": {"name": "app"}}, "client.version"),
    ({"type": "hello", "client": {"name": 1, "version": "1"}}, "client.name"),
])
def test_hello_mistyped(frame, field):
    _field_error(rejected(text(frame)), "hello", field)


@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ([5], "messages.0"),
    (["hi"], "messages.0"),
    ([{"content": "x"}], "messages.0.role"),
    ([{"role": "bot", "content": "x"}], "messages.0.role"),
    ([{"role": "USER", "content": "x"}], "messages.0.role"),
    ([{"role": 1, "content": "x"}], "messages.0.role"),
    (HI + [{"role": "user", "content": 5}], "messages.1.content"),
])
def test_invalid_messages(messages, field):
    err = rejected(text(start(messages=messages)))
    assert err["ref"] == "start" and err["id"] == "s1"
    assert err["message"].startswith(f"field '{field}"), err["message"]


def test_empty_messages_message():
    err = rejected(text(start(messages=[])))
    assert err["message"] == "field 'messages': List should have at least 1 item after " \
                             "validation, not 0"


@pytest.mark.parametrize("tools, field", [
    ([{"function": {"name": "f"}}], "tools.0.type"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "tools.0.type"),
    ([{"type": "function"}], "tools.0.function"),
    ([{"type": "function", "function": {"name": ""}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"description": "no name"}}], "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
     "tools.0.function.parameters"),
])
def test_invalid_tools(tools, field):
    err = rejected(text(start(tools=tools)))
    assert err["ref"] == "start" and err["id"] == "s1"
    assert err["message"].startswith(f"field '{field}"), err["message"]


# ------------------------------------------------------------------ params allowlist


FORBIDDEN = ["api_base", "api_key", "base_url", "n", "stream", "stream_options", "model",
             "messages", "num_retries", "timeout", "extra_headers", "custom_llm_provider",
             "metadata", "user", "logprobs", "Temperature"]


@pytest.mark.parametrize("key", FORBIDDEN)
def test_forbidden_params_key_is_named(key):
    assert rejected(text(start(params={"temperature": 0.5, key: "x"}))) == {
        "type": "error", "code": "bad_request", "ref": "start", "id": "s1",
        "message": f"params: key {key!r} is not allowed (allowed: temperature, top_p, "
                   "max_tokens, stop, seed, presence_penalty, frequency_penalty, "
                   "response_format, reasoning_effort, parallel_tool_calls)"}


@pytest.mark.parametrize("params, field", [
    ({"temperature": "0.5"}, "temperature"),      # strings are not numbers
    ({"temperature": True}, "temperature"),       # nor are booleans
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": "1"}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"seed": 1.5}, "seed"),
    ({"seed": False}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "high"}, "frequency_penalty"),
    ({"response_format": "json"}, "response_format"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_params_mistyped_or_out_of_range(params, field):
    err = rejected(text(start(params=params)))
    assert err["ref"] == "start" and err["id"] == "s1"
    assert err["message"].startswith(f"field 'params.{field}"), err["message"]


def test_integers_are_accepted_for_number_params():
    msg = decode_client_frame(text(start(params={"temperature": 1, "top_p": 0,
                                                 "presence_penalty": -2})))
    assert msg.params.temperature == 1.0 and msg.params.top_p == 0.0
    assert msg.params.presence_penalty == -2.0


# ------------------------------------------------------------------ a later duplicate key wins


def test_duplicate_keys_last_wins():
    assert isinstance(decode_client_frame('{"type":"cancel","type":"ping"}'), Ping)
