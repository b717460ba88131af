"""Where a fast-path request goes when the alias names no ``api_base``: each provider's
default base URL, key and extra headers, resolved exactly as ``litellm.main``'s branch for
that provider resolves them (LiteLLM 1.110), so the fast path sends the request LiteLLM's
own path sends (``tests/relay/test_default_endpoints.py`` compares both, per provider).

``get_llm_provider`` already fills the base and key of most OpenAI-compatible providers
(Groq, DeepSeek, Together, xAI, Fireworks, Cerebras, Perplexity, ...); the branches in
``litellm.main`` then add their own fallbacks, and some providers get none from
``get_llm_provider`` at all (``openai``: the base comes from ``OPENAI_BASE_URL`` /
``OPENAI_API_BASE`` or ``https://api.openai.com/v1``). Anthropic and Azure resolve in
``relay.upstream.fast.requests`` (``azure_request``, and its Anthropic request).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["OPENAI_SDK_PROVIDERS", "resolve_openai_compatible"]

#: Providers ``litellm.main`` sends through its OpenAI SDK branch (``_complete_custom_openai``):
#: the SDK posts to ``{base}/chat/completions`` with ``Authorization: Bearer``, and the key
#: falls back to ``OPENAI_API_KEY``.
OPENAI_SDK_PROVIDERS = frozenset({"openai", "custom_openai", "cerebras", "perplexity"})

#: Providers whose ``litellm.main`` branch supplies a base URL and key of its own:
#: (base env var, default base, key env vars, ``litellm`` attribute of the key).
_BRANCH_DEFAULTS: dict[str, tuple[str, str | None, tuple[str, ...], str | None]] = {
    "groq": ("GROQ_API_BASE", "https://api.groq.com/openai/v1", ("GROQ_API_KEY",),
             "groq_key"),
    "mistral": ("MISTRAL_API_BASE", "https://api.mistral.ai/v1", ("MISTRAL_API_KEY",), None),
    "openrouter": ("OPENROUTER_API_BASE", "https://openrouter.ai/api/v1",
                   ("OPENROUTER_API_KEY", "OR_API_KEY"), "openrouter_key"),
    "hosted_vllm": ("HOSTED_VLLM_API_BASE", None, (), None),
}


def _secret(name: str) -> str | None:
    from litellm.secret_managers.main import get_secret_str

    return get_secret_str(name)


def resolve_openai_compatible(litellm: Any, provider: str, config: Any, api_key: str | None,
                              api_base: str | None
                              ) -> tuple[str | None, str | None, dict[str, str]]:
    """``(api_key, api_base, headers)`` of an OpenAI-format request of ``provider`` (not
    Azure), given the alias's key and the base ``get_llm_provider`` resolved (or the
    alias's). ``headers`` are the ones ``litellm.main`` passes on (``litellm.headers``, a
    provider's attribution headers, OpenRouter's ``HTTP-Referer``/``X-Title``); the
    provider config's ``validate_environment`` adds the credential header later."""
    if provider in OPENAI_SDK_PROVIDERS:
        from litellm.llms.base_llm.chat.transformation import with_attribution_headers

        api_base = (api_base or litellm.api_base or _secret("OPENAI_BASE_URL")
                    or _secret("OPENAI_API_BASE") or "https://api.openai.com/v1")
        api_key = (api_key or litellm.api_key or litellm.openai_key
                   or _secret("OPENAI_API_KEY"))
        headers = with_attribution_headers(config.get_attribution_headers(),
                                           dict(litellm.headers or {})) or {}
        return api_key, api_base, dict(headers)
    defaults = _BRANCH_DEFAULTS.get(provider)
    headers = dict(litellm.headers or {})
    if defaults is not None:
        base_env, default_base, key_envs, key_attr = defaults
        api_base = api_base or litellm.api_base or _secret(base_env) or default_base
        if key_envs:
            api_key = (api_key or litellm.api_key
                       or (getattr(litellm, key_attr, None) if key_attr else None)
                       or next((v for v in map(_secret, key_envs) if v), None))
    if provider == "openrouter":
        headers = {"HTTP-Referer": os.environ.get("OR_SITE_URL") or "https://litellm.ai",
                   "X-Title": os.environ.get("OR_APP_NAME") or "liteLLM", **headers}
    return api_key, api_base, headers
