"""The LiteLLM path does no work the relay does not use: no post-stream response assembly.

LiteLLM's stream wrapper rebuilds every finished stream's whole response
(``stream_chunk_builder``) for its logging, cost and cache machinery; the relay disables that
in its LiteLLM setup (``relay.upstream.llm._install_lean_streaming``). Proven by counting calls of the
real assembly function during a stream through LiteLLM's real openai/ and anthropic/ code,
not by timing."""

from __future__ import annotations

import asyncio

import pytest

from relay.upstream.llm import get_litellm
from tests.fakes.upstream import FakeUpstream, Usage, stream
from tests.relay.helpers import litellm_path_spec


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_litellm_path_does_not_assemble_the_response_after_a_stream(fmt, monkeypatch):
    from litellm.litellm_core_utils import streaming_chunk_builder_utils as builder_utils

    get_litellm()
    assembled = []
    real = builder_utils._assembled_stream_response

    def counting(*args, **kwargs):
        assembled.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(builder_utils, "_assembled_stream_response", counting)
    monkeypatch.setenv("FAKE_PROVIDER_KEY", "sk-test")
    async with FakeUpstream() as up:
        spec = litellm_path_spec(up, fmt)
        up.enqueue(stream(fmt, ["Hel", "lo"], usage=Usage(11, 7)))
        events = [e async for e in spec.streamer().events([{"role": "user", "content": "hi"}])]
        # LiteLLM's own post-stream tasks (success handler, cache) get their turn too.
        for _ in range(5):
            await asyncio.sleep(0)
    end = events[-1]
    assert (end.status, end.reason) == ("completed", "stop")
    assert (end.usage.prompt_tokens, end.usage.completion_tokens, end.usage.estimated) == (
        11, 7, False)
    assert assembled == [], "LiteLLM rebuilt the streamed response"


def test_other_litellm_use_in_the_process_still_assembles(monkeypatch):
    """Only relay streams skip the assembly: a direct LiteLLM user gets the real builder."""
    from litellm.litellm_core_utils import streaming_chunk_builder_utils as builder_utils

    litellm = get_litellm()
    assembled = []
    monkeypatch.setattr(builder_utils, "_assembled_stream_response",
                        lambda *a, **k: assembled.append(1))
    litellm.stream_chunk_builder(chunks=[])
    assert assembled == [1]
