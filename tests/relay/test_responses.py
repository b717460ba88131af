"""``/v1/responses``: the OpenAI Responses WebSocket mode, driven by the official ``openai``
SDK (``AsyncOpenAI(base_url=...).responses.connect()``) against a real relay, with LiteLLM's
real provider code against loopback fake upstreams (and the demo model). Every event the
relay sends is validated against the SDK's own ``ResponsesServerEvent`` models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types.responses.responses_server_event import ResponsesServerEvent
from pydantic import TypeAdapter
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, Usage, http_error, stream, tool_call

from ..redis_server import redis_ping
from .helpers import start_relay

SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(ResponsesServerEvent)
KEY = "sk-test-SECRET-do-not-leak-0123456789"
RELAY_KEY = "relay-key-for-responses-tests-0001"
TERMINAL = {"response.completed", "response.incomplete", "response.failed"}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
ALIAS = {"openai": "oai", "anthropic": "claude"}


def registry_for(up: FakeUpstream) -> ModelRegistry:
    defaults = Timeouts(first_token=10.0, idle=10.0, total=30.0)
    return ModelRegistry(load_models({"models": {
        "oai": {"model": "openai/gpt-x", "api_base": up.openai_base,
                "api_key_env": "FAKE_PROVIDER_KEY"},
        "claude": {"model": "anthropic/claude-x", "api_base": up.anthropic_base,
                   "api_key_env": "FAKE_PROVIDER_KEY"},
        "demo": {"model": "demo"},
    }}, defaults))


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


@contextlib.asynccontextmanager
async def relay(**settings: Any):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up), **settings) as server:
            yield up, server


def sdk(server: Any, api_key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=api_key,
                       max_retries=0)


async def next_event(conn: Any) -> dict[str, Any]:
    """The next server event as JSON, after checking it against the SDK's own models."""
    async with asyncio.timeout(10):
        raw = await conn.recv_bytes()
    event = json.loads(raw)
    SERVER_EVENT.validate_python(event)
    return event


async def until_done(conn: Any, stream_id: str | None = None) -> list[dict[str, Any]]:
    """Events through the end of the next response (of lane ``stream_id``, when given; the
    events of other lanes are skipped) or through an ``error`` event."""
    events: list[dict[str, Any]] = []
    while True:
        event = await next_event(conn)
        if stream_id is not None and event.get("stream_id") != stream_id:
            continue
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events


async def until_done_iterating(conn: Any) -> list[dict[str, Any]]:
    """``until_done`` through the SDK's own event iterator (the one that reconnects)."""
    events: list[dict[str, Any]] = []
    async for model in conn:
        event = model.to_dict()
        SERVER_EVENT.validate_python(event)
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events
    raise AssertionError("the connection ended")


def check_response(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The sequence rules of one response; its final response object."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    rid = events[0]["response"]["id"]
    assert rid.startswith("resp_")
    assert all(e["response"]["id"] == rid for e in events if "response" in e)
    return events[-1]["response"]


def deltas(events: list[dict[str, Any]], kind: str) -> str:
    return "".join(e["delta"] for e in events if e["type"] == kind)


# ---------------------------------------------------------------- turns


async def test_a_text_turn_streams_events_the_sdk_validates():
    async with relay() as (up, server):
        script = up.enqueue(stream("openai", ["Hel", "lo ", "world"], usage=Usage(11, 7)))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="hi", instructions="Be brief.",
                                       metadata={"run": "1"}, temperature=0.5)
            events = await until_done(conn)
    response = check_response(events)
    assert response["status"] == "completed"
    assert deltas(events, "response.output_text.delta") == script.text == "Hello world"
    kinds = [e["type"] for e in events]
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added",
                          "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    [message] = response["output"]
    assert message["type"] == "message" and message["status"] == "completed"
    assert message["content"][0]["text"] == "Hello world"
    item_ids = {e["item_id"] for e in events if "item_id" in e}
    assert item_ids == {message["id"]}
    assert response["usage"]["input_tokens"] == 11 and response["usage"]["output_tokens"] == 7
    assert response["usage"]["total_tokens"] == 18
    assert response["metadata"] == {"run": "1"} and response["instructions"] == "Be brief."
    sent = up.requests[0].json
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "hi"}]
    assert sent["temperature"] == 0.5


