"""relay/upstream/caps.py without a network: the inflater's caps, error bodies, and the
transport LiteLLM reads through."""

from __future__ import annotations

import gzip
import zlib

import httpx
import pytest

from relay.upstream import caps
from relay.upstream.caps import Inflater, UpstreamLimitExceeded, UpstreamLimits


def test_a_bomb_stops_near_the_ratio_not_at_the_end_of_the_read():
    bomb = gzip.compress(b"\n" * (64 << 20))          # ~64 KiB in, 64 MiB out
    inflater = Inflater("gzip", UpstreamLimits())
    produced = 0
    with pytest.raises(UpstreamLimitExceeded) as caught:
        produced += len(inflater.feed(bomb))           # the whole bomb in one read
    assert "max_decompression_ratio 200" in caught.value.wire_message
    assert inflater._out < 4 << 20                     # stopped after ~1 MiB, not 64 MiB


def test_absolute_cap_and_ordinary_text():
    text = b"".join(b"data: {\"n\": %d}\n\n" % i for i in range(100_000))  # ~1.6 MB
    inflater = Inflater("gzip", UpstreamLimits(max_decompressed_bytes=1 << 20))
    with pytest.raises(UpstreamLimitExceeded, match="max_decompressed_bytes"):
        for i in range(0, len(gz := gzip.compress(text)), 1000):
            inflater.feed(gz[i:i + 1000])
    inflater = Inflater("gzip", UpstreamLimits())
    gz = gzip.compress(text)
    assert b"".join(inflater.feed(gz[i:i + 7]) for i in range(0, len(gz), 7)) == text


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS])
def test_deflate_with_and_without_zlib_header(wbits):
    encoder = zlib.compressobj(6, zlib.DEFLATED, wbits)
    body = encoder.compress(b"hello " * 1000) + encoder.flush()
    assert Inflater("deflate").feed(body) == b"hello " * 1000


def test_unknown_encoding_fails():
    with pytest.raises(UpstreamLimitExceeded, match="cannot decode"):
        Inflater("br")


def stream_response(status: int, body: bytes, headers: dict, pieces: int = 4096):
    closed = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i in range(0, len(body), pieces):
                yield body[i:i + pieces]

        async def aclose(self):
            closed.append(True)

    return httpx.Response(status, headers=headers, stream=Body()), closed


async def test_error_body_is_read_up_to_the_cap_and_closed():
    response, closed = stream_response(502, b"<p>x</p>" * 500_000, {"content-type": "text/html"})
    body = await caps.read_error_body(response, UpstreamLimits(max_error_body_bytes=1000))
    assert body == (b"<p>x</p>" * 500_000)[:1000] and closed
    bomb = gzip.compress(b"a" * (32 << 20))
    response, closed = stream_response(500, bomb, {"content-encoding": "gzip"}, 65536)
    body = await caps.read_error_body(response)
    assert body == b"a" * UpstreamLimits().max_error_body_bytes and closed


async def test_capped_transport_rewrites_sse_and_caps_error_bodies():
    class Inner(httpx.AsyncBaseTransport):
        def __init__(self, response):
            self.response = response

        async def handle_async_request(self, request):
            return self.response

    sse = b"\xef\xbb\xbfretry: 5\r\n\r\ndata: a\r\n\r\n: c\r\rdata: b\r\r"
    inner, _ = stream_response(200, gzip.compress(sse), {
        "content-type": "text/event-stream", "content-encoding": "gzip"}, 3)
    async with httpx.AsyncClient(transport=caps.CappedTransport(Inner(inner))) as client:
        response = await client.post("http://upstream/v1")
        assert "content-encoding" not in response.headers
        assert await response.aread() == b"data: a\n\ndata: b\n\n"
    inner, closed = stream_response(500, b"x" * (1 << 20), {"content-length": str(1 << 20)})
    async with httpx.AsyncClient(transport=caps.CappedTransport(Inner(inner))) as client:
        response = await client.post("http://upstream/v1")
        assert await response.aread() == b"x" * UpstreamLimits().max_error_body_bytes
        assert closed


async def test_capped_transport_bounds_a_json_lines_line():
    from relay.upstream.sse import EventTooLarge

    class Inner(httpx.AsyncBaseTransport):
        def __init__(self, response):
            self.response = response

        async def handle_async_request(self, request):
            return self.response

    ok = b'{"a":1}\n' * 1000
    inner, _ = stream_response(200, ok, {"content-type": "application/x-ndjson"}, 100)
    async with httpx.AsyncClient(transport=caps.CappedTransport(Inner(inner))) as client:
        assert await (await client.post("http://upstream/api/chat")).aread() == ok
    caps.configure(UpstreamLimits(max_event_bytes=4096))
    try:
        inner, _ = stream_response(200, b'{"a":"' + b"x" * 10_000,
                                   {"content-type": "application/x-ndjson"}, 1000)
        async with httpx.AsyncClient(transport=caps.CappedTransport(Inner(inner))) as client:
            with pytest.raises(EventTooLarge):
                await client.post("http://upstream/api/chat")   # (reads the body)
    finally:
        caps.configure(UpstreamLimits())
