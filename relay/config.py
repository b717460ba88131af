"""Relay settings: CLI flags > ``RELAY_*`` environment variables > defaults.

Loaded with pydantic-settings; importing this module never imports LiteLLM, so
``relay serve --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    start_rate_per_minute: float = Field(60.0, gt=0, description="start token bucket rate")
    start_burst: int = Field(10, ge=1)
    frames_per_second: float = Field(100.0, gt=0, description="inbound, per connection")
    frame_burst: int = Field(200, ge=1)
    max_messages_bytes: int = Field(512 * 1024, ge=1024,
                                    description="JSON size of start.messages+tools")
    allow_origins: list[str] = Field(default_factory=list,
                                     description="browser Origins allowed; '*' = any")
    trusted_proxies: list[str] = Field(default_factory=list,
                                       description="peers whose X-Forwarded-For is honoured")
    # --- authentication and token budget (issue: auth); see relay/auth.py
    auth: bool = Field(False, description="require an API key or a signed token")
    api_keys: list[str] = Field(default_factory=list, repr=False,
                                description="static API keys, plain or 'sha256:<hex>'")
    token_secret: SecretStr | None = Field(None, description="HS256 secret of signed tokens "
                                           "(env RELAY_TOKEN_SECRET; never a CLI flag)")
    completion_token_budget_per_hour: int | None = Field(
        None, ge=1, description="completion tokens per principal per hour (rate_limited)")

    @model_validator(mode="after")
    def _check_auth(self) -> RelaySettings:
        from .auth import check_auth_settings

        check_auth_settings(self.auth, self.api_keys, self.token_secret)
        return self

    drain_timeout: float = Field(30.0, ge=0, description="shutdown: let streams finish")
    # --- resume and backpressure
    detach_grace: float = Field(15.0, ge=0, description="seconds a stream outlives its "
                                "connection, resumable; 0 = disconnect cancels at once")
    max_stream_log_bytes: int = Field(8 << 20, ge=1024,
                                      description="frames kept per stream for resume")
    max_log_bytes: int = Field(256 << 20, ge=1024, description="all streams' logs, in total")
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
    send_buffer_bytes: int | None = Field(None, ge=4096, description="kernel send buffer per "
                                          "connection (SO_SNDBUF); default: the OS's")
    log_level: str = "info"
    log_json: bool = False
    config: Path | None = Field(None, description="TOML file of model aliases")