async def test_a_chained_turn_sends_the_whole_history_upstream():
    async with relay() as (up, server):
        up.enqueue(stream("openai", ["First ", "answer"]), stream("openai", ["Second"]))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="one", instructions="Be brief.")
            first = check_response(await until_done(conn))
            # model omitted: the chain's model is kept
            await conn.response.create(input=[{"role": "user", "content": [
                {"type": "input_text", "text": "two"}]}],
                previous_response_id=first["id"])
            second = check_response(await until_done(conn))
    assert second["status"] == "completed" and second["previous_response_id"] == first["id"]
    assert up.requests[1].json["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "two"},
    ]                          # (instructions apply to their own response only, as OpenAI's)


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_a_tool_round_trip_reaches_the_model_as_a_tool_result(fmt):
    call = tool_call("get_weather", {"city": "Paris"}, id="call_paris1")
    async with relay() as (up, server):
        up.enqueue(stream(fmt, ["Let me check."], tool_calls=[call]),
                   stream(fmt, ["It is sunny."]))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model=ALIAS[fmt], input="Weather in Paris?",
                                       tools=[WEATHER], tool_choice="auto")
            events = await until_done(conn)
            first = check_response(events)
            [fc] = [item for item in first["output"] if item["type"] == "function_call"]
            assert fc["name"] == "get_weather" and fc["call_id"] == "call_paris1"
            assert json.loads(fc["arguments"]) == {"city": "Paris"}
            assert deltas(events, "response.function_call_arguments.delta") == call.arguments
            [done] = [e for e in events if e["type"] == "response.function_call_arguments.done"]
            assert done["item_id"] == fc["id"] and done["arguments"] == call.arguments
            await conn.response.create(model=ALIAS[fmt], previous_response_id=first["id"],
                                       tools=[WEATHER], input=[{
                                           "type": "function_call_output",
                                           "call_id": fc["call_id"], "output": "sunny, 24C"}])
            second = check_response(await until_done(conn))
    assert second["output"][0]["content"][0]["text"] == "It is sunny."
    sent = up.requests[1].json
    if fmt == "openai":
        assistant, result = sent["messages"][-2:]
        assert assistant["role"] == "assistant"
        assert assistant["tool_calls"][0]["id"] == "call_paris1"
        assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
        assert result == {"role": "tool", "tool_call_id": "call_paris1",
                          "content": "sunny, 24C"}
    else:
        assistant, result = sent["messages"][-2:]
        assert assistant["role"] == "assistant"
        uses = [b for b in assistant["content"] if b["type"] == "tool_use"]
        assert uses[0]["id"] == "call_paris1" and uses[0]["input"] == {"city": "Paris"}
        assert result["role"] == "user"
        [tool_result] = [b for b in result["content"] if b["type"] == "tool_result"]
        assert tool_result["tool_use_id"] == "call_paris1"
        assert "sunny, 24C" in json.dumps(tool_result["content"])


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_reasoning_is_streamed_as_a_reasoning_item(fmt):
    async with relay() as (up, server):
        up.enqueue(stream(fmt, ["Answer"], reasoning=["Think", "ing"]))
        async with sdk(server).responses.connect() as conn:
            # (LiteLLM refuses reasoning_effort for a Claude model it does not know to
            # think, as claude-x; the thinking blocks stream all the same)
            await conn.response.create(model=ALIAS[fmt], input="why?",
                                       **({"reasoning": {"effort": "low"}}
                                          if fmt == "openai" else {}))
            events = await until_done(conn)
    response = check_response(events)
    assert deltas(events, "response.reasoning_text.delta") == "Thinking"
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Thinking"}]
    assert message["content"][0]["text"] == "Answer"
    if fmt == "openai":
        assert up.requests[0].json["reasoning_effort"] == "low"


async def test_max_output_tokens_ends_the_response_incomplete():
    async with relay() as (up, server):
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="demo", input="hello", max_output_tokens=3)
            response = check_response(await until_done(conn))
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["usage"]["output_tokens"] == 3


async def test_a_provider_error_is_response_failed_without_provider_detail():
    async with relay() as (up, server):
        up.enqueue(*[http_error("openai", 429)] * 4)      # (however often it is retried)
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="hi")
            events = await until_done(conn)
    response = check_response(events)
    assert events[-1]["type"] == "response.failed"
    assert response["error"]["code"] == "rate_limit_exceeded"
    text = json.dumps(events)
    assert KEY not in text and "org-fake" not in text


# ---------------------------------------------------------------- refusals


async def test_an_unknown_previous_id_is_an_error_and_the_socket_stays_usable():
    async with relay() as (up, server):
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="demo", input="hi",
                                       previous_response_id="resp_unknown")
            [error] = await until_done(conn)
            assert error["type"] == "error" and error["status"] == 400
            assert error["error"]["code"] == "previous_response_not_found"
            assert error["error"]["param"] == "previous_response_id"
            await conn.response.create(model="demo", input="hi")
            assert check_response(await until_done(conn))["status"] == "completed"


