"""CPU per token of the relay's streaming paths, side by side in one run.

A fake OpenAI-format upstream (tests/fakes/upstream.py, in a subprocess so its CPU is not
counted) serves ``--tokens`` content chunks per request as fast as it can. This process reads
``--streams`` such streams at once, ``--rounds`` times, through each path:

  raw          httpx + the relay's SSE parser + orjson.loads per event: the parsing floor
  fast         EventStreamer on the fast path (relay/upstream/fast/): events() consumed
  litellm      EventStreamer through LiteLLM (fast = false), with the relay's lean setup
  litellm-full the same with LiteLLM's post-stream response assembly left on (the "before"
               of the lean LiteLLM path: LiteLLM's own stream_chunk_builder restored)

and prints CPU us per token (this process's CPU, worker threads included, after LiteLLM's
post-stream tasks settled) and tokens/s, min/median/max over rounds, and the ratios.

    python bench/fast_path.py [--tokens 1000] [--streams 1,10] [--rounds 3]
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
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_LOG", "ERROR")

MESSAGES = [{"role": "user", "content": "hi"}]


async def serve_upstream(tokens: int) -> None:
    """Subprocess mode: a fake OpenAI upstream answering every request with ``tokens`` chunks."""
    from tests.fakes.upstream import FakeUpstream, openai_stream

    script = openai_stream([f"t{i} " for i in range(tokens)])

    class Upstream(FakeUpstream):
        def _default_script(self, path):
            return script

        async def _handle(self, request):
            response = await super()._handle(request)
            self.requests.clear()  # keep memory flat over many requests
            return response

    async with Upstream() as up:
        print(up.port, flush=True)
        await asyncio.Event().wait()


async def run_raw(base: str, streams: int) -> int:
    import httpx
    import orjson

    from relay.upstream.sse import SSEParser

    async def one(client) -> int:
        n = 0
        async with client.stream("POST", f"{base}/chat/completions", json={
                "model": "gpt-x", "messages": MESSAGES, "stream": True,
                "stream_options": {"include_usage": True}}) as response:
            parser = SSEParser()
            async for chunk in response.aiter_bytes():
                for _event, data in parser.feed(chunk):
                    if data[:6] == b"[DONE]":
                        continue
                    obj = orjson.loads(data)
                    choices = obj.get("choices")
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        n += 1
        return n

    async with httpx.AsyncClient(timeout=60,
                                 limits=httpx.Limits(max_connections=None)) as client:
        return sum(await asyncio.gather(*(one(client) for _ in range(streams))))


async def run_streamer(spec, streams: int) -> int:
    from relay.upstream.event_streamer import TextDelta

    async def one() -> int:
        n = 0
        end = None
        async for event in spec.streamer().events(MESSAGES):
            if type(event) is TextDelta:
                n += event.chunks     # tokens, not frames: chunks read together are one
            else:
                end = event
        assert end is not None and end.status == "completed", end
        return n

    return sum(await asyncio.gather(*(one() for _ in range(streams))))


async def measure(run, streams: int) -> tuple[float, float, int]:
    """(CPU us per token, tokens/s, tokens) of one round."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    n = await run(streams)
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.3)  # let LiteLLM's post-stream threads/tasks finish; idle = no CPU
    cpu = time.process_time() - cpu0
    return cpu / n * 1e6, n / wall, n


async def main(args) -> None:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "--tokens", str(args.tokens)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}/v1"
        os.environ["BENCH_KEY"] = "sk-bench"
        from relay.app import load_models
        from relay.upstream.llm import get_litellm
        from relay.upstream.event_streamer import Timeouts

        litellm = get_litellm()
        lean_builder = litellm.stream_chunk_builder  # the relay's (relay/upstream/llm.py)
        real_builder = lean_builder.__wrapped__      # LiteLLM's own

        fast, slow = load_models({"models": {
            "fast": {"model": "openai/gpt-x", "api_base": base, "api_key_env": "BENCH_KEY"},
            "slow": {"model": "openai/gpt-x", "api_base": base, "api_key_env": "BENCH_KEY",
                     "fast": False}}}, Timeouts(None, None, None))
        assert fast.path.path == "fast" and slow.path.path == "litellm"

        def lean(on: bool) -> None:
            litellm.stream_chunk_builder = lean_builder if on else real_builder

        paths = {
            "raw": (lambda s: run_raw(base, s), True),
            "fast": (lambda s: run_streamer(fast, s), True),
            "litellm": (lambda s: run_streamer(slow, s), True),
            "litellm-full": (lambda s: run_streamer(slow, s), False),
        }
        for name, (run, lean_on) in paths.items():  # warm-up: imports, pools, tokenizers
            lean(lean_on)
            await run(1)
        print(f"# {args.tokens} tokens per stream, {args.rounds} rounds, "
              f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs")
        for streams in args.streams:
            results: dict[str, list[tuple[float, float, int]]] = {p: [] for p in paths}
            for _ in range(args.rounds):  # interleaved, so load changes hit every path alike
                for name, (run, lean_on) in paths.items():
                    lean(lean_on)
                    results[name].append(await measure(run, streams))
            lean(True)
            print(f"\n## {streams} concurrent stream(s)")
            print(f"{'path':<13} {'CPU us/token min/med/max':>26} {'tokens/s min/med/max':>26}")
            med = {}
            for name, rows in results.items():
                cpu = sorted(r[0] for r in rows)
                tps = sorted(r[1] for r in rows)
                med[name] = statistics.median(cpu)
                print(f"{name:<13} {cpu[0]:8.1f} {med[name]:8.1f} {cpu[-1]:8.1f} "
                      f"{tps[0]:8.0f} {statistics.median(tps):8.0f} {tps[-1]:8.0f}")
            print(f"fast / raw CPU per token:            {med['fast'] / med['raw']:.2f}x")
            print(f"litellm / fast CPU per token:        {med['litellm'] / med['fast']:.2f}x")
            lean_gain = med["litellm-full"] / med["litellm"]
            print(f"litellm-full / litellm (lean gain):  {lean_gain:.2f}x")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")],
                        default=[1, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_upstream(args.tokens))
    else:
        asyncio.run(main(args))
