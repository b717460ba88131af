"""A hostile or broken upstream cannot freeze or bloat the relay, on either streaming path.

Each mode of tests/fakes/hostile.py (an endless SSE line, a huge line, a gzip bomb on the
stream, a gzip bomb as an error body, a 4 MB HTML error page, wrong-shaped JSON) runs through
the whole relay (real client -> relay -> loopback upstream) on the fast path and on LiteLLM's
path (``fast = false``: LiteLLM's real openai/ provider code and the OpenAI SDK), with a
normal stream on another connection at the same time. Each must end with exactly one
``finish`` (``failed``/``upstream_error``, the message naming what was wrong), the normal
stream must complete, and the memory the relay allocated meanwhile is measured
(``tracemalloc``'s peak), not taken from the relay's own counters.

The SSE standard's other forms (CR line ends, a CRLF split across reads, a byte-order mark,
events without data) must give the same answer as a plain stream on both paths.
"""

from __future__ import annotations

import contextlib
import tracemalloc

import pytest

from relay.app import load_models
from relay.upstream.providers import ModelRegistry
from relay.upstream.event_streamer import Timeouts
from tests.fakes.hostile import NORMAL_TEXT, SSE_QUIRKS, WRONG_SHAPES, HostileUpstream

from .helpers import Client, eventually, start_relay, text_of

PATHS = ("fast", "litellm")

#: mode -> the finish error message (exact, or its start when it ends with "...").
EXPECTED = {
    "endless_line": "the provider sent an event larger than the relay's limit "
                    "(max_event_bytes 1048576)",
    "huge_line": "the provider sent an event larger than the relay's limit "
                 "(max_event_bytes 1048576)",
    "gzip_bomb": "the provider's response inflated beyond the relay's limit "
                 "(max_decompression_ratio 200)",
    "gzip_error": "the provider failed (HTTP 500)",
    "html_error": "the provider failed (HTTP 502)",
}
#: What the relay may allocate above its baseline while one hostile stream runs (the caps
#: are 1 MiB per event and 8 KiB per error body; LiteLLM's path makes objects of its own).
MEMORY_BUDGET = 24 << 20
MALFORMED = "the provider's stream failed (cut off or malformed)"
#: Wrong shapes LiteLLM's own chunk handling reads on (it drops a content object, and
#: iterates a string ``tool_calls``): its answer on that path, never a relay bug.
LITELLM_TOLERATES = {"shape_content_object", "shape_tool_calls_string"}


def registry_for(up: HostileUpstream) -> ModelRegistry:
    models = {path: {"model": "openai/hostile", "api_base": up.openai_base,
                     "api_key_env": "HOSTILE_KEY", "fast": path == "fast"}
              for path in PATHS}
    return ModelRegistry(load_models({"models": models}, Timeouts(10.0, 10.0, 30.0)))


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", "sk-hostile-test")


@contextlib.asynccontextmanager
async def relay_and_upstream(**sizes: int):
    sizes.setdefault("html_error_bytes", 32 << 20)    # more than the sockets' buffers hold
    async with HostileUpstream(**sizes) as up:
        up.make_bombs()
        registry = registry_for(up)
        assert registry.resolve("fast").path.path == "fast"
        assert registry.resolve("litellm").path.path == "litellm"
        async with start_relay(registry=registry) as server:
            async with Client.connect(server.url) as hostile, \
                    Client.connect(server.url) as normal:
                # One plain stream per path first: the first LiteLLM stream of a process
                # builds clients, which is not what is measured.
                for path in PATHS:
                    await normal.start(f"warm-{path}", model=path, content="normal")
                    assert (await normal.collect(f"warm-{path}"))[-1]["status"] == "completed"
                yield up, hostile, normal


def finish_of(frames: list[dict]) -> dict:
    finishes = [f for f in frames if f["type"] == "finish"]
    assert len(finishes) == 1, frames
    assert frames[-1] is finishes[0]
    return finishes[0]


