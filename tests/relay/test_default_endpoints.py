"""Every fast-path provider's default endpoint: the request the fast path sends for an alias
WITHOUT ``api_base`` equals the one LiteLLM's own path sends (issue 21, item 1).

Both requests are captured before the network: ``httpx.AsyncClient.send`` (the one method
every client on both paths goes through: the OpenAI SDK's client, LiteLLM's HTTP handler and
the fast path's shared client) is replaced for the test by a recorder that answers with a
short stream in the provider's format, so each path runs to a completed stream. Compared per
request: method, URL (scheme, host, path, query), the credential header (name and value), the
other headers that carry meaning (all but the transport's and the OpenAI SDK's own, listed in
``SDK_HEADERS``), and the JSON body. The URL and the credential header are also checked
against what each provider documents (``Provider.url``, ``Provider.auth``), so a change in
LiteLLM that both paths followed would still be seen.

``CASE_COUNTS`` is filled as the cases run; ``test_case_count_per_provider`` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from dataclasses import dataclass

import httpx
import pytest

from relay.app import load_models
from relay.upstream.fast import close_idle_http_client
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import StreamEnd, Timeouts
from tests.fakes.upstream import FakeUpstream, Usage, stream

from .helpers import Client, start_relay, text_of

KEY = "sk-test-DEFAULT-ENDPOINT-0123456789"

#: Headers that are the HTTP client's or the OpenAI SDK's own (User-Agent, x-stainless-*,
#: the transport's), not the provider's request: the fast path sends httpx's (README,
#: "Known differences").
SDK_HEADERS = frozenset({"accept", "accept-encoding", "connection", "content-length",
                         "host", "user-agent"})


@dataclass(frozen=True)
class Provider:
    """One provider's default route, as its documentation gives it."""

    name: str
    model: str
    key_env: str
    url: str                 # the documented chat endpoint (prefix for Azure: a query follows)
    auth: str                # the credential header, lower case
    auth_value: str          # its value for KEY
    api_base: str | None = None   # only Azure: its resource base is the user's
    env: tuple = ()          # other environment the default needs (hosted vLLM's base)
    tools: bool = True       # the provider documents function tools
    wire: str = "openai"


