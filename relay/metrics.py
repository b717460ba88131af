"""Prometheus metrics of one relay, served at ``/metrics`` (text exposition format).

Each ``RelayServer`` has its own ``CollectorRegistry`` so several relays in one process
(tests) do not mix their numbers. Updates are a few attribute operations each; nothing here
runs per chunk except ``tokens`` and ``relay_latency`` (one observe per frame).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "RelayMetrics"]


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("relay_connections", "Open WebSocket connections", registry=r)
        self.active_streams = Gauge("relay_active_streams", "Streams running now", registry=r)
        self.responses_chain_bytes = Gauge(
            "relay_responses_chain_bytes", "Bytes of stored /v1/responses conversations "
            "(previous_response_id) in this process", registry=r)
        self.streams = Counter("relay_streams", "Streams ended, by final status",
                               ["status"], registry=r)
        self.tokens = Counter("relay_tokens", "token frames relayed to clients", registry=r)
        self.errors = Counter("relay_errors", "error frames sent, by code", ["code"],
                              registry=r)
        self.upstream_closed_on_cancel = Counter(
            "relay_upstream_closed_on_cancel",
            "Upstream requests closed because a stream was cancelled", registry=r)
        self.model_path = Gauge(
            "relay_model_path", "Streaming path of each model alias (1 = the one in use): "
            "fast = the relay reads the provider's SSE itself, litellm = through LiteLLM",
            ["alias", "path"], registry=r)
        self.requests = Counter(
            "relay_requests", "Upstream requests by model alias and the path each actually "
            "took (a request the fast path cannot make goes through LiteLLM: path=litellm)",
            ["alias", "path"], registry=r)
        self.time_to_first_token = Histogram(
            "relay_time_to_first_token_seconds", "From start to the first token frame sent",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.relay_latency = Histogram(
            "relay_added_latency_seconds",
            "From an event leaving LiteLLM to its frame handed to the socket",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05),
            registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
