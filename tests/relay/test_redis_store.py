"""relay.cluster.redis_store against real Redis servers.

Most tests use the shared server at 127.0.0.1:6379 under a random key prefix (deleted after
each test); a missing shared server FAILS these tests, it never skips them. Tests that need to
stop, restart or freeze Redis, or count blocked clients exactly, use a private server
(tests.redis_server.RedisServerProcess). Waits are conditions polled against a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from uuid import uuid4

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

import relay.cluster.redis_store as redis_store
from relay.cluster.redis_store import ChatRecord, RedisStore, StoreUnavailable, StreamMeta
from relay.core.lifecycle import SharedState

from ..redis_server import RedisServerProcess, redis_ping

SHARED_HOST, SHARED_PORT = "127.0.0.1", 6379
SHARED_URL = f"redis://{SHARED_HOST}:{SHARED_PORT}/0"
PASSWORD = "hunter2-s3cret"
DEADLINE = 10.0  # generous bound for polled conditions; a pass is usually milliseconds


async def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``condition`` (sync or async) until truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def other_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.fixture
def shared_url() -> str:
    if not redis_ping(SHARED_HOST, SHARED_PORT):
        pytest.fail(f"no Redis answers on {SHARED_HOST}:{SHARED_PORT}; start one "
                    "(`bash .ci/run` does) - these tests never skip")
    return SHARED_URL


@pytest.fixture
async def prefix(shared_url: str) -> AsyncIterator[str]:
    prefix = f"test:{uuid4().hex}:"
    yield prefix
    raw = Redis.from_url(shared_url)
    try:
        keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
        if keys:
            await raw.delete(*keys)
    finally:
        await raw.aclose()


@pytest.fixture
async def raw(shared_url: str) -> AsyncIterator[Redis]:
    """A plain redis-py client for looking behind the store's back."""
    client = Redis.from_url(shared_url)
    yield client
    await client.aclose()


@pytest.fixture
def private() -> AsyncIterator[RedisServerProcess]:
    with RedisServerProcess(password=PASSWORD) as server:
        yield server


@asynccontextmanager
async def started(url: str, prefix: str, **kwargs) -> AsyncIterator[tuple[RedisStore, list[dict]]]:
    """A started store and the list its control messages land in; closed on exit."""
    inbox: list[dict] = []
    store = RedisStore(url, prefix=prefix, **kwargs)
    await store.start(inbox.append)
    try:
        yield store, inbox
    finally:
        await store.close()


@pytest.fixture
async def store(shared_url: str, prefix: str) -> AsyncIterator[RedisStore]:
    async with started(shared_url, prefix) as (store, _):
        yield store


# ---------------------------------------------------------------------------- API shape


def test_public_api_is_pinned() -> None:
    assert sorted(redis_store.__all__) == ["ChatRecord", "RedisStore", "StoreUnavailable",
                                          "StreamMeta"]
    sig = {name: str(inspect.signature(getattr(RedisStore, name))) for name in (
        "__init__", "start", "close", "create", "append", "append_many", "finish", "mark_lost", "meta",
        "owner_alive", "refresh", "read", "first_seq", "set_attached", "get_attached",
        "clear_attached", "publish")}
    assert sig == {
        "__init__": "(self, url: 'str', *, prefix: 'str' = 'llmrelay:', max_frames: 'int' = 10000, "
                    "op_timeout: 'float' = 2.0) -> 'None'",
        "start": "(self, on_control: 'Callable[[dict], None]') -> 'None'",
        "close": "(self) -> 'None'",
        "create": "(self, key: 'str', *, principal: 'str', alias: 'str', node: 'str', "
                  "ttl: 'float', stream_id: 'str' = '', owner_ttl: 'float | None' = None) -> 'None'",
        "append": "(self, key: 'str', frames: 'list[tuple[int, bytes]]', *, ttl: 'float', "
                  "owner_ttl: 'float | None' = None) -> 'None'",
        "append_many": "(self, batches: 'list[tuple[str, list[tuple[int, bytes]]]]', *, "
                       "ttl: 'float') -> 'dict[str, StoreUnavailable]'",
        "finish": "(self, key: 'str', *, ttl: 'float') -> 'None'",
        "mark_lost": "(self, key: 'str', *, ttl: 'float') -> 'None'",
        "meta": "(self, key: 'str') -> 'StreamMeta | None'",
        "owner_alive": "(self, key: 'str') -> 'bool'",
        "refresh": "(self, keys: 'list[str]', *, ttl: 'float', "
                   "owner_ttl: 'float | None' = None) -> 'None'",
        "read": "(self, key: 'str', after_seq: 'int', *, block: 'float', count: 'int' = 512) "
                "-> 'list[tuple[int, bytes]]'",
        "first_seq": "(self, key: 'str') -> 'int | None'",
        "set_attached": "(self, key: 'str', token: 'str', *, ttl: 'float') -> 'None'",
        "get_attached": "(self, key: 'str') -> 'str | None'",
        "clear_attached": "(self, key: 'str', token: 'str') -> 'None'",
        "publish": "(self, message: 'dict') -> 'None'",
    }
    meta = StreamMeta(principal="p", alias="a", node="n", state=SharedState.RUNNING)
    with pytest.raises(AttributeError):
        meta.state = SharedState.LOST  # type: ignore[misc]


