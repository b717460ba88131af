"""Relays as one group through a real Redis: resume and cancel across relays, takeover,
Redis failing mid-stream, and a rolling restart of one of two relay processes (1012)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import signal
import subprocess
import sys
import uuid

import pytest
from websockets.exceptions import ConnectionClosed

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from ..redis_server import RedisServerProcess, redis_ping
from .helpers import Client, eventually, start_relay, text_of
from .test_resume import _taken_over_end
from .test_limits import ROOT, _env

SHARED_REDIS = "redis://127.0.0.1:6379/0"
PROMPT = "carry this answer from one relay to the other without losing any word " * 2
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))


@pytest.fixture
def prefix():
    assert redis_ping("127.0.0.1", 6379), "these tests need Redis on 127.0.0.1:6379 (.ci/run)"
    return f"test:{uuid.uuid4().hex}:"


@contextlib.asynccontextmanager
async def two_relays(url: str, prefix: str, **settings):
    settings.setdefault("detach_grace", 5)
    async with start_relay(redis_url=url, redis_prefix=prefix, **settings) as a, \
            start_relay(redis_url=url, redis_prefix=prefix, **settings) as b:
        yield a, b


async def _until_tokens(c: Client, id: str, n: int) -> tuple[dict, list[dict]]:
    started = await c.next_for(id)
    assert started["type"] == "started", started
    seen: list[dict] = []
    while sum(f["type"] == "token" for f in seen) < n:
        seen.append(await c.next_for(id))
    return started, seen


async def _started_then_dropped(url: str, tokens: int) -> tuple[dict, list[dict]]:
    """Start ``q1`` on the relay at ``url``, read ``tokens`` tokens, then lose the connection
    without a close (the stream stays resumable): its ``started`` and the frames read."""
    async with Client.connect(url) as c:
        await c.start("q1", messages=MESSAGES)
        started, before = await _until_tokens(c, "q1", tokens)
        c.ws.transport.abort()
    return started, before


def _assert_whole(before: list[dict], after: list[dict]) -> None:
    seqs = [f["seq"] for f in before + after]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
    assert [f["type"] for f in before + after].count("finish") == 1
    assert after[-1]["type"] == "finish" and after[-1]["status"] == "completed"
    assert text_of(before + after) == FULL_TEXT


async def test_a_stream_started_on_one_relay_resumes_on_the_other(prefix):
    async with two_relays(SHARED_REDIS, prefix, demo_tps=100) as (a, b):
        started, before = await _started_then_dropped(a.url, 3)
        async with Client.connect(b.url) as cb:
            last = before[-1]["seq"]
            await cb.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": last})
            assert (await cb.next_for("q1")) == {
                "type": "resumed", "id": "q1", "stream_key": started["stream_key"],
                "after_seq": last}
            after = await cb.collect("q1")
        _assert_whole(before, after)
        # The upstream call ran on relay A the whole time; B only followed it.
        assert len(b.hub.tasks()) == 0


async def test_following_a_stream_from_redis_charges_its_frames_and_gives_them_back(prefix):
    """The relay that follows a stream from Redis counts the frames it holds for it in its
    log budget and gives exactly those back: the budget never goes negative and returns to
    zero (issue 12: the follower's frames were not charged but were subtracted once sent,
    so ``log_bytes`` went below zero on every relay that followed a stream)."""
    async with two_relays(SHARED_REDIS, prefix, demo_tps=100) as (a, b):
        started, before = await _started_then_dropped(a.url, 3)
        async with Client.connect(b.url) as cb:
            await cb.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": before[-1]["seq"]})
            assert (await cb.next_for("q1"))["type"] == "resumed"
            after: list[dict] = []
            while not after or after[-1]["type"] != "finish":
                after.append(await cb.next_for("q1"))
                assert b.hub.log_bytes >= 0, b.hub.log_bytes
        _assert_whole(before, after)
        assert b.hub.peak_log_bytes > 0        # the followed frames were charged on B
        await eventually(lambda: len(b.hub) == 0)
        assert b.hub.log_bytes == 0


async def test_resume_of_a_finished_stream_on_another_relay_replays_it(prefix):
    async with two_relays(SHARED_REDIS, prefix) as (a, b):
        async with Client.connect(a.url) as ca:
            await ca.start("q1", messages=MESSAGES)
            frames = await ca.collect("q1")
        async with Client.connect(b.url) as cb:
            await cb.send({"type": "resume", "stream_key": frames[0]["stream_key"],
                           "after_seq": 0, "id": "r"})
            assert (await cb.next_for("r"))["type"] == "resumed"
            replay = await cb.collect("r")
        assert text_of(replay) == FULL_TEXT and replay[-1]["seq"] == frames[-1]["seq"]


async def test_a_cancel_sent_to_one_relay_stops_the_upstream_running_in_the_other(prefix):
    handler = demo_handler()
    before = handler.closed_early
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20) as (a, b):
        async with Client.connect(a.url) as ca:
            await ca.start("q1")
            started, _ = await _until_tokens(ca, "q1", 1)
            ca.ws.transport.abort()
        async with Client.connect(b.url) as cb:
            await cb.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": 0})
            assert (await cb.next_for("q1"))["type"] == "resumed"
            await cb.send({"type": "cancel", "id": "q1"})
            finish = (await cb.collect("q1"))[-1]
            assert (finish["status"], finish["reason"]) == ("cancelled", "client_cancel")
        await handler.wait_closed_early(before + 1)
        assert a.hub.get(started["stream_key"]).source.cancelled


async def test_malformed_relay_messages_are_logged_and_dropped_and_the_listener_goes_on(
        prefix, caplog):
    """Control messages the models refuse (llm_relay_protocol.RelayMessage) change nothing: a takeover
    without ``node`` does not detach the stream's attachment (it used to: ``None`` is not
    this relay's node), and a valid cancel that follows still stops the upstream."""
    from redis.asyncio import Redis

    caplog.set_level(logging.WARNING, logger="relay.cluster.replication")
    handler = demo_handler()
    before = handler.closed_early
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20) as (a, b):
        async with Client.connect(a.url) as ca:
            await ca.start("q1")
            started, _ = await _until_tokens(ca, "q1", 1)
            key = started["stream_key"]
            raw = Redis.from_url(SHARED_REDIS)
            try:
                for bad in (b'{"op": "takeover", "key": "%s"}' % key.encode(),
                            b'{"op": "explode", "key": "%s"}' % key.encode(),
                            b'{"op": "cancel"}', b'{"op": "cancel", "key": 5}'):
                    await raw.publish(f"{prefix}control", bad)
            finally:
                await raw.aclose()
            await eventually(lambda: sum("ignoring a relay message" in r.getMessage()
                                         for r in caplog.records) >= 8)   # 4 on each relay
            assert a.hub.get(key).attachment is not None      # not taken over
            ca.ws.transport.abort()
        async with Client.connect(b.url) as cb:
            await cb.send({"type": "resume", "stream_key": key, "after_seq": 0})
            assert (await cb.next_for("q1"))["type"] == "resumed"
            await cb.send({"type": "cancel", "id": "q1"})
            finish = (await cb.collect("q1"))[-1]
            assert (finish["status"], finish["reason"]) == ("cancelled", "client_cancel")
        await handler.wait_closed_early(before + 1)
    refused = [r.getMessage() for r in caplog.records if "ignoring a relay message" in
               r.getMessage()]
    assert any("field 'node'" in m for m in refused)
    assert any("unknown relay message op 'explode'" in m for m in refused)
    assert any("field 'key'" in m for m in refused)


