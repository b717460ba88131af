"""Redis storage for resumable streams and multi-node relays.

One ``RedisStore`` per relay process. It keeps, per stream key, a metadata hash, an owner
heartbeat key, a frame log and an "attached" token, and carries a control channel (pub/sub)
between relay nodes. It knows nothing about sessions or the wire protocol: frames are opaque
``bytes`` tagged with their per-stream ``seq``.

Key layout (``P`` = ``prefix``, default ``"llmrelay:"``; ``K`` = the caller's stream key)::

    P meta:K      hash    principal, alias, node, state ("running" | "finished" | "lost")
    P owner:K     string  node id of the node running the upstream call; its TTL is the heartbeat
                          (``owner_ttl``, usually shorter than the other keys' ``ttl``, so a
                          dead owner is noticed quickly while its record stays readable)
    P log:K       stream  entry id "0-<seq>", one field b"f" = frame bytes
    P attached:K  string  token of the connection currently attached to the stream
    P aisdk-chat:H string "<K> <message id>": the latest response of an AI SDK chat (H =
                          sha256 of its owner and chat id); set and expired by the caller
                          with the stream K's own record (``set_chat``, ``expire_chats``)
    P control     pub/sub channel, orjson-encoded JSON objects (the relays' control messages,
                          ``llm_relay_protocol.RelayMessage``; this store carries any object)

Contracts shared by every method:

- TTLs are seconds (floats); they are sent as millisecond PEXPIRE/PX so sub-second TTLs work.
  A TTL must be > 0 (``ValueError`` otherwise: a zero PEXPIRE would delete the key).
- Every method except ``close()`` raises ``StoreUnavailable`` (never a redis-py exception)
  when Redis cannot be reached, does not answer within ``op_timeout`` seconds, or answers an
  error. Its message names host:port only, never the URL password. ``read()`` is allowed
  ``block + op_timeout``.
- The log keeps exactly the last ``max_frames`` entries (``XADD MAXLEN max_frames``, exact,
  not ``~``): memory is bounded by a number the operator chose, and ``first_seq()`` after a
  trim is exactly ``last_seq - max_frames + 1``, which resume logic can rely on. The cost of
  exact trimming is one entry removed per added entry, negligible at token rates.
- ``append`` of a seq <= the log's last seq is a no-op for that entry (Redis refuses entry
  ids that do not grow; the refusal is swallowed, nothing else in the batch is affected).
- ``finish`` and ``mark_lost`` only move a stream out of ``running``: a lost stream never
  becomes finished, and a finished stream's log is never deleted by a late ``mark_lost``
  (a node that sees the owner key gone may race with the owner's own ``finish``).
- Not Redis Cluster aware: the Lua scripts touch several keys of one stream, which must live
  on one node.

Three redis-py clients (pools) are used, so that one kind of traffic cannot starve another:
commands (one immediate retry on a dropped pooled connection, the whole call capped at
``op_timeout``), blocking ``XREAD`` (each call capped at ``block + op_timeout``), and the
control-channel subscription (no redis-py retries: the listener below owns reconnection).

Deadlines are ours (``asyncio.timeout`` around each call), never redis-py's
``socket_timeout``: redis-py enforces that on every send with ``asyncio.wait_for``, which on
Python 3.11 returns normally when the send completes in the same loop iteration as a
``cancel()`` of the caller, losing the cancellation (CPython gh-86296). On uvloop a send
completes at once, so a relay's shutdown lost the cancel of its shared-limits task about
every other time and never exited. ``_run`` also re-raises a cancellation that a library
swallowed (the task's ``cancelling()`` count rose during the call).

Control listener: ``start()`` subscribes before returning, so a message published after
``start()`` returns is delivered. A background task then hands every message on the channel
(this process's own included) to ``on_control``. When the subscription connection drops, or
stops answering the listener's idle PING, the listener logs one WARNING for the outage and
resubscribes with capped exponential backoff (with jitter) until it succeeds or ``close()``
is called; recovery is logged at INFO. Pub/sub is fire-and-forget: messages published while
the listener is disconnected are lost, so control messages must be hints, never the only
record of a state change (the hash/owner keys are the record).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from relay.aio import cancel_and_wait
from relay.core.lifecycle import SharedState

__all__ = ["ChatRecord", "RedisStore", "StoreUnavailable", "StreamMeta"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The ``state`` field of ``meta:K``: ``SharedState`` values (relay.core.lifecycle maps them
# to the lifecycle's states); the scripts below name them through these.
_RUNNING, _FINISHED, _LOST = (SharedState.RUNNING.value, SharedState.FINISHED.value,
                              SharedState.LOST.value)

# Redis' answers to an XADD whose explicit id does not grow the stream. Matched on these
# fragments (stable since Redis 5) so that any other error still surfaces.
_STALE_ID_ERRORS = ("equal or smaller", "greater than 0-0")

# Listener tuning. Backoff: first retry soon (a restart is usually quick), then back off so
# an outage does not turn into a connect storm from every node.
_BACKOFF_INITIAL = 0.05
_BACKOFF_CAP = 2.0
# With no traffic for this long the listener PINGs; no answer within op_timeout after that
# means the connection is dead even though the socket looks open (a half-open TCP peer).
_IDLE_PING = 15.0
#: Connections for commands (shared, waited for when all are busy) and for blocking reads
#: (one per followed stream; 10,000 is Redis' default ``maxclients``).
_COMMAND_CONNECTIONS = 64
_BLOCKING_READ_CONNECTIONS = 10_000

_FINISH = f"""
if redis.call('HGET', KEYS[1], 'state') == '{_RUNNING}' then
  redis.call('HSET', KEYS[1], 'state', '{_FINISHED}')
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""