BEARER = f"Bearer {KEY}"
PROVIDERS = [
    # https://platform.openai.com/docs/api-reference/chat/create
    Provider("openai", "openai/gpt-4o-mini", "OPENAI_API_KEY",
             "https://api.openai.com/v1/chat/completions", "authorization", BEARER),
    # https://docs.anthropic.com/en/api/messages
    Provider("anthropic", "anthropic/claude-sonnet-4-5", "ANTHROPIC_API_KEY",
             "https://api.anthropic.com/v1/messages", "x-api-key", KEY, wire="anthropic"),
    # https://learn.microsoft.com/azure/ai-services/openai/reference (resource base is yours)
    Provider("azure", "azure/my-gpt-4o", "AZURE_API_KEY",
             "https://my-resource.openai.azure.com/openai/deployments/my-gpt-4o/chat/completions"
             "?api-version=", "api-key", KEY, api_base="https://my-resource.openai.azure.com"),
    # the same, the resource base from AZURE_API_BASE (LiteLLM's environment default)
    Provider("azure_env_base", "azure/my-gpt-4o", "AZURE_API_KEY",
             "https://env-resource.openai.azure.com/openai/deployments/my-gpt-4o/chat/"
             "completions?api-version=", "api-key", KEY,
             env=(("AZURE_API_BASE", "https://env-resource.openai.azure.com"),)),
    # https://console.groq.com/docs/openai
    Provider("groq", "groq/llama-3.3-70b-versatile", "GROQ_API_KEY",
             "https://api.groq.com/openai/v1/chat/completions", "authorization", BEARER),
    # https://openrouter.ai/docs/api-reference/chat-completion
    Provider("openrouter", "openrouter/openai/gpt-4o-mini", "OPENROUTER_API_KEY",
             "https://openrouter.ai/api/v1/chat/completions", "authorization", BEARER),
    # https://api-docs.deepseek.com/api/create-chat-completion; LiteLLM's default base is
    # DeepSeek's documented beta base, which serves the same chat API plus the beta features
    # (https://api-docs.deepseek.com/guides/chat_prefix_completion)
    Provider("deepseek", "deepseek/deepseek-chat", "DEEPSEEK_API_KEY",
             "https://api.deepseek.com/beta/chat/completions", "authorization", BEARER),
    # https://docs.together.ai/reference/chat-completions-1 (api.together.ai, formerly .xyz)
    Provider("together_ai", "together_ai/meta-llama/Llama-3.3-70B-Instruct-Turbo",
             "TOGETHERAI_API_KEY", "https://api.together.ai/v1/chat/completions",
             "authorization", BEARER),
    # vLLM's OpenAI-compatible server has no public default: HOSTED_VLLM_API_BASE is it
    Provider("hosted_vllm", "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct",
             "HOSTED_VLLM_API_KEY", "http://vllm.internal:8000/v1/chat/completions",
             "authorization", BEARER, env=(("HOSTED_VLLM_API_BASE",
                                            "http://vllm.internal:8000/v1"),)),
    # https://docs.mistral.ai/api/#tag/chat
    Provider("mistral", "mistral/mistral-small-latest", "MISTRAL_API_KEY",
             "https://api.mistral.ai/v1/chat/completions", "authorization", BEARER),
    # https://docs.x.ai/docs/api-reference#chat-completions
    Provider("xai", "xai/grok-3-mini", "XAI_API_KEY", "https://api.x.ai/v1/chat/completions",
             "authorization", BEARER),
    # https://docs.fireworks.ai/api-reference/post-chatcompletions
    Provider("fireworks_ai", "fireworks_ai/accounts/fireworks/models/llama-v3p3-70b-instruct",
             "FIREWORKS_API_KEY", "https://api.fireworks.ai/inference/v1/chat/completions",
             "authorization", BEARER),
    # https://inference-docs.cerebras.ai/api-reference/chat-completions
    Provider("cerebras", "cerebras/llama3.1-8b", "CEREBRAS_API_KEY",
             "https://api.cerebras.ai/v1/chat/completions", "authorization", BEARER),
    # https://docs.perplexity.ai/api-reference/chat-completions-post (no function tools)
    Provider("perplexity", "perplexity/sonar", "PERPLEXITYAI_API_KEY",
             "https://api.perplexity.ai/chat/completions", "authorization", BEARER,
             tools=False),
]
BY_NAME = {p.name: p for p in PROVIDERS}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
USER = {"role": "user", "content": "What is the weather in Paris?"}

#: Request shapes: (name, needs tools, events() keyword arguments).
SHAPES = [
    ("plain", False, {"messages": [USER]}),
    ("tools", True, {"messages": [USER], "tools": TOOLS, "tool_choice": "auto"}),
    ("tool_choice_named", True, {"messages": [USER], "tools": TOOLS, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}),
    ("sampling", False, {"messages": [USER], "temperature": 0.3, "max_tokens": 77,
                         "top_p": 0.9}),
    ("stop", False, {"messages": [USER], "stop": ["\n\n", "END"], "max_tokens": 20}),
    ("system", False, {"messages": [{"role": "system", "content": "Answer in French."},
                                    USER]}),
    ("multi_turn_tool_results", True, {"messages": [
        {"role": "system", "content": "Be brief."}, USER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "It is 18 C and sunny."},
        {"role": "user", "content": "And tomorrow?"}], "tools": TOOLS}),
]
SHAPES_BY_NAME = {s[0]: s for s in SHAPES}

CASE_COUNTS: dict[str, int] = {}
REFUSED: list[str] = []


def _openai_sse(model: str) -> bytes:
    def chunk(delta, finish=None):
        return b"data: " + json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": model, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": finish}]}).encode() + b"\n\n"
    return (chunk({"role": "assistant", "content": "Bonjour"}) + chunk({}, "stop")
            + b"data: [DONE]\n\n")


