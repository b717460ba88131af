"""TokenStreamer on its own, driven by a scripted upstream injected as ``completion``:
the seed API, timers, cancel semantics, usage decisions. (The same behaviour through real
LiteLLM provider code and the whole relay is in test_providers.py.)"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace as NS

import pytest

from relay.upstream.event_streamer import (
    ReasoningDelta,
    StreamEnd,
    TextDelta,
    Timeouts,
    ToolCallDelta,
    ToolCallDone,
)

from relay.streamer import TokenStreamer


def chunk(content=None, *, reasoning=None, tool_calls=None, finish=None, usage=None):
    delta = NS(content=content, reasoning_content=reasoning, tool_calls=tool_calls)
    return NS(choices=[NS(delta=delta, finish_reason=finish)], usage=usage)


def tc(index, args, id=None, name=None):
    return NS(index=index, id=id, function=NS(name=name, arguments=args))


class ScriptedResponse:
    """Quacks like LiteLLM's CustomStreamWrapper: async iterator, ``aclose``, ``chunks``."""

    def __init__(self, items, hang_after=None):
        self.items = list(items)
        self.hang_after = hang_after
        self.chunks = []
        self.closed = asyncio.Event()
        self._i = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.hang_after is not None and self._i >= self.hang_after:
            await asyncio.Event().wait()  # a provider gone silent
        if self._i >= len(self.items):
            raise StopAsyncIteration
        item = self.items[self._i]
        self._i += 1
        self.chunks.append(item)
        return item

    async def aclose(self):
        self.closed.set()


def scripted(response, calls=None):
    async def completion(**kwargs):
        if calls is not None:
            calls.append(kwargs)
        return response
    return completion


async def collect(agen):
    return [e async for e in agen]


MSGS = [{"role": "user", "content": "hello"}]


async def test_request_kwargs_disable_retries_and_ask_for_usage():
    calls = []
    resp = ScriptedResponse([chunk("a", finish="stop")])
    s = TokenStreamer("openai/x", api_key="k", base_url="http://b", completion=scripted(resp, calls))
    await collect(s.events(MSGS, temperature=0.2))
    kw = calls[0]
    assert kw["stream"] is True and kw["stream_options"] == {"include_usage": True}
    assert kw["num_retries"] == 0 and kw["max_retries"] == 0
    assert kw["api_key"] == "k" and kw["api_base"] == "http://b" and kw["temperature"] == 0.2


async def test_reads_past_finish_reason_for_usage_and_marks_provider_usage():
    usage = NS(prompt_tokens=11, completion_tokens=2, total_tokens=13)
    resp = ScriptedResponse([chunk("a"), chunk("b", finish="stop"),
                             NS(choices=[], usage=usage)])
    s = TokenStreamer("openai/x", completion=scripted(resp))
    events = await collect(s.events(MSGS))
    end = events[-1]
    assert isinstance(end, StreamEnd) and end.status == "completed" and end.reason == "stop"
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (11, 2)
    assert end.usage.estimated is False
    assert s.get_total_tokens() == 2 and s.get_accumulated_content() == "ab"
    assert resp.closed.is_set()


async def test_no_provider_usage_gives_estimate():
    resp = ScriptedResponse([chunk("hello world, this is text"), chunk(None, finish="stop")])
    s = TokenStreamer("openai/gpt-4o", completion=scripted(resp))
    end = (await collect(s.events(MSGS)))[-1]
    assert end.usage.estimated is True
    assert end.usage.prompt_tokens > 0 and end.usage.completion_tokens > 0


async def test_tool_calls_assembled_by_index_whatever_finish_reason():
    resp = ScriptedResponse([
        chunk(tool_calls=[tc(0, '{"a"', id="c0", name="f")]),
        chunk(tool_calls=[tc(1, '{"b":', id="c1", name="g")]),
        chunk(tool_calls=[tc(0, ': 1}')]),
        chunk(tool_calls=[tc(1, ' 2}')]),
        chunk(None, finish="stop"),   # a provider that says "stop" after tool calls
    ])
    s = TokenStreamer("openai/x", completion=scripted(resp))
    events = await collect(s.events(MSGS, tools=[{"type": "function",
                                                  "function": {"name": "f"}}]))
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    done = [e for e in events if isinstance(e, ToolCallDone)]
    assert [d.index for d in deltas] == [0, 1, 0, 1]
    assert [(d.index, d.call_id, d.name, d.arguments) for d in done] == [
        (0, "c0", "f", '{"a": 1}'), (1, "c1", "g", '{"b": 2}')]
    assert events[-1].reason == "tool_calls"


