"""Provider dialects of the OpenAI streaming format on the fast path: Azure OpenAI, Groq and
OpenRouter (``relay/upstream/fast_path.py`` reads the wire; this module knows how each of these
providers differs from plain OpenAI, as LiteLLM 1.110 handles them).

Kept apart from ``fast_path.py`` so the per-chunk loop there stays provider-free.

What differs, and what the relay does about it (each verified by ``tests/relay/test_fast_path.py``
against a fake speaking the provider's wire):

* **Azure OpenAI** (LiteLLM calls it with the OpenAI SDK's ``AsyncAzureOpenAI``): the request
  goes to ``{api_base}/openai/deployments/{deployment}/chat/completions?api-version=...`` with
  the key in ``api-key`` (an Entra ID token as ``Authorization: Bearer``), and its body is
  ``AzureOpenAIConfig.transform_request`` (the GPT-5 config for gpt-5 deployments), exactly
  what LiteLLM hands the SDK. The stream is the OpenAI SDK's reading of OpenAI SSE, like the
  ``openai`` provider: the first chunk (empty ``choices``, ``prompt_filter_results``) and the
  ``content_filter_results`` carry nothing the relay shows. Kept on LiteLLM: o-series
  deployments (LiteLLM's own o-series handler), the ``v1``/``latest``/``preview`` API
  versions (a different client), Cloudflare AI Gateway bases, and Entra ID credentials the
  SDK would exchange and refresh itself (tenant/client secret, username/password,
  ``litellm.enable_azure_ad_token_refresh``); a request with an ``oidc/`` token goes through
  LiteLLM (``dialect_accepts``).
* **Groq** and **OpenRouter** (LiteLLM reads them with its own HTTP handler, line by line,
  and a stream handler per provider, not the OpenAI SDK): see ``LineReadDecoder``. The
  request is built as for the generic providers (the provider's config), plus OpenRouter's
  ``HTTP-Referer``/``X-Title`` headers (``relay/upstream/fast_endpoints.py``); a Groq
  request with ``response_format`` goes through LiteLLM, which fakes that stream from a
  non-streaming call. Groq's ``x_groq.usage`` is ignored (so does LiteLLM: the usage is the
  top-level ``usage`` chunk ``stream_options.include_usage`` asks for, else the relay's
  estimate).
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import orjson

from relay.upstream.errors import ProviderStreamError
from relay.upstream.raw_tap import content_parts
from relay.upstream.streamer import UsageInfo

__all__ = ["DIALECT_PROVIDERS", "FAILING_FINISH_REASONS", "LINE_READ_HANDLERS", "LineReadDecoder",
           "azure_refusal", "azure_request", "dialect_accepts", "openai_decoder_for"]

#: OpenAI-format providers whose LiteLLM stream handler is not the generic one, and which the
#: fast path reads with the dialect rules of this module.
DIALECT_PROVIDERS = frozenset({"azure", "groq", "openrouter"})

#: OpenAI-format providers LiteLLM reads with its own HTTP handler, line by line, through a
#: stream handler per provider (``config.get_model_response_iterator``), not the OpenAI SDK;
#: the fast path reads them with ``LineReadDecoder``. The value names the LiteLLM handler
#: class whose reading ``LineReadDecoder`` reproduces: ``select_route`` keeps an alias on
#: LiteLLM when its provider's handler is another (a LiteLLM upgrade that changed it).
#: What the provider handlers change over the generic one
#: (``OpenAIChatCompletionStreamingHandler``): Groq and OpenRouter, see ``LineReadDecoder``;
#: Fireworks only adds hidden fields the relay does not show; xAI folds reasoning tokens into
#: the completion tokens and gives its usage chunk (empty ``choices``) an empty choice;
#: Mistral turns a ``content`` list (Magistral's thinking/text blocks) into text and
#: reasoning. ``LineReadDecoder`` does each with LiteLLM's own functions.
LINE_READ_HANDLERS = {
    "groq": "GroqChatCompletionStreamingHandler",
    "openrouter": "OpenRouterChatCompletionStreamingHandler",
    "deepseek": "OpenAIChatCompletionStreamingHandler",
    "together_ai": "OpenAIChatCompletionStreamingHandler",
    "hosted_vllm": "OpenAIChatCompletionStreamingHandler",
    "fireworks_ai": "FireworksAIChatCompletionStreamingHandler",
    "xai": "XAIChatCompletionStreamingHandler",
    "mistral": "MistralChatResponseIterator",
}

# Entra ID settings under which the SDK acquires and refreshes tokens itself (LiteLLM's
# ``initialize_azure_sdk_client``): such aliases stay on LiteLLM.
_AZURE_CREDENTIAL_ENV = (("AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"),
                         ("AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_CLIENT_ID"))


# ---------------------------------------------------------------------------------- Azure


def azure_refusal(litellm: Any, model: str, api_base: str | None) -> str | None:
    """Why an Azure alias stays on LiteLLM's path, or ``None`` when the fast path serves it."""
    from litellm.llms.azure.common_utils import BaseAzureLLM

    if litellm.AzureOpenAIO1Config().is_o_series_model(model=model):
        return "LiteLLM calls Azure o-series deployments with a handler of its own"
    if BaseAzureLLM.is_azure_v1_api_version(_azure_api_version(litellm)):
        return "the Azure v1 API version is called through a different client"
    base = api_base or _azure_api_base(litellm)
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


