"""Every registered dialect is held to the same door and limits (issue 22, item 1).

Parametrised over ``relay.runtime.routes.DIALECTS``: a dialect registered there is tested
here with nothing more than a small client ``Driver`` (how its client greets, asks for a
stream and reads the answer), and the test fails, naming it, when the driver is missing.
Against the real relay (``--auth``, a real socket, the real ``websockets`` client, LiteLLM's
provider code against a loopback fake upstream), each dialect is held to:

* the Origin check of the upgrade (HTTP 403 for a disallowed browser origin);
* the per-principal connection cap with ``--auth`` (close 4429 for one connection too many,
  and room again once one has gone). The /ai-sdk hole this guards: its connections per
  principal were once unlimited;
* the per-principal stream cap, across two connections of one principal;
* the principal's start rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from relay.core.auth import api_key_label
from relay.runtime.routes import DIALECTS, DialectRoute
from tests.fakes.upstream import FakeUpstream, stream

from .helpers import RECV_TIMEOUT, eventually, start_relay
from .test_providers import KEY as PROVIDER_KEY, registry_for

DOOR_KEY = "sk-dialect-door-key-0123456789abcdef"
PRINCIPAL = api_key_label(hashlib.sha256(DOOR_KEY.encode()).hexdigest())
BEARER = {"Authorization": f"Bearer {DOOR_KEY}"}
AUTH = dict(auth=True, api_keys=[DOOR_KEY])


@pytest.fixture(autouse=True)
def provider_key(monkeypatch):
    monkeypatch.setenv("FAKE_PROVIDER_KEY", PROVIDER_KEY)


# ---------------------------------------------------------------- a client per dialect


class Driver(Protocol):
    """What these tests need of a dialect's client."""

    #: Extra ``connect`` arguments (a subprotocol).
    connect_kwargs: dict[str, Any]

    async def greet(self, ws: ClientConnection) -> None:
        """Send what opens the connection, if anything (not awaiting an answer)."""

    async def ready(self, ws: ClientConnection) -> None:
        """Greet and wait until the connection is served."""

    def start(self, rid: str) -> dict:
        """The frame asking for a stream named ``rid`` on model alias ``oai``."""

    async def answer(self, ws: ClientConnection, rid: str) -> tuple[str, str | None]:
        """("started", None) once the stream ``rid`` runs, or ("refused", the refusal's
        text)."""


async def _frames(ws: ClientConnection) -> AsyncIterator[dict]:
    while True:
        async with asyncio.timeout(RECV_TIMEOUT):
            yield json.loads(await ws.recv())


class V1Driver:
    connect_kwargs = {"subprotocols": ["llm-relay.v1"]}

    async def greet(self, ws: ClientConnection) -> None:
        await ws.send(json.dumps({"type": "hello", "client": {"name": "t", "version": "0"}}))

    async def ready(self, ws: ClientConnection) -> None:
        await self.greet(ws)
        async for frame in _frames(ws):
            assert frame["type"] == "welcome", frame
            return

    def start(self, rid: str) -> dict:
        return {"type": "start", "id": rid, "model": "oai",
                "messages": [{"role": "user", "content": "x"}]}

    async def answer(self, ws: ClientConnection, rid: str) -> tuple[str, str | None]:
        async for frame in _frames(ws):
            if frame.get("id") == rid and frame["type"] in ("started", "error"):
                return ("started", None) if frame["type"] == "started" else \
                    ("refused", frame["message"])
        raise AssertionError("unreachable")


class AiSdkDriver:
    connect_kwargs: dict[str, Any] = {}

    async def greet(self, ws: ClientConnection) -> None:
        pass

    async def ready(self, ws: ClientConnection) -> None:
        pass

    def start(self, rid: str) -> dict:
        return {"type": "send", "requestId": rid, "id": f"chat-{rid}",
                "trigger": "submit-message", "messageId": None, "headers": {},
                "body": {"model": "oai"}, "metadata": None,
                "messages": [{"id": "u1", "role": "user",
                              "parts": [{"type": "text", "text": "x"}]}]}

    async def answer(self, ws: ClientConnection, rid: str) -> tuple[str, str | None]:
        async for frame in _frames(ws):
            if frame.get("requestId") == rid and frame["type"] in ("chunk", "error"):
                return ("started", None) if frame["type"] == "chunk" else \
                    ("refused", frame["errorText"])
        raise AssertionError("unreachable")


