"""``relay.upstream.raw_tap``: what it reads from hostile provider chunks (never raises, keeps
nothing it cannot use), and that the read-through of an SDK stream closes that stream.
The tap's effect on the LiteLLM path is proven end to end by tests/relay/test_fast_path.py
(tool calls without index, refusals, Anthropic tool input in content_block_start)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

from relay.upstream.deltas import Delta, ToolCallPiece
from relay.upstream.raw_tap import (
    RawTap, WrongShapedContentParts, anthropic_tool_input_arguments,
)

HOSTILE = [
    None, 7, "data", [], {}, {"choices": "x"}, {"choices": [None]}, {"choices": [{"delta": 5}]},
    {"choices": [{"delta": {"refusal": 3, "tool_calls": "no"}}]},
    {"choices": [{"delta": {"tool_calls": [None, 4, {"index": "0"}]}}]},
    {"type": "content_block_start", "content_block": "tool_use"},
    {"type": "content_block_start", "content_block": {"type": "tool_use", "input": [1, 2]}},
    {"type": "content_block_delta", "delta": ["partial_json"]},
    {"type": "content_block_stop"},
    NS(choices=[NS(delta=NS(refusal=None, tool_calls=[NS()]))]),
]


@pytest.mark.parametrize("chunk", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_chunks_never_raise(chunk):
    tap = RawTap()
    tap.observe(chunk)
    for delta in tap.take_pending():
        assert type(delta) is Delta


def test_what_the_tap_keeps_from_openai_chunks():
    tap = RawTap()
    tap.observe({"choices": [{"delta": {"refusal": "No.", "tool_calls": [
        {"id": "a", "function": {}}, {"index": 3}]}}]})
    assert tap.take_pending() == [Delta(refusal="No.")]
    assert tap.tool_indexes == [None, 3]
    tap.observe(NS(choices=[NS(delta=NS(refusal="", tool_calls=None))]))
    assert tap.tool_indexes is None and tap.take_pending() == []


def test_content_parts_become_text_and_reasoning_in_the_chunk():
    """A content-part array (Mistral's) is replaced, in the chunk the wrapper then reads, by
    its text and its thinking as the reasoning: JSON chunks and SDK objects alike."""
    parts = [{"type": "thinking", "thinking": [{"type": "text", "text": "Hm"}]},
             {"type": "reference"}, {"type": "text", "text": "3"}]
    chunk = {"choices": [{"delta": {"content": list(parts)}}]}
    RawTap().observe(chunk)
    assert chunk["choices"][0]["delta"] == {"content": "3", "reasoning_content": "Hm",
                                            "reasoning": "Hm"}
    delta = NS(content=[{"type": "text", "text": "ok"}], reasoning_content=None,
               refusal=None, tool_calls=None)
    RawTap().observe(NS(choices=[NS(delta=delta)]))
    assert (delta.content, delta.reasoning_content) == ("ok", None)


def test_wrong_shaped_content_parts_are_the_failure_and_end_observing():
    tap = RawTap()
    bad = {"choices": [{"delta": {"content": [{"type": "text", "text": 5}]}}]}
    assert tap.observe(bad) is False
    assert isinstance(tap.failure, WrongShapedContentParts)
    assert bad["choices"][0]["delta"]["content"] == [{"type": "text", "text": 5}]
    tap.observe({"choices": [{"delta": {"refusal": "No."}}]})   # after the failure: ignored
    assert tap.take_pending() == []


def test_anthropic_input_whole_in_start_becomes_the_arguments():
    tap = RawTap()
    tap.observe({"type": "content_block_start",
                 "content_block": {"type": "tool_use", "id": "t", "input": {"a": 1}}})
    tap.observe({"type": "content_block_delta", "delta": {"partial_json": ""}})
    tap.observe({"type": "content_block_stop"})
    assert tap.take_pending() == [Delta(tool_calls=(ToolCallPiece(0, None, None, '{"a": 1}'),))]
    assert tap.replaced == {0}
    assert anthropic_tool_input_arguments([1]) == "{}"


async def test_the_read_through_closes_the_sdk_stream():
    class SDKStream:
        closed = False

        def __aiter__(self):
            async def gen():
                yield {"choices": [{"delta": {"refusal": "x"}}]}
            return gen()

        async def aclose(self):
            SDKStream.closed = True

    wrapper = NS(completion_stream=SDKStream())
    tap = RawTap.install(wrapper)
    assert [c async for c in wrapper.completion_stream] == [
        {"choices": [{"delta": {"refusal": "x"}}]}]
    assert tap.take_pending() == [Delta(refusal="x")]
    await wrapper.completion_stream.aclose()
    assert SDKStream.closed


def test_a_chunk_with_refusal_is_marked_so_the_wrapper_hands_it_on():
    tap = RawTap()
    delta = NS(refusal="No.", provider_specific_fields={"other": 1})
    chunk = NS(choices=[NS(delta=delta)])
    assert tap.observe(chunk) is True
    from relay.upstream.raw_tap import _hand_on

    _hand_on(chunk)
    assert delta.provider_specific_fields == {"other": 1, "refusal": "No."}
    assert tap.observe(NS(choices=[NS(delta=NS(refusal=None))])) is False
