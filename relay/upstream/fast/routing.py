"""Which path a model alias streams through, and which of its requests the fast path takes.

Per alias, once at startup (``select_route``; ``fast = false`` in the alias's config opts
out; the choice is logged and exported in ``/metrics`` as ``relay_model_path``): the fast
path for a provider whose stream LiteLLM reads in a way the relay reads too
(``OPENAI_FORMAT_PROVIDERS``: ``relay.upstream.fast.openai``; ``ANTHROPIC_FORMAT_PROVIDERS``:
``relay.upstream.fast.anthropic``), with a chat config LiteLLM does not fake streaming for or
wrap in a custom stream wrapper; LiteLLM's path for every other provider, for extra LiteLLM
arguments, and on any doubt. Kept on LiteLLM besides: OpenAI-format aliases that LiteLLM
sends through its Responses API bridge or reads with its experimental HTTP handler, a
provider whose LiteLLM stream handler is not the one the relay reproduces
(``LINE_READ_HANDLERS``), and Azure setups the SDK handles itself (``azure_refusal``).

Per request (``FastRoute.refusal``; the streamer logs the reason once and
``relay_requests_total{alias,path="litellm"}`` counts it): on Anthropic a
``response_format`` (LiteLLM rewrites it into a tool and the tool call back into text); on
Groq a ``response_format`` (LiteLLM fakes that stream from a non-streaming call); on Azure an
``oidc/`` token (LiteLLM exchanges it first); OpenAI/Azure requests with tools that LiteLLM
sends through its Responses API.

``FastRoute.open`` sends a request (``relay.upstream.fast.requests``) on the loop's shared
client (``relay.upstream.fast.pool``) and returns the stream's reader
(``relay.upstream.fast.reader.FastStream``) with the format's decoder, or raises LiteLLM's
exception for an HTTP error (``relay.upstream.fast.failures``).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

from relay.upstream import caps
from relay.upstream.fast.anthropic import AnthropicDecoder
from relay.upstream.fast.decoding import Decoder
from relay.upstream.fast.endpoints import OPENAI_SDK_PROVIDERS
from relay.upstream.fast.failures import ProviderFailures
from relay.upstream.fast.openai import LINE_READ_HANDLERS, OpenAIDecoder
from relay.upstream.fast.pool import http_client
from relay.upstream.fast.reader import FastStream
from relay.upstream.fast.requests import (
    ProviderRequest, azure_api_base, azure_api_version, build_request,
)

__all__ = ["ANTHROPIC_FORMAT_PROVIDERS", "OPENAI_FORMAT_PROVIDERS", "FastRoute", "PathChoice",
           "azure_refusal", "responses_bridge_reason", "select_route"]


#: LiteLLM providers whose chat streaming is the OpenAI Chat Completions SSE format, read the
#: way LiteLLM reads each: with the OpenAI SDK (``OPENAI_SDK_PROVIDERS``: OpenAI and any
#: OpenAI-compatible ``api_base`` via ``openai/``, Cerebras, Perplexity), the Azure SDK client
#: (``azure``), or LiteLLM's line reader with the provider's stream handler
#: (``LINE_READ_HANDLERS``: vLLM, Together, DeepSeek, Groq, OpenRouter, Fireworks, xAI,
#: Mistral).
OPENAI_FORMAT_PROVIDERS = frozenset({*OPENAI_SDK_PROVIDERS, "azure", *LINE_READ_HANDLERS})
#: LiteLLM providers that stream Anthropic Messages SSE.
ANTHROPIC_FORMAT_PROVIDERS = frozenset({"anthropic"})


@dataclass(frozen=True, slots=True)
class PathChoice:
    """Which path an alias streams through, and why (for the startup log)."""

    path: str  # "fast" or "litellm"
    reason: str
    route: FastRoute | None = None


def select_route(model: str, api_base: str | None, *, fast: bool = True,
                 extra: dict[str, Any] | None = None) -> PathChoice:
    """Decide the path of one alias (imports LiteLLM). Never raises: on any doubt, LiteLLM."""
    if not fast:
        return PathChoice("litellm", "fast = false in the alias config")
    if extra:
        return PathChoice("litellm", "extra LiteLLM arguments configured")
    from relay.upstream.llm import get_litellm

    litellm = get_litellm()
    try:
        name, provider, _key, _base = litellm.get_llm_provider(model, api_base=api_base)
    except Exception:
        return PathChoice("litellm", "LiteLLM does not know the provider")
    try:
        config = litellm.ProviderConfigManager.get_provider_chat_config(
            model=name, provider=litellm.LlmProviders(provider))
    except Exception:
        config = None
    if provider in ANTHROPIC_FORMAT_PROVIDERS:
        wire = "anthropic"
    elif provider in OPENAI_FORMAT_PROVIDERS:
        wire = "openai"
    else:
        return PathChoice("litellm", _unread_provider_reason(provider, config))
    if config is None:
        return PathChoice("litellm", f"LiteLLM has no chat config for provider {provider}")
    if wire == "openai":
        refusal = _openai_reader_refusal(litellm, provider, config, name, api_base)
        if refusal is not None:
            return PathChoice("litellm", refusal)
    if provider == "azure":
        refusal = azure_refusal(litellm, name, api_base)
        if refusal is not None:
            return PathChoice("litellm", refusal)
    try:
        if config.should_fake_stream(model=name, stream=True, custom_llm_provider=provider):
            return PathChoice("litellm", f"LiteLLM fakes streaming for {model}")
        if config.has_custom_stream_wrapper:
            return PathChoice("litellm", f"LiteLLM has a custom stream wrapper for {provider}")
    except Exception:
        return PathChoice("litellm", f"LiteLLM cannot describe streaming for {model}")
    route = FastRoute(wire=wire, provider=provider, model=name, litellm_model=model,
                      api_base=api_base, config=config)
    return PathChoice("fast", f"{wire} streaming format (provider {provider})", route)


def _unread_provider_reason(provider: str, config: Any) -> str:
    """The startup log's reason for a provider the fast path does not read."""
    from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig

    if isinstance(config, OpenAIGPTConfig):
        return (f"provider {provider} streams the OpenAI format, but the fast path has not "
                "been checked against how LiteLLM calls it and reads it (not in "
                "OPENAI_FORMAT_PROVIDERS)")
    return f"provider {provider} streams a format of its own, which only LiteLLM reads"


