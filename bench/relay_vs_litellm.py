"""Side-by-side benchmark: the same as-fast-as-possible source (the embedded demo model,
tps=0, running inside LiteLLM) streamed N tokens

  (a) directly through ``litellm.acompletion(stream=True)`` in this process, and
  (b) end to end through the relay (a ``relay serve`` subprocess) to a websockets client,

in one run, and prints tokens/s of each, the ratio b/a, and the relay process's CPU µs per
frame minus LiteLLM's own CPU µs per chunk measured in (a).

    python bench/relay_vs_litellm.py [--tokens 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _messages(tokens: int) -> list[dict]:
    # The demo echoes the user's words, so a prompt of N words yields > N reply tokens;
    # max_tokens then cuts the reply at exactly N.
    return [{"role": "user", "content": " ".join(f"w{i}" for i in range(tokens))}]


async def bench_litellm(tokens: int) -> tuple[float, float]:
    """(tokens/s, CPU µs per chunk) for LiteLLM alone."""
    from relay.upstream.llm import get_litellm, set_demo_tps

    litellm = get_litellm()
    set_demo_tps(0)
    cpu0, t0 = time.process_time(), time.perf_counter()
    response = await litellm.acompletion(
        model="llm-relay-demo/demo", messages=_messages(tokens), stream=True,
        max_tokens=tokens, stream_options={"include_usage": True})
    n = 0
    async for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert n == tokens, (n, tokens)
    return n / wall, cpu / n * 1e6


def _proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def bench_relay(url: str, pid: int, tokens: int) -> tuple[float, float]:
    """(tokens/s end to end, relay process CPU µs per frame)."""
    from websockets.asyncio.client import connect

    async with connect(url, subprotocols=["llm-relay.v1"], max_size=None) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        await ws.recv()
        cpu0, t0 = _proc_cpu_seconds(pid), time.perf_counter()
        await ws.send(json.dumps({"type": "start", "id": "b", "model": "demo",
                                  "messages": _messages(tokens),
                                  "params": {"max_tokens": tokens}}))
        n = 0
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "token":
                n += 1
            elif frame["type"] == "finish":
                break
        wall = time.perf_counter() - t0
        cpu = _proc_cpu_seconds(pid) - cpu0
    assert n == tokens, (n, tokens)
    return n / wall, cpu / (n + 2) * 1e6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--port", str(port), "--demo-tps", "0",
         "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "llm-relay listening on ..." once ready
        url = f"ws://127.0.0.1:{port}/ws"
        await bench_litellm(200)  # warm-up both paths
        await bench_relay(url, proc.pid, 200)
        rows = []
        for _ in range(args.rounds):
            a_tps, a_cpu = await bench_litellm(args.tokens)
            b_tps, b_cpu = await bench_relay(url, proc.pid, args.tokens)
            rows.append((a_tps, a_cpu, b_tps, b_cpu))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"{args.tokens} tokens per run, {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'round':>5} {'litellm tok/s':>14} {'relay tok/s':>12} {'ratio b/a':>10} "
          f"{'litellm µs/chunk':>17} {'relay µs/frame':>15} {'relay-only µs':>14}")
    for i, (a_tps, a_cpu, b_tps, b_cpu) in enumerate(rows, 1):
        print(f"{i:>5} {a_tps:>14.0f} {b_tps:>12.0f} {b_tps / a_tps:>10.2f} "
              f"{a_cpu:>17.0f} {b_cpu:>15.0f} {b_cpu - a_cpu:>14.0f}")
    med = sorted(rows, key=lambda r: r[2] / r[0])[len(rows) // 2]
    print(f"median ratio b/a = {med[2] / med[0]:.2f}; relay CPU per frame excluding "
          f"LiteLLM ≈ {med[3] - med[1]:.0f} µs")


if __name__ == "__main__":
    asyncio.run(main())