async def test_refusals_name_the_param_and_the_served_models():
    async with relay() as (up, server):
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="gpt-nope", input="hi")
            [unknown] = await until_done(conn)
            await conn.response.create(model="demo", input="hi",
                                       tools=[{"type": "web_search"}])
            [tool] = await until_done(conn)
            await conn.response.create(model="demo", input="hi", temperature=7.0)
            [bad] = await until_done(conn)
            await conn.send({"type": "response.bogus"})
            [event] = await until_done(conn)
    assert unknown["error"]["code"] == "model_not_found"
    assert "oai" in unknown["error"]["message"] and "demo" in unknown["error"]["message"]
    assert tool["error"]["code"] == "unsupported_tool"
    assert tool["error"]["param"] == "tools[0].type"
    assert bad["error"]["type"] == "invalid_request_error"
    assert bad["error"]["param"] == "temperature"
    assert event["error"]["code"] == "unknown_event"


async def test_generate_false_stores_a_chain_entry_without_calling_the_model():
    async with relay() as (up, server):
        up.enqueue(stream("openai", ["Sure"]))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="remember: blue", generate=False)
            prepared = check_response(await until_done(conn))
            assert prepared["status"] == "completed" and prepared["output"] == []
            assert not up.requests
            await conn.response.create(input="what colour?",
                                       previous_response_id=prepared["id"])
            check_response(await until_done(conn))
    assert up.requests[0].json["messages"] == [
        {"role": "user", "content": "remember: blue"},
        {"role": "user", "content": "what colour?"}]


# ---------------------------------------------------------------- lanes, cancel, disconnect


async def test_two_lanes_run_in_parallel_and_each_can_be_cancelled():
    async with relay() as (up, server):
        up.enqueue(stream("openai", ["a1", "a2", "a3"]).silent_after(2),
                   stream("openai", ["b1", "b2", "b3"]).silent_after(2))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="a", stream_id="lane-a")
            await conn.response.create(model="oai", input="b", stream_id="lane-b")
            # Both upstream requests are open at once: the lanes run in parallel.
            await up.wait_request(2)
            created: dict[str, str] = {}
            while len(created) < 2:
                event = await next_event(conn)
                if event["type"] == "response.created":
                    created[event["stream_id"]] = event["response"]["id"]
            await conn.send({"type": "response.cancel", "response_id": created["lane-a"]})
            a = await until_done(conn, "lane-a")
            await conn.send({"type": "response.cancel", "response_id": created["lane-b"]})
            b = await until_done(conn, "lane-b")
        for events, lane in ((a, "lane-a"), (b, "lane-b")):
            assert events[-1]["type"] == "response.incomplete"
            assert events[-1]["response"]["status"] == "cancelled"
            assert events[-1]["response"]["usage"] is not None
            assert all(e["stream_id"] == lane for e in events)
        for rec in up.requests:
            await rec.wait_disconnected()


async def test_a_busy_lane_queues_the_next_create_in_order():
    async with relay() as (up, server):
        up.enqueue(stream("openai", ["one"]), stream("openai", ["two"]))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="1")
            await conn.response.create(model="oai", input="2")
            first = await until_done(conn)
            second = await until_done(conn)
    assert deltas(first, "response.output_text.delta") == "one"
    assert deltas(second, "response.output_text.delta") == "two"
    check_response(first)
    check_response(second)
    # the second request went upstream only once the first had finished
    assert up.requests[1].started_at >= up.requests[0].started_at
    assert up.requests[0].completed


async def test_closing_the_socket_closes_the_upstream_request():
    # detach_grace would keep a v1 stream for a resume; this dialect has none.
    async with relay(detach_grace=15) as (up, server):
        up.enqueue(stream("openai", ["a", "b", "c"]).silent_after(2))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="hi")
            while (await next_event(conn))["type"] != "response.output_text.delta":
                pass
        rec = await up.wait_request()
        await rec.wait_disconnected()


async def test_cancel_of_an_unknown_response_is_an_error():
    async with relay() as (up, server):
        async with sdk(server).responses.connect() as conn:
            await conn.send({"type": "response.cancel", "response_id": "resp_nothing"})
            [error] = await until_done(conn)
    assert error["error"]["code"] == "response_not_found"


# ---------------------------------------------------------------- auth


