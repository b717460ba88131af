"""Minimal llm-relay.v1 client: sends one prompt and prints the answer as it streams.

    python client_demo/demo_client.py "hello there" [--url ws://127.0.0.1:8765/ws] [--model demo]

Unknown frame types are ignored, as the protocol requires of clients.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def run(url: str, model: str, prompt: str) -> int:
    async with connect(url, subprotocols=["llm-relay.v1"]) as ws:
        await ws.send(json.dumps({"type": "hello", "client": {"name": "demo_client",
                                                             "version": "1"}}))
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            print(f"unexpected first frame: {welcome}", file=sys.stderr)
            return 1
        await ws.send(json.dumps({"type": "start", "id": "q1", "model": model,
                                  "messages": [{"role": "user", "content": prompt}]}))
        try:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "token":
                    print(frame["text"], end="", flush=True)
                elif kind == "tool_call_complete":
                    print(f"\n[tool call] {frame['name']}({frame['arguments']})")
                elif kind == "error":
                    print(f"\nerror {frame['code']}: {frame['message']}", file=sys.stderr)
                    return 1
                elif kind == "finish":
                    print(f"\n[{frame['status']}: {frame.get('reason')}] usage={frame['usage']}")
                    return 0 if frame["status"] == "completed" else 1
                # unknown frame types are ignored (forward compatibility)
        except asyncio.CancelledError:
            raise
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description="llm-relay demo client")
    parser.add_argument("prompt", nargs="?", default="Tell me about llm-relay")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args.url, args.model, args.prompt))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
