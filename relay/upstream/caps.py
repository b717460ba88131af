"""Upstream bytes are a budget: the caps both streaming paths read a provider under.

A provider, a proxy in front of it or a self-hosted server may send a huge error page, a
gzip bomb or a line that never ends. Every byte the relay reads from an upstream is read
under these caps, enforced while reading (never "read it all, then check"):

* ``max_error_body_bytes`` (8 KiB): of an HTTP error response (status >= 400) at most this
  many bytes are read, after decoding; the rest is not read, the connection is closed. Only
  this text reaches LiteLLM's exception mapping, whose redaction of secrets runs two regular
  expression substitutions over it on the event loop, each one C call holding the GIL
  (measured: ~2 ms per KiB for both on a busy 2-core machine, so 64 KiB held the loop
  ~0.5 s): providers' JSON errors are far below 8 KiB, and a proxy's HTML page needs only its
  status.
* ``max_event_bytes`` (1 MiB): one SSE line, or one event's data (``relay/upstream/sse.py``);
  on LiteLLM's path also one line of a JSON-lines stream (``application/x-ndjson``: Ollama).
* ``max_decompressed_bytes`` (256 MiB) and ``max_decompression_ratio`` (200): a body with a
  ``Content-Encoding`` (gzip, deflate) is inflated piece by piece (at most 64 KiB per step);
  more than the absolute cap in one response, or, once 1 MiB came out, more than the ratio
  times the compressed bytes read so far, fails the stream. An encoding the relay cannot
  decode fails it too.

A cap exceeded on a stream raises ``UpstreamLimitExceeded`` (or ``sse.EventTooLarge``), a
provider failure: the stream ends ``failed``/``upstream_error`` with a message naming the
limit (``classify_upstream_exception``), and every other connection is served on.

Two paths, one implementation:

* the fast path (``relay/upstream/fast/reader.py``) reads the raw body itself: an error body
  with ``read_error_body``, a stream through ``Inflater`` (only when it is compressed) into
  ``SSEParser``. An uncompressed stream costs nothing here beyond the parser's length checks.
* LiteLLM's path: ``install(litellm)`` wraps every transport LiteLLM builds for its async
  HTTP clients (``AsyncHTTPHandler.create_async_transport``, which both its own provider
  handlers and the OpenAI SDK clients it creates use, plus the environment-proxy mounts and
  Azure's gateway client) in ``CappedTransport``. Its responses are decoded here (and reach
  LiteLLM without ``Content-Encoding``), error bodies end at the cap, and an event stream
  (``text/event-stream``) is parsed by ``SSEParser`` and handed on re-written one event at a
  time in the plainest form: the OpenAI SDK's own decoder would otherwise dispatch
  data-less events (``retry:``, ``id:``) and keep a BOM or CR line ends.

The limits are process-wide (LiteLLM's clients are): ``configure()`` sets them (the relay
server does, from its settings), ``current()`` reads them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import httpx

from relay.upstream.errors import ProviderStreamError
from relay.upstream.sse import DEFAULT_MAX_EVENT_BYTES, EventTooLarge, SSEParser, encode_event

__all__ = ["CappedTransport", "Inflater", "UpstreamLimitExceeded", "UpstreamLimits",
           "configure", "current", "install", "read_error_body"]

#: Output of one decompression step; a bomb never inflates more than this at once.
INFLATE_STEP = 64 * 1024
#: The ratio cap applies once this many bytes came out (short bodies compress unevenly).
RATIO_FLOOR = 1 << 20


@dataclass(frozen=True)
class UpstreamLimits:
    """The caps of one relay process (see the module docstring); the defaults are the
    documented defaults of ``relay serve``."""

    max_error_body_bytes: int = 8 * 1024
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_decompressed_bytes: int = 256 << 20
    max_decompression_ratio: float = 200.0


_limits = UpstreamLimits()


def configure(limits: UpstreamLimits) -> None:
    """Set the process's caps (both paths read them per response)."""
    global _limits
    _limits = limits


def current() -> UpstreamLimits:
    return _limits


class UpstreamLimitExceeded(ProviderStreamError):
    """An upstream response went over one of the caps; ``wire_message`` says which."""

    def __init__(self, wire_message: str) -> None:
        super().__init__(wire_message)
        self.wire_message = wire_message


