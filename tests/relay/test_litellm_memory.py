"""A running stream on the LiteLLM path holds memory independent of its length.

LiteLLM's stream wrapper keeps every chunk object it builds (``CustomStreamWrapper.chunks``,
~5.8 KB per token here), and over the openai SDK's stream it leaves one suspended generator
per chunk for a later task to close (~2 KB per token while a fast upstream keeps the loop
busy). Neither is counted by any budget: 32 long streams once added 570 MiB. The relay keeps
a bounded window of chunks instead (``ProviderChunkWindow``) and iterates the SDK's stream
once. Measured here with tracemalloc while a long stream is still running, through LiteLLM's
real openai/ and anthropic/ code against the loopback fake providers; what remains per token
is the stream's text and the relay's own event objects (~40-70 B)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from relay.upstream.llm import get_litellm
from tests.fakes.upstream import FakeUpstream, Usage, stream
from tests.relay.helpers import litellm_path_spec

TOKENS = 2000
#: Bytes per token a running stream may add. Before the fix: ~5,800 (openai, fast upstream).
MAX_BYTES_PER_TOKEN = 300


async def _stream_measuring_growth(fmt: str, usage: Usage | None, monkeypatch):
    """Stream ``TOKENS`` text chunks through the LiteLLM path; returns (bytes per token
    the process kept between a quarter and the end of the stream, the final event)."""
    get_litellm()
    monkeypatch.setenv("FAKE_PROVIDER_KEY", "sk-test")
    async with FakeUpstream() as up:
        spec = litellm_path_spec(up, fmt)
        up.enqueue(stream(fmt, [f"word{i} " for i in range(TOKENS)], usage=usage))
        first, last = TOKENS // 4, TOKENS - 5
        was_tracing = tracemalloc.is_tracing()
        if not was_tracing:
            tracemalloc.start()
        try:
            texts = 0
            events = []
            async for event in spec.streamer().events([{"role": "user", "content": "hi"}]):
                events.append(type(event).__name__)
                if type(event).__name__ != "TextDelta":
                    end = event
                    continue
                texts += 1
                if texts == first:
                    gc.collect()
                    baseline = tracemalloc.get_traced_memory()[0]
                elif texts == last:  # the provider has not finished: the stream is running
                    gc.collect()
                    held = tracemalloc.get_traced_memory()[0] - baseline
        finally:
            if not was_tracing:
                tracemalloc.stop()
    assert texts == TOKENS, events[-3:]
    return held / (last - first), end


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_a_running_litellm_stream_keeps_no_per_token_objects(fmt, monkeypatch):
    per_token, end = await _stream_measuring_growth(fmt, Usage(11, TOKENS), monkeypatch)
    assert per_token < MAX_BYTES_PER_TOKEN, f"{per_token:.0f} B per token on the LiteLLM path"
    # The provider's own usage is still found, though its chunk was not kept with the rest.
    assert (end.status, end.usage.prompt_tokens, end.usage.completion_tokens,
            end.usage.estimated) == ("completed", 11, TOKENS, False)


async def test_without_provider_usage_the_estimate_is_still_reported(monkeypatch):
    per_token, end = await _stream_measuring_growth("openai", None, monkeypatch)
    assert per_token < MAX_BYTES_PER_TOKEN, f"{per_token:.0f} B per token on the LiteLLM path"
    assert end.status == "completed" and end.usage.estimated
    assert end.usage.completion_tokens >= TOKENS
