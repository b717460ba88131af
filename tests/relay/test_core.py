"""v1 core through the real server, real socket, real websockets client and the embedded
demo model running inside LiteLLM's real streaming machinery."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relay.upstream.demo import DEMO_MARKDOWN, demo_reply_tokens, demo_tool_arguments
from relay.upstream.llm import demo_handler

from .helpers import Client, start_relay, text_of

HI = [{"role": "user", "content": "hi"}]
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "web search",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "limit": {"type": "integer"}}}}}


async def test_happy_path_welcome_started_tokens_finish():
    async with start_relay() as server, Client.connect(server.url) as c:
        w = c.welcome
        assert w["protocol"] == "llm-relay.v1" and w["models"] == ["demo"]
        assert w["session_id"] and w["limits"]["max_streams"] == 8
        assert w["limits"]["max_frame_bytes"] == 1 << 20
        await c.start("s1")
        frames = await c.collect("s1")
    key = frames[0].pop("stream_key")
    assert isinstance(key, str) and len(key) >= 22    # >= 128 bits, url-safe base64
    assert frames[0] == {"type": "started", "id": "s1", "seq": 0, "model": "demo"}
    tokens = [f for f in frames if f["type"] == "token"]
    assert [t["text"] for t in tokens] == demo_reply_tokens(HI)  # one frame per chunk
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs))
    finish = frames[-1]
    assert finish["type"] == "finish" and finish["status"] == "completed"
    assert finish["reason"] == "stop"
    usage = finish["usage"]
    assert usage["estimated"] is False and usage["completion_tokens"] == len(tokens)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("prompt", ["Show me some Markdown, please", "/demo markdown"])
async def test_demo_answers_a_markdown_prompt_with_every_block_the_page_renders(prompt):
    async with start_relay(demo_tps=400) as server, Client.connect(server.url) as c:
        await c.start("md", content=prompt)
        frames = await c.collect("md")
    tokens = [f["text"] for f in frames if f["type"] == "token"]
    assert "".join(tokens) == DEMO_MARKDOWN          # the frames assemble to the Markdown
    assert len(tokens) > 100                         # streamed word by word, not in one piece
    assert frames[-1]["status"] == "completed" and frames[-1]["reason"] == "stop"
    lines = DEMO_MARKDOWN.splitlines()
    assert lines[0].startswith("## ")                                   # a heading
    assert sum(line.startswith("- ") for line in lines) >= 3            # a list
    assert "| --- | --- | --- |" in lines                               # a table
    assert "```python" in lines and lines.count("```") == 1             # a fenced code block
    assert "](https://" in DEMO_MARKDOWN                                # a link


def test_demo_default_answer_stays_a_short_echo():
    tokens = demo_reply_tokens([{"role": "user", "content": "make it marked down"}])
    assert len(tokens) < 40 and "You said: make it marked down." in "".join(tokens)
    assert "##" not in "".join(tokens)


async def test_max_tokens_gives_length():
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.start("s", params={"max_tokens": 3})
        frames = await c.collect("s")
    assert len([f for f in frames if f["type"] == "token"]) == 3
    assert frames[-1]["reason"] == "length" and frames[-1]["usage"]["completion_tokens"] == 3


async def test_demo_tool_call_frames_join_exactly():
    messages = [{"role": "user", "content": "weather in Paris"}]
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.start("t", messages=messages, tools=[SEARCH_TOOL], tool_choice="auto")
        frames = await c.collect("t")
    chunks = [f for f in frames if f["type"] == "tool_call_chunk"]
    complete = [f for f in frames if f["type"] == "tool_call_complete"]
    assert len(chunks) > 1 and len(complete) == 1
    assert chunks[0]["name"] == "search"
    assert "".join(ch["arguments_delta"] for ch in chunks) == complete[0]["arguments"]
    assert complete[0]["arguments"] == demo_tool_arguments(SEARCH_TOOL, messages)
    assert json.loads(complete[0]["arguments"]) == {"query": "weather in Paris", "limit": 1}
    assert {ch["call_id"] for ch in chunks} == {complete[0]["call_id"]}
    assert frames[-1]["status"] == "completed" and frames[-1]["reason"] == "tool_calls"


async def test_two_concurrent_streams_interleave_on_one_socket():
    async with start_relay(demo_tps=400) as server, Client.connect(server.url) as c:
        await c.start("a", content="first")
        await c.start("b", content="second")
        order = []
        done = set()
        per_stream: dict[str, list[dict]] = {"a": [], "b": []}
        while done != {"a", "b"}:
            frame = await c.recv()
            order.append(frame["id"])
            per_stream[frame["id"]].append(frame)
            if frame["type"] == "finish":
                done.add(frame["id"])
    for sid, content in (("a", "first"), ("b", "second")):
        frames = per_stream[sid]
        assert frames[0]["type"] == "started" and frames[-1]["type"] == "finish"
        assert text_of(frames) == "".join(demo_reply_tokens([{"role": "user",
                                                                "content": content}]))
        assert [f["seq"] for f in frames] == list(range(len(frames)))
    # Interleaved: b's frames arrive before a has finished.
    assert order.index("b") < len(order) - order[::-1].index("a") - 1


async def test_cancel_mid_stream_closes_upstream():
    closed_before = demo_handler().closed_early
    async with start_relay(demo_tps=50) as server, Client.connect(server.url) as c:
        await c.start("s")
        assert (await c.next_for("s"))["type"] == "started"
        assert (await c.next_for("s"))["type"] == "token"
        await c.send({"type": "cancel", "id": "s"})
        rest = await c.collect("s")
        assert rest[-1]["type"] == "finish"
        assert rest[-1]["status"] == "cancelled" and rest[-1]["reason"] == "client_cancel"
        assert rest[-1]["usage"]["estimated"] is True
        assert not [f for f in rest if f["type"] == "tool_call_complete"]
        # The finish is sent only after the upstream generator was closed.
        assert demo_handler().closed_early == closed_before + 1
        # The connection stays usable.
        await c.start("again", params={"max_tokens": 2})
        assert (await c.collect("again"))[-1]["status"] == "completed"


async def test_cancel_before_first_token():
    async with start_relay(demo_tps=0.5) as server, Client.connect(server.url) as c:
        await c.start("s")
        assert (await c.next_for("s"))["type"] == "started"
        await c.send({"type": "cancel", "id": "s"})
        frames = await c.collect("s")
    assert [f["type"] for f in frames] == ["finish"]
    assert frames[0]["status"] == "cancelled"


async def test_cancel_twice_and_cancel_after_finish():
    async with start_relay(demo_tps=0.5) as server, Client.connect(server.url) as c:
        await c.start("s")
        await c.next_for("s")
        await c.send({"type": "cancel", "id": "s"})
        await c.send({"type": "cancel", "id": "s"})
        frames = await c.collect("s")
        assert frames[-1]["type"] == "finish" and frames[-1]["status"] == "cancelled"
        # The repeated cancel was absorbed, or (if it lost the race with the finish) it got
        # unknown_stream; nothing else. A ping marks the end of anything in flight.
        await c.send({"type": "ping", "data": 1})
        extra = []
        while True:
            frame = await c.recv()
            if frame["type"] == "pong":
                break
            extra.append(frame)
        assert all(f["type"] == "error" and f["code"] == "unknown_stream" for f in extra)
        assert len(extra) <= 1
        await c.send({"type": "cancel", "id": "s"})
        err = await c.next_for("s")
        assert err == {"type": "error", "code": "unknown_stream", "ref": "cancel", "id": "s",
                       "message": err["message"]}


async def test_cancel_unknown_id():
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send({"type": "cancel", "id": "nope"})
        err = await c.next_for("nope")
        assert err["type"] == "error" and err["code"] == "unknown_stream" and err["ref"] == "cancel"


async def test_ping_pong_echoes_data():
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send({"type": "ping", "data": {"t": 1}})
        assert await c.recv() == {"type": "pong", "data": {"t": 1}}
        await c.send({"type": "ping"})
        assert await c.recv() == {"type": "pong"}


BAD_FRAMES = [
    ("not json", "not valid JSON", None),
    ("[1, 2]", "must be a JSON object", None),
    ('"text"', "must be a JSON object", None),
    ("42", "must be a JSON object", None),
    ("null", "must be a JSON object", None),
    (b"\x00\x01binary", "binary", None),
    ('{"no": "type"}', "type", None),
    ('{"type": 7}', "type", None),
    ('{"type": "launch"}', "unknown frame type", "launch"),
    ('{"type": "start", "id": "x", "model": "demo"}', "messages", "start"),
    ('{"type": "start", "id": 5, "model": "demo", "messages": []}', "id", "start"),
    ('{"type": "start", "id": "", "model": "demo", "messages": [{"role": "user"}]}', "id",
     "start"),
    ('{"type": "start", "id": "x", "model": "demo", "messages": "hi"}', "messages", "start"),
    ('{"type": "start", "id": "x", "model": "demo", "messages": [{"role": "robot"}]}', "role",
     "start"),
    ('{"type": "start", "id": "x", "model": "demo", "messages": [{"role": "user", '
     '"content": "hi"}], "params": {"api_base": "http://evil"}}', "api_base", "start"),
    ('{"type": "start", "id": "x", "model": "demo", "messages": [{"role": "user", '
     '"content": "hi"}], "params": {"api_key": "sk"}}', "api_key", "start"),
    ('{"type": "start", "id": "x", "model": "demo", "messages": [{"role": "user", '
     '"content": "hi"}], "params": {"temperature": "hot"}}', "temperature", "start"),
    ('{"type": "cancel"}', "id", "cancel"),
    ('{"type": "hello"}', "already", "hello"),
]


@pytest.mark.parametrize(("raw", "needle", "ref"), BAD_FRAMES)
async def test_bad_frames_get_bad_request_and_connection_survives(raw, needle, ref):
    async with start_relay() as server, Client.connect(server.url) as c:
        await c.send(raw)
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == "bad_request", err
        assert needle in err["message"], err
        assert err.get("ref") == ref
        await c.start("ok", params={"max_tokens": 1})
        assert (await c.collect("ok"))[-1]["status"] == "completed"


async def test_start_refusals_are_errors_with_the_id():
    async with start_relay(demo_tps=0.5, max_streams=2) as server, Client.connect(server.url) as c:
        await c.start("u", model="gpt-17")
        err = await c.next_for("u")
        assert (err["code"], err["ref"], err["id"]) == ("unknown_model", "start", "u")
        await c.start("a")
        await c.start("a")
        assert (await c.next_for("a"))["type"] == "started"
        err = await c.next_for("a")
        assert (err["type"], err["code"], err["id"]) == ("error", "duplicate_id", "a")
        await c.start("b")
        await c.start("c")
        err = await c.next_for("c")
        assert (err["code"], err["id"]) == ("too_many_streams", "c")
        # a refused start produced nothing else for its id
        await c.send({"type": "cancel", "id": "a"})
        await c.send({"type": "cancel", "id": "b"})
        assert (await c.collect("a"))[-1]["status"] == "cancelled"
        assert (await c.collect("b"))[-1]["status"] == "cancelled"


async def _close_of(ws) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(5):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


@pytest.mark.parametrize("offered", [None, ["graphql-ws"]])
async def test_missing_subprotocol_closes_4406(offered):
    async with start_relay() as server:
        async with connect(server.url, subprotocols=offered) as ws:
            code, reason = await _close_of(ws)
    assert code == 4406 and "llm-relay.v1" in reason


async def test_no_hello_in_time_closes_4408():
    async with start_relay(hello_timeout=0.2) as server:
        async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
            code, _ = await _close_of(ws)
    assert code == 4408


@pytest.mark.parametrize("first", [
    '{"type": "start", "id": "a", "model": "demo", "messages": [{"role": "user"}]}',
    "{not json", b"\x01\x02", '{"type": "hello", "token": 5}', '{"type": "ping"}',
])
async def test_first_frame_not_hello_closes_4401(first):
    async with start_relay() as server:
        async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
            await ws.send(first)
            code, reason = await _close_of(ws)
    assert code == 4401 and "hello" in reason


async def test_oversize_frame_closes_1009():
    async with start_relay(max_frame_bytes=2048) as server, Client.connect(server.url) as c:
        assert c.welcome["limits"]["max_frame_bytes"] == 2048
        await c.start("big", content="x" * 4096)
        code, _ = await _close_of(c.ws)
    assert code == 1009


async def test_client_disconnect_mid_stream_closes_upstream():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(demo_tps=50) as server:
        async with Client.connect(server.url) as c:
            await c.start("s")
            await c.next_for("s")
            assert (await c.next_for("s"))["type"] == "token"
            c.ws.transport.abort()  # vanish without a close handshake
        await handler.wait_closed_early(before + 1)


async def test_server_shutdown_finishes_streams_then_closes_1001():
    async with start_relay(demo_tps=0.5) as server:
        async with Client.connect(server.url) as c:
            await c.start("s")
            await c.next_for("s")
            closing = asyncio.create_task(server.close())
            frames = await c.collect("s")
            assert frames[-1]["status"] == "cancelled"
            assert frames[-1]["reason"] == "server_shutdown"
            code, _ = await _close_of(c.ws)
            await closing
    assert code == 1001


async def test_health_endpoints_and_unknown_path():
    async with start_relay() as server:
        async def get(path: str) -> str:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status = (await reader.readline()).decode()
            writer.close()
            await writer.wait_closed()
            return status
        assert " 200 " in await get("/healthz")
        assert " 200 " in await get("/readyz")
        assert " 404 " in await get("/nope")


async def test_cancel_sent_right_after_start_is_not_lost():
    async with start_relay(demo_tps=200) as server, Client.connect(server.url) as c:
        await c.start("s")
        await c.send({"type": "cancel", "id": "s"})
        frames = await c.collect("s")
    assert frames[0]["type"] == "started"
    assert frames[-1]["status"] == "cancelled" and frames[-1]["reason"] == "client_cancel"
    assert len([f for f in frames if f["type"] == "token"]) < 5


async def test_non_ascii_bad_first_frame_still_closes_4401():
    async with start_relay() as server:
        async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
            await ws.send('{"type": "' + "é" * 200 + '"}')
            code, reason = await _close_of(ws)
    assert code == 4401 and len(reason.encode()) <= 123


async def test_a_restart_close_before_hello_ends_the_session_without_a_welcome():
    """The 1012 of a rolling restart reaches a connection still in its handshake too; a
    hello that arrives afterwards is not welcomed, and the session ends (its close task
    awaited)."""
    from .helpers import eventually

    async with start_relay() as server:
        async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
            await eventually(lambda: len(server.sessions) == 1)
            (session,) = server.sessions
            session.close_for_restart()
            await ws.send(json.dumps({"type": "hello",
                                      "client": {"name": "t", "version": "0"}}))
            received = []
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        received.append(await ws.recv())
            assert received == []
            assert (ws.close_code, ws.close_reason) == (
                1012, "relay restarting; reconnect and resume")
        await eventually(lambda: not server.sessions)