_MARK_LOST = f"""
local state = redis.call('HGET', KEYS[1], 'state')
if state == '{_RUNNING}' then
  redis.call('HSET', KEYS[1], 'state', '{_LOST}')
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2], KEYS[3])
  return 1
elseif not state then
  -- metadata gone: nothing to mark, but do not leave an orphan log or owner behind
  redis.call('DEL', KEYS[2], KEYS[3])
end
return 0
"""

# KEYS: chat records; ARGV[1]: milliseconds; ARGV[i + 1]: the stream key KEYS[i] must still
# name (its value starts with it and a space), so a newer response of the chat keeps its own.
_EXPIRE_CHATS = """
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local stream = ARGV[i + 1]
  if value and string.sub(value, 1, #stream + 1) == stream .. ' ' then
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
return 0
"""

_CLEAR_ATTACHED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class StoreUnavailable(Exception):
    """Redis could not be reached or answered an error; message is safe to show (no URL password)."""


@dataclass(frozen=True)
class StreamMeta:
    principal: str
    alias: str
    node: str          # node id that runs the upstream call
    state: SharedState
    stream_id: str = ""  # the id of the start that created it (a resume's default id)


@dataclass(frozen=True, slots=True)
class ChatRecord:
    """The latest response of an AI SDK chat (``relay.runtime.aisdk.ChatIndex``): its
    stream and the message id the chat knows it by. Redis keeps it at ``aisdk-chat:<hash>``
    as ``encode()`` writes it (``"<stream key> <message id>"``: a stream key holds no space,
    and ``_EXPIRE_CHATS`` matches a record by that prefix); ``decode`` is its inverse."""

    stream_key: str
    message_id: str

    def encode(self) -> str:
        return f"{self.stream_key} {self.message_id}"

    @classmethod
    def decode(cls, value: str) -> ChatRecord:
        stream_key, _, message_id = value.partition(" ")
        return cls(stream_key, message_id)


class _ListenerStalled(Exception):
    """The subscription connection stopped answering PING."""


def _text(value: bytes | str) -> str:
    """A reply value as text (the clients here never decode replies: bytes in practice)."""
    return value.decode() if isinstance(value, bytes) else value


def _ms(ttl: float) -> int:
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def _seq_of(entry_id: bytes | str | None) -> int:
    # (redis-py's types allow a None id, for an entry deleted from a PEL; a read or a range
    # never returns one)
    assert entry_id is not None
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.partition("-")[2])