class Inflater:
    """Decodes one response body's ``Content-Encoding`` incrementally under the caps.
    ``feed(raw)`` returns the decoded bytes of ``raw`` (possibly empty); raises
    ``UpstreamLimitExceeded`` for a cap, an unknown encoding or undecodable bytes."""

    __slots__ = ("_decoder", "_deflate", "_in", "_out", "_max", "_ratio", "_first")

    def __init__(self, encoding: str, limits: UpstreamLimits | None = None) -> None:
        limits = limits or _limits
        encoding = encoding.strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        else:
            raise UpstreamLimitExceeded(
                "the provider's response uses a Content-Encoding the relay cannot decode")
        self._deflate = encoding == "deflate"
        self._first = True
        self._in = 0
        self._out = 0
        self._max = limits.max_decompressed_bytes
        self._ratio = limits.max_decompression_ratio

    def feed(self, raw: bytes, limit: int | None = None) -> bytes:
        """The decoded bytes of ``raw`` (``limit``: at most that many; the rest of ``raw``
        is then dropped, for a body that is read no further)."""
        self._in += len(raw)
        pieces = []
        produced = 0
        data = raw
        decoder = self._decoder
        while True:
            try:
                piece = decoder.decompress(data, INFLATE_STEP)
            except zlib.error:
                if self._deflate and self._first:
                    # "deflate" without the zlib header, as some servers send it (httpx and
                    # browsers accept both).
                    self._first = False
                    decoder = self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise UpstreamLimitExceeded(
                    "the provider's compressed response could not be decoded") from None
            self._first = False
            data = decoder.unconsumed_tail
            if piece:
                self._out += len(piece)
                self._check(len(data))
                pieces.append(piece)
                produced += len(piece)
                if limit is not None and produced >= limit:
                    break
            if not data and len(piece) < INFLATE_STEP:
                break
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _check(self, unconsumed: int) -> None:
        """Raise when the output so far is over a cap (the ratio against the compressed
        bytes actually consumed: a 64 KiB read of a bomb stops after ~200 x what it used)."""
        out = self._out
        if out > self._max:
            raise UpstreamLimitExceeded(
                "the provider's response inflated beyond the relay's limit "
                f"(max_decompressed_bytes {self._max})")
        if out > RATIO_FLOOR and out > self._ratio * (self._in - unconsumed):
            raise UpstreamLimitExceeded(
                "the provider's response inflated beyond the relay's limit "
                f"(max_decompression_ratio {self._ratio:g})")


def _encoding(headers: Any) -> str | None:
    """The response's Content-Encoding, or None for none/identity."""
    value = headers.get("content-encoding")
    if not value:
        return None
    value = value.strip().lower()
    return None if value == "identity" else value


async def read_error_body(response: Any, limits: UpstreamLimits | None = None) -> bytes:
    """At most ``max_error_body_bytes`` of an httpx error response's body, decoded under the
    caps; then the response is closed (the connection with it: the rest is never read).
    A body that cannot be decoded, or goes over a cap, gives what was read before. (The
    same reading as the LiteLLM path's error bodies: ``_CappedBody`` for a status >= 400.)"""
    body = _CappedBody(response.stream, _encoding(response.headers), error=True, sse=False,
                       limits=limits or _limits)
    try:
        return b"".join([chunk async for chunk in body])
    finally:
        await response.aclose()


# ----------------------------------------------------------------------- LiteLLM's path


