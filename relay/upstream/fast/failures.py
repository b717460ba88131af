"""The exceptions a fast-path stream raises for what the provider said went wrong, built as
LiteLLM builds them, so ``relay.upstream.errors.classify_upstream_exception`` answers exactly
as on LiteLLM's path (code, message, ``retry_after``).

* An HTTP error (status, headers, body): the provider config's ``get_error_class``, then
  LiteLLM's provider exception mapping (``exception_type``);
* an ``{"error": ...}`` event inside an OpenAI-format stream read as the OpenAI SDK reads it:
  a broken stream (the SDK raises an ``APIError`` without a status), or an overloaded
  provider when the error's message says so;
* a chunk that the provider's own stream handler rejects (LiteLLM's line reader: an error
  inside a Groq/OpenRouter stream): that handler's ``chunk_parser`` runs on the chunk, and
  its exception goes through LiteLLM's mapping;
* an ``event: error`` inside an Anthropic stream: status 500 through the mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.upstream.fast.decoding import ProviderReportedError

__all__ = ["ProviderFailures"]


@dataclass(frozen=True, slots=True)
class ProviderFailures:
    """The exceptions of one provider (``provider``: LiteLLM's name, ``model``: the
    provider's model name, ``config``: LiteLLM's provider chat config)."""

    provider: str
    model: str
    config: Any

    def mapped(self, error: Exception) -> Exception:
        """The exception LiteLLM raises for ``error`` (its provider exception mapping)."""
        from litellm.litellm_core_utils.exception_mapping_utils import exception_type

        try:
            exception_type(model=self.model, original_exception=error,
                           custom_llm_provider=self.provider)
        except Exception as mapped:
            return mapped
        return error

    def http_error(self, status: int, headers: Mapping[str, str], body: bytes) -> Exception:
        """An HTTP error response (``body``: at most the caps' error-body bytes)."""
        message = body.decode("utf-8", errors="replace")
        return self.mapped(self.config.get_error_class(
            error_message=message, status_code=status, headers=headers))

    def openai_stream_error(self, error: Any) -> Exception:
        """An ``{"error": ...}`` event inside an OpenAI-format stream (the SDK's reading):
        "the provider's stream failed", or ``upstream_overloaded`` when the error's message
        (the SDK's exception text) says the provider is overloaded."""
        message = error.get("message") if type(error) is dict else None
        if type(message) is str and "overloaded" in message.lower():
            return ProviderReportedError("the provider reported inside the stream that it "
                                         "is overloaded")
        return ProviderReportedError("the provider reported an error inside the stream")

    def line_reader_chunk_error(self, chunk: Any) -> Exception:
        """A chunk the provider's LiteLLM stream handler rejects (LiteLLM's line reader)."""
        handler = self.config.get_model_response_iterator(
            streaming_response=iter(()), sync_stream=False)
        try:
            handler.chunk_parser(chunk=chunk)
        except Exception as error:
            return self.mapped(error)
        return ProviderReportedError("the provider sent a chunk the relay cannot read")

    def anthropic_stream_error(self, error: Any) -> Exception:
        """An ``event: error`` inside an Anthropic stream (LiteLLM: status 500)."""
        message = error.get("message") if isinstance(error, dict) else None
        return self.mapped(self.config.get_error_class(
            error_message=message or "error event", status_code=500, headers={}))
