"""Abuse limits: token buckets and per-principal accounting.

A *principal* is who a connection acts for: the authenticated subject when auth is on,
else the client's address (``X-Forwarded-For`` only from trusted proxies). Limits:

* connections per server and per principal -> close 4429 after the handshake
* connections that have not completed ``hello`` yet, per client address and in total
  (:class:`PendingConnections`) -> close 4429 after the handshake
* concurrent streams per principal -> ``too_many_streams``
* ``start`` rate per principal (token bucket; default by mode, :func:`start_rate_limit`) ->
  ``rate_limited`` with ``retry_after``
* inbound frames per connection (token bucket) -> close 4429
* completion tokens per principal per hour (optional, :class:`CompletionBudget`) ->
  ``rate_limited`` with ``retry_after`` at ``start``
* events replayed by ``resume`` (``/ws`` and ``/ai-sdk``) per principal (token bucket,
  :meth:`Principals.charge_replay`) -> ``rate_limited`` with ``retry_after`` for that resume;
  kept across connections, so reconnecting to resume again is no way around it

All state is in-process and only touched from the event loop thread.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["REPLAY_EVENTS_PER_SECOND", "REPLAY_EVENT_BURST", "CompletionBudget", "PendingConnections", "PrincipalState", "Principals",
           "TokenBucket", "start_rate_limit"]

#: With ``--auth``, the start rate of a principal unless configured: generous, so that one
#: well-behaved user (an agent fanning out into 100 parallel streams) is never refused.
AUTH_START_RATE_PER_MINUTE = 600.0
AUTH_START_BURST = 100

#: Replayed events (frames of a stream's log sent again by a ``resume``) a principal may
#: have replayed per second, and the bucket's size: five replays of a 20,000-token answer
#: at once, then one such replay every ten seconds (~8 ms of the loop per second at most).
#: A user reloading a page a few times a minute never meets it.
REPLAY_EVENTS_PER_SECOND = 2_000.0
REPLAY_EVENT_BURST = 100_000


def start_rate_limit(rate_per_minute: float | None, burst: int | None,
                     auth: bool) -> tuple[float | None, int | None]:
    """The start token bucket of every principal as ``(rate per minute, burst)``, from the
    settings (``None`` = not configured); ``(None, None)`` means no start rate at all.

    * nothing configured: no start rate without auth (the principal is an address, shared by
      every user behind one NAT; the connection and stream caps still hold), and
      600/min, burst 100 with auth;
    * one of the two configured: the other follows from it, a burst being ten seconds' worth
      of the rate (so rate 60/min gives burst 10, burst 10 gives 60/min)."""
    if rate_per_minute is None and burst is None:
        return (AUTH_START_RATE_PER_MINUTE, AUTH_START_BURST) if auth else (None, None)
    if rate_per_minute is None:
        assert burst is not None
        rate_per_minute = burst * 6.0
    if burst is None:
        burst = max(1, math.ceil(rate_per_minute / 6.0))
    return rate_per_minute, burst


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``. ``take`` never blocks."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def can_take(self, n: float = 1.0) -> bool:
        """Whether ``take(n)`` would succeed now; changes nothing (the connection machine
        asks, the runtime takes: ``ChargeStart``)."""
        return min(self.burst, self._tokens + (time.monotonic() - self._at) * self.rate) >= n

    @property
    def full(self) -> bool:
        elapsed = time.monotonic() - self._at
        return self._tokens + elapsed * self.rate >= self.burst

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``take(n)`` can succeed (after a failed take)."""
        missing = n - self._tokens
        return round(max(0.0, missing / self.rate), 3) if self.rate > 0 else float("inf")


