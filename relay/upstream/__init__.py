"""Adapters to LLM providers: everything that knows a provider exists.

- ``streamer``: ``EventStreamer``, one completion as typed events (timers, cancel, tool-call
  assembly, usage) over either upstream below;
- ``source``: ``UpstreamSource``, a local upstream call as the hub's ``StreamSource`` port
  (``relay.core.ports``): events -> protocol frames;
- ``fast_path``: reads OpenAI- and Anthropic-format SSE directly (httpx + orjson);
- ``fast_formats``: the OpenAI-format dialects LiteLLM reads with code of its own (Azure
  OpenAI, Groq, OpenRouter): their requests and streams, as LiteLLM builds and reads them;
- ``transport``: the fast path's HTTP transport (httpx's API on aiohttp's client, HTTP
  parsed in C);
- ``llm``: LiteLLM, imported once and configured for a relay (the path for every provider);
- ``providers``: model aliases -> how and with which credentials to call;
- ``errors``: provider exceptions -> safe wire error codes (the one place);
- ``demo``: the embedded ``demo`` model (a LiteLLM custom provider, no network).
"""
