"""Builds what a relay serves from its settings: the model registry (TOML config file).

Config format (``relay serve --config relay.toml`` or ``RELAY_CONFIG``)::

    [models.gpt]                       # the alias clients ask for
    model = "openai/gpt-4o-mini"       # any LiteLLM model string; "demo" = embedded model
    api_key_env = "OPENAI_API_KEY"     # NAME of the env var holding the key (never the key)
    api_base = "https://..."           # optional
    max_tokens = 4096                  # optional ceiling; larger requests are bad_request
    first_token_timeout = 30           # optional per-alias timeouts (seconds)
    idle_timeout = 20
    total_timeout = 300
    params = { temperature = 0.2 }     # optional default params (same allowlist as clients)
    retries_before_first_token = 0     # optional, explicit opt-in (connect failures only)
    fast = false                       # optional: never use the fast path for this alias
    azure_ad_token_env = "AZURE_AD_TOKEN"  # Azure only, instead of api_key_env: NAME of the
                                       # env var holding an Entra ID access token (Bearer)

Startup fails with ``ConfigError`` naming the alias and what is missing; secrets are never
printed (only env var names).
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from llm_relay_protocol.messages import ALLOWED_PARAMS

from relay.config import RelaySettings
from relay.upstream.providers import DEMO_ALIAS, ModelRegistry, ModelSpec, demo_spec
from relay.upstream.event_streamer import Timeouts

__all__ = ["ConfigError", "build_registry", "load_models"]

_ALIAS_KEYS = {"model", "api_key_env", "api_base", "max_tokens", "first_token_timeout",
               "idle_timeout", "total_timeout", "params", "retries_before_first_token", "fast",
               "azure_ad_token_env"}


class ConfigError(ValueError):
    """A configuration problem that must stop startup."""


def build_registry(settings: RelaySettings, *, check_providers: bool = True,
                   require_env: bool = True) -> ModelRegistry:
    """The registry for ``settings``: the config file's aliases, else the demo model.
    ``require_env=False`` (``relay check``) accepts key variables that are not set."""
    from relay.upstream.llm import get_litellm, set_demo_tps

    set_demo_tps(settings.demo_tps)
    defaults = Timeouts(settings.first_token_timeout, settings.idle_timeout,
                        settings.total_timeout)
    if settings.config is None:
        return ModelRegistry([demo_spec(defaults)])
    try:
        text = settings.config.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {settings.config}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{settings.config}: invalid TOML: {exc}") from None
    specs = load_models(data, defaults, require_env=require_env)
    if check_providers:
        litellm = get_litellm()
        for spec in specs:
            if spec.alias == DEMO_ALIAS and spec.model.startswith("llm-relay-demo/"):
                continue
            try:
                litellm.get_llm_provider(spec.model)
            except Exception:
                raise ConfigError(
                    f"model alias {spec.alias!r}: LiteLLM does not know the provider of "
                    f"{spec.model!r} (use e.g. 'openai/<model>' or 'anthropic/<model>')"
                ) from None
    return ModelRegistry(specs)


def load_models(data: dict[str, Any], defaults: Timeouts, *,
                require_env: bool = True) -> list[ModelSpec]:
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError("config has no [models.<alias>] tables")
    unknown_top = set(data) - {"models"}
    if unknown_top:
        raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown_top))}")
    # Every alias is checked before failing, so one start reports every problem (all the
    # unset key variables, say) rather than one per attempt.
    specs, problems = [], []
    for alias, entry in models.items():
        try:
            specs.append(_load_alias(alias, entry, defaults, require_env))
        except ConfigError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n" + "\n".join(f"  - {problem}"
                                                                     for problem in problems))
    return specs


def _load_alias(alias: str, entry: Any, defaults: Timeouts,
                require_env: bool = True) -> ModelSpec:
    where = f"model alias {alias!r}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    if "api_key" in entry:
        raise ConfigError(f"{where}: put the key in an environment variable and name it "
                          "with api_key_env; keys never go in the config file")
    unknown = set(entry) - _ALIAS_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
    model = entry.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: 'model' (a LiteLLM model string) is required")
    if model == "demo":
        base = demo_spec(defaults)
        model = base.model
    key_env = entry.get("api_key_env")
    if key_env is not None:
        if not isinstance(key_env, str) or not key_env:
            raise ConfigError(f"{where}: api_key_env must be an environment variable name")
        if require_env and not os.environ.get(key_env):
            raise ConfigError(f"{where}: environment variable {key_env} (api_key_env) is "
                              "not set or empty")
    token_env = entry.get("azure_ad_token_env")
    if token_env is not None:
        if not isinstance(token_env, str) or not token_env:
            raise ConfigError(f"{where}: azure_ad_token_env must be an environment variable "
                              "name")
        if not model.startswith("azure/"):
            raise ConfigError(f"{where}: azure_ad_token_env is for azure/ models only")
        if key_env is not None:
            raise ConfigError(f"{where}: give api_key_env or azure_ad_token_env, not both "
                              "(a key wins over the token)")
        if require_env and not os.environ.get(token_env):
            raise ConfigError(f"{where}: environment variable {token_env} "
                              "(azure_ad_token_env) is not set or empty")
    params = entry.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: params must be a table")
    bad = set(params) - set(ALLOWED_PARAMS)
    if bad:
        raise ConfigError(f"{where}: params not allowed: {', '.join(sorted(bad))}")
    timeouts = Timeouts(
        _seconds(entry, "first_token_timeout", defaults.first_token, where),
        _seconds(entry, "idle_timeout", defaults.idle, where),
        _seconds(entry, "total_timeout", defaults.total, where),
    )
    max_tokens = entry.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"{where}: max_tokens must be a positive integer")
    retries = entry.get("retries_before_first_token", 0)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"{where}: retries_before_first_token must be an integer >= 0")
    api_base = entry.get("api_base")
    if api_base is not None and not isinstance(api_base, str):
        raise ConfigError(f"{where}: api_base must be a string URL")
    fast = entry.get("fast", True)
    if not isinstance(fast, bool):
        raise ConfigError(f"{where}: fast must be true or false")
    return ModelSpec(alias=alias, model=model, api_base=api_base, api_key_env=key_env,
                     timeouts=timeouts, default_params=dict(params), max_tokens=max_tokens,
                     retries_before_first_token=retries, fast=fast,
                     azure_ad_token_env=token_env)


def _seconds(entry: dict, key: str, default: float | None, where: str) -> float | None:
    value = entry.get(key, default)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive number of seconds")
    return float(value)