class CompletionBudget:
    """Completion tokens a principal may use in any sliding window of ``window`` seconds
    (one hour). ``start`` is refused while the window is full; a stream that runs is charged
    its ``finish.usage.completion_tokens`` when it ends (so one stream may overshoot)."""

    __slots__ = ("limit", "window", "_clock", "_charges", "_used")

    def __init__(self, limit: int, window: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._charges: deque[tuple[float, int]] = deque()  # (when, tokens), oldest first
        self._used = 0

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        charges = self._charges
        while charges and charges[0][0] <= horizon:
            self._used -= charges.popleft()[1]

    @property
    def used(self) -> int:
        self._expire(self._clock())
        return self._used

    def charge(self, tokens: int) -> None:
        if tokens > 0:
            now = self._clock()
            self._expire(now)
            self._charges.append((now, tokens))
            self._used += tokens

    def retry_after(self) -> float:
        """0 while there is budget left, else seconds until enough of it is freed."""
        now = self._clock()
        self._expire(now)
        if self._used < self.limit:
            return 0.0
        used = self._used
        for when, tokens in self._charges:  # oldest first: the order they leave the window
            used -= tokens
            if used < self.limit:
                return round(max(0.001, when + self.window - now), 3)
        return self.window  # not reached: with every charge gone, used is 0

    @property
    def idle(self) -> bool:
        return self.used == 0


@dataclass
class PrincipalState:
    connections: int = 0
    streams: int = 0
    starts: TokenBucket | None = None
    budget: CompletionBudget | None = None
    replays: TokenBucket | None = None
    last_seen: float = field(default_factory=time.monotonic)


class Principals:
    """Per-principal counters; entries without connections are dropped.

    ``start_rate_per_minute`` None: no start rate (``PrincipalState.starts`` is None);
    ``replay_events_per_second`` None: no replay budget (``PrincipalState.replays``)."""

    def __init__(self, start_rate_per_minute: float | None, start_burst: int | None,
                 completion_token_budget_per_hour: int | None = None,
                 replay_events_per_second: float | None = None,
                 replay_event_burst: int = REPLAY_EVENT_BURST) -> None:
        self._rate = start_rate_per_minute / 60.0 if start_rate_per_minute is not None else None
        self._burst = start_burst if start_burst is not None else 1
        self._budget = completion_token_budget_per_hour
        self._replay_rate = replay_events_per_second
        self._replay_burst = replay_event_burst
        self._states: dict[str, PrincipalState] = {}
        self.total_connections = 0

    def get(self, principal: str) -> PrincipalState:
        state = self._states.get(principal)
        if state is None:
            state = PrincipalState(starts=TokenBucket(self._rate, self._burst)
                                   if self._rate is not None else None)
            if self._budget is not None:
                state.budget = CompletionBudget(self._budget)
            if self._replay_rate is not None:
                state.replays = TokenBucket(self._replay_rate, self._replay_burst)
            self._states[principal] = state
        return state

    def connections_of(self, principal: str) -> int:
        """Open connections of ``principal`` (``relay.core.connection.PrincipalsView``)."""
        state = self._states.get(principal)
        return state.connections if state is not None else 0

    def state_of(self, principal: str) -> PrincipalState:
        """``principal``'s state (``relay.core.connection.PrincipalsView``); counts nothing."""
        return self.get(principal)

    def move(self, previous: str, principal: str) -> PrincipalState:
        """One connection's accounting moves from ``previous`` (its address) to
        ``principal`` (authenticated): ``AdoptCredentials``, carried out by the session."""
        state = self.connect(principal)
        self.disconnect(previous)
        return state

    def connect(self, principal: str) -> PrincipalState:
        if len(self._states) > 10_000:
            self._prune()
        state = self.get(principal)
        state.connections += 1
        self.total_connections += 1
        return state

    def disconnect(self, principal: str) -> None:
        state = self._states.get(principal)
        if state is None:
            return
        state.connections -= 1
        self.total_connections -= 1
        self._prune_one(principal, state)

    def _prune_one(self, principal: str, state: PrincipalState) -> None:
        # Forget an idle principal only once its start and replay buckets have refilled and
        # its token budget is unused, so that reconnecting is no way around any of them.
        if (state.connections <= 0 and state.streams <= 0
                and (state.starts is None or state.starts.full)
                and (state.replays is None or state.replays.full)
                and (state.budget is None or state.budget.idle)):
            del self._states[principal]

    @staticmethod
    def charge_replay(state: PrincipalState, events: int) -> float | None:
        """Charge a replay of ``events`` events to ``state``'s replay bucket: None when paid
        (or there is no replay budget), else the seconds until it can be (``retry_after``;
        nothing is taken then). A replay larger than the whole bucket costs the whole
        bucket, so that a principal that has been quiet can always resume once."""
        bucket = state.replays
        if bucket is None or events <= 0:
            return None
        cost = min(float(events), bucket.burst)
        if bucket.take(cost):
            return None
        return max(0.001, bucket.retry_after(cost))

    def _prune(self) -> None:
        for principal, state in list(self._states.items()):
            self._prune_one(principal, state)


class PendingConnections:
    """Connections accepted but not yet past ``hello``, counted per client address and in
    total, so that sockets which never authenticate cannot fill the relay: without this
    they counted only toward ``max_connections``, and 3,000 of them from one address locked
    every authenticated user out. :meth:`enter` takes a slot (or says why not); the release
    it returns gives the slot back once (at ``hello`` or when the connection ends)."""

    def __init__(self, per_address: int, total: int) -> None:
        self.per_address = per_address
        self.total_cap = total
        self._by_address: dict[str, int] = {}
        self.total = 0

    def count(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def enter(self, address: str) -> tuple[Callable[[], None] | None, str]:
        """``(release, "")`` with a slot taken, or ``(None, reason)`` when a cap is reached."""
        if self.total >= self.total_cap:
            return None, "too many connections awaiting hello on this relay"
        if self.count(address) >= self.per_address:
            return None, "too many connections awaiting hello from this address"
        self._by_address[address] = self.count(address) + 1
        self.total += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            left = self._by_address[address] - 1
            if left:
                self._by_address[address] = left
            else:
                del self._by_address[address]

        return release, ""
