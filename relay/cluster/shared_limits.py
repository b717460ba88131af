"""Per-principal limits shared by the relays of a group on Redis (``--redis``).

Without Redis each limit of relay.core.limits lives in one process, so a principal talking to N
relays got each limit N times. With ``--redis``, ``Session`` calls :meth:`SharedLimits.admit`
at every ``start`` that passed the local checks, right before the stream is launched. One
atomic Lua script then checks, in this order, for the principal:

1. the completion token budget (when ``--token-budget`` is set): refused while the tokens
   charged within the window reach it -> ``rate_limited``, ``retry_after`` = seconds until
   enough of them leave the window;
2. the start rate (when the principal has one): its token bucket -> ``rate_limited`` with
   ``retry_after``;
3. concurrent streams: refused when ``stream_cap`` leases are live -> ``too_many_streams``;

(A ``resume`` that passed the local replay budget pays its replayed events from the
principal's group bucket the same way: :meth:`SharedLimits.take_replay`.)

and, when all three pass, takes a start token and adds a *lease* for the new stream. A
refused start costs nothing in Redis. The local checks stay in front (the counts of one relay
never exceed the group's), so they are also the fallback when Redis is unreachable.

The admitted stream carries a :class:`SharedStream`; the hub calls ``charge(1)`` for every
chunk it streams (token, reasoning or tool call chunk) and ``release(completion_tokens)``
when the stream ends, which tops the charges up to the finish's ``usage.completion_tokens``
(never refunds) and removes the lease.

Keys (``P`` = the store's prefix, ``U`` = the principal; every time is Redis' own clock,
``TIME``, so the relays' clocks need not agree)::

    P limits:streams:U  zset  one member per running stream ("<node>/<n>"),
                              score = lease expiry (ms); expired members do not count
    P limits:starts:U   hash  the start token bucket: tokens, at (ms); expires when full
    P limits:budget:U   hash  window slot index -> completion tokens charged in that slot
    P limits:replays:U  hash  the replay token bucket (events): tokens, at (ms); expires
                              when full

Leases: this relay rewrites the leases of its running streams every ``lease / 3`` seconds
(a heartbeat) and removes a stream's lease when it ends. A relay that dies stops the
heartbeat, so its streams stop counting at most ``lease`` seconds (``--redis-owner-ttl``,
6 s) after its death.

Budget window: 60 slots of ``window / 60`` (one minute for the hour). A charge counts until
its whole slot has left the window: between 60 and 61 minutes, never less.

Charges are batched: written at most ``_FLUSH_INTERVAL`` (0.1 s) after the chunk streamed.
What the group guarantees therefore: once a principal's charged tokens reach the budget,
every later ``start`` on every relay is refused; the budget can be exceeded only by the
streams already running then (each runs to its end, as on a single relay) and by starts
admitted within the charge delay.

Redis unreachable (or not answering within the store's ``op_timeout``): admission falls back
to the local limits alone and one WARNING is logged per outage (recovery at INFO). While the
outage lasts, admissions do not wait for Redis; the heartbeat probes it every ``lease / 3``
seconds. Charges are kept and written once Redis answers again, and the heartbeat writes the
leases of every running stream back (also after a Redis restart lost them). A lease removal
that fails is dropped: the lease expires by itself within ``lease``.

Everything here runs on the event loop thread; no locks beyond the one that keeps the
background writes in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING

from relay.core.errors import RateLimited, TooManyStreams
from relay.cluster.redis_store import StoreUnavailable
from relay.aio import cancel_and_wait

if TYPE_CHECKING:
    from relay.core.limits import CompletionBudget, TokenBucket
    from relay.cluster.redis_store import RedisStore

__all__ = ["SharedLimits", "SharedStream"]

logger = logging.getLogger("relay.cluster.shared_limits")

# Charges of the next 0.1 s go out in one write (token rates are far above 10/s).
_FLUSH_INTERVAL = 0.1
# Keys per heartbeat script call, so that one call stays short for Redis.
_REFRESH_CHUNK = 500
_BUDGET_SLOTS = 60

# Redis' clock in ms. replicate_commands(): Redis 5/6 only allow writes after TIME in
# effect-replicated scripts (Redis 7 always replicates effects; the call is a no-op there).
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: streams zset, starts hash, budget hash
# ARGV: member, lease ms, stream cap, start rate (tokens/ms; 0 = none), burst,
#       budget (0 = none), window ms, slot ms
_ADMIT = _NOW + """
local limit = tonumber(ARGV[6])
if limit > 0 then
  local window, slot_ms = tonumber(ARGV[7]), tonumber(ARGV[8])
  local horizon = now - window
  local raw = redis.call('HGETALL', KEYS[3])
  local slots, used = {}, 0
  for i = 1, #raw, 2 do
    local slot, tokens = tonumber(raw[i]), tonumber(raw[i + 1])
    if (slot + 1) * slot_ms <= horizon then
      redis.call('HDEL', KEYS[3], raw[i])
    else
      used = used + tokens
      slots[#slots + 1] = {slot, tokens}
    end
  end
  if used >= limit then
    table.sort(slots, function(a, b) return a[1] < b[1] end)
    for _, s in ipairs(slots) do           -- oldest first: the order they leave the window
      used = used - s[2]
      if used < limit then
        return {'budget', (s[1] + 1) * slot_ms + window - now}
      end
    end
    return {'budget', window}
  end
end
local rate, burst, tokens = tonumber(ARGV[4]), tonumber(ARGV[5]), 0
if rate > 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'at')
  tokens = tonumber(b[1])
  local at = tonumber(b[2])
  if tokens == nil or at == nil then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  end
  if tokens < 1 then
    return {'rate', math.ceil((1 - tokens) / rate)}
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[3]) then
  return {'streams', count}
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
if rate > 0 then
  tokens = tokens - 1
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'at', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil((burst - tokens) / rate) + 1)
end
return {'ok', count + 1}
"""

# KEYS: replays hash; ARGV: rate (events/ms), burst, cost (events)
_TAKE_REPLAY = _NOW + """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]), tonumber(b[2])
if tokens == nil or at == nil then
  tokens = burst
