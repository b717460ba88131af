"""What a hostile upstream does to a relay: loop silence, RSS and a normal stream, per mode.

Starts a loopback hostile upstream (tests/fakes/hostile.py, in a process of its own) and a
``relay serve`` subprocess with two aliases on it (``fast``: the fast path; ``litellm``:
``fast = false``), then for each mode and path runs one hostile stream and, 0.2 s later, a
normal stream on another connection, while a probe asks ``GET /healthz`` every 20 ms and a
sampler reads the relay's RSS from /proc every 20 ms. Per mode it prints:

  silence   the longest time the probe waited for an answer, or between two answers (the
            relay's event loop could answer nobody meanwhile)
  rss+      the relay's peak RSS during the mode above its RSS before it (MiB)
  hostile   how the hostile stream ended (finish status/reason: message; its seconds)
  normal    the normal stream's seconds to its finish (and its status when not completed)

Modes: normal (a plain stream: the noise floor of the probe on this machine), endless_line (an SSE line that never ends: ``--endless-mb`` sent, then silence),
huge_line (one ``--line-mb`` line, then a normal end), gzip_bomb (``Content-Encoding: gzip``
stream inflating to ``--bomb-mb`` of newlines), gzip_error (HTTP 500, gzip body inflating to
``--error-bomb-mb``), html_error (HTTP 502, a ``--html-mb`` HTML page), shape (``{"choices":
"abc"}`` after one chunk). Sizes are moderate so that one run of both paths takes under three
minutes even on a relay without caps (each mode is cut at ``--mode-timeout``).

    python bench/hostile_upstream.py [--root DIR] [--paths fast,litellm]

``--root``: the checkout whose relay runs (default: this one), e.g. a worktree of an older
commit, to measure "before" with the same upstream and probe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SUBPROTOCOL = "llm-relay.v1"
MODES = ("normal", "endless_line", "huge_line", "gzip_bomb", "gzip_error", "html_error",
         "shape_choices_string")


# ------------------------------------------------------------------ upstream process

def serve_upstream(args: argparse.Namespace) -> None:
    from tests.fakes.hostile import HostileUpstream

    async def main() -> None:
        up = HostileUpstream(endless_line_bytes=args.endless_mb << 20,
                             huge_line_bytes=args.line_mb << 20,
                             bomb_bytes=args.bomb_mb << 20,
                             error_bomb_bytes=args.error_bomb_mb << 20,
                             html_error_bytes=args.html_mb << 20)
        up.make_bombs()
        async with up:
            print(up.openai_base, flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------------------- probes

def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Probe:
    """``GET /healthz`` every ``interval`` on a fresh connection; the longest silence."""

    def __init__(self, port: int, interval: float = 0.02) -> None:
        self.port = port
        self.interval = interval
        self.longest = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Connection: close\r\n\r\n")
                await writer.drain()
                await reader.read()
                writer.close()
            except OSError:
                pass
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now
            await asyncio.sleep(self.interval)


async def sample_rss(pid: int, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(rss_mib(pid))
        await asyncio.sleep(0.02)


async def one_stream(url: str, model: str, content: str, timeout: float) -> tuple[dict, float]:
    from websockets.asyncio.client import connect

    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with connect(url, subprotocols=[SUBPROTOCOL], max_size=None) as ws:
                await ws.send(json.dumps({"type": "hello"}))
                await ws.recv()
                await ws.send(json.dumps({"type": "start", "id": "s", "model": model,
                                          "messages": [{"role": "user",
                                                        "content": content}]}))
                async for text in ws:
                    frame = json.loads(text)
                    if frame.get("type") == "finish":
                        return frame, time.perf_counter() - started
    except TimeoutError:
        return {"status": "no finish", "reason": f"within {timeout:g} s"}, timeout
    except Exception as exc:                   # e.g. closed 4008 by a relay without caps
        return ({"status": "closed", "reason": f"{type(exc).__name__}: {str(exc)[:60]}"},
                time.perf_counter() - started)
    return {"status": "closed", "reason": "without finish"}, time.perf_counter() - started


def describe(frame: dict) -> str:
    text = f"{frame.get('status')}/{frame.get('reason')}"
    error = frame.get("error")
    if error:
        text += f": {error.get('message')}"
    return text


async def run_mode(url: str, port: int, pid: int, path: str, mode: str,
                   timeout: float) -> str:
    stop = asyncio.Event()
    probe = Probe(port)
    rss: list[float] = []
    before = rss_mib(pid)
    tasks = [asyncio.create_task(probe.run(stop)), asyncio.create_task(sample_rss(pid, stop, rss))]
    hostile = asyncio.create_task(one_stream(url, path, mode, timeout))
    await asyncio.sleep(0.2)
    normal_frame, normal_s = await one_stream(url, path, "normal", timeout)
    hostile_frame, hostile_s = await hostile
    stop.set()
    await asyncio.gather(*tasks)
    busy = await wait_responsive(port)
    normal = f"{normal_s:.2f} s" + ("" if normal_frame.get("status") == "completed"
                                    else f" ({describe(normal_frame)})")
    return (f"{path:8} {mode:21} silence {probe.longest * 1000:7.0f} ms  "
            f"rss+ {max(rss or [before]) - before:7.1f} MiB  normal {normal:>8}  "
            f"hostile {hostile_s:6.2f} s {describe(hostile_frame)}"
            + (f"  [still busy {busy:.0f} s after]" if busy > 1 else ""))


async def wait_responsive(port: int, limit: float = 120.0) -> float:
    """Seconds until /healthz answers within 0.2 s again (a relay without caps may still be
    working on the last mode, which would be charged to the next one)."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        probe = Probe(port)
        stop = asyncio.Event()
        task = asyncio.create_task(probe.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await task
        if probe.longest < 0.2:
            break
    return time.perf_counter() - started


async def bench(args: argparse.Namespace) -> None:
    upstream = subprocess.Popen(
        [sys.executable, __file__, "--serve-upstream", "--endless-mb", str(args.endless_mb),
         "--line-mb", str(args.line_mb), "--bomb-mb", str(args.bomb_mb), "--error-bomb-mb",
         str(args.error_bomb_mb), "--html-mb", str(args.html_mb)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    relay = None
    try:
        base = upstream.stdout.readline().strip()
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as cfg:
            for path in ("fast", "litellm"):
                cfg.write(f'[models.{path}]\nmodel = "openai/hostile"\napi_base = "{base}"\n'
                          f'api_key_env = "HOSTILE_KEY"\nfast = {str(path == "fast").lower()}\n')
        env = {**os.environ, "HOSTILE_KEY": "sk-hostile", "PYTHONPATH": str(args.root)}
        relay = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", cfg.name, "--port", "0",
             "--idle-timeout", "20", "--total-timeout", str(args.mode_timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=args.root,
            env=env)
        for line in relay.stdout:
            found = re.search(r"listening on (ws://\S+)", line)
            if found:
                url = found.group(1)
                break
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for path in args.paths.split(","):           # warm both paths first
            await one_stream(url, path, "normal", 60)
        await asyncio.sleep(2)                       # LiteLLM's warm-up thread
        print(f"# root {args.root}  relay pid {relay.pid}  rss {rss_mib(relay.pid):.0f} MiB",
              flush=True)
        for path in args.paths.split(","):
            for mode in MODES:
                print(await run_mode(url, port, relay.pid, path, mode, args.mode_timeout),
                      flush=True)
                await asyncio.sleep(0.5)
    finally:
        for proc in (relay, upstream):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        os.unlink(cfg.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--paths", default="fast,litellm")
    parser.add_argument("--mode-timeout", type=float, default=25.0)
    parser.add_argument("--endless-mb", type=int, default=32)
    parser.add_argument("--line-mb", type=int, default=100)
    parser.add_argument("--bomb-mb", type=int, default=128)
    parser.add_argument("--error-bomb-mb", type=int, default=2)
    parser.add_argument("--html-mb", type=int, default=4)
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args)
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
