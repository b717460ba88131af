"""/ai-sdk: the AI SDK's WebSocket chat protocol against the real relay (real socket, real
LiteLLM provider code, loopback fake upstreams). The real ``ai`` package drives the same
endpoint in tests/relay/test_aisdk_transport.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relay.core.auth import mint_token
from tests.fakes.upstream import FakeUpstream, Usage, stream, tool_call

from .helpers import RECV_TIMEOUT, eventually, start_relay
from .test_providers import KEY, registry_for

pytestmark = pytest.mark.usefixtures("provider_key")


@pytest.fixture
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


def ui_user(text: str, mid: str = "u1") -> dict:
    return {"id": mid, "role": "user", "parts": [{"type": "text", "text": text}]}


def send_frame(rid: str, chat: str, messages: list[dict], **body: Any) -> dict:
    return {"type": "send", "requestId": rid, "id": chat, "trigger": "submit-message",
            "messageId": None, "messages": messages, "headers": {}, "body": body,
            "metadata": None}


class AiClient:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.by_request: dict[str, list[dict]] = {}

    async def send(self, frame: dict) -> None:
        await self.ws.send(json.dumps(frame))

    async def until_done(self, rid: str) -> list[dict]:
        """Frames of request ``rid`` through its ``end``/``error``/``no-active``."""
        import asyncio

        async with asyncio.timeout(RECV_TIMEOUT * 3):
            while True:
                frames = self.by_request.get(rid, [])
                if frames and frames[-1]["type"] in ("end", "error", "no-active"):
                    return frames
                frame = json.loads(await self.ws.recv())
                self.by_request.setdefault(frame["requestId"], []).append(frame)

    async def next_of(self, rid: str, n: int) -> list[dict]:
        import asyncio

        async with asyncio.timeout(RECV_TIMEOUT * 3):
            while len(self.by_request.get(rid, [])) < n:
                frame = json.loads(await self.ws.recv())
                self.by_request.setdefault(frame["requestId"], []).append(frame)
        return self.by_request[rid]


class Browser:
    """One browser's cookie jar: the chat owner cookie the relay sets on an /ai-sdk upgrade
    is sent back on the next one, as a browser does (cookies ignore the port, so two
    relays on one host share it too)."""

    def __init__(self) -> None:
        self.cookie: str | None = None


@contextlib.asynccontextmanager
async def ai_client(server, browser: Browser | None = None, **kwargs):
    url = f"ws://127.0.0.1:{server.port}/ai-sdk"
    if browser is not None and browser.cookie is not None:
        kwargs["additional_headers"] = {**kwargs.get("additional_headers", {}),
                                        "Cookie": browser.cookie}
    async with connect(url, **kwargs) as ws:
        if browser is not None:
            for line in ws.response.headers.get_all("Set-Cookie"):
                browser.cookie = line.split(";", 1)[0]
        yield AiClient(ws)


@contextlib.asynccontextmanager
async def relay(**settings):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up), **settings) as server:
            yield up, server


def chunks(frames: list[dict]) -> list[dict]:
    assert [f["sequence"] for f in frames if f["type"] == "chunk"] == \
        list(range(sum(1 for f in frames if f["type"] == "chunk"))), "sequence has gaps"
    return [f["chunk"] for f in frames if f["type"] == "chunk"]


def text_of(cs: list[dict]) -> str:
    return "".join(c["delta"] for c in cs if c["type"] == "text-delta")


async def test_send_streams_text_chunks_then_finish_and_end():
    async with relay() as (up, server), ai_client(server) as c:
        script = up.enqueue(stream("openai", ["Hel", "lo ", "world"],
                                   reasoning=["Think", "ing"], usage=Usage(11, 7)))
        await c.send(send_frame("r1", "chat1", [ui_user("hi")], model="oai"))
        frames = await c.until_done("r1")
    cs = chunks(frames)
    assert frames[-1] == {"type": "end", "requestId": "r1"}
    kinds = [x["type"] for x in cs]
    assert kinds[:2] == ["start", "start-step"]
    assert kinds[-2:] == ["finish-step", "finish"]
    assert cs[0]["messageId"].startswith("msg_")
    assert text_of(cs) == script.text == "Hello world"
    assert "".join(x["delta"] for x in cs if x["type"] == "reasoning-delta") == "Thinking"
    # every delta sits between its part's start and end
    for kind in ("text", "reasoning"):
        ids = {x["id"] for x in cs if x["type"] == f"{kind}-delta"}
        for pid in ids:
            positions = [i for i, x in enumerate(cs) if x.get("id") == pid]
            assert cs[positions[0]]["type"] == f"{kind}-start"
            assert cs[positions[-1]]["type"] == f"{kind}-end"
    finish = cs[-1]
    assert finish["finishReason"] == "stop"
    assert finish["messageMetadata"]["usage"] == {
        "inputTokens": 11, "outputTokens": 7, "totalTokens": 18, "estimated": False}
    sent = up.requests[0].json
    assert sent["messages"] == [{"role": "user", "content": "hi"}]


async def test_default_model_is_the_first_alias():
    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(stream("openai", ["x"]))
        await c.send(send_frame("r1", "chat", [ui_user("hi")]))
        frames = await c.until_done("r1")
    assert frames[-1]["type"] == "end"
    assert up.requests[0].path.endswith("/chat/completions")   # "oai" is the first alias


async def test_tool_call_chunks_and_tool_result_round_trip():
    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(stream("openai", [], tool_calls=[
            tool_call("get_weather", {"city": "Paris"}, id="call_1")],
            ))
        tools = [{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {
                "city": {"type": "string"}}}}}]
        await c.send(send_frame("r1", "chat", [ui_user("weather?")], model="oai", tools=tools))
        cs = chunks(await c.until_done("r1"))
        starts = [x for x in cs if x["type"] == "tool-input-start"]
        assert starts == [{"type": "tool-input-start", "toolCallId": "call_1",
                           "toolName": "get_weather"}]
        deltas = "".join(x["inputTextDelta"] for x in cs if x["type"] == "tool-input-delta")
        assert json.loads(deltas) == {"city": "Paris"}
        available = [x for x in cs if x["type"] == "tool-input-available"]
        assert available == [{"type": "tool-input-available", "toolCallId": "call_1",
                              "toolName": "get_weather", "input": {"city": "Paris"}}]
        assert cs[-1]["finishReason"] == "tool-calls"
        # next turn: the client ran the tool; its output reaches the model as a tool message
        up.enqueue(stream("openai", ["Sunny."]))
        assistant = {"id": cs[0]["messageId"], "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "tool-get_weather", "toolCallId": "call_1", "state": "output-available",
             "input": {"city": "Paris"}, "output": {"temp": 21}},
            {"type": "reasoning", "text": "never sent back"}]}
        await c.send(send_frame("r2", "chat", [ui_user("weather?"), assistant], model="oai",
                                tools=tools))
        assert text_of(chunks(await c.until_done("r2"))) == "Sunny."
    sent = up.requests[1].json["messages"]
    assert sent[1]["role"] == "assistant"
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":21}'}
    assert "never sent back" not in json.dumps(sent)


async def test_abort_closes_the_upstream_and_the_chat_takes_a_new_turn():
    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(stream("openai", [f"t{i} " for i in range(400)]).with_delay(0.01))
        await c.send(send_frame("r1", "chat", [ui_user("long")], model="oai"))
        await c.next_of("r1", 4)                     # start, start-step, text-start, delta
        await c.send({"type": "abort", "requestId": "r1"})
        await up.requests[0].wait_disconnected(timeout=2.0)
        frames = await c.until_done("r1")
        assert chunks(frames)[-1]["type"] == "abort"
        assert not up.requests[0].completed
        up.enqueue(stream("openai", ["again"]))
        await c.send(send_frame("r2", "chat", [ui_user("again")], model="oai"))
        assert text_of(chunks(await c.until_done("r2"))) == "again"
    assert server.metrics.upstream_closed_on_cancel._value.get() >= 1


async def test_second_send_while_a_response_runs_is_refused():
    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(stream("openai", ["a"]).silent_after(0))
        await c.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
        await up.wait_request()
        await c.send(send_frame("r2", "chat", [ui_user("y")], model="oai"))
        frames = await c.until_done("r2")
        assert frames == [{"type": "error", "requestId": "r2",
                           "errorText": "A response is already active for this chat."}]
        await c.send({"type": "abort", "requestId": "r1"})
        await c.until_done("r1")


async def test_resume_replays_whole_message_with_same_id_then_live_rest():
    browser = Browser()
    async with relay(detach_grace=30) as (up, server):
        up.enqueue(stream("openai", [f"w{i} " for i in range(30)]).with_delay(0.02))
        async with ai_client(server, browser) as a:
            await a.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
            first = await a.next_of("r1", 6)
            message_id = first[0]["chunk"]["messageId"]
        async with ai_client(server, browser) as b:
            await b.send({"type": "resume", "requestId": "q1", "id": "chat", "headers": {},
                          "body": {}, "metadata": None})
            frames = await b.until_done("q1")
        assert frames[0] == {"type": "start", "requestId": "q1"}
        cs = chunks(frames[1:])
        assert cs[0] == {"type": "start", "messageId": message_id}
        assert text_of(cs) == "".join(f"w{i} " for i in range(30))
        assert frames[-1]["type"] == "end"
        # and a finished, retained response replays too; an unknown chat is no-active
        async with ai_client(server, browser) as d:
            await d.send({"type": "resume", "requestId": "q2", "id": "chat", "headers": {},
                          "body": {}})
            again = await d.until_done("q2")
            assert text_of(chunks(again[1:])) == text_of(cs)
            await d.send({"type": "resume", "requestId": "q3", "id": "nope", "headers": {},
                          "body": {}})
            assert await d.until_done("q3") == [{"type": "no-active", "requestId": "q3"}]


async def test_failure_is_an_error_frame_with_a_safe_text_and_nothing_after():
    from tests.fakes.upstream import http_error

    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(http_error("openai", 500, message=f"internal detail {KEY}"))
        await c.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
        frames = await c.until_done("r1")
    assert frames[-1]["type"] == "error"
    assert "detail" not in frames[-1]["errorText"] and KEY not in json.dumps(frames)
    assert all(f["type"] != "end" for f in frames)


async def test_four_chats_on_one_socket_never_mix():
    async with relay() as (up, server), ai_client(server) as c:
        for i in range(4):
            up.enqueue(stream("openai", [f"c{i}-{j} " for j in range(20)]).with_delay(0.005))
        for i in range(4):
            await c.send(send_frame(f"r{i}", f"chat{i}", [ui_user(str(i))], model="oai"))
        results = {f"r{i}": await c.until_done(f"r{i}") for i in range(4)}
    texts = sorted(text_of(chunks(f)) for f in results.values())
    assert texts == sorted("".join(f"c{i}-{j} " for j in range(20)) for i in range(4))


@pytest.mark.parametrize("frame, closes", [
    ("not json", True),
    ('{"type": "send"}', True),                                   # no requestId
    ('{"type": "bogus", "requestId": "r9"}', False),
    ('{"type": "send", "requestId": "r9", "id": "c", "trigger": "submit-message",'
     ' "messages": [], "headers": {}, "body": {}}', False),        # no messages
    ('{"type": "send", "requestId": "r9", "id": "c", "trigger": "submit-message",'
     ' "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "x"}]}],'
     ' "headers": {}, "body": {"model": "nope"}}', False),          # unknown alias
])
async def test_bad_frames(frame, closes):
    async with relay() as (up, server):
        async with ai_client(server) as bad, ai_client(server) as good:
            await bad.ws.send(frame)
            if closes:
                with pytest.raises(ConnectionClosed) as info:
                    await bad.until_done("never")
                assert info.value.rcvd.code == 1008
            else:
                frames = await bad.until_done("r9")
                assert frames[-1]["type"] == "error" and frames[-1]["errorText"]
            up.enqueue(stream("openai", ["fine"]))
            await good.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
            assert text_of(chunks(await good.until_done("r1"))) == "fine"


async def test_auth_per_request_header_and_only_the_same_principal_resumes(monkeypatch):
    secret = "s" * 32
    monkeypatch.setenv("RELAY_TOKEN_SECRET", secret)
    alice = mint_token(secret, "alice", 600)
    bob = mint_token(secret, "bob", 600)
    async with relay(auth=True, detach_grace=30) as (up, server):
        async with ai_client(server) as c:
            await c.send(send_frame("r0", "chat", [ui_user("x")], model="oai"))
            refused = await c.until_done("r0")
            assert refused[-1]["type"] == "error"
            assert "Not authenticated" in refused[-1]["errorText"]
            up.enqueue(stream("openai", ["secret answer"]))
            frame = send_frame("r1", "chat", [ui_user("x")], model="oai")
            frame["headers"] = {"authorization": f"Bearer {alice}"}
            await c.send(frame)
            assert text_of(chunks(await c.until_done("r1"))) == "secret answer"
        async with ai_client(server) as other:
            await other.send({"type": "resume", "requestId": "q1", "id": "chat",
                              "headers": {"authorization": f"Bearer {bob}"}, "body": {}})
            assert await other.until_done("q1") == [{"type": "no-active", "requestId": "q1"}]
        async with ai_client(server, additional_headers={
                "Authorization": f"Bearer {alice}"}) as same:
            await same.send({"type": "resume", "requestId": "q2", "id": "chat",
                             "headers": {}, "body": {}})
            frames = await same.until_done("q2")
            assert text_of(chunks(frames[1:])) == "secret answer"


async def test_resume_on_the_other_of_two_relays_on_redis():
    """A chat running on relay A resumes on relay B: B finds it in Redis and follows the
    stream A replicates, replaying the whole message with the same messageId."""
    import uuid

    from .test_multinode import SHARED_REDIS, two_relays

    prefix = f"test:{uuid.uuid4().hex}:"
    async with FakeUpstream() as up:
        up.enqueue(stream("openai", [f"v{i} " for i in range(40)]).with_delay(0.02))
        async with two_relays(SHARED_REDIS, prefix, registry=registry_for(up),
                              detach_grace=10) as (a, b):
            browser = Browser()
            async with ai_client(a, browser) as ca:
                await ca.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
                first = await ca.next_of("r1", 6)
                message_id = first[0]["chunk"]["messageId"]
                async with ai_client(b, browser) as cb:
                    resume = {"type": "resume", "requestId": "q1", "id": "chat",
                              "headers": {}, "body": {}}
                    await eventually(lambda: len(a.chats) == 1)
                    principal = next(iter(a.chats._chats))[0]
                    # the index reaches Redis asynchronously: wait until B can see it
                    for _ in range(500):
                        if await b.replicator.store.get_chat(principal, "chat"):
                            break
                        await asyncio.sleep(0.01)
                    await cb.send(resume)
                    frames = await cb.until_done("q1")
                    assert frames[0] == {"type": "start", "requestId": "q1"}
                    cs = chunks(frames[1:])
                    assert cs[0] == {"type": "start", "messageId": message_id}
                    assert text_of(cs) == "".join(f"v{i} " for i in range(40))
                    assert frames[-1]["type"] == "end"


async def test_same_origin_check_and_connection_limit_as_ws():
    from websockets.exceptions import InvalidStatus

    async with relay(max_connections=1) as (up, server):
        with pytest.raises(InvalidStatus) as info:
            async with ai_client(server, origin="http://evil.example"):
                pass
        assert info.value.response.status_code == 403
        async with ai_client(server) as first:
            async with ai_client(server) as second:
                with pytest.raises(ConnectionClosed) as closed:
                    await second.until_done("never")
                assert closed.value.rcvd.code == 4429
            up.enqueue(stream("openai", ["ok"]))
            await first.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
            assert text_of(chunks(await first.until_done("r1"))) == "ok"


async def test_a_send_gets_the_same_decode_limits_as_a_v1_start():
    """Deep nesting is refused while parsing; the v1 start a send becomes is checked for its
    size and counts (here max_tools) before validation, like one sent on /ws."""
    async with relay() as (up, server), ai_client(server) as c:
        deep = send_frame("r1", "chat", [ui_user("x")], model="oai")
        deep["metadata"] = json.loads("[" * 40 + "1" + "]" * 40)
        await c.ws.send(json.dumps(deep))
        with pytest.raises(ConnectionClosed) as info:     # no requestId could be read
            await c.until_done("r1")
        assert info.value.rcvd.code == 1008 and "max_json_depth" in info.value.rcvd.reason
    async with relay(max_tools=2) as (up, server), ai_client(server) as c:
        tools = [{"type": "function", "function": {"name": f"t{i}"}} for i in range(3)]
        await c.send(send_frame("r2", "chat", [ui_user("x")], model="oai", tools=tools))
        frames = await c.until_done("r2")
        assert frames == [{"type": "error", "requestId": "r2", "errorText":
                           "Invalid request: 3 tools; the limit is 2 (max_tools)"}]
        assert up.requests == []


def test_the_chat_index_forgets_chats_whose_stream_left_the_hub():
    from relay.cluster.redis_store import ChatRecord
    from relay.runtime.aisdk import ChatIndex

    live = {"k-live"}
    index = ChatIndex(is_live=lambda key: key in live)
    index.set("ip:x", "keep", ChatRecord("k-live", "m"))
    for i in range(5000):
        index.set("ip:x", f"gone{i}", ChatRecord(f"k{i}", "m"))
    assert len(index) < 2100                     # pruned as it grew, not 5001
    assert index.local("ip:x", "keep") == ChatRecord("k-live", "m")


# ---------------------------------------------------------------- resume: cost and owner

def words(n: int) -> str:
    # Distinct words: the demo echoes the prompt, one token per word.
    return " ".join(f"w{i}" for i in range(n))


def resume_frame(rid: str, chat: str) -> dict:
    return {"type": "resume", "requestId": rid, "id": chat, "headers": {}, "body": {},
            "metadata": None}


def message_of(cs: list[dict]) -> dict:
    """The message a client assembles from ``cs`` (as the AI SDK's readUIMessageStream does
    for text and reasoning): its id, its parts' kinds and texts, how it finished."""
    parts: list[dict] = []
    by_id: dict[str, dict] = {}
    finish = None
    for c in cs:
        kind = c["type"]
        if kind in ("text-start", "reasoning-start"):
            by_id[c["id"]] = {"type": kind.split("-")[0], "text": ""}
            parts.append(by_id[c["id"]])
        elif kind in ("text-delta", "reasoning-delta"):
            by_id[c["id"]]["text"] += c["delta"]
        elif kind == "finish":
            finish = c
    return {"id": cs[0]["messageId"], "parts": parts, "finish": finish}


