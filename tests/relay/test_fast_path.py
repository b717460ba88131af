"""The fast path against the LiteLLM path: every fake-upstream scenario, both formats, both
paths, through the whole relay (client -> relay -> fake provider), identical frames.

Each test runs one scenario twice against the same loopback fake: once through an alias with
``fast = false`` (LiteLLM's real openai/ and anthropic/ provider code) and once through the
same alias on the fast path, and asserts the frames are equal (text, reasoning, tool calls
byte-exact, usage and its ``estimated`` flag, finish status/reason, error codes and messages,
``seq``), that the provider received the same request body, and that the upstream connection
was closed (or not) the same way. Only what names the run is left out (stream id, alias,
``started.stream_key``), and consecutive token frames are compared joined, as the relay's
writer joins them when it runs late (``relay/core/streamlog.py::coalesce``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import (
    DIALECTS, FakeUpstream, Script, SSEEvent, Usage, http_error, stream, tool_call, wire_format,
)

from .helpers import Client, start_relay, text_of

#: The two formats, and the OpenAI-format providers whose wire (and LiteLLM's reading of it)
#: has quirks of its own: each against a fake speaking that provider's dialect.
FORMATS = ["openai", "anthropic", *DIALECTS]
#: Providers LiteLLM reads with its own HTTP line reader instead of the OpenAI SDK.
LINE_READ = ("groq", "openrouter")
#: LiteLLM model strings of the flavours (the fake answers whatever model is asked).
MODELS = {"openai": "openai/gpt-x", "anthropic": "anthropic/claude-x",
          "groq": "groq/openai/gpt-oss-20b", "openrouter": "openrouter/openai/gpt-4o-mini",
          "azure": "azure/gpt-x-deployment"}
PATHS = ["litellm", "fast"]
KEY = "sk-test-SECRET-do-not-leak-0123456789"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {}}}]


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


def alias(fmt: str, path: str) -> str:
    return f"{fmt}-{path}"


def api_base(up: FakeUpstream, fmt: str) -> str:
    return {"anthropic": up.anthropic_base, "azure": up.azure_base}.get(fmt, up.openai_base)


def is_openai(fmt: str) -> bool:
    return wire_format(fmt) == "openai"


def registry_for(up: FakeUpstream, **timeouts: float) -> ModelRegistry:
    defaults = Timeouts(**{"first_token": 10.0, "idle": 10.0, "total": 30.0, **timeouts})
    models = {}
    for fmt in FORMATS:
        for path in PATHS:
            models[alias(fmt, path)] = {
                "model": MODELS[fmt], "api_base": api_base(up, fmt),
                "api_key_env": "FAKE_PROVIDER_KEY", "fast": path == "fast"}
    return ModelRegistry(load_models({"models": models}, defaults))


@contextlib.asynccontextmanager
async def relay_with_upstream(**timeouts: float):
    async with FakeUpstream() as up:
        registry = registry_for(up, **timeouts)
        for fmt in FORMATS:  # the premise of every comparison below
            assert registry.resolve(alias(fmt, "fast")).path.path == "fast"
            assert registry.resolve(alias(fmt, "litellm")).path.path == "litellm"
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as client:
                yield up, client


def comparable(frames: list[dict]) -> list[dict]:
    """Frames without what names the run (the stream id, the alias, the random stream_key),
    with every run of consecutive token frames joined as the relay's writer may join them
    (text concatenated, last seq: lossless, and depends only on when the writer ran)."""
    out: list[dict] = []
    for frame in frames:
        frame = {k: v for k, v in frame.items() if k not in ("id", "stream_key", "model")}
        if frame["type"] == "token" and out and out[-1]["type"] == "token":
            out[-1] = {**frame, "text": out[-1]["text"] + frame["text"]}
        else:
            out.append(frame)
    return out


async def both_paths(fmt: str, script, *, action=None, timeouts: dict | None = None,
                     **start_fields) -> list[tuple[list[dict], object]]:
    """Run ``script`` through the LiteLLM path, then the fast path; return
    ``[(frames, recorded_request), ...]`` in that order. ``action(client, up, request)`` runs
    after ``started`` (e.g. a cancel)."""
    results = []
    async with relay_with_upstream(**(timeouts or {})) as (up, c):
        if timeouts:
            # One stream per path first: the LiteLLM path's first request in a process sets
            # up clients and tokenizers, which can outlast a short first-token timer before
            # anything is sent.
            for path in PATHS:
                up.enqueue(stream(fmt, ["warm"]))
                await c.start(f"warm-{path}", model=alias(fmt, path))
                await c.collect(f"warm-{path}")  # may itself time out, but warms up
                up._queue.clear()
        for path in PATHS:
            before = len(up.requests)
            up.enqueue(script)
            sid = f"s-{path}"
            await c.start(sid, model=alias(fmt, path), **start_fields)
            frames = []
            if action is not None:
                frames.append(await c.next_for(sid))
                assert frames[0]["type"] == "started", frames
                await action(c, sid, await up.wait_request(before + 1))
            frames += await c.collect(sid)
            assert len(up.requests) <= before + 1  # no retries on either path
            request = up.requests[before] if len(up.requests) > before else None
            if request is None:
                up._queue.clear()  # the script nobody asked for
            elif request.disconnected_at is None and not request.completed:
                with contextlib.suppress(TimeoutError):  # a close in flight: let it land
                    await request.wait_disconnected(timeout=1.0)
            results.append((frames, request))
    return results


def assert_same(results, *, closed: bool | None = None) -> list[dict]:
    (slow_frames, slow_req), (fast_frames, fast_req) = results
    assert comparable(fast_frames) == comparable(slow_frames)
    assert (fast_req is None) == (slow_req is None), "only one path called the provider"
    if fast_req is None:
        return fast_frames
    assert fast_req.json == slow_req.json, "the provider got a different request body"
    assert fast_req.path == slow_req.path and fast_req.query == slow_req.query
    for name in ("Authorization", "x-api-key", "api-key", "HTTP-Referer", "X-Title"):
        assert fast_req.headers.get(name) == slow_req.headers.get(name), name
    for req in (slow_req, fast_req):
        assert (req.disconnected_at is not None) == (slow_req.disconnected_at is not None)
        if closed is not None:
            assert (req.disconnected_at is not None) is closed
    return fast_frames


def of_type(frames: list[dict], kind: str) -> list[dict]:
    return [f for f in frames if f["type"] == kind]


# ------------------------------------------------------------------------- completed streams


@pytest.mark.parametrize("fmt", FORMATS)
async def test_text_reasoning_and_provider_usage(fmt):
    script = stream(fmt, ["Hel", "lo ", "wör", "ld ✓"], reasoning=["Let me ", "think."],
                    usage=Usage(17, 23))
    frames = assert_same(await both_paths(fmt, script, params={"temperature": 0.3,
                                                               "max_tokens": 99}))
    assert text_of(frames) == script.text
    assert "".join(f["text"] for f in of_type(frames, "reasoning")) == script.reasoning
    assert frames[-1]["usage"] == {"prompt_tokens": 17, "completion_tokens": 23,
                                   "total_tokens": 40, "estimated": False}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_no_provider_usage_gives_the_same_estimate(fmt):
    script = stream(fmt, ["some ", "answer ", "text"], usage=None)
    frames = assert_same(await both_paths(fmt, script))
    assert frames[-1]["usage"]["estimated"] is True


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_calls", [1, 2])
async def test_parallel_tool_calls_byte_exact(fmt, n_calls):
    calls = [tool_call("get_weather", {"city": "Paris", "unit": "celsius"}),
             tool_call("get_time", {"tz": "Europe/Paris", "fmt": "%H:%M \"q\""})][:n_calls]
    script = stream(fmt, [] if is_openai(fmt) else ["Checking."], tool_calls=calls)
    frames = assert_same(await both_paths(fmt, script, tools=TOOLS, tool_choice="auto"))
    complete = of_type(frames, "tool_call_complete")
    assert [(f["call_id"], f["name"], f["arguments"]) for f in complete] == [
        (c.id, c.name, c.arguments) for c in calls]
    assert frames[-1]["reason"] == "tool_calls"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_call_without_arguments(fmt):
    script = stream(fmt, [], tool_calls=[tool_call("get_time", "", pieces=[""])])
    frames = assert_same(await both_paths(fmt, script, tools=TOOLS))
    assert len(of_type(frames, "tool_call_complete")) == 1


@pytest.mark.parametrize(("fmt", "reason"), [
    *[(fmt, reason) for fmt in ("openai", *DIALECTS)
      for reason in ("length", "content_filter", "stop", "abort", "error")],
    ("anthropic", "max_tokens"), ("anthropic", "stop_sequence"), ("anthropic", "end_turn"),
])
async def test_finish_reasons(fmt, reason):
    """Including the two with which LiteLLM fails a stream: ``abort`` (vLLM; not on
    OpenRouter's parser) and ``error`` (the OpenAI SDK path only)."""
    key = "finish_reason" if is_openai(fmt) else "stop_reason"
    frames = assert_same(await both_paths(fmt, stream(fmt, ["a", "b"], **{key: reason})))
    fails = (reason == "abort" and fmt != "openrouter"
             or reason == "error" and fmt not in LINE_READ)
    assert frames[-1]["status"] == ("failed" if fails else "completed")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_round_trip_request_is_built_the_same(fmt):
    call = tool_call("get_weather", {"city": "Paris"})
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    params = {"temperature": 0, "stop": ["\n\n"], "top_p": 0.5, "max_tokens": 300}
    if fmt in ("openai", "openrouter", "azure"):  # (LiteLLM fakes Groq streams with it)
        params.update(seed=3, presence_penalty=0.1, frequency_penalty=0.2,
                      response_format={"type": "json_object"})
    frames = assert_same(await both_paths(fmt, stream(fmt, ["It is 21 C."]),
                                          messages=messages, tools=TOOLS, params=params))
    assert frames[-1]["status"] == "completed"


async def test_param_the_provider_does_not_take_fails_the_same_without_a_request():
    """LiteLLM refuses ``seed`` for Anthropic before sending anything; so does the fast path
    (it uses LiteLLM's parameter mapping)."""
    frames = assert_same(await both_paths("anthropic", stream("anthropic", ["x"]),
                                          params={"seed": 3}))
    assert frames[-1]["error"]["code"] == "bad_request"


async def test_anthropic_response_format_goes_through_litellm():
    """LiteLLM turns ``response_format`` into a tool for Anthropic and the tool call back into
    text; the fast path leaves such a request to LiteLLM (``FastRoute.accepts``)."""
    script = stream("anthropic", [], tool_calls=[tool_call("json_tool_call", {"a": 1})])
    frames = assert_same(await both_paths("anthropic", script, params={
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}))
    assert frames[-1]["status"] == "completed"


# ------------------------------------------------------------------------- wire quirks
#
# Shapes found by independent fakes (issue 21's table): each one's right answer on both paths.


def openai_chunk(delta: dict, finish: str | None = None) -> SSEEvent:
    """One ``chat.completion.chunk`` as every OpenAI-format provider writes it (the fields
    OpenRouter's parser requires included)."""
    return SSEEvent(json.dumps({
        "id": "chatcmpl-quirk", "object": "chat.completion.chunk", "created": 1,
        "model": "gpt-x", "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                       "finish_reason": finish}]}, separators=(",", ":")))


def openai_script(deltas: list[dict], finish: str) -> Script:
    events = [openai_chunk({"role": "assistant", "content": None}),
              *(openai_chunk(d) for d in deltas), openai_chunk({}, finish), SSEEvent("[DONE]")]
    return Script(format="openai", events=tuple(events), finish_reason=finish)


def call_delta(call_id: str | None = None, name: str | None = None, args: str | None = None,
               index: int | None = None) -> dict:
    entry: dict = {}
    if index is not None:
        entry["index"] = index
    if call_id is not None:
        entry.update(id=call_id, type="function")
    function = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    entry["function"] = function
    return entry


W1, W2, W3 = '{"location": "Par', 'is, F', 'rance"}'
PARIS = W1 + W2 + W3
TIME = '{"tz": "Europe/Paris"}'

#: tool-call deltas (each a list of tool_calls entries) -> the calls a client must get.
INDEXLESS_TOOL_CALLS = {
    # Gemini's OpenAI-compatible endpoint: one call's arguments over 3 deltas, no index.
    "one_call_over_three_deltas": (
        [[call_delta("call_a", "get_weather", W1)], [call_delta(args=W2)],
         [call_delta(args=W3)]],
        [("call_a", "get_weather", PARIS)]),
    "two_complete_calls_one_delta_each": (
        [[call_delta("call_a", "get_weather", PARIS)], [call_delta("call_b", "get_time", TIME)]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
    "two_calls_in_one_delta": (
        [[call_delta("call_a", "get_weather", PARIS), call_delta("call_b", "get_time", TIME)]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
    # no id and no index continues the last call (call_b), not the first
    "two_calls_in_one_delta_then_the_last_continues": (
        [[call_delta("call_a", "get_weather", PARIS), call_delta("call_b", "get_time", TIME[:9])],
         [call_delta(args=TIME[9:])]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
    # the same id on every delta continues its call; a new id starts the next
    "id_repeated_on_every_delta": (
        [[call_delta("call_a", "get_weather", W1)], [call_delta("call_a", args=W2 + W3)],
         [call_delta("call_b", "get_time", TIME)]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
    # split calls one after the other, no index anywhere
    "two_split_calls": (
        [[call_delta("call_a", "get_weather", W1)], [call_delta(args=W2 + W3)],
         [call_delta("call_b", "get_time", TIME[:5])], [call_delta(args=TIME[5:])]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
    # a server that numbers every call 0: a new id is a new call
    "index_zero_repeated_with_new_ids": (
        [[call_delta("call_a", "get_weather", PARIS, index=0)],
         [call_delta("call_b", "get_time", TIME, index=0)]],
        [("call_a", "get_weather", PARIS), ("call_b", "get_time", TIME)]),
}


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
@pytest.mark.parametrize("shape", INDEXLESS_TOOL_CALLS)
async def test_tool_call_deltas_without_index(fmt, shape):
    """The same id continues its call, a new id starts a new call, no id and no index
    continues the last call: the right calls on both paths."""
    deltas, expected = INDEXLESS_TOOL_CALLS[shape]
    script = openai_script([{"tool_calls": entries} for entries in deltas], "tool_calls")
    frames = assert_same(await both_paths(fmt, script, tools=TOOLS))
    complete = of_type(frames, "tool_call_complete")
    assert [(f["call_id"], f["name"], f["arguments"]) for f in complete] == expected
    assert [f["index"] for f in complete] == list(range(len(expected)))
    assert frames[-1]["reason"] == "tool_calls"
    chunks = of_type(frames, "tool_call_chunk")
    for call_id, _name, arguments in expected:
        assert "".join(f["arguments_delta"] for f in chunks
                       if f["call_id"] == call_id) == arguments


REFUSAL = ["I'm sorry", ", I can't", " help with that."]


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
@pytest.mark.parametrize(("finish", "reason"), [("stop", "content_filter"),
                                                ("length", "length")])
async def test_refusal_reaches_the_client(fmt, finish, reason):
    """OpenAI's structured-output refusal (``delta.refusal``): ``refusal`` frames with the
    text as streamed, no answer text, and a finish that says why (``content_filter`` for
    the provider's "stop", else the provider's reason)."""
    deltas = [{"content": None, "refusal": ""}, *({"refusal": piece} for piece in REFUSAL)]
    frames = assert_same(await both_paths(fmt, openai_script(deltas, finish), params={
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {}}}}}
        if fmt not in ("groq",) else {}))
    refusals = of_type(frames, "refusal")
    assert [f["text"] for f in refusals] == REFUSAL
    assert text_of(frames) == ""
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", reason)
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(len(frames)))


async def _refusal_then_cancel(c: Client, sid: str, request) -> None:
    frame = await c.next_for(sid)
    assert (frame["type"], frame["text"]) == ("refusal", REFUSAL[0])
    c._stash[sid].insert(0, frame)
    await c.send({"type": "cancel", "id": sid})


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
async def test_refusal_is_relayed_as_it_streams(fmt):
    """The provider sends the first refusal piece and then nothing: that piece reaches the
    client at once on both paths (LiteLLM's wrapper would hold a refusal-only chunk until
    the next chunk with content)."""
    deltas = [{"content": None, "refusal": ""}, *({"refusal": piece} for piece in REFUSAL)]
    script = openai_script(deltas, "stop").silent_after(3)  # role, "", first piece
    frames = assert_same(await both_paths(fmt, script, action=_refusal_then_cancel),
                         closed=True)
    assert [f["text"] for f in of_type(frames, "refusal")] == REFUSAL[:1]
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("cancelled", "client_cancel")


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def thinking_part(*texts: str) -> dict:
    """Mistral's (Magistral's) reasoning part: its text as a list of text parts."""
    return {"type": "thinking", "thinking": [text_part(t) for t in texts], "closed": True}


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
async def test_content_as_text_parts(fmt):
    """``delta.content`` as an array of text parts (Mistral's OpenAI-compatible wire): each
    part is answer text, the parts of one chunk joined."""
    deltas = [{"content": [text_part("Hel"), text_part("lo")]},
              {"content": [text_part(", world")]}, {"content": "!"}]
    frames = assert_same(await both_paths(fmt, openai_script(deltas, "stop")))
    assert text_of(frames) == "Hello, world!"
    assert of_type(frames, "reasoning") == []
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "stop")


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
async def test_content_parts_thinking_then_text(fmt):
    """Magistral's stream: ``thinking`` parts are reasoning, ``text`` parts the answer; a
    chunk with both gives its reasoning first (as LiteLLM's ``mistral/`` provider reads it),
    and the answer text is never lost (the golden transcript's "3" of "391")."""
    deltas = [{"content": ""},
              {"content": [thinking_part("17 * 23")]},
              {"content": [thinking_part(" = 39", "1.")]},
              {"content": [thinking_part(" Done."), text_part("3")]},
              {"content": "91"}]
    frames = assert_same(await both_paths(fmt, openai_script(deltas, "stop")))
    kinds = [f["type"] for f in frames if f["type"] in ("reasoning", "token")]
    assert kinds == ["reasoning"] * 3 + ["token"] * kinds.count("token"), kinds
    assert "".join(f["text"] for f in of_type(frames, "reasoning")) == "17 * 23 = 391. Done."
    assert text_of(frames) == "391"
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "stop")


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
async def test_content_parts_of_unknown_types_are_ignored(fmt):
    """Part types other than ``text`` and ``thinking`` (a reference, an image, a part with
    no type) carry nothing the relay shows: skipped, the stream goes on."""
    deltas = [{"content": [{"type": "reference", "reference_ids": [1, 2]}, text_part("A")]},
              {"content": [{"type": "image_url", "image_url": {"url": "x"}}]},
              {"content": [{"text": "untyped"}, text_part("B"),
                           {"type": "thinking", "thinking": [{"type": "image"}]}]}]
    frames = assert_same(await both_paths(fmt, openai_script(deltas, "stop")))
    assert text_of(frames) == "AB"
    assert of_type(frames, "reasoning") == []
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "stop")


#: Content-part arrays of the wrong shape: each fails the stream as a wrong-shaped event.
WRONG_CONTENT_PARTS = {
    "part_not_an_object": ["abc"],
    "text_not_a_string": [{"type": "text", "text": 5}],
    "thinking_not_a_list": [{"type": "thinking", "thinking": "abc"}],
    "thinking_text_not_a_string": [{"type": "thinking", "thinking": [{"type": "text",
                                                                      "text": ["x"]}]}],
    "nested_lists": [[text_part("x")]],
}


@pytest.mark.parametrize("fmt", ["openai", *DIALECTS])
@pytest.mark.parametrize("shape", WRONG_CONTENT_PARTS)
async def test_content_parts_of_the_wrong_shape_fail_as_upstream_error(fmt, shape):
    """A part list of the wrong shape is the provider's doing: the stream fails with
    ``upstream_error`` after the text before it, never ``internal_error``."""
    deltas = [{"content": "before"}, {"content": WRONG_CONTENT_PARTS[shape]},
              {"content": "after"}]
    frames = assert_same(await both_paths(fmt, openai_script(deltas, "stop")))
    assert text_of(frames) == "before"
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("failed", "upstream_error")
    assert frames[-1]["error"]["message"] == "the provider's stream failed (cut off or malformed)"


async def test_anthropic_refusal_stop_reason_is_content_filter():
    """Anthropic's refusal is a stop reason (the text before it is the answer's)."""
    frames = assert_same(await both_paths("anthropic", stream("anthropic", ["I can", "not."],
                                                               stop_reason="refusal")))
    assert text_of(frames) == "I cannot."
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "content_filter")


def anthropic_tool_script(blocks: list[tuple[str, str, dict, list[str] | None]]) -> Script:
    """An Anthropic stream of ``tool_use`` blocks ``(id, name, start input, partial_json
    pieces or None for no delta at all)``, as third-party Anthropic-compatible servers
    write them."""
    def ev(name: str, body: dict) -> SSEEvent:
        return SSEEvent(json.dumps({"type": name, **body}, separators=(",", ":")), event=name)

    events = [ev("message_start", {"message": {
        "id": "msg_q", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 1}}})]
    for n, (call_id, name, start_input, pieces) in enumerate(blocks):
        events.append(ev("content_block_start", {"index": n, "content_block": {
            "type": "tool_use", "id": call_id, "name": name, "input": start_input}}))
        for piece in pieces or ():
            events.append(ev("content_block_delta", {"index": n, "delta": {
                "type": "input_json_delta", "partial_json": piece}}))
        events.append(ev("content_block_stop", {"index": n}))
    events.append(ev("message_delta", {"delta": {"stop_reason": "tool_use",
                                                 "stop_sequence": None},
                                       "usage": {"output_tokens": 7}}))
    events.append(ev("message_stop", {}))
    return Script(format="anthropic", events=tuple(events), finish_reason="tool_use")


ANTHROPIC_TOOL_INPUTS = {
    "input_whole_in_start": (
        [("toolu_a", "get_weather", {"city": "Paris", "unit": "C"}, None)],
        [("toolu_a", "get_weather", '{"city": "Paris", "unit": "C"}')]),
    "input_whole_in_start_then_an_empty_delta": (
        [("toolu_a", "get_weather", {"city": "Paris"}, [""])],
        [("toolu_a", "get_weather", '{"city": "Paris"}')]),
    "empty_input_and_no_delta": (
        [("toolu_a", "get_time", {}, None)],
        [("toolu_a", "get_time", "{}")]),
    "whole_then_streamed": (
        [("toolu_a", "get_weather", {"city": "Paris"}, None),
         ("toolu_b", "get_time", {}, ["", '{"tz": ', '"UTC"}'])],
        [("toolu_a", "get_weather", '{"city": "Paris"}'),
         ("toolu_b", "get_time", '{"tz": "UTC"}')]),
}


@pytest.mark.parametrize("shape", ANTHROPIC_TOOL_INPUTS)
async def test_anthropic_tool_input_in_content_block_start(shape):
    """A ``tool_use`` block whose input comes whole in ``content_block_start`` (no
    ``input_json_delta`` with content): its arguments are that input, JSON-serialised."""
    blocks, expected = ANTHROPIC_TOOL_INPUTS[shape]
    frames = assert_same(await both_paths("anthropic", anthropic_tool_script(blocks),
                                          tools=TOOLS))
    complete = of_type(frames, "tool_call_complete")
    assert [(f["call_id"], f["name"], f["arguments"]) for f in complete] == expected
    for _id, _name, arguments in expected:
        json.loads(arguments)
    assert frames[-1]["reason"] == "tool_calls"


# ------------------------------------------------------------------------- failures


ERRORS = [400, 401, 403, 404, 422, 429, 500, 503]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("status", ERRORS + [529])
async def test_http_errors_same_code_message_and_retry_after(fmt, status, caplog):
    script = http_error(fmt, status, retry_after=7 if status in (429, 503) else None,
                        message=f"invalid key {KEY} body-echo-marker")
    with caplog.at_level(logging.DEBUG, logger="relay"):
        frames = assert_same(await both_paths(fmt, script))
    assert not [r for r in caplog.records
                if r.name.startswith("relay") and KEY in r.getMessage()]
    assert [f["type"] for f in frames] == ["started", "finish"]
    assert frames[-1]["status"] == "failed"
    assert KEY not in str(frames) and "body-echo-marker" not in str(frames)
    if status == 429:
        assert frames[-1]["error"]["retry_after"] == 7


#: The provider's own "overloaded" answers: Anthropic's 529 (``overloaded_error``), OpenAI's
#: 503 "The engine is currently overloaded" (the fakes' bodies for these statuses).
OVERLOADED = [("anthropic", 529), *[(fmt, 503) for fmt in ("openai", "groq")]]


@pytest.mark.parametrize(("fmt", "status"), OVERLOADED)
@pytest.mark.parametrize("retry_after", [None, 7])
async def test_overloaded_is_its_own_retryable_answer(fmt, status, retry_after):
    """Not "the provider failed (HTTP 500)": ``upstream_overloaded``, saying so, with the
    provider's Retry-After when it gave one; the same on both paths."""
    frames = assert_same(await both_paths(fmt, http_error(fmt, status,
                                                          retry_after=retry_after)))
    error = frames[-1]["error"]
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("failed", "upstream_overloaded")
    assert error["code"] == "upstream_overloaded" and "overloaded" in error["message"]
    assert error.get("retry_after") == retry_after


async def test_anthropic_overloaded_error_event_mid_stream():
    base = stream("anthropic", ["a", "b", "c"])
    events = list(base.events)
    events.insert(4, SSEEvent('{"type":"error","error":{"type":"overloaded_error",'
                              '"message":"Overloaded"}}', event="error"))
    frames = assert_same(await both_paths("anthropic",
                                          dataclasses.replace(base, events=tuple(events))))
    assert text_of(frames) == "a"
    assert frames[-1]["error"]["code"] == "upstream_overloaded"
    assert "overloaded" in frames[-1]["error"]["message"]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_rate_limit_default_retry_after(fmt):
    frames = assert_same(await both_paths(fmt, http_error(fmt, 429)))
    assert frames[-1]["error"]["retry_after"] == 20


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fault", ["cut", "cut_reset", "cut_before_end", "malformed",
                                   "malformed_first"])
async def test_cut_or_malformed_stream(fmt, fault):
    base = stream(fmt, ["a", "b", "c", "d"])
    last = len(base.events) - 1  # OpenAI: before [DONE]; Anthropic: before message_stop
    script = {"cut": base.cut_after(4), "cut_reset": base.cut_after(4, reset=True),
              "cut_before_end": base.cut_after(last), "malformed": base.malformed_at(4),
              "malformed_first": base.malformed_at(0)}[fault]
    frames = assert_same(await both_paths(fmt, script))
    assert frames[-1]["status"] in ("failed", "completed")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("end", ["eof", "done"])
async def test_stream_without_a_finish_reason(fmt, end):
    """The provider's stream ends (cleanly, or OpenAI's ``[DONE]``) without ever saying it
    finished: no finish_reason chunk / no ``message_delta``."""
    base = stream(fmt, ["a", "b"])
    if is_openai(fmt):
        keep = [e for e in base.events if '"finish_reason":"stop"' not in e.data]
        if end == "eof":
            keep = [e for e in keep if e.data != "[DONE]"]
    else:
        keep = [e for e in base.events if e.event not in ("message_delta", "message_stop")]
    frames = assert_same(await both_paths(fmt, dataclasses.replace(base, events=tuple(keep))))
    assert text_of(frames) == "ab"
    if fmt in LINE_READ and end == "done":
        # LiteLLM's line reader (Groq, OpenRouter) takes [DONE] itself as a "stop".
        assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "stop")
    else:
        assert frames[-1]["status"] == "failed"


#: Errors inside an OpenAI-format stream, as the providers send them: a bare ``error``
#: object (vLLM/sglang, Groq), one with a numeric HTTP-like ``code``, and OpenRouter's chunk
#: (``id``..., ``error`` with a string ``code``, a choice finishing with ``error``).
OPENAI_STREAM_ERRORS = {
    "bare": '{"error":{"message":"boom sk-secret","type":"server_error"}}',
    "code_429": '{"error":{"message":"slow down sk-secret","code":429}}',
    "code_502": '{"error":{"message":"upstream sk-secret","code":502,"metadata":{}}}',
    "openrouter": '{"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m",'
                  '"provider":"FakeCloud","error":{"code":"server_error","message":'
                  '"Provider disconnected sk-secret"},"choices":[{"index":0,"delta":'
                  '{"content":""},"finish_reason":"error"}]}',
    "overloaded": '{"error":{"message":"The server is currently overloaded sk-secret",'
                  '"type":"server_error"}}',
    # not an error: a chunk whose choice has no delta (OpenRouter's parser rejects it)
    "no_delta": '{"id":"gen-1","object":"chat.completion.chunk","created":1,"model":"m",'
                '"choices":[{"index":0,"finish_reason":null}]}',
}


@pytest.mark.parametrize(("fmt", "variant"), [
    *[(fmt, "bare") for fmt in FORMATS],
    *[(fmt, variant) for fmt in ("openai", *DIALECTS)
      for variant in OPENAI_STREAM_ERRORS if variant not in ("bare", "no_delta")],
    ("openrouter", "no_delta"),
])
async def test_error_event_mid_stream(fmt, variant):
    """The provider reports an error inside the stream (OpenAI: a chunk with ``error``;
    Anthropic: ``event: error``) after the first token."""
    base = stream(fmt, ["a", "b", "c"])
    error = (SSEEvent(OPENAI_STREAM_ERRORS[variant])
             if is_openai(fmt) else
             SSEEvent('{"type":"error","error":{"type":"overloaded_error",'
                      '"message":"Overloaded sk-secret"}}', event="error"))
    at = base.lead + (2 if is_openai(fmt) else 4)
    events = list(base.events)
    events.insert(at, error)
    frames = assert_same(await both_paths(fmt, dataclasses.replace(base, events=tuple(events))))
    assert frames[-1]["status"] == "failed" and "sk-secret" not in str(frames)
    if variant == "overloaded" and fmt in ("openai", "azure"):  # (the OpenAI SDK's reading)
        assert frames[-1]["error"]["code"] == "upstream_overloaded"


# ------------------------------------------------------------------------- timers and cancel


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("kind", "timeouts"), [
    ("before_headers", {"first_token": 0.3}),
    ("after_headers", {"first_token": 0.3}),
    ("mid_stream", {"idle": 0.3}),
    ("mid_stream", {"total": 0.4}),
])
async def test_timeouts_same_frames_and_upstream_closed(fmt, kind, timeouts):
    script = stream(fmt, ["a", "b", "c"])
    if kind == "before_headers":
        script = script.silent_before_headers()
    elif kind == "after_headers":
        script = script.silent_after(0)
    else:  # the first text delta is out, then silence
        script = script.silent_after(script.lead + (3 if is_openai(fmt) else 4))
    frames = assert_same(await both_paths(fmt, script, timeouts=timeouts), closed=True)
    assert frames[-1]["status"] == "timeout"


@pytest.mark.parametrize(("fmt", "kind"), [
    *[(fmt, "event") for fmt in FORMATS],
    ("openrouter", "comment"),
    ("azure", "filter_results"),
    ("azure", "async_filter"),
    *[(fmt, "empty_choices") for fmt in ("openai", *DIALECTS)],
    *[(fmt, "no_choices") for fmt in ("openai", "groq", "azure")],
])
async def test_keepalive_events_and_the_idle_timer(fmt, kind):
    """Events without content after the first token, paced past the idle timeout, count the
    same on both paths: Anthropic pings, OpenAI chunks with an empty delta, Azure's
    asynchronous-filter annotations and OpenRouter's ``: OPENROUTER PROCESSING`` comments do
    not restart the idle timer (the stream times out); chunks without ``choices`` (Azure's
    filter results, usage-style chunks) do, because LiteLLM's wrapper hands them on."""
    base = stream(fmt, ["a", "b"])
    if kind == "comment":
        keepalive = SSEEvent("OPENROUTER PROCESSING", comment=True)
    elif kind == "filter_results":
        keepalive = base.events[0]
    elif kind == "empty_choices":
        keepalive = SSEEvent('{"id":"x","object":"chat.completion.chunk","created":1,'
                             '"model":"gpt-x","choices":[]}')
    elif kind == "no_choices":
        keepalive = SSEEvent('{"id":"x","object":"chat.completion.chunk","created":1,'
                             '"model":"gpt-x"}')
    elif kind == "async_filter":  # Azure's asynchronous filter: an annotation, no delta
        keepalive = SSEEvent('{"id":"x","object":"chat.completion.chunk","created":1,'
                             '"model":"gpt-x","choices":[{"index":0,"finish_reason":null,'
                             '"content_filter_results":{"hate":{"filtered":false,'
                             '"severity":"safe"}},"content_filter_offsets":{'
                             '"check_offset":0,"start_offset":0,"end_offset":1}}]}')
    elif not is_openai(fmt):
        keepalive = SSEEvent('{"type": "ping"}', event="ping")
    else:
        keepalive = SSEEvent('{"id":"x","object":"chat.completion.chunk","created":1,'
                             '"model":"gpt-x","choices":[{"index":0,"delta":{},'
                             '"finish_reason":null}]}')
    # index of the event after the first text delta
    first_text = base.lead + (2 if is_openai(fmt) else 4)
    events = list(base.events)
    # 12 events 50 ms apart: 0.6 s between "a" and "b", past the 0.5 s idle timeout. Where
    # the events restart the timer, only a stall of the whole loop of 0.45 s or more could
    # end the stream early (it was 0.25 s with events 0.1 s apart and 0.35 s of idle time);
    # where they do not, "b" cannot come before the timeout whatever the load.
    events[first_text:first_text] = [keepalive] * 12
    script = dataclasses.replace(base, events=tuple(events)).with_delay(0.05)
    if kind in ("filter_results", "empty_choices", "no_choices"):
        frames = assert_same(await both_paths(fmt, script, timeouts={"idle": 0.5}))
        assert (frames[-1]["status"], text_of(frames)) == ("completed", "ab")
        return
    frames = assert_same(await both_paths(fmt, script, timeouts={"idle": 0.5}), closed=True)
    assert (frames[-1]["status"], frames[-1]["reason"]) == ("timeout", "idle_timeout")
    assert text_of(frames) == "a"


async def _cancel(c: Client, sid: str, request) -> None:
    await c.send({"type": "cancel", "id": sid})


async def _first_token_then_cancel(c: Client, sid: str, request) -> None:
    frame = await c.next_for(sid)
    assert frame["type"] == "token"
    c._stash[sid].insert(0, frame)
    await c.send({"type": "cancel", "id": sid})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("when", ["silent_before_first_token", "mid_stream_silent"])
async def test_cancel_on_a_silent_upstream(fmt, when):
    base = stream(fmt, [f"t{i} " for i in range(50)])
    script = base.silent_after(0) if when == "silent_before_first_token" else base.silent_after(5)
    action = _cancel if when == "silent_before_first_token" else _first_token_then_cancel
    frames = assert_same(await both_paths(fmt, script, action=action), closed=True)
    assert frames[-1]["status"] == "cancelled" and frames[-1]["usage"]["estimated"] is True


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cancel_a_flowing_stream(fmt):
    """Paced stream, cancel after the first token: how many tokens precede the cancel depends
    on timing, so this compares the shape, not every frame."""
    script = stream(fmt, [f"t{i} " for i in range(400)]).with_delay(0.01)
    results = await both_paths(fmt, script, action=_first_token_then_cancel)
    for frames, request in results:
        assert request.disconnected_at is not None and not request.completed
        finish = frames[-1]
        assert (finish["status"], finish["reason"]) == ("cancelled", "client_cancel")
        assert finish["usage"]["estimated"] is True and "error" not in finish
        assert script.text.startswith(text_of(frames)) and text_of(frames)
        seqs = [f["seq"] for f in frames]
        assert seqs == sorted(set(seqs)) and seqs[0] == 0  # (merged tokens skip seqs)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_client_disconnect_closes_upstream_on_both_paths(fmt):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up)) as server:
            for n, path in enumerate(PATHS, start=1):
                up.enqueue(stream(fmt, [f"t{i} " for i in range(400)]).with_delay(0.01))
                async with Client.connect(server.url) as c:
                    await c.start("s", model=alias(fmt, path))
                    await c.next_for("s")
                    request = await up.wait_request(n)
                    c.ws.transport.abort()
                await request.wait_disconnected(timeout=2.0)
                assert not request.completed


# ------------------------------------------------------------------------- selection


def test_selection_is_automatic_for_the_two_formats_and_fast_false_opts_out():
    registry = ModelRegistry(load_models({"models": {
        "gpt": {"model": "openai/gpt-4o-mini"},
        "local": {"model": "openai/llama", "api_base": "http://127.0.0.1:1/v1"},
        "vllm": {"model": "hosted_vllm/qwen", "api_base": "http://127.0.0.1:1/v1"},
        "claude": {"model": "anthropic/claude-x"},
        "groq": {"model": "groq/llama-3.1-8b-instant"},
        "openrouter": {"model": "openrouter/openai/gpt-4o-mini"},
        "together": {"model": "together_ai/meta-llama/Llama-3-8b-chat-hf"},
        "deepseek": {"model": "deepseek/deepseek-chat"},
        "azure": {"model": "azure/my-gpt-4o", "api_base": "https://x.openai.azure.com"},
        "azure_o": {"model": "azure/o3-mini", "api_base": "https://x.openai.azure.com"},
        "slow": {"model": "openai/gpt-4o-mini", "fast": False},
        "gemini": {"model": "gemini/gemini-2.0-flash"},
        "demo": {"model": "demo"},
    }}, Timeouts()))
    paths = {spec.alias: spec.path.path for spec in registry.specs}
    assert paths == {"gpt": "fast", "local": "fast", "vllm": "fast", "claude": "fast",
                     "together": "fast", "deepseek": "fast",
                     "groq": "fast", "openrouter": "fast", "azure": "fast",
                     "azure_o": "litellm",
                     "slow": "litellm", "gemini": "litellm", "demo": "litellm"}
    assert "fast = false" in registry.resolve("slow").path.reason
    assert "o-series" in registry.resolve("azure_o").path.reason
    assert registry.resolve("gemini").path.reason == (
        "provider gemini streams a format of its own, which only LiteLLM reads")


@pytest.mark.parametrize(("env", "why"), [
    ({"AZURE_API_VERSION": "v1"}, "v1 API"),
    ({"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}, "Entra ID"),
    ({"AZURE_USERNAME": "u", "AZURE_PASSWORD": "p", "AZURE_CLIENT_ID": "c"}, "Entra ID"),
])
def test_azure_setups_the_fast_path_leaves_to_litellm(monkeypatch, env, why):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    registry = ModelRegistry(load_models({"models": {
        "az": {"model": "azure/my-gpt-4o", "api_base": "https://x.openai.azure.com"},
        "az_gateway": {"model": "azure/my-gpt-4o",
                       "api_base": "https://gateway.ai.cloudflare.com/v1/a/b/azure-openai/c"},
    }}, Timeouts()))
    assert registry.resolve("az").path.path == "litellm"
    assert why in registry.resolve("az").path.reason
    assert registry.resolve("az_gateway").path.path == "litellm"


def test_azure_without_a_base_stays_on_litellm(monkeypatch):
    monkeypatch.delenv("AZURE_API_BASE", raising=False)
    registry = ModelRegistry(load_models({"models": {"az": {"model": "azure/my-gpt-4o"}}},
                                         Timeouts()))
    assert registry.resolve("az").path.path == "litellm"
    assert "no api_base" in registry.resolve("az").path.reason


def test_fast_must_be_a_boolean():
    from relay.app import ConfigError

    with pytest.raises(ConfigError, match="fast must be true or false"):
        load_models({"models": {"x": {"model": "openai/gpt", "fast": "no"}}}, Timeouts())


async def test_path_in_startup_log_and_metrics(caplog):
    async with FakeUpstream() as up:
        with caplog.at_level(logging.INFO, logger="relay.runtime.server"):
            async with start_relay(registry=registry_for(up)) as server:
                async with Client.connect(server.url):
                    metrics = server.metrics.render().decode()
    lines = [r.getMessage() for r in caplog.records if "model alias" in r.getMessage()]
    assert sorted(lines) == sorted(
        [f"model alias {fmt}-litellm: litellm path (fast = false in the alias config)"
         for fmt in FORMATS]
        + [f"model alias {fmt}-fast: fast path ({wire_format(fmt)} streaming format "
           f"(provider {fmt}))" for fmt in FORMATS])
    for fmt in FORMATS:
        assert f'relay_model_path{{alias="{fmt}-fast",path="fast"}} 1.0' in metrics
        assert f'relay_model_path{{alias="{fmt}-litellm",path="litellm"}} 1.0' in metrics


# ------------------------------------------------------------------------- the SSE parser


def test_sse_parser_same_events_whatever_the_chunking():
    from relay.upstream.sse import SSEParser

    wire = (b": comment\r\nevent: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n"
            b"data: {\"a\":\n"           # two data lines: joined with a newline
            b"data: 1}\n\n"
            b"id: 7\nretry: 10\ndata:[DONE]\n\n"
            b"data: {\"cut\": true}\n")     # no blank line: never dispatched
    expected = [(b"ping", b'{"type": "ping"}'), (None, b'{"a":\n1}'), (None, b"[DONE]")]
    whole = SSEParser()
    assert whole.feed(wire) == expected
    for size in (1, 2, 3, 7):
        parser = SSEParser()
        events = []
        for i in range(0, len(wire), size):
            events += parser.feed(wire[i:i + size])
        assert events == expected, size


# ------------------------------------------------------------------------- other providers


@pytest.mark.parametrize("model", ["hosted_vllm/qwen", "deepseek/deepseek-chat",
                                   "together_ai/meta-llama/x"])
async def test_openai_format_providers_same_as_litellm(model):
    """OpenAI-compatible providers LiteLLM knows, pointed at the fake's OpenAI endpoint: the
    provider gets the same request from both paths, the client the same frames."""
    calls = [tool_call("get_weather", {"city": "Paris"})]
    results = []
    async with FakeUpstream() as up:
        registry = ModelRegistry(load_models({"models": {
            path: {"model": model, "api_base": up.openai_base,
                   "api_key_env": "FAKE_PROVIDER_KEY", "fast": path == "fast"}
            for path in PATHS}}, Timeouts(10.0, 10.0, 30.0)))
        assert registry.resolve("fast").path.path == "fast"
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as c:
                for path in PATHS:
                    up.enqueue(stream("openai", ["Hel", "lo"], reasoning=["hm"],
                                      tool_calls=calls, usage=Usage(5, 6)))
                    await c.start(path, model=path, tools=TOOLS,
                                  params={"temperature": 0.2, "max_tokens": 50})
                    results.append((await c.collect(path), up.requests[-1]))
    frames = assert_same(results)
    assert frames[-1]["status"] == "completed" and text_of(frames) == "Hello"


# ------------------------------------------------------------------------- provider specifics


async def _same_on_both_paths(models: dict[str, dict], script, **start_fields):
    """Run ``script`` through alias ``litellm`` then alias ``fast`` (``models``: their
    config entries, with a ``flavour`` naming the fake endpoint for ``api_base``); return
    ``([(frames, request), ...], registry)``, the results in the order of ``both_paths``."""
    results = []
    async with FakeUpstream() as up:
        entries = {}
        for path, entry in models.items():
            entry = dict(entry)
            flavour = entry.pop("flavour")
            entries[path] = {**entry, "api_base": api_base(up, flavour), "fast": path == "fast"}
        registry = ModelRegistry(load_models({"models": entries}, Timeouts(10.0, 10.0, 30.0)))
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as c:
                for path in PATHS:
                    before = len(up.requests)
                    up.enqueue(script)
                    await c.start(path, model=path, **start_fields)
                    frames = await c.collect(path)
                    results.append((frames, up.requests[before]
                                    if len(up.requests) > before else None))
    return results, registry


async def test_azure_entra_id_token_is_a_bearer_header_on_both_paths(monkeypatch):
    """``azure_ad_token_env``: no key, the token as ``Authorization: Bearer`` (LiteLLM's
    ``azure_ad_token``), the same request and frames on both paths."""
    monkeypatch.setenv("FAKE_AD_TOKEN", "eyJ0eXAi.fake-entra-token")
    entry = {"model": "azure/gpt-x-deployment", "azure_ad_token_env": "FAKE_AD_TOKEN"}
    results, registry = await _same_on_both_paths(
        {path: {**entry, "flavour": "azure"} for path in PATHS},
        stream("azure", ["Hel", "lo"], usage=Usage(3, 4)))
    assert registry.resolve("fast").path.path == "fast"
    frames = assert_same(results)
    assert frames[-1]["status"] == "completed" and text_of(frames) == "Hello"
    for _frames, request in results:
        assert request.headers.get("Authorization") == "Bearer eyJ0eXAi.fake-entra-token"
        assert "api-key" not in request.headers
        assert request.path == "/openai/deployments/gpt-x-deployment/chat/completions"
        assert request.query.startswith("api-version=")


@pytest.mark.parametrize("deployment", ["gpt-x-deployment", "gpt-5-mini"])
async def test_azure_request_url_and_key_header(deployment):
    """Also a GPT-5 deployment, whose body LiteLLM builds with its Azure GPT-5 config."""
    results, registry = await _same_on_both_paths(
        {path: {"model": f"azure/{deployment}", "api_key_env": "FAKE_PROVIDER_KEY",
                "flavour": "azure"} for path in PATHS},
        stream("azure", ["ok"]), params={"max_tokens": 50, "temperature": 1})
    assert registry.resolve("fast").path.path == "fast"
    assert_same(results)
    for _frames, request in results:
        assert request.headers.get("api-key") == KEY and "Authorization" not in request.headers
        assert request.path == f"/openai/deployments/{deployment}/chat/completions"
        tokens_key = "max_completion_tokens" if "gpt-5" in deployment else "max_tokens"
        assert request.json[tokens_key] == 50


def test_azure_ad_token_env_config_checks(monkeypatch):
    from relay.app import ConfigError

    monkeypatch.setenv("FAKE_AD_TOKEN", "tok")
    with pytest.raises(ConfigError, match="for azure/ models only"):
        load_models({"models": {"x": {"model": "openai/gpt",
                                      "azure_ad_token_env": "FAKE_AD_TOKEN"}}}, Timeouts())
    with pytest.raises(ConfigError, match="not both"):
        load_models({"models": {"x": {"model": "azure/d", "azure_ad_token_env": "FAKE_AD_TOKEN",
                                      "api_key_env": "FAKE_PROVIDER_KEY"}}}, Timeouts())
    with pytest.raises(ConfigError, match="NO_SUCH_VAR"):
        load_models({"models": {"x": {"model": "azure/d",
                                      "azure_ad_token_env": "NO_SUCH_VAR"}}}, Timeouts())


async def test_openrouter_sends_its_attribution_headers_on_both_paths(monkeypatch):
    monkeypatch.setenv("OR_SITE_URL", "https://chat.example.com")
    monkeypatch.setenv("OR_APP_NAME", "Example Chat")
    results, _registry = await _same_on_both_paths(
        {path: {"model": MODELS["openrouter"], "api_key_env": "FAKE_PROVIDER_KEY",
                "flavour": "openrouter"} for path in PATHS},
        stream("openrouter", ["ok"], reasoning=["hmm"]))
    assert_same(results)
    for _frames, request in results:
        assert request.headers.get("HTTP-Referer") == "https://chat.example.com"
        assert request.headers.get("X-Title") == "Example Chat"
        assert request.json["usage"] == {"include": True}  # OpenRouter's config adds it


async def test_groq_response_format_goes_through_litellm():
    """LiteLLM answers a Groq request with ``response_format`` from a non-streaming call
    (it fakes the stream); the fast path hands such a request to LiteLLM."""
    params = {"response_format": {"type": "json_object"}}
    results, registry = await _same_on_both_paths(
        {path: {"model": MODELS["groq"], "api_key_env": "FAKE_PROVIDER_KEY",
                "flavour": "groq"} for path in PATHS},
        stream("groq", ["{}"]), params=params)
    route = registry.resolve("fast").path.route
    assert not route.accepts({"response_format": params["response_format"]})
    assert route.accepts({})
    assert_same(results)
    for _frames, request in results:
        assert "stream" not in request.json  # both made LiteLLM's non-streaming call


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_text_chunks_that_arrive_together_are_one_frame_numbered_as_merged(fmt):
    """The fake writes the whole stream at once: the fast path reads the chunks that have
    arrived together and relays their text as fewer token frames, each numbered as the
    writer's merge numbers them (the last chunk's seq), so the finish keeps its seq."""
    pieces = [f"w{i} " for i in range(50)]
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, pieces))
        await c.start("s", model=alias(fmt, "fast"))
        frames = await c.collect("s")
    tokens = of_type(frames, "token")
    assert "".join(t["text"] for t in tokens) == "".join(pieces)
    assert len(tokens) < len(pieces)
    seqs = [t["seq"] for t in tokens]
    assert seqs == sorted(set(seqs)) and seqs[-1] == len(pieces)
    assert frames[-1]["type"] == "finish" and frames[-1]["seq"] == len(pieces) + 1
    assert frames[-1]["status"] == "completed"


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_the_fast_path_streamer_joins_the_text_chunks_of_one_read(fmt, monkeypatch):
    """Below the relay's writer (whose merge alone gives the frames above): the streamer
    itself yields fewer text deltas than chunks, each saying how many chunks it carries."""
    from relay.upstream.fast import close_idle_http_client
    from relay.upstream.event_streamer import TextDelta

    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)
    pieces = [f"w{i} " for i in range(50)]
    async with FakeUpstream() as up:
        spec = registry_for(up).resolve(alias(fmt, "fast"))
        up.enqueue(stream(fmt, pieces))
        try:
            events = [e async for e in spec.streamer().events([{"role": "user",
                                                                  "content": "hi"}])]
        finally:
            await close_idle_http_client()      # (the relay server does this at its close)
    texts = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(e.text for e in texts) == "".join(pieces)
    assert sum(e.chunks for e in texts) == len(pieces)
    assert len(texts) < len(pieces)
    assert events[-1].status == "completed"
