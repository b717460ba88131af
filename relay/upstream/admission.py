"""Opening provider requests a few per event-loop turn, behind the streams already running.

Opening a stream is the most expensive thing the relay does for it (~300-500 us of CPU on
the fast path: LiteLLM builds the request, httpx and aiohttp send it; milliseconds on
LiteLLM's path), while relaying a token costs ~10-80 us. When a burst of ``start`` frames
arrives (1,000 clients reconnecting after a deploy, a batch job fanning out), every opening
is ready at once: the event loop runs them all in one turn, and every token of every running
stream that arrived meanwhile waits until they are done (hundreds of milliseconds measured,
bench/capacity.py at 1,000 streams).

``OpenGate`` bounds that: at most ``per_turn`` openings start in one loop turn; the others
wait in arrival order (FIFO) for later turns. Between two turns the loop polls its sockets,
so running streams' tokens are relayed between every few openings. A burst therefore costs
the streams that are running a few milliseconds per turn instead of the whole burst, and the
openings themselves take as long as the CPU they need (they are delayed, never refused, and a
lone start is admitted at once, in its own turn).

The gate is per event loop (``gate()``) and sans timers: a turn is one pass of the loop's
ready queue (``call_soon`` runs in the next one, after the loop polled for I/O). It covers
only the synchronous start of an opening (building and sending the request): waiting for the
provider's answer happens outside it, so a slow provider never holds the gate.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque

__all__ = ["OpenGate", "PER_TURN", "gate"]

#: Openings admitted per loop turn: ~8 x 300-500 us keeps a turn to a few milliseconds on the
#: fast path, while a burst of 1,000 is through in ~125 turns.
PER_TURN = 8


class OpenGate:
    """Admits at most ``per_turn`` openings per event-loop turn, first come first served.

    Use ``await gate.admit()`` right before the synchronous work of an opening. Cancelling a
    waiting ``admit()`` withdraws it (the slot goes to the next waiter)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, per_turn: int = PER_TURN) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be at least 1")
        self._loop = loop
        self.per_turn = per_turn
        self._admitted = 0                  # admitted in the current turn
        self._turn_scheduled = False
        self._waiting: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        """Openings waiting for a later turn."""
        return len(self._waiting)

    async def admit(self) -> None:
        """Return when this opening may start (at once if this turn still has room)."""
        if not self._waiting and self._admitted < self.per_turn:
            self._take_slot()
            return
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        self._schedule_turn()
        try:
            await waiter
        except asyncio.CancelledError:
            # Withdrawn while waiting. (Cancelled after its admission: that turn's slot
            # stays used, which costs nothing but one opening's place in that turn.)
            if not waiter.done():
                waiter.cancel()
            raise

    def _take_slot(self) -> None:
        self._admitted += 1
        self._schedule_turn()

    def _schedule_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._turn_scheduled = False
        self._admitted = 0
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiting = self._waiting
        while waiting and self._admitted < self.per_turn:
            waiter = waiting.popleft()
            if waiter.done():
                continue
            waiter.set_result(None)
            self._admitted += 1
        if waiting or self._admitted:
            self._schedule_turn()


_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gate() -> OpenGate:
    """The running event loop's gate."""
    loop = asyncio.get_running_loop()
    found = _gates.get(loop)
    if found is None:
        found = _gates[loop] = OpenGate(loop)
    return found
