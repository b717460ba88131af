"""Per-principal limits shared by two relays on a real Redis (relay.cluster.shared_limits): the
stream cap (setting and token claim), the start rate and the completion token budget hold
for the principal across relays; while Redis is down each relay falls back to its own."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from relay.core.auth import mint_token

from ..redis_server import RedisServerProcess
from .helpers import Client, eventually
from .test_auth import SECRET, hello
from .test_multinode import MESSAGES, SHARED_REDIS, prefix, two_relays  # noqa: F401 (fixture)


async def _started(c: Client, id: str, **fields) -> dict:
    await c.start(id, **fields)
    frame = await c.next_for(id)
    assert frame["type"] == "started", frame
    return frame


async def _refused(c: Client, id: str, **fields) -> dict:
    await c.start(id, **fields)
    frame = await c.next_for(id)
    assert frame["type"] == "error", frame
    return frame


async def _cancel(c: Client, *ids: str) -> None:
    for id in ids:
        await c.send({"type": "cancel", "id": id})
    for id in ids:
        assert (await c.collect(id))[-1]["type"] == "finish"


async def _released(*relays) -> None:
    """Every stream admitted on these relays has ended and its lease removal is in Redis."""
    for relay in relays:
        await eventually(lambda: relay.shared_limits.leases == 0)
        await relay.shared_limits.flush()


async def test_token_max_streams_claim_holds_across_two_relays(prefix):
    token = mint_token(SECRET, "alice", 300, max_streams=1)
    async with two_relays(SHARED_REDIS, prefix, auth=True, token_secret=SECRET,
                          demo_tps=2) as (a, b):
        async with Client.connect(a.url, hello=False) as ca, \
                Client.connect(b.url, hello=False) as cb:
            for c in (ca, cb):
                await c.send(hello(token))
                assert (await c.recv())["type"] == "welcome"
            await _started(ca, "1")
            err = await _refused(cb, "2")
            assert (err["code"], err["id"]) == ("too_many_streams", "2")
            assert err["message"] == "at most 1 concurrent streams for this token"
            await _cancel(ca, "1")
            await _released(a)
            await cb.start("3", params={"max_tokens": 1})
            assert (await cb.collect("3"))[-1]["status"] == "completed"


async def test_streams_per_principal_setting_holds_across_two_relays(prefix):
    async with two_relays(SHARED_REDIS, prefix, max_streams_per_principal=2,
                          demo_tps=2) as (a, b):
        async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
            await _started(ca, "1")
            await _started(cb, "2")
            for c, id in ((cb, "3"), (ca, "4")):
                err = await _refused(c, id)
                assert (err["code"], err["message"]) == (
                    "too_many_streams", "at most 2 concurrent streams per principal")
            await _cancel(ca, "1")
            await _released(a)
            await _started(cb, "5")
            await _cancel(cb, "2", "5")


async def test_start_rate_is_shared_by_two_relays(prefix):
    async with two_relays(SHARED_REDIS, prefix, start_burst=2,
                          start_rate_per_minute=6) as (a, b):
        async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
            for c, id in ((ca, "a"), (cb, "b")):
                await c.start(id, params={"max_tokens": 1})
                assert (await c.collect(id))[-1]["status"] == "completed"
            for c, id in ((ca, "c"), (cb, "d")):
                err = await _refused(c, id)
                assert err["code"] == "rate_limited" and 0 < err["retry_after"] <= 10, err


async def test_token_budget_is_charged_as_it_streams_and_shared_by_two_relays(prefix):
    """A stream running on relay A has streamed more than the budget: a start on relay B is
    refused before that stream finishes (charges reach Redis as tokens stream)."""
    async with two_relays(SHARED_REDIS, prefix, completion_token_budget_per_hour=40,
                          demo_tps=20) as (a, b):
        async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
            await _started(ca, "long", messages=MESSAGES)        # a 56-token reply
            tokens = 0
            while tokens <= 40:
                frame = await ca.next_for("long")
                assert frame["type"] == "token", frame
                tokens += 1
            await a.shared_limits.flush()
            err = await _refused(cb, "x", params={"max_tokens": 1})
            # The charge counts until its one-minute slot has left the hour.
            assert err["code"] == "rate_limited" and 3500 < err["retry_after"] <= 3660, err
            assert "40" in err["message"]
            assert a.hub.streams()[0].running        # refused while "long" still streams
            await _cancel(ca, "long")


async def test_token_budget_across_two_relays_is_exceeded_only_by_the_streams_in_flight(prefix):
    """Budget 40: two 30-token streams admitted together on A and B both run to their end
    (60 tokens: what was in flight when the budget was reached), and then every start on
    either relay is refused. Redis holds exactly the tokens the finishes reported."""
    async with two_relays(SHARED_REDIS, prefix, completion_token_budget_per_hour=40,
                          demo_tps=30) as (a, b):
        async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
            await _started(ca, "1", messages=MESSAGES, params={"max_tokens": 30})
            await _started(cb, "2", messages=MESSAGES, params={"max_tokens": 30})
            used = 0
            for c, id in ((ca, "1"), (cb, "2")):
                finish = (await c.collect(id))[-1]
                assert finish["status"] == "completed"
                used += finish["usage"]["completion_tokens"]
            assert used == 60
            await _released(a, b)
            for c, id in ((ca, "3"), (cb, "4"), (ca, "5")):
                assert (await _refused(c, id, params={"max_tokens": 1}))["code"] == \
                    "rate_limited"
            principal = next(iter(a.sessions)).principal
        async with Redis.from_url(SHARED_REDIS) as raw:
            slots = await raw.hvals(f"{prefix}limits:budget:{principal}")
        assert sum(int(v) for v in slots) == used


async def test_redis_down_each_relay_falls_back_to_its_own_limits_and_warns_once(caplog):
    """Cap 2 per principal. Shared: A runs 2, B refuses. Redis stops: B admits up to its own
    cap of 2 (local limits), one warning per relay. Redis restarts empty: the heartbeats
    write every running stream's lease back, and B refuses again although it runs none."""
    caplog.set_level(logging.INFO, logger="relay")
    redis = RedisServerProcess()
    redis.start()
    try:
        async with two_relays(redis.url, "t:", max_streams_per_principal=2,
                              demo_tps=2) as (a, b):
            async with Client.connect(a.url) as ca, Client.connect(b.url) as cb:
                await _started(ca, "a1")
                await _started(ca, "a2")
                assert (await _refused(cb, "b0"))["code"] == "too_many_streams"
                redis.stop()
                await _started(cb, "b1")
                await _started(cb, "b2")
                assert (await _refused(cb, "b3"))["code"] == "too_many_streams"  # B's own cap
                assert (await _refused(ca, "a3"))["code"] == "too_many_streams"  # A's own cap
                assert b.shared_limits.outage
                redis.start()
                await eventually(lambda: not a.shared_limits.outage
                                 and not b.shared_limits.outage)
                await _cancel(cb, "b1", "b2")
                await _released(b)
                # A's two leases were written back to the new, empty Redis.
                err = await _refused(cb, "b4")
                assert err["message"] == "at most 2 concurrent streams per principal"
                await _cancel(ca, "a1", "a2")
    finally:
        redis.close()
    records = [r for r in caplog.records if r.name == "relay.cluster.shared_limits"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]   # one per relay
    assert len({id(r) for r in warnings}) == len(warnings)
    assert any("shared again" in r.getMessage() for r in records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_budget_charges_leave_the_window_slot_by_slot(prefix):
    """The shared sliding window itself, with a 1.2 s window (60 slots of 20 ms) instead of
    the hour: used up -> refused with a retry_after within the window plus one slot, and
    admitted again once the charges have left it."""
    from relay.core.errors import RateLimited
    from relay.core.limits import CompletionBudget
    from relay.cluster.redis_store import RedisStore
    from relay.cluster.shared_limits import SharedLimits

    store = RedisStore(SHARED_REDIS, prefix=prefix)
    limits = SharedLimits(store, "node-t", lease=5, budget_window=1.2)
    budget = CompletionBudget(10)

    async def admit():
        return await limits.admit("p", stream_cap=100, scope="per principal", starts=None,
                                  budget=budget)

    try:
        first = await admit()
        first.charge(4)
        first.release(10)                 # topped up to the finish's 10
        await limits.flush()
        loop = asyncio.get_running_loop()
        charged_at = loop.time()
        with pytest.raises(RateLimited) as refused:
            await admit()
        assert 0 < refused.value.retry_after <= 1.22
        async with asyncio.timeout(10):
            while True:
                try:
                    (await admit()).release(None)
                    break
                except RateLimited:
                    await asyncio.sleep(0.05)    # retry pace of a bounded wait
        assert loop.time() - charged_at >= 1.0   # not before (about) the window has passed
        await limits.flush()
    finally:
        await limits.close()
        await store.close()


async def test_the_replay_budget_is_shared_by_two_relays(prefix):
    """A principal's replayed events are counted for the group: a 2,000-token answer
    resumed (from its start, on a new connection) on relay A takes 2,0xx of the 3,000 events
    of its bucket; resuming it again on relay B, whose own bucket is full, is refused
    ``rate_limited`` with ``retry_after``, and the connection stays."""
    words = " ".join(f"w{i}" for i in range(2000))
    async with two_relays(SHARED_REDIS, prefix, detach_grace=30, replay_events_per_second=1,
                          replay_event_burst=3_000) as (a, b):
        async with Client.connect(a.url) as c:
            await c.start("long", content=words)
            frames = await c.collect("long")
        assert frames[-1]["status"] == "completed"
        key = frames[0]["stream_key"]
        await eventually(lambda: not a.hub.get(key).running)
        resume = {"type": "resume", "stream_key": key, "after_seq": 0, "id": "again"}
        async with Client.connect(a.url) as c:
            await c.send(resume)
            assert (await c.next_for("again"))["type"] == "resumed"
            assert (await c.collect("again"))[-1]["type"] == "finish"
        async with Client.connect(b.url) as c:
            await c.send(resume)
            err = await c.next_for("again")
            assert (err["type"], err["code"], err["ref"]) == ("error", "rate_limited", "resume")
            assert err["retry_after"] > 0
            await c.send({"type": "ping"})
            assert (await c.next_for(None))["type"] == "pong"
