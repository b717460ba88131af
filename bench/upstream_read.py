"""CPU per chunk of reading the upstream's SSE: the fast path's transport vs bare aiohttp.

Starts bench/fake_upstream.py (a process of its own, so its CPU is not counted) and reads
``--streams`` paced streams at once (``--interval`` seconds between chunks, so that each
socket read carries one chunk, as with a real provider flushing each token) through each
client, alternating, ``--rounds`` times, and prints this process's CPU us per chunk
(min/median/max). Both readers do the same work per chunk: the relay's SSEParser.feed.

  aiohttp   one aiohttp.ClientSession (llhttp in C), body from ``response.content.iter_any()``
  relay     httpx.AsyncClient on relay.upstream.transport.AiohttpTransport (the fast path's
            transport: aiohttp underneath, httpx's API on top), body from
            ``response.stream`` as the fast path does

The row for httpx's own stack (h11 in Python, the transport before aiohttp) is gone with
the frozen copy of that transport it needed; the numbers it gave are in
relay/upstream/transport.py's docstring and bench/results/.

    python bench/upstream_read.py [--streams 100] [--tokens 200] [--interval 0.01] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _body(tokens: int, interval: float) -> bytes:
    import orjson

    return orjson.dumps({"model": "bench-model", "stream": True,
                         "stream_options": {"include_usage": True},
                         "messages": [{"role": "user",
                                       "content": f"tokens={tokens} interval={interval}"}]})


async def read_relay(url: str, streams: int, body: bytes) -> int:
    import httpx

    from relay.upstream.sse import SSEParser
    from relay.upstream.transport import AiohttpTransport

    async with httpx.AsyncClient(timeout=60, transport=AiohttpTransport()) as client:
        async def one() -> int:
            events = 0
            request = client.build_request("POST", url, content=body,
                                           headers={"content-type": "application/json"})
            response = await client.send(request, stream=True)
            try:
                feed = SSEParser().feed
                async for chunk in response.stream:
                    events += len(feed(chunk))
            finally:
                await response.aclose()
            return events
        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def read_aiohttp(url: str, streams: int, body: bytes) -> int:
    import aiohttp

    from relay.upstream.sse import SSEParser

    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        async def one() -> int:
            events = 0
            async with session.post(url, data=body,
                                    headers={"content-type": "application/json"}) as response:
                feed = SSEParser().feed
                async for chunk in response.content.iter_any():
                    events += len(feed(chunk))
            return events
        return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py")],
                                stdout=subprocess.PIPE, text=True)
    try:
        port = int(upstream.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = _body(args.tokens, args.interval)
        readers = {"aiohttp": read_aiohttp, "relay": read_relay}
        for reader in readers.values():           # warm up (imports, first connections)
            await reader(url, 2, _body(5, 0))
        cost: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, reader in readers.items():
                cpu = time.process_time()
                events = await reader(url, args.streams, body)
                cost[name].append((time.process_time() - cpu) / events * 1e6)
        print(f"{args.streams} streams x {args.tokens} chunks, {args.interval}s apart; "
              f"CPU us per SSE event, min/median/max of {args.rounds} (load {os.getloadavg()[0]:.2f})")
        for name, values in cost.items():
            print(f"  {name:8} {min(values):6.1f} {statistics.median(values):6.1f} "
                  f"{max(values):6.1f}")
        print(f"  relay / aiohttp: "
              f"{statistics.median(cost['relay']) / statistics.median(cost['aiohttp']):.2f}")
    finally:
        upstream.terminate()
        upstream.wait()


if __name__ == "__main__":
    asyncio.run(main())
