"""Resume: detached streams keep running for detach_grace; a reconnecting client replays
every frame after its last seq exactly once (in-process memory log)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from llm_relay_protocol import FinishStatus
from relay.upstream.demo import demo_reply_tokens
from relay.upstream.errors import RELAY_BUG
from relay.upstream.llm import demo_handler
from relay.upstream.event_streamer import StreamEnd, TextDelta, UsageInfo
from relay.streamer import TokenStreamer

from .helpers import Client, eventually, start_relay, text_of

# On uvloop (the default) and on asyncio's own loop (tests/conftest.py).
pytestmark = pytest.mark.both_loops

PROMPT = "please resume this answer without losing a single word of it " * 3
MESSAGES = [{"role": "user", "content": PROMPT}]
FULL_TEXT = "".join(demo_reply_tokens(MESSAGES))


def _words(n: int) -> str:
    # Distinct words: LiteLLM fails a stream that repeats one chunk 100 times in a row.
    return " ".join(f"w{i}" for i in range(n))


async def _read_until_token(c: Client, id: str, tokens: int) -> tuple[dict, list[dict]]:
    """started, then frames of ``id`` until ``tokens`` token frames were seen."""
    started = await c.next_for(id)
    assert started["type"] == "started"
    seen: list[dict] = []
    while sum(f["type"] == "token" for f in seen) < tokens:
        seen.append(await c.next_for(id))
    return started, seen


def _assert_exactly_once(before: list[dict], after: list[dict]) -> None:
    seqs = [f["seq"] for f in before + after]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), seqs
    assert after[-1]["type"] == "finish" and after[-1]["status"] == "completed"
    assert sum(f["type"] == "finish" for f in before + after) == 1
    assert text_of(before + after) == FULL_TEXT


async def test_welcome_announces_detach_grace():
    async with start_relay(detach_grace=7.5) as server, Client.connect(server.url) as c:
        assert c.welcome["limits"]["detach_grace"] == 7.5


async def test_resume_after_a_dropped_connection_replays_every_frame_exactly_once():
    async with start_relay(detach_grace=5, demo_tps=200) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=MESSAGES)
            started, before = await _read_until_token(c, "q1", 3)
            c.ws.transport.abort()           # the network drops: no close handshake
        async with Client.connect(server.url) as c2:
            last = before[-1]["seq"]
            await c2.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": last})
            resumed = await c2.next_for("q1")
            assert resumed == {"type": "resumed", "id": "q1",
                               "stream_key": started["stream_key"], "after_seq": last}
            after = await c2.collect("q1")
            assert all(f["seq"] > last for f in after)
            _assert_exactly_once(before, after)


async def test_resume_of_a_finished_stream_replays_through_its_finish():
    async with start_relay(detach_grace=5) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=MESSAGES)
            frames = await c.collect("q1")
        started, rest = frames[0], frames[1:]
        async with Client.connect(server.url) as c2:
            await c2.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": 0, "id": "again"})
            assert (await c2.next_for("again"))["type"] == "resumed"
            replay = await c2.collect("again")
            assert text_of(replay) == text_of(rest) == FULL_TEXT
            assert replay[-1]["type"] == "finish" and replay[-1]["seq"] == rest[-1]["seq"]
            assert {f["id"] for f in replay} == {"again"}
            # Its whole replay delivered, the id is free again on this connection.
            await c2.send({"type": "cancel", "id": "again"})
            assert (await c2.next_for("again"))["code"] == "unknown_stream"


async def test_resume_under_an_id_already_running_is_duplicate_id():
    async with start_relay(detach_grace=5, demo_tps=5) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1")
            started = await c.next_for("q1")
            await c.send({"type": "resume", "stream_key": started["stream_key"],
                          "after_seq": 0})
            err = await c.next_for("q1")
            while err["type"] != "error":
                err = await c.next_for("q1")
            assert (err["type"], err["code"], err["ref"]) == ("error", "duplicate_id", "resume")


async def test_unknown_and_foreign_keys_get_the_same_unknown_stream_answer():
    async with start_relay(detach_grace=5, demo_tps=5, trusted_proxies=["127.0.0.1"]) as server:
        alice = {"X-Forwarded-For": "10.0.0.1"}
        mallory = {"X-Forwarded-For": "10.0.0.2"}
        async with Client.connect(server.url, additional_headers=alice) as a, \
                Client.connect(server.url, additional_headers=mallory) as m:
            await a.start("q1")
            key = (await a.next_for("q1"))["stream_key"]
            answers = []
            for stream_key in (key, "no-such-key-" + "x" * 30):
                await m.send({"type": "resume", "stream_key": stream_key, "after_seq": 0,
                              "id": "steal"})
                answers.append(await m.next_for("steal"))
            assert [(f["code"], f["message"]) for f in answers] == \
                [("unknown_stream", "no resumable stream with that stream_key")] * 2
            # The owner's stream was not disturbed.
            await a.send({"type": "cancel", "id": "q1"})
            assert (await a.collect("q1"))[-1]["status"] == "cancelled"


async def test_a_stream_nobody_resumes_is_cancelled_upstream_after_the_grace():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=0.3, demo_tps=20) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1")
            key = (await c.next_for("q1"))["stream_key"]
            await c.next_for("q1")
        assert len(server.hub) == 1              # detached, still running
        await handler.wait_closed_early(before + 1)
        async with Client.connect(server.url) as c2:
            await c2.send({"type": "resume", "stream_key": key, "after_seq": 0})
            err = await c2.next_for(None)     # no id in the resume, none in the answer
            assert (err["code"], err["ref"]) == ("unknown_stream", "resume")
        assert len(server.hub) == 0


async def test_with_detach_grace_zero_a_disconnect_cancels_at_once_and_nothing_resumes():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=0, demo_tps=20) as server:
        async with Client.connect(server.url) as c:
            assert c.welcome["limits"]["detach_grace"] == 0
            await c.start("q1")
            key = (await c.next_for("q1"))["stream_key"]
            await c.next_for("q1")
        await handler.wait_closed_early(before + 1)
        async with Client.connect(server.url) as c2:
            await c2.send({"type": "resume", "stream_key": key, "after_seq": 0, "id": "q1"})
            assert (await c2.next_for("q1"))["code"] == "unknown_stream"


async def _taken_over_end(c: Client, id: str, after: int) -> list[dict]:
    """The frames of ``id`` on a connection whose stream was taken over: frames that were
    already in flight (``seq`` above ``after``), then ``error`` ``stream_taken_over`` naming
    ``id``, and nothing more (a ping round-trip shows it)."""
    frames = []
    while True:
        frame = await c.next_for(id)
        frames.append(frame)
        if frame["type"] in ("error", "finish"):
            break
    end = frames[-1]
    assert (end["type"], end["code"], end["id"], end["ref"]) == (
        "error", "stream_taken_over", id, "resume"), end
    assert all(f["type"] == "token" and f["seq"] > after for f in frames[:-1]), frames
    await c.send({"type": "ping", "data": 1})
    assert (await c.next_for(None))["type"] == "pong"
    assert not c._stash.get(id), c._stash.get(id)
    return frames


async def test_resume_with_takeover_takes_a_stream_over_from_a_half_open_connection():
    async with start_relay(detach_grace=5, demo_tps=100) as server:
        async with Client.connect(server.url) as old, Client.connect(server.url) as new:
            await old.start("q1", messages=MESSAGES)
            started, before = await _read_until_token(old, "q1", 2)
            last = before[-1]["seq"]
            # The old socket is still open (half-open from the server's point of view).
            await new.send({"type": "resume", "stream_key": started["stream_key"],
                            "after_seq": last, "takeover": True})
            assert (await new.next_for("q1"))["type"] == "resumed"
            after = await new.collect("q1")
            _assert_exactly_once(before, after)
            # The old attachment ends with a defined answer, not silence: what was in flight
            # before the takeover, then error stream_taken_over naming its id (no finish).
            await _taken_over_end(old, "q1", last)


async def test_a_takeover_under_a_second_id_on_the_same_connection_ends_the_first_id():
    async with start_relay(detach_grace=5, demo_tps=100) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=MESSAGES)
            started, before = await _read_until_token(c, "q1", 2)
            last = before[-1]["seq"]
            await c.send({"type": "resume", "stream_key": started["stream_key"],
                          "after_seq": last, "id": "q2", "takeover": True})
            resumed = await c.next_for("q2")
            assert (resumed["type"], resumed["after_seq"]) == ("resumed", last)
            after = await c.collect("q2")
            _assert_exactly_once(before, after)
            assert all(f["id"] == "q2" for f in after)
            await _taken_over_end(c, "q1", last)


async def test_cancel_after_resume_stops_the_upstream():
    handler = demo_handler()
    before = handler.closed_early
    async with start_relay(detach_grace=5, demo_tps=20) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1")
            started, seen = await _read_until_token(c, "q1", 1)
        async with Client.connect(server.url) as c2:
            await c2.send({"type": "resume", "stream_key": started["stream_key"],
                           "after_seq": seen[-1]["seq"]})
            assert (await c2.next_for("q1"))["type"] == "resumed"
            await c2.send({"type": "cancel", "id": "q1"})
            finish = (await c2.collect("q1"))[-1]
            assert (finish["status"], finish["reason"]) == ("cancelled", "client_cancel")
        await handler.wait_closed_early(before + 1)


async def test_after_seq_beyond_the_stream_is_bad_request():
    async with start_relay(detach_grace=5, demo_tps=5) as server, \
            Client.connect(server.url) as c:
        await c.start("q1")
        key = (await c.next_for("q1"))["stream_key"]
        await c.send({"type": "resume", "stream_key": key, "after_seq": 10_000, "id": "x"})
        err = await c.next_for("x")
        assert err["code"] == "bad_request" and "after_seq" in err["message"]


async def test_frames_trimmed_by_the_per_stream_cap_are_stream_lost():
    long = [{"role": "user", "content": _words(2000)}]
    async with start_relay(detach_grace=5, max_stream_log_bytes=4096) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=long)
            frames = await c.collect("q1")
        async with Client.connect(server.url) as c2:
            await c2.send({"type": "resume", "stream_key": frames[0]["stream_key"],
                           "after_seq": 0, "id": "q1"})
            err = await c2.next_for("q1")
            assert err["code"] == "stream_lost"
            # The newest frames are still there.
            await c2.send({"type": "resume", "stream_key": frames[0]["stream_key"],
                           "after_seq": frames[-2]["seq"]})
            assert (await c2.next_for("q1"))["type"] == "resumed"
            assert (await c2.next_for("q1"))["type"] == "finish"


async def test_memory_budget_drops_the_oldest_detached_stream():
    handler = demo_handler()
    before = handler.closed_early
    long = [{"role": "user", "content": _words(3000)}]
    async with start_relay(detach_grace=30, demo_tps=0, max_log_bytes=64 * 1024,
                           trusted_proxies=["127.0.0.1"]) as server:
        other = {"X-Forwarded-For": "10.9.9.9"}
        async with Client.connect(server.url, additional_headers=other) as o:
            await o.start("old", content="short", params={"max_tokens": 3})
            old = await o.collect("old")
        # The old stream finished and is detached, resumable for 30 s...
        assert len(server.hub) == 1
        async with Client.connect(server.url) as c:
            await c.start("big", messages=long)
            await c.collect("big")
        # ...until a big stream needed the memory: the detached one was dropped.
        async with Client.connect(server.url, additional_headers=other) as o2:
            await o2.send({"type": "resume", "stream_key": old[0]["stream_key"],
                           "after_seq": 0, "id": "old"})
            assert (await o2.next_for("old"))["code"] == "stream_lost"
        async with Client.connect(server.url) as c3:    # not its owner: no hint
            await c3.send({"type": "resume", "stream_key": old[0]["stream_key"],
                           "after_seq": 0, "id": "old"})
            assert (await c3.next_for("old"))["code"] == "unknown_stream"
    assert handler.closed_early == before       # both had finished: nothing to cancel


async def test_two_resumes_in_a_row_still_deliver_everything_once():
    async with start_relay(detach_grace=5, demo_tps=300) as server:
        got: list[dict] = []
        key = None
        after = 0
        c_ctx = Client.connect(server.url)
        c = await c_ctx.__aenter__()
        await c.start("q1", messages=MESSAGES)
        started = await c.next_for("q1")
        key = started["stream_key"]
        for _ in range(2):
            while sum(f["type"] == "token" for f in got) < 3 * (_ + 1):
                got.append(await c.next_for("q1"))
            after = got[-1]["seq"]
            c.ws.transport.abort()
            await c_ctx.__aexit__(None, None, None)
            c_ctx = Client.connect(server.url)
            c = await c_ctx.__aenter__()
            await c.send({"type": "resume", "stream_key": key, "after_seq": after})
            assert (await c.next_for("q1"))["type"] == "resumed"
        got.extend(await c.collect("q1"))
        await c_ctx.__aexit__(None, None, None)
        _assert_exactly_once(got[:1], got[1:])


class _StreamerThatBreaks(TokenStreamer):
    """One token, then a bug in the streamer itself: the hub ends the stream with its
    fallback ``finish`` (failed, internal_error)."""

    async def events(self, messages, **kwargs):
        yield TextDelta("partial")
        raise RuntimeError("a bug in the streamer")


async def test_the_fallback_finish_is_charged_and_given_back_with_the_log(caplog):
    """A stream whose task dies without a StreamEnd still ends with a finish; that finish is
    charged to the log budget like any frame, so dropping the retained log at the end of
    its grace brings the budget back to exactly zero (issue 12: it was appended
    unaccounted, and the drop then drove ``log_bytes`` below zero). The exception that
    killed the task is a relay bug: logged with its traceback, and the finish says so in
    the streamer's own words for one (``RELAY_BUG``)."""
    caplog.set_level(logging.ERROR, logger="relay.runtime.hub")
    async with start_relay(detach_grace=0.2,
                           streamer_factory=lambda spec: _StreamerThatBreaks("demo")) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=[{"role": "user", "content": "hi"}])
            frames = await c.collect("q1")
        assert frames[-1]["type"] == "finish" and frames[-1]["status"] == "failed"
        assert frames[-1]["error"] == RELAY_BUG.as_error()
        await eventually(lambda: any(r.getMessage() == "stream task failed"
                                     for r in caplog.records))
        [failed] = [r for r in caplog.records if r.getMessage() == "stream task failed"]
        assert failed.levelno == logging.ERROR and failed.exc_info is not None
        assert isinstance(failed.exc_info[1], RuntimeError)
        assert "a bug in the streamer" in str(failed.exc_info[1])
        stream = server.hub.get(frames[0]["stream_key"])
        assert stream is None or server.hub.log_bytes == stream.log.bytes
        await eventually(lambda: len(server.hub) == 0)
        assert server.hub.log_bytes == 0


