"""Viewers across relays on a real Redis (PROTOCOL.md "Viewers", "Across relays"): a viewer on
relay B of a stream running on relay A gets every frame once and the one ``finish``; several
viewers on B read it each on their own; the owner's relay dying ends every viewer's stream
with ``error`` ``stream_lost``."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from relay.upstream.llm import demo_handler

from .helpers import Client, start_relay, text_of
from .test_multinode import (
    FULL_TEXT, MESSAGES, SHARED_REDIS, _spawn_relay, _stop, _until_tokens, prefix, two_relays,
)

__all__ = ["prefix"]   # the fixture, imported for these tests


async def _watch(c: Client, key: str, after_seq: int, id: str) -> dict:
    await c.send({"type": "resume", "stream_key": key, "after_seq": after_seq, "id": id})
    return await c.next_for(id)


def _once(frames: list[dict], after_seq: int) -> None:
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert all(s > after_seq for s in seqs)
    assert [f["type"] for f in frames].count("finish") == 1 and frames[-1]["type"] == "finish"


async def test_viewers_on_both_relays_each_get_every_frame_once_and_the_one_finish(prefix):
    async with two_relays(SHARED_REDIS, prefix, demo_tps=60) as (a, b):
        async with Client.connect(a.url) as owner, Client.connect(a.url) as local_viewer, \
                Client.connect(b.url) as b1, Client.connect(b.url) as b2:
            await owner.start("q1", messages=MESSAGES)
            started, before = await _until_tokens(owner, "q1", 2)
            key, mid = started["stream_key"], before[-1]["seq"]
            assert (await _watch(local_viewer, key, 0, "l"))["type"] == "resumed"
            assert (await _watch(b1, key, 0, "r1"))["type"] == "resumed"
            assert (await _watch(b2, key, mid, "r2"))["type"] == "resumed"
            rest, seen_l, seen_1, seen_2 = await asyncio.gather(
                owner.collect("q1"), local_viewer.collect("l"), b1.collect("r1"),
                b2.collect("r2"))
            for frames, after in ((before + rest, 0), (seen_l, 0), (seen_1, 0), (seen_2, mid)):
                _once(frames, after)
                assert frames[-1]["status"] == "completed"
            assert text_of(before + rest) == text_of(seen_l) == text_of(seen_1) == FULL_TEXT
            assert text_of(before) + text_of(seen_2) == FULL_TEXT
            finishes = {f[-1]["seq"] for f in (rest, seen_l, seen_1, seen_2)}
            assert len(finishes) == 1
            # Each remote viewer read Redis on its own; nothing was taken over anywhere.
            assert all(f["type"] != "error" for f in rest + seen_l + seen_1 + seen_2)


async def test_a_stream_outlives_its_grace_while_one_of_two_remote_viewers_still_watches(prefix):
    """The owner's connection on A is gone and A's grace (0.5 s) ends while the stream runs:
    A asks Redis whether a connection elsewhere follows it. B serves two viewers; one leaves
    early. B's one attached marker must outlive that one viewer, so A keeps the stream
    running for the other, which gets it all, completed."""
    handler = demo_handler()
    before_closed = handler.closed_early
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20, detach_grace=0.5) as (a, b):
        async with Client.connect(b.url) as stays:
            async with Client.connect(a.url) as owner:
                await owner.start("q1", messages=MESSAGES)
                started, _ = await _until_tokens(owner, "q1", 1)
                key = started["stream_key"]
                async with Client.connect(b.url) as leaves:
                    assert (await _watch(leaves, key, 0, "x"))["type"] == "resumed"
                    assert (await _watch(stays, key, 0, "y"))["type"] == "resumed"
                    assert (await leaves.next_for("x"))["type"] == "token"
            seen = await stays.collect("y")
            _once(seen, 0)
            assert seen[-1]["status"] == "completed" and text_of(seen) == FULL_TEXT
    assert handler.closed_early == before_closed


async def test_the_owner_relay_dying_ends_every_viewer_with_stream_lost(prefix):
    """kill -9 of relay A mid-stream: both viewers on B end with ``error`` ``stream_lost``
    naming their own ids (within ``redis_owner_ttl`` + 1 s, plus a margin for a loaded
    machine); the viewer that was on A lost its connection and its resume on B gets the same
    answer."""
    owner_ttl = 2.0
    loop = asyncio.get_running_loop()
    proc, url = await _spawn_relay(SHARED_REDIS, prefix, 30.0, "--redis-owner-ttl",
                                   str(owner_ttl), demo_tps=5)
    try:
        async with start_relay(redis_url=SHARED_REDIS, redis_prefix=prefix, detach_grace=10,
                               redis_owner_ttl=owner_ttl) as b:
            async with Client.connect(url) as owner, Client.connect(url) as on_a, \
                    Client.connect(b.url) as b1, Client.connect(b.url) as b2:
                await owner.start("q1", messages=MESSAGES)
                started, _ = await _until_tokens(owner, "q1", 1)
                key = started["stream_key"]
                assert (await _watch(on_a, key, 0, "a1"))["type"] == "resumed"
                assert (await _watch(b1, key, 0, "v1"))["type"] == "resumed"
                assert (await _watch(b2, key, 0, "v2"))["type"] == "resumed"
                for c, id in ((b1, "v1"), (b2, "v2")):
                    assert (await c.next_for(id))["type"] == "token"   # following live
                last_on_a = 0
                proc.kill()                       # SIGKILL: no drain, no finish
                killed_at = loop.time()
                await proc.wait()
                with pytest.raises(ConnectionClosed):
                    while True:
                        last_on_a = max(last_on_a, (await on_a.next_for("a1")).get("seq", 0))
                ends = []
                for c, id in ((b1, "v1"), (b2, "v2")):
                    async with asyncio.timeout(owner_ttl + 1 + 10):
                        frame = await c.next_for(id)
                        while frame["type"] == "token":
                            frame = await c.next_for(id)
                    ends.append(frame)
                lost_after = loop.time() - killed_at
                assert [(f["type"], f["code"], f["id"], f["ref"]) for f in ends] == [
                    ("error", "stream_lost", "v1", "resume"),
                    ("error", "stream_lost", "v2", "resume")]
                assert ends[0]["message"] == ends[1]["message"]
                assert lost_after < owner_ttl + 1 + 10, lost_after
            async with Client.connect(b.url) as again:
                answer = await _watch(again, key, last_on_a, "a1")
                while answer["type"] not in ("error", "finish"):
                    answer = await again.next_for("a1")
                assert (answer["type"], answer["code"]) == ("error", "stream_lost"), answer
    finally:
        await _stop(proc)
