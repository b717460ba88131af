"""``ChainStore`` (relay.runtime.responses): what ``previous_response_id`` finds, and its
bounds: per connection without Redis, per principal in count and bytes, in total."""

from __future__ import annotations

from relay.runtime.responses import ChainStore

ONE = [{"role": "user", "content": "x" * 100}]


def store(**bounds: int) -> ChainStore:
    bounds.setdefault("max_entries", 100)
    bounds.setdefault("max_bytes", 10_000)
    return ChainStore(ttl=60, **bounds)


async def test_an_entry_is_its_owners_without_redis_and_freed_with_it():
    chains, mine, other = store(), object(), object()
    chains.put("p", mine, "resp_1", "demo", ONE)
    assert await chains.get("p", mine, "resp_1") == ("demo", ONE)
    assert await chains.get("p", other, "resp_1") is None          # another connection
    assert await chains.get("q", mine, "resp_1") is None           # another principal
    chains.drop_owner("p", mine)
    assert await chains.get("p", mine, "resp_1") is None
    assert chains.bytes_held() == 0


async def test_the_oldest_go_first_past_the_count_and_the_bytes_of_a_principal():
    owner = object()
    chains = store(max_entries=3)
    for i in range(5):
        chains.put("p", owner, f"resp_{i}", "demo", ONE)
    assert [await chains.get("p", owner, f"resp_{i}") is not None for i in range(5)] == [
        False, False, True, True, True]
    size = chains.bytes_held() // 3
    chains = store(max_bytes=2 * size + 1)
    for i in range(3):
        chains.put("p", owner, f"resp_{i}", "demo", ONE)
    assert await chains.get("p", owner, "resp_0") is None
    assert chains.bytes_held() == 2 * size
    chains.put("p", owner, "resp_big", "demo", [{"role": "user", "content": "x" * 20_000}])
    assert await chains.get("p", owner, "resp_big") is None        # larger than the bound
    assert chains.bytes_held() == 2 * size


async def test_every_principal_together_is_bounded_too():
    owner = object()
    chains = store()
    chains.put("p0", owner, "resp_x", "demo", ONE)
    size = chains.bytes_held()
    chains = store(max_total_bytes=3 * size)
    for i in range(5):
        chains.put(f"p{i}", owner, f"resp_{i}", "demo", ONE)
    assert chains.bytes_held() == 3 * size
    assert [await chains.get(f"p{i}", owner, f"resp_{i}") is not None for i in range(5)] == [
        False, False, True, True, True]

