"""llm_relay_protocol.responses, sans I/O: client events -> the v1 chat turn, v1 stream frames -> the
Responses server events. Every event the encoder produces is validated against the official
``openai`` SDK's own ``ResponsesServerEvent`` models (not a copy of its types)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter

from llm_relay_protocol import DecodeLimits, frames
from llm_relay_protocol.responses import (CancelRequest, CreateRequest, ResponseEncoder, ResponsesError,
                                decode_event, new_response_id, to_turn)

SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
USAGE = frames.usage(5, 7, False)


def create(**fields: Any) -> CreateRequest:
    event = decode_event(json.dumps({"type": "response.create", "model": "m", **fields}))
    assert isinstance(event, CreateRequest)
    return event


def refusal(**fields: Any) -> ResponsesError:
    with pytest.raises(ResponsesError) as caught:
        to_turn(create(**fields), previous=None)
    SERVER_EVENT.validate_python(caught.value.event())
    return caught.value


def encode(v1: list[dict[str, Any]], stream_id: str | None = None,
           **fields: Any) -> list[dict[str, Any]]:
    turn = to_turn(create(input="hi", **fields), previous=None)
    encoder = ResponseEncoder(new_response_id(), turn.echo, created_at=1.0,
                              stream_id=stream_id)
    events = encoder.opening() + encoder.feed(v1)
    for event in events:
        SERVER_EVENT.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def tok(text: str) -> dict[str, Any]:
    return frames.token("r", 1, text)


def fin(status: str = "completed", reason: str | None = "stop",
        error: dict[str, Any] | None = None) -> dict[str, Any]:
    return frames.finish("r", 9, status, reason, USAGE, error)


# ---------------------------------------------------------------- decode


def test_a_string_input_is_one_user_message_after_the_instructions():
    turn = to_turn(create(input="hello", instructions="be brief"), previous=None)
    assert turn.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hello"}]
    assert turn.history == [{"role": "user", "content": "hello"}]


def test_input_items_become_chat_messages():
    turn = to_turn(create(input=[
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "look: "},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"},
            {"type": "input_file", "file_data": "data:application/pdf;base64,BBBB",
             "filename": "a.pdf"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Calling."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [
            {"type": "input_text", "text": "two"}]},
    ]), previous=[{"role": "user", "content": "before"}])
    assert turn.messages == [
        {"role": "user", "content": "before"},
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [
            {"type": "text", "text": "look: "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                "detail": "low"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,BBBB",
                                      "filename": "a.pdf"}}]},
        {"role": "assistant", "content": "Calling.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function",
             "function": {"name": "g", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]


def test_options_map_to_the_v1_params_and_tools():
    turn = to_turn(create(
        input="x", max_output_tokens=50, temperature=0.3, top_p=0.9,
        reasoning={"effort": "high"}, parallel_tool_calls=False,
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"},
                "strict": True}],
        tool_choice={"type": "function", "name": "f"},
        text={"format": {"type": "json_schema", "name": "out", "strict": True,
                         "schema": {"type": "object"}}},
        store=False, include=[], truncation="auto", user="u1", future_field={"a": 1}),
        previous=None)
    assert turn.params == {
        "max_tokens": 50, "temperature": 0.3, "top_p": 0.9, "reasoning_effort": "high",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "out", "schema": {"type": "object"}, "strict": True}}}
    assert turn.tools == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert turn.tool_choice == {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize("fields, code, param", [
    ({"tools": [{"type": "web_search"}], "input": "x"}, "unsupported_tool", "tools[0].type"),
    ({"tools": [{"type": "function"}], "input": "x"}, "invalid_value", "tools[0].name"),
    ({"tool_choice": {"type": "file_search"}, "input": "x"}, "unsupported_tool",
     "tool_choice"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "unsupported_input_item",
     "input[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "invalid_value",
     "input[0].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "invalid_value", "input[0].content[0].image_url"),
    ({"input": [{"role": "robot", "content": "x"}]}, "invalid_value", "input[0].role"),
    ({"text": {"format": {"type": "yaml"}}, "input": "x"}, "invalid_value",
     "text.format.type"),
    ({}, "missing_required_parameter", "input"),
])
def test_refusals_name_the_param(fields, code, param):
    error = refusal(**fields)
    assert (error.code, error.param, error.type) == (code, param, "invalid_request_error")


@pytest.mark.parametrize("event, code, param", [
    ({"type": "response.create", "temperature": 3}, "invalid_value", "temperature"),
    ({"type": "response.create", "metadata": {"k": 1}}, "invalid_value", "metadata.k"),
    ({"type": "response.create", "background": True}, "unsupported_parameter",
     "background"),
    ({"type": "response.steer", "input": []}, "unsupported_event", "type"),
    ({"type": "session.update"}, "unknown_event", "type"),
    ({"type": "response.cancel"}, "invalid_value", "response_id"),
])
def test_bad_events_are_invalid_request_errors(event, code, param):
    with pytest.raises(ResponsesError) as caught:
        decode_event(json.dumps(event))
    assert (caught.value.code, caught.value.param) == (code, param)
    SERVER_EVENT.validate_python(caught.value.event())


def test_limits_are_checked_before_validation():
    limits = DecodeLimits(max_messages=3, max_json_depth=8)
    with pytest.raises(ResponsesError) as caught:
        decode_event(json.dumps({"type": "response.create", "input": ["x"] * 4}), limits)
    assert caught.value.param == "input" and "max_messages" in caught.value.message
    with pytest.raises(ResponsesError) as caught:
        decode_event('{"type": "response.create", "input": ' + "[" * 20 + "]" * 20 + "}",
                     limits)
    assert caught.value.code == "invalid_json"
    for bad in ("not json", "[1]", b"{}"):
        with pytest.raises(ResponsesError):
            decode_event(bad)


def test_a_lane_is_echoed_on_a_refusal_of_its_event():
    with pytest.raises(ResponsesError) as caught:
        decode_event(json.dumps({"type": "response.create", "stream_id": "lane-1",
                                 "top_p": 5}))
    assert caught.value.event()["stream_id"] == "lane-1"


def test_cancel_names_a_response():
    assert decode_event('{"type": "response.cancel", "response_id": "resp_1"}') == \
        CancelRequest(type="response.cancel", response_id="resp_1")


# ---------------------------------------------------------------- encode


def test_text_then_completed_with_usage():
    events = encode([tok("Hel"), tok("lo"), fin()], stream_id="a")
    assert all(e["stream_id"] == "a" for e in events)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    response = events[-1]["response"]
    assert response["usage"] == {
        "input_tokens": 5, "input_tokens_details": {"cached_tokens": 0,
                                                    "cache_write_tokens": 0},
        "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12}
    assert response["output"][0]["content"][0]["text"] == "Hello"
    assert events[6]["text"] == "Hello"


def test_refusal_is_its_own_content_part():
    events = encode([tok("I "), frames.refusal("r", 2, "can't"), fin("completed",
                                                                      "content_filter")])
    response = events[-1]["response"]
    assert events[-1]["type"] == "response.incomplete"
    assert response["incomplete_details"] == {"reason": "content_filter"}
    assert response["output"][0]["content"] == [
        {"type": "output_text", "text": "I ", "annotations": [], "logprobs": []},
        {"type": "refusal", "refusal": "can't"}]
    assert [e["type"] for e in events if "refusal" in e["type"]] == [
        "response.refusal.delta", "response.refusal.done"]


def test_parallel_tool_calls_are_items_of_their_own():
    v1 = [frames.tool_call_chunk("r", 1, 0, "c1", "f", '{"a"'),
          frames.tool_call_chunk("r", 2, 1, "c2", "g", '{"b"'),
          frames.tool_call_chunk("r", 3, 0, "c1", None, ":1}"),
          frames.tool_call_chunk("r", 4, 1, "c2", None, ":2}"),
          frames.tool_call_complete("r", 5, 0, "c1", "f", '{"a":1}'),
          frames.tool_call_complete("r", 6, 1, "c2", "g", '{"b":2}'),
          fin("completed", "tool_calls")]
    events = encode(v1)
    output = events[-1]["response"]["output"]
    assert [(o["call_id"], o["name"], o["arguments"]) for o in output] == [
        ("c1", "f", '{"a":1}'), ("c2", "g", '{"b":2}')]
    by_item: dict[str, str] = {}
    for e in events:
        if e["type"] == "response.function_call_arguments.delta":
            by_item[e["item_id"]] = by_item.get(e["item_id"], "") + e["delta"]
    assert by_item == {output[0]["id"]: '{"a":1}', output[1]["id"]: '{"b":2}'}


def test_reasoning_then_text_are_two_items():
    events = encode([frames.reasoning("r", 1, "hmm"), tok("yes"), fin()])
    kinds = [o["type"] for o in events[-1]["response"]["output"]]
    assert kinds == ["reasoning", "message"]


@pytest.mark.parametrize("finish, kind, status, detail", [
    (fin("cancelled", "client_cancel"), "response.incomplete", "cancelled", None),
    (fin("completed", "length"), "response.incomplete", "incomplete",
     {"reason": "max_output_tokens"}),
    (fin("failed", "upstream_error", frames.error_info("upstream_error", "secret detail")),
     "response.failed", "failed", None),
    (fin("timeout", "idle_timeout"), "response.failed", "failed", None),
])
def test_every_ending_is_a_terminal_event_with_usage(finish, kind, status, detail):
    events = encode([tok("partial"), finish])
    response = events[-1]["response"]
    assert events[-1]["type"] == kind and response["status"] == status
    assert response["incomplete_details"] == detail
    assert response["usage"]["output_tokens"] == 7
    assert "secret detail" not in json.dumps(events)
    if status == "failed":
        assert response["error"]["code"] == "server_error"
    item_status = response["output"][0]["status"]
    assert item_status == ("completed" if status == "completed" else "incomplete")


def test_the_assistant_turn_for_the_chain():
    turn = to_turn(create(input="hi"), previous=None)
    encoder = ResponseEncoder("resp_x", turn.echo, created_at=1.0)
    encoder.feed([tok("Sure. "), frames.tool_call_complete("r", 2, 0, "c1", "f", "{}"),
                  fin("completed", "tool_calls")])
    assert encoder.output_messages() == [{"role": "assistant", "content": "Sure. ",
                                          "tool_calls": [{"id": "c1", "type": "function",
                                                          "function": {"name": "f",
                                                                       "arguments": "{}"}}]}]