async def test_auth_refuses_a_wrong_or_missing_key_and_accepts_the_relay_key():
    async with relay(auth=True, api_keys=[RELAY_KEY]) as (up, server):
        with pytest.raises(InvalidStatus) as refused:      # a wrong key: 401 at the upgrade
            async with sdk(server, api_key="wrong-key").responses.connect():
                pass
        assert refused.value.response.status_code == 401
        # No Authorization header at all (a client other than the SDK): closed 4401.
        async with connect(f"ws://127.0.0.1:{server.port}/v1/responses") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    await ws.send(json.dumps({"type": "response.create", "model": "demo",
                                              "input": "hi"}))
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert not up.requests
        async with sdk(server, api_key=RELAY_KEY).responses.connect() as conn:
            await conn.response.create(model="demo", input="hi")
            assert check_response(await until_done(conn))["status"] == "completed"


# ---------------------------------------------------------------- Redis


@pytest.fixture
def prefix():
    assert redis_ping("127.0.0.1", 6379), "these tests need Redis on 127.0.0.1:6379"
    return f"test:{uuid.uuid4().hex}:"


async def test_a_chain_continues_on_a_second_relay_sharing_redis(prefix):
    url = "redis://127.0.0.1:6379/0"
    async with FakeUpstream() as up:
        up.enqueue(stream("openai", ["On A"]), stream("openai", ["On B"]))
        async with start_relay(registry=registry_for(up), redis_url=url,
                               redis_prefix=prefix) as a, \
                start_relay(registry=registry_for(up), redis_url=url,
                            redis_prefix=prefix) as b:
            async with sdk(a).responses.connect() as conn:
                await conn.response.create(model="oai", input="first")
                first = check_response(await until_done(conn))
            # (the Redis copy is written as the response completes: wait for it)
            await a.chains.flush()
            async with sdk(b).responses.connect() as conn:
                await conn.response.create(input="second", previous_response_id=first["id"])
                second = check_response(await until_done(conn))
    assert second["status"] == "completed"
    assert up.requests[1].json["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "On A"},
        {"role": "user", "content": "second"}]


# ---------------------------------------------------------------- the agent example


async def test_the_agent_example_runs_a_tool_loop_on_the_demo_model():
    script = Path(__file__).resolve().parents[2] / "client_demo" / "responses_agent.py"
    async with start_relay() as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), "--base-url", f"http://127.0.0.1:{server.port}/v1",
            "What is the weather in Paris?",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(60):
                out, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().splitlines()
    assert lines[0].startswith("[tool] get_weather(")
    assert json.loads(lines[0].split("(", 1)[1][:-1]) == {
        "city": "What is the weather in Paris?"}
    assert lines[1] == ('The tool answered: {"city": "What is the weather in Paris?", '
                        '"forecast": "sunny", "celsius": 24}.')