async def test_unknown_and_foreign_keys_are_unknown_stream_on_every_relay(prefix):
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20,
                          trusted_proxies=["127.0.0.1"]) as (a, b):
        async with Client.connect(a.url) as ca, \
                Client.connect(b.url, additional_headers={"X-Forwarded-For": "10.1.1.1"}) as m:
            await ca.start("q1")
            key = (await ca.next_for("q1"))["stream_key"]
            for stream_key in (key, "nope-" + "x" * 30):
                await m.send({"type": "resume", "stream_key": stream_key, "after_seq": 0,
                              "id": "x"})
                assert (await m.next_for("x"))["code"] == "unknown_stream"
            await ca.send({"type": "cancel", "id": "q1"})
            assert (await ca.collect("q1"))[-1]["status"] == "cancelled"


async def test_after_seq_beyond_a_finished_stream_is_bad_request_on_the_other_relay(prefix):
    """The same answer as on the owner (test_resume.py::
    test_after_seq_beyond_the_stream_is_bad_request): a finished stream's log in Redis is
    complete, so relay B refuses at once, with no ``resumed`` (issue 12: B answered
    ``resumed`` and the stream then hung until its record expired)."""
    async with two_relays(SHARED_REDIS, prefix) as (a, b):
        async with Client.connect(a.url) as ca:
            await ca.start("q1", messages=MESSAGES)
            frames = await ca.collect("q1")
        last = frames[-1]["seq"]
        # Replication is asynchronous: the client can see its finish before relay A has
        # marked the stream finished in Redis, and until then B takes it for a running one
        # (the next test covers that case). Wait for the record to say finished.
        store = b.replicator.store
        async with asyncio.timeout(10):
            while (meta := await store.meta(frames[0]["stream_key"])) is None \
                    or meta.state != "finished":
                await asyncio.sleep(0.01)
        async with Client.connect(b.url) as cb:
            await cb.send({"type": "resume", "stream_key": frames[0]["stream_key"],
                           "after_seq": last + 1, "id": "x"})
            assert (await cb.next_for("x")) == {
                "type": "error", "code": "bad_request", "ref": "resume", "id": "x",
                "message": f"after_seq {last + 1} is beyond the stream's last seq {last}"}
            # The stream itself is untouched: resuming at its very end is still fine (the
            # client has everything; nothing follows ``resumed``, and B stops following).
            await cb.send({"type": "resume", "stream_key": frames[0]["stream_key"],
                           "after_seq": last, "id": "y"})
            assert (await cb.next_for("y"))["type"] == "resumed"
            await eventually(lambda: not any(s.running for s in b.hub.streams()))
            await cb.send({"type": "ping", "data": "after"})
            assert (await cb.recv()) == {"type": "pong", "data": "after"}


