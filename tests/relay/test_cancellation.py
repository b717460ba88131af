"""No swallowed ``CancelledError`` (issue 12, item 3): stopping a task we own absorbs the
child's cancellation, never one aimed at the task doing the stopping.

Each test holds the child inside its own cancellation cleanup (an event it waits on), so the
outer task is provably waiting for it when the test cancels the outer task. No sleeps."""

from __future__ import annotations

import asyncio

import pytest

from llm_relay_client import RelayClient
from relay.aio import cancel_and_wait


# On uvloop (the default) and on asyncio's own loop (tests/conftest.py).
pytestmark = pytest.mark.both_loops

class _Child:
    """A task that, once cancelled, waits for ``release`` before it ends cancelled."""

    def __init__(self) -> None:
        self.running, self.cleanup_started, self.release = (
            asyncio.Event(), asyncio.Event(), asyncio.Event())
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        self.running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cleanup_started.set()
            try:
                await self.release.wait()
            finally:
                raise asyncio.CancelledError


async def test_cancel_and_wait_absorbs_the_childs_own_cancellation():
    child = _Child()
    await child.running.wait()
    stopping = asyncio.create_task(cancel_and_wait(child.task))
    await child.cleanup_started.wait()
    child.release.set()
    await stopping                    # returns normally: the CancelledError was the child's
    assert child.task.cancelled() and not stopping.cancelled()


async def test_cancel_and_wait_propagates_a_cancellation_of_the_caller():
    child = _Child()
    await child.running.wait()
    stopping = asyncio.create_task(cancel_and_wait(child.task))
    await child.cleanup_started.wait()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert stopping.cancelled()
    child.release.set()
    await asyncio.gather(child.task, return_exceptions=True)


async def test_cancel_and_wait_reraises_the_childs_failure():
    async def broken() -> None:
        raise LookupError("child bug")

    task = asyncio.create_task(broken())
    await asyncio.gather(task, return_exceptions=True)
    with pytest.raises(LookupError):
        await cancel_and_wait(task)


async def test_cancelling_the_caller_of_relay_client_close_propagates():
    """``RelayClient.close`` used to ``except CancelledError: pass`` around its connection
    task: a caller cancelled while close() waited carried on as if it had not been."""
    child = _Child()
    client = RelayClient("ws://127.0.0.1:9/ws")      # never connects: the task is injected
    client._task = child.task
    await child.running.wait()
    closing = asyncio.create_task(client.close())
    await child.cleanup_started.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    child.release.set()
    await asyncio.gather(child.task, return_exceptions=True)
    await client.close()              # a later close finishes the job
    assert client._task is None


class _FloodingSocket:
    """A socket whose client says hello, then floods frames and never answers the close:
    after the flood, reading blocks (``draining`` set) and ``close`` never completes
    (``close_ended`` is set once it ends, however)."""

    subprotocol = "llm-relay.v1"

    def __init__(self, frames: int) -> None:
        self._frames = frames
        self.draining = asyncio.Event()
        self.close_started = asyncio.Event()
        self.close_ended = False

    async def recv(self):
        return '{"type":"hello"}'

    async def send(self, data, text=True):
        pass

    async def close(self, code=1000, reason=""):
        self.close_started.set()
        try:
            await asyncio.Event().wait()        # the client never answers
        finally:
            self.close_ended = True

    def __aiter__(self):
        return self._read()

    async def _read(self):
        yield '{"type":"hello"}'
        for _ in range(self._frames):
            yield '{"type":"ping"}'
        self.draining.set()
        await asyncio.Event().wait()            # nothing more, and the socket stays open


async def test_a_session_cancelled_while_draining_a_flooder_stops_its_close_too():
    """The 4429 close of a flooding client runs while the session drains what the client
    queued; a session cancelled meanwhile (shutdown) used to leave that close running,
    un-awaited. It is cancelled and awaited with the session."""
    from relay.config import RelaySettings
    from relay.runtime.session import Session
    from relay.upstream.providers import ModelRegistry

    ws = _FloodingSocket(frames=10)
    session = Session(ws, RelaySettings(port=0, frames_per_second=1, frame_burst=2),
                      ModelRegistry.demo_only())
    run = asyncio.create_task(session.run())
    await ws.draining.wait()
    await ws.close_started.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert ws.close_ended