# ---------------------------------------------------------------------------- records


async def test_create_writes_meta_and_owner_with_ttl(store: RedisStore, raw: Redis, prefix: str) -> None:
    assert await store.meta("s1") is None
    assert not await store.owner_alive("s1")
    await store.create("s1", principal="alice", alias="gpt", node="node-a", ttl=30)
    assert await store.meta("s1") == StreamMeta("alice", "gpt", "node-a", "running")
    assert await store.owner_alive("s1")
    assert await raw.get(f"{prefix}owner:s1") == b"node-a"
    assert await raw.hgetall(f"{prefix}meta:s1") == {
        b"principal": b"alice", b"alias": b"gpt", b"node": b"node-a", b"state": b"running",
        b"stream_id": b""}
    for key in (f"{prefix}meta:s1", f"{prefix}owner:s1"):
        assert 29_000 < await raw.pttl(key) <= 30_000


async def test_create_again_starts_a_fresh_record(store: RedisStore) -> None:
    await store.create("s", principal="p", alias="a", node="n1", ttl=30)
    await store.append("s", [(1, b"old1"), (2, b"old2")], ttl=30)
    await store.finish("s", ttl=30)
    await store.create("s", principal="q", alias="b", node="n2", ttl=30)
    assert await store.meta("s") == StreamMeta("q", "b", "n2", "running")
    assert await store.first_seq("s") is None
    await store.append("s", [(1, b"new1")], ttl=30)
    assert await store.read("s", 0, block=0) == [(1, b"new1")]


async def test_append_then_read_in_order_after_seq(store: RedisStore, raw: Redis, prefix: str) -> None:
    await store.create("s", principal="p", alias="a", node="n", ttl=30)
    frames = [(seq, orjson.dumps({"seq": seq, "t": "x" * seq})) for seq in range(1, 8)]
    await store.append("s", frames[:3], ttl=30)
    await store.append("s", frames[3:], ttl=30)
    assert await store.read("s", 0, block=0.05) == frames
    assert await store.read("s", 3, block=0.05) == frames[3:]
    assert await store.read("s", 6, block=0.05) == frames[6:]
    assert await store.read("s", 2, block=0.05, count=2) == frames[2:4]
    assert await store.read("s", 7, block=0) == []
    assert await store.first_seq("s") == 1
    # the raw layout the lead's hub and other nodes rely on
    entries = await raw.xrange(f"{prefix}log:s")
    assert [(e[0], e[1]) for e in entries[:2]] == [(b"0-1", {b"f": frames[0][1]}),
                                                   (b"0-2", {b"f": frames[1][1]})]
    for key in ("log", "meta", "owner"):
        assert 29_000 < await raw.pttl(f"{prefix}{key}:s") <= 30_000


