"""Adapters to LLM providers: everything that knows a provider exists.

- ``event_streamer``: ``EventStreamer``, one completion as typed events (timers, cancel,
  tool-call assembly, usage) over either upstream below;
- ``deltas``: what an upstream hands the streamer (``Delta`` per provider chunk) and the
  reader interface both upstreams implement;
- ``source``: ``UpstreamSource``, a local upstream call as the hub's ``StreamSource`` port
  (``relay.core.ports``): events -> protocol frames;
- ``fast``: the fast path, which reads OpenAI- and Anthropic-format SSE directly (route
  choice, request building, HTTP pool, stream reader, one decoder per format);
- ``sse``: the one Server-Sent Events parser (both paths), under a size cap;
- ``caps``: the caps on what an upstream may send (error bodies, events, decompression);
- ``raw_tap``: what LiteLLM's stream wrapper loses, read from the provider's own chunks;
- ``transport``: the fast path's HTTP transport (httpx's API on aiohttp's client, HTTP
  parsed in C);
- ``llm``: LiteLLM, imported once and configured for a relay (the path for every provider);
- ``providers``: model aliases -> how and with which credentials to call;
- ``errors``: provider exceptions -> safe wire error codes (the one place);
- ``failure_log``: what the log says about a provider failure (host and cause, nothing
  secret);
- ``admission``: ``OpenGate``, a few provider requests opened per event-loop turn;
- ``demo``: the embedded ``demo`` model (a LiteLLM custom provider, no network).
"""
