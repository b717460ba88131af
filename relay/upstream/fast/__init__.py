"""The fast streaming path: the relay reads the provider's SSE itself.

LiteLLM turns every streamed chunk into OpenAI SDK and LiteLLM objects (~600-1,000 us of CPU per
token here); reading the same Server-Sent Events with httpx costs ~50 us. For aliases whose
provider speaks one of two streaming formats, the relay therefore reads the wire itself:

* ``openai``: OpenAI Chat Completions SSE (``data: {chat.completion.chunk}`` ... ``data: [DONE]``),
  for the LiteLLM providers in ``OPENAI_FORMAT_PROVIDERS`` (OpenAI and any OpenAI-compatible
  ``api_base`` via ``openai/``, Cerebras, Perplexity, Azure OpenAI, vLLM, Together, DeepSeek,
  Groq, OpenRouter, Fireworks, xAI, Mistral), each at its default endpoint when the alias
  has no ``api_base``;
* ``anthropic``: Anthropic Messages SSE (``event: X`` + ``data: {...}``), provider ``anthropic``.

Every other provider stays on LiteLLM's path. What LiteLLM still does is its provider
knowledge, once per stream, never per chunk: the request, the meaning of an HTTP error,
finish reasons and Anthropic's usage arithmetic. Timers, cancel (``aclose`` of the
response), usage decisions and estimates are the streamer's
(``relay.upstream.event_streamer``), shared with the LiteLLM path.

One module per job:

- ``routing``: which path an alias takes (``select_route``), which requests its route
  takes (``FastRoute.refusal``), and opening a stream (``FastRoute.open``);
- ``requests``: a stream's HTTP request, built by LiteLLM's provider code;
- ``endpoints``: each provider's default base URL, key and headers;
- ``pool``: the event loop's shared HTTP client (on ``relay.upstream.transport``);
- ``reader``: one open response: body -> caps -> ``relay.upstream.sse.SSEParser`` ->
  decoder -> batches of ``relay.upstream.deltas.Delta``;
- ``decoding``: what a decoder is, and the failures provider data may cause;
- ``openai``: OpenAI-format decoding, as LiteLLM reads each OpenAI-format provider;
- ``anthropic``: Anthropic-format decoding;
- ``failures``: LiteLLM's exceptions for what the provider reported.
"""

from relay.upstream.fast.pool import close_idle_http_client
from relay.upstream.fast.routing import (
    ANTHROPIC_FORMAT_PROVIDERS, OPENAI_FORMAT_PROVIDERS, FastRoute, PathChoice, select_route,
)

__all__ = ["ANTHROPIC_FORMAT_PROVIDERS", "OPENAI_FORMAT_PROVIDERS", "FastRoute", "PathChoice",
           "close_idle_http_client", "select_route"]
