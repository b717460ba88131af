"""Soak: 1,000 streams over 100 connections, with seeded random cancels (right after start,
after some tokens) and client disconnects mid-stream (close handshake or TCP abort), mostly
on the demo model and some through LiteLLM's real OpenAI provider against the loopback
FakeUpstream. Afterwards nothing of the relay may remain: no stream/session tasks, no
upstream request left open, no sockets; and every stream the client did not abandon got
exactly one ``finish``. No time budget is asserted (bench/capacity.py measures CPU).

Everything waits on events (handler tasks, upstream disconnect events, frames); nothing
sleeps for synchronisation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from websockets.asyncio.client import connect

from llm_relay_protocol import FinishStatus
from relay.app import load_models
from relay.upstream.llm import demo_handler, set_demo_tps
from relay.upstream.providers import ModelRegistry, demo_spec
from relay.upstream.event_streamer import Timeouts
from tests.fakes.upstream import FakeUpstream, stream

from .helpers import SUBPROTOCOL, start_relay

# Settings of the soak relay: the ONE place to add more (e.g. detach_grace=0 once resume
# lands, so a disconnect still cancels at once).
SOAK_SETTINGS: dict = dict(
    detach_grace=0,          # disconnects cancel at once (resume has its own tests)
    demo_tps=400,
    max_streams=8,
    max_connections=1_000,
    max_connections_per_principal=1_000,
    max_pending_per_address=1_000,  # 100 connections from one address open at once
    max_streams_per_principal=10_000,
    start_rate_per_minute=1e9,
    start_burst=100_000,
    frames_per_second=1e6,
    frame_burst=1_000_000,
)

SEED = 20261124
CONNECTIONS = 100
STREAMS_PER_CONNECTION = 10
UPSTREAM_SHARE = 0.1  # of streams through LiteLLM's openai provider -> FakeUpstream
# No time budget is asserted here (a loaded machine would fail it): the CPU a token costs
# is measured by bench/capacity.py, which prints it next to its peers and the targets.
KEY_ENV = "SOAK_FAKE_PROVIDER_KEY"


def socket_fds() -> set[str]:
    """Inodes of the sockets this process holds open."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listdir fd itself)
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


def sockets_to_port(port: int) -> set[str]:
    """Inodes of TCP sockets whose remote end is 127.0.0.1:``port`` (from /proc/net/tcp)."""
    inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            remote_port = int(cols[2].rsplit(":", 1)[1], 16)
            if remote_port == port:
                inodes.add(f"socket:[{cols[9]}]")
    return inodes


@dataclass
class Plan:
    sid: str
    model: str
    max_tokens: int | None
    cancel_after: int | None  # None: let it run; 0: cancel right after start; n: after n tokens


@dataclass
class Outcome:
    finishes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    abandoned: set[str] = field(default_factory=set)
    frames_after_finish: list[dict] = field(default_factory=list)
    disconnects: Counter = field(default_factory=Counter)
    started: int = 0


def plan_connection(rng: random.Random, conn: int) -> tuple[list[Plan], int, str | None]:
    plans = []
    for n in range(STREAMS_PER_CONNECTION):
        upstream = rng.random() < UPSTREAM_SHARE
        roll = rng.random()
        cancel_after = 0 if roll < 0.05 else rng.randint(1, 6) if roll < 0.25 else None
        plans.append(Plan(f"c{conn}s{n}", "oai" if upstream else "demo",
                          None if upstream else rng.randint(3, 25), cancel_after))
    concurrency = rng.randint(1, 4)
    disconnect = rng.choice(["abort", "close"]) if rng.random() < 0.2 else None
    return plans, concurrency, disconnect


async def drive_connection(url: str, rng: random.Random, conn: int, out: Outcome) -> None:
    """One connection: keep up to ``concurrency`` streams running until all 10 are started
    and ended; a planned disconnect happens once all are started and one has a token."""
    plans, concurrency, disconnect = plan_connection(rng, conn)
    pending = list(plans)
    active: dict[str, Plan] = {}
    tokens: Counter = Counter()
    cancelled: set[str] = set()
    finished: set[str] = set()
    last_seq: dict[str, int] = {}
    # open_timeout 60: 100 handshakes at once on a loaded 2-core machine may take over the
    # default 10 s; the soak checks leaks, not handshake latency.
    async with connect(url, subprotocols=[SUBPROTOCOL], open_timeout=60) as ws:
        send = ws.send

        async def recv() -> dict:
            async with asyncio.timeout(15):
                return json.loads(await ws.recv())

        await send('{"type":"hello"}')
        assert (await recv())["type"] == "welcome"
        while pending or active:
            while pending and len(active) < concurrency:
                p = pending.pop(0)
                frame = {"type": "start", "id": p.sid, "model": p.model,
                         "messages": [{"role": "user", "content": f"soak {p.sid}"}]}
                if p.max_tokens is not None:
                    frame["params"] = {"max_tokens": p.max_tokens}
                await send(json.dumps(frame))
                active[p.sid] = p
                out.started += 1
                if p.cancel_after == 0:
                    await send(json.dumps({"type": "cancel", "id": p.sid}))
                    cancelled.add(p.sid)
            frame = await recv()
            sid = frame.get("id")
            kind = frame["type"]
            if sid in finished:
                # only a soft unknown_stream for a cancel that crossed the finish is allowed
                if not (kind == "error" and frame.get("code") == "unknown_stream"):
                    out.frames_after_finish.append(frame)
                continue
            assert kind != "error", frame  # no start of the soak may be refused
            # per stream: started first (seq 0), then seq grows by one per frame
            assert (kind == "started") == (sid not in last_seq), frame
            assert frame["seq"] == last_seq.get(sid, -1) + 1, frame
            last_seq[sid] = frame["seq"]
            if kind == "finish":
                out.finishes[sid] += 1
                out.statuses[frame["status"]] += 1
                finished.add(sid)
                del active[sid]
                if sid in cancelled:
                    assert frame["status"] in (FinishStatus.CANCELLED, FinishStatus.COMPLETED)
                else:
                    assert frame["status"] == FinishStatus.COMPLETED, frame
                continue
            if kind == "token":
                tokens[sid] += 1
                p = active[sid]
                if p.cancel_after and tokens[sid] >= p.cancel_after and sid not in cancelled:
                    await send(json.dumps({"type": "cancel", "id": sid}))
                    cancelled.add(sid)
                if disconnect and not pending:
                    out.abandoned |= set(active)
                    out.disconnects[disconnect] += 1
                    if disconnect == "abort":
                        ws.transport.abort()  # vanish: no close handshake
                    else:
                        await ws.close()
                    return
        # Every stream ended: a ping round-trip flushes anything still in flight.
        await send('{"type":"ping","data":"end"}')
        while (frame := await recv())["type"] != "pong":
            if not (frame["type"] == "error" and frame.get("code") == "unknown_stream"
                    and frame.get("id") in finished):
                out.frames_after_finish.append(frame)


