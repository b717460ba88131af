"""The HTTP request of one fast-path stream, built by LiteLLM's provider code exactly as
LiteLLM's own handler for the provider builds it (LiteLLM 1.110), once per stream:

* for every provider, what ``litellm.completion()`` does first (message, tool, tool-choice
  and stop validation), then ``get_optional_params`` (parameter mapping);
* OpenAI-compatible providers: the provider's default base, key and headers when the alias
  names none (``relay.upstream.fast.endpoints``), the provider config's
  ``validate_environment`` (headers), ``get_complete_url`` and ``transform_request`` (body);
* Azure OpenAI (called by LiteLLM through the SDK's ``AsyncAzureOpenAI``): the deployment URL
  with ``api-version``, the key in ``api-key`` (an Entra ID token as ``Authorization:
  Bearer``), and ``AzureOpenAIConfig.transform_request`` (the GPT-5 config for gpt-5
  deployments) as the body, exactly what LiteLLM hands the SDK (``azure_request``);
* Anthropic: key and base as ``litellm.main``'s Anthropic branch resolves them, the message
  and tool translation, beta-header filtering and beta-gated field stripping, exactly as
  LiteLLM's Anthropic handler calls them; LiteLLM's reverse map of tool names it renamed
  comes back with the request (``ProviderRequest.tool_names``) for the decoder.

Every body streams (``"stream": true``). Which requests the fast path takes at all is
``relay.upstream.fast.routing``'s decision.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from relay.upstream.fast.endpoints import resolve_openai_compatible

__all__ = ["ProviderRequest", "Target", "azure_api_base", "azure_api_version",
           "azure_request", "build_request"]

# kwargs of an EventStreamer request that are not model parameters
_NOT_PARAMS = frozenset({"model", "messages", "api_key", "api_base", "num_retries",
                         "azure_ad_token"})


class Target(Protocol):
    """Where a request goes (``relay.upstream.fast.routing.FastRoute`` is one)."""

    @property
    def wire(self) -> str: ...            # "openai" or "anthropic"
    @property
    def provider(self) -> str: ...        # LiteLLM provider name
    @property
    def model(self) -> str: ...           # the provider's model name
    @property
    def litellm_model(self) -> str: ...   # the alias's LiteLLM model string
    @property
    def api_base(self) -> str | None: ...
    @property
    def config(self) -> Any: ...          # LiteLLM's provider chat config


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One request as it is sent: ``POST url`` with ``headers`` and the JSON ``body``.
    ``tool_names``: Anthropic's original names of the tools LiteLLM renamed, or None."""

    url: str
    headers: dict[str, str]
    body: bytes
    tool_names: dict[str, str] | None = None


def build_request(target: Target, kwargs: dict[str, Any]) -> ProviderRequest:
    """The HTTP request of one stream (``kwargs``: ``EventStreamer``'s request), built by
    LiteLLM's provider code the way its own handler for this provider builds it."""
    from relay.upstream.llm import get_litellm

    litellm = get_litellm()
    _name, _provider, dynamic_key, dynamic_base = litellm.get_llm_provider(
        target.litellm_model, api_base=target.api_base)
    api_key = kwargs.get("api_key") or dynamic_key
    api_base = kwargs.get("api_base") or target.api_base or dynamic_base
    from litellm.utils import (
        validate_and_fix_openai_messages, validate_and_fix_openai_tools,
        validate_chat_completion_tool_choice, validate_openai_optional_params,
    )

    # What litellm.completion() does first, for every provider.
    messages = validate_and_fix_openai_messages(copy.deepcopy(kwargs["messages"]))
    params = {k: v for k, v in kwargs.items() if k not in _NOT_PARAMS}
    if "tools" in params:
        params["tools"] = validate_and_fix_openai_tools(params["tools"])
    if "tool_choice" in params:
        params["tool_choice"] = validate_chat_completion_tool_choice(
            tool_choice=params["tool_choice"], model=target.litellm_model)
    if "stop" in params:
        params["stop"] = validate_openai_optional_params(stop=params["stop"])
    optional = litellm.get_optional_params(
        model=target.model, custom_llm_provider=target.provider, messages=messages, **params)
    litellm_params: dict[str, Any] = {"custom_llm_provider": target.provider,
                                      "api_base": api_base}
    if kwargs.get("azure_ad_token"):
        litellm_params["azure_ad_token"] = kwargs["azure_ad_token"]
    if target.wire == "anthropic":
        return _anthropic_request(target, litellm, api_key, api_base, messages, optional,
                                  litellm_params)
    return _openai_request(target, litellm, api_key, api_base, messages, optional,
                           litellm_params)


def _openai_request(target: Target, litellm: Any, api_key: str | None, api_base: str | None,
                    messages: list[Any], optional: dict[str, Any],
                    litellm_params: dict[str, Any]) -> ProviderRequest:
    if target.provider == "azure":
        url, headers, body = azure_request(
            litellm, target.model, api_key, api_base, messages, optional, litellm_params,
            ad_token=litellm_params.get("azure_ad_token"))
        return ProviderRequest(url, headers, orjson.dumps(body))
    config = target.config
    # The provider's default base, key and headers, as litellm.main's branch for it
    # resolves them (an alias without api_base).
    api_key, api_base, base_headers = resolve_openai_compatible(
        litellm, target.provider, config, api_key, api_base)
    extra_body = optional.pop("extra_body", None)
    headers = config.validate_environment(
        headers=base_headers, model=target.model, messages=messages, optional_params=optional,
        litellm_params=litellm_params, api_key=api_key, api_base=api_base)
    url = config.get_complete_url(api_base=api_base, api_key=api_key, model=target.model,
                                  optional_params=optional, litellm_params=litellm_params,
                                  stream=True)
    body = config.transform_request(model=target.model, messages=messages,
                                    optional_params=optional,
                                    litellm_params=litellm_params, headers=headers)
    if extra_body:
        body = {**body, **extra_body}
    body["stream"] = True
    return ProviderRequest(url, headers, orjson.dumps(body))