async def test_after_seq_beyond_a_running_stream_ends_in_bad_request_on_the_other_relay(prefix):
    """Relay B cannot tell at resume time how far a stream still running on relay A has got
    (the Redis copy may lag what A's client was sent), so it answers ``resumed``; when the
    stream finishes short of ``after_seq`` the attachment ends with ``error`` ``bad_request``
    naming the stream's last seq, never silence (issue 12: it waited until the record
    expired and then said ``stream_lost``)."""
    async with two_relays(SHARED_REDIS, prefix, demo_tps=50) as (a, b):
        async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
            await ca.start("q1", messages=MESSAGES)
            started = await ca.next_for("q1")
            await cb.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": 10_000, "id": "x"})
            assert (await cb.next_for("x"))["type"] == "resumed"
            end = await cb.next_for("x")
            assert end["type"] == "error" and end["code"] == "bad_request", end
            assert end["ref"] == "resume" and end["id"] == "x"
            assert end["message"].startswith("after_seq 10000 is beyond the stream's last seq")


async def test_a_takeover_on_another_relay_takes_the_stream_over(prefix):
    async with two_relays(SHARED_REDIS, prefix, demo_tps=60) as (a, b):
        async with Client.connect(a.url) as old, Client.connect(b.url) as new:
            await old.start("q1", messages=MESSAGES)
            started, before = await _until_tokens(old, "q1", 2)
            last = before[-1]["seq"]
            await new.send({"type": "resume", "stream_key": started["stream_key"],
                            "after_seq": last, "takeover": True})
            assert (await new.next_for("q1"))["type"] == "resumed"
            after = await new.collect("q1")
            _assert_whole(before, after)
            # Relay A ended the old attachment when B announced the takeover, with the same
            # answer as a takeover on one relay: error stream_taken_over naming its id.
            await _taken_over_end(old, "q1", last)