async def test_log_accounting_returns_to_zero_after_evictions_and_drops():
    long = [{"role": "user", "content": _words(1500)}]
    async with start_relay(detach_grace=0.2, demo_tps=0, max_log_bytes=32 * 1024) as server:
        for round in range(3):
            async with Client.connect(server.url) as c:
                await c.start(f"r{round}", messages=long)
                await c.collect(f"r{round}")
        # Every stream finished and its grace ran out (or it was evicted): nothing is held,
        # and the relay's count of held bytes agrees (no drift from evictions).
        await eventually(lambda: len(server.hub) == 0)
        assert server.hub.log_bytes == 0


class _StreamerSlowToWindDown(TokenStreamer):
    """Tokens until cancelled; then its upstream takes a while to close (``release`` lets it
    end): the stream leaves the hub's table at the end of its grace while its task is still
    running."""

    release: asyncio.Event

    async def events(self, messages, **kwargs):
        while not self.cancelled:
            yield TextDelta("t ")
            await asyncio.sleep(0.01)    # a paced upstream
        await self.release.wait()
        yield StreamEnd(FinishStatus.CANCELLED, str(self._cancel_reason),
                        UsageInfo(1, 1, estimated=True))


async def test_close_awaits_the_tasks_of_streams_that_already_left_the_table():
    """Issue 12: a stream dropped at the end of its grace while its task still winds down is
    no longer in the hub's table, yet the hub still knows its task: ``close`` awaits it (and
    start_relay fails on any stream task that outlives the server)."""
    release = asyncio.Event()

    def factory(spec):
        streamer = _StreamerSlowToWindDown("demo")
        streamer.release = release
        return streamer

    async with start_relay(detach_grace=0.1, streamer_factory=factory) as server:
        async with Client.connect(server.url) as c:
            await c.start("q1", messages=[{"role": "user", "content": "hi"}])
            await c.next_for("q1")
            await c.next_for("q1")
        await eventually(lambda: len(server.hub) == 0)     # dropped: the grace ran out
        [task] = server.hub.tasks()
        assert not task.done()                             # ...but still winding down
        closing = asyncio.create_task(server.hub.close("server_shutdown"))
        await asyncio.sleep(0)
        assert not closing.done()                          # close waits for it
        release.set()
        await closing
        assert task.done() and server.hub.tasks() == []