async def test_tool_call_without_provider_id_gets_one():
    resp = ScriptedResponse([chunk(tool_calls=[tc(0, "{}", name="f")]), chunk(None, finish="tool_calls")])
    s = TokenStreamer("openai/x", completion=scripted(resp))
    events = await collect(s.events(MSGS))
    done = [e for e in events if isinstance(e, ToolCallDone)][0]
    assert done.call_id.startswith("call_") and len(done.call_id) > 10


async def test_reasoning_is_its_own_event():
    resp = ScriptedResponse([chunk(reasoning="think"), chunk("answer", finish="stop")])
    s = TokenStreamer("openai/x", completion=scripted(resp))
    events = await collect(s.events(MSGS))
    assert events[0] == ReasoningDelta("think") and events[1] == TextDelta("answer")
    assert s.get_accumulated_content() == "answer"


@pytest.mark.parametrize(("timeouts", "hang_after", "reason"), [
    (Timeouts(first_token=0.05, idle=5, total=5), 0, "first_token_timeout"),
    (Timeouts(first_token=5, idle=0.05, total=5), 1, "idle_timeout"),
    (Timeouts(first_token=5, idle=5, total=0.05), 1, "total_timeout"),
])
async def test_timeouts_are_timers_on_a_silent_upstream(timeouts, hang_after, reason):
    resp = ScriptedResponse([chunk("a"), chunk("b")], hang_after=hang_after)
    s = TokenStreamer("openai/x", completion=scripted(resp), timeouts=timeouts)
    end = (await collect(s.events(MSGS)))[-1]
    assert (end.status, end.reason) == ("timeout", reason)
    assert end.error.code == "upstream_timeout"
    assert resp.closed.is_set()


async def test_cancel_interrupts_a_silent_upstream_at_once():
    resp = ScriptedResponse([chunk("a")], hang_after=1)
    s = TokenStreamer("openai/x", completion=scripted(resp))
    events = []

    async def consume():
        async for e in s.events(MSGS):
            events.append(e)
            if isinstance(e, TextDelta):
                asyncio.get_running_loop().call_soon(s.cancel)

    async with asyncio.timeout(2):
        await consume()
    assert isinstance(events[-1], StreamEnd) and events[-1].status == "cancelled"
    assert events[-1].reason == "client_cancel" and resp.closed.is_set()
    s.cancel()  # idempotent after the end


async def test_cancel_while_consumer_busy_closes_upstream_without_waiting_for_next_read():
    resp = ScriptedResponse([chunk("a"), chunk("b"), chunk("c", finish="stop")])
    s = TokenStreamer("openai/x", completion=scripted(resp))
    agen = s.events(MSGS)
    first = await agen.__anext__()
    assert first == TextDelta("a")
    s.cancel("client_disconnect")        # consumer is not awaiting the provider now
    await asyncio.wait_for(resp.closed.wait(), 1)   # closed before the consumer reads again
    rest = [e async for e in agen]
    assert [type(e) for e in rest] == [StreamEnd]
    assert rest[0].reason == "client_disconnect"


async def test_outside_cancellation_propagates_and_closes_upstream():
    resp = ScriptedResponse([chunk("a")], hang_after=1)
    s = TokenStreamer("openai/x", completion=scripted(resp))
    got_token = asyncio.Event()

    async def consume():
        async for e in s.events(MSGS):
            got_token.set()

    task = asyncio.create_task(consume())
    await got_token.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert resp.closed.is_set()


async def test_provider_exception_ends_with_failed_finish_not_raise():
    class Boom(Exception):
        status_code = 500

    async def completion(**kwargs):
        raise Boom("upstream said sk-secret-123")

    s = TokenStreamer("openai/x", completion=completion)
    end = (await collect(s.events(MSGS)))[-1]
    assert (end.status, end.reason) == ("failed", "upstream_error")
    assert "sk-secret" not in end.error.message


