"""The OpenAI-format providers added to the fast path (Mistral, xAI, Fireworks, Cerebras,
Perplexity) and the ones LiteLLM reads with its line reader (DeepSeek, Together, hosted vLLM):
each stream reads on the fast path exactly as on LiteLLM's (issue 21, item 1).

LiteLLM reads Cerebras and Perplexity with the OpenAI SDK, like ``openai/``; the others with
its own HTTP handler, line by line, through a stream handler per provider
(``relay/upstream/fast/openai.py``: ``LINE_READ_HANDLERS``). Each scenario runs through the
relay twice against one loopback fake (an alias with ``fast = false``, then the same alias
on the fast path), and the frames, the request body and its path must be equal. The
scenarios are the ones where the readings differ: a data line that is not JSON (the line
reader skips it, the SDK fails the stream), ``[DONE]`` without a finish reason, an error
inside the stream, an HTTP 429, Mistral's content blocks (Magistral thinking), xAI's
reasoning tokens counted apart from the completion tokens.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import (
    FakeUpstream, Script, SSEEvent, Usage, http_error, stream, tool_call,
)

from .helpers import Client, start_relay
from .test_fast_path import comparable

KEY = "sk-test-SECRET-do-not-leak-0123456789"
MODELS = {
    "mistral": "mistral/mistral-small-latest",
    "xai": "xai/grok-3-mini",
    "fireworks_ai": "fireworks_ai/accounts/fireworks/models/llama-v3p3-70b-instruct",
    "cerebras": "cerebras/llama3.1-8b",
    "perplexity": "perplexity/sonar",
    "deepseek": "deepseek/deepseek-chat",
    "together_ai": "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "hosted_vllm": "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


def _chunk(delta: dict | None = None, finish: str | None = None, **extra) -> SSEEvent:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [] if delta is None else [
                {"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return SSEEvent(json.dumps(body))


def raw(*events: SSEEvent) -> Script:
    return Script(format="openai", events=events)


def scenario(name: str) -> tuple[Script, dict]:
    """(the script, extra start fields) of one scenario."""
    if name == "text_reasoning_usage":
        return stream("openai", ["Hel", "lo ", "wörld"], reasoning=["Let me ", "think."],
                      usage=Usage(17, 23)), {"params": {"temperature": 0.2, "max_tokens": 50}}
    if name == "reasoning_field":  # vLLM / Groq name
        return raw(_chunk({"role": "assistant", "reasoning": "hmm "}),
                   _chunk({"reasoning": "ok"}), _chunk({"content": "Yes"}),
                   _chunk({}, "stop"), SSEEvent("[DONE]")), {}
    if name == "tool_calls":
        calls = [tool_call("get_weather", {"city": "Paris"}),
                 tool_call("get_weather", {"city": "Lyon"})]
        return stream("openai", [], tool_calls=calls), {"tools": TOOLS}
    if name == "non_json_line":
        return stream("openai", ["a", "b", "c"]).malformed_at(2), {}
    if name == "done_without_finish":
        return raw(_chunk({"role": "assistant", "content": "cut"}), SSEEvent("[DONE]")), {}
    if name == "error_in_stream":
        return raw(_chunk({"content": "x"}),
                   SSEEvent(json.dumps({"error": {"message": "busy", "code": 503}}))), {}
    if name == "http_429":
        return http_error("openai", 429, retry_after=7), {}
    if name == "magistral_blocks":
        return raw(
            _chunk({"role": "assistant", "content": [
                {"type": "thinking", "thinking": [{"type": "text", "text": "Think "}]}]}),
            _chunk({"content": [{"type": "thinking",
                                 "thinking": [{"type": "text", "text": "more."}]}]}),
            _chunk({"content": [{"type": "text", "text": "Answer"}]}),
            _chunk({"content": " plain"}), _chunk({}, "stop"), SSEEvent("[DONE]")), {}
    if name == "reasoning_tokens_apart":  # xAI counts them outside completion_tokens
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 20,
                 "completion_tokens_details": {"reasoning_tokens": 7}}
        return raw(_chunk({"role": "assistant", "content": "Hi"}), _chunk({}, "stop"),
                   SSEEvent(json.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                        "created": 1, "model": "m", "choices": [],
                                        "usage": usage})),
                   SSEEvent("[DONE]")), {}
    raise ValueError(name)


SCENARIOS = ["text_reasoning_usage", "reasoning_field", "tool_calls", "non_json_line",
             "done_without_finish", "error_in_stream", "http_429", "reasoning_tokens_apart"]
CASES = [(p, s) for p in MODELS for s in SCENARIOS
         if not (s == "tool_calls" and p == "perplexity")]  # no function tools there
CASES.append(("mistral", "magistral_blocks"))


@contextlib.asynccontextmanager
async def relay_for(provider: str):
    async with FakeUpstream() as up:
        models = {path: {"model": MODELS[provider], "api_base": up.openai_base,
                         "api_key_env": "FAKE_PROVIDER_KEY", "fast": path == "fast"}
                  for path in ("litellm", "fast")}
        registry = ModelRegistry(load_models({"models": models}, Timeouts(10.0, 10.0, 30.0)))
        assert registry.resolve("fast").path.path == "fast", registry.resolve("fast").path
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as client:
                yield up, client


@pytest.mark.parametrize(("provider", "name"), CASES)
async def test_stream_reads_as_on_litellm(provider, name):
    script, fields = scenario(name)
    results = []
    async with relay_for(provider) as (up, client):
        for path in ("litellm", "fast"):
            before = len(up.requests)
            up.enqueue(script)
            await client.start(f"s-{path}", model=path, **fields)
            frames = await client.collect(f"s-{path}")
            assert len(up.requests) == before + 1
            results.append((frames, up.requests[before]))
    (slow, slow_req), (fast, fast_req) = results
    assert comparable(fast) == comparable(slow)
    assert fast_req.json == slow_req.json and fast_req.path == slow_req.path
    if name == "text_reasoning_usage":
        assert fast[-1]["status"] == "completed"