class SwitchingProxy:
    """A loopback TCP proxy standing for a load balancer in front of relays: it forwards
    each new connection to ``target`` (a port), and ``switch`` points it at another relay
    and drops the connections it carries, as a relay's death would."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SwitchingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._drop()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def switch(self, target: int) -> None:
        self.target = target
        self._drop()

    def _drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        for task in (asyncio.create_task(pipe(reader, up_writer)),
                     asyncio.create_task(pipe(up_reader, writer))):
            self._links.add(task)
            task.add_done_callback(self._links.discard)


async def test_the_sdk_reconnects_to_a_second_relay_and_continues_the_chain(prefix):
    url = "redis://127.0.0.1:6379/0"
    reconnected = asyncio.Event()

    def on_reconnecting(event: Any) -> None:
        reconnected.set()

    async with FakeUpstream() as up:
        up.enqueue(stream("openai", ["On A"]), stream("openai", ["On B"]))
        async with start_relay(registry=registry_for(up), redis_url=url,
                               redis_prefix=prefix) as a, \
                start_relay(registry=registry_for(up), redis_url=url,
                            redis_prefix=prefix) as b, \
                SwitchingProxy(a.port) as proxy:
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{proxy.port}/v1",
                                 api_key="unused", max_retries=0)
            async with client.responses.connect(on_reconnecting=on_reconnecting,
                                                initial_delay=0.01, max_delay=0.05) as conn:
                await conn.response.create(model="oai", input="first")
                first = check_response(await until_done(conn))
                await a.chains.flush()
                proxy.switch(b.port)             # relay A is gone; the balancer picks B
                # The SDK reconnects while it iterates events; a create sent meanwhile is
                # queued and goes out on the new socket.
                reading = asyncio.create_task(until_done_iterating(conn))
                async with asyncio.timeout(10):
                    await reconnected.wait()
                await conn.response.create(input="second", previous_response_id=first["id"])
                async with asyncio.timeout(10):
                    second = check_response(await reading)
                assert len(b.sessions) == 1         # (the second turn was served by B)
    assert second["status"] == "completed"
    assert up.requests[1].json["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "On A"},
        {"role": "user", "content": "second"}]


async def test_structured_output_and_sampling_options_reach_the_provider():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"], "additionalProperties": False}
    async with relay() as (up, server):
        up.enqueue(stream("openai", ['{"answer":', '"yes"}']))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(
                model="oai", input="answer in JSON", max_output_tokens=64, top_p=0.5,
                parallel_tool_calls=False, tools=[WEATHER],
                text={"format": {"type": "json_schema", "name": "reply", "schema": schema,
                                 "strict": True}})
            response = check_response(await until_done(conn))
    assert json.loads(response["output"][0]["content"][0]["text"]) == {"answer": "yes"}
    assert response["text"]["format"]["type"] == "json_schema"
    sent = up.requests[0].json
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "reply", "schema": schema, "strict": True}}
    assert sent["max_tokens"] == 64 or sent.get("max_completion_tokens") == 64
    assert sent["top_p"] == 0.5 and sent["parallel_tool_calls"] is False


async def test_redis_keeps_at_most_the_entries_bound_per_principal(prefix):
    url = "redis://127.0.0.1:6379/0"
    settings = dict(redis_url=url, redis_prefix=prefix, responses_chain_entries=2)
    async with start_relay(**settings) as a, start_relay(**settings) as b:
        ids = []
        async with sdk(a).responses.connect() as conn:
            for text in ("one", "two", "three"):
                await conn.response.create(model="demo", input=text)
                ids.append(check_response(await until_done(conn))["id"])
        await a.chains.flush()
        async with sdk(b).responses.connect() as conn:
            await conn.response.create(input="again", previous_response_id=ids[0])
            [error] = await until_done(conn)
            await conn.response.create(input="again", previous_response_id=ids[1])
            continued = check_response(await until_done(conn))
    assert error["error"]["code"] == "previous_response_not_found"
    assert continued["status"] == "completed"


async def test_creates_waiting_for_their_lane_are_bounded(monkeypatch):
    monkeypatch.setattr("relay.runtime.responses.MAX_QUEUED_PER_CONNECTION", 1)
    async with relay() as (up, server):
        up.enqueue(stream("openai", ["a", "b"]).silent_after(1), stream("openai", ["two"]))
        async with sdk(server).responses.connect() as conn:
            await conn.response.create(model="oai", input="1", stream_id="x")
            first = await next_event(conn)            # running: the lane is busy
            assert first["type"] == "response.created"
            await conn.response.create(model="oai", input="2", stream_id="x")   # waits
            await conn.response.create(model="oai", input="3", stream_id="x")   # refused
            refused = (await until_done(conn, "x"))[-1]
            # (response.created goes out at launch: once the first request has reached
            # the upstream, the second gets the second script)
            await up.wait_request(1)
            await conn.send({"type": "response.cancel",
                             "response_id": first["response"]["id"]})
            assert (await until_done(conn, "x"))[-1]["response"]["status"] == "cancelled"
            second = await until_done(conn, "x")
    assert refused["error"]["code"] == "too_many_requests" and refused["status"] == 429
    assert refused["stream_id"] == "x"
    assert check_response(second)["status"] == "completed"
    assert deltas(second, "response.output_text.delta") == "two"
    assert len(up.requests) == 2


async def test_store_false_keeps_the_chain_on_its_connection_even_with_redis(prefix):
    url = "redis://127.0.0.1:6379/0"
    settings = dict(redis_url=url, redis_prefix=prefix)
    async with start_relay(**settings) as a, start_relay(**settings) as b:
        async with sdk(a).responses.connect() as conn:
            await conn.response.create(model="demo", input="secret", store=False)
            first = check_response(await until_done(conn))
            await conn.response.create(input="more", previous_response_id=first["id"],
                                       store=False)
            assert check_response(await until_done(conn))["status"] == "completed"
        await a.chains.flush()
        async with sdk(b).responses.connect() as conn:
            await conn.response.create(input="again", previous_response_id=first["id"])
            [error] = await until_done(conn)
    assert error["error"]["code"] == "previous_response_not_found"
    assert a.chains.bytes_held() == 0          # freed with its connection
