"""The mirror's group commit (relay.cluster.replication._GroupCommit): one writer copies
every mirrored stream's log to Redis, all new frames in one pipeline per write, against the
real shared Redis and real frame logs."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from llm_relay_protocol import frames
from relay.cluster.redis_store import RedisStore, StoreUnavailable
from relay.cluster.replication import _GroupCommit
from relay.core.streamlog import FrameLog

from .test_redis_store import prefix, raw, shared_url, started  # noqa: F401 (fixtures)


class CountingStore(RedisStore):
    """The real store, recording how many streams each ``append_many`` carried."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    async def append_many(self, batches, *, ttl):
        self.batches.append(len(batches))
        return await super().append_many(batches, ttl=ttl)


@pytest.fixture
async def store(shared_url: str, prefix: str):  # noqa: F811
    store = CountingStore(shared_url, prefix=prefix)
    await store.start(lambda message: None)
    yield store
    await store.close()


def _log() -> FrameLog:
    return FrameLog(max_bytes=1 << 20, keep=True)


def _token(log: FrameLog, sid: str, text: str) -> None:
    log.append(frames.token(sid, log.last_seq + 1, text))


def _finish(log: FrameLog, sid: str) -> None:
    log.append(frames.finish(sid, log.last_seq + 1, "completed", "stop",
                             frames.usage(1, 1, False)))


async def _texts(store: RedisStore, key: str) -> list[str]:
    import orjson

    return [orjson.loads(data).get("text", "<finish>")
            for _, data in await store.read(key, 0, block=0)]


async def test_frames_of_many_streams_go_in_one_write_and_each_ends_finished(
        store: CountingStore) -> None:
    commit = _GroupCommit(store, ttl=30)
    logs = {f"s{i}": _log() for i in range(100)}
    for key, log in logs.items():
        _token(log, key, "a")
        _token(log, key, "b")
    try:
        # The followers register in one loop turn, before the writer's first turn.
        followers = [asyncio.create_task(commit.follow(key, log)) for key, log in logs.items()]
        while not store.batches:
            await asyncio.sleep(0)
        assert store.batches[0] == 100            # every stream's frames in the first write
        # a token and the finishes later: in order, then follow() returns "finished"
        _token(logs["s7"], "s7", "c")
        for key, log in logs.items():
            _finish(log, key)
        assert await asyncio.gather(*followers) == ["finished"] * 100
        assert await _texts(store, "s7") == ["a", "b", "c", "<finish>"]
        assert await _texts(store, "s99") == ["a", "b", "<finish>"]
        assert len(store.batches) < 100           # not a write per stream
    finally:
        await commit.close()


async def test_a_log_that_dropped_unwritten_frames_ends_trimmed(store: CountingStore) -> None:
    commit = _GroupCommit(store, ttl=30)
    log = _log()
    try:
        _token(log, "t", "a")
        _token(log, "t", "b")
        log.trim_through(2)                       # gone before Redis got them
        assert await commit.follow("t", log) == "trimmed"
        assert store.batches == []
    finally:
        await commit.close()


async def test_a_refused_stream_fails_alone(store: CountingStore, raw: Redis,  # noqa: F811
                                            prefix: str) -> None:  # noqa: F811
    await raw.set(f"{prefix}log:bad", b"not a stream")
    commit = _GroupCommit(store, ttl=30)
    good, bad = _log(), _log()
    try:
        _token(good, "good", "g")
        _finish(good, "good")
        _token(bad, "bad", "x")
        results = await asyncio.gather(commit.follow("good", good), commit.follow("bad", bad),
                                       return_exceptions=True)
        assert results[0] == "finished"
        assert isinstance(results[1], StoreUnavailable) and "WRONGTYPE" in str(results[1])
        assert store.batches[0] == 2
    finally:
        await commit.close()


async def test_redis_gone_fails_every_follower_and_close_leaves_none_waiting(
        shared_url: str, prefix: str) -> None:  # noqa: F811
    async with started(shared_url, prefix) as (store, _):
        commit = _GroupCommit(store, ttl=30)
        await store.close()                          # every exchange now fails
        logs = [_log() for _ in range(3)]
        for i, log in enumerate(logs):
            _token(log, f"k{i}", "x")
        results = await asyncio.gather(*(commit.follow(f"k{i}", log)
                                         for i, log in enumerate(logs)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        # a follower still waiting (nothing to write yet) is released by close()
        waiting = asyncio.create_task(commit.follow("idle", _log()))
        await asyncio.sleep(0)
        await commit.close()
        with pytest.raises(StoreUnavailable, match="relay closing"):
            await waiting
        await commit.close()                         # idempotent


class BrokenStore(CountingStore):
    """A store whose group write hits a bug (not a Redis failure) once."""

    async def append_many(self, batches, *, ttl):
        if not self.batches:
            self.batches.append(len(batches))
            raise KeyError("a bug")
        return await super().append_many(batches, ttl=ttl)


async def test_a_bug_in_a_write_ends_those_mirrors_logged_and_the_writer_goes_on(
        shared_url: str, prefix: str, caplog) -> None:  # noqa: F811
    store = BrokenStore(shared_url, prefix=prefix)
    await store.start(lambda message: None)
    commit = _GroupCommit(store, ttl=30)
    first, later = _log(), _log()
    try:
        _token(first, "first", "a")
        with pytest.raises(StoreUnavailable, match="mirror write failed \\(KeyError\\)"):
            await commit.follow("first", first)
        assert "redis mirror writer: append failed" in caplog.text
        _token(later, "later", "b")
        _finish(later, "later")
        assert await commit.follow("later", later) == "finished"
        assert await _texts(store, "later") == ["b", "<finish>"]
    finally:
        await commit.close()
        await store.close()
