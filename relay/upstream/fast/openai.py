"""OpenAI Chat Completions SSE (``data: {chat.completion.chunk}`` ... ``data: [DONE]``) ->
``Delta`` values, read the way LiteLLM reads each OpenAI-format provider (LiteLLM 1.110).

LiteLLM reads these streams in two ways, and ``OpenAIDecoder`` (one chunk loop) has both:

* **the OpenAI SDK's reading** (OpenAI and any OpenAI-compatible ``api_base`` via
  ``openai/``, Cerebras, Perplexity: ``relay.upstream.fast.endpoints.OPENAI_SDK_PROVIDERS``;
  Azure OpenAI through the SDK's ``AsyncAzureOpenAI``): a data line that is not a JSON
  object fails the stream; ``[DONE]`` ends it; an ``{"error": ...}`` event fails it as a
  broken stream (``stream_error``); a finish reason of ``abort`` or ``error`` fails it
  (``FAILING_FINISH_REASONS``); reasoning is ``delta.reasoning_content``, else
  ``delta.reasoning`` (vLLM's, Groq's and Cerebras's name, as LiteLLM maps it). Azure's
  first chunk (empty ``choices``, ``prompt_filter_results``) and its
  ``content_filter_results`` carry nothing the relay shows.
* **LiteLLM's line reader** (``BaseModelResponseIterator`` with the provider's
  ``chunk_parser``) for the ``LINE_READ_HANDLERS`` providers (Groq, OpenRouter, DeepSeek,
  Together, hosted vLLM, Fireworks, xAI, Mistral):

  * a data line that is not JSON (or JSON that is empty) is skipped, the stream goes on;
  * ``[DONE]`` is a finish ("stop") when no finish reason came before it, and the stream
    still ends at EOF, not at ``[DONE]``;
  * a connection cut after the finish reason ends the stream normally (the line reader
    has its finish; the usage read so far stands);
  * reasoning: ``delta.reasoning`` (mapped to ``reasoning_content``, winning over it: the
    generic handler and Groq's); OpenRouter's ``delta.reasoning`` only (its handler
    overwrites ``reasoning_content`` with it);
  * a ``finish_reason`` of ``abort`` fails the stream (status 500); on OpenRouter
    ``abort`` and ``error`` are finish reasons like others;
  * an error inside the stream and a chunk the provider's parser rejects fail the stream
    with the exception LiteLLM's parser raises for it (``chunk_error``: status from the
    error's ``code``; OpenRouter: a chunk missing ``id``/``created``/``model``/``choices``
    or a choice's ``delta`` is a 400);
  * what a provider's handler changes in a parsed chunk, LiteLLM's own functions do here
    too (``_CHUNK_ADAPTERS``: xAI's usage chunk and reasoning tokens, Mistral's content
    blocks); Fireworks only adds hidden fields the relay does not show. Groq's
    ``x_groq.usage`` is ignored (so does LiteLLM: the usage is the top-level ``usage`` chunk
    ``stream_options.include_usage`` asks for, else the relay's estimate).

Both readings: a chunk without ``choices`` (a usage chunk, Azure's filter results) is a sign
of life (``NO_DELTA``); the usage is the largest positive prompt and completion counts any
chunk's ``usage`` carried; a ``content`` array of parts is read by
``relay.upstream.raw_tap.content_parts``; ``delta.refusal`` text is the delta's refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from relay.upstream.deltas import NO_DELTA, Delta, ToolCallPiece, UsageInfo
from relay.upstream.errors import ProviderStreamError
from relay.upstream.fast.decoding import Malformed, SSEEvent
from relay.upstream.raw_tap import content_parts

__all__ = ["FAILING_FINISH_REASONS", "LINE_READ_HANDLERS", "OpenAIDecoder",
           "failing_finish_error", "openai_delta"]

#: OpenAI-format providers LiteLLM reads with its own HTTP handler, line by line, through a
#: stream handler per provider (``config.get_model_response_iterator``), not the OpenAI SDK
#: (see the module docstring). The value names the LiteLLM handler class whose reading
#: ``OpenAIDecoder`` reproduces: ``select_route`` keeps an alias on LiteLLM when its
#: provider's handler is another (a LiteLLM upgrade that changed it).
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

#: Finish reasons with which LiteLLM's OpenAI/Azure stream wrapper fails the stream:
#: ``abort`` (vLLM's aborted generation: an ``InternalServerError``, status 500) and
#: ``error`` (a plain exception: the stream failed).
FAILING_FINISH_REASONS = ("abort", "error")

_OPENROUTER_KEYS = frozenset({"id", "created", "model", "choices"})

#: A finish with nothing else (``[DONE]`` before any finish, on the line reader).
_STOP = Delta(finish_reason="stop")


def failing_finish_error(finish: str) -> Exception:
    """The exception for a ``FAILING_FINISH_REASONS`` finish, classified as LiteLLM's is."""
    if finish == "abort":
        from relay.upstream.llm import get_litellm

        error: Exception = get_litellm().InternalServerError(
            message="Upstream generation aborted (finish_reason=abort)", model="",
            llm_provider="")
        return error
    # The provider's doing, not a relay bug: classified like the LiteLLM path's failure.
    return ProviderStreamError("the provider's stream finished with an error")