class RedisStore:
    """Async Redis store; see the module docstring for key layout and contracts.

    Call order: construct (no I/O), ``await start(on_control)``, use, ``await close()``.
    Data methods work without ``start()`` (they connect lazily); ``start()`` adds the PING
    check and the control listener. After ``close()`` every method raises ``StoreUnavailable``.
    """

    def __init__(self, url: str, *, prefix: str = "llmrelay:", max_frames: int = 10_000,
                 op_timeout: float = 2.0) -> None:
        if max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        if not op_timeout > 0:
            raise ValueError("op_timeout must be > 0")
        self.prefix = prefix
        self.max_frames = max_frames
        self.op_timeout = op_timeout
        self.channel = f"{prefix}control"
        parts = urlsplit(url)
        self._password = parts.password or ""
        self._where = (f"{parts.hostname}:{parts.port or 6379}" if parts.hostname
                       else (parts.path or "unix socket"))
        common: dict[str, Any] = {"protocol": 2, "socket_connect_timeout": op_timeout}
        # One immediate retry on a connection error: after a Redis restart every pooled
        # connection is dead, and the first command on each would otherwise fail although
        # Redis is back. Safe to repeat: XADD with explicit ids refuses duplicates, the other
        # writes are idempotent; only a PUBLISH may (rarely) be delivered twice.
        # retry_on_error is spelled out because redis-py 5 ignores ``retry`` without it.
        once = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
        # Pools: redis-py's stop at 100 connections and then raise MaxConnectionsError. With
        # 1,000 streams mirroring at once that made streams unresumable; commands instead
        # wait for a pooled connection (up to the operation timeout), and each blocking
        # read (one per followed stream) gets a connection of its own up to Redis' own
        # default client limit.
        self._cmd = Redis.from_pool(BlockingConnectionPool.from_url(
            url, max_connections=_COMMAND_CONNECTIONS, timeout=op_timeout,
            socket_timeout=None, **once, **common))
        self._blocking = Redis.from_pool(ConnectionPool.from_url(
            url, max_connections=_BLOCKING_READ_CONNECTIONS, socket_timeout=None,
            **once, **common))
        self._sub = Redis.from_url(url, socket_timeout=None,
                                   retry=Retry(NoBackoff(), 0), **common)
        self._finish = self._cmd.register_script(_FINISH)
        self._mark_lost = self._cmd.register_script(_MARK_LOST)
        self._clear_attached = self._cmd.register_script(_CLEAR_ATTACHED)
        self._expire_chats = self._cmd.register_script(_EXPIRE_CHATS)
        self._listener: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        # observability for tests and debugging: failed resubscribe attempts, outages seen
        self._reconnect_attempts = 0
        self._outages = 0
        self._idle_ping = _IDLE_PING

    # ------------------------------------------------------------------ keys

    def _meta_key(self, key: str) -> str:
        return f"{self.prefix}meta:{key}"

    def _owner_key(self, key: str) -> str:
        return f"{self.prefix}owner:{key}"

    def _log_key(self, key: str) -> str:
        return f"{self.prefix}log:{key}"

    def _attached_key(self, key: str) -> str:
        return f"{self.prefix}attached:{key}"

    # ------------------------------------------------------------------ errors

    def _safe(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
            detail = "no answer in time"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return StoreUnavailable(self._safe(f"redis at {self._where}: {what} failed ({detail})"))

    async def _run(self, what: str, call: Callable[[], Awaitable[T]],
                   timeout: float | None = None) -> T:
        """Run one Redis exchange under a hard deadline, translating every failure."""
        if self._closed:
            raise StoreUnavailable(f"redis at {self._where}: {what} failed (store is closed)")
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with asyncio.timeout(self.op_timeout if timeout is None else timeout):
                result = await call()
        except (RedisError, OSError, TimeoutError) as exc:
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError() from exc     # cancelled, then converted
            raise self._unavailable(what, exc) from exc
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError()                  # cancelled, then swallowed
        return result

    # ------------------------------------------------------------------ other modules' keys

    def key(self, name: str) -> str:
        """``name`` under this store's prefix (for modules keeping their own keys here)."""
        return f"{self.prefix}{name}"

    def script(self, name: str, source: str) -> Callable[[list[str], list[Any]], Awaitable[Any]]:
        """A Lua script on the command connections: ``await run(keys, args)`` returns its
        reply, with this store's contracts (deadline ``op_timeout``, every failure raised as
        ``StoreUnavailable`` naming ``name``)."""
        script = self._cmd.register_script(source)

        async def run(keys: list[str], args: list[Any]) -> Any:
            return await self._run(name, lambda: script(keys=keys, args=args))

        return run

    # ------------------------------------------------------------------ lifecycle

    async def start(self, on_control: Callable[[dict], None]) -> None:
        """Check Redis with PING and subscribe to the control channel (both before returning;
        ``StoreUnavailable`` if either fails), then deliver control messages to ``on_control``
        from a background task until ``close()``. ``on_control`` runs on the event loop; an
        exception from it is logged and does not stop the listener. A failed ``start()``
        leaves nothing running and may be retried."""
        if self._started:
            raise RuntimeError("RedisStore.start() called twice")
        if self._closed:
            raise StoreUnavailable(f"redis at {self._where}: start failed (store is closed)")
        await self._run("ping", self._cmd.ping)
        pubsub = await self._run("subscribe", self._subscribe)
        self._started = True
        self._listener = asyncio.create_task(self._listen(pubsub, on_control),
                                             name=f"redis-store control listener {self.channel}")
        self._listener.add_done_callback(self._listener_done)

    def _listener_done(self, task: asyncio.Task[None]) -> None:
        # The listener only ends by close()'s cancel; anything else must not pass silently.
        if not task.cancelled() and task.exception() is not None:
            logger.error("control channel %s: listener died", self.channel,
                         exc_info=task.exception())

    async def close(self) -> None:
        """Stop the listener and close every connection. Idempotent; never raises for Redis
        being gone; when it returns no task of this store is left running."""
        if self._closed:
            return
        self._closed = True
        task, self._listener = self._listener, None
        if task is not None:
            await cancel_and_wait(task)
        for client in (self._cmd, self._blocking, self._sub):
            with contextlib.suppress(Exception):
                await client.aclose(close_connection_pool=True)

    # ------------------------------------------------------------------ control channel

    async def _subscribe(self) -> PubSub:
        """A PubSub whose subscription Redis has confirmed."""
        pubsub = self._sub.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            while True:
                msg = await pubsub.get_message(timeout=self.op_timeout)
                if msg is None:
                    raise TimeoutError("no subscribe confirmation")
                if msg["type"] == "subscribe":
                    return pubsub
        except BaseException:
            await self._drop(pubsub)
            raise

    @staticmethod
    async def _drop(pubsub: PubSub) -> None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()

    async def _listen(self, pubsub: PubSub | None, on_control: Callable[[dict], None]) -> None:
        loop = asyncio.get_running_loop()
        delay = _BACKOFF_INITIAL
        outage_since: float | None = None
        try:
            while True:
                if pubsub is None:
                    try:
                        async with asyncio.timeout(self.op_timeout * 2):
                            pubsub = await self._subscribe()
                    except (RedisError, OSError, TimeoutError) as exc:
                        self._reconnect_attempts += 1
                        logger.debug("control channel: resubscribe failed: %s",
                                     self._safe(str(exc)))
                        # jitter within [delay/2, delay]: nodes that lost Redis together do not retry in step
                        await asyncio.sleep(delay * (0.5 + random.random() / 2))
                        delay = min(delay * 2, _BACKOFF_CAP)
                        continue
                    logger.info("control channel %s resubscribed at %s after %.1fs",
                                self.channel, self._where, loop.time() - (outage_since or 0))
                    outage_since = None
                    delay = _BACKOFF_INITIAL
                try:
                    await self._pump(pubsub, on_control)
                except (RedisError, OSError, TimeoutError, _ListenerStalled) as exc:
                    await self._drop(pubsub)
                    pubsub = None
                    if outage_since is None:
                        outage_since = loop.time()
                        self._outages += 1
                        logger.warning("control channel %s at %s lost (%s); resubscribing",
                                       self.channel, self._where,
                                       self._safe(f"{type(exc).__name__}: {exc}"))
                except Exception:
                    # A bug of ours or redis-py's: log loudly, keep the channel alive anyway,
                    # at the slowest retry pace so a persistent bug cannot flood the log.
                    logger.exception("control channel %s: listener error; resubscribing",
                                     self.channel)
                    await self._drop(pubsub)
                    pubsub = None
                    outage_since = outage_since or loop.time()
                    await asyncio.sleep(_BACKOFF_CAP)
        finally:
            if pubsub is not None:
                await self._drop(pubsub)

    async def _pump(self, pubsub: PubSub, on_control: Callable[[dict], None]) -> None:
        """Deliver messages until the connection fails (raises; never returns)."""
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        ping_sent = False
        while True:
            msg = await pubsub.get_message(timeout=self._idle_ping)
            if msg is None:
                if ping_sent and loop.time() - last_seen > self._idle_ping + self.op_timeout:
                    raise _ListenerStalled("no answer to PING")
                if not ping_sent:
                    async with asyncio.timeout(self.op_timeout):
                        await pubsub.ping()
                    ping_sent = True
                continue
            last_seen = loop.time()
            ping_sent = False
            if msg["type"] == "message":
                self._dispatch(msg["data"], on_control)

    def _dispatch(self, data: bytes, on_control: Callable[[dict], None]) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            logger.warning("control channel %s: ignoring non-JSON message (%d bytes)",
                           self.channel, len(data))
            return
        if not isinstance(message, dict):
            logger.warning("control channel %s: ignoring non-object message", self.channel)
            return
        try:
            on_control(message)
        except Exception:
            logger.exception("control channel %s: on_control raised", self.channel)

    async def publish(self, message: dict) -> None:
        """orjson-encode ``message`` and publish it on the control channel (every started
        store on the same prefix receives it, this one included)."""
        data = orjson.dumps(message)
        await self._run("publish", lambda: self._cmd.publish(self.channel, data))

    # ------------------------------------------------------------------ stream records

    async def create(self, key: str, *, principal: str, alias: str, node: str, ttl: float,
                     stream_id: str = "", owner_ttl: float | None = None) -> None:
        """Record a new running stream owned by ``node``: meta hash (state ``running``)
        expiring after ``ttl`` and owner key expiring after ``owner_ttl`` (default ``ttl``).
        Replaces any previous meta of ``key`` and deletes any previous log, so a reused key
        starts from seq 1."""
        ms = _ms(ttl)
        owner_ms = ms if owner_ttl is None else _ms(owner_ttl)
        meta = self._meta_key(key)

        async def call() -> None:
            async with self._cmd.pipeline(transaction=True) as pipe:
                pipe.delete(meta, self._log_key(key))
                pipe.hset(meta, mapping={"principal": principal, "alias": alias,
                                         "node": node, "state": _RUNNING,
                                         "stream_id": stream_id})
                pipe.pexpire(meta, ms)
                pipe.set(self._owner_key(key), node, px=owner_ms)
                await pipe.execute()

        await self._run("create", call)

    async def append(self, key: str, frames: list[tuple[int, bytes]], *, ttl: float,
                     owner_ttl: float | None = None) -> None:
        """Append ``(seq, frame)`` pairs (increasing seq) to the log in one MULTI/EXEC, trim
        it to exactly ``max_frames`` entries, and extend log and meta to ``ttl``, the owner
        key to ``owner_ttl`` (default ``ttl``). Entries whose seq is not above the log's last
        seq are skipped (no-op), as is seq 0."""
        ms = _ms(ttl)
        owner_ms = ms if owner_ttl is None else _ms(owner_ttl)
        log = self._log_key(key)

        async def call() -> list[Any]:
            async with self._cmd.pipeline(transaction=True) as pipe:
                for seq, frame in frames:
                    pipe.xadd(log, {b"f": frame}, id=f"0-{int(seq)}",
                              maxlen=self.max_frames, approximate=False)
                pipe.pexpire(log, ms)
                pipe.pexpire(self._meta_key(key), ms)
                pipe.pexpire(self._owner_key(key), owner_ms)
                return await pipe.execute(raise_on_error=False)

        results = await self._run("append", call)
        for result in results:
            if isinstance(result, ResponseError):
                if any(s in str(result) for s in _STALE_ID_ERRORS):
                    continue
                raise self._unavailable("append", result)

    async def append_many(self, batches: list[tuple[str, list[tuple[int, bytes]]]], *,
                          ttl: float) -> dict[str, StoreUnavailable]:
        """Group commit: ``append`` for many streams in one pipeline (one round trip, as
        many frames as were waiting). ``batches`` holds ``(key, [(seq, frame), ...])`` with
        one entry per key. Each log is trimmed as by ``append`` and its expiry set to ``ttl``
        (a new log has none); meta and owner keys keep the expiry ``create`` gave them and
        the owner's heartbeat (``refresh``) extends, so this writes two commands per frame
        fewer than ``append``. No MULTI: each XADD is atomic on its own and a key's frames
        keep their order in the pipeline. Returns the keys whose append Redis refused (stale
        ids excepted, as in ``append``) with why; raises ``StoreUnavailable`` when the
        exchange itself fails."""
        if not batches:
            return {}
        ms = _ms(ttl)
        # the key of each command, in pipeline order (each frame's XADD, then the PEXPIRE)
        owners = [key for key, frames in batches for _ in range(len(frames) + 1)]

        async def call() -> list[Any]:
            async with self._cmd.pipeline(transaction=False) as pipe:
                for key, frames in batches:
                    log = self._log_key(key)
                    for seq, frame in frames:
                        pipe.xadd(log, {b"f": frame}, id=f"0-{int(seq)}",
                                  maxlen=self.max_frames, approximate=False)
                    pipe.pexpire(log, ms)
                return await pipe.execute(raise_on_error=False)

        results = await self._run("append", call)
        refused: dict[str, StoreUnavailable] = {}
        for key, result in zip(owners, results):
            if isinstance(result, ResponseError) and key not in refused and \
                    not any(s in str(result) for s in _STALE_ID_ERRORS):
                refused[key] = self._unavailable("append", result)
        return refused

    async def finish(self, key: str, *, ttl: float) -> None:
        """Running -> ``finished``: meta and log now expire after ``ttl`` (the resume
        window); the owner key is deleted. No-op unless the stream is running."""
        ms = _ms(ttl)
        keys = [self._meta_key(key), self._log_key(key), self._owner_key(key)]
        await self._run("finish", lambda: self._finish(keys=keys, args=[ms]))

    async def mark_lost(self, key: str, *, ttl: float) -> None:
        """Running -> ``lost`` (principal, alias, node kept; meta expires after ``ttl``);
        log and owner key deleted. No-op for a finished or lost stream; for an absent meta
        only deletes a leftover log/owner."""
        ms = _ms(ttl)
        keys = [self._meta_key(key), self._log_key(key), self._owner_key(key)]
        await self._run("mark_lost", lambda: self._mark_lost(keys=keys, args=[ms]))

    async def meta(self, key: str) -> StreamMeta | None:
        """The stream's metadata, or ``None`` when absent or expired."""
        raw = await self._run("meta", lambda: self._cmd.hgetall(self._meta_key(key)))
        try:
            fields = {_text(k): _text(v) for k, v in raw.items()}
            return StreamMeta(principal=fields["principal"], alias=fields["alias"],
                              node=fields["node"], state=SharedState(fields["state"]),
                              stream_id=fields.get("stream_id", ""))
        except (KeyError, ValueError):
            return None  # absent, or a hash not written by create()

    async def owner_alive(self, key: str) -> bool:
        """Whether the owner key exists (the owner created or refreshed it within its TTL
        and has not finished or been marked lost)."""
        n = await self._run("owner_alive", lambda: self._cmd.exists(self._owner_key(key)))
        return n == 1

    async def refresh(self, keys: list[str], *, ttl: float,
                      owner_ttl: float | None = None) -> None:
        """Owner heartbeat: extend meta and log of each given key to ``ttl`` and its owner
        key to ``owner_ttl`` (default ``ttl``), in one pipeline. Only extends keys that still
        exist: a key that already expired (or a stream finished or marked lost) is not
        resurrected. Call it only for keys this node runs."""
        if not keys:
            return
        ms = _ms(ttl)
        owner_ms = ms if owner_ttl is None else _ms(owner_ttl)

        async def call() -> None:
            async with self._cmd.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pexpire(self._meta_key(key), ms)
                    pipe.pexpire(self._log_key(key), ms)
                    pipe.pexpire(self._owner_key(key), owner_ms)
                await pipe.execute()

        await self._run("refresh", call)

    # ------------------------------------------------------------------ log reads

    async def read(self, key: str, after_seq: int, *, block: float,
                   count: int = 512) -> list[tuple[int, bytes]]:
        """Up to ``count`` frames with seq > ``after_seq``, in seq order. When there are none
        yet, waits up to ``block`` seconds for one (``block <= 0``: do not wait) and returns
        ``[]`` on timeout; an absent log is waited on like an empty one. Uses its own pool,
        one connection per concurrent read. Cancelling a read closes its connection (redis-py
        cannot reuse a connection with a reply in flight). A read blocked on a log that
        ``mark_lost`` deletes keeps waiting until ``block`` elapses: keep ``block`` modest and
        check ``meta()`` after an empty read."""
        stream = self._log_key(key)
        start = f"0-{max(0, int(after_seq))}"
        block_ms = None if block <= 0 else max(1, round(block * 1000))

        async def call() -> Any:
            return await self._blocking.xread({stream: start}, count=count, block=block_ms)

        reply = await self._run("read", call, timeout=max(block, 0) + self.op_timeout)
        if not reply:
            return []
        entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
        return [(_seq_of(entry_id), fields[b"f"]) for entry_id, fields in entries]

    async def first_seq(self, key: str) -> int | None:
        """Seq of the oldest retained frame; ``None`` if the log is empty or absent."""
        entries = await self._run(
            "first_seq", lambda: self._cmd.xrange(self._log_key(key), "-", "+", count=1))
        return _seq_of(entries[0][0]) if entries else None

    async def last_seq(self, key: str) -> int | None:
        """Seq of the newest frame in the log; ``None`` if the log is empty or absent."""
        entries = await self._run(
            "last_seq", lambda: self._cmd.xrevrange(self._log_key(key), "+", "-", count=1))
        return _seq_of(entries[0][0]) if entries else None

    # ------------------------------------------------------------------ AI SDK chats

    def _chat_key(self, principal: str, chat_id: str) -> str:
        # Hashed: chat ids and principals are client-chosen; the key stays short and opaque.
        digest = hashlib.sha256(f"{principal}\0{chat_id}".encode()).hexdigest()
        return f"{self.prefix}aisdk-chat:{digest}"

    async def set_chat(self, principal: str, chat_id: str, record: ChatRecord, *,
                       ttl: float) -> None:
        """Record the latest response of an AI SDK chat (relay.runtime.aisdk.ChatIndex)."""
        ms = _ms(ttl)
        await self._run("set_chat", lambda: self._cmd.set(
            self._chat_key(principal, chat_id), record.encode(), px=ms))

    async def expire_chats(self, chats: list[tuple[str, str, str]], *, ttl: float) -> None:
        """Make each chat record ``(principal, chat id, stream key)`` expire after ``ttl``,
        only while it still names that stream (atomic): a newer response of the chat keeps
        its own expiry."""
        if not chats:
            return
        ms = _ms(ttl)
        keys = [self._chat_key(principal, chat_id) for principal, chat_id, _ in chats]
        args: list[int | str] = [ms, *(stream_key for _, _, stream_key in chats)]
        await self._run("expire_chats", lambda: self._expire_chats(keys=keys, args=args))

    async def get_chat(self, principal: str, chat_id: str) -> ChatRecord | None:
        raw = await self._run("get_chat",
                              lambda: self._cmd.get(self._chat_key(principal, chat_id)))
        return None if raw is None else ChatRecord.decode(_text(raw))

    # ------------------------------------------------------------------ attachment

    async def set_attached(self, key: str, token: str, *, ttl: float) -> None:
        """Record ``token`` as the connection attached to ``key`` (replacing any other)."""
        ms = _ms(ttl)
        await self._run("set_attached",
                        lambda: self._cmd.set(self._attached_key(key), token, px=ms))

    async def get_attached(self, key: str) -> str | None:
        raw = await self._run("get_attached", lambda: self._cmd.get(self._attached_key(key)))
        return None if raw is None else _text(raw)

    async def clear_attached(self, key: str, token: str) -> None:
        """Delete the attachment only if it still holds ``token`` (atomic compare-and-delete),
        so a connection that lost a takeover race cannot detach the winner."""
        await self._run("clear_attached",
                        lambda: self._clear_attached(keys=[self._attached_key(key)], args=[token]))