async def test_append_many_writes_every_streams_frames_in_one_exchange(
        store: RedisStore, raw: Redis, prefix: str) -> None:
    for key in ("a", "b"):
        await store.create(key, principal="p", alias="x", node="n", ttl=30)
    await raw.set(f"{prefix}log:bad", b"not a stream")    # XADD on it: WRONGTYPE
    refused = await store.append_many(
        [("a", [(1, b"a1"), (2, b"a2")]), ("bad", [(1, b"x")]), ("b", [(1, b"b1")])], ttl=20)
    assert list(refused) == ["bad"] and "WRONGTYPE" in str(refused["bad"])
    assert await store.read("a", 0, block=0) == [(1, b"a1"), (2, b"a2")]
    assert await store.read("b", 0, block=0) == [(1, b"b1")]
    # stale ids are no-ops, as in append; fresh ones are kept
    assert await store.append_many([("a", [(2, b"A2"), (3, b"a3")])], ttl=20) == {}
    assert await store.read("a", 0, block=0) == [(1, b"a1"), (2, b"a2"), (3, b"a3")]
    # the log gets the expiry; meta and owner keep create's (the heartbeat extends them)
    assert 19_000 < await raw.pttl(f"{prefix}log:a") <= 20_000
    assert 20_000 < await raw.pttl(f"{prefix}meta:a") <= 30_000
    assert await store.append_many([], ttl=20) == {}


async def test_append_of_stale_seqs_is_a_noop_for_those_entries(store: RedisStore) -> None:
    await store.create("s", principal="p", alias="a", node="n", ttl=30)
    await store.append("s", [(1, b"a"), (2, b"b"), (3, b"c")], ttl=30)
    await store.append("s", [(3, b"C")], ttl=30)                 # equal to last
    await store.append("s", [(1, b"A"), (2, b"B")], ttl=30)      # below last
    await store.append("s", [(2, b"B"), (4, b"d"), (4, b"D"), (5, b"e")], ttl=30)  # mixed batch
    await store.append("s", [], ttl=30)
    assert await store.read("s", 0, block=0) == [(1, b"a"), (2, b"b"), (3, b"c"), (4, b"d"), (5, b"e")]
    await store.append("fresh", [(0, b"zero"), (1, b"one")], ttl=30)  # seq 0 is not a valid id
    assert await store.read("fresh", 0, block=0) == [(1, b"one")]


async def test_maxlen_trims_exactly_and_first_seq_follows(shared_url: str, prefix: str) -> None:
    async with started(shared_url, prefix, max_frames=5) as (store, _):
        assert await store.first_seq("s") is None
        await store.create("s", principal="p", alias="a", node="n", ttl=30)
        assert await store.first_seq("s") is None
        await store.append("s", [(seq, b"%d" % seq) for seq in range(1, 4)], ttl=30)
        assert await store.first_seq("s") == 1
        await store.append("s", [(seq, b"%d" % seq) for seq in range(4, 13)], ttl=30)
        assert await store.first_seq("s") == 8
        assert await store.read("s", 0, block=0) == [(seq, b"%d" % seq) for seq in range(8, 13)]
        await store.append("s", [(13, b"13")], ttl=30)
        assert await store.first_seq("s") == 9


async def test_finish_keeps_meta_and_log_for_ttl_then_both_expire(store: RedisStore) -> None:
    await store.create("s", principal="p", alias="a", node="n", ttl=30)
    await store.append("s", [(1, b"a"), (2, b"b")], ttl=30)
    await store.finish("s", ttl=0.3)
    assert await store.meta("s") == StreamMeta("p", "a", "n", "finished")
    assert not await store.owner_alive("s")
    assert await store.read("s", 0, block=0) == [(1, b"a"), (2, b"b")]
    await wait_for(lambda: _is_none(store.meta("s")), "finished meta to expire")
    await wait_for(lambda: _is_none(store.first_seq("s")), "finished log to expire")
    assert await store.read("s", 0, block=0) == []


async def _is_none(coro) -> bool:
    return await coro is None


async def test_mark_lost_keeps_principal_deletes_log_and_owner(store: RedisStore, raw: Redis,
                                                               prefix: str) -> None:
    await store.create("s", principal="alice", alias="a", node="node-a", ttl=30)
    await store.append("s", [(1, b"a")], ttl=30)
    await store.mark_lost("s", ttl=0.3)
    assert await store.meta("s") == StreamMeta("alice", "a", "node-a", "lost")
    assert not await store.owner_alive("s")
    assert not await raw.exists(f"{prefix}log:s")
    assert await store.first_seq("s") is None
    await wait_for(lambda: _is_none(store.meta("s")), "lost meta to expire")


