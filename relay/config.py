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
    max_streams: int = Field(8, ge=1, description="concurrent streams per connection")
    max_frame_bytes: int = Field(1 << 20, ge=1024, description="inbound frame limit (1009 above)")
    hello_timeout: float = Field(10.0, gt=0)
    demo_tps: float = Field(40.0, ge=0, description="demo model tokens/s (0 = unthrottled)")
    first_token_timeout: float | None = Field(60.0, gt=0)
    idle_timeout: float | None = Field(30.0, gt=0)
    total_timeout: float | None = Field(600.0, gt=0)
    log_level: str = "info"
    log_json: bool = False
    config: Path | None = Field(None, description="TOML file of model aliases")
