"""Memory of detached streams: RSS of a ``relay serve`` subprocess holding N streams whose
clients went away (resumable for the detach grace), each with T token frames in its log.

Each stream: connect, ``hello``, ``start`` (the demo model, unthrottled, exactly T tokens),
read ``started``, disconnect. The stream runs on, detached, and logs all its frames. Once
every stream has finished, the relay's RSS is read from /proc and compared with the RSS
before; the difference per logged frame is what a frame really costs the process. With
``--after-drop`` the script also waits until the grace is over (the logs are dropped) and
reads the RSS again: what the allocator keeps of its high-water mark.

    python bench/detached_streams_rss.py [--streams 500] [--tokens 400] [--code DIR]

``--code DIR`` runs the relay from another checkout of this repository (e.g. an older
commit exported with ``git archive``), to print before/after figures side by side:

    python bench/detached_streams_rss.py --code /tmp/old --code .
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

SUBPROTOCOL = "llm-relay.v1"
_REPO = Path(__file__).resolve().parent.parent


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    return rss, hwm


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _one_stream(url: str, index: int, tokens: int) -> None:
    # A relay busy with hundreds of unthrottled streams may take a while to accept.
    async with connect(url, subprotocols=[SUBPROTOCOL], max_size=None,
                       open_timeout=120) as ws:
        await ws.send(json.dumps({"type": "hello"}))
        assert json.loads(await ws.recv())["type"] == "welcome"
        await ws.send(json.dumps({
            "type": "start", "id": f"s{index}", "model": "demo",
            "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(tokens))}],
            "params": {"max_tokens": tokens}}))
        frame = json.loads(await ws.recv())
        assert frame["type"] == "started", frame
    # Closing the connection detaches the stream; it keeps running and logging.


async def _measure(code: Path, streams: int, tokens: int, grace: float,
                   after_drop: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(code), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    limit = str(streams * 4)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve", "--port", "0", "--demo-tps", "0",
         "--detach-grace", str(grace), "--log-level", "error",
         "--max-streams-per-principal", limit, "--start-rate-per-minute", "1000000",
         "--start-burst", limit, "--max-connections-per-principal", limit],
        stdout=subprocess.PIPE, text=True, env=env, cwd=code)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"(ws://\S+)", line).group(1)
        base = url.replace("ws://", "http://").rsplit("/", 1)[0]
        await _one_stream(url, -1, 50)                     # warm-up: LiteLLM's lazy state
        await _wait_idle(base)
        rss0, _ = _rss_kib(proc.pid)
        t0 = time.perf_counter()
        batch = 8                                          # a few clients at a time
        for first in range(0, streams, batch):
            await asyncio.gather(*(_one_stream(url, i, tokens)
                                   for i in range(first, min(streams, first + batch))))
        last_detach = time.perf_counter()
        await _wait_idle(base)
        elapsed = time.perf_counter() - t0
        rss1, hwm1 = _rss_kib(proc.pid)
        out = {"rss_before_mib": rss0 / 1024, "rss_held_mib": rss1 / 1024,
               "hwm_mib": hwm1 / 1024, "seconds": elapsed,
               "bytes_per_frame": (rss1 - rss0) * 1024 / (streams * (tokens + 1))}
        if after_drop:
            # Waiting out the grace of a separate process: there is nothing to await.
            await asyncio.sleep(max(0.0, grace - (time.perf_counter() - last_detach)) + 2)
            out["rss_after_drop_mib"] = _rss_kib(proc.pid)[0] / 1024
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


async def _wait_idle(base: str) -> None:
    """Until no stream is running (every detached stream has logged its finish)."""
    while _metric(base, "relay_active_streams") > 0:
        await asyncio.sleep(0.2)        # polling a separate process; nothing to await


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=400, help="token frames per stream")
    parser.add_argument("--grace", type=float, default=900.0,
                        help="detach grace: longer than the run, so every log is held")
    parser.add_argument("--after-drop", action="store_true",
                        help="also wait out the grace and read the RSS once the logs are gone")
    parser.add_argument("--code", action="append", type=Path,
                        help="checkout to run the relay from (repeatable; default: this one)")
    args = parser.parse_args()
    codes = args.code or [_REPO]
    frames = args.streams * (args.tokens + 1)
    print(f"{args.streams} detached streams x {args.tokens} tokens = {frames:,} logged frames")
    results = []
    for code in codes:
        r = asyncio.run(_measure(code.resolve(), args.streams, args.tokens, args.grace,
                                 args.after_drop))
        results.append(r)
        drop = (f", after the grace {r['rss_after_drop_mib']:.0f} MiB"
                if "rss_after_drop_mib" in r else "")
        print(f"{code.resolve()}: RSS {r['rss_before_mib']:.0f} MiB before, {r['rss_held_mib']:.0f} MiB "
              f"holding the streams (high-water {r['hwm_mib']:.0f} MiB){drop}; "
              f"{r['bytes_per_frame']:,.0f} B of RSS per logged frame; {r['seconds']:.0f} s")
    if len(results) == 2:
        a, b = results
        grew = lambda r: r["rss_held_mib"] - r["rss_before_mib"]  # noqa: E731
        print(f"growth while holding: {grew(a):.0f} MiB vs {grew(b):.0f} MiB "
              f"(ratio {grew(a) / max(grew(b), 0.01):.1f}x)")


if __name__ == "__main__":
    main()