async def test_a_resume_replays_a_long_answer_merged_into_few_chunks():
    """A 3,000-token answer streamed one chunk per token replays as a handful of chunks
    (consecutive deltas joined), numbered 0, 1, 2, ... and assembling into exactly the same
    message. frame_burst 10: the replay costs more than a full bucket (24 frames), yet a
    connection that has been quiet resumes it."""
    browser = Browser()
    async with start_relay(detach_grace=30, demo_tps=0, frame_burst=10) as server:
        async with ai_client(server, browser) as a:
            await a.send(send_frame("r1", "long", [ui_user(words(3000))]))
            live = chunks(await a.until_done("r1"))
        async with ai_client(server, browser) as b:
            await b.send(resume_frame("q1", "long"))
            frames = await b.until_done("q1")
    assert frames[0] == {"type": "start", "requestId": "q1"} and frames[-1]["type"] == "end"
    replay = chunks(frames[1:])
    assert len(live) > 3000
    assert len(replay) <= 10, [c["type"] for c in replay]
    assert message_of(replay) == message_of(live)
    assert "w2999" in text_of(replay)


async def test_a_resume_flood_closes_4429_and_another_connection_streams_on():
    """Each resume pays its replay from the connection's frame budget: one frame per 128
    replayed events. A 2,000-token retained answer costs 16 + the frame itself; with a
    burst of 40 (refilling 0.5/s) a connection that floods resumes of it gets at most two
    replays, then close 4429; another connection's stream goes on to its end."""
    browser = Browser()
    async with start_relay(detach_grace=30, demo_tps=0, frames_per_second=0.5,
                           frame_burst=40) as server:
        async with ai_client(server, browser) as a:
            await a.send(send_frame("r1", "long", [ui_user(words(2000))]))
            await a.until_done("r1")
        [retained] = server.hub.streams()
        assert 1920 < len(retained.log) <= 2048          # 16 frames' worth of events
        async with ai_client(server, browser) as flooder, ai_client(server) as other:
            await other.send(send_frame("o1", "mine", [ui_user(words(500))]))
            for i in range(10):
                await flooder.send(resume_frame(f"q{i}", "long"))
            with pytest.raises(ConnectionClosed) as closed:
                await flooder.until_done("never")
            assert closed.value.rcvd.code == 4429
            started = [rid for rid, fs in flooder.by_request.items()
                       if fs and fs[0]["type"] == "start"]
            assert set(started) <= {"q0", "q1"}, started
            mine = chunks(await other.until_done("o1"))
            assert message_of(mine)["finish"]["finishReason"] == "stop"
            assert "w499" in text_of(mine)
            # and that connection keeps its budget: it resumes the long answer too
            await other.send(resume_frame("o2", "mine"))
            assert (await other.until_done("o2"))[-1]["type"] == "end"


