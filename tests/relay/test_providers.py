"""Real providers through the whole relay: client -> relay -> LiteLLM's real openai/ and
anthropic/ provider code -> loopback fake upstreams speaking the providers' wire formats."""

from __future__ import annotations

import contextlib
import json
import time

import pytest

from relay.app import build_registry, load_models
from relay.config import RelaySettings
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import (
    FakeUpstream, Usage, http_error, stream, tool_call,
)

from .helpers import Client, start_relay, text_of

FORMATS = ["openai", "anthropic"]
ALIAS = {"openai": "oai", "anthropic": "claude"}
KEY = "sk-test-SECRET-do-not-leak-0123456789"


def registry_for(up: FakeUpstream, **timeouts: float) -> ModelRegistry:
    defaults = Timeouts(**{"first_token": 10.0, "idle": 10.0, "total": 30.0, **timeouts})
    return ModelRegistry(load_models({"models": {
        "oai": {"model": "openai/gpt-x", "api_base": up.openai_base,
                "api_key_env": "FAKE_PROVIDER_KEY"},
        "claude": {"model": "anthropic/claude-x", "api_base": up.anthropic_base,
                   "api_key_env": "FAKE_PROVIDER_KEY"},
    }}, defaults))


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


@contextlib.asynccontextmanager
async def relay_with_upstream(**timeouts: float):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up, **timeouts)) as server:
            async with Client.connect(server.url) as client:
                yield up, client


async def run_stream(client: Client, fmt: str, sid: str = "s", **fields) -> list[dict]:
    await client.start(sid, model=ALIAS[fmt], **fields)
    return await client.collect(sid)


def of_type(frames: list[dict], kind: str) -> list[dict]:
    return [f for f in frames if f["type"] == kind]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_text_reasoning_and_provider_usage(fmt):
    async with relay_with_upstream() as (up, c):
        script = up.enqueue(stream(fmt, ["Hel", "lo ", "wor", "ld"],
                                   reasoning=["Let me ", "think."], usage=Usage(17, 23)))
        frames = await run_stream(c, fmt)
    assert c.welcome["models"] == ["oai", "claude"]
    assert frames[0]["type"] == "started"
    assert text_of(frames) == script.text == "Hello world"
    assert "".join(f["text"] for f in of_type(frames, "reasoning")) == script.reasoning
    finish = frames[-1]
    assert finish["status"] == "completed" and finish["reason"] == "stop"
    assert finish["usage"] == {"prompt_tokens": 17, "completion_tokens": 23,
                               "total_tokens": 40, "estimated": False}
    assert len(up.requests) == 1
    sent = up.requests[0]
    if fmt == "openai":
        assert sent.json["stream_options"] == {"include_usage": True}
        assert sent.headers["Authorization"] == f"Bearer {KEY}"
    else:
        assert sent.headers["x-api-key"] == KEY


@pytest.mark.parametrize("fmt", FORMATS)
async def test_no_provider_usage_gives_estimate(fmt):
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, ["some ", "answer ", "text"], usage=None))
        frames = await run_stream(c, fmt)
    usage = frames[-1]["usage"]
    assert frames[-1]["status"] == "completed"
    assert usage["estimated"] is True and usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] > 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_calls", [1, 2])
async def test_tool_calls_exact_arguments(fmt, n_calls):
    calls = [tool_call("get_weather", {"city": "Paris", "unit": "celsius"}),
             tool_call("get_time", {"tz": "Europe/Paris", "fmt": "%H:%M"})][:n_calls]
    reason = {"openai": {"finish_reason": "tool_calls"}, "anthropic": {"stop_reason": "tool_use"}}
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, ["Checking."] if fmt == "anthropic" else [], tool_calls=calls,
                          **reason[fmt]))
        frames = await run_stream(c, fmt, tools=[
            {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {}}}])
    complete = of_type(frames, "tool_call_complete")
    assert [(f["index"], f["call_id"], f["name"], f["arguments"]) for f in complete] == [
        (i, call.id, call.name, call.arguments) for i, call in enumerate(calls)]
    chunks = of_type(frames, "tool_call_chunk")
    for i, call in enumerate(calls):
        mine = [ch for ch in chunks if ch["index"] == i]
        assert "".join(ch["arguments_delta"] for ch in mine) == call.arguments
        assert mine[0]["name"] == call.name and {ch["call_id"] for ch in mine} == {call.id}
    if n_calls == 2 and fmt == "openai":  # the wire interleaves the two calls' deltas
        assert [ch["index"] for ch in chunks if ch["arguments_delta"]][:3] == [0, 1, 0]
    assert frames[-1]["reason"] == "tool_calls" and frames[-1]["usage"]["estimated"] is False


