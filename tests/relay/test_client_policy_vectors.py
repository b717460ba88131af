"""The shared client-policy vectors (tests/vectors/client_policy.json) against the REAL
Python client (llm_relay_client.RelayClient) over real sockets, the same vectors that
tests/protocol/test_client_policy.py runs against the policy and
tests/browser/test_client_policy_js.py against relay-client.js in Chromium.

A scripted server (websockets, port 0) plays each vector's server side: ``connect`` takes the
client's next connection and answers its ``hello`` with ``welcome`` (or not), ``recv`` sends
a frame, ``close`` closes with the code (1006: the transport is aborted, no close frame;
1005: a close frame without a status code). The steps wait on real events only: the
server's receipt of a frame, a ``ping``/``pong`` round trip (the client has dispatched every
earlier frame), the client's next connection or its ``closed`` state."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from llm_relay_protocol.client_policy import TOKEN_EXPIRED_REASON
from relay.core.auth import EXPIRED
from llm_relay_client import ConnectionLost, RelayClient, StreamRejected

from .helpers import eventually

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "client_policy.json")
                     .read_text("utf-8"))
SCENARIOS = VECTORS["scenarios"]
HI = [{"role": "user", "content": "hi"}]


class ScriptedConnection:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.hello = asyncio.Event()
        self.sent: list[dict[str, Any]] = []   # what the client sent (no hello, no ping)
        self.closed = asyncio.Event()

    async def serve(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] == "hello":
                    self.hello.set()
                elif frame["type"] == "ping":
                    await self.ws.send(json.dumps({"type": "pong", "data": frame.get("data")}))
                else:
                    self.sent.append(frame)
        except Exception:  # noqa: BLE001 - a scripted close/abort ends the reader any way
            pass
        finally:
            self.closed.set()

    async def close(self, code: int, reason: str) -> None:
        if code == 1006:
            self.ws.transport.abort()
        elif code == 1005:
            self.ws.transport.write(b"\x88\x00")   # a close frame with no status code
            self.ws.transport.close()
        else:
            await self.ws.close(code, reason)
        await self.closed.wait()


class ScriptedRelay:
    def __init__(self) -> None:
        self.accepted: asyncio.Queue[ScriptedConnection] = asyncio.Queue()
        self.connections: list[ScriptedConnection] = []
        self.url = ""

    @contextlib.asynccontextmanager
    async def running(self):
        async with serve(self._handler, "127.0.0.1", 0,
                         subprotocols=["llm-relay.v1"]) as server:
            self.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
            yield self

    async def _handler(self, ws: ServerConnection) -> None:
        conn = ScriptedConnection(ws)
        self.connections.append(conn)
        self.accepted.put_nowait(conn)
        await conn.serve()


def _welcome(grace: float) -> str:
    return json.dumps({"type": "welcome", "protocol": "llm-relay.v1", "session_id": "s",
                       "models": ["demo"], "limits": {"max_streams": 8,
                                                      "max_frame_bytes": 1048576,
                                                      "detach_grace": grace}})


async def _consume(stream, events: list[str], ends: dict[str, Any]) -> None:
    try:
        async for event in stream:
            events.append(f"{event.type}:{event.seq}")
    except StreamRejected as exc:
        ends[stream.id] = {"error": exc.code, "close_code": None}
    except ConnectionLost as exc:
        ends[stream.id] = {"error": exc.code or "connection_lost", "close_code": exc.close_code}
    else:
        ends[stream.id] = {"finish": str(stream.finish.status), "reason": stream.finish.reason}


async def run_scenario(scenario: dict[str, Any]) -> dict[str, Any]:
    token = (lambda: "fresh") if scenario["token"] == "function" else "fixed"
    relay = ScriptedRelay()
    async with relay.running():
        client = RelayClient(relay.url, token=token, backoff=0, backoff_max=0)
        connecting = asyncio.create_task(client.connect())
        streams: dict[str, Any] = {}
        events: dict[str, list[str]] = {}
        ends: dict[str, Any] = {}
        tasks: list[asyncio.Task[None]] = []
        decisions: list[dict[str, Any]] = []
        conn: ScriptedConnection | None = None
        try:
            for step in scenario["steps"]:
                if "connect" in step:
                    conn = await asyncio.wait_for(relay.accepted.get(), 10)
                    await conn.hello.wait()
                    if step["connect"].get("welcome", True):
                        await conn.ws.send(_welcome(step["connect"]["detach_grace"]))
                        if not connecting.done():
                            await connecting
                        await eventually(lambda: client.state == "open")
                elif step.get("app") == "start":
                    sid = step["id"]
                    streams[sid] = client.stream("demo", HI, id=sid)
                    events[sid] = []
                    tasks.append(asyncio.create_task(_consume(streams[sid], events[sid], ends)))
                    if client.state == "open":   # until the relay has it
                        await eventually(lambda: any(f.get("id") == sid for f in conn.sent))
                    else:                        # until it waits for the next connection
                        await eventually(lambda: sid in client._routes)
                elif step.get("app") == "watch":
                    sid = step["id"]
                    streams[sid] = client.watch(step["stream_key"],
                                                after_seq=step.get("after_seq", 0), id=sid)
                    events[sid] = []
                    tasks.append(asyncio.create_task(_consume(streams[sid], events[sid], ends)))
                    if client.state == "open":   # until the relay has its resume
                        await eventually(lambda: any(f.get("id") == sid for f in conn.sent))
                    else:                        # until it waits for the next connection
                        await eventually(lambda: sid in client._routes)
                elif step.get("app") == "cancel":
                    await streams[step["id"]].cancel()
                elif "recv" in step:
                    await conn.ws.send(json.dumps(step["recv"]))
                    await client.ping()   # the pong follows the frame: it was dispatched
                elif "close" in step:
                    await conn.close(step["close"]["code"], step["close"]["reason"])
                    # The decision shows: a new connection attempt, or closed for good.
                    await eventually(lambda: client.state == "closed"
                                     or not relay.accepted.empty())
                    decisions.append({"code": step["close"]["code"],
                                      "retry": client.state != "closed"})
            if client.state == "open":
                await client.ping()   # every frame the client sent has arrived
            async with asyncio.timeout(10):
                await asyncio.gather(*tasks)
            return {"decisions": decisions,
                    "sent": [[{"type": "start", "id": f["id"]} if f["type"] == "start" else f
                              for f in c.sent] for c in relay.connections],
                    "streams": {sid: {"events": events[sid], "end": ends.get(sid)}
                                for sid in streams},
                    "state": client.state, "connections": len(relay.connections)}
        finally:
            for task in [*tasks, connecting]:
                task.cancel()
            await asyncio.gather(*tasks, connecting, return_exceptions=True)
            await client.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
async def test_vector_scenarios_against_the_python_client(scenario):
    async with asyncio.timeout(30):   # a client that does not decide must fail, not hang
        outcome = await run_scenario(scenario)
    assert outcome == scenario["expect"], scenario["about"]


def test_the_relay_and_the_policy_name_the_same_token_expiry():
    assert EXPIRED == TOKEN_EXPIRED_REASON
