"""A loopback OpenAI-compatible upstream that misbehaves on request: huge error pages, gzip
bombs, lines that never end, wrong-shaped JSON, and SSE written in the standard's less common
forms (CR line ends, a byte-order mark, data-less events).

``HostileUpstream`` (aiohttp, ``127.0.0.1``, ephemeral port) answers ``POST
/v1/chat/completions``; the *last user message's content* names the mode (so one alias can be
driven into every mode). ``normal`` (and any unknown content) is a well-formed stream of
``NORMAL_TEXT``. Sizes are attributes, so a test can keep them small and the probe script
(bench/hostile_upstream.py) large::

    async with HostileUpstream(huge_line_bytes=4 << 20) as up:
        ... model "openai/x", api_base=up.openai_base, message content "huge_line" ...

Modes: see ``MODES``. Used by tests/relay/test_hostile_upstream.py and
bench/hostile_upstream.py.
"""

from __future__ import annotations

import asyncio
import json
import zlib

from aiohttp import web

__all__ = ["HostileUpstream", "MODES", "NORMAL_TEXT", "SSE_QUIRKS", "WRONG_SHAPES"]

NORMAL_TEXT = ["Hel", "lo", ", wor", "ld"]

#: Wrong-shaped JSON events (each sent after one good chunk): mode name -> data line.
WRONG_SHAPES = {
    "shape_choices_string": '{"id":"x","choices":"abc"}',
    "shape_delta_string": '{"id":"x","choices":[{"index":0,"delta":"abc"}]}',
    "shape_choice_list": '{"id":"x","choices":[["a"]]}',
    "shape_content_object": '{"id":"x","choices":[{"index":0,"delta":{"content":{"a":1}}}]}',
    "shape_deep_nesting": '{"id":"x","choices":[{"index":0,"delta":{"content":'
                          + "[" * 1000 + "]" * 1000 + '}}]}',
    "shape_tool_calls_string": '{"id":"x","choices":[{"index":0,"delta":'
                               '{"tool_calls":"abc"}}]}',
    "shape_finish_list": '{"id":"x","choices":[{"index":0,"delta":{},'
                         '"finish_reason":["stop"]}]}',
}

#: Streams of NORMAL_TEXT written in the SSE standard's other forms.
SSE_QUIRKS = ("sse_cr", "sse_crlf_split", "sse_bom", "sse_dataless")

#: Every mode: the hostile ones, the SSE quirks, the wrong shapes and ``normal``.
MODES = ("normal", "done_then_flood", "endless_line", "huge_line", "gzip_bomb", "gzip_error", "html_error",
         *SSE_QUIRKS, *WRONG_SHAPES)


def _chunk(delta: dict, finish: str | None = None) -> bytes:
    return json.dumps({"id": "chatcmpl-h", "object": "chat.completion.chunk", "created": 1,
                       "model": "hostile",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]},
                      separators=(",", ":")).encode()


def _normal_events() -> list[bytes]:
    """The data lines of a well-formed stream of NORMAL_TEXT (role, text, finish, usage)."""
    events = [_chunk({"role": "assistant", "content": ""})]
    events += [_chunk({"content": piece}) for piece in NORMAL_TEXT]
    events.append(_chunk({}, "stop"))
    events.append(json.dumps({"id": "chatcmpl-h", "object": "chat.completion.chunk",
                              "created": 1, "model": "hostile", "choices": [],
                              "usage": {"prompt_tokens": 7, "completion_tokens": 4,
                                        "total_tokens": 11}}).encode())
    events.append(b"[DONE]")
    return events


def _gzip(size: int, byte: bytes = b"a") -> bytes:
    """``size`` bytes of ``byte``, gzip-compressed (made in 1 MiB steps: small to hold)."""
    encoder = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = byte * (1 << 20)
    parts = [encoder.compress(block) for _ in range(size >> 20)]
    parts.append(encoder.compress(byte * (size & ((1 << 20) - 1))))
    parts.append(encoder.flush())
    return b"".join(parts)


_BOMBS: dict[tuple[int, bytes], bytes] = {}


