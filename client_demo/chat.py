"""Terminal chat over llm-relay, built on ``llm_relay_client.RelayClient``.

    python client_demo/chat.py --model demo [--url ws://127.0.0.1:8765/ws] [--token TOKEN]

(``--url`` and ``--token`` default to the environment variables ``RELAY_URL`` and
``RELAY_TOKEN``.) A relay that is not
running, refuses the token or is not a relay at all gets one line and exit status 1.

Type a line, the answer streams back; the conversation history is kept. Ctrl-C during an
answer cancels that answer (the partial answer stays in the history); Ctrl-C or EOF
(Ctrl-D) at the prompt exits.

A dropped connection is reconnected and the answer resumed by ``RelayClient`` itself, so
the answer just continues. If it cannot be resumed, the partial answer is kept, a
``[connection lost: ...]`` line is printed, and the chat goes on if the client reconnected
(it exits with status 1 if the client gave up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

from websockets.exceptions import InvalidHandshake, InvalidURI

from llm_relay_client import (  # pip install llm-relay-client (or ./clients/python)
    ConnectionLost,
    HandshakeFailed,
    RelayClient,
    RelayClientError,
    RelayStream,
)


def describe_connect_failure(exc: BaseException, url: str) -> str:
    """One line for a first connect that failed (the client does not retry it)."""
    if isinstance(exc, HandshakeFailed) and exc.close_code == 4401:
        reason = exc.message.removeprefix("connection closed during handshake: ")
        return (f"the relay at {url} requires a valid token ({reason}): pass --token TOKEN "
                "or set RELAY_TOKEN")
    if isinstance(exc, HandshakeFailed):
        return f"the relay at {url} refused the connection ({exc})"
    if isinstance(exc, InvalidURI):
        return f"not a WebSocket URL: {url} (expected ws://host:port/ws)"
    if isinstance(exc, InvalidHandshake):  # e.g. an HTTP server that is not a relay
        return f"{url} did not accept the WebSocket connection ({exc}); is it an llm-relay?"
    return (f"no relay reachable at {url} ({getattr(exc, 'strerror', None) or exc}); "
            "is it running? Start one with `relay serve`")


async def chat(url: str, model: str, token: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    current: list[RelayStream] = []  # the answer being streamed, if any
    prompt_task: list[asyncio.Task[str]] = []
    cancels: list[asyncio.Task[None]] = []

    def on_sigint() -> None:
        if current:
            print("\n[cancelling]", flush=True)
            cancels.append(loop.create_task(current[0].cancel()))
        elif prompt_task:
            prompt_task[0].cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    history: list[dict[str, str]] = []
    interrupted = False
    try:
        try:
            client = await RelayClient(url, token=token, client_name="chat.py").connect()
        except (OSError, HandshakeFailed, InvalidHandshake, InvalidURI) as exc:
            print(f"chat: {describe_connect_failure(exc, url)}", file=sys.stderr)
            return 1
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(client.close)
            print(f"connected; models: {', '.join(client.models)}", flush=True)
            while True:
                task = loop.create_task(asyncio.to_thread(input, "> "))
                prompt_task[:] = [task]
                try:
                    line = await task
                except EOFError:
                    print(flush=True)
                    return 0
                except asyncio.CancelledError:
                    interrupted = True
                    break
                finally:
                    prompt_task.clear()
                if not line.strip():
                    continue
                history.append({"role": "user", "content": line})
                stream = client.stream(model, history)
                current[:] = [stream]
                lost: ConnectionLost | None = None
                try:
                    async for event in stream:
                        if event.type == "token":
                            print(event.text, end="", flush=True)
                        elif event.type == "refusal":  # the model refused: not the answer
                            first = stream.refusal == event.text  # (already folded in)
                            print(("[refused] " if first else "") + event.text, end="",
                                  flush=True)
                        elif event.type == "tool_call_complete":
                            print(f"[tool call] {event.name}({event.arguments})", end="")
                except ConnectionLost as exc:
                    if client.state == "closed":
                        raise
                    lost = exc  # reconnected, but this answer could not be resumed
                finally:
                    current.clear()
                    await asyncio.gather(*cancels)
                    cancels.clear()
                finish = stream.finish
                if lost is not None:
                    print(f"\n[connection lost: {lost}]", flush=True)
                else:
                    print(f"\n[{finish.status}: {finish.reason}]" if finish else "", flush=True)
                if stream.text:
                    history.append({"role": "assistant", "content": stream.text})
                else:
                    history.pop()
    except RelayClientError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    if interrupted:
        # input() is still blocked in its worker thread and cannot be interrupted; Python
        # 3.11's asyncio.run would wait for it at shutdown, so leave now (client is closed).
        print(flush=True)
        os._exit(0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="llm-relay terminal chat")
    parser.add_argument("--url", default=os.environ.get("RELAY_URL") or "ws://127.0.0.1:8765/ws",
                        help="the relay's WebSocket URL (default: env RELAY_URL, else "
                        "ws://127.0.0.1:8765/ws)")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--token", default=os.environ.get("RELAY_TOKEN") or None,
                        help="API key or signed token, when the relay requires one "
                        "(default: env RELAY_TOKEN)")
    args = parser.parse_args()
    return asyncio.run(chat(args.url, args.model, args.token))


if __name__ == "__main__":
    sys.exit(main())
