"""How much one hostile connection slows a normal stream on another connection.

Starts a relay (``relay serve``, built-in demo model at its default pace) as a subprocess,
then measures one normal stream (the demo's ~31-token answer to "hi", start to finish):

  1. unloaded, ``--runs`` times on one connection;
  2. loaded: an attacker process connects and sends the costliest frames it can build within
     the relay's default limits, round-robin, as fast as the frame-rate limit allows
     (a little under ``frames_per_second``, so it is not closed 4429); the same stream is
     measured again.

and prints the median of each and the ratio (goal: loaded within 2x of unloaded).

    python bench/attack_latency.py [--runs 5] [--root DIR]

``--root`` is the checkout whose relay runs (default: this one): export an older commit with
``git archive <commit> | tar -x -C DIR`` to measure "before" with the same attack. The attack
frames are built from this checkout's default ``DecodeLimits``, so both runs get the same
frames; each is at most 1 MiB (the default ``max_frame_bytes``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from llm_relay_protocol import DecodeLimits  # noqa: E402

MAX_FRAME_BYTES = 1 << 20
FRAMES_PER_SECOND = 100          # the relay's default inbound frame rate per connection
SUBPROTOCOL = "llm-relay.v1"


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def attack_frames(limits: DecodeLimits) -> list[tuple[str, str]]:
    """(name, text) of the frames an attacker sends: each is as costly as it can be while
    staying within ``limits`` (or, for the first, the frame issue 10 measured)."""
    frames: list[tuple[str, str]] = []
    # The frame of issue 10: a 1 MB start of 55,000 empty messages.
    frames.append(("55k empty messages", _compact(
        {"type": "start", "id": "a", "model": "demo",
         "messages": [{"role": "user"}] * 55_000})))
    # A start at every count limit, just under max_messages_bytes, that fails validation
    # only at its very last message (so all of it is validated, and no stream starts).
    n = limits.max_messages
    parts_per = max(1, limits.max_content_parts // n)
    keys_left = limits.max_start_keys - n * 2 - n * parts_per * 2 - 2
    extra_per = max(0, keys_left // n)
    budget = limits.max_messages_bytes - 2048
    per_message = budget // n
    filler = "x" * max(0, (per_message - 30 * parts_per - 12 * extra_per - 40) // parts_per)
    message = {"role": "user",
               "content": [{"type": "text", "text": filler}] * parts_per,
               **{f"k{i}": 0 for i in range(extra_per)}}
    messages = [message] * (n - 1) + [{**message, "role": "bogus"}]
    frames.append(("max messages/parts/keys, bad last role", _compact(
        {"type": "start", "id": "b", "model": "demo", "messages": messages})))
    # max_tools tools whose parameters hold the rest of the key budget (small values) and a
    # big nested schema (an opaque value to validation) up to max_messages_bytes; the last
    # tool of a bad type.
    t = limits.max_tools
    keys_per_tool = max(1, (limits.max_start_keys - 16) // t - 5)
    schema_bytes = (limits.max_messages_bytes - 4096) // t - 12 * keys_per_tool - 200
    params = {f"p{i}": 0 for i in range(keys_per_tool)}
    params["properties"] = {"q": {"type": "string", "description": "d" * max(0, schema_bytes)}}
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    tools = [tool] * (t - 1) + [{**tool, "type": "bogus"}]
    text = _compact({"type": "start", "id": "c", "model": "demo",
                     "messages": [{"role": "user", "content": "hi"}], "tools": tools})
    frames.append(("max tools, keys and bytes, bad last type", text))
    # Containers up to max_json_containers, the rest of the frame small integers: the
    # costliest parse; the frame itself is a cancel of an unknown stream.
    c = limits.max_json_containers - 2
    head = '{"type":"cancel","id":"x","pad":[' + "[]," * c
    ints = (MAX_FRAME_BYTES - len(head) - 8) // 2
    frames.append(("max containers + 1 MiB of ints", head + "0," * ints + "0]}"))
    # Nesting at exactly max_json_depth, as many chains as the container limit allows.
    d = limits.max_json_depth - 2                    # frame object + pad array around them
    chain = "[" * d + "]" * d
    chains = min((limits.max_json_containers - 2) // d, (MAX_FRAME_BYTES - 64) // (2 * d + 1))
    frames.append(("max depth chains", '{"type":"cancel","id":"x","pad":['
                   + ",".join([chain] * chains) + "]}"))
    # Nested too deep (255-1023 levels gave internal_error and a traceback), padded with ints.
    deep = 1000
    pad = (MAX_FRAME_BYTES - 2 * deep - 64) // 2
    frames.append(("1000 levels deep + ints", '{"type":"ping","data":' + "[" * deep
                   + "]" * deep + ',"pad":[' + "0," * pad + "0]}"))
    for name, text in frames:
        size = len(text.encode())
        assert size <= MAX_FRAME_BYTES, (name, size)
    return frames


# ---------------------------------------------------------------- attacker process

async def attack(url: str) -> None:
    from websockets.asyncio.client import connect

    frames = [text for _, text in attack_frames(DecodeLimits())]
    interval = 1.0 / (FRAMES_PER_SECOND * 0.95)
    sent = 0
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            async with connect(url, subprotocols=[SUBPROTOCOL], max_size=None) as ws:
                await ws.send(json.dumps({"type": "hello"}))
                await ws.recv()

                async def drain() -> None:
                    async for _ in ws:
                        pass

                reader = asyncio.create_task(drain())
                next_at = time.perf_counter()
                while not stop.is_set():
                    await ws.send(frames[sent % len(frames)])
                    sent += 1
                    next_at += interval
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        next_at = time.perf_counter()     # fell behind: do not burst
                reader.cancel()
        except Exception as exc:                          # closed (e.g. 4429): reconnect
            print(f"attacker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    print(json.dumps({"sent": sent}), flush=True)


# ---------------------------------------------------------------- measurement

async def normal_stream_seconds(url: str, runs: int) -> list[float]:
    from websockets.asyncio.client import connect

    out = []
    async with connect(url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        await ws.recv()
        for i in range(runs):
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "start", "id": f"n{i}", "model": "demo",
                                      "messages": [{"role": "user", "content": "hi"}]}))
            tokens = 0
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("id") != f"n{i}":
                    continue
                if frame["type"] == "token":
                    tokens += 1
                elif frame["type"] in ("finish", "error"):
                    assert frame["type"] == "finish" and frame["status"] == "completed", frame
                    break
            out.append(time.perf_counter() - t0)
    print(f"  {tokens} tokens per stream; runs: "
          + ", ".join(f"{s:.2f}" for s in out) + " s", flush=True)
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(runs: int, root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile(mode="w+")
    relay = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--port", "0"],
                             cwd=root, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    attacker = None
    try:
        line = relay.stdout.readline()
        url = re.search(r"(ws://\S+/ws)", line).group(1)
        print(f"relay from {root} at {url}")
        for name, text in attack_frames(DecodeLimits()):
            print(f"  attack frame: {name}: {len(text.encode())} bytes")
        print("unloaded:")
        await normal_stream_seconds(url, 1)                         # warm up
        quiet = statistics.median(await normal_stream_seconds(url, runs))
        attacker = subprocess.Popen([sys.executable, __file__, "--attacker", url],
                                    env=env, stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(2.0)                                    # let the attack ramp up
        cpu0, t0 = _cpu_seconds(relay.pid), time.perf_counter()
        print("while one connection attacks:")
        loaded = statistics.median(await normal_stream_seconds(url, runs))
        relay_cpu = (_cpu_seconds(relay.pid) - cpu0) / (time.perf_counter() - t0)
        attacker.send_signal(signal.SIGTERM)
        out, _ = attacker.communicate(timeout=30)
        attacker = None
        sent = json.loads(out.strip().splitlines()[-1])["sent"]
        print(f"\nnormal stream, median of {runs}: unloaded {quiet:.2f} s, "
              f"under attack {loaded:.2f} s -> slowdown {loaded / quiet:.1f}x "
              f"(attacker sent {sent} frames; relay CPU {relay_cpu:.0%} of a core meanwhile)")
        log.seek(0)
        errors = sum(" ERROR " in line for line in log)
        print(f"relay log: {errors} ERROR lines")
    finally:
        if attacker is not None:
            attacker.kill()
            attacker.wait()
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="checkout whose relay to run (default: this one)")
    parser.add_argument("--attacker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attacker:
        asyncio.run(attack(args.attacker))
    else:
        asyncio.run(main(args.runs, args.root.resolve()))
