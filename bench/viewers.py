"""Fan-out cost of viewers: one stream watched by 1, 10 and 100 viewers, side by side.

Starts a relay (``relay serve``, the built-in demo model paced at ``--tps`` tokens/s) as a
subprocess. For each viewer count N, one connection starts a stream (the *owner*) and N
other connections join it with a plain ``resume`` after seq 0 (PROTOCOL.md "Viewers"), each
on its own connection, all read by this process. Per N it prints:

* relay CPU per delivered viewer-token: the relay process's CPU time (its threads' run time
  from /proc/<pid>/task/*/schedstat, in ns) from the ``start`` to the last ``finish``, divided
  by the tokens delivered to every attachment (the answer's ``completion_tokens`` x (N + 1));
  and the marginal cost, what each token delivered to one more viewer adds: (CPU at N - CPU
  at the first count) / (delivered at N - delivered at the first count), which leaves out
  the stream's own cost (the upstream call, the owner);
* the added latency of the slowest viewer: for each live token frame a viewer gets (seq
  above the owner's last seq when the last viewer had joined, so replays do not count), the
  time after the owner got the frame carrying that seq (negative when the viewer's writer ran
  first); p50, p99 and max of the viewer whose p99 is worst, and the p99 over all viewers.

    python bench/viewers.py [--tps 50] [--words 300] [--counts 1,10,100] [--rounds 1]

Caveat: the viewers are read by this one Python process, so at 100 viewers part of the
"added latency" is this process's own turn-taking, not the relay's; the relay's CPU figure
is its own process only.
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

from websockets.asyncio.client import connect  # noqa: E402

SUBPROTOCOL = "llm-relay.v1"


def relay_cpu_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` so far, in ns (schedstat resolves below /proc's
    10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass    # a thread that just ended
    return total


async def _open(url: str):
    ws = await connect(url, subprotocols=[SUBPROTOCOL], max_size=None)
    await ws.send(json.dumps({"type": "hello",
                              "client": {"name": "bench-viewers", "version": "0"}}))
    welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    return ws


async def _read(ws, id: str, times: dict[int, float]) -> dict:
    """Frames of ``id`` until its finish: each frame's seq -> when it arrived."""
    clock = time.perf_counter
    while True:
        frame = json.loads(await ws.recv())
        if frame.get("id") != id:
            continue
        if "seq" in frame:
            times[frame["seq"]] = clock()
        if frame["type"] == "finish":
            return frame
        if frame["type"] == "error":
            raise RuntimeError(f"{id}: {frame}")


def _owner_time(owner: dict[int, float], seqs: list[int], seq: int) -> float | None:
    """When the owner got the frame carrying ``seq`` (its first frame with a seq >= it: a
    merged token frame carries the seqs up to its own)."""
    for s in seqs:
        if s >= seq:
            return owner[s]
    return None