class OpenAIDecoder:
    """One OpenAI-format stream of ``provider`` -> deltas (the ``Decoder`` of
    ``relay.upstream.fast.decoding``), read as LiteLLM reads that provider (the module
    docstring). ``map_finish``: LiteLLM's ``map_finish_reason``; ``stream_error(error)``: the
    exception for an ``{"error": ...}`` event on the SDK's reading; ``chunk_error(chunk)``:
    the exception the provider's parser raises for a chunk it rejects (line reader)."""

    __slots__ = ("done", "finish_reason", "usage", "tolerates_cut_after_finish",
                 "_line_read", "_openrouter", "_failing", "_adapt", "_map_finish",
                 "_stream_error", "_chunk_error")
    broken = False

    def __init__(self, provider: str, map_finish: Callable[[Any], Any],
                 stream_error: Callable[[Any], Exception],
                 chunk_error: Callable[[Any], Exception]) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.usage: tuple[int | None, int | None] = (None, None)
        line_read = provider in LINE_READ_HANDLERS
        self._line_read = line_read
        self._openrouter = provider == "openrouter"
        self.tolerates_cut_after_finish = line_read
        self._failing: tuple[str, ...] = (
            FAILING_FINISH_REASONS if not line_read else () if self._openrouter else ("abort",))
        # The provider handler's own change of a parsed chunk (LINE_READ_HANDLERS), if any.
        self._adapt = _CHUNK_ADAPTERS.get(provider)
        self._map_finish = map_finish
        self._stream_error = stream_error
        self._chunk_error = chunk_error

    def decode(self, events: Sequence[SSEEvent]) -> list[Delta]:
        deltas: list[Delta] = []
        line_read = self._line_read
        openrouter = self._openrouter
        for _event, data in events:
            if self.done:
                break
            if data[:6] == b"[DONE]" and not line_read:
                self.done = True                 # the SDK's reading ends here
                break
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                if not line_read:
                    raise Malformed("malformed JSON in the provider's stream") from None
                if data.strip() == b"[DONE]" and self.finish_reason is None:
                    self.finish_reason = "stop"
                    deltas.append(_STOP)
                continue                         # the line reader skips what is not JSON
            if (type(obj) is not dict or not obj or "error" in obj or openrouter) \
                    and not self._accepts(obj):
                continue
            if self._adapt is not None:
                self._adapt(obj)
            usage = obj.get("usage")
            if usage:
                self._take_usage(usage)
            choices = obj.get("choices")
            if not choices:
                # LiteLLM's wrapper hands a chunk without choices on (Azure's filter results,
                # the usage chunk): it counts as a sign of life for the idle timer.
                deltas.append(NO_DELTA)
                continue
            if openrouter and not all(type(c) is dict and type(c.get("delta")) is dict
                                      for c in choices):
                raise self._chunk_error(obj)  # its parser needs every choice's delta
            choice = choices[0]
            finish = choice.get("finish_reason")
            if finish:
                if finish in self._failing:
                    raise (self._chunk_error(obj) if line_read   # Groq's parser: aborted
                           else failing_finish_error(finish))
                finish = self.finish_reason = self._map_finish(finish)
            delta = choice.get("delta")
            if not delta:
                if finish:
                    deltas.append(Delta(None, None, None, finish))
                continue
            if not line_read:
                reasoning = delta.get("reasoning_content")
                if reasoning is None:
                    reasoning = delta.get("reasoning")
            elif openrouter:
                reasoning = delta.get("reasoning")
            elif "reasoning" in delta:
                reasoning = delta["reasoning"]
            else:
                reasoning = delta.get("reasoning_content")
            event = openai_delta(delta, reasoning, finish)
            if event is not None:
                deltas.append(event)
        return deltas

    def _accepts(self, obj: Any) -> bool:
        """Whether to decode a parsed event that is not a plain non-empty object or may hold
        an error (False: skip it); raises the stream's failure for one that fails it."""
        if not self._line_read:
            if type(obj) is not dict:
                raise Malformed("a stream event that is not a JSON object")
            if obj.get("error"):
                raise self._stream_error(obj["error"])
            return True
        if not obj:
            return False                         # empty JSON: the line reader skips it
        openrouter = self._openrouter
        if type(obj) is not dict or "error" in obj and (obj["error"] or openrouter) or (
                openrouter and not _OPENROUTER_KEYS.issubset(obj)):
            raise self._chunk_error(obj)
        return True

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


