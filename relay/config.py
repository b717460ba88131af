"""Relay settings: CLI flags > ``RELAY_*`` environment variables > defaults.

Loaded with pydantic-settings; importing this module never imports LiteLLM, so
``relay serve --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["RelaySettings"]


class RelaySettings(BaseSettings):
    """Every knob of a relay process. Durations are seconds."""

    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

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
    drain_timeout: float = Field(30.0, ge=0, description="shutdown: let streams finish")
    log_level: str = "info"
    log_json: bool = False
    config: Path | None = Field(None, description="TOML file of model aliases")