async def run_beside_normal(hostile: Client, normal: Client, path: str, mode: str):
    """The hostile stream and a normal stream at once; returns (hostile frames, normal
    frames, the peak of memory allocated meanwhile above the start)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await hostile.start("h", model=path, content=mode)
        await normal.start("n", model=path, content="normal")
        normal_frames = await normal.collect("n")
        frames = await hostile.collect("h")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return frames, normal_frames, peak


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", list(EXPECTED))
async def test_hostile_mode_fails_the_stream_only(path, mode):
    async with relay_and_upstream() as (up, hostile, normal):
        frames, normal_frames, peak = await run_beside_normal(hostile, normal, path, mode)
        finish = finish_of(frames)
        assert (finish["status"], finish["reason"]) == ("failed", "upstream_error"), finish
        assert finish["error"]["code"] == "upstream_error"
        assert finish["error"]["message"] == EXPECTED[mode], finish
        assert finish_of(normal_frames)["status"] == "completed"
        assert text_of(normal_frames) == "".join(NORMAL_TEXT)
        assert peak < MEMORY_BUDGET, f"{mode} on {path}: {peak / 2**20:.1f} MiB allocated"
        if mode == "html_error":
            # the page is not read to its end: the relay hung up after its cap
            assert up.disconnects == 1
        # and the relay goes on serving that very connection
        await hostile.start("after", model=path, content="normal")
        assert text_of(await hostile.collect("after")) == "".join(NORMAL_TEXT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", list(WRONG_SHAPES))
async def test_wrong_shaped_json_is_upstream_error(path, mode):
    """Never ``internal_error``: on the fast path the stream fails as LiteLLM's path fails it
    for the same event (same message); after it, the connection serves the next stream."""
    async with relay_and_upstream() as (up, hostile, normal):
        await hostile.start("h", model=path, content=mode)
        frames = await hostile.collect("h")
        finish = finish_of(frames)
        assert finish["reason"] != "internal_error", finish
        if path == "litellm" and mode in LITELLM_TOLERATES:
            return
        assert (finish["status"], finish["reason"]) == ("failed", "upstream_error"), finish
        assert finish["error"]["message"] == MALFORMED, finish
        assert text_of(frames) == NORMAL_TEXT[0]      # what came before the bad event
        await hostile.start("after", model=path, content="normal")
        assert text_of(await hostile.collect("after")) == "".join(NORMAL_TEXT)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", SSE_QUIRKS)
async def test_sse_standard_forms_read_like_plain_sse(path, mode):
    async with relay_and_upstream() as (up, hostile, normal):
        await hostile.start("h", model=path, content=mode)
        frames = await hostile.collect("h")
        finish = finish_of(frames)
        assert (finish["status"], finish["reason"]) == ("completed", "stop"), finish
        assert text_of(frames) == "".join(NORMAL_TEXT)
        assert finish["usage"] == {"prompt_tokens": 7, "completion_tokens": 4,
                                   "total_tokens": 11, "estimated": False}


@pytest.mark.parametrize("path", PATHS)
async def test_caps_come_from_the_settings(path, caplog):
    """``--max-event-bytes`` (here 64 KiB) is the cap both paths enforce, and the startup
    log says the LiteLLM path reads through the same caps."""
    caplog.set_level("INFO", logger="relay.runtime.server")
    async with HostileUpstream(huge_line_bytes=256 * 1024) as up:
        async with start_relay(registry=registry_for(up), max_event_bytes=64 * 1024) as server:
            assert any("upstream caps" in r.getMessage() and "SSE event 65536 B" in
                       r.getMessage() for r in caplog.records)
            async with Client.connect(server.url) as client:
                await client.start("h", model=path, content="huge_line")
                finish = finish_of(await client.collect("h"))
                assert finish["error"]["message"] == (
                    "the provider sent an event larger than the relay's limit "
                    "(max_event_bytes 65536)"), finish


async def test_bytes_after_done_are_not_read_to_their_end():
    """After ``[DONE]`` the fast path reads on only a little (connection reuse), then hangs
    up: a provider that floods after its end costs the relay nothing."""
    async with relay_and_upstream() as (up, hostile, normal):
        await hostile.start("h", model="fast", content="done_then_flood")
        frames = await hostile.collect("h")
        assert finish_of(frames)["status"] == "completed"
        assert text_of(frames) == "".join(NORMAL_TEXT)
        await eventually(lambda: up.disconnects == 1)   # noticed at its next write
