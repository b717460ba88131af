"""Viewers: a ``resume`` of a stream that is attached elsewhere joins it as a viewer (PROTOCOL.md
"Viewers"). Real relay on a real socket, real websockets clients, the demo upstream.

Each viewer gets every frame after its ``after_seq`` exactly once, then the live ones, and
the one ``finish``; a slow viewer is closed 4008 without slowing the others; any viewer may
cancel; ``"takeover": true`` ends every other attachment; the per-stream cap refuses one
more viewer."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosed

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from .helpers import Client, start_relay, text_of
from .test_backpressure import BIG, _lagging_client, _long_words
from .test_resume import _taken_over_end

pytestmark = pytest.mark.both_loops

MESSAGES = [{"role": "user", "content": "watch this answer from several windows at once " * 3}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))


async def _started_and_tokens(c: Client, id: str, tokens: int) -> tuple[dict, list[dict]]:
    started = await c.next_for(id)
    assert started["type"] == "started", started
    seen: list[dict] = []
    while sum(f["type"] == "token" for f in seen) < tokens:
        seen.append(await c.next_for(id))
    return started, seen


async def _watch(c: Client, key: str, after_seq: int, id: str, **extra) -> dict:
    await c.send({"type": "resume", "stream_key": key, "after_seq": after_seq, "id": id,
                  **extra})
    return await c.next_for(id)


def _assert_once_in_order(frames: list[dict], after_seq: int) -> None:
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert all(s > after_seq for s in seqs)
    assert [f["type"] for f in frames].count("finish") == 1 and frames[-1]["type"] == "finish"


async def test_two_viewers_and_the_owner_each_get_every_frame_once_and_the_one_finish():
    async with start_relay(detach_grace=5, demo_tps=100) as server:
        async with Client.connect(server.url) as owner, Client.connect(server.url) as v1, \
                Client.connect(server.url) as v2:
            await owner.start("q1", messages=MESSAGES)
            started, before = await _started_and_tokens(owner, "q1", 2)
            key = started["stream_key"]
            # One viewer from the start, one from where the owner is now.
            assert (await _watch(v1, key, 0, "w1"))["type"] == "resumed"
            mid = before[-1]["seq"]
            assert (await _watch(v2, key, mid, "w2"))["type"] == "resumed"
            rest, seen1, seen2 = await asyncio.gather(
                owner.collect("q1"), v1.collect("w1"), v2.collect("w2"))
            _assert_once_in_order(before + rest, 0)
            _assert_once_in_order(seen1, 0)
            _assert_once_in_order(seen2, mid)
            assert text_of(before + rest) == text_of(seen1) == FULL_TEXT
            assert text_of(before) + text_of(seen2) == FULL_TEXT
            assert {f["id"] for f in seen1} == {"w1"} and {f["id"] for f in seen2} == {"w2"}
            assert rest[-1] == {**seen1[-1], "id": "q1"} and seen1[-1]["status"] == "completed"
            # Nobody was taken over: the owner's stream ended with its finish, not an error.
            assert all(f["type"] != "error" for f in rest + seen1 + seen2)


async def test_a_slow_viewer_is_closed_4008_and_never_slows_the_owner_or_another_viewer():
    content = _long_words(3000)                    # a ~3 MB answer
    expected = "".join(demo_reply_tokens([{"role": "user", "content": content}]))
    async with start_relay(detach_grace=30, slow_consumer_bytes=256 * 1024,
                           slow_consumer_grace=0.5, demo_tps=2000, **BIG) as server:
        async with Client.connect(server.url, max_size=None) as owner, \
                Client.connect(server.url, max_size=None) as fast, \
                _lagging_client(server.port) as slow:
            await owner.start("q1", messages=[{"role": "user", "content": content}])
            started = await owner.next_for("q1")
            key = started["stream_key"]
            await slow.send(json.dumps({"type": "resume", "stream_key": key, "after_seq": 0,
                                        "id": "slow"}))
            assert (await _watch(fast, key, 0, "fast"))["type"] == "resumed"
            rest, seen = await asyncio.gather(owner.collect("q1"), fast.collect("fast"))
            # Both read everything, completed: the slow viewer cost them nothing.
            assert rest[-1]["status"] == seen[-1]["status"] == "completed"
            assert text_of(rest) == text_of(seen) == expected
            # The slow one never read; it was closed 4008 (or dropped after the close
            # handshake timed out) on its own.
            with pytest.raises(ConnectionClosed):
                while True:
                    await slow.recv()
            assert slow.close_code in (4008, 1006)
            assert server.metrics.errors.labels("slow_consumer")._value.get() == 1


async def test_any_viewer_may_cancel_and_everyone_gets_the_cancelled_finish():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=5, demo_tps=20) as server:
        async with Client.connect(server.url) as owner, Client.connect(server.url) as viewer:
            await owner.start("q1", messages=MESSAGES)
            started, _ = await _started_and_tokens(owner, "q1", 1)
            assert (await _watch(viewer, started["stream_key"], 0, "w"))["type"] == "resumed"
            await viewer.send({"type": "cancel", "id": "w"})
            ends = [(await owner.collect("q1"))[-1], (await viewer.collect("w"))[-1]]
            assert [(f["type"], f["status"], f["reason"]) for f in ends] == \
                [("finish", "cancelled", "client_cancel")] * 2
            assert ends[0]["seq"] == ends[1]["seq"]
        await handler.wait_closed_early(before + 1)


async def test_a_takeover_ends_the_owner_and_every_viewer_and_gets_the_rest_alone():
    async with start_relay(detach_grace=5, demo_tps=100) as server:
        async with Client.connect(server.url) as owner, Client.connect(server.url) as viewer, \
                Client.connect(server.url) as taker:
            await owner.start("q1", messages=MESSAGES)
            started, before = await _started_and_tokens(owner, "q1", 2)
            key, last = started["stream_key"], before[-1]["seq"]
            assert (await _watch(viewer, key, last, "w"))["type"] == "resumed"
            assert (await _watch(taker, key, last, "t", takeover=True))["type"] == "resumed"
            await _taken_over_end(owner, "q1", last)
            await _taken_over_end(viewer, "w", last)
            taken = await taker.collect("t")
            assert text_of(before) + text_of(taken) == FULL_TEXT
            assert taken[-1]["status"] == "completed"


async def test_a_stream_keeps_running_past_the_grace_while_a_viewer_watches_its_owner_gone():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=0.2, demo_tps=40) as server:
        async with Client.connect(server.url) as viewer:
            async with Client.connect(server.url) as owner:
                await owner.start("q1", messages=MESSAGES)
                started, _ = await _started_and_tokens(owner, "q1", 1)
                assert (await _watch(viewer, started["stream_key"], 0, "w"))["type"] == "resumed"
            # The owner's connection closed; the stream lasts well beyond the 0.2 s grace.
            seen = await viewer.collect("w")
            assert seen[-1]["status"] == "completed" and text_of(seen) == FULL_TEXT
    assert handler.closed_early == before


async def test_one_viewer_too_many_is_refused_too_many_streams_and_disturbs_nobody():
    async with start_relay(detach_grace=5, demo_tps=50, max_viewers_per_stream=2) as server:
        async with Client.connect(server.url) as owner, Client.connect(server.url) as v:
            await owner.start("q1", messages=MESSAGES)
            started, _ = await _started_and_tokens(owner, "q1", 1)
            key = started["stream_key"]
            assert (await _watch(v, key, 0, "a"))["type"] == "resumed"
            assert (await _watch(v, key, 0, "b"))["type"] == "resumed"
            refused = await _watch(v, key, 0, "c")
            assert (refused["type"], refused["code"], refused["ref"], refused["id"]) == (
                "error", "too_many_streams", "resume", "c")
            assert "2 viewers per stream" in refused["message"]
            async with Client.connect(server.url) as v2:
                assert (await _watch(v2, key, 0, "x"))["code"] == "too_many_streams"
                # A takeover is never a viewer: the cap does not refuse it.
                assert (await _watch(v2, key, 0, "t", takeover=True))["type"] == "resumed"
                end = await v2.collect("t")
                assert end[-1]["status"] == "completed" and text_of(end) == FULL_TEXT
            for id in ("a", "b"):
                assert (await v.collect(id))[-1]["code"] == "stream_taken_over"
            assert (await owner.collect("q1"))[-1]["code"] == "stream_taken_over"


# ---------------------------------------------------------------------- the Python client


async def test_the_python_client_watches_a_stream_started_by_another_client():
    from relay.client import ConnectionLost, RelayClient

    async with start_relay(detach_grace=5, demo_tps=100) as server, \
            RelayClient(server.url) as starter, RelayClient(server.url) as watcher:
        own = starter.stream("demo", MESSAGES)
        iterator = aiter(own)
        first = await anext(iterator)                 # started: the stream_key is known
        assert first.type == "started" and own.stream_key is not None
        watched = watcher.watch(own.stream_key)

        async def drain(it):
            async for _ in it:
                pass

        await asyncio.gather(drain(iterator), drain(watched))
        assert own.finish.status == watched.finish.status == "completed"
        assert own.text == watched.text == FULL_TEXT
        assert own.finish.seq == watched.finish.seq
        # An unknown key: the watch ends with the relay's refusal.
        gone = watcher.watch("no-such-stream-key-" + "x" * 20)
        with pytest.raises(ConnectionLost) as info:
            await drain(gone)
        assert info.value.code == "unknown_stream"
