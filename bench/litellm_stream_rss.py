"""Memory of RUNNING streams on the LiteLLM path: RSS growth per token while N long streams
are still streaming (an alias with ``fast = false``, LiteLLM's real openai/ code against
the loopback fake OpenAI upstream of tests/fakes/upstream.py, in one process).

RSS is read from /proc once every stream has received a quarter of its tokens and again
once they have received 95% (none has finished): the difference over the tokens received
in between is what a running stream holds per token. Before the fix, LiteLLM's stream
wrapper kept every chunk object it made (and, over the openai SDK's stream, a suspended
generator per chunk), ~3.6-6 KB per token that no budget counted.

    python bench/litellm_stream_rss.py [--streams 32] [--tokens 5000] [--pace 0.002] [--code DIR]

``--code DIR`` runs the measurement with the relay package of another checkout (e.g. an
older commit exported with ``git archive``), to print before/after side by side:

    git archive <old-commit> | tar -x -C /tmp/old
    python bench/litellm_stream_rss.py --code /tmp/old --code .

Measured (bench/results/litellm-stream-rss-2026-12-06.txt, 16 streams x 3000 tokens, paced
2 ms): before 4,025 B/token (+129 MiB), after 64 B/token (+2.1 MiB).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent


def _rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))


async def _child(streams: int, tokens: int, pace: float) -> dict:
    from relay.app import load_models
    from relay.upstream.llm import get_litellm
    from relay.upstream.event_streamer import Timeouts
    from tests.fakes.upstream import FakeUpstream, Usage, stream

    get_litellm()
    os.environ.setdefault("BENCH_PROVIDER_KEY", "sk-bench")
    received = [0] * streams
    marks: dict[str, tuple[int, int]] = {}
    first_mark, last_mark = tokens // 4, tokens * 95 // 100

    def mark(name: str) -> None:
        gc.collect()
        marks[name] = (_rss_kib(), sum(received))

    async def one(index: int, spec) -> None:
        async for event in spec.streamer().events([{"role": "user", "content": "go"}]):
            if type(event).__name__ != "TextDelta":
                continue
            received[index] += 1
            if "first" not in marks and min(received) >= first_mark:
                mark("first")
            if "last" not in marks and min(received) >= last_mark:
                mark("last")

    async with FakeUpstream() as up:
        spec = load_models({"models": {"x": {
            "model": "openai/gpt-x", "api_base": up.openai_base,
            "api_key_env": "BENCH_PROVIDER_KEY", "fast": False}}}, Timeouts(60, 60, 3600))[0]
        assert spec.path.path == "litellm"
        words = [f"w{i} " for i in range(tokens)]
        for _ in range(streams):
            up.enqueue(stream("openai", words, usage=Usage(5, tokens)).with_delay(pace))
        await asyncio.gather(*(one(i, spec) for i in range(streams)))
    (rss0, tok0), (rss1, tok1) = marks["first"], marks["last"]
    return {"streams": streams, "tokens": tokens, "pace": pace,
            "rss_growth_mib": round((rss1 - rss0) / 1024, 1), "tokens_between": tok1 - tok0,
            "bytes_per_token": round((rss1 - rss0) * 1024 / max(1, tok1 - tok0))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=5000, help="text chunks per stream")
    parser.add_argument("--pace", type=float, default=0.002,
                        help="seconds the fake upstream waits between chunks (0: a burst, "
                             "where streams run one after another rather than together)")
    parser.add_argument("--code", action="append", type=Path,
                        help="checkout whose relay package to measure (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.streams, args.tokens, args.pace))))
        return 0
    for code in args.code or [_REPO]:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
               # the relay package from `code`; the fake upstream from this checkout
               "PYTHONPATH": os.pathsep.join([str(code.resolve()), str(_REPO)])}
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--streams", str(args.streams),
             "--tokens", str(args.tokens), "--pace", str(args.pace)],
            env=env, cwd=str(code.resolve()), capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"{code}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{str(code):40} {result['streams']} streams x {result['tokens']} tokens "
              f"(pace {result['pace']:g} s): RSS +{result['rss_growth_mib']} MiB over "
              f"{result['tokens_between']} tokens = {result['bytes_per_token']} B/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
