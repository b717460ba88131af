"""relay/upstream/transport.py: the fast path's transport behaves like httpx's default one.

Each scenario runs against a raw asyncio HTTP server (port 0) through both transports,
httpx's default and ``AiohttpTransport``, and must end the same way (body chunk by chunk,
or exception class); on top, the aiohttp transport must give each concurrent stream a
connection of its own (no queueing), reuse a finished response's connection, and close a
response's connection as soon as it is closed early.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from relay.upstream.transport import BURST_BYTES, AiohttpTransport

# On uvloop (the default) and on asyncio's own loop (tests/conftest.py).
pytestmark = pytest.mark.both_loops

_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream:
    """Answers each request by its path: ``/body`` a chunked body, ``/cut`` half a body
    then a closed socket, ``/silent`` headers and then nothing, ``/hold`` a chunk and then
    the rest once ``release`` is set. Counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.release = asyncio.Event()
        self.handlers: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in list(self.handlers):
            task.cancel()
        for task in list(self.handlers):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.wait_closed()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader, writer) -> None:
        self.handlers.add(asyncio.current_task())
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1]
                if path == b"/body":
                    writer.write(_HEAD + b"".join(_chunk(b"data: %d\n\n" % i) for i in range(50))
                                 + b"0\r\n\r\n")
                elif path == b"/cut":
                    writer.write(_HEAD + _chunk(b"data: 1\n\n"))
                    await writer.drain()
                    writer.close()
                    return
                elif path == b"/silent":
                    writer.write(_HEAD)
                    await writer.drain()
                    await asyncio.Event().wait()      # never answers (cancelled at the end)
                elif path == b"/hold":
                    writer.write(_HEAD + _chunk(b"data: first\n\n"))
                    await writer.drain()
                    release = asyncio.ensure_future(self.release.wait())
                    gone = asyncio.ensure_future(reader.read(1))
                    await asyncio.wait({release, gone}, return_when=asyncio.FIRST_COMPLETED)
                    release.cancel()
                    gone.cancel()
                    if gone.done() and not gone.cancelled() and gone.result() == b"":
                        self.closed_by_client.set()    # the client closed the connection
                        return
                    writer.write(_chunk(b"data: last\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.handlers.discard(asyncio.current_task())


async def _outcome(transport, url: str, timeout: float = 5.0) -> tuple[str, list]:
    async with httpx.AsyncClient(transport=transport, timeout=timeout) as client:
        try:
            async with client.stream("GET", url) as response:
                chunks = [chunk async for chunk in response.aiter_bytes()]
                return "ok", chunks
        except httpx.HTTPError as exc:
            return type(exc).__name__, []


@pytest.mark.parametrize("path", ["/body", "/cut"])
async def test_same_outcome_as_httpx_default_transport(path):
    async with Upstream() as upstream:
        default = await _outcome(None, upstream.url(path))
        ours = await _outcome(AiohttpTransport(), upstream.url(path))
    assert ours[0] == default[0]
    assert b"".join(ours[1]) == b"".join(default[1])          # the same bytes, in order
    if path == "/body":
        # httpx's transport yields one item per HTTP chunk; ours joins the chunks that had
        # all arrived when it read (the upstream wrote the 50 at once): fewer reads.
        assert default[0] == "ok" and default[1] == [b"data: %d\n\n" % i for i in range(50)]
        assert len(ours[1]) < len(default[1])
    else:
        assert default[0] == "RemoteProtocolError"


async def test_a_burst_of_arrived_chunks_is_read_in_pieces_of_at_most_burst_bytes():
    piece = b"data: " + b"x" * 1000 + b"\n\n"
    count = 200                                   # ~200 KB written at once
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + b"".join(_chunk(piece) for _ in range(count)) + b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        status, reads = await _outcome(AiohttpTransport(), f"http://127.0.0.1:{port}/")
    finally:
        server.close()
        await server.wait_closed()
    assert status == "ok" and b"".join(reads) == piece * count
    assert len(reads) < count                     # arrived chunks joined...
    assert max(map(len, reads)) < BURST_BYTES + len(piece)     # ...in bounded pieces


async def test_read_timeout_and_connect_error_are_httpx_exceptions():
    async with Upstream() as upstream:
        assert (await _outcome(AiohttpTransport(), upstream.url("/silent"), timeout=0.2))[0] \
            == "ReadTimeout"
        port = upstream.port
    # the server is closed now: nothing listens on its port
    assert (await _outcome(AiohttpTransport(), f"http://127.0.0.1:{port}/body"))[0] \
        == "ConnectError"


async def test_keep_alive_connection_is_reused():
    async with Upstream() as upstream:
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                response = await client.get(upstream.url("/body"))
                assert response.status_code == 200
            assert transport.open_responses == 0
        assert upstream.connections == 1


async def test_concurrent_streams_each_get_a_connection_and_all_finish():
    streams = 40
    async with Upstream() as upstream:
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            started = asyncio.Queue()

            async def one() -> bytes:
                async with client.stream("GET", upstream.url("/hold")) as response:
                    chunks = response.aiter_bytes()
                    first = await chunks.__anext__()
                    await started.put(None)
                    rest = b"".join([c async for c in chunks])
                    return first + rest

            tasks = [asyncio.create_task(one()) for _ in range(streams)]
            for _ in range(streams):
                await started.get()
            # every stream is open now, each on its own connection (none queued)
            assert transport.open_responses == streams
            assert upstream.connections == streams
            upstream.release.set()
            bodies = await asyncio.gather(*tasks)
            assert transport.open_responses == 0
        assert all(body == b"data: first\n\ndata: last\n\n" for body in bodies)


async def test_closing_a_response_early_closes_its_connection():
    async with Upstream() as upstream:
        transport = AiohttpTransport()
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("GET", upstream.url("/hold")) as response:
                await response.aiter_bytes().__anext__()
                assert transport.open_responses == 1
            assert transport.open_responses == 0
            # the server sees the connection closed while the client stays open
            await upstream.closed_by_client.wait()
            # and a new request opens a new connection
            response = await client.get(upstream.url("/body"))
            assert response.status_code == 200
        assert upstream.connections == 2


async def test_http_error_status_headers_and_body_reach_httpx():
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
                     b'{"error":"x"}')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            response = await client.post(url, content=b"{}")
    finally:
        server.close()
        await server.wait_closed()
    assert response.status_code == 429
    assert response.reason_phrase == "Too Many Requests"
    assert response.headers["retry-after"] == "7"
    assert response.content == b'{"error":"x"}'