async def test_state_only_leaves_running(store: RedisStore) -> None:
    # a late mark_lost (owner key seen gone while the owner was finishing) keeps the log
    await store.create("done", principal="p", alias="a", node="n", ttl=30)
    await store.append("done", [(1, b"a")], ttl=30)
    await store.finish("done", ttl=30)
    await store.mark_lost("done", ttl=30)
    assert (await store.meta("done")).state is SharedState.FINISHED
    assert await store.read("done", 0, block=0) == [(1, b"a")]
    # a stream declared lost is not revived by its old owner finishing
    await store.create("lost", principal="p", alias="a", node="n", ttl=30)
    await store.mark_lost("lost", ttl=30)
    await store.finish("lost", ttl=30)
    assert (await store.meta("lost")).state is SharedState.LOST
    # absent meta: nothing is created
    await store.finish("nothing", ttl=30)
    await store.mark_lost("nothing", ttl=30)
    assert await store.meta("nothing") is None


async def test_sub_second_ttl_expiry_of_create_and_owner(store: RedisStore) -> None:
    await store.create("s", principal="p", alias="a", node="n", ttl=0.2)
    await store.append("s", [(1, b"a")], ttl=0.2)
    assert await store.owner_alive("s")
    await wait_for(lambda: _is_none(store.meta("s")), "meta with a 0.2 s ttl to expire")
    assert not await store.owner_alive("s")
    assert await store.first_seq("s") is None
    with pytest.raises(ValueError):
        await store.create("s", principal="p", alias="a", node="n", ttl=0)


async def test_refresh_extends_running_keys_and_resurrects_nothing(store: RedisStore, raw: Redis,
                                                                   prefix: str) -> None:
    for key in ("a", "b"):
        await store.create(key, principal="p", alias="x", node="n", ttl=1)
        await store.append(key, [(1, b"f")], ttl=1)
    await store.create("done", principal="p", alias="x", node="n", ttl=1)
    await store.finish("done", ttl=1)
    await store.refresh(["a", "b", "done", "never"], ttl=60)
    for key in ("a", "b"):
        for kind in ("meta", "log", "owner"):
            assert 59_000 < await raw.pttl(f"{prefix}{kind}:{key}") <= 60_000, (kind, key)
        assert await store.owner_alive(key)
    assert not await store.owner_alive("done")
    assert not await raw.exists(f"{prefix}meta:never", f"{prefix}log:never", f"{prefix}owner:never")
    await store.refresh([], ttl=60)


async def test_the_owner_key_has_its_own_shorter_ttl(store: RedisStore, raw: Redis,
                                                     prefix: str) -> None:
    """The owner key is the heartbeat (a dead owner must be noticed within its TTL); meta and
    log live longer, so a resume after the owner's death still finds the record."""
    await store.create("s", principal="p", alias="x", node="n", ttl=60, owner_ttl=5)
    owner, meta = f"{prefix}owner:s", f"{prefix}meta:s"
    assert 4_000 < await raw.pttl(owner) <= 5_000 and 59_000 < await raw.pttl(meta) <= 60_000
    await store.append("s", [(1, b"f")], ttl=50, owner_ttl=4)
    assert 3_000 < await raw.pttl(owner) <= 4_000
    for kind in ("meta", "log"):
        assert 49_000 < await raw.pttl(f"{prefix}{kind}:s") <= 50_000
    await store.refresh(["s"], ttl=40, owner_ttl=3)
    assert 2_000 < await raw.pttl(owner) <= 3_000
    for kind in ("meta", "log"):
        assert 39_000 < await raw.pttl(f"{prefix}{kind}:s") <= 40_000


async def test_attached_set_get_and_compare_and_clear(store: RedisStore) -> None:
    assert await store.get_attached("s") is None
    await store.set_attached("s", "conn-1", ttl=30)
    assert await store.get_attached("s") == "conn-1"
    await store.set_attached("s", "conn-2", ttl=30)       # takeover
    await store.clear_attached("s", "conn-1")             # loser's late clear: no-op
    assert await store.get_attached("s") == "conn-2"
    await store.clear_attached("s", "conn-2")
    assert await store.get_attached("s") is None
    await store.clear_attached("s", "conn-2")             # absent: no-op, no error
    await store.set_attached("s", "conn-3", ttl=0.2)
    await wait_for(lambda: _is_none(store.get_attached("s")), "attachment to expire")


# ---------------------------------------------------------------------------- blocking reads