def openai_delta(delta: dict[str, Any], reasoning: Any, finish: str | None) -> Delta | None:
    """One choice's ``delta`` as a ``Delta`` (with ``refusal`` when it carries refusal text,
    ``delta.refusal``), or None when it carries nothing (each reading picks ``reasoning`` its
    own way). A ``content`` array of parts is read by ``content_parts`` (text parts the
    content, thinking parts, when present, the reasoning; a wrong shape raises
    ``WrongShapedContentParts``). A tool call without ``index`` keeps ``None`` (the
    streamer's assembly decides which call it continues)."""
    raw_calls = delta.get("tool_calls")
    tool_calls: list[ToolCallPiece] | None = None
    if raw_calls:
        tool_calls = []
        for tc in raw_calls:
            fn = tc.get("function") or {}
            tool_calls.append(ToolCallPiece(tc.get("index"), tc.get("id") or None,
                                            fn.get("name"), fn.get("arguments") or ""))
    content = delta.get("content")
    if type(content) is list:
        # Mistral's content parts (relay.upstream.raw_tap.content_parts): text and thinking.
        content, thinking = content_parts(content)
        if thinking is not None:
            reasoning = thinking
    refusal = delta.get("refusal")
    if refusal and type(refusal) is str:
        return Delta(reasoning if type(reasoning) is str else None, content, tool_calls,
                     finish, refusal)
    if reasoning or content or tool_calls or finish:
        return Delta(reasoning if type(reasoning) is str else None, content, tool_calls,
                     finish)
    return None


def _xai_chunk(chunk: dict[str, Any]) -> None:
    """What ``XAIChatCompletionStreamingHandler`` changes: its usage chunk (empty
    ``choices``) gets one empty choice, and reasoning tokens are folded into the completion
    tokens (LiteLLM's ``XAIChatConfig.fold_reasoning_tokens_into_completion``)."""
    from litellm.llms.xai.chat.transformation import XAIChatConfig

    if not chunk.get("choices") and "usage" in chunk:
        chunk["choices"] = [{"index": 0, "delta": {}, "finish_reason": None}]
    usage = chunk.get("usage")
    if type(usage) is dict:
        XAIChatConfig.fold_reasoning_tokens_into_completion(usage)


def _mistral_chunk(chunk: dict[str, Any]) -> None:
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


_CHUNK_ADAPTERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "xai": _xai_chunk, "mistral": _mistral_chunk}
