"""Does the first stream after ``relay serve`` starts stall the event loop? (issue 14 item 11)

    python bench/first_stream.py [--root PATH]    # PATH: a checkout to measure (default: this)

Starts ``relay serve`` (demo model, 50 tokens/s), waits for its warm-up log line (at most
8 s: older builds have none), then runs the first stream while the client pings the relay
every 10 ms: the slowest pong is how long the relay's loop was blocked meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": args.root, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", "50",
        "--log-level", "info", stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        cwd=args.root)
    try:
        line = (await proc.stdout.readline()).decode()
        url = line.split("listening on ")[1].split()[0]
        warmed = False
        try:
            async with asyncio.timeout(8):
                while b"warmed up" not in await proc.stderr.readline():
                    pass
                warmed = True
        except TimeoutError:
            pass
        from websockets.asyncio.client import connect

        async with connect(url, subprotocols=["llm-relay.v1"]) as ws:
            await ws.send('{"type":"hello"}')
            await ws.recv()
            await ws.send(json.dumps({"type": "start", "id": "a", "model": "demo",
                                      "messages": [{"role": "user", "content": "first"}]}))
            sent: dict[str, float] = {}
            rtts: list[float] = []
            finished = asyncio.Event()

            async def pinger() -> None:
                i = 0
                while not finished.is_set():
                    sent[str(i)] = time.perf_counter()
                    await ws.send(json.dumps({"type": "ping", "data": str(i)}))
                    i += 1
                    await asyncio.sleep(0.01)     # the probe's period

            task = asyncio.create_task(pinger())
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "pong":
                    rtts.append(time.perf_counter() - sent.pop(frame["data"]))
                elif frame["type"] == "finish":
                    break
            finished.set()
            await task
    finally:
        proc.terminate()
        await proc.wait()
    rtts.sort()
    print(f"warm-up logged: {warmed}; during the first stream the slowest pong took "
          f"{rtts[-1] * 1000:.0f} ms (median {rtts[len(rtts) // 2] * 1000:.1f} ms, "
          f"{len(rtts)} pings)")


if __name__ == "__main__":
    asyncio.run(main())
