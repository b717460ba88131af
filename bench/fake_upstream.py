"""A lean OpenAI-format streaming upstream for benchmarks (a process of its own, so its CPU
is not charged to what is measured).

    python bench/fake_upstream.py [--port 0]      # prints "fake-upstream PORT" when ready

``POST /v1/chat/completions`` answers with an OpenAI Chat Completions SSE stream (the same
chunk shape as api.openai.com and tests/fakes/upstream.py: ``chat.completion.chunk`` objects,
a role chunk, one content chunk per token, a finish chunk, the usage chunk when the request
asks ``stream_options.include_usage``, ``data: [DONE]``; chunked transfer encoding,
keep-alive). What to stream is read from the last user message, words ``key=value``:

* ``tokens=N``: N content chunks (default 100);
* ``interval=S``: seconds between chunks (default 0: everything at once, as fast as the
  socket takes it);
* ``stamp=1``: each chunk's text is ``<time.monotonic() at send>|`` (the relay-added
  latency is the client's receive time minus it; CLOCK_MONOTONIC is system-wide);
* ``tag=T``: the request's name in ``GET /stats``.

``GET /stats`` returns ``{"closed": {tag: monotonic time the client closed the connection
before the response was complete}, "requests": n}``: the cancel benchmark compares them
with when the client sent ``cancel``. The HTTP parsing is minimal (Content-Length bodies,
no pipelining): it only has to understand the clients measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import re
import time

_WORD = re.compile(r"(\w+)=(\S+)")
_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
         b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
_PREFIX = ('{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1764547200,'
           '"model":"bench-model","system_fingerprint":"fp_bench","choices":[{"index":0,'
           '"delta":')


def _event(delta: dict, finish: str | None = None) -> bytes:
    body = (_PREFIX + json.dumps(delta, separators=(",", ":")) + ',"logprobs":null,'
            '"finish_reason":' + json.dumps(finish) + "}]}")
    return _chunked(f"data: {body}\n\n".encode())


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# Token texts vary: LiteLLM fails a stream that repeats one chunk 100 times in a row. Each
# holds one "~", so a client counts tokens by counting b"~", merged frames included.
_PIECES = [_event({"content": f"w{c}~ "}) for c in "abcdefghijklmnopqrstuvwxyz"]
_ROLE = _event({"role": "assistant", "content": "", "refusal": None})
_FINISH = _event({}, "stop")
_DONE = _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _usage(tokens: int) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1764547200,
            "model": "bench-model", "system_fingerprint": "fp_bench", "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": tokens,
                      "total_tokens": 11 + tokens}}
    return _chunked(f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode())


_STAMP_HEAD = ('data: ' + _PREFIX + '{"content":"').encode()
_STAMP_TAIL = b'|"},"logprobs":null,"finish_reason":null}]}\n\n'


def _stamped() -> bytes:
    """A content chunk whose text is ``<time.monotonic() now>|`` (chunked encoding)."""
    data = b"%s%.6f%s" % (_STAMP_HEAD, time.monotonic(), _STAMP_TAIL)
    return b"%x\r\n%s\r\n" % (len(data), data)


class Pacer:
    """Every paced stream's schedule in one heap, served by one timer: at each tick the
    chunks of all streams that are due are written (each stamped with the time of its own
    write). A stream's n-th chunk is due ``n * interval`` after its start, as a model's
    pace would be, whatever the lateness of earlier ticks."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._ids = 0

    async def stream(self, transport, tokens: int, interval: float) -> None:
        """Write ``tokens`` stamped chunks to ``transport``, ``interval`` apart; returns
        after the last one (cancelled: the stream's remaining chunks are dropped)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        # [transport, chunks left, interval, done, alive]
        entry = [transport, tokens, interval, done, True]
        self._ids += 1
        self._push(loop, loop.time() + interval, self._ids, entry)
        try:
            await done
        finally:
            entry[4] = False

    def _push(self, loop, at: float, ident: int, entry: list) -> None:
        heapq.heappush(self._heap, (at, ident, entry))
        if self._timer is None or self._timer.when() > at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        heap = self._heap
        now = loop.time()
        while heap and heap[0][0] <= now:
            at, ident, entry = heapq.heappop(heap)
            transport, left, interval, done, alive = entry
            if not alive or transport.is_closing():
                continue
            transport.write(_stamped())
            entry[1] = left = left - 1
            if left > 0:
                heapq.heappush(heap, (at + interval, ident, entry))
            elif not done.done():
                done.set_result(None)
        if heap:
            self._timer = loop.call_at(heap[0][0], self._tick)


class Stats:
    def __init__(self) -> None:
        self.closed: dict[str, float] = {}
        self.requests = 0


class Connection(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive); a response streams
    from its own task. A client that closes mid-response is noticed at once (eof_received /
    connection_lost), not at the next write: that moment is what ``/stats`` reports."""

    def __init__(self, stats: Stats, pacer: Pacer) -> None:
        self.stats = stats
        self.pacer = pacer
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.response: asyncio.Task | None = None
        self.tag = ""
        self.gone = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def eof_received(self) -> bool:
        self._client_gone()
        return False

    def connection_lost(self, exc) -> None:
        self._client_gone()

    def _client_gone(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.response is not None and not self.response.done():
            if self.tag:
                self.stats.closed.setdefault(self.tag, time.monotonic())
            self.response.cancel()

    def _next_request(self) -> None:
        if self.response is not None and not self.response.done():
            return                                     # no pipelining
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1")
        request_line, *lines = head.split("\r\n")
        length = 0
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4:end + 4 + length]
        self.buffer = self.buffer[end + 4 + length:]
        if request_line.startswith("GET /stats"):
            data = json.dumps({"closed": self.stats.closed,
                               "requests": self.stats.requests}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            self._next_request()
            return
        self.stats.requests += 1
        self.response = asyncio.get_running_loop().create_task(self._stream(json.loads(body)))
        self.response.add_done_callback(lambda _: self.gone or self._next_request())

    async def _stream(self, request: dict) -> None:
        text = ""
        for message in reversed(request.get("messages") or []):
            if message.get("role") == "user" and isinstance(message.get("content"), str):
                text = message["content"]
                break
        opts = dict(_WORD.findall(text))
        tokens = int(opts.get("tokens", 100))
        interval = float(opts.get("interval", 0))
        stamp = opts.get("stamp") == "1"
        self.tag = opts.get("tag", "")
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        transport = self.transport
        transport.write(_HEAD + _ROLE)
        if interval <= 0 and not stamp:
            for i in range(tokens):
                transport.write(_PIECES[i % len(_PIECES)])
                if i % 64 == 63:
                    await asyncio.sleep(0)
                    while transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.001)   # backpressure (no drain on a Protocol)
        elif interval > 0:
            # Paced: one shared timer (the Pacer) writes every due stream's chunk, so 1,000
            # paced streams cost one wakeup per tick, not 1,000 sleeping tasks.
            await self.pacer.stream(transport, tokens, interval)
        else:
            for _ in range(tokens):
                transport.write(_stamped())
        transport.write(_FINISH + (_usage(tokens) if include_usage else b"") + _DONE)
        self.tag = ""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    stats = Stats()
    pacer = Pacer()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(stats, pacer), "127.0.0.1", args.port,
                                      backlog=4096)
    print(f"fake-upstream {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