def test_the_relay_bug_message_is_written_once():
    """The fallback finish of the hub and the streamer's ``RELAY_BUG`` say the same thing
    because they use one definition (relay.core.errors), not two copies of a sentence."""
    from pathlib import Path

    from relay.core.errors import RELAY_BUG_MESSAGE

    root = Path(__file__).resolve().parents[2] / "relay"
    written = [p for p in root.rglob("*.py") if RELAY_BUG_MESSAGE in p.read_text("utf-8")]
    assert [p.relative_to(root).as_posix() for p in written] == ["core/errors.py"]
    assert RELAY_BUG.message is RELAY_BUG_MESSAGE


async def _finished_long_stream(server, headers: dict, n: int) -> str:
    """Run a stream echoing ``n`` words (the demo: ``n`` + 30 tokens) to its end from an
    address given by ``headers``; its stream_key (retained for resume)."""
    async with Client.connect(server.url, additional_headers=headers) as c:
        await c.start("long", content=_words(n))
        frames = await c.collect("long")
    assert frames[-1]["type"] == "finish" and frames[-1]["status"] == "completed"
    assert f"w{n - 1}" in text_of(frames)
    return frames[0]["stream_key"]


async def _resume_on_a_new_connection(server, headers: dict, key: str) -> list[dict]:
    """A reload: a new connection resumes ``key`` from its start; its frames through the
    replay's finish, or the error refusing it (checked to leave the connection open)."""
    async with Client.connect(server.url, additional_headers=headers) as c:
        await c.send({"type": "resume", "stream_key": key, "after_seq": 0, "id": "again"})
        first = await c.next_for("again")
        if first["type"] == "error":
            await c.send({"type": "ping", "data": "still here"})
            assert await c.next_for(None) == {"type": "pong", "data": "still here"}
            return [first]
        assert first["type"] == "resumed"
        return [first, *await c.collect("again")]


