"""The mirror's group commit (relay.cluster.replication._GroupCommit): every stream's new
frames go to Redis together, in one pipeline per write, against the real shared Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from relay.cluster.redis_store import RedisStore, StoreUnavailable
from relay.cluster.replication import _GroupCommit

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


async def test_appends_waiting_together_are_one_write(store: CountingStore) -> None:
    commit = _GroupCommit(store, ttl=30)
    try:
        await asyncio.gather(*(commit.append(f"s{i}", [(1, b"a%d" % i), (2, b"b%d" % i)])
                               for i in range(100)))
        assert store.batches == [100]
        for i in (0, 57, 99):
            assert await store.read(f"s{i}", 0, block=0) == [(1, b"a%d" % i),
                                                              (2, b"b%d" % i)]
        # later appends: as they come, a key's frames in order
        await commit.append("s0", [(3, b"c0")])
        await commit.append("s0", [(4, b"d0")])
        assert store.batches == [100, 1, 1]
        assert [seq for seq, _ in await store.read("s0", 0, block=0)] == [1, 2, 3, 4]
    finally:
        await commit.close()


async def test_a_refused_key_fails_only_its_own_append(store: CountingStore, raw: Redis,  # noqa: F811
                                                       prefix: str) -> None:  # noqa: F811
    await raw.set(f"{prefix}log:bad", b"not a stream")
    commit = _GroupCommit(store, ttl=30)
    try:
        results = await asyncio.gather(commit.append("good", [(1, b"g")]),
                                       commit.append("bad", [(1, b"x")]),
                                       return_exceptions=True)
        assert results[0] is None
        assert isinstance(results[1], StoreUnavailable) and "WRONGTYPE" in str(results[1])
        assert store.batches == [2]
    finally:
        await commit.close()


async def test_redis_gone_fails_every_waiting_append_and_close_leaves_none_waiting(
        shared_url: str, prefix: str) -> None:  # noqa: F811
    async with started(shared_url, prefix) as (store, _):
        commit = _GroupCommit(store, ttl=30)
        await store.close()                          # every exchange now fails
        results = await asyncio.gather(*(commit.append(f"k{i}", [(1, b"x")])
                                         for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        await commit.close()
        await commit.close()                         # idempotent
