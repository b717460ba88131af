"""The loopback fake providers (tests/fakes/upstream.py) driven by REAL litellm.acompletion.

These tests pin both the fakes' wire formats (LiteLLM's own openai/ and anthropic/ parsers must
accept them) and LiteLLM 1.110.x's observable behaviour the relay depends on: how text,
reasoning, tool calls and usage surface, which exceptions faults raise, and that closing or
cancelling a stream closes the upstream HTTP connection.
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import litellm
import pytest
from litellm.exceptions import MidStreamFallbackError

from tests.fakes.upstream import (
    DEFAULT_USAGE,
    FakeUpstream,
    Script,
    Usage,
    anthropic_stream,
    http_error,
    openai_stream,
    stream,
    tool_call,
)

litellm.suppress_debug_info = True

FORMATS = ("openai", "anthropic")
MODEL = {"openai": "openai/gpt-x", "anthropic": "anthropic/claude-x"}


def base(up: FakeUpstream, fmt: str) -> str:
    return up.openai_base if fmt == "openai" else up.anthropic_base


async def start(up: FakeUpstream, fmt: str, *, include_usage: bool = True) -> Any:
    """One real litellm streaming call against the fake (no retries of any kind)."""
    return await litellm.acompletion(
        model=MODEL[fmt],
        api_base=base(up, fmt),
        api_key="sk-test",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True} if include_usage else None,
        max_retries=0,
        num_retries=0,
    )


@dataclass
class Collected:
    """What a consumer of the CustomStreamWrapper reconstructs."""

    chunks: list[Any]
    text: str = ""
    reasoning: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    usage: Any = None
    # index -> {"id", "name", "arguments"}; plus the index order deltas arrived in
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    call_order: list[int] = field(default_factory=list)


def collect(chunks: list[Any]) -> Collected:
    out = Collected(chunks=chunks)
    for c in chunks:
        if getattr(c, "usage", None) is not None:
            out.usage = c.usage
        for choice in c.choices:
            d = choice.delta
            out.text += d.content or ""
            out.reasoning += getattr(d, "reasoning_content", None) or ""
            if choice.finish_reason:
                out.finish_reasons.append(choice.finish_reason)
            for tc in d.tool_calls or []:
                entry = out.calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert entry["id"] in (None, tc.id)
                    entry["id"] = tc.id
                if tc.function.name:
                    entry["name"] = tc.function.name
                entry["arguments"] += tc.function.arguments or ""
                out.call_order.append(tc.index)
    return out


async def run(up: FakeUpstream, fmt: str, *, include_usage: bool = True) -> tuple[Any, Collected]:
    resp = await start(up, fmt, include_usage=include_usage)
    chunks = [c async for c in resp]
    return resp, collect(chunks)


def assert_usage(usage: Any, expected: Usage) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        expected.input_tokens,
        expected.output_tokens,
        expected.total_tokens,
    )


def provider_usages(resp: Any) -> list[Any]:
    """Usage objects the PROVIDER sent: CustomStreamWrapper keeps the raw parsed chunks in
    ``resp.chunks``; only provider chunks carry ``usage`` there (litellm's own computed final
    usage chunk is never appended to it)."""
    return [c.usage for c in resp.chunks if getattr(c, "usage", None) is not None]


# ----------------------------------------------------------------------------------------------
# Happy paths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_text_reasoning_and_usage(fmt: str) -> None:
    async with FakeUpstream() as up:
        script = up.enqueue(stream(fmt, ["Hel", "lo, ", "wor", "ld!"], reasoning=["Let me ", "think", "."]))
        resp, got = await run(up, fmt)
        assert got.text == script.text == "Hello, world!"
        # both formats surface reasoning as delta.reasoning_content
        assert got.reasoning == script.reasoning == "Let me think."
        assert got.finish_reasons == ["stop"]
        assert_usage(got.usage, DEFAULT_USAGE)
        assert len(up.requests) == 1
        req = up.requests[0]
        assert req.completed and req.disconnected_at is None
        assert req.json["stream"] is True and req.json["model"] in ("gpt-x", "claude-x")
        if fmt == "openai":
            assert req.path == "/v1/chat/completions"
            assert req.headers["Authorization"] == "Bearer sk-test"
            assert req.json["stream_options"] == {"include_usage": True}
        else:
            assert req.path == "/v1/messages"
            assert req.headers["x-api-key"] == "sk-test"
            # litellm does not send stream_options to Anthropic; usage always comes
            assert "stream_options" not in req.json
            # the signature arrives in thinking_blocks of a (reasoning_content == "") delta
            sigs = [
                b.get("signature")
                for c in got.chunks
                for ch in c.choices
                for b in (getattr(ch.delta, "thinking_blocks", None) or [])
                if b.get("signature")
            ]
            assert sigs == ["EqQBCkYIARgCKkDfakeSignature=="]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_calls", [1, 2])
async def test_tool_calls(fmt: str, n_calls: int) -> None:
    calls = [
        tool_call("get_weather", {"location": "Paris, France", "unit": "celsius"}, id="call_w1"),
        tool_call("get_time", {"tz": "Europe/Paris"}, id="call_t2"),
    ][:n_calls]
    async with FakeUpstream() as up:
        script = up.enqueue(stream(fmt, tool_calls=calls))
        _, got = await run(up, fmt)
        assert got.finish_reasons == ["tool_calls"]
        assert sorted(got.calls) == list(range(n_calls))
        for i, call in enumerate(script.tool_calls):
            assert got.calls[i] == {"id": call.id, "name": call.name, "arguments": call.arguments}
            assert len(call.pieces) > 3 and json.loads(got.calls[i]["arguments"]) == call.parsed_arguments
        if n_calls == 2:
            first_switch = got.call_order.index(1)
            if fmt == "openai":  # deltas interleave on the wire and reach the consumer interleaved
                assert got.call_order[: first_switch + 2] == [0, 1, 0]
            else:  # Anthropic blocks are sequential
                assert got.call_order == sorted(got.call_order)


@pytest.mark.parametrize(
    ("fmt", "script_reason", "expected"),
    [
        ("openai", "stop", "stop"),
        ("openai", "length", "length"),
        ("anthropic", "end_turn", "stop"),
        ("anthropic", "max_tokens", "length"),
        ("anthropic", "tool_use", "tool_calls"),
    ],
)
async def test_finish_reasons(fmt: str, script_reason: str, expected: str) -> None:
    key = "finish_reason" if fmt == "openai" else "stop_reason"
    async with FakeUpstream() as up:
        script = up.enqueue(stream(fmt, ["x"], **{key: script_reason}))
        _, got = await run(up, fmt)
        assert script.finish_reason == script_reason
        assert got.finish_reasons == [expected]


# ----------------------------------------------------------------------------------------------
# Usage: provider-sent vs litellm-estimated
# ----------------------------------------------------------------------------------------------


async def test_openai_usage_sent_only_when_requested_and_distinguishable() -> None:
    async with FakeUpstream() as up:
        # 1. asked + sent: the final chunk carries the provider numbers; resp.chunks has them too.
        up.enqueue(openai_stream(["a", "b"], usage=Usage(13, 42)))
        resp, got = await run(up, "openai")
        assert_usage(got.usage, Usage(13, 42))
        assert got.chunks[-1].choices == [] and got.chunks[-1].usage is got.usage
        assert [(u.prompt_tokens, u.completion_tokens) for u in provider_usages(resp)] == [(13, 42)]

        # 2. asked, provider sends none: litellm STILL emits a final usage chunk, with its own
        #    estimate; only resp.chunks reveals that nothing came from the provider.
        up.enqueue(openai_stream(["a", "b"], usage=None))
        resp, got = await run(up, "openai")
        assert got.usage is not None and got.chunks[-1].choices == []
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) != (13, 42)
        assert provider_usages(resp) == []

        # 3. not asked: the fake (like OpenAI) sends no usage chunk, litellm emits no usage at all.
        script = up.enqueue(openai_stream(["a", "b"], usage=Usage(13, 42)))
        resp, got = await run(up, "openai", include_usage=False)
        assert "stream_options" not in up.requests[-1].json
        assert up.requests[-1].events_sent == len(script.wire_events(include_usage=False)) == len(script.events) - 1
        assert got.usage is None and provider_usages(resp) == []
        assert got.text == "ab"


async def test_anthropic_usage_provider_vs_estimated() -> None:
    async with FakeUpstream() as up:
        up.enqueue(anthropic_stream(["a", "b"], usage=Usage(13, 42)))
        resp, got = await run(up, "anthropic")
        assert_usage(got.usage, Usage(13, 42))
        # message_start (input, output=1) then message_delta (cumulative, output=42)
        assert [(u.prompt_tokens, u.completion_tokens) for u in provider_usages(resp)] == [(13, 1), (13, 42)]

        up.enqueue(anthropic_stream(["a", "b"], usage=None))
        resp, got = await run(up, "anthropic")
        assert got.usage is not None  # litellm's estimate
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) != (13, 42)
        assert provider_usages(resp) == []


# ----------------------------------------------------------------------------------------------
# HTTP errors before the stream
# ----------------------------------------------------------------------------------------------

EXPECTED_ERROR = {
    # (fmt, status): litellm exception class
    ("openai", 401): litellm.AuthenticationError,
    ("openai", 403): litellm.APIError,  # NB: litellm's openai mapping has no 403 branch
    ("openai", 429): litellm.RateLimitError,
    ("openai", 500): litellm.InternalServerError,
    ("anthropic", 401): litellm.AuthenticationError,
    ("anthropic", 403): litellm.PermissionDeniedError,
    ("anthropic", 429): litellm.RateLimitError,
    ("anthropic", 500): litellm.InternalServerError,
}


@pytest.mark.parametrize(("fmt", "status"), list(EXPECTED_ERROR))
async def test_http_errors(fmt: str, status: int) -> None:
    async with FakeUpstream() as up:
        script = up.enqueue(http_error(fmt, status, retry_after=7 if status == 429 else None))
        with pytest.raises(EXPECTED_ERROR[fmt, status]) as info:
            await start(up, fmt)  # raised by acompletion itself, before any chunk
        exc = info.value
        assert type(exc) is EXPECTED_ERROR[fmt, status]
        assert exc.status_code == status
        assert exc.llm_provider == fmt
        error_message = json.loads(script.body)["error"]["message"]
        assert error_message in str(exc)
        # the upstream headers are always on exc.litellm_response_headers (httpx.Headers);
        # exc.response.headers only has them for openai (anthropic gets a stub response)
        assert exc.litellm_response_headers is not None
        if status == 429:
            assert exc.litellm_response_headers["retry-after"] == "7"
            assert litellm.utils._get_retry_after_from_exception_header(exc.litellm_response_headers) == 7
            if fmt == "openai":
                assert exc.response.headers["retry-after"] == "7"
            else:
                assert "retry-after" not in exc.response.headers
        assert len(up.requests) == 1 and up.requests[0].completed


# ----------------------------------------------------------------------------------------------
# Mid-stream faults
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reset", [False, True])
async def test_cut_stream_raises_midstream_error(fmt: str, reset: bool) -> None:
    async with FakeUpstream() as up:
        # openai: role, "Hel", "lo" ; anthropic: message_start, block_start, ping, "Hel", "lo"
        n = 3 if fmt == "openai" else 5
        up.enqueue(stream(fmt, ["Hel", "lo", " world"]).cut_after(n, reset=reset))
        resp = await start(up, fmt)
        chunks: list[Any] = []
        with pytest.raises(MidStreamFallbackError) as info:
            async for c in resp:
                chunks.append(c)
        exc = info.value
        assert collect(chunks).text == "Hello"
        assert exc.status_code == 500
        assert isinstance(exc.original_exception, litellm.APIConnectionError)
        assert exc.generated_content == "Hello" and exc.is_pre_first_chunk is False
        req = up.requests[0]
        assert len(up.requests) == 1 and req.events_sent == n
        assert not req.completed and req.disconnected_at is None  # server-side cut is not a disconnect


async def test_openai_cut_after_finish_but_before_done_still_raises() -> None:
    async with FakeUpstream() as up:
        script = openai_stream(["a"])
        up.enqueue(script.cut_after(len(script.events) - 1))  # everything but `data: [DONE]`
        resp = await start(up, "openai")
        chunks: list[Any] = []
        with pytest.raises(MidStreamFallbackError):
            async for c in resp:
                chunks.append(c)
        assert collect(chunks).finish_reasons == ["stop"]


async def test_openai_malformed_sse_data_raises() -> None:
    async with FakeUpstream() as up:
        up.enqueue(openai_stream(["Hel", "lo", "!"]).malformed_at(3))
        resp = await start(up, "openai")
        chunks: list[Any] = []
        with pytest.raises(MidStreamFallbackError) as info:
            async for c in resp:
                chunks.append(c)
        assert collect(chunks).text == "Hello"
        assert isinstance(info.value.original_exception, litellm.APIConnectionError)
        assert "Unterminated string" in str(info.value)
        assert len(up.requests) == 1


async def test_anthropic_malformed_sse_data_is_swallowed() -> None:
    """LiteLLM's Anthropic iterator treats an undecodable ``data:`` line as a fragment and
    buffers every later event behind it, so nothing fails until EOF, and then only if the
    finish reason was lost with it."""
    async with FakeUpstream() as up:
        up.enqueue(anthropic_stream(["a", "b"]).malformed_at(4))  # after the "a" delta
        resp = await start(up, "anthropic")
        chunks: list[Any] = []
        with pytest.raises(MidStreamFallbackError) as info:
            async for c in resp:
                chunks.append(c)
        assert collect(chunks).text == "a"
        assert "Stream ended before a finish_reason was received" in str(info.value)
        assert up.requests[0].completed

        # worse: garbage BEFORE message_start yields a "successful", empty stream
        up.enqueue(anthropic_stream(["a", "b"]).malformed_at(0))
        _, got = await run(up, "anthropic")
        assert (got.text, got.finish_reasons, got.usage) == ("", ["stop"], None)


# ----------------------------------------------------------------------------------------------
# Silence, client disconnects, cancellation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
async def test_aclose_disconnects_upstream_promptly(fmt: str) -> None:
    async with FakeUpstream() as up:
        script = stream(fmt, ["a", "b", "c"])
        up.enqueue(script.silent_after(len(script.events) - 2))  # silent before the stream ends
        resp = await start(up, fmt)
        it = resp.__aiter__()
        await asyncio.wait_for(it.__anext__(), 5)
        await asyncio.wait_for(it.__anext__(), 5)
        req = up.requests[0]
        assert req.disconnected_at is None
        t0 = time.monotonic()
        await resp.aclose()
        t1 = await req.wait_disconnected(timeout=2)
        assert t1 - t0 < 0.5
        assert not req.completed


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("when", ["before_headers", "after_headers", "after_first_text"])
async def test_cancelling_consumer_disconnects_silent_upstream(fmt: str, when: str) -> None:
    """before_headers: acompletion itself hangs; after_headers: the first __anext__ hangs;
    after_first_text: a later __anext__ hangs (openai: role + "a"; anthropic: message_start,
    content_block_start, ping + "a")."""
    silent_after = {"before_headers": None, "after_headers": 0, "after_first_text": 2 if fmt == "openai" else 4}[when]
    async with FakeUpstream() as up:
        script = stream(fmt, ["a", "b"])
        up.enqueue(script.silent_before_headers() if silent_after is None else script.silent_after(silent_after))
        got: list[Any] = []
        first_chunk = asyncio.Event()

        async def consume() -> None:
            resp = await start(up, fmt)
            async for c in resp:
                got.append(c)
                first_chunk.set()

        task = asyncio.create_task(consume())
        req = await up.wait_request()
        if silent_after:
            await asyncio.wait_for(first_chunk.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        t0 = time.monotonic()
        t1 = await req.wait_disconnected(timeout=2)
        assert t1 - t0 < 0.5
        assert req.events_sent == (silent_after or 0)
        assert not req.completed


# ----------------------------------------------------------------------------------------------
# The fake itself: FIFO, default reply, pacing, raw wire, clean shutdown
# ----------------------------------------------------------------------------------------------


async def test_fifo_default_reply_and_wait_request() -> None:
    async with FakeUpstream() as up:
        up.enqueue(openai_stream(["first"]), anthropic_stream(["second"]))
        _, a = await run(up, "openai")
        _, b = await run(up, "anthropic")
        _, c = await run(up, "anthropic")  # queue empty: default reply in the request's format
        _, d = await run(up, "openai")
        assert (a.text, b.text) == ("first", "second")
        assert c.text == d.text == "".join(FakeUpstream.DEFAULT_TEXT)
        assert (await up.wait_request(4)).path == "/v1/chat/completions"
        with pytest.raises(TimeoutError):
            await up.wait_request(5, timeout=0.05)


async def test_raw_wire_format_and_pacing() -> None:
    async with FakeUpstream() as up, aiohttp.ClientSession() as http:
        up.enqueue(anthropic_stream(["a", "b"], usage=Usage(3, 4)).with_delay(0.05))
        t0 = time.monotonic()
        async with http.post(up.anthropic_base + "/v1/messages", json={"stream": True}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
        elapsed = time.monotonic() - t0
        events = [block.split("\n") for block in raw.strip().split("\n\n")]
        names = [lines[0].removeprefix("event: ") for lines in events]
        assert names == [
            "message_start", "content_block_start", "ping", "content_block_delta",
            "content_block_delta", "content_block_stop", "message_delta", "message_stop",
        ]  # fmt: skip
        assert all(json.loads(lines[1].removeprefix("data: "))["type"] == n for n, lines in zip(names, events))
        assert elapsed >= 0.05 * (len(events) - 1)

        up.enqueue(openai_stream(["a"], usage=Usage(3, 4)))
        async with http.post(up.openai_base + "/chat/completions", json={"stream": True, "stream_options": {"include_usage": True}}) as r:
            raw = (await r.read()).decode()
        datas = [b.removeprefix("data: ") for b in raw.strip().split("\n\n")]
        assert datas[-1] == "[DONE]"
        usage_chunk = json.loads(datas[-2])
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 7
        assert json.loads(datas[-3])["choices"][0]["finish_reason"] == "stop"
        assert all(r.completed and r.disconnected_at is None for r in up.requests)


async def test_close_with_inflight_silent_requests_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    async with aiohttp.ClientSession() as http:
        async with FakeUpstream() as up:
            up.enqueue(openai_stream(["a"]).silent_after(1), openai_stream(["a"]).silent_before_headers())
            mid_body = await http.post(up.openai_base + "/chat/completions", json={})
            assert (await mid_body.content.readline()).startswith(b"data: {")  # 1st event, then silence
            no_headers = asyncio.create_task(http.post(up.openai_base + "/chat/completions", json={}))
            await up.wait_request(2)
        # leaving the context aborted both; that is not reported as a client disconnect
        assert [(r.disconnected_at, r.completed) for r in up.requests] == [(None, False), (None, False)]
        with pytest.raises(aiohttp.ClientError):
            await mid_body.read()
        mid_body.release()
        with pytest.raises(aiohttp.ClientError):
            await no_headers
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


def test_script_values_are_self_describing() -> None:
    a = tool_call("f", {"k": "value"}, id="call_1", piece_size=3)
    assert a.pieces == ('{"k', '":"', "val", 'ue"', "}") and a.arguments == '{"k":"value"}'
    with pytest.raises(ValueError):
        type(a)(id="x", name="f", arguments="{}", pieces=("{",))
    s: Script = openai_stream(["x"], tool_calls=[a], finish_reason="tool_calls", usage=None)
    assert (s.text, s.tool_calls, s.usage, s.finish_reason) == ("x", (a,), None, "tool_calls")
    assert s.cut_after(2).cut == 2 and s.cut is None  # modifiers return copies
    err = http_error("anthropic", 429)
    assert err.headers["retry-after"] == "20" and json.loads(err.body)["error"]["type"] == "rate_limit_error"