async def test_a_takeover_on_the_owner_takes_over_a_stream_followed_on_the_other_relay(
        prefix):
    # The reverse direction: the stream runs on A, a connection on B follows it from Redis,
    # then a connection on A takes it over locally; B's follower gets stream_taken_over.
    # (20 tokens/s: the stream must still run when the second resume arrives.)
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20) as (a, b):
        async with Client.connect(a.url) as starter:
            await starter.start("q1", messages=MESSAGES)
            started, before = await _until_tokens(starter, "q1", 1)
        key = started["stream_key"]
        async with Client.connect(b.url) as follower, Client.connect(a.url) as owner:
            last = before[-1]["seq"]
            await follower.send({"type": "resume", "stream_key": key, "after_seq": last,
                                 "id": "f1"})
            assert (await follower.next_for("f1"))["type"] == "resumed"
            token = await follower.next_for("f1")
            assert token["type"] == "token"
            await owner.send({"type": "resume", "stream_key": key,
                              "after_seq": token["seq"], "id": "o1", "takeover": True})
            assert (await owner.next_for("o1"))["type"] == "resumed"
            after = await owner.collect("o1")
            assert after[-1]["type"] == "finish" and after[-1]["status"] == "completed"
            await _taken_over_end(follower, "f1", token["seq"])


async def test_a_second_follower_on_the_same_relay_taking_over_ends_the_first(prefix):
    # Both followers are on B, the stream runs on A: the second takes over, the first one's
    # remote attachment ends with stream_taken_over; a resume of it under an id already
    # following it here is duplicate_id, not a takeover.
    async with two_relays(SHARED_REDIS, prefix, demo_tps=20) as (a, b):
        async with Client.connect(a.url) as starter:
            await starter.start("q1", messages=MESSAGES)
            started, before = await _until_tokens(starter, "q1", 1)
        key, last = started["stream_key"], before[-1]["seq"]
        async with Client.connect(b.url) as first, Client.connect(b.url) as second:
            await first.send({"type": "resume", "stream_key": key, "after_seq": last,
                              "id": "f1"})
            assert (await first.next_for("f1"))["type"] == "resumed"
            token = await first.next_for("f1")
            assert token["type"] == "token"
            await first.send({"type": "resume", "stream_key": key, "after_seq": last,
                              "id": "f1"})
            assert (await first.next_for("f1"))["code"] == "duplicate_id"
            await second.send({"type": "resume", "stream_key": key, "after_seq": token["seq"],
                               "id": "f2", "takeover": True})
            assert (await second.next_for("f2"))["type"] == "resumed"
            after = await second.collect("f2")
            assert after[-1]["type"] == "finish" and after[-1]["status"] == "completed"
            await _taken_over_end(first, "f1", token["seq"])