_ANTHROPIC_SSE = b"".join(
    b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(data).encode()) for kind, data in [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [], "stop_reason": None,
            "usage": {"input_tokens": 5, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "Bonjour"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 2}}),
        ("message_stop", {"type": "message_stop"})])


@dataclass
class Sent:
    method: str
    url: str
    headers: dict[str, str]   # lower-case names
    json: dict


class Recorder:
    """Replaces ``httpx.AsyncClient.send``: records each request, answers a short stream."""

    def __init__(self, wire: str) -> None:
        self.wire = wire
        self.sent: list[Sent] = []

    async def send(self, client, request: httpx.Request, **_kwargs) -> httpx.Response:
        body = request.read()
        self.sent.append(Sent(request.method, str(request.url),
                              {k.lower(): v for k, v in request.headers.items()},
                              json.loads(body)))
        content = _ANTHROPIC_SSE if self.wire == "anthropic" else _openai_sse("m")
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=content, request=request)


def spec_for(provider: Provider):
    """The alias as a user's config has it: model and key variable, no api_base (Azure:
    the resource base, which has no default)."""
    entry = {"model": provider.model, "api_key_env": provider.key_env}
    if provider.api_base:
        entry["api_base"] = provider.api_base
    registry = ModelRegistry(load_models({"models": {provider.name: entry}},
                                         Timeouts(10.0, 10.0, 30.0)))
    return registry.resolve(provider.name)


@pytest.fixture
def provider_env(monkeypatch):
    def apply(provider: Provider) -> None:
        monkeypatch.setenv(provider.key_env, KEY)
        for name, value in provider.env:
            monkeypatch.setenv(name, value)
    return apply


