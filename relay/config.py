"""Relay settings: CLI flags > ``RELAY_*`` environment variables > defaults.

Loaded with pydantic-settings; importing this module never imports LiteLLM, so
``relay serve --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_relay_protocol import DecodeLimits

__all__ = ["RelaySettings"]


class RelaySettings(BaseSettings):
    """Every knob of a relay process. Durations are seconds."""

    # hide_input_in_errors: a validation error must not echo api_keys or the token secret.
    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore",
                                      hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="serve /metrics here, not on port (0 = any)")
    max_streams: int = Field(8, ge=1, description="concurrent streams per connection")
    max_frame_bytes: int = Field(1 << 20, ge=1024, description="inbound frame limit (1009 above)")
    hello_timeout: float = Field(10.0, gt=0)
    demo_tps: float = Field(40.0, ge=0, description="demo model tokens/s (0 = unthrottled)")
    first_token_timeout: float | None = Field(60.0, gt=0)
    idle_timeout: float | None = Field(30.0, gt=0)
    total_timeout: float | None = Field(600.0, gt=0)
    # --- limits (issue: safe to expose)
    max_connections: int = Field(10_000, ge=1, description="per server (4429 above)")
    max_connections_per_principal: int = Field(100, ge=1)
    max_streams_per_principal: int = Field(32, ge=1)
    # None = the mode's default (relay.core.limits.start_rate_limit): no start rate without auth,
    # 600/min burst 100 per principal with auth.
    start_rate_per_minute: float | None = Field(None, gt=0, description="start token bucket "
                                                "rate per principal (None: the mode's default)")
    start_burst: int | None = Field(None, ge=1, description="start token bucket size "
                                    "(None: ten seconds' worth of the rate)")
    frames_per_second: float = Field(100.0, gt=0, description="inbound, per connection")
    frame_burst: int = Field(200, ge=1)
    # relay.core.limits.REPLAY_EVENTS_PER_SECOND / REPLAY_EVENT_BURST
    replay_events_per_second: float = Field(2_000.0, ge=0, description="events a principal's "
                                            "resumes may replay per second (0 = no limit)")
    replay_event_burst: int = Field(100_000, ge=1, description="replay token bucket size, "
                                    "in events")
    max_messages_bytes: int = Field(512 * 1024, ge=1024,
                                    description="JSON size of start.messages+tools")
    # --- what one inbound frame may hold, checked before validation (llm_relay_protocol.DecodeLimits)
    max_messages: int = Field(2000, ge=1, description="entries of start.messages")
    max_tools: int = Field(128, ge=0, description="entries of start.tools")
    max_content_parts: int = Field(4000, ge=0, description="content parts of one start's "
                                   "messages, together")
    max_start_keys: int = Field(20_000, ge=16, description="keys of one start's messages, "
                                "content parts and tools, together")
    # At most 254: orjson encodes no deeper, and a pong echoes the ping's data.
    max_json_depth: int = Field(32, ge=4, le=254, description="nesting of arrays/objects in "
                                "a frame (the frame is level 1)")
    max_json_containers: int = Field(32_768, ge=64, description="'[' and '{' characters in a "
                                     "frame's text, strings included")
    allow_origins: list[str] = Field(default_factory=list,
                                     description="browser Origins allowed; '*' = any")
    public_url: str | None = Field(None, description="the address browsers use to reach the "
                                   "relay (http(s):// or ws(s)://); its origin is the relay's "
                                   "own. Default: the listen address (see relay/http/handshake.py)")
    trusted_proxies: list[str] = Field(default_factory=list,
                                       description="peer addresses or CIDRs whose "
                                       "X-Forwarded-For is honoured")
    max_pending_per_address: int = Field(32, ge=1, description="connections from one address "
                                         "that have not completed hello (4429 above)")
    max_pending_connections: int | None = Field(
        None, ge=1, description="connections without hello, in total (4429 above); "
        "default: a quarter of max_connections")

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        from relay.http.handshake import origin_of_public_url

        if value is not None:
            origin_of_public_url(value)  # ValueError names the problem
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        from relay.http.handshake import parse_networks

        parse_networks(value)  # ValueError names the bad entry
        return value

    @property
    def pending_connections_cap(self) -> int:
        """Connections without a completed hello the relay holds at once, in total."""
        if self.max_pending_connections is not None:
            return self.max_pending_connections
        return max(1, self.max_connections // 4)
    # --- authentication and token budget (issue: auth); see relay/core/auth.py
    auth: bool = Field(False, description="require an API key or a signed token")
    api_keys: list[str] = Field(default_factory=list, repr=False,
                                description="static API keys, plain or 'sha256:<hex>'")
    token_secret: SecretStr | None = Field(None, description="HS256 secret of signed tokens "
                                           "(env RELAY_TOKEN_SECRET; never a CLI flag)")
    completion_token_budget_per_hour: int | None = Field(
        None, ge=1, description="completion tokens per principal per hour (rate_limited)")

    def decode_limits(self) -> DecodeLimits:
        """What one inbound frame may hold, for ``llm_relay_protocol.decode_client_frame``."""
        return DecodeLimits(
            max_messages_bytes=self.max_messages_bytes, max_messages=self.max_messages,
            max_tools=self.max_tools, max_content_parts=self.max_content_parts,
            max_start_keys=self.max_start_keys, max_json_depth=self.max_json_depth,
            max_json_containers=self.max_json_containers)

    @model_validator(mode="after")
    def _check_auth(self) -> RelaySettings:
        from relay.core.auth import check_auth_settings

        check_auth_settings(self.auth, self.api_keys, self.token_secret)
        return self

    drain_timeout: float = Field(30.0, ge=0, description="shutdown: let streams finish")
    # --- resume and backpressure
    detach_grace: float = Field(15.0, ge=0, description="seconds a stream outlives its "
                                "connection, resumable; 0 = disconnect cancels at once")
    max_stream_log_bytes: int = Field(8 << 20, ge=1024,
                                      description="frames kept per stream for resume")
    max_log_bytes: int = Field(256 << 20, ge=1024, description="all streams' logs, in total")
    max_viewers_per_stream: int = Field(8, ge=0, description="attachments of one stream "
                                        "besides its owner (resumes that join it), per relay")
    slow_consumer_bytes: int = Field(1 << 20, ge=1024,
                                     description="unsent backlog per connection tolerated...")
    slow_consumer_grace: float = Field(10.0, gt=0, description="...for this long, then 4008")
    redis_url: str | None = Field(None, description="redis://... : relays share streams "
                                  "(resume and cancel across processes)")
    redis_prefix: str = Field("llmrelay:", min_length=1)
    redis_max_frames: int = Field(100_000, ge=16, description="frames kept per stream in Redis")
    redis_owner_ttl: float = Field(6.0, ge=1.0, description="seconds a relay's heartbeat "
                                   "records live: a killed relay's streams are stream_lost, "
                                   "and stop counting toward shared limits, within this + 1 s")
    # --- OpenAI Responses WebSocket mode (/v1/responses; relay/runtime/responses.py)
    responses_chain_entries: int = Field(256, ge=1, description="stored responses a "
                                         "principal may continue with previous_response_id "
                                         "(oldest dropped first)")
    responses_chain_bytes: int = Field(32 << 20, ge=1024, description="bytes of stored "
                                       "conversations per principal (oldest dropped first)")
    responses_chain_total_bytes: int = Field(256 << 20, ge=1024, description="bytes of "
                                             "stored conversations of every principal "
                                             "together (oldest dropped first)")
    responses_chain_ttl: float = Field(3600.0, gt=0, description="seconds a stored response "
                                       "stays continuable in Redis (--redis), from any "
                                       "connection of its principal")
    send_buffer_bytes: int | None = Field(None, ge=4096, description="kernel send buffer per "
                                          "connection (SO_SNDBUF); default: the OS's")
    # --- what the relay reads from an upstream, at most (relay/upstream/caps.py)
    max_error_body_bytes: int = Field(8 * 1024, ge=256, description="bytes of an upstream "
                                      "HTTP error body read (the rest is not read)")
    max_event_bytes: int = Field(1 << 20, ge=1024, description="one upstream SSE line or "
                                 "event; above it the stream fails upstream_error")
    max_decompressed_bytes: int = Field(256 << 20, ge=1 << 20, description="bytes one "
                                        "compressed upstream response may inflate to")
    max_decompression_ratio: float = Field(200.0, ge=2, description="inflated/compressed "
                                           "bytes of an upstream response (past its first "
                                           "MiB)")

    def upstream_limits(self):
        """The caps on upstream bytes (``relay.upstream.caps.UpstreamLimits``)."""
        from relay.upstream.caps import UpstreamLimits

        return UpstreamLimits(self.max_error_body_bytes, self.max_event_bytes,
                              self.max_decompressed_bytes, self.max_decompression_ratio)

    log_level: str = "info"
    log_json: bool = False
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="asyncio event loop: uvloop when installed (auto), or force one "
        "(relay/runtime/eventloop.py)")
    config: Path | None = Field(None, description="TOML file of model aliases")
