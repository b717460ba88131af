"""One open provider response on the fast path, read as the streamer's ``UpstreamReader``.

``FastStream`` is the pipeline of one stream: the response body's network chunks ->
``caps.Inflater`` (a compressed body, under the caps) -> ``SSEParser`` (events, at most
``max_event_bytes`` each) -> the format's decoder (``relay.upstream.fast.decoding``) ->
batches of ``Delta`` for ``EventStreamer.events()``. It knows no provider and no format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import cast

import httpx

from relay.upstream import caps
from relay.upstream.deltas import Delta, UsageInfo
from relay.upstream.fast.decoding import (
    Decoder, EndedUnfinished, SSEEvent, check_shapes, shape_failure,
)
from relay.upstream.sse import SSEParser

__all__ = ["FastStream"]


class FastStream:
    """One open provider response, read by ``EventStreamer.events()``.

    ``next_batch()`` reads the network until the events that arrived carry at least one delta
    and returns them, or ``None`` at the end of the stream. Events without a delta (Anthropic
    pings, ``message_start``, usage-only chunks) do not end the wait, so they do not reset the
    streamer's idle timer: LiteLLM's wrapper does not hand such chunks on either.
    ``aclose()`` closes the HTTP response (and with it the connection) at once.

    Read under the caps of ``relay/upstream/caps.py``: a compressed body is inflated by
    ``caps.Inflater``, one SSE event is at most ``max_event_bytes``, and an event whose JSON
    has the wrong shape for its format fails the stream as a provider failure
    (``relay.upstream.fast.decoding.WrongShape``), never as a relay bug.
    """

    __slots__ = ("_response", "_chunks", "_inflater", "_parser", "_decoder", "_ended",
                 "_failure")

    def __init__(self, response: httpx.Response, decoder: Decoder) -> None:
        self._response = response
        limits = caps.current()
        # The body stream itself (two generator layers per network chunk fewer than
        # ``aiter_bytes``; closing stays ``aclose()``'s), decoded here under the caps when
        # it is compressed (relay/upstream/caps.py), never by httpx without a limit.
        self._chunks = cast(AsyncIterable[bytes], response.stream).__aiter__()
        encoding = response.headers.get("content-encoding")
        self._inflater: caps.Inflater | None = None
        if encoding and encoding.strip().lower() != "identity":
            self._inflater = caps.Inflater(encoding, limits)
        self._parser = SSEParser(limits.max_event_bytes)
        self._decoder = decoder
        self._ended = False
        self._failure: Exception | None = None

    async def next_batch(self) -> list[Delta] | None:
        decoder = self._decoder
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        if self._ended:
            self._check_finished()
            return None
        feed = self._parser.feed
        chunks = self._chunks
        inflater = self._inflater
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._check_finished()
                return None
            except (httpx.ReadError, httpx.RemoteProtocolError):
                if decoder.tolerates_cut_after_finish and decoder.finish_reason is not None:
                    # LiteLLM reads Anthropic's stream with httpx and ends it normally when
                    # the connection breaks after the finish reason (message_delta) arrived.
                    self._ended = True
                    return None
                raise
            if inflater is not None:
                chunk = inflater.feed(chunk)
            events = feed(chunk)
            if events:
                try:
                    if len(events) == 1:
                        deltas = decoder.decode(events)
                        check_shapes(deltas)
                    else:
                        deltas = self._decode_each(events)   # checked event by event
                except Exception as exc:
                    failure = shape_failure(exc)
                    if failure is exc:
                        raise
                    raise failure from exc
                if decoder.done:
                    await self._drain()
                    if not deltas:
                        self._check_finished()
                        return None
                    return deltas
                if deltas:
                    return deltas

    def _decode_each(self, events: list[SSEEvent]) -> list[Delta]:
        """Events read together (a burst), decoded one by one: one that fails the stream
        fails it after the deltas of the events before it, exactly as when they arrive
        apart. The failure is kept and raised by the next ``next_batch()``."""
        decoder = self._decoder
        deltas: list[Delta] = []
        for event in events:
            try:
                decoded = decoder.decode((event,))
                check_shapes(decoded)
            except Exception as exc:
                if not deltas:
                    raise
                self._failure = shape_failure(exc)
                break
            deltas += decoded
            if decoder.done:
                break
        return deltas

    def _check_finished(self) -> None:
        decoder = self._decoder
        if decoder.finish_reason is None and not decoder.broken:
            # LiteLLM's wrapper fails a stream that ends (cleanly, or with [DONE]) without a
            # finish reason the same way. (After Anthropic garbage before any event it has
            # nothing at all, and the relay reports the stream truncated.)
            raise EndedUnfinished("the stream ended before a finish reason")

    async def _drain(self) -> None:
        """After ``[DONE]`` (or Anthropic garbage before any event): read the rest of the
        body (connection reuse), as the OpenAI SDK does; a failure there no longer matters."""
        self._ended = True
        left = caps.current().max_error_body_bytes  # then close instead (a hostile tail)
        try:
            async for chunk in self._chunks:
                left -= len(chunk)
                if left < 0:
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            pass

    @property
    def truncated(self) -> bool:
        return self._decoder.broken

    def provider_usage(self) -> UsageInfo | None:
        return self._decoder.provider_usage()

    async def aclose(self) -> None:
        await self._response.aclose()
