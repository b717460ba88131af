"""llm_relay_protocol.aisdk, purely: AI SDK request decoding, UIMessage -> chat messages, and the
mapping of a v1 stream's frames to UIMessageChunks (no sockets, no event loop). The chunks
of every scenario here are also validated with the real `ai` package's schema in
tests/relay/test_aisdk_transport.py."""

from __future__ import annotations

import json

import pytest

from llm_relay_protocol import DecodeLimits, frames
from llm_relay_protocol.aisdk import (
    MAX_MERGED_DELTA_CHARS,
    AiSdkFrameError,
    ResponseMapper,
    SendRequest,
    UIMessage,
    decode_request,
    to_chat_messages,
)

USAGE = frames.usage(5, 3, False)


def run(v1: list[dict], last_sequence: int | None = None) -> list[dict]:
    mapper = ResponseMapper("r1", "msg_1", last_sequence=last_sequence)
    out: list[dict] = []
    for frame in v1:
        out.extend(mapper.frames(frame))
    return out


def chunks_of(out: list[dict]) -> list[dict]:
    return [f["chunk"] for f in out if f["type"] == "chunk"]


def scenarios() -> dict[str, list[dict]]:
    """v1 frame sequences covering every branch of the mapping."""
    s = "s"
    return {
        "text": [frames.token(s, 1, "Hel"), frames.token(s, 2, "lo"),
                 frames.finish(s, 3, "completed", "stop", USAGE)],
        "reasoning_then_text": [frames.reasoning(s, 1, "hmm"), frames.token(s, 2, "A"),
                                frames.reasoning(s, 3, "more"), frames.token(s, 4, "B"),
                                frames.finish(s, 5, "completed", "length", USAGE)],
        "tools": [frames.tool_call_chunk(s, 1, 0, "c1", "get", '{"a":'),
                  frames.tool_call_chunk(s, 2, 1, "c2", "put", '{"b":2}'),
                  frames.tool_call_chunk(s, 3, 0, "c1", None, '1}'),
                  frames.tool_call_complete(s, 4, 0, "c1", "get", '{"a":1}'),
                  frames.tool_call_complete(s, 5, 1, "c2", "put", '{"b":2}'),
                  frames.finish(s, 6, "completed", "tool_calls", USAGE)],
        "bad_tool_arguments": [frames.tool_call_chunk(s, 1, 0, "c1", "get", "{nope"),
                               frames.tool_call_complete(s, 2, 0, "c1", "get", "{nope"),
                               frames.finish(s, 3, "completed", "tool_calls", USAGE)],
        "cancelled": [frames.token(s, 1, "partial"),
                      frames.finish(s, 2, "cancelled", "client_cancel",
                                    frames.usage(5, 1, True))],
        "failed": [frames.token(s, 1, "x"),
                   frames.finish(s, 2, "failed", "upstream_error", frames.usage(5, 1, True),
                                 frames.error("upstream_error", "provider said: key sk-123"))],
        "timeout": [frames.finish(s, 1, "timeout", "first_token_timeout",
                                  frames.usage(5, 0, True))],
        "content_filter": [frames.token(s, 1, "x"),
                           frames.finish(s, 2, "completed", "content_filter", USAGE)],
        "refusal": [frames.refusal(s, 1, "I can't"), frames.refusal(s, 2, " help."),
                    frames.finish(s, 3, "completed", "content_filter", USAGE)],
        "overloaded": [frames.finish(s, 1, "failed", "upstream_overloaded",
                                     frames.usage(5, 0, True),
                                     frames.error_info("upstream_overloaded",
                                                       "the provider is overloaded", 3.0))],
    }


def test_a_refusal_is_text_with_the_content_filter_finish():
    cs = chunks_of(run(scenarios()["refusal"]))
    assert cs[2:] == [
        {"type": "text-start", "id": "t1"},
        {"type": "text-delta", "id": "t1", "delta": "I can't"},
        {"type": "text-delta", "id": "t1", "delta": " help."},
        {"type": "text-end", "id": "t1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "content-filter", "messageMetadata": {"usage": {
            "inputTokens": 5, "outputTokens": 3, "totalTokens": 8, "estimated": False}}}]


def test_overloaded_has_its_own_safe_text():
    out = run(scenarios()["overloaded"])
    assert out[-1]["type"] == "error" and "overloaded" in out[-1]["errorText"]