def dialect_accepts(provider: str, kwargs: dict[str, Any]) -> bool:
    """False for a request of these providers that LiteLLM's path must make: on Azure an
    ``oidc/`` token (LiteLLM exchanges it for an access token first); on Groq a
    ``response_format`` (LiteLLM then makes a non-streaming call and fakes the stream)."""
    if provider == "azure":
        token = kwargs.get("azure_ad_token")
        return not (isinstance(token, str) and token.startswith("oidc/"))
    if provider == "groq":
        return kwargs.get("response_format") is None
    return True


def _azure_api_version(litellm: Any) -> str:
    # As litellm.main's Azure branch resolves it.
    return (litellm.api_version or os.environ.get("AZURE_API_VERSION")
            or litellm.AZURE_DEFAULT_API_VERSION)


def _azure_api_base(litellm: Any) -> str | None:
    return litellm.api_base or os.environ.get("AZURE_API_BASE")


def azure_request(litellm: Any, model: str, api_key: str | None, api_base: str | None,
                  messages: list, optional: dict, litellm_params: dict,
                  ad_token: str | None = None) -> tuple[str, dict, dict]:
    """URL, headers and body of an Azure OpenAI chat stream, as LiteLLM's Azure handler and
    the SDK's ``AsyncAzureOpenAI`` build them (see the module docstring).

    Key and base resolve as in ``litellm.main``; without a key, an Entra ID token
    (``ad_token``: LiteLLM's ``azure_ad_token`` argument) is sent as ``Authorization: Bearer``;
    with both, only the key (as LiteLLM does; ``AZURE_AD_TOKEN`` in the environment is not
    used by LiteLLM's streaming path either). Raises ``ValueError`` without a base URL
    (LiteLLM fails the same request too).
    """
    base = api_base or _azure_api_base(litellm)
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
    url = f"{base}/chat/completions?api-version={quote(_azure_api_version(litellm), safe='')}"
    headers = {**headers_in, "Content-Type": "application/json"}
    if api_key:
        headers["api-key"] = api_key
    elif ad_token:
        headers["Authorization"] = f"Bearer {ad_token}"
    return url, headers, body


# ---------------------------------------------------------------------- stream decoders

#: Finish reasons with which LiteLLM's OpenAI/Azure stream wrapper fails the stream:
#: ``abort`` (vLLM's aborted generation: an ``InternalServerError``, status 500) and
#: ``error`` (a plain exception: the stream failed).
FAILING_FINISH_REASONS = frozenset({"abort", "error"})


def failing_finish_error(finish: str) -> Exception:
    """The exception for a ``FAILING_FINISH_REASONS`` finish, classified as LiteLLM's is."""
    if finish == "abort":
        from relay.upstream.llm import get_litellm

        return get_litellm().InternalServerError(
            message="Upstream generation aborted (finish_reason=abort)", model="",
            llm_provider="")
    # The provider's doing, not a relay bug: classified like the LiteLLM path's failure.
    return ProviderStreamError("the provider's stream finished with an error")