def _openai_reader_refusal(litellm: Any, provider: str, config: Any, model: str,
                           api_base: str | None) -> str | None:
    """Why an OpenAI-format alias cannot take the fast path, or None: LiteLLM must read its
    stream the way the fast path knows (``relay.upstream.fast.openai``), and send it to Chat
    Completions (not its Responses API bridge)."""
    if provider in OPENAI_SDK_PROVIDERS or provider == "azure":
        if provider != "azure" and os.environ.get(
                "EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER", "").lower() in (
                "1", "true", "yes", "on"):
            return ("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER makes LiteLLM read "
                    f"{provider}'s stream with its own HTTP handler")
        bridged = responses_bridge_reason(litellm, model, provider, api_base, tools=None)
        if bridged is not None:
            return bridged
    elif provider in LINE_READ_HANDLERS:
        expected = LINE_READ_HANDLERS[provider]
        try:
            handler = config.get_model_response_iterator(streaming_response=iter(()),
                                                         sync_stream=False)
            actual = type(handler).__name__
        except Exception:
            actual = "an unknown handler"
        if actual != expected:
            return (f"LiteLLM reads {provider}'s stream with {actual}, which the fast path "
                    f"does not know (it reads it as {expected})")
    return None


@functools.lru_cache(maxsize=256)
def _bridge_reason_with_function_tools(model: str, provider: str,
                                       api_base: str | None) -> str | None:
    from relay.upstream.llm import get_litellm

    return responses_bridge_reason(get_litellm(), model, provider, api_base,
                                   tools=[{"type": "function", "function": {
                                       "name": "f", "parameters": {}}}])


def responses_bridge_reason(litellm: Any, model: str, provider: str, api_base: str | None,
                            tools: Any) -> str | None:
    """Why LiteLLM sends this OpenAI/Azure request through its Responses API bridge (models
    whose cost-map mode is ``responses``; GPT-5.4+ with function tools on api.openai.com),
    or None when it goes to Chat Completions as the fast path would send it."""
    try:
        from litellm.responses.bridge_check import responses_api_bridge_check
    except ImportError:
        return None
    try:
        info, _model = responses_api_bridge_check(model=model, custom_llm_provider=provider,
                                                  tools=tools, api_base=api_base)
    except Exception:
        return None
    if info.get("mode") == "responses":
        return f"LiteLLM sends {model} requests{' with tools' if tools else ''} through " \
               "the Responses API"
    return None


# Entra ID settings under which the SDK acquires and refreshes tokens itself (LiteLLM's
# ``initialize_azure_sdk_client``): such aliases stay on LiteLLM.
_AZURE_CREDENTIAL_ENV = (("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"),
                         ("AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_CLIENT_ID"))