def test_text_stream_maps_to_start_parts_finish_and_end():
    out = run(scenarios()["text"])
    assert [f["sequence"] for f in out if f["type"] == "chunk"] == list(range(len(out) - 1))
    assert chunks_of(out) == [
        {"type": "start", "messageId": "msg_1"}, {"type": "start-step"},
        {"type": "text-start", "id": "t1"},
        {"type": "text-delta", "id": "t1", "delta": "Hel"},
        {"type": "text-delta", "id": "t1", "delta": "lo"},
        {"type": "text-end", "id": "t1"},
        {"type": "finish-step"},
        {"type": "finish", "finishReason": "stop", "messageMetadata": {"usage": {
            "inputTokens": 5, "outputTokens": 3, "totalTokens": 8, "estimated": False}}}]
    assert out[-1] == {"type": "end", "requestId": "r1"}
    assert all(f["requestId"] == "r1" for f in out)


def test_reasoning_and_text_blocks_close_each_other():
    kinds = [(c["type"], c.get("id")) for c in chunks_of(run(scenarios()["reasoning_then_text"]))]
    assert kinds[2:-2] == [
        ("reasoning-start", "r1"), ("reasoning-delta", "r1"), ("reasoning-end", "r1"),
        ("text-start", "t2"), ("text-delta", "t2"), ("text-end", "t2"),
        ("reasoning-start", "r3"), ("reasoning-delta", "r3"), ("reasoning-end", "r3"),
        ("text-start", "t4"), ("text-delta", "t4"), ("text-end", "t4")]
    assert chunks_of(run(scenarios()["reasoning_then_text"]))[-1]["finishReason"] == "length"


def test_parallel_tool_calls_keep_their_ids_and_parse_inputs():
    cs = chunks_of(run(scenarios()["tools"]))
    assert [c for c in cs if c["type"] == "tool-input-start"] == [
        {"type": "tool-input-start", "toolCallId": "c1", "toolName": "get"},
        {"type": "tool-input-start", "toolCallId": "c2", "toolName": "put"}]
    deltas = [(c["toolCallId"], c["inputTextDelta"]) for c in cs
              if c["type"] == "tool-input-delta"]
    assert deltas == [("c1", '{"a":'), ("c2", '{"b":2}'), ("c1", "1}")]
    assert [c for c in cs if c["type"] == "tool-input-available"] == [
        {"type": "tool-input-available", "toolCallId": "c1", "toolName": "get",
         "input": {"a": 1}},
        {"type": "tool-input-available", "toolCallId": "c2", "toolName": "put",
         "input": {"b": 2}}]
    assert cs[-1]["finishReason"] == "tool-calls"


def test_arguments_that_are_not_json_give_tool_input_error():
    cs = chunks_of(run(scenarios()["bad_tool_arguments"]))
    [error] = [c for c in cs if c["type"] == "tool-input-error"]
    assert error["input"] == "{nope" and error["toolCallId"] == "c1" and error["errorText"]
    assert not [c for c in cs if c["type"] == "tool-input-available"]


def test_cancel_ends_with_abort_then_end():
    out = run(scenarios()["cancelled"])
    assert chunks_of(out)[-2:] == [{"type": "text-end", "id": "t1"},
                                   {"type": "abort", "reason": "client_cancel"}]
    assert out[-1]["type"] == "end"


@pytest.mark.parametrize("name, fragment", [("failed", "provider returned an error"),
                                            ("timeout", "did not start answering")])
def test_failures_end_with_a_safe_error_frame_and_nothing_after(name, fragment):
    mapper = ResponseMapper("r1", "m")
    out: list[dict] = []
    for frame in scenarios()[name]:
        out.extend(mapper.frames(frame))
    assert out[-1]["type"] == "error" and fragment in out[-1]["errorText"]
    assert "sk-123" not in json.dumps(out) and "provider said" not in json.dumps(out)
    assert mapper.done and mapper.frames(frames.token("s", 9, "late")) == []


def test_last_sequence_skips_chunks_the_client_has():
    full = run(scenarios()["text"])
    partial = run(scenarios()["text"], last_sequence=3)
    assert [f["sequence"] for f in partial if f["type"] == "chunk"] == \
        [f["sequence"] for f in full if f["type"] == "chunk"][4:]
    assert partial[-1]["type"] == "end"


def test_a_replay_repeats_the_same_message_id_and_sequences():
    assert run(scenarios()["tools"]) == run(scenarios()["tools"])


def assembled(out: list[dict]) -> list[tuple[str, str]]:
    """What a client builds from the chunks: each part's kind and full text, the other
    chunks as they are (tool chunks, finish), in order."""
    parts: list[tuple[str, str]] = []
    for c in chunks_of(out):
        kind = c["type"]
        if kind.endswith("-delta") and kind != "tool-input-delta":
            parts[-1] = (parts[-1][0], parts[-1][1] + c["delta"])
        elif kind.endswith("-start") and kind != "tool-input-start":
            parts.append((kind[:-len("-start")], ""))
        elif not kind.endswith("-end"):
            parts.append((kind, json.dumps(c, sort_keys=True)))
    return parts