async def one_run(url: str, viewers: int, prompt: str, pid: int) -> dict:
    owner_ws = await _open(url)
    viewer_ws = []
    for i in range(0, viewers, 20):          # handshakes in batches
        viewer_ws += await asyncio.gather(*(_open(url) for _ in range(min(20, viewers - i))))
    try:
        cpu0 = relay_cpu_ns(pid)
        await owner_ws.send(json.dumps({"type": "start", "id": "own", "model": "demo",
                                        "messages": [{"role": "user", "content": prompt}]}))
        started = json.loads(await owner_ws.recv())
        assert started["type"] == "started", started
        owner_times: dict[int, float] = {0: time.perf_counter()}
        owner_task = asyncio.create_task(_read(owner_ws, "own", owner_times))
        for i, ws in enumerate(viewer_ws):
            await ws.send(json.dumps({"type": "resume", "stream_key": started["stream_key"],
                                      "after_seq": 0, "id": f"v{i}"}))
        joined = []
        for i, ws in enumerate(viewer_ws):
            resumed = json.loads(await ws.recv())
            assert resumed["type"] == "resumed", resumed
            joined.append(i)
        cutoff = max(owner_times)            # frames after this seq were live for everyone
        viewer_times = [dict() for _ in viewer_ws]
        finishes = await asyncio.gather(
            owner_task, *(_read(ws, f"v{i}", viewer_times[i]) for i, ws in enumerate(viewer_ws)))
        cpu = relay_cpu_ns(pid) - cpu0
    finally:
        for ws in [owner_ws, *viewer_ws]:
            await ws.close()
    owner_finish = finishes[0]
    assert all(f["seq"] == owner_finish["seq"] and f["status"] == "completed" for f in finishes)
    tokens = owner_finish["usage"]["completion_tokens"]
    seqs = sorted(owner_times)
    lags_per_viewer = []
    for times in viewer_times:
        lags = []
        for seq, at in times.items():
            if seq <= cutoff:
                continue
            ref = _owner_time(owner_times, seqs, seq)
            if ref is not None:
                lags.append(at - ref)     # (negative: the viewer's writer ran first)
        lags_per_viewer.append(sorted(lags) or [0.0])
    p99 = [_pct(lags, 99) for lags in lags_per_viewer]
    worst = lags_per_viewer[max(range(len(p99)), key=p99.__getitem__)]
    every = sorted(x for lags in lags_per_viewer for x in lags)
    delivered = tokens * (viewers + 1)
    return {"viewers": viewers, "tokens": tokens, "delivered": delivered,
            "cpu_ms": cpu / 1e6, "us_per_token": cpu / 1e3 / delivered,
            "slowest_p50_ms": _pct(worst, 50) * 1e3, "slowest_p99_ms": _pct(worst, 99) * 1e3,
            "slowest_max_ms": worst[-1] * 1e3, "all_p99_ms": _pct(every, 99) * 1e3,
            "live_frames": len(every)}


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def main(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.counts.split(",")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    log = tempfile.TemporaryFile(mode="w+")
    most = max(counts) + 10
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", str(args.tps),
         "--detach-grace", "30", "--max-viewers-per-stream", str(most),
         "--max-connections-per-principal", str(most + 10)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url = re.search(r"(ws://\S+/ws)", relay.stdout.readline()).group(1)
        prompt = " ".join(f"word{i}" for i in range(args.words))
        print(f"relay at {url}; demo model at {args.tps} tokens/s; {args.words}-word answer; "
              f"{args.rounds} round(s) per count, median shown")
        await one_run(url, 1, "warm up", relay.pid)
        rows = []
        for n in counts:
            runs = [await one_run(url, n, prompt, relay.pid) for _ in range(args.rounds)]
            rows.append({k: statistics.median(r[k] for r in runs) for k in runs[0]})
        print()
        print(f"{'viewers':>7} {'tokens':>6} {'delivered':>9} {'relay CPU':>10} "
              f"{'us/delivered tok':>16} {'marginal us/tok':>15} {'slowest p50':>11} "
              f"{'slowest p99':>11} {'slowest max':>11} {'all p99':>8}")
        first = rows[0]
        for r in rows:
            extra = r["delivered"] - first["delivered"]
            marginal = ((r["cpu_ms"] - first["cpu_ms"]) * 1e3 / extra) if extra else float("nan")
            print(f"{int(r['viewers']):>7} {int(r['tokens']):>6} {int(r['delivered']):>9} "
                  f"{r['cpu_ms']:>8.0f}ms {r['us_per_token']:>16.1f} {marginal:>15.1f} "
                  f"{r['slowest_p50_ms']:>9.2f}ms {r['slowest_p99_ms']:>9.2f}ms "
                  f"{r['slowest_max_ms']:>9.2f}ms {r['all_p99_ms']:>6.2f}ms")
        log.seek(0)
        errors = sum(" ERROR " in line for line in log)
        print(f"relay log: {errors} ERROR lines")
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tps", type=float, default=50)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--counts", default="1,10,100")
    parser.add_argument("--rounds", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
