"""Test harness: a real relay on port 0 and a thin client over the real websockets client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections import defaultdict
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from relay.app import build_registry
from relay.config import RelaySettings
from relay.runtime.server import RelayServer

SUBPROTOCOL = "llm-relay.v1"
RECV_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def start_relay(registry=None, streamer_factory=None, **settings: Any):
    settings.setdefault("port", 0)
    settings.setdefault("demo_tps", 0)
    # The v1-core tests assert that a disconnect closes the upstream at once; resume tests
    # set a grace explicitly.
    settings.setdefault("detach_grace", 0)
    cfg = RelaySettings(**settings)
    registry = registry or build_registry(cfg)
    server = RelayServer(cfg, registry, streamer_factory=streamer_factory)
    await server.start()
    try:
        yield server
    finally:
        await server.close()
        leaked = [t for t in asyncio.all_tasks() if t.get_name().startswith("stream ")]
        assert not leaked, f"stream tasks outlived the server: {leaked}"
        assert not server.sessions, "sessions outlived the server"


class Client:
    """A protocol-speaking test client. Frames of other streams are kept for later reads."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict | None = None
        self._stash: dict[str | None, list[dict]] = defaultdict(list)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, hello: bool = True, **kwargs: Any):
        kwargs.setdefault("subprotocols", [SUBPROTOCOL])
        async with connect(url, **kwargs) as ws:
            client = cls(ws)
            if hello:
                await client.send({"type": "hello", "client": {"name": "tests", "version": "0"}})
                client.welcome = await client.recv()
                assert client.welcome["type"] == "welcome", client.welcome
            yield client

    async def send(self, frame: dict | str | bytes) -> None:
        await self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    async def recv(self) -> dict:
        async with asyncio.timeout(RECV_TIMEOUT):
            return json.loads(await self.ws.recv())

    async def next_for(self, id: str | None) -> dict:
        """Next frame whose ``id`` is ``id`` (None: frames without id, e.g. pong/errors)."""
        if self._stash[id]:
            return self._stash[id].pop(0)
        while True:
            frame = await self.recv()
            fid = frame.get("id")
            if fid == id:
                return frame
            self._stash[fid].append(frame)

    async def start(self, id: str, model: str = "demo", content: str = "hi", **fields: Any) -> None:
        frame = {"type": "start", "id": id, "model": model,
                 "messages": fields.pop("messages", [{"role": "user", "content": content}])}
        frame.update(fields)
        await self.send(frame)

    async def collect(self, id: str) -> list[dict]:
        """All frames of stream ``id`` through its ``finish`` (or a start error)."""
        out = []
        while True:
            frame = await self.next_for(id)
            out.append(frame)
            if frame["type"] in ("finish", "error"):
                return out


async def eventually(condition, timeout: float = 10.0) -> None:
    """Wait until ``condition()`` holds, for relay state that no event announces (a stream
    logged, replicated or dropped, a counter reached). Checks every 10 ms until ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def text_of(frames: list[dict]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


def reap(proc: subprocess.Popen) -> None:
    """A test's ``finally`` for a ``relay serve`` subprocess: kill it if it still runs, wait
    for it and close its pipes (no process or file left behind, whatever the test did)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def litellm_path_spec(up: Any, fmt: str) -> Any:
    """The ``ModelSpec`` of an alias ``x`` with ``fast = false`` (LiteLLM's own openai/ or
    anthropic/ provider code) pointed at the fake upstream ``up``; its key is read from
    ``FAKE_PROVIDER_KEY``, which the caller sets."""
    from relay.app import load_models
    from relay.upstream.event_streamer import Timeouts

    spec = load_models({"models": {"x": {
        "model": "openai/gpt-x" if fmt == "openai" else "anthropic/claude-x",
        "api_base": up.openai_base if fmt == "openai" else up.anthropic_base,
        "api_key_env": "FAKE_PROVIDER_KEY", "fast": False}}}, Timeouts())[0]
    assert spec.path.path == "litellm"
    return spec
