"""The stream logs' budgets bound real memory: what a log is charged (and what
``--max-stream-log-bytes`` / ``--max-log-bytes`` limit) is within 2x of what the process
really holds for it, measured with tracemalloc (memory, unlike time, is stable enough to
assert). Before frames were stored compactly a token frame charged ~58 B held ~4.4 KiB."""

from __future__ import annotations

import contextlib
import gc
import os
import time
import tracemalloc

from pathlib import Path

import orjson

import llm_relay_protocol
import relay
from llm_relay_protocol import frames
from relay.core.streamlog import FrameLog, coalesce

from .helpers import Client, eventually, start_relay


@contextlib.contextmanager
def _traced():
    """tracemalloc on for the block (restored after); yields the baseline traced size."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    gc.collect()
    tracemalloc.reset_peak()
    try:
        yield tracemalloc.get_traced_memory()[0]
    finally:
        if not was_tracing:
            tracemalloc.stop()


def _held_since(baseline: int) -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] - baseline


def _held_by_relay_code() -> int:
    """Bytes allocated since tracing started, still alive, by code of the relay's own
    packages (relay/, clients/python/llm_relay_protocol/). LiteLLM keeps a finished stream's chunks a little while
    for its success callbacks; that is not the log and would make the figure unsteady."""
    gc.collect()
    roots = [str(Path(relay.__file__).parent), str(Path(llm_relay_protocol.__file__).parent)]
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, os.path.join(root, "*")) for root in roots])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_100k_token_frames_cost_within_twice_what_they_are_charged():
    log = FrameLog(max_bytes=1 << 40, keep=True)
    with _traced() as baseline:
        for seq in range(1, 100_001):
            log.append(frames.token("stream-1", seq, " tok"), time.perf_counter())
        held = _held_since(baseline)
    assert len(log) == 100_000
    assert held <= 2 * log.bytes, (held, log.bytes)
    # Also within 2x of the frames' encoded length alone (what a client is sent).
    assert held <= 2 * log.end_offset, (held, log.end_offset)
    # Nothing was lost by storing compactly.
    entries = log.after(99_990, 100)
    assert [e.seq for e in entries] == list(range(99_991, 100_001))
    assert entries[0].frame == frames.token("stream-1", 99_991, " tok")
    assert entries[-1].end == log.end_offset == log.offset_at(100_000)


def test_a_log_capped_at_its_budget_holds_at_most_about_twice_it():
    budget = 256 * 1024                  # ~3,200 token frames; 40,000 go through it
    log = FrameLog(max_bytes=budget, keep=True)
    with _traced() as baseline:
        for seq in range(1, 40_001):
            log.append(frames.token("stream-1", seq, " tok"), time.perf_counter())
        held = _held_since(baseline)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    assert log.bytes <= budget
    assert log.trimmed_through > 0 and log.trimmed_through + len(log) == 40_000
    assert held <= 2 * budget, (held, budget)
    # Even while the buffer is moved to a larger allocation (old and new both live).
    assert peak <= 2.5 * budget, (peak, budget)
    # The frames kept are the newest, intact, and merge as before.
    out = [orjson.loads(b) for b in coalesce(log.after(log.trimmed_through, 1 << 20),
                                             "stream-1")]
    assert "".join(f["text"] for f in out) == " tok" * len(log)
    assert out[-1]["seq"] == 40_000


def test_trimming_dropping_and_reading_back_keep_offsets_and_seqs_right():
    log = FrameLog(max_bytes=1 << 30, keep=False)
    for seq in range(1, 3001):
        log.append(frames.token("a", seq, "x" * (seq % 7)), 1.0)
    ends = {e.seq: e.end for e in log.after(0, 5000)}
    assert log.offset_at(0) == 0 and log.offset_at(1500) == ends[1500]
    freed = log.trim_through(2000)
    assert freed > 0 and len(log) == 1000 and log.trimmed_through == 2000
    assert log.offset_at(2500) == ends[2500] and log.offset_at(10) == ends[2000]
    assert [e.seq for e in log.after(2998)] == [2999, 3000]
    assert [e.received for e in log.after(2998)] == [1.0, 1.0]
    log.append(frames.finish("a", 3001, "completed", "stop", frames.usage(1, 3000, False)))
    assert log.finished and log.after(3000)[0].is_finish
    held = log.bytes
    assert log.clear() == held and log.bytes == 0 and len(log) == 0
    assert log.after(0) == [] and log.offset_at(5) == log.end_offset


async def test_detached_streams_real_memory_stays_within_twice_the_log_budget():
    """A real relay: streams nobody reads keep their logs within ``max_log_bytes``
    (oldest detached ones evicted), and the process really holds no more than ~2x that."""
    budget = 64 * 1024
    content = " ".join(f"w{i}" for i in range(400))           # ~430 tokens per stream
    async with start_relay(detach_grace=60, demo_tps=0, max_log_bytes=budget) as server:
        async with Client.connect(server.url) as client:      # warm up LiteLLM's lazy state
            await client.start("warm", content="warm up " * 50)
            await client.collect("warm")
        with _traced():
            for k in range(3):
                async with Client.connect(server.url) as client:
                    await client.start(f"s{k}", content=content)
                    assert (await client.next_for(f"s{k}"))["type"] == "started"
            await eventually(lambda: not any(s.running for s in server.hub.streams()), 60)
            held = _held_by_relay_code()
        assert server.hub.peak_log_bytes > budget // 2     # the logs did fill the budget
        assert server.hub.log_bytes <= budget
        assert held <= 2 * budget, (held, budget)