async def test_resumes_on_new_connections_are_refused_once_the_address_replay_budget_is_spent():
    """The replay budget belongs to the principal (here the address), not the connection: an
    address that resumes a 2,000-token answer again and again, each time on a new
    connection, is refused ``rate_limited`` with ``retry_after`` once its 5,000 replayed
    events are spent (the connection stays); another address resumes its answer fine."""
    flooder, other = {"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.2"}
    async with start_relay(detach_grace=30, trusted_proxies=["127.0.0.1"],
                           replay_events_per_second=1, replay_event_burst=5_000) as server:
        key = await _finished_long_stream(server, flooder, 2000)
        other_key = await _finished_long_stream(server, other, 2000)
        answers = [await _resume_on_a_new_connection(server, flooder, key) for _ in range(4)]
        assert [a[-1]["type"] for a in answers[:2]] == ["finish", "finish"]
        assert all(f"{_words(2000)}." in text_of(a) for a in answers[:2])
        for refused in answers[2:]:
            [error] = refused
            assert (error["code"], error["id"], error["ref"]) == ("rate_limited", "again",
                                                                  "resume")
            assert error["retry_after"] > 0 and "resume again in" in error["message"]
        mine = await _resume_on_a_new_connection(server, other, other_key)
        assert mine[-1]["type"] == "finish" and f"{_words(2000)}." in text_of(mine)


