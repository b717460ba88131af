"""TokenStreamer used as a library, the way README shows it (issue 14, item 7): the built-in
demo needs no provider string, a model string LiteLLM cannot route fails with a message
that says how to write one, and every final ``reason`` is a plain ``str`` (completed,
cancelled, timeout and failed alike)."""

from __future__ import annotations

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.event_streamer import StreamEnd, Timeouts
from relay.streamer import TokenStreamer

from ..fakes.upstream import FakeUpstream, openai_stream

MESSAGES = [{"role": "user", "content": "library use"}]


async def _end(streamer: TokenStreamer, **kwargs) -> StreamEnd:
    events = [event async for event in streamer.events(MESSAGES, **kwargs)]
    assert isinstance(events[-1], StreamEnd)
    return events[-1]


async def test_demo_needs_no_provider_string():
    streamer = TokenStreamer("demo")
    chunks = [chunk async for chunk in streamer.stream_completion(MESSAGES)]
    assert streamer.get_accumulated_content() == "".join(demo_reply_tokens(MESSAGES))
    last = chunks[-1]
    assert (last.status, last.finish_reason) == ("completed", "stop")
    assert type(last.finish_reason) is str and type(last.status) is str


async def test_a_model_string_without_provider_fails_naming_the_right_form():
    end = await _end(TokenStreamer("gpt-without-provider"))
    assert str(end.status) == "failed" and end.reason == "bad_request"
    assert type(end.reason) is str and type(end.error.code) is str
    assert "'provider/model'" in end.error.message and "'demo'" in end.error.message
    # The seed-style dict carries the same plain strings.
    items = [item async for item in TokenStreamer("gpt-without-provider").stream_with_tools(
        MESSAGES, [])]
    assert items[-1]["reason"] == "bad_request" and type(items[-1]["reason"]) is str
    assert type(items[-1]["error"]["code"]) is str


async def test_every_final_reason_is_a_plain_string():
    cancelled = TokenStreamer("demo")
    cancelled.cancel()
    # One fake upstream each: a timeout that fires before its request is even sent (a
    # loaded machine) must not leave its script to the next stream.
    async with FakeUpstream() as silent, FakeUpstream() as cut:
        silent.enqueue(openai_stream(["a"]).silent_after(0))
        timed_out = TokenStreamer("openai/gpt-x", api_key="k", base_url=silent.openai_base,
                                  timeouts=Timeouts(first_token=0.5, idle=0.5, total=5))
        cut.enqueue(openai_stream(["a", "b"]).cut_after(1))
        failed = TokenStreamer("openai/gpt-x", api_key="k", base_url=cut.openai_base)
        ends = {"cancelled": await _end(cancelled), "timeout": await _end(timed_out),
                "failed": await _end(failed)}
    for status, end in ends.items():
        assert str(end.status) == status, (status, end)
        assert type(end.reason) is str, (status, repr(end.reason))
    assert ends["failed"].reason == "upstream_error"
    assert type(ends["failed"].error.code) is str
