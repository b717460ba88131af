"""asyncio helpers of the client library, also used by every layer of the relay server that
owns tasks (through ``relay.aio``). It imports nothing but asyncio.

Stopping a task you own without swallowing a cancellation aimed at you.

The mistake this module exists to prevent::

    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):   # WRONG
        await task

``await task`` raises ``CancelledError`` in two different cases: the child ended cancelled
(the expected outcome of our own ``cancel()``), or *the current task* was cancelled while it
waited. Suppressing both loses the second: whoever cancelled us (a shutdown, a timeout, a
test) sees us carry on as if nothing happened. ``asyncio.current_task().cancelling()`` tells
the two apart: it is above zero exactly when a cancellation of the current task is pending.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` (one the caller owns) and wait until it has ended.

    A ``CancelledError`` that only says the child ended cancelled is absorbed; one aimed at
    the current task (``cancelling() > 0``) propagates, and then ``task`` may still be
    finishing its own cancellation. Any other exception the child ended with propagates,
    as from a plain ``await task``."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling() > 0:
            raise
