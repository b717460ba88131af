"""Slow clients: lossless merging of token frames while a client lags, and close 4008 when
the backlog stays too large, with memory bounded and other clients unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import tracemalloc
from contextlib import asynccontextmanager

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from relay.upstream.demo import demo_reply_tokens
from relay.upstream.llm import demo_handler

from .helpers import SUBPROTOCOL, Client, eventually, start_relay, text_of

BIG = {"max_messages_bytes": 8 << 20, "max_frame_bytes": 8 << 20,
       "send_buffer_bytes": 16 * 1024}


def _long_words(n: int, width: int = 1000) -> str:
    return " ".join(f"{'x' * width}{i}" for i in range(n))


@asynccontextmanager
async def _lagging_client(port: int):
    """A client whose socket buffers almost nothing and whose library stops reading after
    one queued message: when the test does not read, the relay's backlog grows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    async with connect(f"ws://127.0.0.1:{port}/ws", sock=sock, subprotocols=[SUBPROTOCOL],
                       max_queue=1, max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        yield ws


def _session(server):
    (session,) = server.sessions
    return session


async def test_a_lagging_client_gets_merged_token_frames_and_loses_nothing():
    content = _long_words(1000)
    expected = "".join(demo_reply_tokens([{"role": "user", "content": content}]))
    async with start_relay(detach_grace=0, **BIG) as server:
        async with _lagging_client(server.port) as ws:
            await ws.send(json.dumps({"type": "start", "id": "a", "model": "demo",
                                      "messages": [{"role": "user", "content": content}]}))
            await eventually(lambda: _session(server).backlog_bytes() > 128 * 1024, 20)
            got = []
            while not got or got[-1]["type"] != "finish":
                got.append(json.loads(await ws.recv()))
    tokens = [f for f in got if f["type"] == "token"]
    assert text_of(got) == expected
    assert len(tokens) < len(demo_reply_tokens([{"role": "user", "content": content}]))
    seqs = [f["seq"] for f in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert got[-1]["status"] == "completed"


async def test_a_client_that_stops_reading_is_closed_4008_with_memory_bounded():
    handler = demo_handler()
    before = handler.closed_early
    content = _long_words(4000)          # a ~4 MB answer
    limit = 256 * 1024
    async with start_relay(detach_grace=0, slow_consumer_bytes=limit, demo_tps=500,
                           slow_consumer_grace=0.5, **BIG) as server:
        async with Client.connect(server.url) as other, _lagging_client(server.port) as ws:
            await ws.send(json.dumps({"type": "start", "id": "a", "model": "demo",
                                      "messages": [{"role": "user", "content": content}]}))
            # While the slow client lags, another client keeps its latency.
            closed = asyncio.create_task(handler.wait_closed_early(before + 1, timeout=30))
            worst = 0.0
            while not closed.done():
                t0 = time.perf_counter()
                await other.send({"type": "ping"})
                assert (await other.next_for(None))["type"] == "pong"
                worst = max(worst, time.perf_counter() - t0)
                await asyncio.wait({closed}, timeout=0.05)   # pace: stay under the frame rate
            await closed                     # the slow client's upstream was closed
            await other.start("b", content="still served")
            assert (await other.collect("b"))[-1]["status"] == "completed"
            assert worst < 1.0, worst
            # The relay never held the whole answer: its logs stayed near the limit.
            assert server.hub.peak_log_bytes < 2 * 1024 * 1024 < len(content)
            assert server.metrics.errors.labels("slow_consumer")._value.get() == 1
            # Reading now drains what the kernel held, then the 4008 close (or, if the
            # relay had to give up on the close handshake, an abnormal close).
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed:
                pass
            assert ws.close_code in (4008, 1006)


def test_merged_token_frames_stay_small():
    from relay.core.streamlog import MAX_MERGED_BYTES, FrameLog, coalesce

    log = FrameLog(max_bytes=1 << 30, keep=True)
    for seq in range(1, 3001):
        log.append({"type": "token", "id": "a", "seq": seq, "text": "y" * 100})
    log.append({"type": "finish", "id": "a", "seq": 3001, "status": "completed",
                "usage": {"prompt_tokens": 1, "completion_tokens": 3000,
                          "total_tokens": 3001, "estimated": False}})
    out = [json.loads(b) for b in coalesce(log.after(0, 10_000), "a")]
    assert all(len(json.dumps(f)) <= MAX_MERGED_BYTES + 200 for f in out)
    assert 2 < len(out) < 3001
    assert "".join(f.get("text", "") for f in out) == "y" * 300_000
    assert [f["seq"] for f in out] == sorted(f["seq"] for f in out) and out[-1]["seq"] == 3001


async def _flood_pings_until_closed(server, ws, data: str) -> None:
    """Send ``ping`` frames carrying ``data``, paced under the frame-rate limit, never
    reading a pong, until the relay has closed the connection as a slow consumer."""
    slow = server.metrics.errors.labels("slow_consumer")
    before = slow._value.get()
    frame = json.dumps({"type": "ping", "data": data})
    async with asyncio.timeout(30):
        while slow._value.get() == before:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)
            await asyncio.sleep(1 / 80)     # pace: 80 frames/s, under frames_per_second=100