def azure_refusal(litellm: Any, model: str, api_base: str | None) -> str | None:
    """Why an Azure alias stays on LiteLLM's path, or ``None`` when the fast path serves it."""
    from litellm.llms.azure.common_utils import BaseAzureLLM

    if litellm.AzureOpenAIO1Config().is_o_series_model(model=model):
        return "LiteLLM calls Azure o-series deployments with a handler of its own"
    if BaseAzureLLM.is_azure_v1_api_version(azure_api_version(litellm)):
        return "the Azure v1 API version is called through a different client"
    base = api_base or azure_api_base(litellm)
    if not base:
        return "no api_base for Azure (LiteLLM reports the missing base per request)"
    if "gateway.ai.cloudflare.com" in base:
        return "Azure through Cloudflare AI Gateway"
    for names in _AZURE_CREDENTIAL_ENV:
        if all(os.environ.get(name) for name in names):
            return "Entra ID credentials the Azure SDK exchanges and refreshes itself"
    if getattr(litellm, "enable_azure_ad_token_refresh", False):
        return "Azure AD token refresh is enabled in LiteLLM"
    return None


@dataclass(frozen=True, slots=True)
class FastRoute:
    """How to call one alias's provider directly. Built by ``select_route`` at startup; it
    is the streamer's ``DirectRoute`` (``relay.upstream.event_streamer``)."""

    wire: str            # "openai" or "anthropic"
    provider: str        # LiteLLM provider name
    model: str           # the provider's model name
    litellm_model: str   # the alias's LiteLLM model string
    api_base: str | None
    config: Any          # LiteLLM's provider chat config

    def accepts(self, kwargs: dict[str, Any]) -> bool:
        """False for a request only LiteLLM's own path handles (see ``refusal``)."""
        return self.refusal(kwargs) is None

    def refusal(self, kwargs: dict[str, Any]) -> str | None:
        """Why this request goes through LiteLLM's own path instead (the relay logs it and
        counts it in ``relay_requests_total{path="litellm"}``), or None: the fast path
        takes it. (See the module docstring.)"""
        provider = self.provider
        if provider == "azure":
            token = kwargs.get("azure_ad_token")
            if isinstance(token, str) and token.startswith("oidc/"):
                return "an Azure oidc/ token (LiteLLM exchanges it for an access token)"
        elif provider == "groq":
            if kwargs.get("response_format") is not None:
                return (f"response_format on {provider} (LiteLLM answers it from a "
                        "non-streaming call)")
        elif self.wire == "anthropic" and kwargs.get("response_format") is not None:
            return ("response_format on Anthropic (LiteLLM turns it into a tool and the "
                    "tool call back into text)")
        tools = kwargs.get("tools")
        if tools and (provider in OPENAI_SDK_PROVIDERS or provider == "azure"):
            api_base = kwargs.get("api_base") or self.api_base
            if all(type(t) is dict and t.get("type") == "function" for t in tools):
                # LiteLLM's answer depends on the tools only through "has a function tool":
                # asked once per model and base (~0.3 ms of model-info lookups each time).
                return _bridge_reason_with_function_tools(self.model, provider, api_base)
            from relay.upstream.llm import get_litellm

            return responses_bridge_reason(get_litellm(), self.model, provider, api_base,
                                           tools=tools)
        return None

    def build_request(self, kwargs: dict[str, Any]) -> ProviderRequest:
        """The HTTP request of one stream (``relay.upstream.fast.requests.build_request``)."""
        return build_request(self, kwargs)

    async def open(self, kwargs: dict[str, Any]) -> FastStream:
        """Send the request; return the open stream or raise LiteLLM's exception for it."""
        request = build_request(self, kwargs)
        decoder = self._decoder(request)
        client = http_client()
        response = await client.send(
            client.build_request("POST", request.url, headers=request.headers,
                                 content=request.body), stream=True)
        if response.status_code >= 400:
            # At most max_error_body_bytes of it, decoded under the caps; the connection is
            # closed, not drained (relay/upstream/caps.py).
            error_body = await caps.read_error_body(response)
            raise self._failures().http_error(response.status_code, response.headers,
                                              error_body)
        try:
            return FastStream(response, decoder)
        except BaseException:
            await response.aclose()
            raise

    def _failures(self) -> ProviderFailures:
        return ProviderFailures(self.provider, self.model, self.config)

    def _decoder(self, request: ProviderRequest) -> Decoder:
        """A fresh decoder for one stream of this route's format."""
        from litellm.litellm_core_utils.core_helpers import map_finish_reason

        failures = self._failures()
        if self.wire == "anthropic":
            from litellm.llms.anthropic.chat.transformation import AnthropicConfig

            config = AnthropicConfig()
            return AnthropicDecoder(
                map_finish_reason, failures.anthropic_stream_error,
                lambda usage: config.calculate_usage(usage_object=usage,
                                                     reasoning_content=None),
                request.tool_names)
        return OpenAIDecoder(self.provider, map_finish_reason, failures.openai_stream_error,
                             failures.line_reader_chunk_error)