def openai_decoder_for(provider: str, generic_decoder: type, map_finish, stream_error,
                       chunk_error) -> Any:
    """A fresh decoder for one stream of ``provider``: the generic OpenAI decoder (the
    OpenAI SDK's reading, also Azure's), or ``LineReadDecoder`` for the providers LiteLLM
    reads with its own line handler."""
    if provider in LINE_READ_HANDLERS:
        return LineReadDecoder(provider, map_finish, chunk_error)
    return generic_decoder(map_finish, stream_error)


class OpenAIUsage:
    """The usage of an OpenAI-format stream, as both OpenAI-format decoders read it: the
    largest positive prompt and completion counts any chunk's ``usage`` carried."""

    __slots__ = ()
    usage: tuple[int | None, int | None]

    def _take_usage(self, usage: Any) -> None:
        if type(usage) is not dict:
            return
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt, completion = self.usage
        if type(p) is int and p > 0:
            prompt = max(prompt or 0, p)
        if type(c) is int and c > 0:
            completion = max(completion or 0, c)
        self.usage = (prompt, completion)

    def provider_usage(self) -> UsageInfo | None:
        prompt, completion = self.usage
        if prompt is None and completion is None:
            return None
        return UsageInfo(prompt or 0, completion or 0, estimated=False)


def openai_delta(delta: dict, reasoning: Any, finish: str | None) -> tuple | None:
    """One choice's ``delta`` as ``(reasoning, content, tool_calls, finish)``, with
    ``(..., 1, refusal)`` after it when it carries refusal text (``delta.refusal``), or None
    when it carries nothing (each dialect picks ``reasoning`` its own way). A ``content``
    array of parts is read by ``content_parts`` (text parts the content, thinking parts,
    when present, the reasoning; a wrong shape raises ``WrongShapedContentParts``). A tool call
    without ``index`` keeps ``None`` (the streamer's assembly decides which call it
    continues)."""
    tool_calls = delta.get("tool_calls")
    if tool_calls:
        calls = []
        for tc in tool_calls:
            fn = tc.get("function") or {}
            calls.append((tc.get("index"), tc.get("id") or None, fn.get("name"),
                          fn.get("arguments") or ""))
        tool_calls = calls
    content = delta.get("content")
    if type(content) is list:
        # Mistral's content parts (relay.upstream.raw_tap.content_parts): text and thinking.
        content, thinking = content_parts(content)
        if thinking is not None:
            reasoning = thinking
    refusal = delta.get("refusal")
    if refusal and type(refusal) is str:
        return (reasoning if type(reasoning) is str else None, content, tool_calls, finish, 1,
                refusal)
    if reasoning or content or tool_calls or finish:
        return (reasoning if type(reasoning) is str else None, content, tool_calls, finish)
    return None


