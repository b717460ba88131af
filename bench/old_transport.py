"""(A copy kept for bench/upstream_read.py: the fast path's transport before aiohttp, commit 60713f7.)

The fast path's HTTP transport: httpx's API, httpcore's HTTP/1.1, lean I/O underneath.

Two costs of httpx's default transport showed at 1,000 concurrent streams (bench/capacity.py):

* **One pool for every connection.** httpcore's pool re-examines every connection, and for
  each idle one counts all of them again, on every request and every response close: with
  1,000 streams on one pool that is O(connections^2) per stream start and end, and a burst
  of starts after a burst of ends held the event loop for tens of seconds. So connections
  live in pools of at most ``SHARD`` streams (``ShardedTransport``): a request goes to the
  first pool with room (idle keep-alive connections are reused first), to a new pool when
  all are full; a pool's count goes down when its response is closed.
* **anyio per read.** Every read went through anyio (a cancel scope and a timer per read,
  ~a quarter of the relay's CPU per token when each chunk carries one token). The pools
  use ``LeanBackend``: an ``asyncio.Protocol`` per connection whose ``read`` returns what
  is buffered without suspending, and arms a timer only when it has to wait.

HTTP itself (h11, keep-alive, chunked bodies), TLS verification (the context httpx builds),
and the exceptions httpx raises are unchanged: the backend raises httpcore's exceptions,
which httpx maps as usual. Proxies from the environment are honoured by httpx only for a
transport it builds itself, so ``relay.upstream.fast_path`` uses this one only when none is set.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpcore
import httpx

__all__ = ["LeanBackend", "ShardedTransport"]

#: Streams per connection pool (each pool's scans stay O(SHARD^2)).
SHARD = 16
#: A connection stops reading from its socket while this much is buffered and unread.
_HIGH_WATER = 256 * 1024


class _LeanStream(asyncio.Protocol, httpcore.AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore's network stream."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        self._drain: asyncio.Future | None = None
        self._paused = False

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > _HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ httpcore stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        buffer = self._buffer
        if not buffer:
            if self._error is not None:
                raise httpcore.ReadError(str(self._error) or type(self._error).__name__)
            if self._eof:
                return b""
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
            if not buffer:
                if self._error is not None:
                    raise httpcore.ReadError(str(self._error) or type(self._error).__name__)
                return b""
        if len(buffer) <= max_bytes:
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:max_bytes])
            del buffer[:max_bytes]
        if self._paused and len(buffer) <= _HIGH_WATER // 4:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        transport.write(buffer)
        drain = self._drain
        if drain is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(drain)
            except TimeoutError:
                raise httpcore.WriteTimeout("write timed out") from None
            if self._error is not None or transport.is_closing():
                raise httpcore.WriteError("the connection was lost while writing")

    async def aclose(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.close()

    async def start_tls(self, ssl_context, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                self._transport, self, ssl_context, server_hostname=server_hostname,
                ssl_handshake_timeout=timeout)
        except TimeoutError as exc:
            self._transport.abort()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except (OSError, EOFError) as exc:      # ssl.SSLError is an OSError
            self._transport.abort()
            raise httpcore.ConnectError(str(exc)) from exc
        self._transport = transport
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._transport
        if info == "is_readable":
            # An idle keep-alive connection is "readable" when the server closed it or
            # sent something unasked: httpcore then discards it.
            return self._eof or bool(self._buffer) or self._error is not None
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(httpcore.ReadTimeout("read timed out"))


class LeanBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on plain asyncio protocols (see the module docstring)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        stream = _LeanStream()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: stream, host, port,
                    local_addr=(local_address, 0) if local_address else None)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = stream.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return stream

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        stream = _LeanStream()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_unix_connection(lambda: stream, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return stream

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx's default transport as connection pools of at most ``SHARD`` streams each, on
    ``LeanBackend`` (see the module docstring)."""

    def __init__(self) -> None:
        self._ssl = httpx.create_ssl_context()    # loaded once, shared by the pools
        self._backend = LeanBackend()
        self._pools: list[list] = []               # [transport, streams in flight]

    def _new_pool(self) -> list:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=SHARD,
                              keepalive_expiry=30.0)
        transport = httpx.AsyncHTTPTransport(verify=self._ssl, limits=limits)
        if isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
            # The same pool httpx builds, on the lean backend (httpx has no parameter for it).
            transport._pool = httpcore.AsyncConnectionPool(
                ssl_context=self._ssl, max_connections=None,
                max_keepalive_connections=SHARD, keepalive_expiry=30.0,
                network_backend=self._backend)
        pool = [transport, 0]
        self._pools.append(pool)
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for pool in self._pools:
            if pool[1] < SHARD:
                break
        else:
            pool = self._new_pool()
        pool[1] += 1
        try:
            response = await pool[0].handle_async_request(request)
        except BaseException:
            pool[1] -= 1
            raise
        response.stream = _PoolRelease(response.stream, pool)
        return response

    async def aclose(self) -> None:
        pools, self._pools = self._pools, []
        for transport, _ in pools:
            await transport.aclose()


class _PoolRelease(httpx.AsyncByteStream):
    """A response body that gives its pool's slot back once closed (exactly once)."""

    def __init__(self, stream, pool: list) -> None:
        self._stream = stream
        self._pool = pool

    def __aiter__(self):
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        try:
            await self._stream.aclose()
        finally:
            if pool is not None:
                pool[1] -= 1

