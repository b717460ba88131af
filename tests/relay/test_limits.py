"""Safe to expose: origins, connection/stream/start/frame limits, payload size, graceful
shutdown. Each limit shows its documented answer and that other clients are unaffected."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .helpers import Client, start_relay
from .test_core import _close_of

ROOT = Path(__file__).resolve().parents[2]


async def test_forged_origin_refused_403_own_origin_and_no_origin_accepted():
    async with start_relay() as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect(server.url, subprotocols=["llm-relay.v1"],
                               origin="https://evil.example"):
                pass
        assert info.value.response.status_code == 403
        own = f"http://127.0.0.1:{server.port}"
        async with Client.connect(server.url, origin=own) as c:
            assert c.welcome["type"] == "welcome"
        async with Client.connect(server.url) as c:  # no Origin: not a browser
            assert c.welcome["type"] == "welcome"


async def test_allow_origin_list_and_star():
    async with start_relay(allow_origins=["https://app.example"]) as server:
        async with Client.connect(server.url, origin="https://app.example") as c:
            assert c.welcome
        with pytest.raises(InvalidStatus):
            async with connect(server.url, origin="https://other.example"):
                pass
    async with start_relay(allow_origins=["*"]) as server:
        async with Client.connect(server.url, origin="https://any.example") as c:
            assert c.welcome


async def test_connections_per_principal_close_4429_others_unaffected():
    async with start_relay(max_connections_per_principal=2) as server:
        async with Client.connect(server.url) as a, Client.connect(server.url) as b:
            async with connect(server.url, subprotocols=["llm-relay.v1"]) as third:
                code, reason = await _close_of(third)
            assert code == 4429 and "principal" in reason
            await a.send({"type": "ping"})
            assert (await a.recv())["type"] == "pong"
        # slots are released when connections close
        async with Client.connect(server.url) as again:
            assert again.welcome


async def test_max_connections_per_server_close_4429():
    async with start_relay(max_connections=1) as server:
        async with Client.connect(server.url):
            async with connect(server.url, subprotocols=["llm-relay.v1"]) as second:
                code, reason = await _close_of(second)
    assert code == 4429 and "relay" in reason


async def test_streams_per_principal_too_many_streams():
    async with start_relay(max_streams_per_principal=2, demo_tps=0.5) as server:
        async with Client.connect(server.url) as a, Client.connect(server.url) as b:
            await a.start("1")
            await b.start("2")
            await a.next_for("1")
            await b.next_for("2")
            await b.start("3")
            err = await b.next_for("3")
            assert (err["code"], err["id"]) == ("too_many_streams", "3")
            await a.send({"type": "cancel", "id": "1"})
            assert (await a.collect("1"))[-1]["status"] == "cancelled"
            await b.start("4", params={"max_tokens": 1})
            assert (await b.next_for("4"))["type"] == "started"
            await b.send({"type": "cancel", "id": "2"})
            await b.send({"type": "cancel", "id": "4"})


async def test_start_rate_limit_with_retry_after():
    async with start_relay(start_burst=2, start_rate_per_minute=6) as server:
        async with Client.connect(server.url) as c:
            for sid in ("a", "b"):
                await c.start(sid, params={"max_tokens": 1})
                assert (await c.collect(sid))[-1]["status"] == "completed"
            await c.start("c")
            err = await c.next_for("c")
            assert err["code"] == "rate_limited" and 0 < err["retry_after"] <= 10
            # reconnecting is no way around it
        async with Client.connect(server.url) as c2:
            await c2.start("d")
            assert (await c2.next_for("d"))["code"] == "rate_limited"


async def _start_in_parallel(conns: list[Client], n: int) -> list[dict]:
    """Send ``n`` starts spread over ``conns`` before reading any answer; each stream's
    first answer (``started`` or ``error``), after every started stream has finished."""
    ids = [f"p{i}" for i in range(n)]
    for i, sid in enumerate(ids):
        await conns[i % len(conns)].start(sid, params={"max_tokens": 3})
    firsts = []
    for i, sid in enumerate(ids):
        c = conns[i % len(conns)]
        first = await c.next_for(sid)
        firsts.append(first)
        if first["type"] == "started":
            assert (await c.collect(sid))[-1]["status"] == "completed"
    return firsts


async def test_twelve_parallel_starts_without_auth_are_not_rate_limited():
    # An agent fanning out into 12 streams (two connections: 8 per connection is a separate
    # cap). Without --auth the principal is an address that a whole NAT may share, so no
    # start rate applies unless configured (the old default, 60/min burst 10, refused two).
    async with start_relay(demo_tps=20) as server:
        async with Client.connect(server.url) as a, Client.connect(server.url) as b:
            firsts = await _start_in_parallel([a, b], 12)
            assert [f["type"] for f in firsts] == ["started"] * 12, firsts
            assert [s.conn.principal_state.starts for s in server.sessions] == [None, None]


async def test_start_rate_configured_without_auth_still_applies_burst_from_rate():
    # Only the rate given: the burst is ten seconds' worth of it (12/min -> 2).
    async with start_relay(start_rate_per_minute=12) as server:
        async with Client.connect(server.url) as c:
            firsts = await _start_in_parallel([c], 3)
            assert [f["type"] for f in firsts[:2]] == ["started", "started"]
            assert firsts[2]["code"] == "rate_limited" and 0 < firsts[2]["retry_after"] <= 5


async def test_auth_default_start_rate_is_600_per_minute_burst_100_and_configurable():
    from .test_auth import KEY, auth_relay, hello, label

    async with auth_relay(demo_tps=20) as server:
        async with Client.connect(server.url, hello=False) as a, \
                Client.connect(server.url, hello=False) as b:
            for c in (a, b):
                await c.send(hello(KEY))
                assert (await c.recv())["type"] == "welcome"
            firsts = await _start_in_parallel([a, b], 12)
            assert [f["type"] for f in firsts] == ["started"] * 12, firsts
            bucket = server.principals.get(label(KEY)).starts
            assert bucket is not None and (bucket.rate, bucket.burst) == (10.0, 100)
    async with auth_relay(start_burst=2, start_rate_per_minute=6) as server:
        async with Client.connect(server.url, hello=False) as c:
            await c.send(hello(KEY))
            await c.recv()
            firsts = await _start_in_parallel([c], 3)
            assert [f["type"] for f in firsts[:2]] == ["started", "started"]
            assert firsts[2]["code"] == "rate_limited"


async def test_frame_flood_closes_4429_and_other_connections_keep_serving():
    async with start_relay(frames_per_second=100, frame_burst=200) as server:
        async with Client.connect(server.url) as good, Client.connect(server.url) as flood:
            for _ in range(10_000):
                try:
                    await flood.ws.send('{"type":"ping"}')
                except Exception:
                    break
            code, reason = await _close_of(flood.ws)
            assert code == 4429 and "frames" in reason
            await good.start("ok", params={"max_tokens": 3})
            assert (await good.collect("ok"))[-1]["status"] == "completed"


async def test_messages_payload_limit_is_bad_request_not_close():
    async with start_relay(max_messages_bytes=4096) as server:
        async with Client.connect(server.url) as c:
            await c.start("big", content="x" * 5000)
            err = await c.next_for("big")
            assert err["code"] == "bad_request" and "4096" in err["message"]
            await c.start("small", params={"max_tokens": 1})
            assert (await c.collect("small"))[-1]["status"] == "completed"


def _env() -> dict:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}


async def _http_status(port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    line = (await reader.readline()).decode()
    writer.close()
    await writer.wait_closed()
    return int(line.split()[1])


@pytest.mark.parametrize("drain_timeout", [30.0, 0.5])
async def test_sigterm_drains_then_closes_1001_and_exits_0(drain_timeout):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", "20",
        "--drain-timeout", str(drain_timeout), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = re.search(r"(ws://\S+/ws)", line).group(1)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        async with Client.connect(url) as c:
            await c.start("s", params={"max_tokens": 25})  # ~1.25 s at 20 tokens/s
            assert (await c.next_for("s"))["type"] == "started"
            assert (await c.next_for("s"))["type"] == "token"
            proc.send_signal(signal.SIGTERM)
            assert "draining" in (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert await _http_status(port, "/readyz") == 503
            with pytest.raises(InvalidStatus):
                async with connect(url, subprotocols=["llm-relay.v1"]):
                    pass
            await c.start("late")
            assert (await c.next_for("late"))["code"] == "draining"
            frames = await c.collect("s")
            if drain_timeout > 2:
                assert (frames[-1]["status"], frames[-1]["reason"]) == ("completed", "length")
            else:
                assert (frames[-1]["status"], frames[-1]["reason"]) == (
                    "cancelled", "server_shutdown")
            code, _ = await _close_of(c.ws)
            assert code == 1001
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_metrics_endpoint_counts_streams_tokens_errors_and_cancels():
    async with start_relay(demo_tps=0) as server:
        async with Client.connect(server.url) as c:
            await c.start("a", params={"max_tokens": 4})
            await c.collect("a")
            await c.start("x", model="nope")
            await c.next_for("x")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = int(re.search(r"(?i)content-length: (\d+)", head).group(1))
            body = (await reader.readexactly(length)).decode()
            writer.close()
            await writer.wait_closed()
    assert " 200 " in head.splitlines()[0] and "text/plain" in head
    assert "relay_connections 1.0" in body
    assert 'relay_streams_total{status="completed"} 1.0' in body
    assert "relay_tokens_total 4.0" in body
    assert 'relay_errors_total{code="unknown_model"} 1.0' in body
    assert "relay_time_to_first_token_seconds_count 1.0" in body
    assert "relay_added_latency_seconds_count" in body
    assert "relay_active_streams 0.0" in body