#: The client of each registered dialect, by path. A dialect added to
#: ``relay.runtime.routes.DIALECTS`` adds its driver here.
DRIVERS: dict[str, Driver] = {"/ws": V1Driver(), "/ai-sdk": AiSdkDriver()}


@pytest.fixture(params=DIALECTS, ids=lambda route: route.name)
def dialect(request) -> tuple[DialectRoute, Driver]:
    route = request.param
    driver = DRIVERS.get(route.path)
    if driver is None:
        pytest.fail(f"dialect {route.name!r} at {route.path} has no test driver: add one to "
                    "DRIVERS in tests/relay/test_dialect_doors.py")
    return route, driver


@contextlib.asynccontextmanager
async def relay(**settings: Any):
    async with FakeUpstream() as up:
        async with start_relay(registry=registry_for(up), **AUTH, **settings) as server:
            yield up, server


@contextlib.asynccontextmanager
async def door(server, dialect: tuple[DialectRoute, Driver], **kwargs: Any):
    route, driver = dialect
    kwargs.setdefault("additional_headers", BEARER)
    async with connect(f"ws://127.0.0.1:{server.port}{route.path}", **driver.connect_kwargs,
                       **kwargs) as ws:
        yield ws


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason ``ws`` is closed with (frames before it are dropped)."""
    with pytest.raises(ConnectionClosed) as info:
        async for _ in _frames(ws):
            pass
    assert info.value.rcvd is not None, "closed without a close frame"
    return info.value.rcvd.code, info.value.rcvd.reason


async def start(ws: ClientConnection, driver: Driver, rid: str) -> tuple[str, str | None]:
    await ws.send(json.dumps(driver.start(rid)))
    return await driver.answer(ws, rid)


# ---------------------------------------------------------------- the door and the limits


async def test_the_origin_check(dialect):
    async with relay() as (_, server):
        with pytest.raises(InvalidStatus) as info:
            async with door(server, dialect, origin="http://evil.example"):
                pass
        assert info.value.response.status_code == 403
        async with door(server, dialect, origin=f"http://127.0.0.1:{server.port}") as ws:
            await dialect[1].ready(ws)                    # the relay's own origin


async def test_the_per_principal_connection_cap_with_auth(dialect):
    """With --auth, the principal's connections are capped whatever the endpoint (the
    /ai-sdk hole: once unlimited there)."""
    route, driver = dialect
    async with relay(max_connections_per_principal=2) as (_, server):
        async with door(server, dialect) as first, door(server, dialect) as second:
            await driver.ready(first)
            await driver.ready(second)
            await eventually(lambda: server.principals.connections_of(PRINCIPAL) == 2)
            async with door(server, dialect) as third:
                await driver.greet(third)
                assert await closed_with(third) == (
                    4429, "too many connections for this principal"), route.name
            assert server.principals.connections_of(PRINCIPAL) == 2
        await eventually(lambda: server.principals.connections_of(PRINCIPAL) == 0)
        async with door(server, dialect) as again:                # room again
            await driver.ready(again)
            await eventually(lambda: server.principals.connections_of(PRINCIPAL) == 1)


async def test_the_per_principal_stream_cap(dialect):
    """One principal's streams are capped across its connections."""
    _, driver = dialect
    async with relay(max_streams_per_principal=1) as (up, server):
        # Its first token goes out (an AI SDK response shows it started), then it runs on.
        up.enqueue(stream("openai", ["a", "b", "c"]).silent_after(2))
        async with door(server, dialect) as one, door(server, dialect) as other:
            await driver.ready(one)
            await driver.ready(other)
            assert await start(one, driver, "s1") == ("started", None)
            assert await start(other, driver, "s2") == (
                "refused", "at most 1 concurrent streams per principal")
            await eventually(lambda: len(up.requests) == 1)      # s1's only
            assert server.principals.state_of(PRINCIPAL).streams == 1


async def test_the_start_rate(dialect):
    _, driver = dialect
    async with relay(start_rate_per_minute=1, start_burst=1) as (up, server):
        up.enqueue(stream("openai", ["a"]))
        async with door(server, dialect) as ws:
            await driver.ready(ws)
            assert await start(ws, driver, "s1") == ("started", None)
            assert await start(ws, driver, "s2") == ("refused", "too many starts; slow down")
            await eventually(lambda: len(up.requests) == 1)      # s1's only
