"""Is the relay's event loop blocked in the first seconds after ``relay serve`` says
"listening"? (issue 21 item 7)

    python bench/cold_start.py [--root PATH] [--runs N] [--seconds S]
    python bench/cold_start.py --listening-vs OTHER_ROOT [--runs N]   # startup time only
    python bench/cold_start.py --steps [--root PATH]   # longest loop step, in-process

``--root``: the checkout whose relay is started (default: this one; e.g. a
``git worktree add /tmp/base 9290a60`` to measure the code before the fix).

For each case (the built-in ``demo`` model; an alias on the fast path and one with
``fast = false`` (LiteLLM's openai/ provider code), both pointed at a loopback fake OpenAI
upstream, ``bench/fake_upstream.py``, streaming 20 chunks 10 ms apart) it starts a fresh
``relay serve`` subprocess and, as soon as "listening" is printed, connects one WebSocket
that sends the v1 app-level ``ping`` every 10 ms and, on the same connection, starts a
stream at once and a new one every 200 ms (so streams start at every moment of the
window), for ``--seconds`` (5). It prints, per run, the seconds from spawning the process to
"listening", the longest gap between two consecutive pongs (a loop blocked for X ms shows
as a gap of about X + 10 ms), the slowest ping round trip, and how many streams completed;
then the same again on the same process ``LATER`` (12) seconds after "listening", long after
any start-up work: the machine's own noise floor to compare with. The client, the fake
upstream and the relay are separate processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PING_PERIOD = 0.01
STREAM_PERIOD = 0.2
UPSTREAM_PROMPT = "tokens=20 interval=0.01"
#: When the second window (the noise floor, long after any start-up work) begins.
LATER = 12.0


async def start_fake_upstream() -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HERE / "fake_upstream.py"), "--port", "0",
        stdout=subprocess.PIPE)
    line = (await proc.stdout.readline()).decode()
    return proc, int(line.split()[1])


def write_config(directory: str, upstream_port: int) -> str:
    path = os.path.join(directory, "models.toml")
    base = f"http://127.0.0.1:{upstream_port}/v1"
    with open(path, "w") as f:
        f.write('[models.demo]\nmodel = "demo"\n\n')
        for name, fast in (("up-fast", "true"), ("up-litellm", "false")):
            f.write(f'[models.{name}]\nmodel = "openai/bench-model"\napi_base = "{base}"\n'
                    f'api_key_env = "BENCH_KEY"\nfast = {fast}\n\n')
    return path


async def probe(url: str, model: str, seconds: float) -> tuple[float, float, int, list[str]]:
    """(longest gap between pongs, slowest round trip, streams completed, why the others
    failed) over ``seconds`` from the connection's start (streams still running at its end
    are not counted)."""
    from websockets.asyncio.client import connect

    prompt = UPSTREAM_PROMPT if model != "demo" else "hi"
    async with connect(url, subprotocols=["llm-relay.v1"], max_size=None) as ws:
        await ws.send('{"type":"hello"}')
        await ws.recv()
        deadline = time.perf_counter() + seconds
        sent: dict[str, float] = {}
        last_pong: float | None = None
        longest_gap = slowest_rtt = 0.0
        completed = 0
        failed: list[str] = []

        async def pinger() -> None:
            i = 0
            while time.perf_counter() < deadline:
                sent[str(i)] = time.perf_counter()
                await ws.send(json.dumps({"type": "ping", "data": str(i)}))
                i += 1
                await asyncio.sleep(PING_PERIOD)

        async def starter() -> None:
            n = 0
            while time.perf_counter() < deadline:
                await ws.send(json.dumps({"type": "start", "id": f"s{n}", "model": model,
                                          "messages": [{"role": "user", "content": prompt}]}))
                n += 1
                await asyncio.sleep(STREAM_PERIOD)

        tasks = [asyncio.create_task(pinger()), asyncio.create_task(starter())]
        try:
            while time.perf_counter() < deadline:
                try:
                    async with asyncio.timeout(max(deadline - time.perf_counter(), 0.001)):
                        frame = json.loads(await ws.recv())
                except TimeoutError:
                    break
                now = time.perf_counter()
                if frame["type"] == "pong":
                    slowest_rtt = max(slowest_rtt, now - sent.pop(frame["data"]))
                    if last_pong is not None:
                        longest_gap = max(longest_gap, now - last_pong)
                    last_pong = now
                elif frame["type"] == "finish":
                    if frame.get("status") == "completed":
                        completed += 1
                    else:
                        failed.append(f"{frame.get('status')}/{frame.get('reason')}")
                elif frame["type"] == "error" and frame.get("id"):
                    failed.append(str(frame.get("code")))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return longest_gap, slowest_rtt, completed, failed


async def one_run(root: str, config: str, model: str, seconds: float) -> str:
    env = {**os.environ, "PYTHONPATH": root, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "BENCH_KEY": "sk-bench"}
    spawned = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", "--config", config,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=root)
    try:
        line = (await proc.stdout.readline()).decode()
        listening = time.perf_counter() - spawned
        url = line.split("listening on ")[1].split()[0]
        opened = time.perf_counter()
        first = await probe(url, model, seconds)
        # The same probe on the same process later on: the machine's own noise floor.
        await asyncio.sleep(max(0.0, opened + LATER - time.perf_counter()))
        later = await probe(url, model, seconds)
    finally:
        proc.terminate()
        await proc.wait()
    return f"{model:<11} listening after {listening:5.2f} s | " + " | ".join(
        f"{gap * 1000:4.0f} / {rtt * 1000:4.0f} ms, {done}/{done + len(failed)} ok"
        + (f" ({', '.join(sorted(set(failed)))})" if failed else "")
        for gap, rtt, done, failed in (first, later))


async def time_to_listening(root: str) -> float:
    """Seconds from spawning ``relay serve`` (the demo model) to its "listening" line."""
    env = {**os.environ, "PYTHONPATH": root, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    spawned = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--port", "0", stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=env, cwd=root)
    try:
        await proc.stdout.readline()
        return time.perf_counter() - spawned
    finally:
        proc.terminate()
        await proc.wait()


async def longest_steps(root: str, config: str) -> None:
    """In this process, on asyncio's own loop (its ``Handle._run`` is Python, so each
    callback can be timed; the machine's noise is not in it): a relay started as
    ``relay serve`` starts it (bind, warm-up, listen; a checkout from before: listen, then
    the warm-up in its thread), then per alias its first and second stream, right away;
    prints the longest single event-loop step of each."""
    import asyncio.events

    sys.path.insert(0, root)
    os.environ["BENCH_KEY"] = "sk-bench"
    from relay.app import build_registry
    from relay.config import RelaySettings
    from relay.runtime.server import RelayServer
    from relay.runtime.warmup import start_warm_up

    settings = RelaySettings(port=0, config=config, demo_tps=0)
    server = RelayServer(settings, build_registry(settings))
    if hasattr(server, "listen"):       # as relay serve starts now
        await server.start(listen=False)
        warm = start_warm_up()
        await asyncio.to_thread(warm.done.wait)
        await server.listen()
    else:                               # as it did before (9290a60): warm-up after listening
        await server.start()
        start_warm_up()
    longest = [0.0]
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        started = time.perf_counter()
        run(handle)
        longest[0] = max(longest[0], time.perf_counter() - started)

    from websockets.asyncio.client import connect

    asyncio.events.Handle._run = timed
    try:
        for model in ("demo", "up-fast", "up-litellm"):
            steps = []
            for _ in range(2):
                longest[0] = 0.0
                async with connect(server.url, subprotocols=["llm-relay.v1"]) as ws:
                    await ws.send('{"type":"hello"}')
                    await ws.recv()
                    await ws.send(json.dumps({"type": "start", "id": "s", "model": model,
                                              "messages": [{"role": "user",
                                                            "content": "tokens=5"}]}))
                    while json.loads(await ws.recv())["type"] != "finish":
                        pass
                steps.append(longest[0])
            print(f"{model:<11} longest loop step: first stream {steps[0] * 1000:5.1f} ms, "
                  f"second {steps[1] * 1000:5.1f} ms")
    finally:
        asyncio.events.Handle._run = run
        await server.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(HERE.parent))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--listening-vs", metavar="ROOT",
                        help="only time spawn -> 'listening', alternating --root and ROOT "
                             "(--runs times each; the machine's load hits both alike)")
    parser.add_argument("--steps", action="store_true",
                        help="time each event-loop step of a first and second stream per "
                             "alias in this process (asyncio's loop) instead")
    args = parser.parse_args()
    if args.steps:
        upstream, port = await start_fake_upstream()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                await longest_steps(args.root, write_config(tmp, port))
        finally:
            upstream.terminate()
            await upstream.wait()
        return
    if args.listening_vs:
        times: dict[str, list[float]] = {args.root: [], args.listening_vs: []}
        for _ in range(args.runs):
            for root in times:
                times[root].append(await time_to_listening(root))
        for root, seconds in times.items():
            print(f"{root}: spawn -> 'listening' " + ", ".join(f"{t:.2f}" for t in seconds)
                  + f" s (median {sorted(seconds)[len(seconds) // 2]:.2f} s)")
        return
    upstream, port = await start_fake_upstream()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = write_config(tmp, port)
            commit = subprocess.run(["git", "-C", args.root, "log", "-1", "--format=%h %s"],
                                    capture_output=True, text=True).stdout.strip()[:70]
            print(f"root {args.root} ({commit})\nping every {PING_PERIOD * 1000:.0f} ms, "
                  f"a new stream every {STREAM_PERIOD * 1000:.0f} ms, for {args.seconds:g} s "
                  f"from 'listening', then again {LATER:g} s after it\n"
                  "per run: time from spawn to 'listening' | first window: longest gap "
                  "between pongs / slowest ping, streams completed | later window: same")
            for model in ("demo", "up-fast", "up-litellm"):
                for _ in range(args.runs):
                    print(await one_run(args.root, config, model, args.seconds), flush=True)
    finally:
        upstream.terminate()
        await upstream.wait()


if __name__ == "__main__":
    asyncio.run(main())