class LineReadDecoder(OpenAIUsage):
    """OpenAI-format events of the ``LINE_READ_HANDLERS`` providers (Groq, OpenRouter,
    DeepSeek, Together, hosted vLLM, Fireworks, xAI, Mistral), read as LiteLLM's HTTP handler
    reads them (``BaseModelResponseIterator`` + the provider's ``chunk_parser``; what a
    provider's parser changes in a chunk, ``_CHUNK_ADAPTERS``), not as the OpenAI SDK:

    * a data line that is not JSON (or JSON that is empty) is skipped, the stream goes on;
    * ``[DONE]`` is a finish ("stop") when no finish reason came before it, and the stream
      still ends at EOF, not at ``[DONE]``;
    * a connection cut after the finish reason ends the stream normally (the line reader
      has its finish; the usage read so far stands);
    * reasoning: ``delta.reasoning`` (mapped to ``reasoning_content``, winning over it: the
      generic handler and Groq's); OpenRouter's ``delta.reasoning`` only (its handler
      overwrites ``reasoning_content`` with it);
    * a ``finish_reason`` of ``abort`` fails the stream (status 500); on OpenRouter
      ``abort`` and ``error`` are finish reasons like others (the OpenAI SDK path fails
      both: ``FAILING_FINISH_REASONS``);
    * an error inside the stream and a chunk the provider's parser rejects fail the stream
      with the exception LiteLLM's parser raises for it (``chunk_error``: status from the
      error's ``code``, OpenRouter: a chunk missing ``id``/``created``/``model``/``choices``
      or a choice's ``delta`` is a 400).
    """

    __slots__ = ("done", "finish_reason", "usage", "_map_finish", "_chunk_error",
                 "_openrouter", "_adapt")
    broken = False
    tolerates_cut_after_finish = True

    def __init__(self, provider: str, map_finish, chunk_error) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: tuple[int | None, int | None] = (None, None)
        self._map_finish = map_finish
        self._chunk_error = chunk_error
        self._openrouter = provider == "openrouter"
        # The provider handler's own change of a parsed chunk (LINE_READ_HANDLERS), if any.
        self._adapt = _CHUNK_ADAPTERS.get(provider)

    def decode(self, events: list[tuple[bytes | None, bytes]]) -> list[tuple]:
        deltas = []
        openrouter = self._openrouter
        for _event, data in events:
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                if data.strip() == b"[DONE]" and self.finish_reason is None:
                    self.finish_reason = "stop"
                    deltas.append((None, None, None, "stop"))
                continue
            if not obj:
                continue
            if type(obj) is not dict or "error" in obj and (obj["error"] or openrouter) or (
                    openrouter and not _OPENROUTER_KEYS.issubset(obj)):
                raise self._chunk_error(obj)
            if self._adapt is not None:
                self._adapt(obj)
            usage = obj.get("usage")
            if usage:
                self._take_usage(usage)
            choices = obj.get("choices")
            if not choices:
                # LiteLLM's wrapper hands a chunk without choices on (Azure's filter results,
                # the usage chunk): it counts as a sign of life for the idle timer.
                deltas.append(_NO_DELTA)
                continue
            if openrouter and not all(type(c) is dict and type(c.get("delta")) is dict
                                      for c in choices):
                raise self._chunk_error(obj)  # its parser needs every choice's delta
            choice = choices[0]
            finish = choice.get("finish_reason")
            if finish:
                if finish == "abort" and not openrouter:
                    raise self._chunk_error(obj)  # Groq's parser: an aborted generation
                finish = self.finish_reason = self._map_finish(finish)
            delta = choice.get("delta")
            if not delta:
                if finish:
                    deltas.append((None, None, None, finish))
                continue
            if openrouter:
                reasoning = delta.get("reasoning")
            elif "reasoning" in delta:
                reasoning = delta["reasoning"]
            else:
                reasoning = delta.get("reasoning_content")
            event = openai_delta(delta, reasoning, finish)
            if event is not None:
                deltas.append(event)
        return deltas


_NO_DELTA = (None, None, None, None)  # as fast_path._NO_DELTA: a sign of life, no event
_OPENROUTER_KEYS = frozenset({"id", "created", "model", "choices"})


def _xai_chunk(chunk: dict) -> None:
    """What ``XAIChatCompletionStreamingHandler`` changes: its usage chunk (empty
    ``choices``) gets one empty choice, and reasoning tokens are folded into the completion
    tokens (LiteLLM's ``XAIChatConfig.fold_reasoning_tokens_into_completion``)."""
    from litellm.llms.xai.chat.transformation import XAIChatConfig

    if not chunk.get("choices") and "usage" in chunk:
        chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": None}]
    usage = chunk.get("usage")
    if type(usage) is dict:
        XAIChatConfig.fold_reasoning_tokens_into_completion(usage)


def _mistral_chunk(chunk: dict) -> None:
    """What ``MistralChatResponseIterator`` changes: a ``content`` list (Magistral's
    ``thinking``/``text`` blocks) becomes the text, and its thinking the reasoning, with
    LiteLLM's own ``_normalize_content_blocks``."""
    choices = chunk.get("choices")
    if type(choices) is not list:
        return
    for choice in choices:
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is not dict or type(delta.get("content")) is not list:
            continue
        from litellm.llms.mistral.chat.transformation import MistralChatResponseIterator

        try:
            text, thinking, reasoning = MistralChatResponseIterator._normalize_content_blocks(
                delta["content"])
        except Exception:
            return  # LiteLLM's handler falls back to the chunk as it came
        delta["content"] = text
        if thinking:
            delta["reasoning_content"] = reasoning
        else:
            delta.pop("reasoning_content", None)


_CHUNK_ADAPTERS = {"xai": _xai_chunk, "mistral": _mistral_chunk}