@pytest.mark.parametrize("fmt", FORMATS)
async def test_tool_round_trip_reaches_provider_in_its_format(fmt):
    call = tool_call("get_weather", {"city": "Paris"})
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object",
                                              "properties": {"city": {"type": "string"}}}}}]
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, ["It is 21 C."]))
        frames = await run_stream(c, fmt, messages=messages, tools=tools)
    assert frames[-1]["status"] == "completed" and text_of(frames) == "It is 21 C."
    body = up.requests[0].json
    if fmt == "openai":
        sent = body["messages"]
        assert sent[1]["tool_calls"][0]["id"] == call.id
        assert sent[1]["tool_calls"][0]["function"]["arguments"] == call.arguments
        assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}
    else:
        assistant, result = body["messages"][1], body["messages"][2]
        use = [b for b in assistant["content"] if b["type"] == "tool_use"][0]
        assert (use["id"], use["name"], use["input"]) == (call.id, call.name, {"city": "Paris"})
        res = [b for b in result["content"] if b["type"] == "tool_result"][0]
        assert res["tool_use_id"] == call.id
        assert body["tools"][0]["name"] == "get_weather"


ERRORS = [(401, "upstream_error", "credentials"), (403, "upstream_error", "credentials"),
          (429, "upstream_rate_limited", "rate limit"), (500, "upstream_error", "HTTP 500")]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("status", "code", "needle"), ERRORS)
async def test_upstream_http_errors_map_to_safe_codes(fmt, status, code, needle):
    async with relay_with_upstream() as (up, c):
        up.enqueue(http_error(fmt, status, retry_after=7 if status == 429 else None,
                              message=f"invalid key {KEY} body-echo-marker"))
        frames = await run_stream(c, fmt)
        assert [f["type"] for f in frames] == ["started", "finish"]
        finish = frames[-1]
        assert (finish["status"], finish["reason"]) == ("failed", code)
        assert finish["error"]["code"] == code and needle in finish["error"]["message"]
        raw = json.dumps(finish)
        assert KEY not in raw and "body-echo-marker" not in raw
        if status == 429:
            assert finish["error"]["retry_after"] == 7
        assert len(up.requests) == 1  # no retries
        # the connection stays usable
        up.enqueue(stream(fmt, ["ok"]))
        assert (await run_stream(c, fmt, "next"))[-1]["status"] == "completed"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fault", ["cut", "malformed", "malformed_first"])
async def test_cut_or_malformed_stream_fails_with_upstream_error(fmt, fault):
    async with relay_with_upstream() as (up, c):
        base = stream(fmt, ["a", "b", "c", "d"])
        up.enqueue({"cut": base.cut_after(4), "malformed": base.malformed_at(4),
                    "malformed_first": base.malformed_at(0)}[fault])
        frames = await run_stream(c, fmt)
        assert frames[-1]["status"] == "failed" and frames[-1]["reason"] == "upstream_error"
        assert not of_type(frames, "tool_call_complete")
        assert len(up.requests) == 1
        await c.send({"type": "ping"})
        assert (await c.next_for(None))["type"] == "pong"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("kind", "timeouts", "reason"), [
    ("before_headers", {"first_token": 0.3}, "first_token_timeout"),
    ("after_headers", {"first_token": 0.3}, "first_token_timeout"),
    ("mid_stream", {"idle": 0.3}, "idle_timeout"),
    ("mid_stream", {"total": 0.4}, "total_timeout"),
])
async def test_timeouts_end_stream_and_close_upstream(fmt, kind, timeouts, reason):
    async with relay_with_upstream(**timeouts) as (up, c):
        script = stream(fmt, ["a", "b", "c"])
        if kind == "before_headers":
            script = script.silent_before_headers()
        elif kind == "after_headers":
            script = script.silent_after(0)
        else:  # the first text delta is out, then silence
            script = script.silent_after(3 if fmt == "openai" else 4)
        up.enqueue(script)
        frames = await run_stream(c, fmt)
        assert (frames[-1]["status"], frames[-1]["reason"]) == ("timeout", reason)
        assert frames[-1]["error"]["code"] == "upstream_timeout"
        await up.requests[0].wait_disconnected(timeout=1.0)


async def _measure_close(up: FakeUpstream, action) -> float:
    req = await up.wait_request()
    t0 = time.monotonic()
    result = action()
    if result is not None:
        await result
    closed_at = await req.wait_disconnected(timeout=2.0)
    return closed_at - t0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("when", ["silent_before_first_token", "mid_stream_silent",
                                  "mid_stream_flowing"])
async def test_cancel_closes_upstream_within_100ms(fmt, when):
    async with relay_with_upstream() as (up, c):
        base = stream(fmt, [f"t{i} " for i in range(400)])
        if when == "silent_before_first_token":
            script = base.silent_after(0)
        elif when == "mid_stream_silent":
            script = base.silent_after(5)
        else:
            script = base.with_delay(0.01)
        up.enqueue(script)
        await c.start("s", model=ALIAS[fmt])
        assert (await c.next_for("s"))["type"] == "started"
        if when != "silent_before_first_token":
            assert (await c.next_for("s"))["type"] == "token"
        elapsed = await _measure_close(up, lambda: c.send({"type": "cancel", "id": "s"}))
        assert elapsed < 0.1, f"upstream closed {elapsed * 1000:.0f} ms after cancel"
        frames = await c.collect("s")
        assert frames[-1]["status"] == "cancelled"
        assert not up.requests[0].completed


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("silent", [True, False])
async def test_client_disconnect_closes_upstream_within_100ms(fmt, silent):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up)) as server:
            base = stream(fmt, [f"t{i} " for i in range(400)])
            up.enqueue(base.silent_after(0) if silent else base.with_delay(0.01))
            async with Client.connect(server.url) as c:
                await c.start("s", model=ALIAS[fmt])
                await c.next_for("s")
                elapsed = await _measure_close(up, c.ws.transport.abort)
            assert elapsed < 0.1, f"upstream closed {elapsed * 1000:.0f} ms after disconnect"


