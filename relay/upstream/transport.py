"""The fast path's HTTP transport: httpx's API on aiohttp's client (HTTP parsed in C).

The fast path reads each provider response chunk by chunk, and a provider that flushes every
token makes each chunk one token: the HTTP layer's cost per chunk is paid per token. httpx's
stack parses HTTP/1.1 in pure Python (httpcore + h11), ~30% of the relay's CPU per token at
1,000 paced streams; aiohttp's client parses it with llhttp (C). Measured side by side when
the move was made (this machine, CPU per chunk with connection setup included: 100 streams
paced at 100 chunks/s 33 us on httpx's stack, 13 us on bare aiohttp, 18 us on this
transport; 1,000 streams at 10 chunks/s 49, 25 and 33 us); bench/upstream_read.py still
compares this transport with bare aiohttp.

``AiohttpTransport`` is an ``httpx.AsyncBaseTransport``: ``relay.upstream.fast`` keeps
building requests and reading responses with httpx (headers, content decoding, status,
error bodies, exception classes all as before) and only the wire is aiohttp's:

* one ``aiohttp.ClientSession`` per transport (the fast path has one per event loop) on a
  ``TCPConnector`` without a connection limit (one connection per concurrent stream: a cap
  would queue streams silently) keeping idle connections alive 30 s, with the TLS context
  httpx builds (same certificate verification);
* the request exactly as httpx built it (method, URL, headers, body); no redirects, no
  cookies, no decompression, no proxy here (httpx does what it did: redirects are not
  followed; ``Content-Encoding`` is decoded by the fast path itself, under the caps of
  ``relay/upstream/caps.py``);
* timeouts from the request's httpx timeout: ``connect`` for opening the connection,
  ``read`` for the response head and for every read of the body;
* aiohttp's exceptions become the httpx exceptions httpx's own transport raises for the
  same failure (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``, ``ReadError``,
  ``RemoteProtocolError``), so the fast path's error mapping is unchanged;
* closing a response before its end closes its connection at once (a cancelled stream's
  provider sees the connection close); a response read to its end gives the connection
  back for keep-alive.

Proxies from the environment are honoured by httpx only for a transport it builds itself,
so ``relay.upstream.fast.pool`` uses this one only when none is set.
"""

from __future__ import annotations

import asyncio
import functools
import ssl

import aiohttp
import httpx

__all__ = ["AiohttpTransport", "shared_ssl_context"]

#: Idle keep-alive connections are closed after this many seconds (as httpx's pools did).
KEEPALIVE_EXPIRY = 30.0


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception httpx's own transport raises for the failure aiohttp reported."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientResponseError)):
        # The server closed early or sent what is not HTTP (h11's RemoteProtocolError).
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


#: At most about this many bytes of already-arrived chunks are joined into one read
#: (``_Body``): a burst is handed on in pieces of this size, each relayed before the next.
BURST_BYTES = 64 * 1024


def _complete_chunks_buffered(content: aiohttp.StreamReader) -> bool:
    """Whether the end of at least one more HTTP chunk has arrived, so ``readchunk()``
    returns without waiting. (aiohttp keeps those ends in ``_http_chunk_splits``: read
    here, never changed; tests/relay/test_upstream_transport.py fails if that attribute
    goes away, rather than the fast path silently reading one chunk at a time.)"""
    return bool(getattr(content, "_http_chunk_splits", None))


#: What ``_mapped`` translates: aiohttp's errors and its timeouts (a TimeoutError).
_AIOHTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


@functools.cache
def shared_ssl_context() -> ssl.SSLContext:
    """The verifying SSL context of every ``AiohttpTransport`` (httpx's defaults: certifi's
    CA bundle). Built once per process: loading the bundle takes ~90 ms of CPU, which done by
    a first fast-path stream blocked the event loop (``relay/runtime/warmup.py`` builds it
    before the server listens). An ``SSLContext`` may be shared by connections and loops."""
    return httpx.create_ssl_context()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface on one aiohttp client session (see the module docstring).
    Create it inside the event loop that uses it; ``aclose()`` closes every connection."""

    def __init__(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_EXPIRY,
            ssl=shared_ssl_context())
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(), raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=None))
        self._timeouts: dict[tuple, aiohttp.ClientTimeout] = {}
        #: Responses returned and not closed yet.
        self.open_responses = 0

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        spec = request.extensions.get("timeout") or {}
        key = (spec.get("connect"), spec.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=None, sock_connect=key[0], sock_read=key[1])
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content if isinstance(request.stream, httpx.ByteStream) \
            else await request.aread()
        try:
            response = await self._session.request(
                request.method, str(request.url), data=body or None,
                headers=request.headers.multi_items(), allow_redirects=False,
                timeout=self._timeout(request), auto_decompress=False)
        except _AIOHTTP_ERRORS as exc:
            raise _mapped(exc, request) from exc
        self.open_responses += 1
        return httpx.Response(
            response.status, headers=response.raw_headers,
            stream=_Body(response, request, self),
            extensions={"http_version": b"HTTP/%d.%d" % response.version,
                        "reason_phrase": (response.reason or "").encode("latin-1")})

    async def aclose(self) -> None:
        await self._session.close()


class _Body(httpx.AsyncByteStream):
    """A response body: each ``__anext__`` waits for the next HTTP chunk and returns it
    together with every complete chunk that has arrived behind it (up to ``BURST_BYTES``),
    never waiting for more. A provider that flushes every token sends one chunk per token:
    when it streams faster than the relay reads (a fast model, a backlog after a busy
    moment), the tokens that are already here are read as one piece, so the fast path
    parses them in one pass and relays them in one frame instead of paying the per-chunk
    cost of every layer above for each (bench/capacity.py, unpaced upstream). The bytes
    and their order are the same either way (``SSEParser`` accepts any split), and a chunk
    still being received is left for the next read. ``aclose()`` before the end closes
    the connection."""

    __slots__ = ("_response", "_content", "_request", "_owner")

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request,
                 owner: AiohttpTransport) -> None:
        self._response = response
        self._content = response.content
        self._request = request
        self._owner: AiohttpTransport | None = owner

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        content = self._content
        try:
            chunk, chunk_end = await content.readchunk()
            while not chunk:
                if not chunk_end:
                    raise StopAsyncIteration          # (b"", False): the end of the body
                chunk, chunk_end = await content.readchunk()
            if chunk_end and _complete_chunks_buffered(content):
                parts = [chunk]
                size = len(chunk)
                while size < BURST_BYTES and _complete_chunks_buffered(content):
                    more, _ = await content.readchunk()     # buffered: returns at once
                    if more:
                        parts.append(more)
                        size += len(more)
                chunk = b"".join(parts)
        except _AIOHTTP_ERRORS as exc:
            raise _mapped(exc, self._request) from exc
        return chunk

    async def aclose(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.open_responses -= 1
        response = self._response
        if self._content.is_eof():
            response.release()          # read to the end: the connection stays alive
        else:
            response.close()            # closed early: close the connection now

    def __repr__(self) -> str:
        return f"<_Body {self._response.status}>"
