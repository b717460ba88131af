"""Per-token work the relay no longer does (issue 11 item 4), asserted as work counted, never
as time: the streamer's deadlines are one lazy watchdog per stream, not a timer per chunk,
and they still fire on time after the deadline moved with every chunk; a usage estimate
is counted in a worker thread, not on the event loop."""

from __future__ import annotations

import asyncio

import pytest

from relay.upstream.event_streamer import EventStreamer, StreamEnd, Timeouts

from relay.streamer import TokenStreamer

from .test_streamer import MSGS, ScriptedResponse, chunk, scripted

CHUNKS = 300


class _PacedResponse(ScriptedResponse):
    """Each chunk after a real wait (a timer of its own), then silence."""

    def __init__(self, items, gap: float, hang_after=None):
        super().__init__(items, hang_after=hang_after)
        self.gap = gap

    async def __anext__(self):
        if self._i < len(self.items) and (self.hang_after is None or self._i < self.hang_after):
            await asyncio.sleep(self.gap)        # the provider's pace
        return await super().__anext__()


class _LateHandle:
    """A timer handle that says it fires ``late`` seconds after the time it was asked for,
    as uvloop's handles do on a loaded machine (it computes the delay from one reading of
    its clock and starts the timer at a later one, in whole milliseconds)."""

    def __init__(self, handle: asyncio.TimerHandle, late: float) -> None:
        self._handle = handle
        self._late = late

    def when(self) -> float:
        return self._handle.when() + self._late

    def cancel(self) -> None:
        self._handle.cancel()

    def cancelled(self) -> bool:
        return self._handle.cancelled()


@pytest.fixture(params=[0.0, 0.005], ids=["handles-on-time", "handles-5ms-late"])
async def timers_scheduled(request, monkeypatch):
    """Counts the timers the test's streamer (``counted["streamer"]``, set by the test)
    schedules on the running loop: ``call_at`` calls (asyncio.timeout and call_later use it)
    whose callback is bound to that streamer or to an ``asyncio.Timeout``. Timers of anything
    else sharing the loop (a worker thread's wake-up, the test framework) are not the
    streamer's work. The second run hands the streamer handles that say they fire 5 ms
    late, what a loaded machine does (43 timers for 300 chunks at load average 7-11 when the
    streamer compared deadlines with ``handle.when()``): the count must not depend on it.
    ``seen`` says what was counted, for the failure message."""
    loop = asyncio.get_running_loop()
    counted: dict = {"n": 0, "streamer": None, "seen": []}
    original = loop.call_at
    late = request.param

    def call_at(when, callback, *args, **kwargs):
        owner = getattr(callback, "__self__", None)
        streamer = counted["streamer"]
        handle = original(when, callback, *args, **kwargs)
        if (owner is streamer and streamer is not None) or isinstance(owner, asyncio.Timeout):
            counted["n"] += 1
            counted["seen"].append(f"{getattr(callback, '__qualname__', callback)} at "
                                   f"+{when - loop.time():.3f} s")
            if late:
                return _LateHandle(handle, late)
        return handle

    monkeypatch.setattr(loop, "call_at", call_at)
    return counted


async def test_a_stream_of_many_chunks_schedules_a_constant_number_of_timers(timers_scheduled):
    items = [chunk(f"t{i} ") for i in range(CHUNKS)] + [chunk(finish="stop")]
    streamer = TokenStreamer("openai/x", completion=scripted(ScriptedResponse(items)),
                             timeouts=Timeouts(first_token=60, idle=30, total=600))
    timers_scheduled["streamer"] = streamer
    events = [e async for e in streamer.events(MSGS)]
    assert isinstance(events[-1], StreamEnd) and events[-1].status == "completed"
    assert len(events) == CHUNKS + 1
    # Old code: one asyncio.timeout_at (a timer scheduled and cancelled) per chunk. Now:
    # the watchdog armed at the first-token deadline, then once at the earlier idle one.
    assert timers_scheduled["n"] <= 3, timers_scheduled["seen"][:20]


@pytest.mark.parametrize(("timeouts", "reason"), [
    (Timeouts(first_token=5, idle=0.15, total=30), "idle_timeout"),
    (Timeouts(first_token=5, idle=5, total=0.4), "total_timeout"),
])
async def test_deadlines_moved_by_every_chunk_still_fire(timeouts, reason):
    # Chunks every 20 ms keep the idle deadline moving (the watchdog re-arms lazily);
    # then the provider goes silent (idle) or the stream outlives its total budget.
    items = [chunk(f"t{i} ") for i in range(100)]
    hang_after = 10 if reason == "idle_timeout" else None
    resp = _PacedResponse(items, gap=0.02, hang_after=hang_after)
    streamer = TokenStreamer("openai/x", completion=scripted(resp), timeouts=timeouts)
    events = [e async for e in streamer.events(MSGS)]
    end = events[-1]
    assert (end.status, end.reason) == ("timeout", reason)
    assert resp.closed.is_set()
    if reason == "idle_timeout":
        assert len(events) == 11                 # every chunk before the silence, then end


async def test_usage_estimate_is_counted_off_the_event_loop(monkeypatch):
    import threading

    import relay.upstream.event_streamer as streamer_module

    threads = []
    original = streamer_module._estimate_text_tokens

    def recording(model, text):
        threads.append(threading.current_thread())
        return original(model, text)

    monkeypatch.setattr(streamer_module, "_estimate_text_tokens", recording)
    items = [chunk("no "), chunk("usage "), chunk("here", finish="stop")]   # and no usage
    streamer = TokenStreamer("openai/x", completion=scripted(ScriptedResponse(items)))
    end = [e async for e in streamer.events(MSGS)][-1]
    assert end.status == "completed" and end.usage.estimated is True
    assert threads and threading.main_thread() not in threads, threads


def test_usage_estimates_never_download_a_tokenizer(monkeypatch):
    """Counting tokens for a model LiteLLM maps to a Hugging Face tokenizer (a Llama name)
    must not reach for huggingface.co: offline, LiteLLM retried for ~23 s before the
    estimate, and so before the stream's finish. Any name resolution is recorded here."""
    import socket

    from relay.upstream.llm import get_litellm
    from relay.upstream.event_streamer import _estimate_text_tokens

    get_litellm()
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    assert _estimate_text_tokens("groq/llama-3.1-8b-instant", "hello there friend") > 0
    assert lookups == []