async def test_soak_1000_streams_100_connections_no_leaks(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="relay")
    monkeypatch.setenv(KEY_ENV, "sk-soak")
    rng = random.Random(SEED)
    t0, cpu0 = time.monotonic(), time.process_time()
    fds_before = socket_fds()
    demo = demo_handler()
    async with FakeUpstream() as up:
        defaults = Timeouts(10.0, 10.0, 60.0)
        registry = ModelRegistry([demo_spec(defaults), *load_models({"models": {
            "oai": {"model": "openai/gpt-soak", "api_base": up.openai_base,
                    "api_key_env": KEY_ENV}}}, defaults)])
        set_demo_tps(SOAK_SETTINGS["demo_tps"])  # (build_registry does this for start_relay)
        up.enqueue(*[stream("openai", [f"w{i} " for i in range(12)]).with_delay(0.002)] * 200)
        async with start_relay(registry=registry, **SOAK_SETTINGS) as server:
            opened0, completed0, closed0 = demo.opened, demo.completed, demo.closed_early
            tasks_before = asyncio.all_tasks()
            out = Outcome()
            await asyncio.gather(*(drive_connection(server.url, random.Random(rng.random()),
                                                    conn, out)
                                   for conn in range(CONNECTIONS)))
            # Wait (on the tasks themselves) until the server handled every disconnect.
            handlers = set(server._server.handler_tasks)
            if handlers:
                _, still = await asyncio.wait(handlers, timeout=10)
                assert not still, f"{len(still)} connection handlers still running"
            assert not server.sessions, "sessions remain after every client left"
            stream_tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("stream ")]
            assert not stream_tasks, stream_tasks
            new_tasks = {t for t in asyncio.all_tasks() - tasks_before
                         if t is not asyncio.current_task() and not t.done()}
            # The fake upstream (aiohttp) keeps one idle handler task per keep-alive
            # connection that LiteLLM's HTTP pool holds; they are the fake's, not the relay's
            # (no request is in flight on them: checked below with up._transports).
            keepalive = {t for t in new_tasks
                         if t.get_coro().__qualname__ == "RequestHandler.start"}
            assert not new_tasks - keepalive, f"tasks left behind: {new_tasks - keepalive}"
            # Every demo stream that was opened upstream was closed: completed or early.
            opened = demo.opened - opened0
            assert opened == (demo.completed - completed0) + (demo.closed_early - closed0)
            # Every upstream request through LiteLLM finished or saw its disconnect.
            for rec in up.requests:
                if not rec.completed:
                    await rec.wait_disconnected(timeout=5)
            assert not up._transports, "upstream requests still being served"
            assert server.metrics.active_streams._value.get() == 0
            assert server.metrics.connections._value.get() == 0
        # Sockets: all of the relay's and the clients' are closed. LiteLLM's HTTP client
        # pool may keep idle keep-alive connections to the (now stopped) upstream; those
        # belong to LiteLLM's process-wide client cache, not to the relay.
        pooled = sockets_to_port(up.port)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    leaked = socket_fds() - fds_before - pooled
    assert not leaked, f"sockets left open: {leaked}"

    total_streams = CONNECTIONS * STREAMS_PER_CONNECTION
    assert out.started == total_streams
    assert not out.frames_after_finish, out.frames_after_finish[:5]
    assert all(n == 1 for n in out.finishes.values()), \
        {k: v for k, v in out.finishes.items() if v != 1}
    # every stream not abandoned by a disconnect got its finish
    assert not out.abandoned & set(out.finishes)
    assert len(out.finishes) + len(out.abandoned) == total_streams
    assert out.statuses["cancelled"] > 50 and out.statuses["completed"] > 500, out.statuses
    assert out.disconnects["abort"] and out.disconnects["close"], out.disconnects
    assert len(up.requests) >= 50, "too few streams went through the OpenAI provider"
    assert opened > 800
    # (the fake upstream's aiohttp may log a write to a transport the relay just closed)
    errors = [r for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.split(".")[0] == "relay"]
    assert not errors, [r.getMessage() for r in errors]
    print(f"soak: {elapsed:.1f} s wall, {cpu:.1f} s CPU; finishes {dict(out.statuses)}; "
          f"abandoned {len(out.abandoned)}; disconnects {dict(out.disconnects)}; "
          f"upstream requests {len(up.requests)}; demo streams opened {opened}")