else
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
end
if tokens < cost then
  return {'rate', math.ceil((cost - tokens) / rate)}
end
tokens = tokens - cost
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1)
return {'ok', 0}
"""

# KEYS: budget hashes; ARGV: window ms, slot ms, then the tokens for each key
_CHARGE = _NOW + """
local window, slot_ms = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot = math.floor(now / slot_ms)
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, slot, ARGV[i + 2])
  redis.call('PEXPIRE', key, window + slot_ms)
end
return #KEYS
"""

# KEYS: streams zsets; ARGV: lease ms, then the member for each key. Upsert: a lease lost
# to an outage or a Redis restart is written back.
_REFRESH = _NOW + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
end
return now
"""

# KEYS: streams zsets; ARGV: the member for each key
_RELEASE = """
for i, key in ipairs(KEYS) do
  redis.call('ZREM', key, ARGV[i])
end
return #KEYS
"""


class SharedStream:
    """One admitted stream's share of the group's limits. Called by the hub, on the loop."""

    __slots__ = ("_limits", "_member", "_streams_key", "_budget_key", "_charged", "_released")

    def __init__(self, limits: SharedLimits, member: str, streams_key: str,
                 budget_key: str | None) -> None:
        self._limits = limits
        self._member = member
        self._streams_key = streams_key
        self._budget_key = budget_key     # None: no budget configured, nothing to charge
        self._charged = 0
        self._released = False

    def charge(self, tokens: int) -> None:
        """``tokens`` streamed (one per chunk as it streams); written within 0.1 s."""
        if self._budget_key is not None and tokens > 0 and not self._released:
            self._charged += tokens
            self._limits._add_charge(self._budget_key, tokens)

    def release(self, completion_tokens: int | None) -> None:
        """The stream ended: top the charges up to ``completion_tokens`` (its finish's usage;
        None when unknown) and remove its lease. Idempotent."""
        if self._released:
            return
        if completion_tokens is not None:
            self.charge(completion_tokens - self._charged)
        self._released = True
        self._limits._release(self._member, self._streams_key)


