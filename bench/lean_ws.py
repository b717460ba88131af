"""A minimal WebSocket client for the paced-latency benchmark (bench/capacity.py).

With 1,000 streams at 10 tokens/s the benchmark's own clients share the machine's 2 cores
with the relay and the upstream; the ``websockets`` client costs a task wakeup, a future
and (with ``asyncio.wait_for``) a task per received frame, which made the clients a large
part of what the latency run measured. This client is an ``asyncio.Protocol``: the frames
of one socket read are parsed in ``data_received`` (one receive timestamp per read), and
only the fields the benchmark needs are looked at.

Scope: RFC 6455 framing as a client (masked sends, unmasked receives, ping -> pong, close),
no extensions (the relay is asked for none), the ``llm-relay.v1`` subprotocol. It is a
benchmark tool, not a general client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


def _masked(opcode: int, payload: bytes) -> bytes:
    """One final client frame (clients must mask what they send)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    body = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + body


class LeanClient(asyncio.Protocol):
    """One connection. ``on_message(data, received)`` gets each complete text message with
    the time (``time.monotonic()``) its socket read returned."""

    def __init__(self, on_message: Callable[[bytes, float], None]) -> None:
        self.on_message = on_message
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._handshake: asyncio.Future = asyncio.get_running_loop().create_future()
        self._upgraded = False
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        received = time.monotonic()
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self._handshake.set_exception(ConnectionError(head[:200].decode("latin-1")))
                self.transport.close()
                return
            self._upgraded = True
            self._handshake.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if size - at < 2:
                    break
                n = int.from_bytes(buf[at:at + 2], "big")
                at += 2
            elif n == 127:
                if size - at < 8:
                    break
                n = int.from_bytes(buf[at:at + 8], "big")
                at += 8
            if size - at < n:
                break
            payload = bytes(buf[at:at + n])
            pos = at + n
            opcode = b0 & 0x0F
            if opcode in (_OP_TEXT, _OP_BINARY, _OP_CONT):
                if not b0 & 0x80:
                    self._fragments.append(payload)
                    continue
                if self._fragments:
                    self._fragments.append(payload)
                    payload = b"".join(self._fragments)
                    self._fragments.clear()
                self.on_message(payload, received)
            elif opcode == _OP_PING:
                self.transport.write(_masked(_OP_PONG, payload))
            elif opcode == _OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 \
                    else 1005
                self.transport.write(_masked(_OP_CLOSE, payload[:2]))
                self.transport.close()
        del buf[:pos]

    def connection_lost(self, exc) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionError("closed in the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # -- use
    def send_text(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self.transport.write(_masked(_OP_TEXT, data))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(_OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def connect(url: str, on_message: Callable[[bytes, float], None]) -> LeanClient:
    """Open ``url`` (ws://host:port/path) with the ``llm-relay.v1`` subprotocol."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: LeanClient(on_message), parts.hostname,
                                             parts.port or 80)
    key = base64.b64encode(os.urandom(16)).decode()
    client.transport.write(
        (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
         "Sec-WebSocket-Protocol: llm-relay.v1\r\n\r\n").encode())
    await client._handshake
    return client


class PacedStream:
    """The benchmark's view of one paced stream on one connection: every token frame's
    stamps (``<upstream send time>|`` each; merged frames carry several) become
    ``(sent, latency)`` pairs in ``latencies``; exactly one ``finish`` must end it."""

    __slots__ = ("latencies", "tokens", "finishes", "status", "errors", "done", "frames",
                 "welcome")

    def __init__(self, latencies: list[float]) -> None:
        loop = asyncio.get_running_loop()
        self.welcome = loop.create_future()
        self.done = loop.create_future()
        self.latencies = latencies
        self.tokens = 0
        self.finishes = 0
        self.status: str | None = None
        self.errors: list[dict] = []
        self.frames = 0

    def on_message(self, data: bytes, received: float) -> None:
        self.frames += 1
        if data.startswith(b'{"type":"token"'):
            text = orjson.loads(data)["text"]
            stamps = text.split("|")
            stamps.pop()
            append = self.latencies.append
            for stamp in stamps:
                sent = float(stamp)
                append((sent, received - sent))
            self.tokens += len(stamps)
            return
        frame = orjson.loads(data)
        kind = frame.get("type")
        if kind == "token":                 # (a frame whose fields came in another order)
            self.on_message(orjson.dumps({"type": "token", "text": frame["text"]}), received)
            self.frames -= 1
        elif kind == "welcome":
            if not self.welcome.done():
                self.welcome.set_result(None)
        elif kind == "finish":
            self.finishes += 1
            self.status = f"{frame.get('status')}/{frame.get('reason')}"
            if not self.done.done():
                self.done.set_result(None)
        elif kind == "error":
            self.errors.append(frame)
            if not self.done.done():
                self.done.set_result(None)
