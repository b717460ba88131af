"""Minimal llm-relay.v1 client: sends one prompt and prints the answer as it streams.

    python client_demo/demo_client.py "hello there" [--url ws://127.0.0.1:8765/ws] [--model demo]
                                      [--token TOKEN]
    (defaults from the environment: RELAY_URL for --url, RELAY_TOKEN for --token)

Unknown frame types are ignored, as the protocol requires of clients. When the relay cannot
be reached or refuses the connection (no relay running, a token required or refused), it
prints one line saying so and exits with status 1 (no traceback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from llm_relay_protocol import PROTOCOL_VERSION, frames   # the frame builders every client uses


class RelayRefused(Exception):
    """The relay closed the connection before `welcome` (its close code and reason)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


async def run(url: str, model: str, prompt: str, token: str | None = None) -> int:
    async with connect(url, subprotocols=[PROTOCOL_VERSION]) as ws:
        hello = frames.hello(token or None, frames.client_info("demo_client", "1"))
        await ws.send(json.dumps(hello))
        try:
            welcome = json.loads(await ws.recv())
        except ConnectionClosed as exc:
            raise RelayRefused(exc.rcvd.code if exc.rcvd else None,
                               exc.rcvd.reason if exc.rcvd else "") from None
        if welcome.get("type") != "welcome":
            print(f"unexpected first frame: {welcome}", file=sys.stderr)
            return 1
        await ws.send(json.dumps(frames.start(
            "q1", model, [{"role": "user", "content": prompt}])))
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "token":
                print(frame["text"], end="", flush=True)
            elif kind == "refusal":  # the model refused to answer (not part of the answer)
                print(f"[refusal] {frame['text']}", end="", flush=True)
            elif kind == "tool_call_complete":
                print(f"\n[tool call] {frame['name']}({frame['arguments']})")
            elif kind == "error":
                print(f"\nerror {frame['code']}: {frame['message']}", file=sys.stderr)
                return 1
            elif kind == "finish":
                # a failed or timed-out stream says why, in the relay's words
                why = f" {frame['error']['message']}" if frame.get("error") else ""
                print(f"\n[{frame['status']}: {frame.get('reason')}]{why} "
                      f"usage={frame['usage']}")
                return 0 if frame["status"] == "completed" else 1
            # unknown frame types are ignored (forward compatibility)
    print("\nthe relay closed the connection before the answer finished", file=sys.stderr)
    return 1


def describe_failure(exc: BaseException, url: str) -> str | None:
    """One line for a relay that cannot be used, or None for an unexpected error."""
    if isinstance(exc, RelayRefused):
        if exc.code == 4401:
            return (f"the relay at {url} requires a valid token ({exc.reason or 'refused'}): "
                    "pass --token TOKEN or set RELAY_TOKEN")
        return f"the relay at {url} closed the connection ({exc})"
    if isinstance(exc, InvalidURI):
        return f"not a WebSocket URL: {url} (expected ws://host:port/ws)"
    if isinstance(exc, InvalidHandshake):  # e.g. an HTTP server that is not a relay
        return f"{url} did not accept the WebSocket connection ({exc}); is it an llm-relay?"
    if isinstance(exc, OSError):
        return (f"no relay reachable at {url} ({exc.strerror or exc}); is it running? "
                "Start one with `relay serve`")
    if isinstance(exc, ConnectionClosed):
        return f"the connection to {url} was lost ({exc})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description="llm-relay demo client")
    parser.add_argument("prompt", nargs="?", default="Tell me about llm-relay")
    parser.add_argument("--url", default=os.environ.get("RELAY_URL") or "ws://127.0.0.1:8765/ws",
                        help="the relay's WebSocket URL (default: env RELAY_URL, else "
                        "ws://127.0.0.1:8765/ws)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--token", default=os.environ.get("RELAY_TOKEN") or None,
                        help="API key or signed token, when the relay requires one "
                        "(default: env RELAY_TOKEN)")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args.url, args.model, args.prompt, args.token))
    except KeyboardInterrupt:
        return 130
    except (OSError, InvalidHandshake, InvalidURI, ConnectionClosed, RelayRefused) as exc:
        print(f"demo_client: {describe_failure(exc, args.url)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