async def test_per_alias_timeouts_and_max_tokens_ceiling_from_config(tmp_path, monkeypatch):
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[models.small]\nmodel = "demo"\nmax_tokens = 5\nfirst_token_timeout = 2\n'
                   '[models.gpt]\nmodel = "openai/gpt-4o-mini"\napi_key_env = "FAKE_PROVIDER_KEY"\n'
                   'idle_timeout = 3\n')
    registry = build_registry(RelaySettings(config=cfg, demo_tps=0, idle_timeout=9))
    assert registry.aliases == ["small", "gpt"]
    assert registry.resolve("small").timeouts == Timeouts(2.0, 9.0, 600.0)
    assert registry.resolve("gpt").timeouts == Timeouts(60.0, 3.0, 600.0)
    async with start_relay(registry=registry) as server, Client.connect(server.url) as c:
        assert c.welcome["models"] == ["small", "gpt"]
        await c.start("a", model="small", params={"max_tokens": 6})
        err = await c.next_for("a")
        assert err["code"] == "bad_request" and "ceiling 5" in err["message"]
        await c.start("b", model="small")
        frames = await c.collect("b")
        assert frames[-1]["reason"] == "length" and len(of_type(frames, "token")) == 5
        await c.start("c", model="demo")
        assert (await c.next_for("c"))["code"] == "unknown_model"


@pytest.mark.parametrize(("toml", "needle"), [
    ('[models.x]\nmodel = "openai/gpt"\napi_key = "sk-123"\n', "api_key_env"),
    ('[models.x]\nmodel = "openai/gpt"\napi_key_env = "UNSET_FOR_TEST_XYZ"\n',
     "UNSET_FOR_TEST_XYZ"),
    ('[models.x]\nmodel = "nosuchprovider/zzz"\n', "provider"),
    ('[models.x]\nmodel = "openai/gpt"\nparams = { api_base = "http://x" }\n', "api_base"),
    ('[models.x]\nmodel = "openai/gpt"\nwhatever = 1\n', "whatever"),
])
def test_misconfigured_alias_stops_startup_naming_it(tmp_path, toml, needle):
    from relay.app import ConfigError

    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        build_registry(RelaySettings(config=cfg))
    assert "'x'" in str(info.value) and needle in str(info.value)
    assert "sk-123" not in str(info.value)


class _RelayBug(TypeError):
    """What a bug in the relay's own chunk handling raises in the tests below."""


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_bug_in_the_relays_chunk_handling_is_internal_error_not_upstream_error(
        fmt, monkeypatch, caplog):
    """Issue 12: the streamer's ``except Exception`` reported the relay's own bugs as
    ``upstream_error`` "cut off or malformed". A ``TypeError`` raised by our code while it
    turns a provider chunk into an event ends the stream ``failed``/``internal_error``, and
    the log has its traceback."""
    import relay.upstream.event_streamer

    def broken_text_delta(text, chunks=1):
        raise _RelayBug("a bug in the relay's chunk handling")

    monkeypatch.setattr(relay.upstream.event_streamer, "TextDelta", broken_text_delta)
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, ["a", "b", "c"]))
        with caplog.at_level("ERROR", logger="relay.upstream.event_streamer"):
            frames = await run_stream(c, fmt)
        await c.send({"type": "ping"})                  # the connection is unaffected
        assert (await c.next_for(None))["type"] == "pong"
    finish = frames[-1]
    assert (finish["type"], finish["status"], finish["reason"]) == (
        "finish", "failed", "internal_error")
    assert finish["error"]["code"] == "internal_error"
    bugs = [r for r in caplog.records if r.name == "relay.upstream.event_streamer" and r.exc_info]
    assert bugs and bugs[0].levelname == "ERROR"
    assert isinstance(bugs[0].exc_info[1], _RelayBug)
    assert "broken_text_delta" in caplog.text          # the traceback, not just a line


@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_real_upstream_cut_is_still_upstream_error_without_a_traceback(fmt, caplog):
    async with relay_with_upstream() as (up, c):
        up.enqueue(stream(fmt, ["a", "b", "c", "d"]).cut_after(4))
        with caplog.at_level("WARNING", logger="relay.upstream.event_streamer"):
            frames = await run_stream(c, fmt)
    finish = frames[-1]
    assert (finish["status"], finish["reason"]) == ("failed", "upstream_error")
    assert finish["error"]["code"] == "upstream_error"
    assert not [r for r in caplog.records if r.name == "relay.upstream.event_streamer" and r.exc_info]
    assert any("upstream failure" in r.getMessage() for r in caplog.records)