async def _close_code_after_draining(ws) -> int | None:
    """Read what the kernel held for the client, then the close (4008, or 1006 when the relay
    had to give up on the close handshake)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            await ws.recv()
    return ws.close_code


async def test_a_client_flooding_pings_without_reading_is_closed_4008_with_memory_bounded():
    """No stream at all: the pongs alone are the backlog, and the 4008 rule applies."""
    limit = 64 * 1024
    data = "x" * 1000                    # the largest ping data allowed is 1 KiB as JSON
    async with start_relay(slow_consumer_bytes=limit, slow_consumer_grace=0.5,
                           send_buffer_bytes=16 * 1024) as server:
        async with Client.connect(server.url) as other, _lagging_client(server.port) as ws:
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                await _flood_pings_until_closed(server, ws, data)
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
            assert await _close_code_after_draining(ws) in (4008, 1006)
            # The relay never held much more than the limit for this client (the queue, the
            # kernel and websockets' buffers); unbounded it grew ~100 KB/s for as long as
            # the client kept sending.
            assert peak < 1024 * 1024, peak
            await other.send({"type": "ping", "data": data})
            assert (await other.next_for(None)) == {"type": "pong", "data": data}


async def test_a_control_backlog_past_twice_the_limit_closes_4008_without_waiting_the_grace():
    limit = 32 * 1024
    async with start_relay(slow_consumer_bytes=limit, slow_consumer_grace=3600,
                           send_buffer_bytes=16 * 1024) as server:
        async with _lagging_client(server.port) as ws:
            # With an hour of grace only the hard bound on the control queue can close it.
            await _flood_pings_until_closed(server, ws, "y" * 1000)
            assert await _close_code_after_draining(ws) in (4008, 1006)
            await eventually(lambda: not server.sessions)


async def test_ping_data_over_1_kib_is_bad_request_and_1_kib_is_echoed():
    async with start_relay() as server, Client.connect(server.url) as client:
        await client.send({"type": "ping", "data": "z" * 1022})       # 1,024 bytes as JSON
        assert (await client.next_for(None)) == {"type": "pong", "data": "z" * 1022}
        await client.send({"type": "ping", "data": "z" * 1023})
        error = await client.next_for(None)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        assert error["ref"] == "ping" and "1025 bytes" in error["message"], error
        await client.send({"type": "ping", "data": {"a": ["b" * 600, "c" * 600]}})
        assert (await client.next_for(None))["code"] == "bad_request"
        await client.send({"type": "ping", "data": 1})
        assert (await client.next_for(None)) == {"type": "pong", "data": 1}