async def test_resumes_of_an_authenticated_principal_share_one_replay_budget_across_connections():
    """With --auth the budget is the principal's: alice's resumes on new connections are
    refused once hers is spent; bob, from the same address, resumes his answer fine."""
    alice, bob = "sk-relay-TEST-replay-alice-0001", "sk-relay-TEST-replay-bob-0002"
    async with start_relay(detach_grace=30, auth=True, api_keys=[alice, bob],
                           replay_events_per_second=1, replay_event_burst=2_500) as server:
        @contextlib.asynccontextmanager
        async def as_user(api_key: str):
            async with Client.connect(server.url, hello=False) as c:
                await c.send({"type": "hello", "client": {"name": "t", "version": "0"},
                              "token": api_key})
                assert (await c.recv())["type"] == "welcome"
                yield c

        keys = {}
        for user in (alice, bob):
            async with as_user(user) as c:
                await c.start("long", content=_words(2000))
                keys[user] = (await c.collect("long"))[0]["stream_key"]
        answers = []
        for _ in range(3):
            async with as_user(alice) as c:
                await c.send({"type": "resume", "stream_key": keys[alice], "after_seq": 0,
                              "id": "r"})
                first = await c.next_for("r")
                answers.append(first.get("code", first["type"]))
                if first["type"] == "resumed":
                    assert (await c.collect("r"))[-1]["type"] == "finish"
        assert answers == ["resumed", "rate_limited", "rate_limited"]
        async with as_user(bob) as c:
            await c.send({"type": "resume", "stream_key": keys[bob], "after_seq": 0, "id": "r"})
            assert (await c.next_for("r"))["type"] == "resumed"
            assert f"{_words(2000)}." in text_of(await c.collect("r"))


async def test_a_few_reloads_of_a_long_answer_pass_with_the_default_replay_budget():
    """The defaults leave the normal case alone: a 2,000-token answer resumed from its start
    on five new connections in a row (reloads) is replayed whole each time."""
    async with start_relay(detach_grace=30) as server:
        assert (server.settings.replay_events_per_second,
                server.settings.replay_event_burst) == (2000.0, 100_000)
        key = await _finished_long_stream(server, {}, 2000)
        for _ in range(5):
            replay = await _resume_on_a_new_connection(server, {}, key)
            assert replay[-1]["type"] == "finish" and f"{_words(2000)}." in text_of(replay)