@pytest.mark.parametrize("name", sorted(scenarios()))
def test_a_merging_mapper_joins_deltas_into_the_same_message(name):
    v1 = scenarios()[name]
    merged = ResponseMapper("r1", "msg_1", merge=True).feed(v1)
    assert assembled(merged) == assembled(run(v1))
    assert [f["sequence"] for f in merged if f["type"] == "chunk"] == \
        list(range(len(chunks_of(merged))))
    assert [f["type"] for f in merged if f["type"] != "chunk"] == \
        [f["type"] for f in run(v1) if f["type"] != "chunk"]


def test_a_replay_of_many_tokens_is_a_few_chunks():
    v1 = [frames.token("s", i, f"w{i} ") for i in range(1, 5001)]
    v1.append(frames.reasoning("s", 5001, "then"))
    v1.append(frames.finish("s", 5002, "completed", "stop", USAGE))
    merged = ResponseMapper("r1", "msg_1", merge=True).feed(v1)
    kinds = [c["type"] for c in chunks_of(merged)]
    assert kinds == ["start", "start-step", "text-start", "text-delta", "text-end",
                     "reasoning-start", "reasoning-delta", "reasoning-end", "finish-step",
                     "finish"]
    assert assembled(merged) == assembled(run(v1))


def test_merged_deltas_stay_under_the_cap():
    v1 = [frames.token("s", i, "x" * 1000) for i in range(1, 101)]
    merged = ResponseMapper("r1", "msg_1", merge=True).feed(v1)
    deltas = [c["delta"] for c in chunks_of(merged) if c["type"] == "text-delta"]
    assert len(deltas) == 4 and "".join(deltas) == "x" * 100_000
    assert all(len(d) <= MAX_MERGED_DELTA_CHARS for d in deltas)


def test_more_holds_the_open_part_text_until_the_frames_that_follow():
    """Fed in writer passes: with more=True the text waits to be joined with the next
    pass's; the pass that reaches the end of what is there emits it."""
    mapper = ResponseMapper("r1", "msg_1", merge=True)
    first = mapper.feed([frames.token("s", 1, "Hel"), frames.token("s", 2, "lo")], more=True)
    assert [c["type"] for c in chunks_of(first)] == ["start", "start-step", "text-start"]
    second = mapper.feed([frames.token("s", 3, " you")], more=False)
    assert chunks_of(second) == [{"type": "text-delta", "id": "t1", "delta": "Hello you"}]
    assert mapper.feed([frames.token("s", 4, "!")], more=True) == []
    assert chunks_of(mapper.flush()) == [{"type": "text-delta", "id": "t1", "delta": "!"}]
    assert mapper.flush() == []


def test_a_merging_mapper_has_no_last_sequence():
    with pytest.raises(ValueError):
        ResponseMapper("r1", "msg_1", merge=True, last_sequence=3)


# ---------------------------------------------------------------- UIMessage -> messages

def ui(role: str, *parts: dict, mid: str = "m") -> UIMessage:
    return UIMessage(id=mid, role=role, parts=list(parts))


def test_text_image_and_file_parts():
    out = to_chat_messages([
        ui("system", {"type": "text", "text": "be brief"}),
        ui("user", {"type": "text", "text": "what is "}, {"type": "text", "text": "this?"}),
        ui("user", {"type": "text", "text": "see"},
           {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"},
           {"type": "file", "mediaType": "application/pdf", "url": "data:application/pdf;base64,BB",
            "filename": "a.pdf"}),
    ])
    assert out[0] == {"role": "system", "content": "be brief"}
    assert out[1] == {"role": "user", "content": "what is this?"}
    assert out[2] == {"role": "user", "content": [
        {"type": "text", "text": "see"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,BB",
                                  "filename": "a.pdf"}}]}


def test_assistant_steps_tool_results_and_no_reasoning():
    out = to_chat_messages([ui(
        "assistant",
        {"type": "step-start"},
        {"type": "reasoning", "text": "secret thoughts"},
        {"type": "text", "text": "Let me look."},
        {"type": "tool-weather", "toolCallId": "c1", "state": "output-available",
         "input": {"city": "Paris"}, "output": {"t": 21}},
        {"type": "dynamic-tool", "toolName": "db", "toolCallId": "c2",
         "state": "output-error", "input": {}, "errorText": "down"},
        {"type": "tool-pending", "toolCallId": "c3", "state": "input-available", "input": {}},
        {"type": "step-start"},
        {"type": "text", "text": "It is sunny."},
    )])
    assert out == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "db", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"t":21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "Error: down"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    assert "secret" not in json.dumps(out)


def test_messages_with_nothing_to_send_are_refused():
    with pytest.raises(ValueError):
        to_chat_messages([ui("assistant", {"type": "reasoning", "text": "x"})])


