"""Micro-benchmark of the relay's own layers: what one token costs in llm-relay's code, with
no LiteLLM and no network upstream.

    python bench/relay_layers.py [--tokens 20000] [--streams 1] [--reps 5]

A scripted upstream (an ``acompletion``-compatible callable yielding OpenAI-shaped chunk
objects, injected through ``EventStreamer(completion=...)`` and the server's
``streamer_factory``) feeds a real ``RelayServer`` in this process; a websockets client in
a separate process reads the frames over loopback (so its CPU is not counted here). CPU is
this process's (``time.process_time``), per token frame. Layers, measured one on top of the
other in the same run and subtracted:

  streamer   EventStreamer.events(): chunk -> TextDelta (timers, cancel checks)
  hub + log  UpstreamSource + StreamHub: event -> frame dict -> orjson bytes ->
             FrameLog.append, metrics
  wake-up    asyncio alone: one task waking another through an Event, per frame
  writer     Session's writer: log -> coalesce -> ws.send (latency metric, cursor, lag check)
  websockets ws.send of the same bytes alone: framing + transport write + socket

(``total`` is the full path; ``writer`` = total - hub+log - wake-up - websockets, the others
measured directly.)
The issue's budget for the relay's own code (event -> frame -> log -> writer -> socket) is
15 us per frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relay.config import RelaySettings  # noqa: E402
from relay.runtime.hub import StreamHub  # noqa: E402
from relay.metrics import RelayMetrics  # noqa: E402
from relay.upstream.providers import ModelRegistry  # noqa: E402
from relay.runtime.server import RelayServer  # noqa: E402
from relay.upstream.source import UpstreamSource  # noqa: E402
from relay.upstream.event_streamer import EventStreamer, Timeouts  # noqa: E402

BUDGET_US = 15.0
TIMEOUTS = Timeouts()

_CLIENT = r"""
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    url, streams = sys.argv[1], int(sys.argv[2])
    async with connect(url, subprotocols=["llm-relay.v1"], max_size=None,
                       compression=None) as ws:
        await ws.send('{"type":"hello"}'); await ws.recv()
        print("ready", flush=True)
        while True:
            line = sys.stdin.readline()
            if not line:
                return
            for i in range(streams):
                await ws.send('{"type":"start","id":"s%d","model":"demo","messages":'
                              '[{"role":"user","content":"x"}]}' % i)
            frames = finished = 0
            while finished < streams:
                data = await ws.recv(decode=False)
                frames += 1
                if b'"type":"finish"' in data:
                    finished += 1
            print(frames, flush=True)