async def test_retries_before_first_token_is_opt_in():
    class Unavailable(Exception):
        status_code = 503

    attempts = []

    async def completion(**kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise Unavailable()
        return ScriptedResponse([chunk("ok", finish="stop")])

    end = (await collect(TokenStreamer("openai/x", completion=completion).events(MSGS)))[-1]
    assert end.status == "failed" and len(attempts) == 1
    attempts.clear()
    s = TokenStreamer("openai/x", completion=completion, retries_before_first_token=1)
    end = (await collect(s.events(MSGS)))[-1]
    assert end.status == "completed" and len(attempts) == 2


@pytest.mark.parametrize("status, code, retried", [
    (503, "upstream_error", True), (429, "upstream_rate_limited", True),
    (529, "upstream_overloaded", True), (400, "bad_request", False),
], ids=["503", "429", "529", "400"])
async def test_the_connect_retry_rule_is_one_set_of_codes(status, code, retried):
    """``retries_before_first_token`` tries a failed connect again exactly when its code is
    in ``relay.upstream.errors.RETRYABLE_CONNECT_FAILURES`` (the rule PROTOCOL.md states)."""
    from relay.upstream.errors import RETRYABLE_CONNECT_FAILURES

    class Refused(Exception):
        status_code = status

    attempts = []

    async def completion(**kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            raise Refused()
        return ScriptedResponse([chunk("ok", finish="stop")])

    assert (code in RETRYABLE_CONNECT_FAILURES) is retried
    s = TokenStreamer("openai/x", completion=completion, retries_before_first_token=1)
    end = (await collect(s.events(MSGS)))[-1]
    if retried:
        assert end.status == "completed" and len(attempts) == 2
    else:
        assert (end.status, end.error.code) == ("failed", code) and len(attempts) == 1


async def test_seed_methods_same_behaviour_on_errors_and_success():
    seen = []
    resp = ScriptedResponse([chunk("a"), chunk("b", finish="length")])
    s = TokenStreamer("openai/x", on_token=seen.append, completion=scripted(resp))
    items = await collect(s.stream_completion(MSGS, max_tokens=2))
    assert [i.content for i in items] == ["a", "b", ""]
    assert items[-1].finish_reason == "length" and items[-1].status == "completed"
    assert [c.content for c in seen] == ["a", "b"]

    async def failing(**kwargs):
        raise ConnectionError("down")

    s2 = TokenStreamer("openai/x", completion=failing)
    last = (await collect(s2.stream_completion(MSGS)))[-1]
    assert last.status == "failed" and last.error["code"] == "upstream_error"
    dicts = await collect(s2.stream_with_tools(MSGS, tools=[]))
    assert [d["type"] for d in dicts] == ["finish"] and dicts[0]["status"] == "failed"
    s2.reset()
    assert s2.get_accumulated_content() == "" and s2.usage is None


def test_provider_failures_and_relay_bugs_are_told_apart():
    import httpx

    from relay.upstream.event_streamer import _Truncated
    from relay.upstream.errors import is_provider_failure

    class WithStatus(Exception):
        status_code = 502

    provider = [httpx.ReadError("cut"), httpx.RemoteProtocolError("bad"), ConnectionError("x"),
                WithStatus(), _Truncated(), TimeoutError()]
    bugs = [TypeError("x"), KeyError("k"), AttributeError("a"), ValueError("v"),
            RuntimeError("r")]
    assert [is_provider_failure(e) for e in provider] == [True] * len(provider)
    assert [is_provider_failure(e) for e in bugs] == [False] * len(bugs)


async def test_a_bug_before_the_first_token_is_not_retried_nor_called_upstream_error(caplog):
    attempts = []

    async def completion(**kwargs):
        attempts.append(1)
        raise TypeError("a bug in the relay's request building")

    s = TokenStreamer("openai/x", completion=completion, retries_before_first_token=2)
    with caplog.at_level("ERROR", logger="relay.upstream.event_streamer"):
        end = (await collect(s.events(MSGS)))[-1]
    assert (end.status, end.reason, end.error.code) == ("failed", "internal_error",
                                                        "internal_error")
    assert len(attempts) == 1
    assert any(r.exc_info and isinstance(r.exc_info[1], TypeError) for r in caplog.records)


def test_a_builtin_exception_raised_inside_litellm_is_a_provider_failure_not_a_relay_bug():
    """LiteLLM's own parsers raise built-in exceptions on odd provider data (its Groq parser
    does ``int("server_error")`` on an in-stream error): judged by where it was raised, it is
    a provider failure; the same ValueError raised by the relay's code is a bug."""
    from relay.upstream.errors import is_provider_failure

    def raised_in(module: str) -> BaseException:
        namespace = {"__name__": module}
        exec("def parse():\n    return int('server_error')\n", namespace)
        try:
            namespace["parse"]()
        except ValueError as exc:
            return exc
        raise AssertionError("no exception")

    assert is_provider_failure(raised_in("litellm.llms.groq.chat.handler"))
    assert not is_provider_failure(raised_in("relay.upstream.event_streamer"))
