"""The peer llm-relay is measured against: the seed's ``TokenStreamer`` (litellm stream ->
one ``TokenChunk`` per chunk; /work/shared/seed/token_streamer.seed.txt) behind the plainest
WebSocket server, one JSON frame per chunk, as a project starting from the seed would write.

    python bench/naive_relay.py --port 0 --config bench.toml   # prints "naive-relay PORT"

It speaks enough of ``llm-relay.v1`` for bench/capacity.py: ``hello`` -> ``welcome``;
``start`` (model = an alias of the relay's TOML config: ``model``, ``api_base``,
``api_key_env``) -> ``started``, one ``token`` frame per chunk (``json.dumps``), ``finish``;
``cancel`` sets the seed's ``_cancelled`` flag, which its loop checks at the next chunk (the
seed never closes the upstream response itself). Nothing else: no limits, no resume, no
backpressure, no usage. It is a benchmark peer, not a server to run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tomllib
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = logging.getLogger("naive_relay")


# ---------------------------------------------------------------- the seed's streamer

@dataclass
class TokenChunk:
    content: str
    token_count: int = 1
    finish_reason: str | None = None
    model: str | None = None
    accumulated_content: str = ""
    total_tokens: int = 0


class TokenStreamer:
    """The seed's ``TokenStreamer.stream_completion``, as written there."""

    def __init__(self, model: str, api_key: str | None = None, base_url: str | None = None,
                 on_token=None) -> None:
        self.model = model
        self.api_key = api_key
        self.base_url = base_url
        self.on_token = on_token
        self._cancelled = False
        self._accumulated_content = ""
        self._total_tokens = 0

    def cancel(self) -> None:
        self._cancelled = True

    async def stream_completion(self, messages, temperature: float = 0.1,
                                max_tokens: int = 4096):
        import litellm

        response = await litellm.acompletion(
            model=self.model, messages=messages, temperature=temperature,
            max_tokens=max_tokens, api_key=self.api_key, base_url=self.base_url,
            stream=True)
        async for chunk in response:
            if self._cancelled:
                break
            content = ""
            finish_reason = None
            if hasattr(chunk, "choices") and chunk.choices:
                choice = chunk.choices[0]
                if hasattr(choice, "delta") and choice.delta:
                    content = getattr(choice.delta, "content", "") or ""
                finish_reason = getattr(choice, "finish_reason", None)
            if content:
                self._accumulated_content += content
                self._total_tokens += 1
                token_chunk = TokenChunk(
                    content=content, token_count=1, finish_reason=finish_reason,
                    model=self.model, accumulated_content=self._accumulated_content,
                    total_tokens=self._total_tokens)
                if self.on_token:
                    self.on_token(token_chunk)
                yield token_chunk
            if finish_reason:
                break


# ---------------------------------------------------------------- the server around it

def load_aliases(path: str) -> dict[str, dict[str, Any]]:
    with open(path, "rb") as f:
        return tomllib.load(f)["models"]


async def handler(ws, aliases: dict[str, dict[str, Any]]) -> None:
    streams: dict[str, TokenStreamer] = {}
    tasks: set[asyncio.Task] = set()

    async def run(sid: str, streamer: TokenStreamer, messages: list) -> None:
        seq = 0
        status = "completed"
        try:
            async for chunk in streamer.stream_completion(messages):
                seq += 1
                await ws.send(json.dumps({"type": "token", "id": sid, "seq": seq,
                                          "text": chunk.content}))
            if streamer._cancelled:
                status = "cancelled"
        except Exception as exc:
            status = "failed"
            logger.error("stream failed: %s", exc)
        finally:
            streams.pop(sid, None)
        await ws.send(json.dumps({"type": "finish", "id": sid, "seq": seq + 1,
                                  "status": status}))

    try:
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg.get("type")
            if kind == "hello":
                await ws.send(json.dumps({"type": "welcome", "protocol": "llm-relay.v1",
                                          "models": list(aliases)}))
            elif kind == "start":
                alias = aliases[msg["model"]]
                key_env = alias.get("api_key_env")
                streamer = TokenStreamer(alias["model"],
                                         api_key=os.environ.get(key_env) if key_env else None,
                                         base_url=alias.get("api_base"))
                streams[msg["id"]] = streamer
                await ws.send(json.dumps({"type": "started", "id": msg["id"], "seq": 0,
                                          "model": msg["model"]}))
                task = asyncio.create_task(run(msg["id"], streamer, msg["messages"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind == "cancel":
                streamer = streams.get(msg["id"])
                if streamer is not None:
                    streamer.cancel()
    finally:
        for task in tasks:
            task.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    from websockets.asyncio.server import serve

    import litellm  # noqa: F401  (imported before listening, like the relay)

    aliases = load_aliases(args.config)
    async with serve(lambda ws: handler(ws, aliases), "127.0.0.1", args.port,
                     subprotocols=["llm-relay.v1"], compression=None, max_size=None) as server:
        print(f"naive-relay {server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