asyncio.run(main())
"""


def _chunk(text: str | None, finish: str | None = None) -> SimpleNamespace:
    delta = SimpleNamespace(content=text, tool_calls=None, reasoning_content=None)
    return SimpleNamespace(choices=[SimpleNamespace(delta=delta, finish_reason=finish)])


_SCRIPTS: dict[int, list] = {}


class ScriptedResponse:
    """What ``acompletion(stream=True)`` returns, minus the provider: ``tokens`` chunks
    (built once per size, outside the measured rounds)."""

    def __init__(self, tokens: int) -> None:
        if tokens not in _SCRIPTS:
            _SCRIPTS[tokens] = [_chunk(f"w{chr(97 + i % 26)}~ ") for i in range(tokens)] + [
                _chunk(None, "stop")]
        self._chunks = _SCRIPTS[tokens]
        # The provider's usage, so no estimate (a tokenizer) runs at the end.
        self.chunks = [SimpleNamespace(usage=SimpleNamespace(prompt_tokens=5,
                                                             completion_tokens=tokens))]

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        for chunk in self._chunks:
            # Each chunk arrives in a read of its own (a paced model): the loop turns, the
            # writer sends it alone. The worst case per frame, and the usual one.
            await asyncio.sleep(0)
            yield chunk

    async def aclose(self) -> None:
        pass


def scripted_streamer(tokens: int) -> EventStreamer:
    async def completion(**kwargs):
        return ScriptedResponse(tokens)

    # The relay's default timeouts (first token, idle, total), armed as in production.
    return EventStreamer("scripted", completion=completion, timeouts=TIMEOUTS)


async def streamer_only(tokens: int) -> float:
    streamer = scripted_streamer(tokens)
    cpu = time.process_time()
    n = 0
    async for _ in streamer.events([{"role": "user", "content": "x"}]):
        n += 1
    return (time.process_time() - cpu) / tokens * 1e6


async def wake_up(count: int) -> float:
    """asyncio alone: a producer task that yields once per item (as the streamer does) and
    wakes a consumer task through an Event (as an append wakes the writer), minus the same
    producer without a consumer: the scheduling cost of handing a frame to another task."""
    async def produce(event: asyncio.Event | None) -> None:
        for _ in range(count):
            await asyncio.sleep(0)
            if event is not None:
                event.set()

    cpu = time.process_time()
    await produce(None)
    alone = time.process_time() - cpu
    event = asyncio.Event()
    stop = False

    async def consume() -> None:
        while not stop:
            await event.wait()
            event.clear()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0)
    cpu = time.process_time()
    await produce(event)
    both = time.process_time() - cpu
    stop = True
    event.set()
    await consumer
    return (both - alone) / count * 1e6


async def hub_and_log(tokens: int, settings: RelaySettings) -> float:
    """Streamer + hub + frame log, no connection attached (the log keeps everything)."""
    hub = StreamHub(settings, RelayMetrics())
    from relay.core.limits import PrincipalState

    cpu = time.process_time()
    source = UpstreamSource(scripted_streamer(tokens),
                            {"messages": [{"role": "user", "content": "x"}]},
                            metrics=hub.metrics)
    stream = hub.launch(id="s", alias="demo", principal="p", session_id="x",
                        principal_state=PrincipalState(), source=source)
    await stream.task
    used = time.process_time() - cpu
    await hub.close("server_shutdown")
    return used / tokens * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-timeouts", action="store_true",
                        help="streams without first-token/idle/total timers")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the full path once and print the top functions")
    args = parser.parse_args()
    tokens = args.tokens
    if args.no_timeouts:
        global TIMEOUTS
        TIMEOUTS = Timeouts(None, None, None)
    ScriptedResponse(tokens)
    ScriptedResponse(tokens * args.streams)
    settings = RelaySettings(port=0, demo_tps=0, max_streams=max(8, args.streams),
                             max_streams_per_principal=max(32, args.streams),
                             start_rate_per_minute=1e9, start_burst=10**9,
                             frames_per_second=1e9, frame_burst=10**9)
    server = RelayServer(settings, ModelRegistry.demo_only(),
                         streamer_factory=lambda spec: scripted_streamer(tokens))
    await server.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, server.url, str(args.streams),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert (await client.stdout.readline()).strip() == b"ready"
    rows: dict[str, list[float]] = {k: [] for k in
                                    ("streamer", "hub + log", "total", "websockets", "wake")}
    frames_sent: list[float] = []
    system_share: list[float] = []
    bare = await _BareSender.start()
    try:
        for rep in range(args.reps + 1):             # the first one warms up
            rows_now = {}
            rows_now["streamer"] = await streamer_only(tokens)
            rows_now["hub + log"] = await hub_and_log(tokens * args.streams, settings)
            profiler = None
            if args.profile and rep == args.reps:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            cpu = time.process_time()
            times0 = os.times()
            client.stdin.write(b"go\n")
            await client.stdin.drain()
            frames = int(await client.stdout.readline())
            if profiler is not None:
                profiler.disable()
                import pstats

                pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            total_tokens = tokens * args.streams
            rows_now["total"] = (time.process_time() - cpu) / total_tokens * 1e6
            times1 = os.times()
            system_share.append((times1.system - times0.system)
                                / max(1e-9, (times1.user + times1.system
                                             - times0.user - times0.system)))
            rows_now["websockets"] = await bare.per_frame(tokens)
            rows_now["wake"] = await wake_up(tokens)
            if rep:
                for key, value in rows_now.items():
                    rows[key].append(value)
                frames_sent.append(frames / total_tokens)
    finally:
        client.stdin.close()
        await client.wait()
        await bare.close()
        await server.close()

    def med(key):
        return statistics.median(rows[key])

    writer = [t - h - w - k for t, h, w, k in zip(rows["total"], rows["hub + log"],
                                                   rows["websockets"], rows["wake"])]
    # The budget's scope: event -> frame -> log -> writer -> socket (not chunk -> event).
    own = [t - w - st for t, w, st in zip(rows["total"], rows["websockets"], rows["streamer"])]
    print(f"relay layers: {tokens:,} tokens x {args.streams} stream(s), {args.reps} reps; "
          f"CPU of the relay process, us per token frame (min / median / max)")
    print(f"  frames sent per token: {statistics.median(frames_sent):.2f} "
          "(below 1: a lagging client's tokens were merged)")

    def line(name, values):
        values = sorted(values)
        print(f"  {name:<56} {values[0]:6.1f} / {statistics.median(values):6.1f} / "
              f"{values[-1]:6.1f}")

    print(f"  kernel (system) share of the full path's CPU: "
          f"{statistics.median(system_share):.0%}")
    line("streamer (chunk -> event)", rows["streamer"])
    line("hub + log (event -> frame -> log)", [h - s for h, s in zip(rows["hub + log"],
                                                                      rows["streamer"])])
    line("asyncio: waking the writer task", rows["wake"])
    line("writer (log -> coalesce -> send)", writer)
    line("websockets + socket", rows["websockets"])
    line("total", rows["total"])
    line("event -> socket, own code (total - streamer - websockets)", own)
    verdict = "within" if statistics.median(own) <= BUDGET_US else "OVER"
    print(f"  budget for the relay's own code: {BUDGET_US:g} us per frame -> {verdict}")


class _BareSender:
    """websockets alone: a server that sends N pre-encoded token frames to one client
    (another process reading them), so its per-frame CPU can be subtracted."""

    def __init__(self) -> None:
        self.server = None
        self.client = None
        self.ws = None
        self._connected = asyncio.Event()

    @classmethod
    async def start(cls) -> "_BareSender":
        from websockets.asyncio.server import serve

        self = cls()

        async def handler(ws):
            self.ws = ws
            self._connected.set()
            await ws.wait_closed()

        self.server = await serve(handler, "127.0.0.1", 0, compression=None)
        port = self.server.sockets[0].getsockname()[1]
        self.client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BARE_CLIENT, f"ws://127.0.0.1:{port}",
            stdout=subprocess.PIPE)
        await self._connected.wait()
        return self

    async def per_frame(self, count: int) -> float:
        frame = (b'{"type":"token","id":"s0","seq":12345,"text":"wq~ "}')
        end = b'{"type":"finish"}'
        cpu = time.process_time()
        for _ in range(count):
            # One frame per loop turn, as the relay's writer sends when a client keeps up.
            await asyncio.sleep(0)
            await self.ws.send(frame, text=True)
        await self.ws.send(end, text=True)
        await self.client.stdout.readline()
        return (time.process_time() - cpu) / count * 1e6

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.client.wait()
        self.server.close()
        await self.server.wait_closed()


_BARE_CLIENT = r"""
import asyncio, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1], max_size=None, compression=None) as ws:
        n = 0
        async for data in ws:
            n += 1
            if data == '{"type":"finish"}':
                print(n, flush=True); n = 0
asyncio.run(main())
"""


if __name__ == "__main__":
    # The loop `relay serve` runs on by default (uvloop when installed); `--loop asyncio`
    # in RELAY_EVENT_LOOP measures asyncio's own.
    from relay.runtime.eventloop import choose_loop, run

    loop = choose_loop(os.environ.get("RELAY_EVENT_LOOP", "auto"))
    print(f"event loop: {loop.name}", flush=True)
    run(main(), loop)