async def capture(monkeypatch, spec, request: dict, *, fast: bool,
                  wire: str) -> tuple[Sent | None, StreamEnd]:
    """The one request one path sends for ``request`` (None: it refused the request before
    the network), and how its stream ended."""
    recorder = Recorder(wire)

    async def send(client, req, **kwargs):
        return await recorder.send(client, req, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(httpx.AsyncClient, "send", send)
        streamer = spec.streamer()
        if not fast:
            streamer._fast_route = None
        last = None
        try:
            async for event in streamer.events(**request):
                last = event
        finally:
            await close_idle_http_client()
    assert isinstance(last, StreamEnd), last
    assert streamer.path_taken == ("fast" if fast else "litellm")
    assert len(recorder.sent) <= 1, recorder.sent
    return (recorder.sent[0] if recorder.sent else None), last


def meaningful_headers(sent: Sent) -> dict[str, str]:
    return {k: v for k, v in sent.headers.items()
            if k not in SDK_HEADERS and not k.startswith("x-stainless-")}


CASES = [(p.name, shape[0]) for p in PROVIDERS for shape in SHAPES
         if p.tools or not shape[1]]


@pytest.mark.parametrize(("provider_name", "shape"), CASES)
async def test_fast_path_sends_what_litellm_sends(provider_name, shape, monkeypatch,
                                                  provider_env):
    provider = BY_NAME[provider_name]
    provider_env(provider)
    spec = spec_for(provider)
    assert spec.path.path == "fast", spec.path.reason
    request = SHAPES_BY_NAME[shape][2]
    slow, slow_end = await capture(monkeypatch, spec, request, fast=False, wire=provider.wire)
    fast, fast_end = await capture(monkeypatch, spec, request, fast=True, wire=provider.wire)
    CASE_COUNTS[provider_name] = CASE_COUNTS.get(provider_name, 0) + 1
    if slow is None:
        # LiteLLM refuses this request before the network (a parameter the model does not
        # support, e.g. `stop` on xAI's reasoning models): so must the fast path, alike.
        assert fast is None, "the fast path sent a request LiteLLM refuses"
        assert fast_end == slow_end
        assert slow_end.error.code == "bad_request"
        REFUSED.append(f"{provider_name}-{shape}")
        return
    assert slow_end.error is None and fast_end.error is None, (slow_end, fast_end)
    assert fast is not None
    assert fast.method == slow.method == "POST"
    assert fast.url == slow.url
    assert fast.url.startswith(provider.url), fast.url
    assert fast.headers.get(provider.auth) == slow.headers.get(provider.auth) \
        == provider.auth_value
    assert meaningful_headers(fast) == meaningful_headers(slow)
    assert fast.json == slow.json
    assert fast.json["stream"] is True


def test_case_count_per_provider():
    """Every provider has at least the plain, sampling and system shapes (the count is
    complete only when this runs after the cases, as in a whole-file run)."""
    expected = {p.name: sum(1 for s in SHAPES if p.tools or not s[1]) for p in PROVIDERS}
    assert all(count >= 4 for count in expected.values()), expected
    if CASE_COUNTS:
        print("\ndifferential cases per provider:",
              ", ".join(f"{name} {CASE_COUNTS.get(name, 0)}" for name in expected),
              "\nrefused alike by both paths before the network:", ", ".join(REFUSED))


# ------------------------------------------------------- end to end: the default host, redirected


@contextlib.contextmanager
def default_hosts_redirected_to(monkeypatch, port: int):
    """The fast path's transport sends every request for a non-loopback host to
    ``127.0.0.1:port`` instead (plain HTTP), the request otherwise untouched: same path and
    query, same headers (``Host`` still names the provider's host), same body. Nothing else
    changes: the alias has no ``api_base``, the URL is the one the fast path built."""
    from relay.upstream.transport import AiohttpTransport

    original = AiohttpTransport.handle_async_request
    redirected: list[str] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.host not in ("127.0.0.1", "localhost"):
            redirected.append(str(request.url))
            request = httpx.Request(
                request.method,
                request.url.copy_with(scheme="http", host="127.0.0.1", port=port),
                headers=request.headers, content=request.read(),
                extensions=request.extensions)
        return await original(self, request)

    with monkeypatch.context() as patch:
        patch.setattr(AiohttpTransport, "handle_async_request", handle)
        patch.delenv("HTTP_PROXY", raising=False)
        patch.delenv("HTTPS_PROXY", raising=False)
        patch.delenv("http_proxy", raising=False)
        patch.delenv("https_proxy", raising=False)
        yield redirected


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


@pytest.mark.parametrize("provider_name", [p.name for p in PROVIDERS])
async def test_relay_streams_each_default_endpoint_on_the_fast_path(provider_name, monkeypatch,
                                                                    provider_env):
    """Client -> relay -> the provider's default URL (its host redirected to a loopback fake
    at the transport) -> frames: the fake saw the documented path, Host and credential."""
    provider = BY_NAME[provider_name]
    provider_env(provider)
    spec = spec_for(provider)
    assert spec.path.path == "fast", spec.path.reason
    documented = httpx.URL(provider.url)
    async with FakeUpstream() as up:
        script = up.enqueue(stream(provider.wire, ["Bon", "jour"], usage=Usage(9, 2)))
        with default_hosts_redirected_to(monkeypatch, up.port) as redirected:
            async with start_relay(registry=ModelRegistry([spec])) as server:
                async with Client.connect(server.url) as client:
                    await client.start("s1", model=provider.name)
                    frames = await client.collect("s1")
                metrics = await asyncio.to_thread(_scrape, server.port)
    assert text_of(frames) == script.text == "Bonjour"
    assert frames[-1]["status"] == "completed", frames[-1]
    assert len(up.requests) == 1 and len(redirected) == 1
    sent = up.requests[0]
    # The provider's usage, when the request asked for it (LiteLLM does not send
    # stream_options to Mistral, Cerebras and Perplexity: then the relay's estimate).
    asked_usage = provider.wire == "anthropic" or "stream_options" in sent.json
    assert frames[-1]["usage"]["estimated"] is not asked_usage
    assert redirected[0].startswith(provider.url)
    assert sent.path == documented.path
    assert sent.headers["Host"] == documented.host + (
        f":{documented.port}" if documented.port else "")
    assert sent.headers[provider.auth] == provider.auth_value
    assert sent.json["stream"] is True
    assert (f'relay_requests_total{{alias="{provider.name}",path="fast"}} 1.0'
            in metrics), metrics