async def test_read_blocks_until_a_later_append(private: RedisServerProcess) -> None:
    admin = Redis.from_url(private.url)
    try:
        async with started(private.url, "t:") as (store, _):
            await store.create("s", principal="p", alias="a", node="n", ttl=30)
            await store.append("s", [(1, b"a")], ttl=30)
            reader = asyncio.create_task(store.read("s", 1, block=10))

            async def reader_blocked() -> bool:
                return await blocked_clients(admin) == 1
            await wait_for(reader_blocked, "the read to block in XREAD")
            assert not reader.done()
            await store.append("s", [(2, b"b"), (3, b"c")], ttl=30)
            assert await asyncio.wait_for(reader, DEADLINE) == [(2, b"b"), (3, b"c")]
            # a read on a log that does not exist yet waits for its creation too
            reader = asyncio.create_task(store.read("later", 0, block=10))
            await wait_for(reader_blocked, "the read of an absent log to block")
            await store.append("later", [(1, b"x")], ttl=30)
            assert await asyncio.wait_for(reader, DEADLINE) == [(1, b"x")]
    finally:
        await admin.aclose()


async def test_read_times_out_with_empty_list(store: RedisStore) -> None:
    await store.create("s", principal="p", alias="a", node="n", ttl=30)
    await store.append("s", [(1, b"a")], ttl=30)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await store.read("s", 1, block=0.2) == []
    elapsed = loop.time() - t0
    assert 0.15 <= elapsed < 0.2 + store.op_timeout, elapsed
    assert await store.read("absent", 0, block=0.05) == []
    t0 = loop.time()
    assert await store.read("s", 1, block=0) == []       # block <= 0: no wait
    assert loop.time() - t0 < 0.15


async def blocked_clients(admin: Redis) -> int:
    return (await admin.info("clients"))["blocked_clients"]


async def test_blocking_reads_do_not_starve_commands(private: RedisServerProcess) -> None:
    admin = Redis.from_url(private.url)
    async with started(private.url, "t:") as (store, _):
        await store.create("s", principal="p", alias="a", node="n", ttl=30)
        readers = [asyncio.create_task(store.read(f"idle{i}", 0, block=10)) for i in range(30)]
        try:
            await wait_for(lambda: _at_least(blocked_clients(admin), 30), "30 blocked XREADs")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for _ in range(20):
                assert (await store.meta("s")).state == "running"
            await store.publish({"x": 1})
            assert loop.time() - t0 < 1.0
            assert not any(reader.done() for reader in readers)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await admin.aclose()


async def test_cancelled_read_leaves_the_store_usable(private: RedisServerProcess) -> None:
    admin = Redis.from_url(private.url)
    async with started(private.url, "t:") as (store, _):
        await store.create("s", principal="p", alias="a", node="n", ttl=30)
        reader = asyncio.create_task(store.read("s", 0, block=10))
        await wait_for(lambda: _at_least(blocked_clients(admin), 1), "the read to block")
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        # its connection is closed, not returned to the pool with an XREAD reply pending
        await wait_for(lambda: _is_zero(blocked_clients(admin)), "the cancelled XREAD to go")
        await store.append("s", [(1, b"a"), (2, b"b")], ttl=30)
        assert await store.read("s", 1, block=1) == [(2, b"b")]
        assert await store.read("s", 0, block=1) == [(1, b"a"), (2, b"b")]
    await admin.aclose()


@pytest.mark.parametrize("library", ["swallows", "converts"])
async def test_a_cancellation_lost_inside_a_call_still_cancels_the_caller(store: RedisStore,
                                                                          library: str) -> None:
    """A library call that absorbs the caller's cancel (returns normally, as Python 3.11's
    ``asyncio.wait_for`` inside redis-py can, or raises its own error instead) must not keep
    the caller running: every store call re-raises the cancellation."""
    entered = asyncio.Event()

    async def call() -> str:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if library == "converts":
                raise RedisConnectionError("connection closed by cancel") from None
            return "absorbed"
        return "slept"

    caller = asyncio.create_task(store._run("probe", call))
    await entered.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # The store's own deadline is not a cancellation: it still reads as StoreUnavailable.
    with pytest.raises(StoreUnavailable, match="probe failed \\(no answer in time\\)"):
        await store._run("probe", lambda: asyncio.sleep(10), timeout=0.01)


def test_deadlines_are_the_stores_not_redis_py_socket_timeouts(store: RedisStore) -> None:
    # redis-py enforces socket_timeout with asyncio.wait_for on every send, which can lose a
    # cancellation on Python 3.11 (module docstring); _run's asyncio.timeout caps each call.
    for client in (store._cmd, store._blocking, store._sub):
        assert client.connection_pool.connection_kwargs.get("socket_timeout") is None