def _anthropic_request(target: Target, litellm: Any, api_key: str | None,
                       api_base: str | None, messages: list[Any], optional: dict[str, Any],
                       litellm_params: dict[str, Any]) -> ProviderRequest:
    from litellm.anthropic_beta_gated_fields import strip_beta_gated_request_body
    from litellm.anthropic_beta_headers_manager import update_request_with_filtered_beta
    from litellm.litellm_core_utils.url_utils import ensure_api_route
    from litellm.llms.anthropic.chat.transformation import (
        ANTHROPIC_TOOL_NAME_REVERSE_MAP_KEY, AnthropicConfig,
    )

    # As litellm.main's Anthropic branch resolves them.
    api_key = (api_key or litellm.anthropic_key or litellm.api_key
               or os.environ.get("ANTHROPIC_API_KEY"))
    api_base = ensure_api_route(
        api_base or litellm.api_base or os.environ.get("ANTHROPIC_API_BASE")
        or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com/v1/messages",
        "v1/messages")
    optional.pop("stream", None)
    optional.pop("json_mode", None)
    optional.pop("vertex_count_tokens_location", None)
    transform_params = {**optional, "is_vertex_request": False}
    headers = AnthropicConfig().validate_environment(
        api_key=api_key, headers={}, model=target.model, messages=messages,
        optional_params=transform_params, litellm_params=litellm_params, api_base=api_base)
    data = target.config.transform_request(model=target.model, messages=messages,
                                           optional_params=transform_params,
                                           litellm_params=litellm_params, headers=headers)
    headers, data = update_request_with_filtered_beta(
        headers=headers, request_data=data, provider=target.provider, api_base=api_base)
    data = dict(strip_beta_gated_request_body(data, headers, drop_params=None,
                                              model=target.model, provider=target.provider))
    data["stream"] = True
    return ProviderRequest(api_base, headers, orjson.dumps(data),
                           litellm_params.get(ANTHROPIC_TOOL_NAME_REVERSE_MAP_KEY))


def azure_api_version(litellm: Any) -> str:
    # As litellm.main's Azure branch resolves it.
    return (litellm.api_version or os.environ.get("AZURE_API_VERSION")
            or litellm.AZURE_DEFAULT_API_VERSION)


def azure_api_base(litellm: Any) -> str | None:
    return litellm.api_base or os.environ.get("AZURE_API_BASE")


def azure_request(litellm: Any, model: str, api_key: str | None, api_base: str | None,
                  messages: list[Any], optional: dict[str, Any],
                  litellm_params: dict[str, Any],
                  ad_token: str | None = None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """URL, headers and body of an Azure OpenAI chat stream, as LiteLLM's Azure handler and
    the SDK's ``AsyncAzureOpenAI`` build them (see the module docstring): the base is used as
    is when it names a deployment, else ``{base}/openai/deployments/{model}``.

    Key and base resolve as in ``litellm.main``; without a key, an Entra ID token
    (``ad_token``: LiteLLM's ``azure_ad_token`` argument) is sent as ``Authorization: Bearer``;
    with both, only the key (as LiteLLM does; ``AZURE_AD_TOKEN`` in the environment is not
    used by LiteLLM's streaming path either). Raises ``ValueError`` without a base URL
    (LiteLLM fails the same request too).
    """
    base = api_base or azure_api_base(litellm)
    if not base:
        raise ValueError("api_base is required for Azure OpenAI")
    api_key = (api_key or litellm.api_key or litellm.azure_key
               or os.environ.get("AZURE_OPENAI_API_KEY") or os.environ.get("AZURE_API_KEY"))
    optional = dict(optional)
    optional.pop("max_retries", None)
    optional.pop("json_mode", None)
    extra_body = optional.pop("extra_body", None) or {}
    extra_body.pop("azure_ad_token", None)  # litellm.main takes it out of the body
    # litellm.main's extra_headers, replaced by litellm.headers when set (its Azure handler)
    headers_in = litellm.headers or optional.pop("extra_headers", None) or {}
    optional.pop("extra_headers", None)
    if litellm.AzureOpenAIGPT5Config.is_model_gpt_5_model(model=model):
        config = litellm.AzureOpenAIGPT5Config()
    else:
        config = litellm.AzureOpenAIConfig()
    body = config.transform_request(model=model, messages=messages, optional_params=optional,
                                    litellm_params=litellm_params, headers={})
    if extra_body:
        body = {**body, **extra_body}
    body["stream"] = True
    # AsyncAzureOpenAI: azure_endpoint -> {endpoint}/openai; a base that already names a
    # deployment is used as is; /deployments/{model} is prefixed otherwise.
    base = base.rstrip("/")
    if "/openai/deployments" not in base:
        base = f"{base}/openai"
    if "/deployments" not in base:
        base = f"{base}/deployments/{quote(model, safe='')}"
    url = f"{base}/chat/completions?api-version={quote(azure_api_version(litellm), safe='')}"
    headers = {**headers_in, "Content-Type": "application/json"}
    if api_key:
        headers["api-key"] = api_key
    elif ad_token:
        headers["Authorization"] = f"Bearer {ad_token}"
    return url, headers, body
