"""The operator sees the path each request really took (issue 21, item 8): a request that a
fast-path alias hands to LiteLLM (``FastRoute.refusal``) is logged once with why and counted
as ``relay_requests_total{alias, path="litellm"}`` in /metrics; the startup log names the
true reason of each alias's path."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, stream

from .helpers import Client, start_relay

KEY = "sk-test-SECRET-do-not-leak-0123456789"
JSON_FORMAT = {"type": "json_object"}


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", KEY)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def requests_total(metrics: str, alias: str, path: str) -> float:
    prefix = f'relay_requests_total{{alias="{alias}",path="{path}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def fallback_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "goes through LiteLLM's path" in r.getMessage()]


@pytest.mark.parametrize(("flavour", "model", "why"), [
    ("anthropic", "anthropic/claude-x", "response_format on Anthropic"),
    ("groq", "groq/llama-3.3-70b-versatile", "response_format on groq"),
])
async def test_fallback_is_logged_once_and_counted_as_litellm(flavour, model, why, caplog):
    async with FakeUpstream() as up:
        base = up.anthropic_base if flavour == "anthropic" else up.openai_base
        registry = ModelRegistry(load_models({"models": {"m": {
            "model": model, "api_base": base, "api_key_env": "FAKE_PROVIDER_KEY"}}},
            Timeouts(10.0, 10.0, 30.0)))
        assert registry.resolve("m").path.path == "fast"
        caplog.set_level(logging.INFO, logger="relay")
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as client:
                up.enqueue(stream(flavour, ["plain"]))
                await client.start("plain", model="m")
                assert (await client.collect("plain"))[-1]["status"] == "completed"
                assert fallback_records(caplog) == []
                # The LiteLLM path's request (its outcome does not matter here: Groq's is
                # a non-streaming call the fake answers with SSE).
                await client.start("structured", model="m",
                                   params={"response_format": JSON_FORMAT})
                await client.collect("structured")
            metrics = await asyncio.to_thread(_scrape, server.port)
    records = fallback_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    assert why in records[0].getMessage()
    assert KEY not in caplog.text
    assert requests_total(metrics, "m", "fast") == 1
    assert requests_total(metrics, "m", "litellm") == 1


def test_azure_oidc_token_is_refused_with_its_reason():
    registry = ModelRegistry(load_models({"models": {"az": {
        "model": "azure/my-gpt-4o", "api_base": "https://x.openai.azure.com"}}}, Timeouts()))
    route = registry.resolve("az").path.route
    assert route is not None
    assert route.refusal({"azure_ad_token": "ey.plain.token"}) is None
    assert "oidc/" in route.refusal({"azure_ad_token": "oidc/issuer/token"})


def test_openai_tools_bridged_to_responses_api_stay_on_litellm():
    """LiteLLM sends a GPT-5.4+ request with function tools to api.openai.com through its
    Responses API: the fast path (Chat Completions) must not take that request."""
    registry = ModelRegistry(load_models({"models": {"g": {"model": "openai/gpt-5.4"}}},
                                         Timeouts()))
    route = registry.resolve("g").path.route
    assert route is not None, registry.resolve("g").path.reason
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert route.refusal({"messages": []}) is None
    assert "Responses API" in route.refusal({"messages": [], "tools": tools})


async def test_startup_log_names_the_true_reason(caplog):
    registry = ModelRegistry(load_models({"models": {
        "mistral": {"model": "mistral/mistral-small-latest"},
        "grok": {"model": "xai/grok-3-mini"},
        "fireworks": {"model": "fireworks_ai/accounts/fireworks/models/llama-v3p3-70b-instruct"},
        "cerebras": {"model": "cerebras/llama3.1-8b"},
        "sonar": {"model": "perplexity/sonar"},
        "gemini": {"model": "gemini/gemini-2.0-flash"},
        "nim": {"model": "nvidia_nim/meta/llama3-8b-instruct"},
        "pro": {"model": "openai/o1-pro"},
    }}, Timeouts()))
    caplog.set_level(logging.INFO, logger="relay")
    async with start_relay(registry=registry):
        pass
    lines = {r.__dict__.get("model"): r.getMessage() for r in caplog.records
             if r.getMessage().startswith("model alias ")}
    for alias, provider in [("mistral", "mistral"), ("grok", "xai"),
                            ("fireworks", "fireworks_ai"), ("cerebras", "cerebras"),
                            ("sonar", "perplexity")]:
        assert lines[alias] == (f"model alias {alias}: fast path (openai streaming format "
                                f"(provider {provider}))")
    assert "streams a format of its own" in lines["gemini"]
    assert "streams the OpenAI format, but" in lines["nim"]
    assert "Responses API" in lines["pro"]
    assert not any("does not stream an OpenAI or Anthropic format" in line
                   for line in lines.values())


def test_a_provider_whose_litellm_stream_handler_changed_stays_on_litellm(monkeypatch):
    """The fast path reads a line-read provider as one named LiteLLM handler does; if
    LiteLLM reads it with another (an upgrade), the alias stays on LiteLLM and says why."""
    from relay.upstream.fast import openai as fast_openai
    from relay.upstream.fast import select_route

    assert select_route("mistral/mistral-small-latest", None).path == "fast"
    monkeypatch.setitem(fast_openai.LINE_READ_HANDLERS, "mistral", "SomeOlderHandler")
    choice = select_route("mistral/mistral-small-latest", None)
    assert choice.path == "litellm"
    assert choice.reason == ("LiteLLM reads mistral's stream with MistralChatResponseIterator, "
                             "which the fast path does not know (it reads it as "
                             "SomeOlderHandler)")