# ---------------------------------------------------------------- decode_request

def send(**over) -> str:
    frame = {"type": "send", "requestId": "r1", "id": "chat", "trigger": "submit-message",
             "messageId": None, "headers": {}, "body": {}, "metadata": None,
             "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}]}]}
    frame.update(over)
    return json.dumps(frame)


def test_decode_send_resume_abort():
    assert isinstance(decode_request(send()), SendRequest)
    assert decode_request('{"type": "abort", "requestId": "r1"}').requestId == "r1"
    resume = decode_request('{"type": "resume", "requestId": "q", "id": "c", "headers": {},'
                            ' "body": {}, "lastSequence": 4}')
    assert resume.lastSequence == 4


@pytest.mark.parametrize("data, request_id", [
    ("nope", None), ("[]", None), ('{"type": "send"}', None),
    ('{"type": "bogus", "requestId": "r1"}', "r1"),
    (send(trigger="shout"), "r1"), (send(messages=[]), "r1"),
    (send(headers={"a": 1}), "r1"), (send(requestId="a\nb"), None),
    # a requestId becomes a v1 stream id: the same rule (no C1 controls, no line separators)
    (send(requestId="a\x97b"), None), (send(requestId="a\u2028b"), None),
    ('{"type": ["send"], "requestId": "r1"}', "r1"), ('{"type": {}, "requestId": "r1"}', "r1"),
    ('{"type": "resume", "requestId": "q", "id": "c", "headers": {}, "body": {},'
     ' "lastSequence": -1}', "q"),
])
def test_bad_requests_name_their_request_when_they_can(data, request_id):
    with pytest.raises(AiSdkFrameError) as info:
        decode_request(data)
    assert info.value.request_id == request_id and info.value.message


def test_counts_are_refused_before_validation():
    many = [{"id": str(i), "role": "user", "parts": []} for i in range(2001)]
    with pytest.raises(AiSdkFrameError, match=r"2001 messages; .* \(max_messages\)"):
        decode_request(send(messages=many))
    parts = [{"id": "u", "role": "user", "parts": [{"type": "text", "text": ""}] * 4001}]
    with pytest.raises(AiSdkFrameError, match=r"4001 content parts; .* \(max_content_parts\)"):
        decode_request(send(messages=parts))


class ModelSpy:
    """Stands in for a request model of llm_relay_protocol.aisdk; counts validations."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0

    def model_validate(self, obj):
        self.calls += 1
        return self.real.model_validate(obj)


@pytest.fixture
def spied(monkeypatch) -> dict:
    import llm_relay_protocol.aisdk as aisdk

    spies = {name: ModelSpy(model) for name, model in aisdk._MODELS.items()}
    monkeypatch.setattr(aisdk, "_MODELS", spies)
    return spies


SMALL = DecodeLimits(max_messages_bytes=4096, max_messages=5, max_tools=2,
                     max_content_parts=4, max_start_keys=40, max_json_depth=8,
                     max_json_containers=200)
USER = {"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}]}


@pytest.mark.parametrize(("frame", "limit"), [
    (send(messages=[USER] * 6), "max_messages"),
    (send(messages=[{**USER, "parts": USER["parts"] * 5}]), "max_content_parts"),
    (send(messages=[{**USER, "parts": [{"type": "text", "text": "x" * 5000}]}]),
     "max_messages_bytes"),
    (send(body={"tools": [{"type": "function", "function": {"name": f"t{i}"}}
                          for i in range(3)]}), "max_tools"),
    (send(headers={f"h{i}": "v" for i in range(40)}), "max_start_keys"),
    (send(body={f"k{i}": i for i in range(40)}), "max_start_keys"),
    (send(messages=[{**USER, "parts": [{f"k{i}": i for i in range(40)}]}]), "max_start_keys"),
    (json.dumps({"type": "resume", "requestId": "r1", "id": "c", "headers": {},
                 "body": {f"k{i}": i for i in range(41)}}), "max_start_keys"),
])
def test_a_request_beyond_a_v1_limit_is_refused_before_validation(frame, limit, spied):
    """The checks of a v1 ``start`` (codec.check_request_shape), on the raw request:
    UIMessage parts count as content parts, ``body.tools`` as tools, ``headers`` and
    ``body`` as objects validated key by key."""
    with pytest.raises(AiSdkFrameError) as info:
        decode_request(frame, SMALL)
    assert info.value.request_id == "r1"
    assert info.value.message.startswith("Invalid request: ")
    assert info.value.message.endswith(f"({limit})")
    assert sum(spy.calls for spy in spied.values()) == 0, "validated before the limits"
    # (and the spy sees a validation: one at the limits passes them)
    assert isinstance(decode_request(send(messages=[USER] * 4), SMALL), SendRequest)
    assert spied["send"].calls == 1
