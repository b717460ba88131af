"""Model aliases -> LiteLLM arguments. Clients name an alias; everything that decides
where and with which credentials the relay calls lives here, server-side.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.core.errors import BadRequest, UnknownModel
from relay.upstream.llm import DEMO_PROVIDER
from relay.upstream.event_streamer import CompletionFn, EventStreamer, Timeouts

if TYPE_CHECKING:
    from relay.upstream.fast import PathChoice

__all__ = ["DEMO_ALIAS", "ModelRegistry", "ModelSpec"]

DEMO_ALIAS = "demo"


@dataclass(frozen=True)
class ModelSpec:
    """One alias. ``api_key_env`` names the environment variable holding the key; the key
    itself is read when a stream starts and never stored in config, frames or logs.

    ``fast`` (default true) lets the alias use the fast path when its provider streams an
    OpenAI- or Anthropic-format SSE (``relay/upstream/fast/``); ``path`` says what was chosen.
    """

    alias: str
    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    default_params: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    retries_before_first_token: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    fast: bool = True
    #: Azure: the env var holding an Entra ID access token, sent as ``azure_ad_token`` (an
    #: ``Authorization: Bearer`` header) instead of a key; read at stream start like the key.
    azure_ad_token_env: str | None = None

    @functools.cached_property
    def path(self) -> PathChoice:
        """The streaming path of this alias (decided once; imports LiteLLM)."""
        from relay.upstream.fast import PathChoice, select_route

        if self.model.startswith(f"{DEMO_PROVIDER}/"):
            return PathChoice("litellm", "the embedded demo model is a LiteLLM custom provider")
        return select_route(self.model, self.api_base, fast=self.fast, extra=self.extra)

    def request_params(self, client_params: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with the client's params; enforces the ``max_tokens`` ceiling."""
        params = {**self.default_params, **{k: v for k, v in client_params.items()
                                            if v is not None}}
        limit = self.max_tokens
        if limit is not None:
            asked = params.get("max_tokens")
            if asked is None:
                params["max_tokens"] = limit
            elif asked > limit:
                raise BadRequest(
                    f"params.max_tokens {asked} exceeds the ceiling {limit} of model "
                    f"{self.alias!r}"
                )
        return params

    def streamer(self, completion: CompletionFn | None = None) -> EventStreamer:
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        completion_kwargs = self.extra
        if self.azure_ad_token_env:
            # The token, never a key: with both LiteLLM sends only the key.
            completion_kwargs = {**self.extra,
                                 "azure_ad_token": os.environ.get(self.azure_ad_token_env)}
        elif api_key is None and self.api_base is not None:
            # Local OpenAI-compatible servers (vLLM, llama.cpp, Ollama) need no key, but the
            # OpenAI SDK insists on one.
            api_key = "unused"
        return EventStreamer(
            self.model,
            api_key=api_key,
            base_url=self.api_base,
            completion=completion,
            timeouts=self.timeouts,
            completion_kwargs=completion_kwargs,
            retries_before_first_token=self.retries_before_first_token,
            # An injected completion (tests, scripted upstreams) is what the caller wants.
            fast_route=self.path.route if completion is None else None,
        )


class ModelRegistry:
    """The aliases a relay serves, in the order ``welcome.models`` lists them."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self._specs = {spec.alias: spec for spec in specs}

    @classmethod
    def demo_only(cls, timeouts: Timeouts | None = None) -> ModelRegistry:
        return cls([demo_spec(timeouts)])

    @property
    def aliases(self) -> list[str]:
        return list(self._specs)

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def resolve(self, alias: str) -> ModelSpec:
        spec = self._specs.get(alias)
        if spec is None:
            raise UnknownModel(f"unknown model {alias[:128]!r}; this relay serves: "
                               f"{', '.join(self._specs) or 'nothing'}")
        return spec


def demo_spec(timeouts: Timeouts | None = None) -> ModelSpec:
    return ModelSpec(DEMO_ALIAS, f"{DEMO_PROVIDER}/demo", timeouts=timeouts or Timeouts())