class CappedTransport(httpx.AsyncBaseTransport):
    """An httpx transport around LiteLLM's: every response's body is read under the caps
    (see the module docstring). Attributes it does not define are the inner transport's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def handle_async_request(self, request: Any) -> Any:
        response = await self.inner.handle_async_request(request)
        return capped_response(response)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> CappedTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.inner.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def capped_response(response: Any) -> Any:
    """``response`` (an httpx response, body not read) with its body read under the caps:
    decoded here (``Content-Encoding`` and ``Content-Length`` dropped when it was encoded),
    cut at ``max_error_body_bytes`` for a status >= 400, and an event stream re-written
    event by event (``SSEParser`` + ``encode_event``)."""
    limits = _limits
    status = response.status_code
    encoding = _encoding(response.headers)
    error = status >= 400
    content_type = response.headers.get("content-type", "").lower()
    sse = not error and "text/event-stream" in content_type
    lines = not error and not sse and "ndjson" in content_type   # Ollama's JSON lines
    if not (encoding or error or sse or lines):
        return response
    drop = (b"content-encoding", b"content-length")
    headers = [(k, v) for k, v in response.headers.raw if k.lower() not in drop]
    stream = _CappedBody(response.stream, encoding, error, sse, limits, lines)
    # (``_request``: a transport's response has no request yet; the client sets it)
    return httpx.Response(status, headers=headers, stream=stream,
                          extensions=response.extensions,
                          request=getattr(response, "_request", None))


class _CappedBody(httpx.AsyncByteStream):
    """The body of ``capped_response`` (an ``httpx.AsyncByteStream``)."""

    def __init__(self, inner: Any, encoding: str | None, error: bool, sse: bool,
                 limits: UpstreamLimits, lines: bool = False) -> None:
        self._inner = inner
        self._lines = lines
        self._encoding = encoding
        self._error = error
        self._sse = sse
        self._limits = limits

    async def __aiter__(self):
        limits = self._limits
        inflater = Inflater(self._encoding, limits) if self._encoding else None
        parser = SSEParser(limits.max_event_bytes) if self._sse else None
        left = limits.max_error_body_bytes if self._error else None
        raw_read = 0
        line = 0                  # JSON lines: bytes since the last line end
        max_line = limits.max_event_bytes if self._lines else None
        try:
            async for raw in self._inner:
                raw_read += len(raw)
                if inflater is None:
                    data = raw
                else:
                    data = inflater.feed(raw, left)
                if left is not None:
                    data = data[:left]
                    left -= len(data)
                    if data:
                        yield data
                    if left <= 0 or raw_read >= limits.max_error_body_bytes:
                        break      # the rest is never read: aclose() drops the connection
                elif parser is not None:
                    events = parser.feed(data)
                    if events:
                        yield b"".join(encode_event(event, payload)
                                       for event, payload in events)
                elif data:
                    if max_line is not None:
                        end = data.rfind(b"\n")
                        line = line + len(data) if end < 0 else len(data) - end - 1
                        if line > max_line:
                            raise EventTooLarge(max_line)
                    yield data
        except UpstreamLimitExceeded:
            if left is None:
                raise
            # an error body that cannot be decoded: what came before it is the body
        finally:
            if left is not None:
                await self._inner.aclose()

    async def aclose(self) -> None:
        await self._inner.aclose()


_INSTALLED = "llm_relay_capped"


def install(litellm: Any) -> None:
    """Put ``CappedTransport`` around every async transport LiteLLM builds (idempotent):
    ``AsyncHTTPHandler.create_async_transport`` (LiteLLM's provider handlers and the OpenAI
    SDK clients it builds), its environment-proxy mounts, and Azure's gateway client."""
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler
    from litellm.llms.openai import common_utils

    real_create = AsyncHTTPHandler.create_async_transport
    if getattr(real_create, _INSTALLED, False):
        return
    real_mounts = AsyncHTTPHandler.create_httpx_proxy_mounts

    def create_async_transport(*args: Any, **kwargs: Any) -> Any:
        transport = real_create(*args, **kwargs)
        return CappedTransport(transport) if transport is not None else None

    def create_httpx_proxy_mounts(transport: Any, *args: Any, **kwargs: Any) -> Any:
        mounts = real_mounts(getattr(transport, "inner", transport), *args, **kwargs)
        if not mounts:
            return mounts
        return {pattern: CappedTransport(t) if t is not None else None
                for pattern, t in mounts.items()}

    setattr(create_async_transport, _INSTALLED, True)
    AsyncHTTPHandler.create_async_transport = staticmethod(create_async_transport)
    AsyncHTTPHandler._create_async_transport = staticmethod(create_async_transport)
    AsyncHTTPHandler.create_httpx_proxy_mounts = staticmethod(create_httpx_proxy_mounts)
    AsyncHTTPHandler._create_httpx_proxy_mounts = staticmethod(create_httpx_proxy_mounts)

    gateway_client = common_utils.OpenAIAsyncHTTPClient
    real_init = gateway_client.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self._transport = CappedTransport(self._transport)

    gateway_client.__init__ = init