class HostileUpstream:
    """See the module docstring. ``requests`` counts requests per mode;
    ``disconnects`` counts streams whose client closed the connection before the end."""

    def __init__(self, *, endless_line_bytes: int = 64 << 20, huge_line_bytes: int = 4 << 20,
                 bomb_bytes: int = 256 << 20, error_bomb_bytes: int = 256 << 20,
                 html_error_bytes: int = 4 << 20, write_bytes: int = 64 * 1024) -> None:
        self.endless_line_bytes = endless_line_bytes
        self.huge_line_bytes = huge_line_bytes
        self.bomb_bytes = bomb_bytes
        self.error_bomb_bytes = error_bomb_bytes
        self.html_error_bytes = html_error_bytes
        self.write_bytes = write_bytes
        self.requests: dict[str, int] = {}
        self.disconnects = 0
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def __aenter__(self) -> HostileUpstream:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def openai_base(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    def bomb(self, size: int, byte: bytes = b"a") -> bytes:
        """A gzip body inflating to ``size`` bytes of ``byte`` (made once per process)."""
        key = (size, byte)
        if key not in _BOMBS:
            _BOMBS[key] = _gzip(size, byte)
        return _BOMBS[key]

    def make_bombs(self) -> None:
        """Make the bodies of ``gzip_bomb`` and ``gzip_error`` now (not while measured)."""
        self.bomb(self.bomb_bytes, b"\n")
        self.bomb(self.error_bomb_bytes)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        mode = str(body["messages"][-1]["content"])
        self.requests[mode] = self.requests.get(mode, 0) + 1
        try:
            return await self._respond(request, mode)
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise

    async def _sse(self, request: web.Request, headers: dict | None = None
                   ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               **(headers or {})})
        await response.prepare(request)
        return response

    async def _respond(self, request: web.Request, mode: str) -> web.StreamResponse:
        events = _normal_events()
        if mode == "html_error":    # written in pieces: a reader that hangs up stops it
            response = web.StreamResponse(status=502, headers={"Content-Type": "text/html"})
            response.content_length = 26 + 18 * (self.html_error_bytes // 18)
            await response.prepare(request)
            await response.write(b"<html><body>")
            piece = b"<p>bad gateway</p>" * (self.write_bytes // 18)
            for _ in range(self.html_error_bytes // len(piece)):
                await response.write(piece)
            await response.write(b"<p>bad gateway</p>" * (self.html_error_bytes // 18
                                 - (self.html_error_bytes // len(piece)) * (len(piece) // 18)))
            await response.write(b"</body></html>")
            await response.write_eof()
            return response
        if mode == "gzip_error":
            return web.Response(status=500, body=self.bomb(self.error_bomb_bytes),
                                headers={"Content-Encoding": "gzip",
                                         "Content-Type": "application/json"})
        if mode == "gzip_bomb":
            response = await self._sse(request, {"Content-Encoding": "gzip"})
            bomb = self.bomb(self.bomb_bytes, b"\n")
            for i in range(0, len(bomb), self.write_bytes):
                await response.write(bomb[i:i + self.write_bytes])
            await response.write_eof()
            return response
        response = await self._sse(request)
        write = response.write
        if mode in ("endless_line", "huge_line"):
            await write(b"data: " + events[1] + b"\n\n")      # one good chunk first
            await write(b'data: {"choices":[{"index":0,"delta":{"content":"')
            size = self.endless_line_bytes if mode == "endless_line" else self.huge_line_bytes
            piece = b"a" * self.write_bytes
            for _ in range(size // self.write_bytes):
                await write(piece)
            if mode == "endless_line":
                await asyncio.sleep(3600)     # the line never ends; the relay hangs up
            await write(b'"}}]}\n\n')
            for data in events[2:]:
                await write(b"data: " + data + b"\n\n")
        elif mode == "done_then_flood":    # [DONE], then bytes that never end
            for data in events:
                await write(b"data: " + data + b"\n\n")
            piece = b": " + b"x" * self.write_bytes + b"\n"
            for _ in range(self.endless_line_bytes // len(piece)):
                await write(piece)
        elif mode in WRONG_SHAPES:
            await write(b"data: " + events[1] + b"\n\n")
            await write(b"data: " + WRONG_SHAPES[mode].encode() + b"\n\n")
            for data in events[2:]:
                await write(b"data: " + data + b"\n\n")
        elif mode == "sse_cr":
            for data in events:
                await write(b"data: " + data + b"\r\r")
        elif mode == "sse_crlf_split":
            for data in events:   # each CRLF split between two writes (two reads)
                await write(b"data: " + data + b"\r")
                await asyncio.sleep(0.002)
                await write(b"\n\r")
                await asyncio.sleep(0.002)
                await write(b"\n")
        elif mode == "sse_bom":    # the first event carries text: a reader keeping the BOM
            await write(b"\xef\xbb\xbf")     # loses it
            await asyncio.sleep(0.002)
            for data in events[1:]:
                await write(b"data: " + data + b"\n\n")
        elif mode == "sse_dataless":
            await write(b"retry: 3000\n\n")
            for data in events:
                await write(b"id: 1\n\n: keep-alive\n\nid: 2\ndata: " + data + b"\n\n")
            await write(b"retry: 1000\nid: 9\n\n")
        else:
            for data in events:
                await write(b"data: " + data + b"\n\n")
        await response.write_eof()
        return response