class SharedLimits:
    """Limits of each principal held across relays through ``store`` (module docstring).

    Call order: construct (no I/O), ``await start()``, ``admit`` per start, ``await close()``
    once every stream has ended (it writes the last charges and lease removals)."""

    def __init__(self, store: RedisStore, node: str, *, lease: float,
                 budget_window: float = 3600.0) -> None:
        if not lease > 0:
            raise ValueError("lease must be > 0 seconds")
        self._store = store
        self._node = node
        self.lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._window_ms = max(_BUDGET_SLOTS, round(budget_window * 1000))
        self._slot_ms = self._window_ms // _BUDGET_SLOTS
        self._admit = store.script("limits admit", _ADMIT)
        self._take_replay = store.script("limits replay", _TAKE_REPLAY)
        self._charge = store.script("limits charge", _CHARGE)
        self._refresh = store.script("limits heartbeat", _REFRESH)
        self._remove = store.script("limits release", _RELEASE)
        self._serial = itertools.count(1)
        self._held: dict[str, str] = {}           # member -> streams key, while running
        self._releases: list[tuple[str, str]] = []
        self._charges: dict[str, int] = {}        # budget key -> tokens not written yet
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()               # background writes stay in order
        self._task: asyncio.Task | None = None
        self.outage = False                       # Redis did not answer the last exchange

    @property
    def leases(self) -> int:
        """Leases this relay holds: its streams admitted and not yet ended."""
        return len(self._held)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync(), name="shared limits")

    async def close(self) -> None:
        """Stop the heartbeat and write what is pending (best effort: Redis may be gone;
        leases left behind expire within ``lease``)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        for member, key in list(self._held.items()):
            self._release(member, key)
        with contextlib.suppress(StoreUnavailable):
            await self.flush()

    async def flush(self) -> None:
        """Write the pending charges and lease removals now (tests wait on it);
        ``StoreUnavailable`` when Redis does not answer (they stay pending)."""
        async with self._lock:
            await self._write(refresh=False)

    # ------------------------------------------------------------------ admission

    def _key(self, kind: str, principal: str) -> str:
        return self._store.key(f"limits:{kind}:{principal}")

    async def admit(self, principal: str, *, stream_cap: int, scope: str,
                    starts: TokenBucket | None, budget: CompletionBudget | None
                    ) -> SharedStream:
        """Admit one ``start`` of ``principal`` across the group, or raise the refusal:
        ``RateLimited`` (budget used up, or start rate), ``TooManyStreams`` ("at most
        ``stream_cap`` concurrent streams ``scope``"). ``starts`` and ``budget`` are the
        principal's local limits: their parameters are the group's (None: not limited).
        While Redis is unreachable the start is admitted (the local limits, checked before,
        hold) and the stream's lease is written by the first heartbeat that reaches Redis."""
        member = f"{self._node}/{next(self._serial)}"
        streams_key = self._key("streams", principal)
        budget_key = self._key("budget", principal) if budget is not None else None
        shared = SharedStream(self, member, streams_key, budget_key)
        if not self.outage:
            rate = starts.rate / 1000.0 if starts is not None else 0.0
            try:
                verdict, value = await self._admit(
                    [streams_key, self._key("starts", principal),
                     budget_key or self._key("budget", principal)],
                    [member, self._lease_ms, stream_cap, repr(rate),
                     starts.burst if starts is not None else 0,
                     budget.limit if budget is not None else 0,
                     self._window_ms, self._slot_ms])
            except StoreUnavailable as exc:
                self._failed(exc)
            else:
                self._answered()
                verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
                if verdict == "budget":
                    assert budget is not None
                    raise RateLimited(f"completion token budget of {budget.limit} per hour "
                                      "used up", retry_after=_seconds(value))
                if verdict == "rate":
                    raise RateLimited("too many starts; slow down", retry_after=_seconds(value))
                if verdict == "streams":
                    raise TooManyStreams(f"at most {stream_cap} concurrent streams {scope}")
        self._held[member] = streams_key
        return shared

    async def take_replay(self, principal: str, replays: TokenBucket,
                          cost: float) -> float | None:
        """Take ``cost`` replayed events from ``principal``'s replay bucket across the group
        (``replays``: its local bucket, whose rate and burst are the group's): None when
        taken, else ``retry_after`` in seconds (nothing taken). While Redis is unreachable
        None: the local bucket, charged before, holds alone."""
        if self.outage:
            return None
        try:
            verdict, value = await self._take_replay(
                [self._key("replays", principal)],
                [repr(replays.rate / 1000.0), replays.burst, repr(float(cost))])
        except StoreUnavailable as exc:
            self._failed(exc)
            return None
        self._answered()
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        return _seconds(value) if verdict == "rate" else None

    # ------------------------------------------------------------------ background writes

    def _add_charge(self, budget_key: str, tokens: int) -> None:
        self._charges[budget_key] = self._charges.get(budget_key, 0) + tokens
        self._wake.set()

    def _release(self, member: str, streams_key: str) -> None:
        if self._held.pop(member, None) is not None:
            self._releases.append((streams_key, member))
            self._wake.set()

    async def _sync(self) -> None:
        """Heartbeat every lease/3 s; charges and releases as they come (batched)."""
        loop = asyncio.get_running_loop()
        period = self.lease / 3
        next_beat = loop.time() + period
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_beat - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            beat = loop.time() >= next_beat
            if beat:
                next_beat = loop.time() + period
            elif self.outage:
                continue                          # only the heartbeat probes a lost Redis
            async with self._lock:
                try:
                    await self._write(refresh=beat)
                except StoreUnavailable as exc:
                    self._failed(exc)
                else:
                    self._answered()
            await asyncio.sleep(_FLUSH_INTERVAL)  # batching pace, not synchronisation

    async def _write(self, *, refresh: bool) -> None:
        releases, self._releases = self._releases, []
        if releases:
            # A removal that fails is not retried: the lease expires by itself.
            await self._remove([k for k, _ in releases], [m for _, m in releases])
        charges, self._charges = self._charges, {}
        if charges:
            try:
                await self._charge(list(charges), [self._window_ms, self._slot_ms,
                                                   *charges.values()])
            except StoreUnavailable:
                for key, tokens in charges.items():   # kept for the next write
                    self._charges[key] = self._charges.get(key, 0) + tokens
                raise
        if refresh:
            held = list(self._held.items())
            for i in range(0, max(len(held), 1), _REFRESH_CHUNK):
                chunk = held[i:i + _REFRESH_CHUNK]
                # With nothing held this still runs once: the probe that ends an outage.
                await self._refresh([k for _, k in chunk],
                                    [self._lease_ms, *(m for m, _ in chunk)])

    def _failed(self, exc: StoreUnavailable) -> None:
        if not self.outage:
            self.outage = True
            logger.warning("shared limits: %s; each relay enforces its own limits until "
                           "Redis answers again", exc)
        else:
            logger.debug("shared limits: %s", exc)

    def _answered(self) -> None:
        if self.outage:
            self.outage = False
            logger.info("shared limits: Redis answers again; limits are shared again")


def _seconds(ms: int) -> float:
    return round(max(1, int(ms)) / 1000.0, 3)