async def _is_zero(coro) -> bool:
    return await coro == 0


# ---------------------------------------------------------------------------- control channel


async def test_publish_reaches_every_node_including_the_sender(shared_url: str, prefix: str) -> None:
    async with started(shared_url, prefix) as (a, inbox_a), \
            started(shared_url, prefix) as (b, inbox_b), \
            started(shared_url, f"other:{prefix}") as (_, inbox_other):
        await a.publish({"type": "cancel", "key": "s1", "n": [1, 2]})
        await b.publish({"type": "takeover", "key": "s2"})
        want = [{"type": "cancel", "key": "s1", "n": [1, 2]}, {"type": "takeover", "key": "s2"}]
        await wait_for(lambda: len(inbox_a) == 2 and len(inbox_b) == 2, "both nodes to receive")
        assert inbox_a == want and inbox_b == want
        assert inbox_other == []  # another prefix is another deployment


async def test_listener_survives_bad_messages_and_a_raising_callback(
        shared_url: str, prefix: str, raw: Redis, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[dict] = []

    def on_control(message: dict) -> None:
        seen.append(message)
        if message.get("boom"):
            raise RuntimeError("callback bug")

    store = RedisStore(shared_url, prefix=prefix)
    await store.start(on_control)
    try:
        await raw.publish(f"{prefix}control", b"not json")
        await raw.publish(f"{prefix}control", b"[1, 2]")
        await store.publish({"boom": True})
        await store.publish({"ok": 1})
        await wait_for(lambda: {"ok": 1} in seen, "the message after the bad ones")
        assert seen == [{"boom": True}, {"ok": 1}]
        assert "on_control raised" in caplog.text
    finally:
        await store.close()


async def test_listener_resubscribes_after_restart(private: RedisServerProcess,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.cluster.redis_store")
    async with started(private.url, "t:", op_timeout=0.5) as (store, inbox):
        await store.publish({"n": 1})
        await wait_for(lambda: inbox == [{"n": 1}], "the first message")
        private.stop()
        await wait_for(lambda: store._reconnect_attempts >= 3, "several resubscribe attempts")
        warnings = [r for r in caplog.records
                    if r.name == "relay.cluster.redis_store" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage
        assert store._listener is not None and not store._listener.done()
        private.start()   # same port, empty data set
        admin = Redis.from_url(private.url)
        try:
            # PUBLISH answers the number of subscribers: poll until the listener is back
            await wait_for(lambda: admin.publish("t:control", orjson.dumps({"n": 2})),
                           "the listener to resubscribe")
        finally:
            await admin.aclose()
        await wait_for(lambda: {"n": 2} in inbox, "a message after the restart")
        await store.publish({"n": 3})
        await wait_for(lambda: {"n": 3} in inbox, "a message published by the store")
        assert "resubscribed" in caplog.text
        assert store._outages == 1
    assert PASSWORD not in caplog.text


async def test_listener_detects_a_frozen_server(private: RedisServerProcess,
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.cluster.redis_store")
    inbox: list[dict] = []
    store = RedisStore(private.url, prefix="t:", op_timeout=0.3)
    store._idle_ping = 0.1  # idle PING period; default is far too slow for a test
    await store.start(inbox.append)
    try:
        private.pause()
        try:
            await wait_for(lambda: store._outages == 1, "the listener to notice the freeze")
        finally:
            private.resume()
        assert "control channel t:control" in caplog.text
        await wait_for(lambda: "resubscribed" in caplog.text, "the listener to resubscribe")
        await store.publish({"after": "freeze"})
        await wait_for(lambda: inbox == [{"after": "freeze"}], "a message after the freeze")
    finally:
        await store.close()


async def test_idle_pings_keep_a_healthy_subscription(private: RedisServerProcess) -> None:
    admin = Redis.from_url(private.url)
    try:
        await admin.config_resetstat()
        store = RedisStore(private.url, prefix="t:", op_timeout=0.3)
        store._idle_ping = 0.02
        inbox: list[dict] = []
        await store.start(inbox.append)
        try:
            async def pings() -> int:
                stats = await admin.info("commandstats")
                return stats.get("cmdstat_ping", {}).get("calls", 0)
            await wait_for(lambda: _at_least(pings(), 20), "20 idle PINGs from the listener")
            assert store._outages == 0  # every PING was answered: no false outage
            await store.publish({"still": "here"})
            await wait_for(lambda: inbox == [{"still": "here"}], "a message after idle PINGs")
        finally:
            await store.close()
    finally:
        await admin.aclose()


async def _at_least(coro, n: int) -> bool:
    return await coro >= n


# ---------------------------------------------------------------------------- Redis unavailable


def calls(store: RedisStore) -> dict[str, Callable[[], object]]:
    """One call of every method but close(), with valid arguments."""
    return {
        "start": lambda: store.start(lambda m: None),
        "create": lambda: store.create("s", principal="p", alias="a", node="n", ttl=5),
        "append": lambda: store.append("s", [(9, b"x")], ttl=5),
        "finish": lambda: store.finish("s", ttl=5),
        "mark_lost": lambda: store.mark_lost("s", ttl=5),
        "meta": lambda: store.meta("s"),
        "owner_alive": lambda: store.owner_alive("s"),
        "refresh": lambda: store.refresh(["s"], ttl=5),
        "read": lambda: store.read("s", 0, block=0.2),
        "first_seq": lambda: store.first_seq("s"),
        "set_attached": lambda: store.set_attached("s", "t", ttl=5),
        "get_attached": lambda: store.get_attached("s"),
        "clear_attached": lambda: store.clear_attached("s", "t"),
        "publish": lambda: store.publish({"x": 1}),
    }


async def assert_all_unavailable(store: RedisStore, *, bound: float) -> None:
    loop = asyncio.get_running_loop()
    for name, call in calls(store).items():
        if name == "start" and store._started:
            continue
        t0 = loop.time()
        with pytest.raises(StoreUnavailable) as info:
            await asyncio.wait_for(call(), bound + 5)  # a hang fails, it does not block the suite
        elapsed = loop.time() - t0
        assert elapsed < bound + (0.2 if name == "read" else 0), (name, elapsed)
        message = str(info.value)
        assert PASSWORD not in message and "127.0.0.1" in message, message


async def test_every_method_raises_store_unavailable_when_redis_is_down(
        private: RedisServerProcess) -> None:
    url = private.url
    private.stop()
    store = RedisStore(url, prefix="t:", op_timeout=0.5)
    before = other_tasks()
    with pytest.raises(StoreUnavailable):
        await store.start(lambda m: None)
    assert other_tasks() == before, "a failed start() left a task behind"
    await assert_all_unavailable(store, bound=0.5 + 0.5)
    await store.close()

    # the same with a store that was started while Redis was up
    private.start()
    async with started(url, "t:", op_timeout=0.5) as (store, _):
        await store.create("s", principal="p", alias="a", node="n", ttl=5)
        private.stop()
        await assert_all_unavailable(store, bound=0.5 + 0.5)
        private.start()
        # and the store recovers by itself once Redis is back
        await store.create("s", principal="p", alias="a", node="n", ttl=5)
        assert (await store.meta("s")).state == "running"


async def test_every_method_times_out_when_redis_freezes(private: RedisServerProcess) -> None:
    async with started(private.url, "t:", op_timeout=0.3) as (store, _):
        await store.create("s", principal="p", alias="a", node="n", ttl=5)
        private.pause()
        try:
            await assert_all_unavailable(store, bound=0.3 + 0.5)
        finally:
            private.resume()
        assert (await store.meta("s")).state == "running"


async def test_redis_error_replies_become_store_unavailable(shared_url: str, prefix: str,
                                                            raw: Redis) -> None:
    async with started(shared_url, prefix) as (store, _):
        await raw.set(f"{prefix}log:s", b"not a stream")   # WRONGTYPE for XADD/XREAD/XRANGE
        await raw.set(f"{prefix}meta:s", b"not a hash")
        for call in (lambda: store.append("s", [(1, b"a")], ttl=5),
                     lambda: store.read("s", 0, block=0.05), lambda: store.first_seq("s"),
                     lambda: store.meta("s"), lambda: store.finish("s", ttl=5)):
            with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
                await call()


async def test_wrong_password_is_unavailable_and_not_shown(private: RedisServerProcess) -> None:
    url = private.url.replace(PASSWORD, "wrong-" + PASSWORD)
    store = RedisStore(url, prefix="t:", op_timeout=0.5)
    with pytest.raises(StoreUnavailable) as info:
        await store.start(lambda m: None)
    assert PASSWORD not in str(info.value)
    await store.close()


# ---------------------------------------------------------------------------- lifecycle


async def test_close_leaves_no_tasks_and_is_idempotent(private: RedisServerProcess) -> None:
    before = other_tasks()
    store = RedisStore(private.url, prefix="t:")
    await store.start(lambda m: None)
    await store.create("s", principal="p", alias="a", node="n", ttl=5)
    reader = asyncio.create_task(store.read("s", 0, block=0.1))
    assert await reader == []
    assert len(other_tasks() - before) == 1  # the listener
    await store.close()
    await store.close()
    assert other_tasks() == before
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.meta("s")

    # close() while Redis is down and the listener is retrying: prompt, no error, no task left
    store = RedisStore(private.url, prefix="t:", op_timeout=0.5)
    await store.start(lambda m: None)
    private.stop()
    await wait_for(lambda: store._reconnect_attempts >= 1, "the listener to start retrying")
    await asyncio.wait_for(store.close(), 2)
    assert other_tasks() == before


async def test_start_twice_is_an_error(store: RedisStore) -> None:
    with pytest.raises(RuntimeError):
        await store.start(lambda m: None)


async def test_a_thousand_streams_worth_of_concurrent_commands_and_blocking_reads(
        shared_url: str, prefix: str) -> None:
    """1,000 streams on one relay mirror and follow at once: commands wait their turn for a
    pooled connection instead of failing, and every follower's blocking read gets a
    connection of its own. redis-py's pools stop at 100 connections by default: the 101st
    concurrent command raised MaxConnectionsError (StoreUnavailable here, at once), which in
    a 1,000-stream benchmark made streams unresumable.

    The operation timeout is not under test here (tests above pin it), so it is far above
    what opening 300 connections takes: with the default 2 s, a loaded machine (load
    average 10+, the shared Redis busy with other suites) failed this test by the clock
    ("read failed (no answer in time)"), with no connection refused."""
    async with started(shared_url, prefix, op_timeout=60.0) as (store, _):
        await store.create("k", principal="p", alias="a", node="n", ttl=30)
        metas = await asyncio.gather(*(store.meta("k") for _ in range(1000)))
        assert all(m is not None and m.principal == "p" for m in metas)
        reads = [asyncio.create_task(store.read("k", 0, block=0.3)) for _ in range(300)]
        assert all(r == [] for r in await asyncio.gather(*reads))


# ---------------------------------------------------------------------------- AI SDK chats


async def test_expire_chats_sets_the_expiry_only_of_records_that_still_name_the_stream(
        store: RedisStore, raw: Redis) -> None:
    """A chat record expires with its stream: ``expire_chats`` sets its TTL, unless the chat
    has moved on to a newer response (a stream key that merely starts the same is another
    stream)."""
    await store.set_chat("ip:1 owner", "chat-a", ChatRecord("K1", "msg_a"), ttl=600)
    await store.set_chat("ip:1 owner", "chat-b", ChatRecord("K2", "msg_b"), ttl=600)
    await store.set_chat("ip:1 owner", "chat-c", ChatRecord("K10", "msg_c"), ttl=600)
    await store.expire_chats([("ip:1 owner", "chat-a", "K1"), ("ip:1 owner", "chat-b", "K9"),
                              ("ip:1 owner", "chat-c", "K1"), ("ip:1 owner", "absent", "K1")],
                             ttl=2.0)
    ttl = {chat: await raw.pttl(store._chat_key("ip:1 owner", chat))
           for chat in ("chat-a", "chat-b", "chat-c", "absent")}
    assert 0 < ttl["chat-a"] <= 2000
    assert 590_000 < ttl["chat-b"] <= 600_000 and 590_000 < ttl["chat-c"] <= 600_000
    assert ttl["absent"] == -2                              # not created by expire_chats
    assert await store.get_chat("ip:1 owner", "chat-a") == ChatRecord("K1", "msg_a")
    await store.expire_chats([], ttl=1.0)                   # nothing to do, no round trip


def test_a_chat_record_has_one_encoding_and_reads_back_unchanged() -> None:
    """``ChatRecord.encode`` is what Redis holds (``_EXPIRE_CHATS`` matches its stream-key
    prefix); ``decode`` is its inverse."""
    record = ChatRecord("k" * 32, "msg_0123456789abcdef01234567")
    assert record.encode() == f"{record.stream_key} {record.message_id}"
    assert ChatRecord.decode(record.encode()) == record