async def test_resumes_on_new_connections_are_refused_once_the_address_replay_budget_is_spent():
    """A reload pays its replay from the principal's replay budget (here the address's),
    which a new connection does not refill: a browser that resumes a 2,000-token answer on
    a new connection again and again gets two replays out of 5,000 events, then an
    ``error`` for each further resume saying when to resume again (the connection stays
    and answers its next request); a browser at another address resumes its chat fine."""
    flooder_at, other_at = {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.2"}
    flooder, other = Browser(), Browser()
    async with start_relay(detach_grace=30, demo_tps=0, trusted_proxies=["127.0.0.1"],
                           replay_events_per_second=1, replay_event_burst=5_000) as server:
        for browser, at in ((flooder, flooder_at), (other, other_at)):
            async with ai_client(server, browser, additional_headers=at) as c:
                await c.send(send_frame("r1", "long", [ui_user(words(2000))]))
                assert "w1999" in text_of(chunks(await c.until_done("r1")))
        answers = []
        for i in range(4):
            async with ai_client(server, flooder, additional_headers=flooder_at) as c:
                await c.send(resume_frame(f"q{i}", "long"))
                frames = await c.until_done(f"q{i}")
                answers.append(frames)
                if frames[-1]["type"] == "error":
                    await c.send(resume_frame("next", "no-such-chat"))
                    assert await c.until_done("next") == [
                        {"type": "no-active", "requestId": "next"}]
        for frames in answers[:2]:
            assert frames[-1]["type"] == "end" and "w1999" in text_of(chunks(frames))
        for i, frames in enumerate(answers[2:], start=2):
            [error] = frames
            assert error["type"] == "error" and error["requestId"] == f"q{i}"
            assert "resume again in" in error["errorText"], error
        async with ai_client(server, other, additional_headers=other_at) as c:
            await c.send(resume_frame("o1", "long"))
            frames = await c.until_done("o1")
            assert frames[-1]["type"] == "end" and "w1999" in text_of(chunks(frames))


async def test_a_client_behind_the_same_address_cannot_resume_or_take_over_a_chat():
    """Without --auth a chat belongs to its address AND its browser's owner cookie: another
    client from the same address that knows the chat id ("my-chat") finds nothing, takes
    nothing over, and may use the same id for a chat of its own; a forged cookie is another
    owner; the owner's browser resumes the chat on a new connection."""
    owner, neighbour = Browser(), Browser()
    prompt = words(300)
    async with start_relay(detach_grace=30, demo_tps=300) as server:
        async with ai_client(server, owner) as a:
            assert owner.cookie is not None and owner.cookie.startswith("llm-relay-chat-owner=")
            await a.send(send_frame("r1", "my-chat", [ui_user(prompt)]))
            first = await a.next_of("r1", 6)
            async with ai_client(server, neighbour) as n:
                assert neighbour.cookie is not None and neighbour.cookie != owner.cookie
                await n.send(resume_frame("q1", "my-chat"))
                assert await n.until_done("q1") == [{"type": "no-active", "requestId": "q1"}]
                # the same chat id is the neighbour's own chat, not "already active"
                await n.send(send_frame("n1", "my-chat", [ui_user("mine")]))
                assert "mine" in text_of(chunks(await n.until_done("n1")))
            forged = Browser()
            forged.cookie = "llm-relay-chat-owner=" + "A" * 32
            async with ai_client(server, forged) as f:
                await f.send(resume_frame("q2", "my-chat"))
                assert await f.until_done("q2") == [{"type": "no-active", "requestId": "q2"}]
            # the owner's stream was never taken over: it runs to its end here
            frames = await a.until_done("r1")
            assert frames[-1] == {"type": "end", "requestId": "r1"}
            live = chunks(frames)
        async with ai_client(server, owner) as again:       # a reload: a new connection
            await again.send(resume_frame("q3", "my-chat"))
            replay = chunks((await again.until_done("q3"))[1:])
    assert replay[0] == {"type": "start", "messageId": first[0]["chunk"]["messageId"]}
    assert message_of(replay) == message_of(live)


async def test_the_owner_cookie_is_issued_once_http_only_and_a_bad_one_is_replaced():
    from relay.runtime.aisdk import CHAT_OWNER_COOKIE

    async with start_relay() as server:
        browser = Browser()
        async with ai_client(server, browser) as c:
            [line] = c.ws.response.headers.get_all("Set-Cookie")
        name, _, rest = line.partition("=")
        value, *attributes = [p.strip() for p in rest.split(";")]
        assert name == CHAT_OWNER_COOKIE and len(value) == 32
        assert set(attributes) == {"Path=/ai-sdk", "HttpOnly", "SameSite=Strict"}
        async with ai_client(server, browser) as c:        # sent back: none issued
            assert c.ws.response.headers.get_all("Set-Cookie") == []
        weak = Browser()
        weak.cookie = f"{CHAT_OWNER_COOKIE}=my"            # not one the relay issues
        async with ai_client(server, weak) as c:
            assert weak.cookie != f"{CHAT_OWNER_COOKIE}=my"
            assert len(weak.cookie.partition("=")[2]) == 32


async def test_the_chat_record_in_redis_expires_with_its_response():
    """With --redis, a chat's record lives as long as its response is retained: the
    stream's record TTL (max(--redis-owner-ttl, --detach-grace) = 12 s here) while it runs,
    refreshed by the owner's heartbeat (every 4 s), then --detach-grace (1 s) from its
    finish; not --total-timeout + --detach-grace (615 s by default: 10k sends left 9,625
    keys). The TTLs are read from the real Redis; nothing waits for an expiry."""
    import uuid

    from redis.asyncio import Redis

    from .test_multinode import SHARED_REDIS

    prefix = f"test:{uuid.uuid4().hex}:"
    raw = Redis.from_url(SHARED_REDIS)
    try:
        async with start_relay(redis_url=SHARED_REDIS, redis_prefix=prefix, demo_tps=25,
                               detach_grace=1, redis_owner_ttl=12) as server, \
                ai_client(server, Browser()) as c:
            # ~230 tokens at 25/s: the answer runs ~9 s, two heartbeats or more
            await c.send(send_frame("r1", "ttl-chat", [ui_user(words(200))]))
            await c.next_of("r1", 4)
            [owner] = [o for o, chat in server.chats._chats if chat == "ttl-chat"]
            key = server.replicator.store._chat_key(owner, "ttl-chat")
            async with asyncio.timeout(10):
                while (ttl := await raw.pttl(key)) < 0:
                    await asyncio.sleep(0.01)
            assert ttl <= 12_000
            # While it streams the TTL never exceeds the record's, and a heartbeat raises it
            # again (without one it only counts down).
            received, lowest, refreshed = 4, ttl, False
            while not refreshed:
                received += 1
                frames = await c.next_of("r1", received)
                assert frames[-1]["type"] == "chunk", "the answer ended without a refresh"
                ttl = await raw.pttl(key)
                assert 0 < ttl <= 12_000
                refreshed = ttl > lowest + 1000
                lowest = min(lowest, ttl)
            assert (await c.until_done("r1"))[-1]["type"] == "end"
            # Finished: within moments it expires with the response's retention (1 s). A
            # record left at the running TTL would need many seconds to count down there.
            async with asyncio.timeout(3):
                while await raw.pttl(key) > 1000:
                    await asyncio.sleep(0.01)
    finally:
        keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()


async def test_a_long_replay_lets_other_connections_run_between_writer_passes():
    """A replay is read from the log in writer passes of 256 events, and a send that finds
    room in the socket buffer does not yield: without a yield between passes a merged
    replay of thousands of events (few sends) held the event loop from its first event to
    its last, and every other connection waited. Counted in loop turns, not time: another
    task runs between (almost) every two reads of the log."""
    browser = Browser()
    async with start_relay(detach_grace=30, demo_tps=0) as server:
        async with ai_client(server, browser) as a:
            await a.send(send_frame("r1", "long", [ui_user(words(6000))]))
            await a.until_done("r1")
        [stream] = server.hub.streams()
        turns = 0
        reads: list[int] = []
        read = stream.log.after

        def counted_read(seq: int, limit: int = 1024):
            reads.append(turns)
            return read(seq, limit)

        async def other_connection() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        stream.log.after = counted_read
        other = asyncio.create_task(other_connection())
        try:
            async with ai_client(server, browser) as b:
                await b.send(resume_frame("q1", "long"))
                assert (await b.until_done("q1"))[-1]["type"] == "end"
        finally:
            other.cancel()
            await asyncio.gather(other, return_exceptions=True)
    assert len(reads) > 6000 // 256
    assert len(set(reads)) >= 0.9 * len(reads), reads


async def test_a_refusal_is_text_and_the_finish_says_content_filter():
    """OpenAI's structured-output refusal (``delta.refusal``) reaches the AI SDK's chat as
    text (its UI message stream has no refusal part), and the finish says why."""
    from tests.fakes.upstream import Script, SSEEvent

    def chunk(delta: dict, finish: str | None = None) -> SSEEvent:
        return SSEEvent(json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                    "model": "gpt-x", "choices": [{"index": 0, "delta": delta,
                                                                   "finish_reason": finish}]}))

    pieces = ["I'm sorry,", " I can't help", " with that."]
    events = [chunk({"role": "assistant", "content": None, "refusal": ""}),
              *(chunk({"refusal": p}) for p in pieces), chunk({}, "stop"), SSEEvent("[DONE]")]
    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(Script(format="openai", events=tuple(events)))
        await c.send(send_frame("r1", "chat", [ui_user("x")], model="oai"))
        frames = await c.until_done("r1")
    cs = chunks(frames)
    assert frames[-1] == {"type": "end", "requestId": "r1"}
    assert text_of(cs) == "".join(pieces)
    assert [x["type"] for x in cs if x["type"].startswith("text-")] == [
        "text-start", "text-delta", "text-delta", "text-delta", "text-end"]
    assert cs[-1]["type"] == "finish" and cs[-1]["finishReason"] == "content-filter"


@pytest.mark.parametrize(("fmt", "alias", "status"), [("anthropic", "claude", 529),
                                                      ("openai", "oai", 503)])
async def test_an_overloaded_provider_is_said_so(fmt, alias, status):
    from tests.fakes.upstream import http_error

    async with relay() as (up, server), ai_client(server) as c:
        up.enqueue(http_error(fmt, status, retry_after=3))
        await c.send(send_frame("r1", "chat", [ui_user("x")], model=alias))
        frames = await c.until_done("r1")
    assert frames[-1]["type"] == "error"
    assert "overloaded" in frames[-1]["errorText"]
