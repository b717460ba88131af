"""llm_relay_client.RelayClient against a live relay (real sockets, embedded demo model)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from llm_relay_protocol import Finish, Started, Token, ToolCallChunk, ToolCallComplete
from llm_relay_client import ConnectionLost, RelayClient, StreamRejected
from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from .helpers import start_relay

HI = [{"role": "user", "content": "hi"}]
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "parameters": {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}}}}
CHAT = Path(__file__).resolve().parents[2] / "client_demo" / "chat.py"


async def test_stream_yields_typed_events_in_order():
    async with start_relay() as server, RelayClient(server.url) as c:
        assert c.welcome is not None and c.models == ["demo"]
        s = c.stream("demo", HI, id="s1")
        assert s.id == "s1"
        events = [ev async for ev in s]
    assert isinstance(events[0], Started) and isinstance(events[-1], Finish)
    assert all(isinstance(ev, Token) for ev in events[1:-1])
    assert [ev.seq for ev in events] == list(range(len(events)))
    assert s.text == "".join(demo_reply_tokens(HI))
    assert s.finish is events[-1] and s.finish.status == "completed"
    assert s.usage.completion_tokens == len(events) - 2


async def test_complete_and_ping():
    async with start_relay() as server, RelayClient(server.url) as c:
        assert await c.ping() >= 0
        result = await c.complete("demo", HI, max_tokens=3)
        assert result.status == "completed" and result.reason == "length"
        assert result.text == "".join(demo_reply_tokens(HI)[:3])
        assert result.usage.estimated is False and result.error is None
        assert result.tool_calls == []


async def test_complete_with_tool_call():
    messages = [{"role": "user", "content": "weather in Paris"}]
    async with start_relay() as server, RelayClient(server.url) as c:
        result = await c.complete("demo", messages, tools=[SEARCH_TOOL], tool_choice="auto")
        s = c.stream("demo", messages, tools=[SEARCH_TOOL])
        kinds = {type(ev) async for ev in s}
    assert result.reason == "tool_calls" and len(result.tool_calls) == 1
    call = result.tool_calls[0]
    assert call.name == "search"
    assert json.loads(call.arguments) == {"query": "weather in Paris", "limit": 1}
    assert {ToolCallChunk, ToolCallComplete} <= kinds and s.tool_calls[0].name == "search"


async def test_two_streams_from_two_tasks_share_one_client():
    async with start_relay(demo_tps=400) as server, RelayClient(server.url) as c:
        async def run(content: str) -> str:
            result = await c.complete("demo", [{"role": "user", "content": content}])
            assert result.status == "completed"
            return result.text

        a, b = await asyncio.gather(run("first"), run("second"))
    for text, content in ((a, "first"), (b, "second")):
        assert text == "".join(demo_reply_tokens([{"role": "user", "content": content}]))


async def test_cancel_mid_stream_ends_with_cancelled_finish():
    async with start_relay(demo_tps=20) as server, RelayClient(server.url) as c:
        s = c.stream("demo", HI)
        events = []
        async for ev in s:
            events.append(ev)
            if isinstance(ev, Token):
                await s.cancel()
        assert isinstance(events[-1], Finish)
        assert s.finish.status == "cancelled" and s.finish.reason == "client_cancel"
        assert s.text and s.text != "".join(demo_reply_tokens(HI))
        # The client stays usable.
        assert (await c.complete("demo", HI, max_tokens=1)).status == "completed"


async def test_break_cancels_stream_on_server():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(demo_tps=20) as server, RelayClient(server.url) as c:
        async for ev in c.stream("demo", HI):
            if isinstance(ev, Token):
                break
        await handler.wait_closed_early(before + 1)
        s = c.stream("demo", HI)
        async for ev in s:
            if isinstance(ev, Token):
                break
        await s.aclose()  # deterministic variant: waits for the cancelled finish
        assert s.finish is not None and s.finish.status == "cancelled"
        await handler.wait_closed_early(before + 2)


async def test_unknown_model_is_rejected():
    async with start_relay() as server, RelayClient(server.url) as c:
        with pytest.raises(StreamRejected) as info:
            await c.complete("no-such-model", HI)
        assert info.value.code == "unknown_model"
        assert (await c.complete("demo", HI, max_tokens=1)).status == "completed"


async def test_server_shutdown_mid_stream_gives_cancelled_finish():
    async with start_relay(demo_tps=20) as server:
        async with RelayClient(server.url, max_reconnect_attempts=2, backoff=0.01) as c:
            s = c.stream("demo", HI)
            closing = None
            async for ev in s:
                if isinstance(ev, Token) and closing is None:
                    closing = asyncio.create_task(server.close())
            await closing
            assert s.finish.status == "cancelled" and s.finish.reason == "server_shutdown"
            # 1001 is retryable, but nothing listens any more: the attempts run out.
            with pytest.raises(ConnectionLost) as info:
                await c.ping()
            assert c.state == "closed" and info.value.close_code == 1001


async def test_abrupt_disconnect_without_reconnect_raises_connection_lost_with_partial_text():
    async with start_relay(demo_tps=50) as server, \
            RelayClient(server.url, reconnect=False) as c:
        s = c.stream("demo", HI)
        tokens = 0
        with pytest.raises(ConnectionLost) as info:
            async for ev in s:
                if isinstance(ev, Token):
                    tokens += 1
                    if tokens == 2:
                        c._ws.transport.abort()
        assert info.value.partial_text == s.text
        assert s.text.startswith("".join(demo_reply_tokens(HI)[:2]))
        assert info.value.close_code == 1006 and info.value.stream_id == s.id
        with pytest.raises(ConnectionLost):
            await c.complete("demo", HI)


async def test_chat_demo_two_turns_then_eof():
    first, second = "hello there", "and again"
    async with start_relay() as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(CHAT), "--model", "demo", "--url", server.url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(8):
            out, err = await proc.communicate(f"{first}\n{second}\n".encode())
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    for said in (first, second):
        assert "".join(demo_reply_tokens([{"role": "user", "content": said}])) in text


async def test_complete_keeps_a_refusal_apart_from_the_text(monkeypatch):
    """``refusal`` frames (OpenAI's structured-output refusal) fold into ``refusal``, not
    ``text``; the finish says content_filter."""
    from tests.fakes.upstream import FakeUpstream, Script, SSEEvent

    from .test_providers import KEY, registry_for

    def chunk(delta: dict, finish: str | None = None) -> SSEEvent:
        return SSEEvent(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                    "model": "gpt-x", "choices": [
                                        {"index": 0, "delta": delta, "finish_reason": finish}]}))

    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)
    events = [chunk({"role": "assistant", "content": None, "refusal": ""}),
              chunk({"refusal": "No, "}), chunk({"refusal": "sorry."}), chunk({}, "stop"),
              SSEEvent("[DONE]")]
    async with FakeUpstream() as up:
        up.enqueue(Script(format="openai", events=tuple(events)))
        async with start_relay(registry=registry_for(up)) as server:
            async with RelayClient(server.url) as client:
                result = await client.complete("oai", [{"role": "user", "content": "x"}])
    assert (result.refusal, result.text) == ("No, sorry.", "")
    assert (result.status, result.reason) == ("completed", "content_filter")
