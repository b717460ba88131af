"""The opening gate (relay/upstream/admission.py): a burst of stream openings is spread over
event-loop turns, a few per turn, first come first served, so the loop polls its sockets
(running streams' tokens) between them. Turns are counted on the real loop by a callback that
re-schedules itself with ``call_soon`` (one step per turn); no timing is asserted."""

from __future__ import annotations

import asyncio

import pytest

from relay.streamer import TokenStreamer
from relay.upstream import admission

from .test_streamer import MSGS, ScriptedResponse, chunk, scripted


class TurnCounter:
    """Counts loop turns: one ``call_soon`` step per turn, as the gate's own turns."""

    def __init__(self) -> None:
        self.turn = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_a_burst_is_admitted_a_few_per_turn_in_arrival_order():
    gate = admission.OpenGate(asyncio.get_running_loop(), per_turn=4)
    turns = TurnCounter()
    admitted: list[tuple[int, int]] = []          # (opening, turn it was admitted in)

    async def opening(i: int) -> None:
        await gate.admit()
        admitted.append((i, turns.turn))

    try:
        await asyncio.gather(*(opening(i) for i in range(22)))
    finally:
        turns.stop()
    assert [i for i, _ in admitted] == list(range(22))          # first come, first served
    per_turn: dict[int, int] = {}
    for _, turn in admitted:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    assert max(per_turn.values()) <= 4
    assert len(per_turn) >= 6                                   # 22 openings, 4 a turn
    assert gate.waiting == 0


async def test_a_lone_opening_is_admitted_at_once_and_a_full_turn_defers_the_next():
    gate = admission.OpenGate(asyncio.get_running_loop(), per_turn=2)
    turns = TurnCounter()
    admitted: list[tuple[int, int]] = []

    async def opening(i: int) -> None:
        await gate.admit()
        admitted.append((i, turns.turn))

    try:
        before = turns.turn
        await gate.admit()
        assert turns.turn == before                 # no wait: the turn had room
        await asyncio.sleep(0)
        await asyncio.gather(*(opening(i) for i in range(3)))
    finally:
        turns.stop()
    (_, t0), (_, t1), (_, t2) = admitted
    assert t0 == t1 < t2                            # the third waited for the next turn


async def test_a_cancelled_waiter_is_withdrawn_and_the_others_still_get_through():
    gate = admission.OpenGate(asyncio.get_running_loop(), per_turn=1)
    order: list[str] = []

    async def opening(name: str) -> None:
        await gate.admit()
        order.append(name)

    # All four start in the same turn: the first takes its only opening, three wait.
    tasks = {n: asyncio.ensure_future(opening(n)) for n in ("first", "a", "b", "c")}
    await asyncio.sleep(0)
    assert gate.waiting == 3
    tasks["b"].cancel()
    await asyncio.gather(tasks["first"], tasks["a"], tasks["c"])
    with pytest.raises(asyncio.CancelledError):
        await tasks["b"]
    assert order == ["first", "a", "c"]
    assert gate.waiting == 0


def test_per_turn_must_admit_something():
    with pytest.raises(ValueError):
        admission.OpenGate(asyncio.new_event_loop(), per_turn=0)


async def test_the_gate_is_one_per_event_loop():
    assert admission.gate() is admission.gate()
    assert admission.gate().per_turn == admission.PER_TURN


async def test_a_stream_cancelled_while_waiting_at_the_gate_never_calls_the_provider():
    gate = admission.gate()
    count = gate.per_turn + 1
    calls: list[dict] = []
    responses = [ScriptedResponse([chunk("a")], hang_after=1) for _ in range(count)]
    streamers = [TokenStreamer("openai/x", completion=scripted(r, calls)) for r in responses]
    ends: list = [None] * count

    async def consume(i: int) -> None:
        async for event in streamers[i].events(MSGS):
            ends[i] = event

    # All start in the same turn: a turn's worth of openings go ahead, the last one waits.
    tasks = [asyncio.ensure_future(consume(i)) for i in range(count)]
    await asyncio.sleep(0)
    assert gate.waiting == 1
    streamers[-1].cancel()
    await tasks[-1]
    assert ends[-1].status == "cancelled" and gate.waiting == 0
    for streamer in streamers[:-1]:
        streamer.cancel()
    await asyncio.gather(*tasks[:-1])
    assert len(calls) == count - 1                  # the cancelled one never sent its request
    assert not responses[-1].chunks


async def test_streams_opened_in_a_burst_all_complete_through_the_gate():
    calls: list[dict] = []

    async def one(i: int) -> list:
        resp = ScriptedResponse([chunk(f"t{i}", finish="stop")])
        streamer = TokenStreamer("openai/x", completion=scripted(resp, calls))
        return [e async for e in streamer.events(MSGS)]

    results = await asyncio.gather(*(one(i) for i in range(3 * admission.PER_TURN + 1)))
    assert len(calls) == 3 * admission.PER_TURN + 1
    assert all(r[-1].status == "completed" for r in results)