async def test_redis_failing_mid_stream_local_streams_finish_and_resumes_get_a_clear_error(
        caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    redis = RedisServerProcess()
    redis.start()
    try:
        async with two_relays(redis.url, "t:", demo_tps=50, detach_grace=5) as (a, b):
            async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
                await ca.start("local", messages=MESSAGES)
                started, before = await _until_tokens(ca, "local", 2)
                # B follows a second stream of A's from Redis when Redis goes away.
                await ca.start("other", messages=MESSAGES)
                other = await ca.next_for("other")
                await eventually(lambda: a.replicator.is_mirrored(other["stream_key"]))
                await cb.send({"type": "resume", "stream_key": other["stream_key"],
                               "after_seq": 0, "id": "other"})
                assert (await cb.next_for("other"))["type"] == "resumed"
                redis.stop()
                # The stream on relay A goes on for its own client.
                after = await ca.collect("local")
                _assert_whole(before, after)
                # B's follower cannot go on: a clear error with the stream's id.
                frame = await cb.next_for("other")
                while frame["type"] != "error":
                    frame = await cb.next_for("other")
                assert (frame["code"], frame["ref"]) == ("store_unavailable", "resume")
                # A resume that needs Redis gets the same clear error...
                await cb.send({"type": "resume", "stream_key": started["stream_key"],
                               "after_seq": 0, "id": "again"})
                assert (await cb.next_for("again"))["code"] == "store_unavailable"
                # ...and both relays keep serving.
                await cb.start("fresh", content="still here", params={"max_tokens": 3})
                assert (await cb.collect("fresh"))[-1]["status"] == "completed"
                await ca.send({"type": "cancel", "id": "other"})
                await ca.collect("other")
    finally:
        redis.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any("unavailable" in r.getMessage() for r in caplog.records)


async def _spawn_relay(redis_url: str, prefix: str, drain_timeout: float = 30.0,
                       *extra: str, demo_tps: float = 40):
    env = {**_env(), "RELAY_REDIS_PREFIX": prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", str(demo_tps),
        "--redis", redis_url, "--detach-grace", "10", "--drain-timeout", str(drain_timeout),
        *extra, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
    match = re.search(r"(ws://\S+/ws)", line)
    assert match, line
    return proc, match.group(1)


async def test_rolling_restart_of_one_of_two_relay_processes_loses_nothing(prefix):
    """SIGTERM to relay A mid-stream: A closes its sockets 1012 at once, keeps the upstream
    call running into Redis; the client resumes on relay B and gets the whole answer."""
    proc_a, url_a = await _spawn_relay(SHARED_REDIS, prefix)
    proc_b, url_b = await _spawn_relay(SHARED_REDIS, prefix)
    try:
        async with Client.connect(url_a) as ca:
            await ca.start("q1", messages=MESSAGES)
            started, before = await _until_tokens(ca, "q1", 2)
            proc_a.send_signal(signal.SIGTERM)
            # Frames already on the way still arrive, then the 1012 close.
            with pytest.raises(ConnectionClosed):
                while True:
                    frame = await ca.next_for("q1")
                    before.append(frame)
            assert ca.ws.close_code == 1012
        last = before[-1]["seq"]
        async with Client.connect(url_b) as cb:
            await cb.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": last})
            assert (await cb.next_for("q1"))["type"] == "resumed"
            after = await cb.collect("q1")
        _assert_whole(before, after)
        # A exits once its upstream call is done (well within drain_timeout).
        assert await asyncio.wait_for(proc_a.wait(), 30) == 0
    finally:
        for proc in (proc_a, proc_b):
            await _stop(proc)


async def test_the_python_client_follows_its_streams_to_the_other_relay_on_a_restart(prefix):
    """RelayClient([A, B]): relay A restarts (SIGTERM path with Redis: 1012 at once, upstream
    calls keep running into Redis); the client reconnects to B and resumes both streams, so
    the application sees the same text and tool calls as without the restart."""
    from llm_relay_protocol import Token
    from llm_relay_client import RelayClient

    from .test_client_resume import SEARCH_TOOL, TOOL_MESSAGES

    async with two_relays(SHARED_REDIS, prefix, demo_tps=60) as (a, b):
        async with RelayClient(b.url) as reference:
            expected_text = (await reference.complete("demo", MESSAGES)).text
            expected_tool = (await reference.complete("demo", TOOL_MESSAGES,
                                                      tools=[SEARCH_TOOL])).tool_calls
        async with RelayClient([a.url, b.url], backoff=0.01, backoff_max=0.05) as c:
            text_stream = c.stream("demo", MESSAGES)
            tool_stream = c.stream("demo", TOOL_MESSAGES, tools=[SEARCH_TOOL])
            await tool_stream.start()
            restart = None
            seqs = []
            async for ev in text_stream:
                seqs.append(ev.seq)
                if isinstance(ev, Token) and restart is None and len(seqs) >= 3:
                    restart = asyncio.create_task(a.shutdown())
            async for _ in tool_stream:
                pass
            assert c.url == b.url and c.reconnects == 1
            assert text_stream.resumes == 1 and tool_stream.resumes == 1
        await restart
    assert text_stream.text == expected_text
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert text_stream.finish.status == "completed"
    assert [(t.index, t.name, t.arguments) for t in tool_stream.tool_calls] == \
        [(t.index, t.name, t.arguments) for t in expected_tool]


async def _stop(proc) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_relay_killed_mid_stream_is_stream_lost_on_resume_and_stops_counting_in_time(
        prefix):
    """kill -9 of the relay running a stream. (1) A resume on another relay may still get
    ``resumed`` (the owner's heartbeat key has not expired yet), then ``stream_lost`` within
    the documented bound: ``--redis-owner-ttl`` + 1 s after the kill (the follower checks the
    owner key after each empty 1 s read). The detach grace (10 s here) is longer than that
    bound on purpose: it must not stretch it. (2) The killed relay's stream counted toward
    the principal's shared stream cap (1) and stops counting within the owner TTL: its lease
    is no longer refreshed."""
    owner_ttl = 2.0
    lost_bound = owner_ttl + 1.0
    loop = asyncio.get_running_loop()
    proc, url = await _spawn_relay(SHARED_REDIS, prefix, 30.0, "--redis-owner-ttl",
                                   str(owner_ttl), "--max-streams-per-principal", "1",
                                   demo_tps=2)
    try:
        async with start_relay(redis_url=SHARED_REDIS, redis_prefix=prefix, detach_grace=10,
                               redis_owner_ttl=owner_ttl, max_streams_per_principal=1,
                               start_rate_per_minute=6000, start_burst=1000) as b:
            async with Client.connect(url) as ca, Client.connect(b.url) as cb:
                await ca.start("q1", messages=MESSAGES)
                started, before = await _until_tokens(ca, "q1", 1)
                await cb.start("other")
                assert (await cb.next_for("other"))["code"] == "too_many_streams"
                proc.kill()                      # SIGKILL: no drain, no finish, no cleanup
                killed_at = loop.time()
                await proc.wait()
            async with Client.connect(b.url) as cb:
                await cb.send({"type": "resume", "stream_key": started["stream_key"],
                               "after_seq": before[-1]["seq"]})
                answer = await cb.next_for("q1")
                if answer["type"] == "resumed":
                    async with asyncio.timeout(lost_bound + 5):
                        while answer["type"] != "error":
                            answer = await cb.next_for("q1")
                lost_after = loop.time() - killed_at
                assert (answer["type"], answer["code"]) == ("error", "stream_lost"), answer
                # A protocol deadline with a generous margin for a loaded machine, not a CPU
                # budget.
                assert lost_after < lost_bound + 5, lost_after
                for attempt in itertools.count():
                    await cb.start(f"s{attempt}", params={"max_tokens": 1})
                    frame = await cb.next_for(f"s{attempt}")
                    if frame["type"] == "started":
                        break
                    assert frame["code"] == "too_many_streams", frame
                    assert loop.time() - killed_at < owner_ttl + 5, "the lease did not expire"
                    await asyncio.sleep(0.2)     # retry pace of a bounded wait
                assert (await cb.collect(f"s{attempt}"))[-1]["status"] == "completed"
    finally:
        await _stop(proc)
